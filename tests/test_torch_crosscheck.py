"""ch8fast against torch.optim where the two follow the same convention (skipped without
torch): Adam, AdamW, AdaGrad, and SGD with momentum and Nesterov momentum at a constant lr."""

import numpy as np
import pytest

import ch8fast
from conftest import assert_close

torch = pytest.importorskip("torch")

N_STEPS = 10


def _run_both(ours_cls, ours_kw, torch_cls, torch_kw, dtype, seed=0, shapes=((257,), (4, 9))):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(dtype) for s in shapes]
    grads = [[rng.standard_normal(s).astype(dtype) for s in shapes] for _ in range(N_STEPS)]
    tparams = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in params]
    topt = torch_cls(tparams, **torch_kw)
    opt = ours_cls(params, **ours_kw)
    for g in grads:
        for tp, gi in zip(tparams, g):
            tp.grad = torch.from_numpy(gi.copy())
        topt.step()
        opt.step(g)
    return params, [tp.detach().numpy() for tp in tparams]


CASES = [
    ("adam", ch8fast.Adam, dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8),
     "Adam", dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8)),
    ("adam_l2_amsgrad", ch8fast.Adam, dict(lr=0.01, weight_decay=0.05, amsgrad=True),
     "Adam", dict(lr=0.01, weight_decay=0.05, amsgrad=True)),
    ("adamw", ch8fast.AdamW, dict(lr=0.01, weight_decay=0.1),
     "AdamW", dict(lr=0.01, weight_decay=0.1)),
    ("adagrad", ch8fast.AdaGrad, dict(lr=0.1, eps=1e-10, weight_decay=0.01),
     "Adagrad", dict(lr=0.1, eps=1e-10, weight_decay=0.01)),
    ("momentum", ch8fast.SGD, dict(lr=0.05, momentum=0.9),
     "SGD", dict(lr=0.05, momentum=0.9)),
    ("momentum_wd", ch8fast.SGD, dict(lr=0.05, momentum=0.5, weight_decay=0.01),
     "SGD", dict(lr=0.05, momentum=0.5, weight_decay=0.01)),
    # torch's Nesterov SGD moves the same point as the shifted form: phi = theta + alpha v
    ("nesterov", ch8fast.SGD, dict(lr=0.05, momentum=0.9, nesterov=True),
     "SGD", dict(lr=0.05, momentum=0.9, nesterov=True)),
    ("sgd", ch8fast.SGD, dict(lr=0.05), "SGD", dict(lr=0.05)),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name,ours,ours_kw,theirs,theirs_kw", CASES,
                         ids=[c[0] for c in CASES])
def test_same_trajectory_as_torch(name, ours, ours_kw, theirs, theirs_kw, dtype):
    ours_p, torch_p = _run_both(ours, ours_kw, getattr(torch.optim, theirs), theirs_kw, dtype)
    for a, b in zip(ours_p, torch_p):
        assert_close(a, b, dtype, name)


def test_torch_model_updated_through_shared_memory():
    """A torch CPU model's parameters, seen as NumPy arrays, are updated in place."""
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    arrays = [p.detach().numpy() for p in model.parameters()]
    before = [a.copy() for a in arrays]
    opt = ch8fast.Adam(arrays, lr=0.1)
    x = torch.randn(16, 6)
    loss = model(x).pow(2).mean()
    loss.backward()
    opt.step([p.grad.numpy() for p in model.parameters()])
    for p, a, b in zip(model.parameters(), arrays, before):
        assert np.shares_memory(p.detach().numpy(), a)
        assert not np.array_equal(p.detach().numpy(), b)
