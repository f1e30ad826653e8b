"""The flat arena, and steps that allocate nothing."""

import tracemalloc

import numpy as np
import pytest

import ch8fast
from conftest import CONFIGS


SHAPES = {"W1": (64, 33), "b1": (33,), "W2": (33, 10), "b2": (10,), "empty": (0,)}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_views_are_aligned_disjoint_and_shared(dtype):
    arena = ch8fast.FlatParams(SHAPES, dtype=dtype)
    assert arena.flat.flags.c_contiguous and arena.flat.dtype == dtype
    for name, p, g in zip(arena.names, arena.params, arena.grads):
        assert p.shape == SHAPES[name] and g.shape == SHAPES[name]
        assert p.size == 0 or np.shares_memory(p, arena.flat)
        assert g.size == 0 or np.shares_memory(g, arena.flat_grad)
        assert p.__array_interface__["data"][0] % 64 == 0
        assert arena[name] is p and arena.grad(name) is g
    arena["W1"][...] = 1.0
    arena["b1"][...] = 2.0
    assert arena.flat.sum() == 64 * 33 + 2 * 33      # no overlap, padding untouched


@pytest.mark.parametrize("name,cls,ref_name,hyper", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_one_flat_step_equals_separate_arrays(name, cls, ref_name, hyper):
    rng = np.random.default_rng(0)
    arena = ch8fast.FlatParams(SHAPES, dtype=np.float32)
    for p in arena.params:
        p[...] = rng.standard_normal(p.shape)
    separate = [p.copy() for p in arena.params]
    # (LAMB, LARS: a ratio per array, so the arena's views are the parameters)
    trust = cls.rule.trust_ratio
    opt_flat = cls(arena.params if trust else [arena.flat], **hyper)
    opt_sep = cls(separate, **hyper)
    for _ in range(4):
        gs = [rng.standard_normal(p.shape).astype(np.float32) for p in separate]
        for view, g in zip(arena.grads, gs):
            view[...] = g
        opt_flat.step(arena.grads if trust else arena.flat_grad)
        opt_sep.step(gs)
    for p, q in zip(arena.params, separate):
        assert p.tobytes() == q.tobytes()
    ends = [o + p.size for o, p in zip(arena.offsets, arena.params)]
    for end, nxt in zip(ends, arena.offsets[1:] + [arena.flat.size]):
        assert not arena.flat[end:nxt].any()              # padding stays zero
    assert ends[1] < arena.offsets[2]                      # b1 (33 elements) is padded


def test_flat_norm_and_clipping():
    rng = np.random.default_rng(1)
    arena = ch8fast.FlatParams(SHAPES, dtype=np.float64)
    for g in arena.grads:
        g[...] = rng.standard_normal(g.shape)
    norm = ch8fast.global_norm(arena.flat_grad)
    np.testing.assert_allclose(norm, ch8fast.global_norm(arena.grads), rtol=1e-14)
    ch8fast.clip_by_global_norm(arena.flat_grad, norm / 2)
    np.testing.assert_allclose(ch8fast.global_norm(arena.grads), norm / 2, rtol=1e-14)


@pytest.mark.parametrize("bad,exc,match", [
    ({"a": (-1,)}, ValueError, r"shapes\['a'\] must be non-negative integers, got \(-1,\)"),
    ({}, ValueError, "shapes must hold at least one shape, got none"),
    ({"a": (2.5,)}, ValueError, r"shapes\['a'\] must be"),
    ({1: (2,)}, TypeError, "shapes' names must be strings, got 1"),
    (5, TypeError, "shapes must be a dict name -> shape or a sequence of shapes, got int")])
def test_bad_arena(bad, exc, match):
    with pytest.raises(exc, match=match):
        ch8fast.FlatParams(bad)
    with pytest.raises(TypeError, match="dtype"):
        ch8fast.FlatParams({"a": 3}, dtype=np.int32)


@pytest.mark.parametrize("make", [
    lambda ps: ch8fast.Adam(ps, lr=1e-3, amsgrad=True),
    lambda ps: ch8fast.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, clip_norm=1.0,
                           skip_nonfinite=True, clip_value=0.5),
    lambda ps: ch8fast.RMSProp(ps, lr=1e-3, momentum=0.9),
    lambda ps: ch8fast.AdaGrad(ps, lr=ch8fast.schedules.inverse_time(0.1, 100)),
], ids=["adam_amsgrad", "nesterov_clipped", "rmsprop_momentum", "adagrad_scheduled"])
def test_steps_allocate_no_arrays(make):
    """After the first step, 1,000 steps allocate no arrays (the parameters here are
    400 KB, so one temporary would show in the peak)."""
    ps = [np.zeros(100_000, np.float32), np.zeros((30, 30), np.float32)]
    gs = [np.full(p.shape, 0.01, np.float32) for p in ps]
    opt = make(ps)
    opt.step(gs)
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        for _ in range(1000):
            opt.step(gs)
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak - base < 16_384, (base, peak)
    assert current - base < 4_096, (base, current)
