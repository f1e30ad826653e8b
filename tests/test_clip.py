"""Gradient clipping: the kernels against NumPy, determinism of the global norm, the
options fused into the optimizers' update, and the skipped step on non-finite gradients."""

import math

import numpy as np
import pytest

import ch8fast
from conftest import CONFIGS, assert_close, random_problem


def _grads(dtype, sizes=(1000003, 7, 0, 4099, 1), seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(n) * scale).astype(dtype) for n in sizes]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_global_norm_matches_numpy(dtype, threads):
    gs = _grads(dtype)
    expected = np.linalg.norm(np.concatenate([g.astype(np.float64) for g in gs]))
    # summed in double: ~n * 2^-53 relative, far inside 1e-12
    assert math.isclose(ch8fast.global_norm(gs), expected, rel_tol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_global_norm_same_bits_for_any_threads_and_split(dtype):
    flat = _grads(dtype, sizes=(2_000_000,), seed=3)[0]
    splits = [[flat], np.split(flat, [1, 4096, 4097, 999_999]), np.array_split(flat, 7),
              [flat[:13], flat[13:]]]
    results = set()
    for n in (1, 2, 3):
        ch8fast.set_num_threads(n)
        for parts in splits:
            results.add(ch8fast.global_norm([np.ascontiguousarray(p) for p in parts]))
    ch8fast.set_num_threads(0)
    assert len(results) == 1


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_clip_by_global_norm(dtype):
    gs = _grads(dtype, scale=0.01)
    ref = [g.copy() for g in gs]
    norm = ch8fast.global_norm(gs)
    assert ch8fast.clip_by_global_norm(gs, norm * 2) == norm          # below: unchanged
    for a, b in zip(gs, ref):
        assert a.tobytes() == b.tobytes()
    before = ch8fast.clip_by_global_norm(gs, norm / 4)
    assert before == norm
    for a, b in zip(gs, ref):
        assert a.dtype == dtype
        assert_close(a, b * (norm / 4 / norm), dtype)
    assert math.isclose(ch8fast.global_norm(gs), norm / 4, rel_tol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_clip_by_value_and_by_norm(dtype):
    gs = _grads(dtype, sizes=(1001, 3, 50000))
    gs[1][:] = [np.nan, np.inf, -np.inf]
    ref = [np.clip(g, -0.5, 0.5) for g in gs]
    ch8fast.clip_by_value(gs, 0.5)
    for a, b in zip(gs, ref):
        np.testing.assert_array_equal(a, b)          # NaN stays NaN, Inf is clamped

    hs = _grads(dtype, sizes=(100, 200))
    norms = [np.linalg.norm(h.astype(np.float64)) for h in hs]
    ref = [h * (1.0 / n) if n > 1.0 else h.copy() for h, n in zip(hs, norms)]
    got = ch8fast.clip_by_norm(hs, 1.0)
    np.testing.assert_allclose(got, norms, rtol=1e-12)
    for a, b in zip(hs, ref):
        assert_close(a, b.astype(dtype), dtype)


def test_float64_norm_does_not_overflow():
    gs = [np.full(10, 1e200), np.full(6, -1e200)]
    assert math.isclose(ch8fast.global_norm(gs), 4e200, rel_tol=1e-14)
    assert ch8fast.all_finite(gs)
    gs[1][2] = np.inf
    assert ch8fast.global_norm(gs) == math.inf
    assert not ch8fast.all_finite(gs)
    gs[1][2] = np.nan
    assert not ch8fast.all_finite(gs)


def test_clip_against_torch():
    torch = pytest.importorskip("torch")
    for dtype in (np.float32, np.float64):
        gs = _grads(dtype, sizes=(5000, 17, 300), seed=8)
        tgs = [torch.nn.Parameter(torch.zeros(g.shape, dtype=torch.from_numpy(g).dtype))
               for g in gs]
        for tp, g in zip(tgs, gs):
            tp.grad = torch.from_numpy(g.copy())
        tnorm = torch.nn.utils.clip_grad_norm_(tgs, 2.0)
        norm = ch8fast.clip_by_global_norm(gs, 2.0)
        assert math.isclose(norm, float(tnorm), rel_tol=1e-6)
        # torch divides by norm + 1e-6 (about 1e-8 relative here)
        for g, tp in zip(gs, tgs):
            assert_close(g, tp.grad.numpy(), np.float32)


@pytest.mark.parametrize("name,cls,ref_name,hyper", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_fused_clipping_equals_clipping_first(name, cls, ref_name, hyper):
    params, grads = random_problem([(3001,), (4, 5)], np.float32, seed=2, n_steps=4)
    a = [p.copy() for p in params]
    b = [p.copy() for p in params]
    fused = cls(a, clip_norm=0.5, clip_value=0.01, **hyper)
    plain = cls(b, **hyper)
    for g in grads:
        fused.step(g)
        g2 = [x.copy() for x in g]
        norm = ch8fast.clip_by_global_norm(g2, 0.5)
        assert fused.last_grad_norm == norm
        ch8fast.clip_by_value(g2, 0.01)
        plain.step(g2)
    for x, y in zip(a, b):
        assert x.tobytes() == y.tobytes()


def test_clipping_in_the_literal_nesterov_form_with_weight_decay():
    """The literal form clips the gradient, then adds the L2 term at the interim point,
    as the fused shifted form does."""
    rng = np.random.default_rng(0)
    A = np.diag(np.linspace(0.5, 3, 8))
    x0 = rng.standard_normal(8) * 5
    lit, sh = x0.copy(), x0.copy()
    kw = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1, clip_norm=1.0,
              clip_value=0.3)
    o1, o2 = ch8fast.SGD([lit], **kw), ch8fast.SGD([sh], **kw)
    for _ in range(200):
        o1.step(closure=lambda: A @ lit)
        o2.step(A @ sh)
    np.testing.assert_allclose(o2.theta()[0], lit, rtol=1e-10, atol=1e-13 * 5)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name,cls,ref_name,hyper", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_skip_nonfinite_changes_nothing(name, cls, ref_name, hyper, bad):
    params, grads = random_problem([(2001,), (3, 3)], np.float64, seed=4, n_steps=3)
    a = [p.copy() for p in params]
    b = [p.copy() for p in params]
    opt = cls(a, skip_nonfinite=True, **hyper)
    twin = cls(b, **hyper)
    opt.step(grads[0])
    twin.step(grads[0])
    snap = opt.state_dict()
    before = [x.copy() for x in a]
    poisoned = [g.copy() for g in grads[1]]
    poisoned[0][1234] = bad
    assert opt.step(poisoned) is None
    assert opt.skipped_steps == 1
    assert math.isnan(opt.last_grad_norm) or opt.last_grad_norm == math.inf
    for x, y in zip(a, before):
        assert x.tobytes() == y.tobytes()
    after = opt.state_dict()
    assert after["param_groups"][0]["step"] == snap["param_groups"][0]["step"]
    for s1, s2 in zip(after["state"], snap["state"]):
        for k in s1:
            assert s1[k].tobytes() == s2[k].tobytes()
    opt.step(grads[2])                       # carries on as if it never happened
    twin.step(grads[2])
    for x, y in zip(a, b):
        assert x.tobytes() == y.tobytes()


def test_without_skip_nan_propagates():
    w = np.ones(4)
    opt = ch8fast.Adam([w])
    opt.step(np.array([1.0, np.nan, 1.0, 1.0]))
    assert np.isnan(w[1]) and np.isfinite(w[[0, 2, 3]]).all()
    assert np.isnan(opt.state[0]["exp_avg"][1])


@pytest.mark.parametrize("kw,exc", [
    (dict(clip_norm=0.0), ValueError), (dict(clip_norm=-1.0), ValueError),
    (dict(clip_value=0.0), ValueError), (dict(clip_norm=float("nan")), ValueError),
    (dict(clip_value="1"), TypeError), (dict(skip_nonfinite="yes"), TypeError),
    (dict(clip_norms=1.0), TypeError),
])
def test_bad_clipping_options(kw, exc):
    with pytest.raises(exc):
        ch8fast.SGD([np.zeros(3)], lr=0.1, **kw)


def test_clip_functions_reject_bad_input():
    g = np.ones(4)
    with pytest.raises(ValueError, match="max_norm"):
        ch8fast.clip_by_global_norm([g], -1.0)
    with pytest.raises(TypeError, match=r"grads\[0\]"):
        ch8fast.clip_by_value([np.ones(4, np.int64)], 1.0)
    ro = np.ones(4)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        ch8fast.clip_by_value([ro], 1.0)
    with pytest.raises(TypeError):
        ch8fast.global_norm("abc")
