"""ch8fast.torch keeps what a step bound for the next steps (a plan: the gradients are then
checked by a few attribute reads and passed by address). Every edit a user can make
between steps must still take effect: each edit below is made to ch8fast.torch.Adam and
torch.optim.Adam (fused CPU kernels, the same bits) between steps that reuse a plan, and
the two must stay bit-equal."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import ch8fast.torch as ct  # noqa: E402

SHAPES = [(37,), (4, 9), (), (16,)]


def _edit_lr(o, ps, k):
    o.param_groups[0]["lr"] = 0.02 + 0.001 * k


def _edit_betas(o, ps, k):
    o.param_groups[0]["betas"] = (0.8, 0.99)


def _edit_tensor_lr(o, ps, k):
    o.param_groups[1]["lr"].fill_(0.003 * k)


def _grad_none(o, ps, k):
    ps[1].grad = None


def _grad_transposed(o, ps, k):
    # the same values in column-major memory (torch's fused CPU kernels misread such a
    # gradient, so torch's side keeps its contiguous one)
    if isinstance(o, ct.Adam):
        ps[1].grad = ps[1].grad.t().contiguous().t()


def _state_tensor_replaced(o, ps, k):
    o.state[ps[0]]["exp_avg"] = o.state[ps[0]]["exp_avg"] * 0.5


def _state_dict_replaced(o, ps, k):
    o.state[ps[3]] = {n: t.clone() for n, t in o.state[ps[3]].items()}


def _state_tensor_edited(o, ps, k):
    o.state[ps[0]]["exp_avg_sq"].mul_(2.0)


def _step_count_edited(o, ps, k):
    o.state[ps[2]]["step"].fill_(100.0)


def _data_replaced(o, ps, k):
    ps[0].data = ps[0].data * 1.5


def _params_reordered(o, ps, k):
    o.param_groups[0]["params"].reverse()


def _param_removed(o, ps, k):
    o.param_groups[0]["params"].pop()


def _param_appended(o, ps, k):
    extra = torch.nn.Parameter(torch.linspace(-1, 1, 11, dtype=ps[0].dtype))
    ps.append(extra)
    o.param_groups[0]["params"].append(extra)


def _group_added(o, ps, k):
    extra = torch.nn.Parameter(torch.linspace(-2, 1, 7, dtype=ps[0].dtype))
    ps.append(extra)
    o.add_param_group({"params": [extra], "lr": 0.05})


def _state_loaded(o, ps, k):
    o.load_state_dict(o.state_dict())


EDITS = [_edit_lr, _edit_betas, _edit_tensor_lr, _grad_none, _grad_transposed,
         _state_tensor_replaced, _state_dict_replaced, _state_tensor_edited,
         _step_count_edited, _data_replaced, _params_reordered, _param_removed,
         _param_appended, _group_added, _state_loaded]


def _make(cls, dtype):
    g = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in SHAPES]
    opt = cls([{"params": ps[:3]}, {"params": ps[3:], "lr": torch.tensor(0.01)}],
              lr=0.01, fused=True)
    return ps, opt


def _grads(pairs, g, fresh):
    for a, b in pairs:
        grad = torch.randn(a.shape, generator=g, dtype=a.dtype)
        if fresh or a.grad is None:           # set_to_none=True: new tensors each step
            a.grad, b.grad = grad.clone(), grad.clone()
        else:                                 # set_to_none=False: the same tensors
            a.grad.copy_(grad)
            b.grad.copy_(grad)


@pytest.mark.parametrize("fresh", [True, False], ids=["new_grads", "same_grads"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("edit", EDITS, ids=[e.__name__.strip("_") for e in EDITS])
def test_an_edit_between_planned_steps_takes_effect(edit, dtype, fresh):
    ours, o1 = _make(ct.Adam, dtype)
    theirs, o2 = _make(torch.optim.Adam, dtype)
    g = torch.Generator().manual_seed(1)
    for k in range(9):
        _grads(list(zip(ours, theirs)), g, fresh)
        if k in (3, 6):                      # after steps that planned and reused a plan
            edit(o1, ours, k)
            edit(o2, theirs, k)
        o1.step()
        o2.step()
        if k == 2 or k in (5, 8) and (fresh or edit is not _grad_transposed):
            assert o1._plan is not None      # the next step can use a plan
        for a, b in zip(ours, theirs):
            assert torch.equal(a.detach(), b.detach()), (edit.__name__, k)
    for a, b in zip(ours, theirs):
        sa, sb = o1.state[a], o2.state[b]
        assert sa.keys() == sb.keys()
        for n in sa:
            assert torch.equal(sa[n], sb[n]), n


def test_a_planned_step_refuses_a_gradient_changed_behind_its_back():
    """A gradient whose data was swapped for a smaller or other-dtype tensor (through
    ``.data``, which torch does not check) is refused by name, nothing written."""
    for bad in (torch.ones(3), torch.ones((4, 9), dtype=torch.float64)):
        ps, opt = _make(ct.Adam, torch.float32)
        for p in ps:
            p.grad = torch.ones_like(p)
        opt.step()
        opt.step()
        before = [p.detach().clone() for p in ps]
        state = {n: t.clone() for n, t in opt.state[ps[1]].items()}
        ps[1].grad.data = bad
        with pytest.raises((TypeError, ValueError), match=r"params'\]\[1\]|grads\[1\]"):
            opt.step()
        assert all(torch.equal(p.detach(), b) for p, b in zip(ps, before))
        assert all(torch.equal(opt.state[ps[1]][n], t) for n, t in state.items())


def test_a_planned_step_reads_a_negated_view():
    """A lazily negated gradient (torch's neg bit) is read as its values, not its
    memory."""
    p = torch.nn.Parameter(torch.ones(5))
    q = torch.nn.Parameter(torch.ones(5))
    o1, o2 = ct.SGD([p], lr=0.5, fused=True), torch.optim.SGD([q], lr=0.5, fused=True)
    x = torch.arange(5.0)
    for _ in range(3):
        p.grad, q.grad = x.clone(), x.clone()
        o1.step()
        o2.step()
    p.grad, q.grad = torch._neg_view(x.clone()), -x
    o1.step()
    o2.step()
    np.testing.assert_array_equal(p.detach().numpy(), q.detach().numpy())
