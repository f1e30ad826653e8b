"""Schedule-free SGD and AdamW (Defazio et al. 2024): the arrays hold y, the state z, and
theta is the average x. Against the paper's three sequences (reference.py), the authors'
PyTorch optimizers and optax.contrib's, and the optimizer's promises around the point it
keeps: theta(), at_theta(), the per-group weights in state_dict(), skipped steps,
closures."""

import copy
import pickle

import numpy as np
import pytest

import ch8fast
import reference as R
from conftest import assert_close, optax_modules, optax_run, reference_hyper

RULES = [(ch8fast.ScheduleFreeSGD, dict(lr=0.05, weight_decay=0.01, warmup_steps=3)),
         (ch8fast.ScheduleFreeSGD, dict(lr=0.05, momentum=0.8, r=1.0, convention="optax",
                                        warmup_steps=4)),
         (ch8fast.ScheduleFreeAdamW, dict(lr=1e-2, weight_decay=0.1, warmup_steps=3)),
         (ch8fast.ScheduleFreeAdamW, dict(lr=1e-2, betas=(0.95, 0.99), maximize=True,
                                          weight_lr_power=1.0, convention="optax"))]
IDS = ["sgd", "sgd_optax", "adamw", "adamw_optax_maximize"]


def _problem(dtype, seed=0, n_steps=12):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(dtype) for s in ((1000,), (3, 7))]
    grads = [[rng.standard_normal(p.shape).astype(dtype) for p in params]
             for _ in range(n_steps)]
    return params, grads


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cls,hyper", RULES, ids=IDS)
def test_theta_is_the_average_x(cls, hyper, dtype):
    """theta() is the paper's x, the arrays its y, z the state, at every step."""
    params, grads = _problem(dtype)
    ref = getattr(R, cls.rule.name)(params, **reference_hyper(cls, hyper))
    opt = cls(params, **hyper)
    for g in grads:
        opt.step(g)
        ref.step(g)
        for i, (th, x) in enumerate(zip(opt.theta(), ref.theta())):
            assert th.dtype == dtype
            assert_close(th, x, dtype, f"x {i}")
            assert_close(params[i], ref.params[i], dtype, f"y {i}")
            assert_close(opt.state[i]["z"], ref.state[i]["z"], dtype, f"z {i}")


@pytest.mark.parametrize("cls,hyper", RULES, ids=IDS)
def test_at_theta_holds_x_and_restores_y_exactly(cls, hyper):
    params, grads = _problem(np.float32)
    opt = cls(params, **hyper)
    for g in grads[:5]:
        opt.step(g)
    y = [p.copy() for p in params]
    x = opt.theta()
    assert not all(np.array_equal(a, b) for a, b in zip(x, y))
    with opt.at_theta() as arrays:
        assert arrays is opt.params or list(arrays) == list(opt.params)
        for p, xi in zip(params, x):
            assert p.tobytes() == xi.tobytes()
        with pytest.raises(RuntimeError, match="inside at_theta"):
            opt.step(grads[5])
    for p, yi in zip(params, y):
        assert p.tobytes() == yi.tobytes()


@pytest.mark.parametrize("cls,hyper", RULES, ids=IDS)
def test_state_dict_keeps_the_weights_and_resumes_bit_for_bit(cls, hyper):
    params, grads = _problem(np.float64)
    ref = getattr(R, cls.rule.name)(params, **reference_hyper(cls, hyper))
    opt = cls(params, **hyper)
    for g in grads[:5]:
        opt.step(g)
        ref.step(g)
    sd = opt.state_dict()
    g0 = sd["param_groups"][0]
    assert g0["weight_sum"] == pytest.approx(ref.weight_sum, rel=1e-15)
    assert g0["lr_max"] == pytest.approx(ref.lr_max, rel=1e-15)
    twin_params = [p.copy() for p in params]
    twin = cls(twin_params, **hyper)
    twin.load_state_dict(pickle.loads(pickle.dumps(sd)))
    clone = copy.deepcopy(opt)
    for g in grads[5:]:
        opt.step(g)
        twin.step(g)
        clone.step(g)
    for a, b, c in zip(params, twin_params, clone.params):
        assert a.tobytes() == b.tobytes() == c.tobytes()
    # without the weights, the average would restart: a different x
    fresh = cls([p.copy() for p in params], **hyper)
    assert not np.array_equal(fresh.theta()[0], opt.theta()[0])


