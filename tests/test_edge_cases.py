"""Numerical edge cases and the behaviour ch8fast promises for each (see
docs/checkpoints.rst, "Numerical edge cases"): non-finite gradients with and without ``skip_nonfinite``,
squares that overflow float32, denormals, lr = 0, the smallest eps, 0-size and 0-d
parameters."""

import numpy as np
import pytest

import ch8fast
import reference as R
from ch8fast.checkpoint import load_checkpoint, save_checkpoint
from conftest import CONFIGS, reference_hyper

IDS = [c[0] for c in CONFIGS]
ADAPTIVE = [c for c in CONFIGS if c[2] in ("AdaGrad", "RMSProp", "Adam", "AdaDelta")]
DTYPES = [np.float32, np.float64]


def run_both(cls, ref_name, hyper, params, grads):
    """ch8fast and the reference on the same inputs (the reference on copies)."""
    ref = getattr(R, ref_name)(params, **reference_hyper(cls, hyper))
    opt = cls(params, **hyper)
    with np.errstate(all="ignore"):
        for g in grads:
            opt.step(g)
            ref.step(g)
    return opt, ref


def assert_same_nonfinite(got, ref):
    """NaN and signed infinities at the same places."""
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    np.testing.assert_array_equal(np.isposinf(got), np.isposinf(ref))
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(ref))


def has_skip_nonfinite():
    try:
        ch8fast.SGD([np.zeros(1)], skip_nonfinite=True)
    except TypeError:
        return False
    return True


needs_skip = pytest.mark.skipif(not has_skip_nonfinite(),
                                reason="this ch8fast has no skip_nonfinite option")


