"""Plain NumPy implementations of every update rule, written from ALGORITHMS.md.

Used by the tests only, as the oracle for the kernels. Each rule is written as the book
writes it (temporaries and all), in the parameters' dtype: hyperparameters are Python
floats, which NumPy applies to float32 arrays in float32.
"""

import numpy as np


class Reference:
    """A reference optimizer over copies of the parameters: ``step(grads)``."""

    def __init__(self, params, **hyper):
        self.params = [p.copy() for p in params]
        self.h = hyper
        self.state = [self.init_state(p) for p in self.params]
        self.t = 0

    def init_state(self, p):
        return {}

    def step(self, grads):
        self.t += 1
        for i, (p, g) in enumerate(zip(self.params, grads)):
            self.params[i] = self.update(p, g.copy(), self.state[i])

    def l2(self, p, g):
        wd = self.h.get("weight_decay", 0.0)
        return g + wd * p if wd else g


class SGD(Reference):
    """theta <- theta - eps g (Alg 8.1); with momentum: v <- alpha v - eps g (8.15),
    theta <- theta + v (8.16). Nesterov in the shifted form of spec section 3:
    phi' = phi - alpha v + (1 + alpha) v'."""

    def init_state(self, p):
        return {"velocity": np.zeros_like(p)} if self.h.get("momentum", 0) else {}

    def update(self, p, g, st):
        g = self.l2(p, g)
        lr, alpha = self.h["lr"], self.h.get("momentum", 0.0)
        if not alpha:
            return p - lr * g
        v = st["velocity"]
        v_new = alpha * v - lr * g
        st["velocity"] = v_new
        if self.h.get("nesterov"):
            return p - alpha * v + (1 + alpha) * v_new
        return p + v_new


class AdaGrad(Reference):
    """r <- r + g*g; dtheta = -eps / (delta + sqrt(r)) * g (Alg 8.4)."""

    def init_state(self, p):
        return {"sum": np.full_like(p, self.h.get("initial_accumulator_value", 0.0))}

    def update(self, p, g, st):
        g = self.l2(p, g)
        st["sum"] = st["sum"] + g * g
        return p + (-self.h["lr"] / (self.h["eps"] + np.sqrt(st["sum"]))) * g


class RMSProp(Reference):
    """r <- rho r + (1 - rho) g*g; dtheta = -eps / sqrt(delta + r) * g (Alg 8.5).
    With momentum: v <- alpha v - eps / sqrt(delta + r) * g; theta <- theta + v (Alg 8.6,
    Nesterov in the shifted form)."""

    def init_state(self, p):
        st = {"square_avg": np.zeros_like(p)}
        if self.h.get("momentum", 0):
            st["velocity"] = np.zeros_like(p)
        return st

    def update(self, p, g, st):
        g = self.l2(p, g)
        lr, rho, eps = self.h["lr"], self.h["rho"], self.h["eps"]
        st["square_avg"] = rho * st["square_avg"] + (1 - rho) * (g * g)
        step = -lr / np.sqrt(eps + st["square_avg"]) * g
        alpha = self.h.get("momentum", 0.0)
        if not alpha:
            return p + step
        v = st["velocity"]
        v_new = alpha * v + step
        st["velocity"] = v_new
        if self.h.get("nesterov"):
            return p - alpha * v + (1 + alpha) * v_new
        return p + v_new


class Adam(Reference):
    """Alg 8.7 with bias correction; AMSGrad uses max(r) so far; decoupled decay scales
    theta by 1 - lr * wd first (AdamW)."""

    def init_state(self, p):
        st = {"exp_avg": np.zeros_like(p), "exp_avg_sq": np.zeros_like(p)}
        if self.h.get("amsgrad"):
            st["max_exp_avg_sq"] = np.zeros_like(p)
        return st

    def update(self, p, g, st):
        lr, (b1, b2), eps = self.h["lr"], self.h["betas"], self.h["eps"]
        wd, t = self.h.get("weight_decay", 0.0), self.t
        if self.h.get("decoupled_weight_decay"):
            p = p * (1 - lr * wd)
        elif wd:
            g = g + wd * p
        st["exp_avg"] = b1 * st["exp_avg"] + (1 - b1) * g
        st["exp_avg_sq"] = b2 * st["exp_avg_sq"] + (1 - b2) * (g * g)
        r = st["exp_avg_sq"]
        if self.h.get("amsgrad"):
            st["max_exp_avg_sq"] = np.maximum(st["max_exp_avg_sq"], r)
            r = st["max_exp_avg_sq"]
        s_hat = st["exp_avg"] / (1 - b1 ** t)
        r_hat = r / (1 - b2 ** t)
        return p - lr * s_hat / (np.sqrt(r_hat) + eps)


class AdaDelta(Reference):
    """Zeiler 2012: E[g^2], the step -sqrt(E[dx^2] + eps) / sqrt(E[g^2] + eps) * g, then
    E[dx^2]; theta moves by lr times the step."""

    def init_state(self, p):
        return {"square_avg": np.zeros_like(p), "acc_delta": np.zeros_like(p)}

    def update(self, p, g, st):
        g = self.l2(p, g)
        lr, rho, eps = self.h["lr"], self.h["rho"], self.h["eps"]
        st["square_avg"] = rho * st["square_avg"] + (1 - rho) * (g * g)
        d = np.sqrt(st["acc_delta"] + eps) / np.sqrt(st["square_avg"] + eps) * g
        st["acc_delta"] = rho * st["acc_delta"] + (1 - rho) * (d * d)
        return p - lr * d


def nesterov_literal(theta, grad_at, lr, alpha, steps):
    """The book's Algorithm 8.3 verbatim: gradient at theta + alpha v."""
    theta = theta.copy()
    v = np.zeros_like(theta)
    for _ in range(steps):
        g = grad_at(theta + alpha * v)
        v = alpha * v - lr * g
        theta = theta + v
    return theta


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