def test_a_bad_saved_weight_is_refused_and_changes_nothing():
    params, grads = _problem(np.float64)
    opt = ch8fast.ScheduleFreeSGD(params, lr=0.1)
    opt.step(grads[0])
    sd = opt.state_dict()
    before = copy.deepcopy(opt.state_dict())
    for key, value, exc in [("weight_sum", -1.0, ValueError),
                            ("lr_max", float("nan"), ValueError),
                            ("weight_sum", "1", TypeError)]:
        bad = copy.deepcopy(sd)
        bad["param_groups"][0][key] = value
        with pytest.raises(exc, match=rf"state_dict\['param_groups'\]\[0\]\['{key}'\]"):
            opt.load_state_dict(bad)
    bad = copy.deepcopy(sd)
    del bad["param_groups"][0]["lr_max"]
    with pytest.raises(ValueError, match="lr_max"):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]


def test_a_skipped_step_does_not_count_in_the_average():
    params, grads = _problem(np.float64)
    a = ch8fast.ScheduleFreeAdamW(params, lr=1e-2, warmup_steps=4, skip_nonfinite=True)
    b_params = [p.copy() for p in params]
    b = ch8fast.ScheduleFreeAdamW(b_params, lr=1e-2, warmup_steps=4)
    for k, g in enumerate(grads):
        if k == 3:
            bad = [x.copy() for x in g]
            bad[0][7] = np.nan
            a.step(bad)
            assert a.skipped_steps == 1
        a.step(g)
        b.step(g)
    assert a.state_dict()["param_groups"][0]["weight_sum"] == \
        b.state_dict()["param_groups"][0]["weight_sum"]
    for p, q in zip(params, b_params):
        assert p.tobytes() == q.tobytes()


def test_a_closure_is_evaluated_at_y():
    params, grads = _problem(np.float64)
    twin = [p.copy() for p in params]
    a = ch8fast.ScheduleFreeSGD(params, lr=0.1, warmup_steps=2)
    b = ch8fast.ScheduleFreeSGD(twin, lr=0.1, warmup_steps=2)
    for g in grads:
        seen = []
        a.step(closure=lambda: (seen.append([p.copy() for p in params]), g)[1])
        assert all(s.tobytes() == t.tobytes() for s, t in zip(seen[0], twin))
        b.step(g)
    for p, q in zip(params, twin):
        assert p.tobytes() == q.tobytes()


def test_the_weights_are_per_group_and_a_new_group_starts_its_own():
    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal(5), rng.standard_normal(5)
    opt = ch8fast.ScheduleFreeSGD([w1], lr=0.1)
    for _ in range(3):
        opt.step([rng.standard_normal(5)])
    opt.add_param_group({"params": [w2], "lr": 0.2})
    g = rng.standard_normal(5)
    opt.step([g, g])
    groups = opt.state_dict()["param_groups"]
    assert groups[0]["weight_sum"] == pytest.approx(4 * 0.1 ** 2)
    assert groups[1]["weight_sum"] == pytest.approx(0.2 ** 2)
    assert groups[1]["step"] == 1


@pytest.mark.parametrize("make,pattern", [
    (lambda w: ch8fast.ScheduleFreeSGD([w], momentum=0.0), r"momentum must be in \(0, 1\)"),
    (lambda w: ch8fast.ScheduleFreeSGD([w], momentum=1.0), r"momentum must be in \(0, 1\)"),
    (lambda w: ch8fast.ScheduleFreeAdamW([w], betas=(0.0, 0.9)), r"betas\[0\] must be in"),
    (lambda w: ch8fast.ScheduleFreeSGD([w], warmup_steps=-1), "warmup_steps must be"),
    (lambda w: ch8fast.ScheduleFreeSGD([w], weight_lr_power=-2.0), "weight_lr_power"),
    (lambda w: ch8fast.ScheduleFreeSGD([w], convention="torch"), "convention"),
    (lambda w: ch8fast.ScheduleFreeSGD([w], sparse="catch_up"), "sparse='catch_up'"),
    (lambda w: ch8fast.ScheduleFreeSGD([w], state_format="q8"), "state_format='q8'"),
], ids=["momentum_0", "momentum_1", "beta1_0", "warmup", "power", "convention", "catch_up",
        "q8"])
