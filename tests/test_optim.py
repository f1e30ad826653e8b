"""Every optimizer against the NumPy reference of ALGORITHMS.md, in place, for both
dtypes, 1 and 2 threads, and sizes that exercise empty, tiny, odd and multi-thread paths."""

import numpy as np
import pytest

import ch8fast
import reference as R
from conftest import CONFIGS, assert_close, random_problem, reference_hyper

SIZES = [0, 1, 7, 1000003]
N_STEPS = 5


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name,cls,ref_name,hyper", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_matches_reference(name, cls, ref_name, hyper, dtype, size, threads):
    shapes = [(size,), (3, 5)] if size else [(0,), (2, 0, 3)]
    params, grads = random_problem(shapes, dtype, seed=size + 11, n_steps=N_STEPS)
    ref = getattr(R, ref_name)(params, **reference_hyper(cls, hyper))
    originals = list(params)
    opt = cls(params, **hyper)
    for g in grads:
        opt.step(g)
        ref.step(g)
    for i, (p, orig) in enumerate(zip(opt.param_groups[0]["params"], originals)):
        assert p is orig                     # updated in place, never replaced
        assert p.size == 0 or np.shares_memory(p, orig)
        assert p.dtype == dtype
        assert_close(p, ref.params[i], dtype, f"{name} param {i}")
        for k, a in opt.state[i].items():
            assert a.dtype == dtype
            assert_close(a, ref.state[i][k], dtype, f"{name} state {k} {i}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name,cls,ref_name,hyper", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_bitwise_same_for_any_thread_count(name, cls, ref_name, hyper, dtype):
    # Many arrays of odd sizes, so thread chunks begin and end inside arrays.
    shapes = [(100003,), (7,), (64, 1001), (0,), (250001,), (3, 3, 3)]
    results = []
    for n in (1, 2, 3):
        ch8fast.set_num_threads(n)
        params, grads = random_problem(shapes, dtype, seed=5, n_steps=4)
        opt = cls(params, **hyper)
        for g in grads:
            opt.step(g)
        results.append([p.tobytes() for p in params]
                       + [a.tobytes() for st in opt.state for a in st.values()])
    ch8fast.set_num_threads(0)
    assert results[0] == results[1] == results[2]


@pytest.mark.parametrize("name,cls,ref_name,hyper", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_param_groups_and_mixed_dtypes(name, cls, ref_name, hyper):
    """Two groups with different learning rates; float32 and float64 in one group."""
    rng = np.random.default_rng(3)
    a = rng.standard_normal(50).astype(np.float32)
    b = rng.standard_normal((4, 6))
    c = rng.standard_normal(9)
    grads = [[rng.standard_normal(x.shape).astype(x.dtype) for x in (a, b, c)]
             for _ in range(4)]
    h2 = dict(hyper, lr=hyper["lr"] / 2)
    ref1 = getattr(R, ref_name)([a, b], **reference_hyper(cls, hyper))
    ref2 = getattr(R, ref_name)([c], **reference_hyper(cls, h2))
    opt = cls([{"params": [a, b]}, {"params": [c], "lr": h2["lr"]}], **hyper)
    for g in grads:
        opt.step(g)
        ref1.step(g[:2])
        ref2.step(g[2:])
    assert_close(a, ref1.params[0], np.float32)
    assert_close(b, ref1.params[1], np.float64)
    assert_close(c, ref2.params[0], np.float64)


def test_hyperparameters_change_between_steps():
    rng = np.random.default_rng(0)
    w = rng.standard_normal(10)
    g = rng.standard_normal(10)
    opt = ch8fast.Adam([w], lr=0.1)
    ref = R.Adam([w], lr=0.1, betas=(0.9, 0.999), eps=1e-8)
    opt.step(g)
    ref.step([g])
    opt.param_groups[0]["lr"] = 0.01
    opt.param_groups[0]["betas"] = (0.5, 0.9)
    ref.h.update(lr=0.01, betas=(0.5, 0.9))
    opt.step(g)
    ref.step([g])
    assert_close(w, ref.params[0], np.float64)


def test_scheduled_lr_and_momentum():
    """A callable hyperparameter is called with the number of completed steps."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal(20)
    grads = [rng.standard_normal(20) for _ in range(6)]
    lr = lambda k: 0.1 / (1 + k)
    mom = lambda k: min(0.9, 0.5 + 0.1 * k)
    opt = ch8fast.SGD([w], lr=lr, momentum=mom)
    theta, v = w.copy(), np.zeros(20)
    for k, g in enumerate(grads):
        opt.step(g)
        v = mom(k) * v - lr(k) * g
        theta = theta + v
    assert_close(w, theta, np.float64)


def test_functional_layer_matches_classes():
    rng = np.random.default_rng(2)
    for dtype in (np.float32, np.float64):
        w1 = rng.standard_normal(33).astype(dtype)
        w2 = w1.copy()
        m, v, vmax = (np.zeros_like(w1) for _ in range(3))
        opt = ch8fast.Adam([w2], lr=0.01, weight_decay=0.1, amsgrad=True)
        for t in range(1, 5):
            g = rng.standard_normal(33).astype(dtype)
            ch8fast.functional.adam(w1, g, m, v, vmax, step=t, lr=0.01, weight_decay=0.1)
            opt.step(g)
        assert w1.tobytes() == w2.tobytes()
        assert m.tobytes() == opt.state[0]["exp_avg"].tobytes()

    p, vel = rng.standard_normal(5), np.zeros(5)
    q = p.copy()
    opt = ch8fast.SGD([q], lr=0.1, momentum=0.9, nesterov=True)
    for _ in range(3):
        g = rng.standard_normal(5)
        ch8fast.functional.momentum(p, g, vel, lr=0.1, momentum=0.9, nesterov=True)
        opt.step(g)
    assert p.tobytes() == q.tobytes()


@pytest.mark.parametrize("fn,states,kw", [
    ("sgd", 0, dict(lr=0.1)),
    ("momentum", 1, dict(lr=0.1, momentum=0.9)),
    ("adagrad", 1, dict(lr=0.1)),
    ("rmsprop", 1, dict(lr=0.1)),
    ("rmsprop", 2, dict(lr=0.1, momentum=0.9, nesterov=True)),
    ("adam", 2, dict(step=1)),
    ("adadelta", 2, dict()),
])
def test_functional_rejects_bad_arrays(fn, states, kw):
    f = getattr(ch8fast.functional, fn)
    p = np.ones(4)
    st = [np.zeros(4) for _ in range(states)]
    before = [p.copy()] + [s.copy() for s in st]
    with pytest.raises(ValueError, match="grad"):
        f(p, p, *st, **kw)                       # gradient aliases the parameter
    with pytest.raises(TypeError, match="grad"):
        f(p, np.ones(4, np.float32), *st, **kw)
    if states:
        with pytest.raises(ValueError, match="shape"):
            f(p, np.ones(4), *st[:-1], np.zeros(5), **kw)
        with pytest.raises(ValueError, match="share memory"):
            f(p, np.ones(4), *st[:-1], p, **kw)
    for a, b in zip([p] + st, before):
        assert a.tobytes() == b.tobytes()


def test_state_dict_roundtrip_and_resume():
    shapes = [(13,), (2, 3)]
    params, grads = random_problem(shapes, np.float64, seed=9, n_steps=6)
    a = [p.copy() for p in params]
    b = [p.copy() for p in params]
    opt_a = ch8fast.Adam(a, lr=0.05, amsgrad=True)
    for g in grads:
        opt_a.step(g)
    opt_b = ch8fast.Adam(b, lr=0.05, amsgrad=True)
    for g in grads[:3]:
        opt_b.step(g)
    sd = opt_b.state_dict()
    for k, arr in sd["state"][0].items():
        assert not np.shares_memory(arr, opt_b.state[0][k])   # a snapshot
    c = [p.copy() for p in b]
    opt_c = ch8fast.Adam(c, lr=0.05, amsgrad=True)
    opt_c.load_state_dict(sd)
    for g in grads[3:]:
        opt_c.step(g)
    for x, y in zip(a, c):
        assert x.tobytes() == y.tobytes()
    assert opt_c.state_dict()["param_groups"][0]["step"] == 6


def _sd_mutations():
    def drop_state(sd):
        del sd["state"][0]["exp_avg"]

    def wrong_shape(sd):
        sd["state"][1]["exp_avg_sq"] = np.zeros((3, 2))

    def wrong_dtype(sd):
        sd["state"][0]["exp_avg"] = sd["state"][0]["exp_avg"].astype(np.float32)

    def wrong_class(sd):
        sd["optimizer"] = "SGD"

    def wrong_groups(sd):
        sd["param_groups"].append(dict(sd["param_groups"][0]))

    def bad_lr(sd):
        sd["param_groups"][0]["lr"] = -1.0

    def bad_step(sd):
        sd["param_groups"][0]["step"] = -2

    def flag_changed(sd):
        sd["param_groups"][0]["amsgrad"] = False

    def extra_name(sd):
        sd["param_groups"][0]["momentum"] = 0.9

    def not_array(sd):
        sd["state"][0]["exp_avg"] = [0.0] * 13

    return [drop_state, wrong_shape, wrong_dtype, wrong_class, wrong_groups, bad_lr,
            bad_step, flag_changed, extra_name, not_array]


@pytest.mark.parametrize("mutate", _sd_mutations(), ids=lambda f: f.__name__)
def test_load_state_dict_refuses_mismatch_and_changes_nothing(mutate):
    params, grads = random_problem([(13,), (2, 3)], np.float64, seed=1, n_steps=2)
    opt = ch8fast.Adam(params, lr=0.05, amsgrad=True)
    for g in grads:
        opt.step(g)
    sd = opt.state_dict()
    mutate(sd)
    before = opt.state_dict()
    with pytest.raises((TypeError, ValueError)):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for x, y in zip(after["state"], before["state"]):
        for k in x:
            assert x[k].tobytes() == y[k].tobytes()


def test_zero_size_parameters():
    w = np.zeros((0, 4), np.float32)
    u = np.ones(3, np.float32)
    opt = ch8fast.Adam([w, u], lr=0.1)
    opt.step([np.zeros((0, 4), np.float32), np.ones(3, np.float32)])
    assert w.shape == (0, 4)
    assert np.all(u < 1)


def test_non_contiguous_gradient_is_read_correctly():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 5))
    gbig = rng.standard_normal((5, 4))
    g = gbig.T                               # a non-contiguous view
    ref = w - 0.1 * g
    ch8fast.SGD([w], lr=0.1).step(g)
    assert_close(w, ref, np.float64)


def test_thread_controls():
    ch8fast.set_num_threads(1)
    assert ch8fast.get_num_threads() == 1
    ch8fast.set_num_threads(0)
    assert ch8fast.get_num_threads() >= 1
    threadpoolctl = pytest.importorskip("threadpoolctl")
    with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
        assert ch8fast.get_num_threads() == 1


def test_closure_returns_loss():
    w = np.array([3.0])
    opt = ch8fast.SGD([w], lr=0.25)
    loss = opt.step(closure=lambda: (float(w[0] ** 2), 2 * w))
    assert loss == 9.0
    assert w[0] == 3.0 - 0.25 * 6.0
    opt.step(closure=lambda: 2 * w)          # gradients only
    assert w[0] == 1.5 - 0.25 * 3.0


def test_schedules_resume_bit_exact_through_state_dict():
    """The step counter that drives the schedules is part of state_dict()."""
    from ch8fast.schedules import linear_decay, momentum_ramp
    params, grads = random_problem([(31,), (4, 4)], np.float32, seed=12, n_steps=10)

    def make(ps):
        return ch8fast.SGD(ps, lr=linear_decay(0.1, 8), momentum=momentum_ramp(0.5, 0.9, 6),
                           nesterov=True)

    a = [p.copy() for p in params]
    opt_a = make(a)
    for g in grads:
        opt_a.step(g)
    b = [p.copy() for p in params]
    opt_b = make(b)
    for g in grads[:4]:
        opt_b.step(g)
    sd = opt_b.state_dict()
    assert sd["param_groups"][0]["lr"] == {"schedule": linear_decay(0.1, 8).to_dict()}
    c = [p.copy() for p in b]
    opt_c = ch8fast.SGD(c, lr=0.5, momentum=0.3, nesterov=True)   # replaced by the load
    opt_c.load_state_dict(sd)
    assert opt_c.param_groups[0]["lr"] == linear_decay(0.1, 8)
    for g in grads[4:]:
        opt_c.step(g)
    for x, y in zip(a, c):
        assert x.tobytes() == y.tobytes()


def test_momentum_schedule_changes_behaviour():
    """Raising alpha over time (the book's advice) gives the trajectory of that alpha."""
    from ch8fast.schedules import momentum_ramp
    w1, w2 = np.ones(3), np.ones(3)
    ramp = momentum_ramp(0.0, 0.9, 5)
    o1 = ch8fast.SGD([w1], lr=0.1, momentum=ramp)
    o2 = ch8fast.SGD([w2], lr=0.1, momentum=0.9)
    o1.step(np.ones(3))
    o2.step(np.ones(3))
    o1.step(np.ones(3))
    o2.step(np.ones(3))
    # step 2 uses alpha = ramp(1) = 0.18 against 0.9
    assert_close(w1, np.ones(3) - 0.1 - (0.18 * 0.1 + 0.1), np.float64)
    assert_close(w2, np.ones(3) - 0.1 - (0.9 * 0.1 + 0.1), np.float64)


def test_omp_num_threads_is_respected():
    import os
    import subprocess
    import sys
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", "import ch8fast; print(ch8fast.get_num_threads())"],
                         env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "1"
