"""LAMB and LARS: a trust ratio per parameter array, from norms summed in fixed blocks in
two passes. Against the papers' formulas (reference.py) and optax.lamb / optax.lars, the
same bits for any thread count, sizes below, at and above the norm block, the per-group
exclusion of arrays of fewer than 2 dimensions, and the refusals."""

import os

import numpy as np
import pytest

import ch8fast
import reference as R
from conftest import assert_close, optax_modules, optax_run, reference_hyper

BLOCK = 4096                                   # NORM_BLOCK of the kernels (types.pxi)
SIZES = [1, 7, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 17]

RULES = [(ch8fast.LAMB, dict(lr=1e-2, weight_decay=0.01)),
         (ch8fast.LAMB, dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-4, maximize=True,
                             exclude_1d=True, weight_decay=0.1)),
         (ch8fast.LARS, dict(lr=0.5, weight_decay=0.01, trust_coefficient=0.02)),
         (ch8fast.LARS, dict(lr=0.5, momentum=ch8fast.schedules.momentum_ramp(0.5, 0.9, 4),
                             nesterov=True, eps=1e-3, exclude_1d=True))]
IDS = ["lamb", "lamb_exclude_1d_maximize", "lars", "lars_nesterov_schedule_exclude_1d"]


def _problem(dtype, seed=0, n_steps=6):
    rng = np.random.default_rng(seed)
    shapes = [(s,) for s in SIZES] + [(3, BLOCK + 5), (0,), ()]
    params = [np.asarray(rng.standard_normal(s), dtype) for s in shapes]
    grads = [[np.asarray(rng.standard_normal(s) * rng.choice([1e-3, 1.0, 10.0]), dtype)
              for s in shapes] for _ in range(n_steps)]
    return params, grads


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cls,hyper", RULES, ids=IDS)
def test_against_the_reference_at_every_size(cls, hyper, dtype, threads):
    params, grads = _problem(dtype)
    ref = getattr(R, cls.rule.name)(params, **reference_hyper(cls, hyper))
    opt = cls(params, **hyper)
    for g in grads:
        opt.step(g)
        ref.step(g)
    for i, p in enumerate(params):
        assert_close(p, ref.params[i], dtype, f"param {i} {p.shape}")
        for k, a in opt.state[i].items():
            assert_close(a, ref.state[i][k], dtype, f"state {k} {i}")


@pytest.mark.parametrize("cls,hyper", RULES, ids=IDS)
def test_the_same_bits_for_any_thread_count(cls, hyper):
    out = []
    for n in (1, 2, 3):
        ch8fast.set_num_threads(n)
        params, grads = _problem(np.float32, seed=2)
        opt = cls(params, **hyper)
        for g in grads:
            opt.step(g)
        out.append(b"".join(p.tobytes() for p in params))
    ch8fast.set_num_threads(0)
    assert out[0] == out[1] == out[2]


def test_the_ratio_is_per_array_and_one_where_a_norm_is_zero():
    """Two arrays of different scales take different ratios (so a step is not the one of
    the concatenation); a zero array (|theta| = 0) takes ratio 1, as optax's."""
    a, b, z = np.full(10, 3.0), np.full(10, 0.01), np.zeros(10)
    g = np.ones(10)
    opt = ch8fast.LARS([a, b, z], lr=1.0, momentum=0.0, trust_coefficient=1.0)
    opt.step([g, g, g])
    # |theta| / |u| = |theta| / sqrt(10): each array moves by |theta| / sqrt(10) per entry
    np.testing.assert_allclose(a, 3.0 - 3.0, atol=1e-15)
    np.testing.assert_allclose(b, 0.01 - 0.01, atol=1e-15)
    np.testing.assert_allclose(z, -1.0)          # ratio 1: the plain step
    whole = np.concatenate([np.full(10, 3.0), np.full(10, 0.01)])
    ch8fast.LARS([whole], lr=1.0, momentum=0.0, trust_coefficient=1.0).step(
        [np.ones(20)])
    assert not np.allclose(whole[:10], 0.0)


def test_exclude_1d_leaves_small_arrays_to_the_plain_rule():
    """With exclude_1d, a bias (1-D) takes Adam's step with no decay (LAMB's ratio 1, wd
    0), a matrix the trust ratio."""
    rng = np.random.default_rng(1)
    W, b = rng.standard_normal((4, 5)), rng.standard_normal(5)
    Wb, bb = W.copy(), b.copy()
    lamb = ch8fast.LAMB([W, b], lr=0.1, weight_decay=0.5, exclude_1d=True)
    adam = ch8fast.Adam([bb], lr=0.1, eps=1e-6)
    plain = ch8fast.LAMB([Wb], lr=0.1, weight_decay=0.5)
    for _ in range(3):
        gW, gb = rng.standard_normal((4, 5)), rng.standard_normal(5)
        lamb.step([gW, gb])
        adam.step([gb])
        plain.step([gW])
    assert_close(b, bb, np.float64, "bias: Adam")
    assert W.tobytes() == Wb.tobytes()