def test_bad_hyperparameters_are_refused(make, pattern):
    w = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match=pattern):
        make(w)
    assert (w == 1).all()


def test_beta_cannot_change_after_the_optimizer_is_made():
    w = np.ones(4)
    opt = ch8fast.ScheduleFreeSGD([w], lr=0.1)
    opt.step([np.ones(4)])
    opt.param_groups[0]["momentum"] = 0.5
    before = w.copy()
    with pytest.raises(ValueError, match="momentum.*cannot change"):
        opt.step([np.ones(4)])
    assert w.tobytes() == before.tobytes()


# ---- other libraries, float64, 1,000 random steps ----------------------------------------

# The learning rates are exact in float32 at every warm-up step (optax computes its
# warm-up schedule in float32): lr * j / 16 for lr a power of 2.
PEERS = [("sgd", 0.0, None), ("sgd", 0.05, None), ("sgd", 0.05, 16),
         ("adamw", 0.0, None), ("adamw", 0.05, 16)]


def _grads(n_steps=1000, n=64, seed=3):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(n), rng.standard_normal((n_steps, n))


def _ours(kind, wd, warm, convention, theta, grads):
    if kind == "sgd":
        opt = ch8fast.ScheduleFreeSGD([w := theta.copy()], lr=0.25, momentum=0.9,
                                      weight_decay=wd, warmup_steps=warm or 0,
                                      convention=convention)
    else:
        opt = ch8fast.ScheduleFreeAdamW([w := theta.copy()], lr=2 ** -7, betas=(0.9, 0.99),
                                        weight_decay=wd, warmup_steps=warm or 0,
                                        convention=convention)
    for g in grads:
        opt.step([g])
    return w, opt.theta()[0]


@pytest.mark.parametrize("kind,wd,warm", PEERS, ids=[f"{k}-wd{w}-warmup{m}"
                                                     for k, w, m in PEERS])
def test_schedule_free_is_optax_schedule_free(kind, wd, warm):
    """Against optax.contrib.schedule_free_sgd / _adamw (convention "optax"): y and the
    evaluation point x within 1e-12 of the largest entry, float64. (optax recomputes x from
    y and z at each step, (y - (1 - beta) z) / beta, where the kernel moves y directly:
    a few roundings per step, which measured about 3e-14 after 1,000 steps.)"""
    _, optax = optax_modules()
    theta, grads = _grads()
    if kind == "sgd":
        tx = optax.contrib.schedule_free_sgd(0.25, warmup_steps=warm, b1=0.9,
                                             weight_decay=wd or None)
    else:
        tx = optax.contrib.schedule_free_adamw(2 ** -7, warmup_steps=warm, b1=0.9, b2=0.99,
                                               weight_decay=wd)
    p, st = optax_run(tx, theta, grads)
    x = np.asarray(optax.contrib.schedule_free_eval_params(st, p))
    y, th = _ours(kind, wd, warm, "optax", theta, grads)
    assert_close(y, p, np.float64, "y")
    assert_close(th, x, np.float64, "x")
    if warm:        # the authors' warm-up differs from optax's by a step: not the same
        y_book, _ = _ours(kind, wd, warm, "book", theta, grads)
        assert np.max(np.abs(y_book - y)) > 1e-9


@pytest.mark.parametrize("kind,wd,warm", PEERS, ids=[f"{k}-wd{w}-warmup{m}"
                                                     for k, w, m in PEERS])
def test_schedule_free_is_the_authors_schedulefree(kind, wd, warm):
    """Against the authors' PyTorch optimizers (``pip install schedulefree``: SGDScheduleFree,
    AdamWScheduleFree; convention "book"), float64, 1,000 steps: y in train mode, x after
    ``eval()``, within 1e-12 (their lerp and bias correction round differently)."""
    torch = pytest.importorskip("torch")
    schedulefree = pytest.importorskip("schedulefree")
    theta, grads = _grads()
    p = torch.nn.Parameter(torch.tensor(theta))
    if kind == "sgd":
        opt = schedulefree.SGDScheduleFree([p], lr=0.25, momentum=0.9, weight_decay=wd,
                                           warmup_steps=warm or 0)
    else:
        opt = schedulefree.AdamWScheduleFree([p], lr=2 ** -7, betas=(0.9, 0.99),
                                             weight_decay=wd, warmup_steps=warm or 0)
    opt.train()
    for g in grads:
        p.grad = torch.tensor(g)
        opt.step()
    y_theirs = p.detach().numpy().copy()
    opt.eval()
    x_theirs = p.detach().numpy().copy()
    y, th = _ours(kind, wd, warm, "book", theta, grads)
    assert_close(y, y_theirs, np.float64, "y")
    assert_close(th, x_theirs, np.float64, "x")