# ---------------------------------------------------------------------------------------
# NaN and Inf gradients
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,cls,ref_name,hyper", CONFIGS, ids=IDS)
def test_nonfinite_gradient_propagates_without_skip(name, cls, ref_name, hyper, dtype):
    """Promise: without skip_nonfinite a NaN/Inf gradient is applied like any number. The
    elements it touches get what IEEE arithmetic of the rule gives (NaN or +-inf, in the
    parameter and the state, exactly where the reference has them); every other element
    is untouched by it (the rules are element-wise)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal(6).astype(dtype)
    w_clean = w.copy()
    g = rng.standard_normal(6).astype(dtype)
    bad = g.copy()
    bad[1], bad[4] = np.nan, np.inf
    opt, ref = run_both(cls, ref_name, hyper, [w], [[g], [bad], [g]])
    # (an Inf moves Lion's theta by lr sign(inf) = lr, and clipped ADOPT's by at most lr
    # times the bound: finite there, as in the reference)
    assert np.isnan(w[1]) and np.isfinite(w[4]) == np.isfinite(ref.params[0][4])
    bounded = ref_name == "Lion" or ref_name == "ADOPT" and hyper.get("use_clipping", True)
    assert not np.isfinite(w[4]) or bounded
    if cls.rule.trust_ratio and not hyper.get("exclude_1d"):
        # LAMB, LARS: a NaN in the tensor makes its norm, so its whole step, NaN, as in the
        # reference (a 1-D array the group excludes takes no ratio: element-wise)
        assert np.isnan(w).all() and np.isnan(ref.params[0]).all()
        return
    if ref_name.startswith("ScheduleFree"):
        # the kernel moves y by y + c (z - y) + ..., the paper's sequences give
        # y = beta x + (1 - beta) z: where both x and z are -inf, the first is NaN, the
        # second -inf (the authors' code computes the first): non-finite at the same places
        np.testing.assert_array_equal(np.isfinite(w), np.isfinite(ref.params[0]))
    else:
        assert_same_nonfinite(w, ref.params[0])
    for k, a in opt.state[0].items():
        assert np.isnan(a[1]), k
        assert_same_nonfinite(a, ref.state[0][k])
    # The other elements are exactly those of a run that never saw the bad values.
    opt_clean = cls([w_clean], **hyper)
    for step in ([g], [g], [g]):
        opt_clean.step(step)
    ok = [0, 2, 3, 5]
    assert w[ok].tobytes() == w_clean[ok].tobytes()


@needs_skip
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,cls,ref_name,hyper", CONFIGS, ids=IDS)
def test_skip_nonfinite_skips_the_whole_step(name, cls, ref_name, hyper, dtype):
    """Promise: with skip_nonfinite=True a step whose gradients (any of them) hold a NaN
    or an Inf changes nothing: parameters, state, step counts (so Adam's bias correction
    and every schedule) stay bit for bit; skipped_steps counts it. The run then equals one
    that never saw that step."""
    rng = np.random.default_rng(1)
    shapes = [(5,), (2, 3)]
    a = [rng.standard_normal(s).astype(dtype) for s in shapes]
    b = [x.copy() for x in a]
    grads = [[rng.standard_normal(s).astype(dtype) for s in shapes] for _ in range(3)]
    opt_a = cls(a, skip_nonfinite=True, **hyper)
    opt_b = cls(b, **hyper)
    opt_a.step(grads[0])
    opt_b.step(grads[0])
    before = ([x.tobytes() for x in a],
              [s.tobytes() for st in opt_a.state for s in st.values()],
              [g["step"] for g in opt_a.state_dict()["param_groups"]])
    for value in (np.nan, np.inf, -np.inf):
        bad = [g.copy() for g in grads[1]]
        bad[1][1, 2] = value
        opt_a.step(bad)
        assert ([x.tobytes() for x in a],
                [s.tobytes() for st in opt_a.state for s in st.values()],
                [g["step"] for g in opt_a.state_dict()["param_groups"]]) == before
    assert opt_a.skipped_steps == 3
    for g in grads[1:]:
        opt_a.step(g)
        opt_b.step(g)
    assert [x.tobytes() for x in a] == [x.tobytes() for x in b]
    assert opt_a.skipped_steps == 3


@needs_skip
def test_skipped_steps_survive_a_checkpoint(tmp_path):
    w = np.ones(4)
    opt = ch8fast.Adam([w], skip_nonfinite=True)
    opt.step(np.array([1.0, np.nan, 0.0, 0.0]))
    opt.step(np.ones(4))
    save_checkpoint(tmp_path / "c.npz", opt, [w])
    w2 = np.zeros(4)
    opt2 = ch8fast.Adam([w2], skip_nonfinite=True)
    load_checkpoint(tmp_path / "c.npz", opt2, [w2])
    assert opt2.skipped_steps == 1
    assert opt2.state_dict()["param_groups"][0]["step"] == 1


# ---------------------------------------------------------------------------------------
# Overflowing squares, denormals
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,cls,ref_name,hyper", ADAPTIVE, ids=[c[0] for c in ADAPTIVE])
def test_float32_square_overflow(name, cls, ref_name, hyper):
    """Promise: the math runs in the parameters' dtype, never silently in float64. A
    float32 gradient of 1e20 has a square of inf: the accumulated square becomes +inf,
    the step of that element is 0 (g / sqrt(inf)), as in the reference, and no NaN
    appears (with rho, beta2 < 1 and weight decay). The element stays frozen while its
    accumulator is inf. Clip the gradients (clip_norm / clip_value) to avoid it."""
    w = np.array([1.0, -2.0, 0.5, 3.0], dtype=np.float32)
    start = w.copy()
    g = np.array([1e20, -1e20, 1.0, 1e-3], dtype=np.float32)
    small = np.array([1.0, 1.0, 1.0, 1.0], dtype=np.float32)
    opt, ref = run_both(cls, ref_name, hyper, [w], [[g], [small], [small]])
    assert not np.isnan(w).any()
    for k, a in opt.state[0].items():
        assert not np.isnan(a).any(), k
    square = {"AdaGrad": "sum", "RMSProp": "square_avg", "Adam": "exp_avg_sq",
              "AdaDelta": "square_avg"}[ref_name]
    assert np.isposinf(opt.state[0][square][:2]).all()
    assert np.isfinite(opt.state[0][square][2:]).all()
    if not hyper.get("weight_decay") and not hyper.get("momentum"):
        assert w[:2].tobytes() == start[:2].tobytes()      # frozen
    assert (w[2:] != start[2:]).all()
    np.testing.assert_array_equal(w[:2], ref.params[0][:2])
    np.testing.assert_allclose(w[2:], ref.params[0][2:], rtol=1e-6)
    # The same gradient in float64 does not overflow.
    w64 = start.astype(np.float64)
    opt64 = cls([w64], **hyper)
    for step in (g, small, small):
        opt64.step(step.astype(np.float64))
    assert np.isfinite(opt64.state[0][square]).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,cls,ref_name,hyper", CONFIGS, ids=IDS)
def test_denormals_are_not_flushed(name, cls, ref_name, hyper, dtype, threads):
    """Promise: IEEE gradual underflow, as NumPy: denormal gradients, states and
    parameters are computed with, never flushed to zero (no -ffast-math, no FTZ/DAZ),
    and the results equal the reference's. (Without L2 weight decay: with gradients this
    small r underflows to 0 and an L2 term multiplies theta by about 1 - lr wd / eps per
    step, which would amplify any rounding difference by 1e5 a step.)"""
    if "weight_decay" in hyper and cls is not ch8fast.AdamW:
        hyper = dict(hyper, weight_decay=0.0)
    tiny = np.finfo(dtype).smallest_normal
    rng = np.random.default_rng(2)
    n = 70000                      # large enough for 2 threads in both dtypes
    w = (rng.standard_normal(n) * tiny).astype(dtype)       # denormal parameters too
    grads = [[(rng.standard_normal(n) * tiny / 8).astype(dtype)] for _ in range(3)]
    assert (np.abs(grads[0][0][grads[0][0] != 0]) < tiny).all()
    opt, ref = run_both(cls, ref_name, hyper, [w], grads)
    assert_same_nonfinite(w, ref.params[0])
    scale = float(np.max(np.abs(ref.params[0])))
    rtol = 1e-12 if dtype == np.float64 else 1e-6
    atol = rtol * scale
    if ref_name == "Adam":
        # The reference evaluates lr * s_hat as a denormal, rounded to a multiple of the
        # smallest subnormal, and then divides by about eps; ch8fast folds lr and the bias
        # correction into one scalar and divides s first. Allow that rounding, per step.
        atol += len(grads) * float(np.finfo(dtype).smallest_subnormal) / hyper["eps"]
    np.testing.assert_allclose(w, ref.params[0], rtol=rtol, atol=atol)
    for k, a in opt.state[0].items():
        np.testing.assert_array_equal(a == 0, ref.state[0][k] == 0, err_msg=k)
    if ref_name == "SGD":
        np.testing.assert_array_equal(w, ref.params[0])     # the same IEEE operations
    if "velocity" in opt.state[0] or "exp_avg" in opt.state[0]:
        first = opt.state[0].get("velocity", opt.state[0].get("exp_avg"))
        assert ((first != 0) & (np.abs(first) < tiny)).any()  # denormal state kept
    # The process still has gradual underflow after the kernels ran.
    assert np.asarray(tiny, dtype) / dtype(4) != 0


# ---------------------------------------------------------------------------------------
# lr = 0, the smallest eps
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,cls,ref_name,hyper", CONFIGS, ids=IDS)
def test_zero_lr_leaves_parameters_and_advances_state(name, cls, ref_name, hyper, dtype):
    """Promise: with lr = 0 from the first step the parameters are unchanged bit for bit
    (nonzero values; a -0.0 may come back as +0.0, since -0 - (-0) = +0 in IEEE), while
    the state advances as usual: step counts, accumulated squares and moments."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal(50).astype(dtype)
    start = w.copy()
    zeros = np.array([0.0, -0.0], dtype=dtype)
    h = dict(hyper, lr=0.0)
    opt = cls([w, zeros], **h)
    ref = getattr(R, ref_name)([start], **reference_hyper(cls, h))
    for _ in range(4):
        g = rng.standard_normal(50).astype(dtype)
        opt.step([g, np.array([-1.0, -1.0], dtype=dtype)])
        ref.step([g])
    assert w.tobytes() == start.tobytes()
    assert (zeros == 0).all()
    assert opt.state_dict()["param_groups"][0]["step"] == 4
    for k, a in opt.state[0].items():
        if k != "velocity":                   # v = alpha v - 0 g stays 0
            assert (a != 0).any(), k
        np.testing.assert_allclose(a, ref.state[0][k], rtol=1e-6 if dtype == np.float32
                                   else 1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,cls,ref_name,hyper",
                         [c for c in CONFIGS if "eps" in c[3]],
                         ids=[c[0] for c in CONFIGS if "eps" in c[3]])
