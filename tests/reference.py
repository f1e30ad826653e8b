"""The tests' oracle: the update rules in plain NumPy, from ch8fast.apps.reference (which
the benchmark times too). Tests import it as ``import reference as R``."""
from ch8fast.apps.reference import *  # noqa: F401,F403
from ch8fast.apps.reference import __all__  # noqa: F401

import numpy as np  # noqa: E402  (the storage references below)


# ---------------------------------------------------------------------------------------
# Storage (src/storage.h), restated in NumPy from its definitions: 16-bit rounding, 8-bit
# block codes, random words. The kernels must give these bits exactly.
# ---------------------------------------------------------------------------------------

_M64 = (1 << 64) - 1


def _u(x):
    """float32 -> its bits (uint32)."""
    return np.ascontiguousarray(x, np.float32).view(np.uint32)


def _f(u):
    """bits (uint32) -> float32."""
    return np.ascontiguousarray(u, np.uint32).view(np.float32)


def _c(v):
    return np.uint32(v)


def bf16_rne(x):
    u = _u(x)
    r = (u + _c(0x7FFF) + ((u >> _c(16)) & _c(1))) >> _c(16)
    q = (u >> _c(16)) | _c(0x40)
    return np.where((u & _c(0x7FFFFFFF)) > _c(0x7F800000), q, r).astype(np.uint16)


def bf16_sr(x, r16):
    u = _u(x)
    r = (u + np.asarray(r16, np.uint32)) >> _c(16)
    q = (u >> _c(16)) | _c(0x40)
    return np.where((u & _c(0x7FFFFFFF)) > _c(0x7F800000), q, r).astype(np.uint16)


def bf16_to_f32(h):
    return _f(np.asarray(h, np.uint16).astype(np.uint32) << _c(16))


def f16_rne(x):
    u = _u(x)
    sign = (u >> _c(16)) & _c(0x8000)
    a = u & _c(0x7FFFFFFF)
    nrm = (a + _c(0xC8000FFF) + ((a >> _c(13)) & _c(1))) >> _c(13)
    sub = _u(_f(a) + np.float32(0.5)) - _c(0x3F000000)
    big = np.where(a > _c(0x7F800000), _c(0x7E00) | ((a >> _c(13)) & _c(0x3FF)), _c(0x7C00))
    h = np.where(a < _c(0x38800000), sub, np.where(a < _c(0x47800000), nrm, big))
    return (h | sign).astype(np.uint16)


def f16_sr(x, r16):
    u = _u(x)
    r16 = np.asarray(r16, np.uint32)
    sign = (u >> _c(16)) & _c(0x8000)
    a = u & _c(0x7FFFFFFF)
    nrm = ((a + (r16 >> _c(3))) >> _c(13)) - _c(0x1C000)
    nrm = np.minimum(nrm, _c(0x7C00))
    t = _f(np.where(a < _c(0x38800000), a, _c(0))) * np.float32(16777216.0)
    k = t.astype(np.int32)
    p = (t - k.astype(np.float32)) * np.float32(65536.0)
    sub = k.astype(np.uint32) + (r16.astype(np.int32).astype(np.float32) < p).astype(np.uint32)
    big = _c(0x7E00) | ((a >> _c(13)) & _c(0x3FF))
    h = np.where(a < _c(0x38800000), sub, np.where(a <= _c(0x7F800000), nrm, big))
    return (h | sign).astype(np.uint16)


def f16_to_f32(h):
    h = np.asarray(h, np.uint16).astype(np.uint32)
    sign = (h & _c(0x8000)) << _c(16)
    o = (h & _c(0x7FFF)) << _c(13)
    e = o & _c(0x0F800000)
    nrm = o + _c(0x38000000)
    inf = (o + _c(0x70000000)) | np.where((o & _c(0x7FFFFF)) != 0, _c(0x00400000), _c(0))
    sub = _u(_f(o + _c(0x38800000)) - np.float32(6.103515625e-05))
    return _f(np.where(e == _c(0x0F800000), inf, np.where(e == 0, sub, nrm)) | sign)


def e4m3_decode(b):
    b = np.asarray(b, np.uint8).astype(np.uint32)
    e, m = (b >> _c(3)) & _c(15), b & _c(7)
    nrm = ((e + _c(111)) << _c(23)) | (m << _c(20))
    sub = _u(m.astype(np.float32) * np.float32(2.0 ** -18))
    return _f(np.where(e == 0, sub, nrm) | ((b & _c(0x80)) << _c(24)))