def test_the_functional_layer_refuses_them():
    import ch8fast.functional as F
    w, z = np.ones(3), np.ones(3)
    with pytest.raises(ValueError, match="ScheduleFreeSGD keeps running numbers.*weight_sum"):
        F.update(ch8fast.rules.SCHEDULE_FREE_SGD, w, np.ones(3), {"z": z})
    assert (w == 1).all() and (z == 1).all()


# ---- ch8fast.torch ---------------------------------------------------------------------

TORCH_RULES = [("SGDScheduleFree", ch8fast.ScheduleFreeSGD,
                dict(lr=0.1, warmup_steps=5, weight_decay=0.01, r=0.5)),
               ("AdamWScheduleFree", ch8fast.ScheduleFreeAdamW,
                dict(lr=0.01, betas=(0.9, 0.99), warmup_steps=5, weight_decay=0.01))]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name,cls,kw", TORCH_RULES, ids=[r[0] for r in TORCH_RULES])
def test_torch_classes_are_the_rules_and_the_authors(name, cls, kw, dtype):
    """ch8fast.torch.SGDScheduleFree / AdamWScheduleFree: the bits of ch8fast's class on
    the same arrays (y, z, and x after eval()), the authors' running numbers in the groups,
    and the authors' optimizers to rounding; resuming from a state dict is exact."""
    torch = pytest.importorskip("torch")
    import ch8fast.torch as ct
    rng = np.random.default_rng(4)
    w0 = rng.standard_normal((6, 9)).astype(dtype)
    grads = [rng.standard_normal(w0.shape).astype(dtype) for _ in range(20)]
    p = torch.nn.Parameter(torch.tensor(w0))
    opt = getattr(ct, name)([p], **kw)
    with pytest.raises(RuntimeError, match="train mode"):
        p.grad = torch.tensor(grads[0])
        opt.step()
    opt.train()
    w = w0.copy()
    ours = cls([w], **kw)
    for k, g in enumerate(grads):
        p.grad = torch.tensor(g)
        opt.step()
        ours.step([g])
        assert p.detach().numpy().tobytes() == w.tobytes(), k
        assert opt.state[p]["z"].numpy().tobytes() == ours.state[0]["z"].tobytes()
        if k == 9:
            saved = copy.deepcopy(opt.state_dict())
    g0 = opt.param_groups[0]
    assert g0["k"] == 20 and g0["weight_sum"] == ours.state_dict()["param_groups"][0][
        "weight_sum"]
    assert g0["scheduled_lr"] == kw["lr"]
    opt.eval()
    np.testing.assert_allclose(p.detach().numpy(), ours.theta()[0],
                               rtol=1e-6 if dtype == "float32" else 1e-12,
                               atol=1e-6 if dtype == "float32" else 1e-12)
    opt.train()
    # resume from the state dict of step 10
    q = torch.nn.Parameter(torch.tensor(w0))
    again = getattr(ct, name)([q], **kw)
    again.load_state_dict(saved)
    with torch.no_grad():
        q.copy_(torch.tensor(_replay(cls, kw, w0, grads[:10])))
    for g in grads[10:]:
        q.grad = torch.tensor(g)
        again.step()
    assert q.detach().numpy().tobytes() == w.tobytes()
    # the authors' optimizers, to rounding
    schedulefree = pytest.importorskip("schedulefree")
    r = torch.nn.Parameter(torch.tensor(w0))
    theirs = getattr(schedulefree, name)([r], **kw)
    theirs.train()
    for g in grads:
        r.grad = torch.tensor(g)
        theirs.step()
    assert_close(r.detach().numpy(), w, np.dtype(dtype), "y")
    theirs.eval()
    opt.eval()
    assert_close(p.detach().numpy(), r.detach().numpy(), np.dtype(dtype), "x")


def _replay(cls, kw, w0, grads):
    w = w0.copy()
    opt = cls([w], **kw)
    for g in grads:
        opt.step([g])
    return w