def test_smallest_positive_eps(name, cls, ref_name, hyper, dtype):
    """Promise: eps may be as small as the dtype's smallest positive (subnormal) value:
    a zero gradient on a zero accumulator gives a zero step (0 / eps), not 0/0 = NaN, and
    a nonzero gradient a finite step. The reference agrees wherever it stays finite (its
    AdaGrad computes -lr / (eps + sqrt(r)) first, which overflows to -inf, times g = 0:
    NaN; ch8fast divides the gradient first)."""
    eps = float(np.finfo(dtype).smallest_subnormal)
    h = dict(hyper, eps=eps)
    if h.get("initial_accumulator_value"):
        h["initial_accumulator_value"] = 0.0
    w = np.array([1.0, 2.0, -0.5, 0.0], dtype=dtype)
    start = w.copy()
    g = np.array([0.0, 1e-3, 0.0, 1.0], dtype=dtype)
    opt, ref = run_both(cls, ref_name, h, [w], [[g], [g]])
    assert np.isfinite(w).all()
    for k, a in opt.state[0].items():
        assert np.isfinite(a).all(), k
    if not h.get("weight_decay"):
        assert w[[0, 2]].tobytes() == start[[0, 2]].tobytes()
    fin = np.isfinite(ref.params[0])
    assert fin[[1, 3]].all()
    np.testing.assert_allclose(w[fin], ref.params[0][fin],
                               rtol=1e-6 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("cls", [ch8fast.AdaGrad, ch8fast.RMSProp, ch8fast.Adam,
                                 ch8fast.AdaDelta])
def test_eps_that_rounds_to_zero_in_float32_is_refused(cls):
    w = np.ones(3, dtype=np.float32)
    with pytest.raises(ValueError, match="eps"):
        opt = cls([w], eps=1e-50)
        with np.errstate(all="ignore"):
            opt.step(np.zeros(3, dtype=np.float32))   # today: w becomes NaN


# ---------------------------------------------------------------------------------------
# 0-size and 0-d parameters
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,cls,ref_name,hyper", CONFIGS, ids=IDS)
def test_zero_size_and_zero_d_parameters(tmp_path, name, cls, ref_name, hyper, dtype):
    """Promise: 0-size parameters (any shape with a 0) are accepted alone or beside
    others; their state arrays are 0-size of the same shape and dtype, a step leaves them
    empty, their gradients must still have their exact shape, and they survive a
    checkpoint. A 0-d parameter is updated like a 1-element one."""
    empty = [np.zeros((0,), dtype), np.zeros((2, 0, 3), dtype)]
    opt = cls(list(empty), **hyper)
    opt.step([np.zeros((0,), dtype), np.zeros((2, 0, 3), dtype)])
    for p, st in zip(empty, opt.state):
        for a in st.values():
            assert a.shape == p.shape and a.dtype == dtype
    with pytest.raises(ValueError, match=r"grads\[1\]: shape \(0,\)"):
        opt.step([np.zeros((0,), dtype), np.zeros((0,), dtype)])

    scalar = np.array(0.5, dtype=dtype)
    one = np.array([0.5], dtype=dtype)
    e = np.zeros((0, 4), dtype)
    opt = cls([scalar, e, one], **hyper)
    for k in range(3):
        opt.step([np.array(0.1 * (k + 1), dtype), np.zeros((0, 4), dtype),
                  np.array([0.1 * (k + 1)], dtype)])
    assert scalar.shape == () and scalar.tobytes() == one.tobytes()
    save_checkpoint(tmp_path / "c.npz", opt, [scalar, e, one])
    s2, e2, o2 = np.zeros((), dtype), np.zeros((0, 4), dtype), np.zeros(1, dtype)
    opt2 = cls([s2, e2, o2], **hyper)
    load_checkpoint(tmp_path / "c.npz", opt2, [s2, e2, o2])
    assert s2.tobytes() == scalar.tobytes() and o2.tobytes() == one.tobytes()