@pytest.mark.parametrize("kw,grads,pattern", [
    (dict(), "sparse", "grads\\[0\\] is row-sparse: a trust-ratio rule"),
], ids=["row_sparse"])
def test_a_row_sparse_gradient_is_refused_and_changes_nothing(kw, grads, pattern):
    E, b = np.ones((6, 3)), np.ones(3)
    for cls in (ch8fast.LAMB, ch8fast.LARS):
        opt = cls([E, b], **kw)
        before = E.copy(), b.copy(), [dict(opt.state[i]) for i in range(2)]
        sp = ch8fast.SparseRows(np.array([1, 4]), np.ones((2, 3)))
        with pytest.raises(ValueError, match=pattern):
            opt.step([sp, np.ones(3)])
        assert (E == before[0]).all() and (b == before[1]).all()
        assert opt.steps == [0]
        for i in range(2):
            for k, a in opt.state[i].items():
                assert (a == 0).all(), k


def _bf16():
    return pytest.importorskip("ml_dtypes").bfloat16


@pytest.mark.parametrize("make,pattern", [
    (lambda w: ch8fast.LAMB([w.astype(_bf16())], param_mode="master"),
     "float32/float64 parameters only"),
    (lambda w: ch8fast.LARS([w.astype(np.float16)], param_mode="stochastic"),
     "float32/float64 parameters only"),
    (lambda w: ch8fast.LAMB([w], state_format="bfloat16"),
     "state_format='bfloat16' is not available for LAMB"),
    (lambda w: ch8fast.LARS([w], sparse="catch_up"), "sparse='catch_up'"),
    (lambda w: ch8fast.LARS([w], trust_coefficient=0.0), "trust_coefficient"),
], ids=["bf16", "f16", "compressed", "catch_up", "coefficient"])
def test_refused_when_made(make, pattern):
    w = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match=pattern):
        make(w)
    assert (w == 1).all()


def test_the_functional_layer_refuses_them():
    import ch8fast.functional as F
    w, m, v = np.ones(3), np.zeros(3), np.zeros(3)
    with pytest.raises(ValueError, match="LAMB runs two passes"):
        F.update(ch8fast.rules.LAMB, w, np.ones(3), {"exp_avg": m, "exp_avg_sq": v})
    assert (w == 1).all() and (m == 0).all() and (v == 0).all()


# ---- optax, float64, 1,000 random steps -------------------------------------------------

PEERS = [("lamb", dict(weight_decay=0.0)), ("lamb", dict(weight_decay=0.01, eps=1e-4)),
         ("lars", dict(weight_decay=0.0)), ("lars", dict(weight_decay=1e-3,
                                                          trust_coefficient=0.01, eps=1e-3,
                                                          momentum=0.8, nesterov=True))]


@pytest.mark.parametrize("kind,kw", PEERS, ids=["lamb", "lamb_wd_eps", "lars",
                                                "lars_nesterov_wd"])
def test_against_optax(kind, kw):
    """optax.lamb / optax.lars (their scale_by_trust_ratio: coefficient |p| / (|u| + eps),
    1 where a norm is 0), float64, 1,000 random steps on three arrays (one above the norm
    block): within 1e-12 of the largest entry (optax sums the norms in its order, the
    kernels in fixed blocks: the ratios differ in the last bits; measured about 1e-15)."""
    _, optax = optax_modules()
    rng = np.random.default_rng(5)
    shapes = [(30, 20), (20,), (BLOCK + 9,)]
    theta = [rng.standard_normal(s) for s in shapes]
    grads = [[rng.standard_normal(s) for s in shapes] for _ in range(1000)]
    if kind == "lamb":
        tx = optax.lamb(1e-2, **kw)
        opt = ch8fast.LAMB(ours := [t.copy() for t in theta], lr=1e-2, **kw)
    else:
        tx = optax.lars(0.1, **kw)
        opt = ch8fast.LARS(ours := [t.copy() for t in theta], lr=0.1, **kw)
    p, _ = optax_run(tx, theta, grads)
    for g in grads:
        opt.step(g)
    for a, b in zip(ours, p):
        assert_close(a, np.asarray(b), np.float64, kind)


@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_lamb_is_keras_lamb(wd):
    """convention="keras" against keras.optimizers.Lamb (jax backend, float64 variables),
    1,000 random steps: its decoupled decay first, the ratio of the decayed theta, its
    float32 rate; within 1e-12 of the largest entry (measured 1e-15 without decay, 5e-14
    with)."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    keras = pytest.importorskip("keras")
    rng = np.random.default_rng(6)
    shapes = [(30, 20), (20,), (BLOCK + 9,)]
    theta = [rng.standard_normal(s) for s in shapes]
    grads = [[rng.standard_normal(s) for s in shapes] for _ in range(1000)]
    vs = [keras.Variable(t.copy(), dtype="float64") for t in theta]
    theirs = keras.optimizers.Lamb(learning_rate=1e-2, weight_decay=wd or None,
                                   epsilon=1e-6)
    theirs.build(vs)
    ours = [t.copy() for t in theta]
    opt = ch8fast.LAMB(ours, lr=1e-2, weight_decay=wd, convention="keras")
    for g in grads:
        theirs.apply([jax.numpy.asarray(x) for x in g], vs)
        opt.step(g)
    for a, v in zip(ours, vs):
        assert_close(a, np.asarray(v.numpy()), np.float64, "keras")
