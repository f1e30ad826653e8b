"""ch8fast.torch's optimizers for the rules torch.optim lacks (Lion, ADOPT, AdEMAMix),
with their authors' PyTorch signatures and state: the same bits as ch8fast's own classes
on the same arrays (the same kernels, the papers' formulas), their state, state dicts and
what they refuse (skipped without torch)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import ch8fast  # noqa: E402
import ch8fast.torch as ct  # noqa: E402
from ch8fast import schedules  # noqa: E402

SHAPES = [(37,), (4, 9), ()]

CASES = [  # (ch8fast.torch class and keywords, ch8fast class and keywords)
    (ct.Lion, dict(lr=1e-3), ch8fast.Lion, dict(lr=1e-3)),
    (ct.Lion, dict(lr=1e-3, betas=(0.8, 0.95), weight_decay=0.5),
     ch8fast.Lion, dict(lr=1e-3, betas=(0.8, 0.95), weight_decay=0.5)),
    (ct.ADOPT, dict(lr=1e-2), ch8fast.ADOPT, dict(lr=1e-2)),
    (ct.ADOPT, dict(lr=1e-2, clip_lambda=None, weight_decay=0.1, decouple=True,
                    maximize=True),
     ch8fast.ADOPT, dict(lr=1e-2, use_clipping=False, weight_decay=0.1,
                         decoupled_weight_decay=True, maximize=True)),
    (ct.ADOPT, dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-4, weight_decay=0.1),
     ch8fast.ADOPT, dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-4, weight_decay=0.1)),
    (ct.AdEMAMix, dict(lr=1e-2), ch8fast.AdEMAMix, dict(lr=1e-2, alpha=2.0)),
    (ct.AdEMAMix, dict(lr=1e-2, betas=(0.8, 0.99, 0.999), alpha=5.0, weight_decay=0.1,
                       alpha_warmup=7, beta3_warmup=9),
     ch8fast.AdEMAMix, dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1,
                            alpha=schedules.ademamix_alpha(5.0, 7),
                            beta3=schedules.ademamix_beta3(0.999, 0.8, 9))),
]
IDS = ["lion", "lion_wd", "adopt", "adopt_decoupled_unclipped_maximize", "adopt_l2",
       "ademamix", "ademamix_warmup"]


def _run(case, dtype, steps=20, seed=0):
    tcls, tkw, ncls, nkw = case
    g = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=g, dtype=dtype) for s in SHAPES]
    ours = [torch.nn.Parameter(x.clone()) for x in init]
    arrays = [x.numpy().copy() for x in init]
    topt = tcls(ours, **tkw)
    nopt = ncls(arrays, **nkw)
    for _ in range(steps):
        grads = [torch.randn(s, generator=g, dtype=dtype) * 3 for s in SHAPES]
        for p, gr in zip(ours, grads):
            p.grad = gr.clone()
        topt.step()
        nopt.step([gr.numpy().copy() for gr in grads])
    return ours, arrays, topt, nopt


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_the_same_bits_as_ch8fasts_own_class(case, dtype):
    ours, arrays, topt, nopt = _run(case, dtype)
    for p, a in zip(ours, arrays):
        assert p.detach().numpy().tobytes() == a.tobytes()
    for i, p in enumerate(ours):
        st = topt.state[p]
        for name, arr in nopt.state[i].items():
            assert st[name].numpy().tobytes() == np.asarray(arr).tobytes(), name


def test_state_names_are_the_authors():
    for case, names in ((CASES[0], {"exp_avg"}), (CASES[2], {"step", "exp_avg", "exp_avg_sq"}),
                        (CASES[5], {"step", "exp_avg_fast", "exp_avg_slow", "exp_avg_sq"})):
        ours, _, topt, _ = _run(case, torch.float32, steps=2)
        assert set(topt.state[ours[0]]) == names
        if "step" in names:
            assert float(topt.state[ours[0]]["step"]) == 2.0


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_state_dict_resumes_bit_for_bit(case):
    """10 steps, state_dict, a new optimizer loads it and takes 10 more: the same bits as
    20 steps without a break."""
    tcls, tkw = case[0], case[1]
    g = torch.Generator().manual_seed(3)
    init = [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]
    grads = [[torch.randn(s, generator=g, dtype=torch.float64) * 3 for s in SHAPES]
             for _ in range(20)]

    def steps(opt, params, gs):
        for step_grads in gs:
            for p, gr in zip(params, step_grads):
                p.grad = gr.clone()
            opt.step()

    whole = [torch.nn.Parameter(x.clone()) for x in init]
    steps(tcls(whole, **tkw), whole, grads)
    half = [torch.nn.Parameter(x.clone()) for x in init]
    first = tcls(half, **tkw)
    steps(first, half, grads[:10])
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in half]
    second = tcls(resumed, **tkw)
    second.load_state_dict(first.state_dict())
    steps(second, resumed, grads[10:])
    for p, q in zip(whole, resumed):
        assert torch.equal(p.detach(), q.detach())


def test_adopt_refuses_a_clip_lambda_it_cannot_compute():
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="clip_lambda"):
        ct.ADOPT([p], clip_lambda=lambda step: step ** 0.5)


def test_ademamix_warmup_needs_one_step_count():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    opt = ct.AdEMAMix([a, b], alpha_warmup=5)
    a.grad = torch.ones(3)
    opt.step()                                       # b has no gradient: a is one ahead
    b.grad = torch.ones(2)
    before = a.detach().clone()
    with pytest.raises(ValueError, match="different numbers of steps"):
        opt.step()
    assert torch.equal(a.detach(), before)


def test_ademamix_needs_three_betas():
    with pytest.raises(ValueError, match="beta1, beta2, beta3"):
        ct.AdEMAMix([torch.nn.Parameter(torch.ones(3))], betas=(0.9, 0.999))