def e4m3_rne(y):
    u = _u(y)
    a = u & _c(0x7FFFFFFF)
    nrm = ((a + _c(0x7FFFF) + ((a >> _c(20)) & _c(1))) >> _c(20)) - _c(111 << 3)
    sub = _u(_f(a) + np.float32(32.0)) - _c(0x42000000)
    c = np.where(a >= _c(112 << 23), nrm, sub)
    c = np.minimum(c, _c(127))
    return (c | ((u >> _c(24)) & _c(0x80))).astype(np.uint8)


def e5m3_decode(b):
    b = np.asarray(b, np.uint8).astype(np.uint32)
    e, m = b >> _c(3), b & _c(7)
    nrm = ((e + _c(95)) << _c(23)) | (m << _c(20))
    sub = _u(m.astype(np.float32) * np.float32(2.0 ** -34))
    return _f(np.where(e == 0, sub, nrm))


def e5m3_sr(y, r16, x):
    a = _u(y) & _c(0x7FFFFFFF)
    r16 = np.asarray(r16, np.uint32)
    nrm = ((a + (r16 << _c(4))) >> _c(20)) - _c(95 << 3)
    t = _f(np.where(a < _c(96 << 23), a, _c(0))) * np.float32(2.0 ** 34)
    k = t.astype(np.int32)
    p = (t - k.astype(np.float32)) * np.float32(65536.0)
    sub = k.astype(np.uint32) + (r16.astype(np.int32).astype(np.float32) < p).astype(np.uint32)
    c = np.where(a >= _c(96 << 23), nrm, sub)
    c = np.minimum(c, _c(255))
    c = c | (((_u(x) & _c(0x7FFFFFFF)) != 0) & (c == 0)).astype(np.uint32)
    return c.astype(np.uint8)


def _fmix32(x):
    x = np.asarray(x, np.uint32).copy()
    x ^= x >> _c(16)
    x *= _c(0x85EBCA6B)
    x ^= x >> _c(13)
    x *= _c(0xC2B2AE35)
    x ^= x >> _c(16)
    return x


def _mix64(z):
    z &= _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def step_key(seed, group, step):
    return _mix64(_mix64(_mix64(seed) + group) + step)


def words(key, index, n):
    """The random words of elements index .. index + n - 1 under key (indices mod 2^32)."""
    i = (np.arange(index, index + n, dtype=np.uint64) & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    return _fmix32(i ^ _c(key & 0xFFFFFFFF)) ^ _c(key >> 32)


QBLOCK = 256


def q8_encode(x, signed, w=None):
    """8-bit codes and block scales of one tensor's float32 values x (w: its random words,
    for the unsigned, stochastic code)."""
    x = np.ascontiguousarray(x, np.float32).reshape(-1)
    codes = np.zeros(x.size, np.uint8)
    scales = np.zeros(-(-x.size // QBLOCK), np.float32)
    for b in range(scales.size):
        blk = x[b * QBLOCK:(b + 1) * QBLOCK]
        s = _f(np.max(_u(blk) & _c(0x7FFFFFFF), initial=0))[0]
        if not s < np.float32(np.inf):
            scales[b] = np.float32(np.nan)
            continue
        scales[b] = s
        if s == 0:
            continue
        if s < np.float32(2.0 ** -126):
            # a tiny block: scaled up by 2^64 (exact), so 0.9375 / s cannot overflow
            up = np.float32(2.0 ** 64)
            y = (blk * up) * (np.float32(0.9375) / (s * up))
        else:
            y = blk * (np.float32(0.9375) / s)
        if signed:
            codes[b * QBLOCK:b * QBLOCK + blk.size] = e4m3_rne(y)
        else:
            r = w[b * QBLOCK:b * QBLOCK + blk.size] >> _c(16)
            codes[b * QBLOCK:b * QBLOCK + blk.size] = e5m3_sr(y, r, blk)
    return codes, scales


def q8_decode(codes, scales, signed):
    codes = np.asarray(codes, np.uint8).reshape(-1)
    raw = e4m3_decode(codes) if signed else e5m3_decode(codes)
    d = np.repeat(np.asarray(scales, np.float32) / np.float32(0.9375), QBLOCK)[:codes.size]
    return raw * d
