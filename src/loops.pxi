# The loops of ch8fast's kernels: compiled once per instruction set (``_kernels*.pyx``);
# everything else (the checks, the types Python sees) is compiled once, in ``_core.pyx``,
# and calls these through the ``Loops`` table (types.pxi) each kernel module exports.
#
# Three layers, from the inside out:
#
# 1. Span functions (``_sgd``, ``_adam``, ...): the per-element math of one update rule
#    over one contiguous run of ``n`` elements of one tensor, on raw pointers, ``noexcept
#    nogil``. Each is a single pass that reads the gradient and the state once, and writes
#    the parameter and the state once, in place. The math runs in the array's dtype; the
#    per-step scalars arrive in a ``Hyper`` struct computed by Python in double precision
#    and are rounded once to the dtype. Every rule sees the gradient through ``_grad``
#    (scale for clipping by norm, then clamp for clipping by value): the one code path of
#    the gradient transformations, which the standalone clipping functions run too
#    (``_transform``).
#
# 2. Three walkers, each calling the span functions through ``_span_ptrs``:
#    - ``_run``: a parameter group is a *table* with one row per tensor (the addresses of
#      param, grad and state arrays) and cumulative element offsets. The walker splits the
#      group's total element count into one contiguous chunk per thread (OpenMP
#      ``prange``, static) and calls the span function on each piece of tensor that a
#      chunk covers. Many small tensors thus cost one call and one thread team;
#    - ``_run_blocks``: the same over 16-bit parameters or compressed state, by blocks of
#      256 elements decoded into float32, updated and encoded back;
#    - ``_run_rows``: the rows of one 2-D tensor (row-sparse gradients, catch-up, row-wise
#      AdaGrad), threads taking whole rows.
#    The arithmetic of every element does not depend on the split, so results are bitwise
#    the same for any number of threads.
#
# Nothing here allocates, checks, or touches a Python object.

cimport cython
from cython.parallel cimport prange
from libc.math cimport sqrt, sqrtf, fma, fmaf, fabs, pow
from libc.string cimport memcpy

# ---------------------------------------------------------------------------------------
# Layer 1: span functions. ``p`` and the state are written, ``g`` is only read.
#
# Every span function is one loop, compiled for each dtype and for each of two operation
# sequences, selected by the type of its last argument: ``Plain`` rounds every operation
# on its own (no contraction: -ffp-contract=off), ``Torch`` is torch.optim's sequence
# with its fused multiply-adds (FLAG_FMA). The flags are the same for every element; the
# loop body computes the values of each choice and selects one (``x if flag else y``), or
# the loop is compiled once per value of an option that changes its structure (``opt1``,
# ``opt2``: Nesterov, the momentum buffer, centered RMSProp), so that gcc vectorizes every
# version. The clamp and AMSGrad stay branches, which gcc moves out of the loop.
# ---------------------------------------------------------------------------------------

cdef struct Plain:
    char unused

cdef struct Torch:
    char unused

ctypedef fused ops:
    Plain
    Torch

# Options that change a loop's structure are compile-time arguments too, of these types:
# the loop is compiled once per value, each version with no branch on them.
cdef struct Off:
    char unused

cdef struct On:
    char unused

ctypedef fused opt1:
    Off
    On

ctypedef fused opt2:
    Off
    On

ctypedef fused opt3:
    Off
    On


cdef inline floating _sqrt(floating x) noexcept nogil:
    if floating is float:
        return sqrtf(x)
    else:
        return sqrt(x)


cdef inline floating _fma(floating a, floating b, floating c) noexcept nogil:
    # a * b + c rounded once (C99 fma: exact whatever the instruction set)
    if floating is float:
        return fmaf(a, b, c)
    else:
        return fma(a, b, c)


cdef inline floating _grad(floating x, floating s, floating c, bint clip) noexcept nogil:
    # The gradient as the update sees it: scaled (by 1 unless clipping by norm; by -1 to
    # maximize), then clamped when clipping by value. x * 1 == x exactly, NaN and Inf
    # included, and x * -1 == -x.
    x = x * s
    if clip:
        if x > c:
            x = c
        elif x < -c:
            x = -c
    return x


cdef inline floating _l2(floating gi, floating pi, floating wd, bint l2,
                         ops* o) noexcept nogil:
    # g + wd * theta when ``l2`` (torch's grad.add(param, alpha=wd) rounds once)
    cdef floating x
    if ops is Torch:
        x = _fma(pi, wd, gi)
    else:
        x = gi + wd * pi
    return x if l2 else gi


cdef inline floating _step(floating pi, floating u, floating lr, ops* o) noexcept nogil:
    # theta - eps u (torch's param.add_(u, alpha=-lr) rounds once)
    if ops is Torch:
        return _fma(u, -lr, pi)
    else:
        return pi - lr * u


cdef inline floating _lerp(floating a, floating b, floating w, floating wm1,
                           bint hi) noexcept nogil:
    # torch's a.lerp_(b, w): fma(w, b - a, a) for |w| < 0.5, else fma(w - 1, b - a, b).
    # ``wm1`` is w - 1 rounded; ``hi`` is |w| >= 0.5.
    return _fma(wm1 if hi else w, b - a, b if hi else a)


cdef inline floating _pick(floating yes, floating no, bint which) noexcept nogil:
    return yes if which else no


cdef void _traffic(floating* p, const floating* g, floating* a, floating* b, floating* c,
                   Py_ssize_t n) noexcept nogil:
    # The bandwidth yardstick: reads every column once and writes every column but the
    # gradient once, as an update rule with the same columns does, with one add each.
    cdef Py_ssize_t i
    cdef floating x
    if a == NULL:
        for i in range(n):
            p[i] = p[i] + g[i]
    elif b == NULL:
        for i in range(n):
            x = p[i] + g[i] + a[i]
            p[i] = x
            a[i] = x
    elif c == NULL:
        for i in range(n):
            x = p[i] + g[i] + a[i] + b[i]
            p[i] = x
            a[i] = x
            b[i] = x
    else:
        for i in range(n):
            x = p[i] + g[i] + a[i] + b[i] + c[i]
            p[i] = x
            a[i] = x
            b[i] = x
            c[i] = x


cdef void _transform(floating* x, Py_ssize_t n, const Hyper* h) noexcept nogil:
    # The gradient transformation of the rules, applied to an array in place.
    cdef floating s = <floating>h.gscale, c = <floating>h.clip
    cdef bint clip = h.flags & FLAG_CLIP
    cdef Py_ssize_t i
    for i in range(n):
        x[i] = _grad(x[i], s, c, clip)


cdef void _sgd(floating* p, const floating* g, floating* s0, floating* s1, floating* s2,
               Py_ssize_t n, Py_ssize_t tail, const Hyper* h, ops* o) noexcept nogil:
    # theta <- theta - eps * g                                            (Alg 8.1)
    cdef floating lr = <floating>h.lr, wd = <floating>h.wd, decay = <floating>h.decay
    cdef bint l2 = h.flags & FLAG_L2
    cdef floating gs = <floating>h.gscale, cv = <floating>h.clip
    cdef bint clip = h.flags & FLAG_CLIP
    cdef floating pi, gi
    cdef Py_ssize_t i
    for i in range(n):
        pi = p[i] * decay
        gi = _l2(_grad(g[i], gs, cv, clip), pi, wd, l2, o)
        p[i] = _step(pi, gi, lr, o)


cdef void _momentum(floating* p, const floating* g, floating* v, floating* s1, floating* s2,
                    Py_ssize_t n, Py_ssize_t tail, const Hyper* h, ops* o) noexcept nogil:
    # v <- alpha v - eps g (8.15);  theta <- theta + v (8.16).
    # Shifted Nesterov (docs/optimizers.rst, "Steps, closures and Nesterov momentum"):
    # the array holds phi = theta + alpha_prev v, and phi' = phi - alpha_prev v
    # + (1 + alpha') v', alpha' being the next step's momentum (alpha_prev is this step's
    # momentum, unless the user changed it by hand).
    # FLAG_BUFFER (and always with Torch): b <- mu b + (1 - dampening) g, b <- g at the
    # first step (FLAG_FIRST); theta <- theta - eps b, or with FLAG_NESTEROV
    # theta - eps (g + mu b). Torch: elements from ``tail`` on take the fused kernel's
    # scalar-loop contraction of b.
    cdef bint nesterov = h.flags & FLAG_NESTEROV, buffer = h.flags & FLAG_BUFFER
    if ops is Torch:
        buffer = True
    if nesterov:
        if buffer:
            _momentum_loop(p, g, v, tail, h, <On*>NULL, <On*>NULL, <Off*>NULL, o)
            if tail < n:
                _momentum_loop(p + tail, g + tail, v + tail, n - tail, h, <On*>NULL,
                               <On*>NULL, <On*>NULL, o)
        else:
            _momentum_loop(p, g, v, n, h, <On*>NULL, <Off*>NULL, <Off*>NULL, o)
    elif buffer:
        _momentum_loop(p, g, v, tail, h, <Off*>NULL, <On*>NULL, <Off*>NULL, o)
        if tail < n:
            _momentum_loop(p + tail, g + tail, v + tail, n - tail, h, <Off*>NULL,
                           <On*>NULL, <On*>NULL, o)
    else:
        _momentum_loop(p, g, v, n, h, <Off*>NULL, <Off*>NULL, <Off*>NULL, o)


cdef void _momentum_loop(floating* p, const floating* g, floating* v, Py_ssize_t n,
                         const Hyper* h, opt1* nesterov, opt2* buffer, opt3* tail_rule,
                         ops* o) noexcept nogil:
    cdef floating lr = <floating>h.lr, wd = <floating>h.wd, decay = <floating>h.decay
    cdef floating a = <floating>h.alpha, a_next1 = <floating>(1.0 + h.alpha_next)
    cdef floating a_prev = <floating>h.alpha_prev, damp = <floating>h.damp
    cdef bint l2 = h.flags & FLAG_L2, first = h.flags & FLAG_FIRST
    cdef floating gs = <floating>h.gscale, cv = <floating>h.clip
    cdef bint clip = h.flags & FLAG_CLIP
    cdef floating pi, gi, vi, vn
    cdef Py_ssize_t i
    for i in range(n):
        pi = p[i] * decay
        gi = _l2(_grad(g[i], gs, cv, clip), pi, wd, l2, o)
        vi = v[i]
        if ops is Torch:
            if opt3 is On:
                vn = _fma(vi, a, gi * damp)       # the scalar tail's contraction
            else:
                vn = _fma(gi, damp, vi * a)       # buf.mul_(mu).add_(g, alpha=1-tau)
            vn = _pick(gi, vn, first)
            v[i] = vn
            if opt1 is On:
                vn = _fma(vn, a, gi)
            p[i] = _fma(vn, -lr, pi)
        elif opt2 is On:
            vn = _pick(gi, a * vi + damp * gi, first)
            v[i] = vn
            if opt1 is On:
                vn = gi + a * vn
            p[i] = pi - lr * vn
        else:
            vn = a * vi - lr * gi
            v[i] = vn
            if opt1 is On:
                p[i] = pi - a_prev * vi + a_next1 * vn
            else:
                p[i] = pi + vn


cdef inline floating _adagrad_accumulate(floating ri, floating gi, ops* o) noexcept nogil:
    # r + g*g (Torch: fma(g, g, r))
    if ops is Torch:
        return _fma(gi, gi, ri)
    else:
        return ri + gi * gi


cdef inline floating _adagrad_apply(floating pi, floating gi, floating ri, floating lr,
                                    floating e_in, floating e_out, ops* o) noexcept nogil:
    # theta - eps g / (sqrt(r + e_in) + e_out)  (Torch: theta + (-eps g) / (...))
    if ops is Torch:
        return pi + (-lr * gi) / (_sqrt(ri + e_in) + e_out)
    else:
        return pi - lr * (gi / (_sqrt(ri + e_in) + e_out))


cdef inline void _adagrad_eps(const Hyper* h, floating* e_in, floating* e_out) noexcept nogil:
    # sqrt(r + e_in) + e_out: x + 0 == x for every x >= 0 and NaN, so one formula holds
    # both placements of delta (FLAG_EPS_INSIDE: inside the root)
    if h.flags & FLAG_EPS_INSIDE:
        e_in[0] = <floating>h.eps
        e_out[0] = 0
    else:
        e_in[0] = 0
        e_out[0] = <floating>h.eps


cdef void _adagrad(floating* p, const floating* g, floating* r, floating* s1, floating* s2,
                   Py_ssize_t n, Py_ssize_t tail, const Hyper* h, ops* o) noexcept nogil:
    # r <- r + g*g;  theta <- theta - eps / (delta + sqrt(r)) * g          (Alg 8.4)
    # FLAG_EPS_INSIDE: sqrt(r + delta). Torch: r <- fma(g, g, r) and
    # theta + (-eps g) / (sqrt(r) + delta).
    cdef floating lr = <floating>h.lr, wd = <floating>h.wd, decay = <floating>h.decay
    cdef floating e_in, e_out
    cdef bint l2 = h.flags & FLAG_L2
    cdef floating gs = <floating>h.gscale, cv = <floating>h.clip
    cdef bint clip = h.flags & FLAG_CLIP
    cdef floating pi, gi, ri
    cdef Py_ssize_t i
    _adagrad_eps(h, &e_in, &e_out)
    for i in range(n):
        pi = p[i] * decay
        gi = _l2(_grad(g[i], gs, cv, clip), pi, wd, l2, o)
        ri = _adagrad_accumulate(r[i], gi, o)
        r[i] = ri
        p[i] = _adagrad_apply(pi, gi, ri, lr, e_in, e_out, o)


cdef void _adagrad_rowwise(floating* p, const floating* g, floating* r, Py_ssize_t n,
                           const Hyper* h, ops* o) noexcept nogil:
    # Row-wise AdaGrad: AdaGrad's rule with one accumulator r for the row's n elements,
    # which gains the mean of their g*g (summed in double in 16 lanes by index, added in
    # order: it vectorizes and its bits do not depend on threads); the step of each
    # element is AdaGrad's, in every convention.
    cdef floating lr = <floating>h.lr, wd = <floating>h.wd, decay = <floating>h.decay
    cdef floating e_in, e_out
    cdef bint l2 = h.flags & FLAG_L2
    cdef floating gs = <floating>h.gscale, cv = <floating>h.clip
    cdef bint clip = h.flags & FLAG_CLIP
    cdef double acc[SUM_LANES]
    cdef double total = 0.0
    cdef floating gi, rr, pi
    cdef Py_ssize_t i, j
    _adagrad_eps(h, &e_in, &e_out)
    for j in range(SUM_LANES):
        acc[j] = 0.0
    for i in range(n):
        gi = _l2(_grad(g[i], gs, cv, clip), p[i] * decay, wd, l2, o)
        acc[i % SUM_LANES] += <double>gi * <double>gi
    for j in range(SUM_LANES):
        total += acc[j]
    rr = r[0] + <floating>(total / <double>n) if n else r[0]
    r[0] = rr
    for i in range(n):
        pi = p[i] * decay
        gi = _l2(_grad(g[i], gs, cv, clip), pi, wd, l2, o)
        p[i] = _adagrad_apply(pi, gi, rr, lr, e_in, e_out, o)


cdef inline floating _rms_denominator(floating gi, floating* r, floating* ga, Py_ssize_t i,
                                      floating rho, floating rho1, floating rho1m1,
                                      bint lerp_hi, floating e_in, floating e_out,
                                      bint centered, ops* o) noexcept nogil:
    # r <- rho r + (1 - rho) g*g (and gbar <- rho gbar + (1 - rho) g when centered);
    # returns sqrt(r - gbar^2 + e_in) + e_out. Torch: square_avg.mul_(rho).addcmul_(g, g,
    # value=1-rho), grad_avg.lerp_(g, 1-rho), square_avg.addcmul(gbar, gbar, value=-1).
    cdef floating ri, gai, var
    if ops is Torch:
        ri = _fma(rho1 * gi, gi, r[i] * rho)
    else:
        ri = rho * r[i] + rho1 * (gi * gi)
    r[i] = ri
    var = ri
    if centered:
        if ops is Torch:
            gai = _lerp(ga[i], gi, rho1, rho1m1, lerp_hi)
            var = _fma(-gai, gai, ri)
        else:
            gai = rho * ga[i] + rho1 * gi
            var = ri - gai * gai
        ga[i] = gai
    return _sqrt(var + e_in) + e_out


cdef void _rmsprop(floating* p, const floating* g, floating* r, floating* ga, floating* s2,
                   Py_ssize_t n, Py_ssize_t tail, const Hyper* h, ops* o) noexcept nogil:
    # r <- rho r + (1 - rho) g*g;  theta <- theta - eps / sqrt(delta + r) * g   (Alg 8.5)
    # (delta outside the root without FLAG_EPS_INSIDE; r - gbar^2 with FLAG_CENTERED)
    if h.flags & FLAG_CENTERED:
        _rmsprop_loop(p, g, r, ga, n, h, <On*>NULL, o)
    else:
        _rmsprop_loop(p, g, r, NULL, n, h, <Off*>NULL, o)


cdef void _rmsprop_loop(floating* p, const floating* g, floating* r, floating* ga,
                        Py_ssize_t n, const Hyper* h, opt1* centered,
                        ops* o) noexcept nogil:
    cdef floating lr = <floating>h.lr, wd = <floating>h.wd, decay = <floating>h.decay
    cdef bint inside = h.flags & FLAG_EPS_INSIDE
    cdef floating e_in = <floating>h.eps if inside else 0, e_out = 0 if inside else <floating>h.eps
    cdef floating rho = <floating>h.rho, rho1 = <floating>(1.0 - h.rho)
    cdef floating rho1m1 = rho1 - 1
    cdef bint lerp_hi = fabs(rho1) >= 0.5
    cdef bint l2 = h.flags & FLAG_L2
    cdef floating gs = <floating>h.gscale, cv = <floating>h.clip
    cdef bint clip = h.flags & FLAG_CLIP
    cdef floating pi, gi, d
    cdef Py_ssize_t i
    for i in range(n):
        pi = p[i] * decay
        gi = _l2(_grad(g[i], gs, cv, clip), pi, wd, l2, o)
        d = _rms_denominator(gi, r, ga, i, rho, rho1, rho1m1, lerp_hi, e_in, e_out,
                             opt1 is On, o)
        if ops is Torch:
            p[i] = pi + (-lr * gi) / d            # param.addcdiv_(g, avg, value=-lr)
        else:
            p[i] = pi - lr * (gi / d)


cdef void _rmsprop_momentum(floating* p, const floating* g, floating* r, floating* v,
                            floating* ga, Py_ssize_t n, Py_ssize_t tail, const Hyper* h,
                            ops* o) noexcept nogil:
    # r <- rho r + (1 - rho) g*g;  v <- alpha v - eps / sqrt(delta + r) * g;
    # theta <- theta + v  (Alg 8.6; shifted Nesterov form as in _momentum).
    # Torch: the buffer b <- mu b + g / sqrt(...); theta <- theta - eps b.
    cdef bint centered = h.flags & FLAG_CENTERED, nesterov = h.flags & FLAG_NESTEROV
    if centered:
        if nesterov:
            _rmsprop_momentum_loop(p, g, r, v, ga, n, h, <On*>NULL, <On*>NULL, o)
        else:
            _rmsprop_momentum_loop(p, g, r, v, ga, n, h, <On*>NULL, <Off*>NULL, o)
    elif nesterov:
        _rmsprop_momentum_loop(p, g, r, v, NULL, n, h, <Off*>NULL, <On*>NULL, o)
    else:
        _rmsprop_momentum_loop(p, g, r, v, NULL, n, h, <Off*>NULL, <Off*>NULL, o)


cdef void _rmsprop_momentum_loop(floating* p, const floating* g, floating* r, floating* v,
                                 floating* ga, Py_ssize_t n, const Hyper* h,
                                 opt1* centered, opt2* nesterov, ops* o) noexcept nogil:
    cdef floating lr = <floating>h.lr, wd = <floating>h.wd, decay = <floating>h.decay
    cdef bint inside = h.flags & FLAG_EPS_INSIDE
    cdef floating e_in = <floating>h.eps if inside else 0, e_out = 0 if inside else <floating>h.eps
    cdef floating rho = <floating>h.rho, rho1 = <floating>(1.0 - h.rho)
    cdef floating rho1m1 = rho1 - 1
    cdef bint lerp_hi = fabs(rho1) >= 0.5
    cdef floating a = <floating>h.alpha, a_next1 = <floating>(1.0 + h.alpha_next)
    cdef floating a_prev = <floating>h.alpha_prev
    cdef bint l2 = h.flags & FLAG_L2
    cdef floating gs = <floating>h.gscale, cv = <floating>h.clip
    cdef bint clip = h.flags & FLAG_CLIP
    cdef floating pi, gi, d, vi, vn
    cdef Py_ssize_t i
    for i in range(n):
        pi = p[i] * decay
        gi = _l2(_grad(g[i], gs, cv, clip), pi, wd, l2, o)
        d = _rms_denominator(gi, r, ga, i, rho, rho1, rho1m1, lerp_hi, e_in, e_out,
                             opt1 is On, o)
        vi = v[i]
        if ops is Torch:
            vn = vi * a + gi / d                  # buf.mul_(mu).addcdiv_(g, avg)
            v[i] = vn
            p[i] = _fma(vn, -lr, pi)
        else:
            vn = a * vi - lr * (gi / d)
            v[i] = vn
            if opt2 is On:
                p[i] = pi - a_prev * vi + a_next1 * vn
            else:
                p[i] = pi + vn


cdef void _adam(floating* p, const floating* g, floating* m, floating* v, floating* vmax,
                Py_ssize_t n, Py_ssize_t tail, const Hyper* h, ops* o) noexcept nogil:
    # s <- b1 s + (1 - b1) g;  r <- b2 r + (1 - b2) g*g                   (Alg 8.7)
    # theta <- theta - eps * s_hat / (sqrt(r_hat) + delta), with the bias corrections
    # folded into two scalars: lr = eps / (1 - b1^t) and c2 = 1 / sqrt(1 - b2^t).
    # AdamW first scales theta by decay = 1 - eps * wd; AMSGrad divides by max(r) so far.
    # Torch: s.lerp_(g, 1 - b1), r.mul_(b2).addcmul_(g, g, value=1-b2) (from ``tail`` on:
    # the fused kernel's scalar-loop contraction), theta + (-lr s) / (sqrt(r) / c2 + delta)
    # with c2 = sqrt(1 - b2^t).
    # (AMSGrad is a compile-time option: a branch on it inside the loop would let gcc
    # read vmax with masked loads even when it is NULL, which is slow)
    # The elements from ``tail`` on are a second call of the loop, compiled with the
    # scalar tail's contraction (opt2).
    if h.flags & FLAG_AMSGRAD:
        _adam_loop(p, g, m, v, vmax, tail, h, <On*>NULL, <Off*>NULL, o)
        if tail < n:
            _adam_loop(p + tail, g + tail, m + tail, v + tail, vmax + tail, n - tail, h,
                       <On*>NULL, <On*>NULL, o)
    else:
        _adam_loop(p, g, m, v, NULL, tail, h, <Off*>NULL, <Off*>NULL, o)
        if tail < n:
            _adam_loop(p + tail, g + tail, m + tail, v + tail, NULL, n - tail, h,
                       <Off*>NULL, <On*>NULL, o)


cdef void _adam_loop(floating* p, const floating* g, floating* m, floating* v,
                     floating* vmax, Py_ssize_t n, const Hyper* h, opt1* amsgrad,
                     opt2* tail_rule, ops* o) noexcept nogil:
    cdef floating lr = <floating>h.lr, wd = <floating>h.wd, eps = <floating>h.eps
    cdef floating decay = <floating>h.decay, c2 = <floating>h.c2
    cdef floating b1 = <floating>h.beta1, b1c = <floating>(1.0 - h.beta1)
    cdef floating b2 = <floating>h.beta2, b2c = <floating>(1.0 - h.beta2)
    cdef floating b1cm1 = b1c - 1
    cdef bint lerp_hi = fabs(b1c) >= 0.5
    cdef bint l2 = h.flags & FLAG_L2
    cdef floating gs = <floating>h.gscale, cv = <floating>h.clip
    cdef bint clip = h.flags & FLAG_CLIP
    cdef floating pi, gi, mi, vi
    cdef Py_ssize_t i
    for i in range(n):
        pi = p[i] * decay
        gi = _l2(_grad(g[i], gs, cv, clip), pi, wd, l2, o)
        if ops is Torch:
            mi = _lerp(m[i], gi, b1c, b1cm1, lerp_hi)
            if opt2 is On:
                vi = _fma(v[i], b2, (b2c * gi) * gi)
            else:
                vi = _fma(b2c * gi, gi, v[i] * b2)
        else:
            mi = b1 * m[i] + b1c * gi
            vi = b2 * v[i] + b2c * (gi * gi)
        m[i] = mi
        v[i] = vi
        if opt1 is On:
            if vmax[i] > vi:
                vi = vmax[i]
            vmax[i] = vi
        if ops is Torch:
            p[i] = pi + (-lr * mi) / (_sqrt(vi) / c2 + eps)
        else:
            p[i] = pi - lr * (mi / (_sqrt(vi) * c2 + eps))


cdef inline floating _sign(floating c) noexcept nogil:
    # -1, 0 or 1 as c is negative, zero or positive; NaN stays NaN (c * 0)
    return _pick(<floating>1, _pick(<floating>-1, c * 0, c < 0), c > 0)


cdef void _lion(floating* p, const floating* g, floating* m, floating* s1, floating* s2,
                Py_ssize_t n, Py_ssize_t tail, const Hyper* h, ops* o) noexcept nogil:
    # c <- b1 m + (1 - b1) g;  theta <- theta - eps sign(c);  m <- b2 m + (1 - b2) g
    # (Chen et al. 2023, Algorithm 2; the decoupled weight decay scales theta first)
    cdef floating lr = <floating>h.lr, wd = <floating>h.wd, decay = <floating>h.decay
    cdef floating b1 = <floating>h.beta1, b1c = <floating>(1.0 - h.beta1)
    cdef floating b2 = <floating>h.beta2, b2c = <floating>(1.0 - h.beta2)
    cdef bint l2 = h.flags & FLAG_L2
    cdef floating gs = <floating>h.gscale, cv = <floating>h.clip
    cdef bint clip = h.flags & FLAG_CLIP
    cdef floating pi, gi, mi
    cdef Py_ssize_t i
    for i in range(n):
        pi = p[i] * decay
        gi = _l2(_grad(g[i], gs, cv, clip), pi, wd, l2, o)
        mi = m[i]
        p[i] = _step(pi, _sign(b1 * mi + b1c * gi), lr, o)
        m[i] = b2 * mi + b2c * gi


cdef void _adopt(floating* p, const floating* g, floating* m, floating* v, floating* s2,
                 Py_ssize_t n, Py_ssize_t tail, const Hyper* h, ops* o) noexcept nogil:
    # u <- g / max(sqrt(v), delta), clamped to [-c, c] with FLAG_BOUND;
    # m <- b1 m + (1 - b1) u;  theta <- theta - eps m;  v <- b2 v + (1 - b2) g*g:
    # the gradient is normalized by the *previous* step's v (Taniguchi et al. 2024,
    # Algorithm 2). Nesterov (optax's, FLAG_NESTEROV): theta - eps (b1 m + (1 - b1) u).
    # The first update only sets v <- g*g (Scalars.fill gives it beta1 1, beta2 0).
    # (Both options are compile-time: a runtime flag for the bound in the loop costs the
    # vector loop its masks' round trips through general registers.)
    if h.flags & FLAG_NESTEROV:
        if h.flags & FLAG_BOUND:
            _adopt_loop(p, g, m, v, n, h, <On*>NULL, <On*>NULL, o)
        else:
            _adopt_loop(p, g, m, v, n, h, <On*>NULL, <Off*>NULL, o)
    elif h.flags & FLAG_BOUND:
        _adopt_loop(p, g, m, v, n, h, <Off*>NULL, <On*>NULL, o)
    else:
        _adopt_loop(p, g, m, v, n, h, <Off*>NULL, <Off*>NULL, o)


cdef void _adopt_loop(floating* p, const floating* g, floating* m, floating* v, Py_ssize_t n,
                      const Hyper* h, opt1* nesterov, opt2* bound, ops* o) noexcept nogil:
    cdef floating lr = <floating>h.lr, wd = <floating>h.wd, eps = <floating>h.eps
    cdef floating decay = <floating>h.decay, c = <floating>h.bound
    cdef floating b1 = <floating>h.beta1, b1c = <floating>(1.0 - h.beta1)
    cdef floating b2 = <floating>h.beta2, b2c = <floating>(1.0 - h.beta2)
    cdef bint l2 = h.flags & FLAG_L2
    cdef floating gs = <floating>h.gscale, cv = <floating>h.clip
    cdef bint clip = h.flags & FLAG_CLIP
    cdef floating pi, gi, di, ui, mi
    cdef Py_ssize_t i
    for i in range(n):
        pi = p[i] * decay
        gi = _l2(_grad(g[i], gs, cv, clip), pi, wd, l2, o)
        di = _sqrt(v[i])
        ui = gi / _pick(eps, di, di < eps)       # max(sqrt(v), delta); NaN stays NaN
        if opt2 is On:                           # clamp to [-c, c]; NaN stays NaN
            ui = _pick(c, _pick(-c, ui, ui < -c), ui > c)
        mi = b1 * m[i] + b1c * ui
        m[i] = mi
        if opt1 is On:
            mi = b1 * mi + b1c * ui
        p[i] = _step(pi, mi, lr, o)
        v[i] = b2 * v[i] + b2c * (gi * gi)


cdef void _ademamix(floating* p, const floating* g, floating* m, floating* ms, floating* v,
                    Py_ssize_t n, Py_ssize_t tail, const Hyper* h, ops* o) noexcept nogil:
    # s <- b1 s + (1 - b1) g;  s_slow <- b3 s_slow + (1 - b3) g;  r <- b2 r + (1 - b2) g*g
    # theta <- theta - eps (s_hat + alpha s_slow) / (sqrt(r_hat) + delta)
    # (Pagliardini et al. 2024, Algorithm 1), the bias corrections folded as Adam's:
    # lr = eps / (1 - b1^t), mix = alpha (1 - b1^t), c2 = 1 / sqrt(1 - b2^t). The
    # decoupled weight decay scales theta first.
    cdef floating lr = <floating>h.lr, wd = <floating>h.wd, eps = <floating>h.eps
    cdef floating decay = <floating>h.decay, c2 = <floating>h.c2, mix = <floating>h.mix
    cdef floating b1 = <floating>h.beta1, b1c = <floating>(1.0 - h.beta1)
    cdef floating b2 = <floating>h.beta2, b2c = <floating>(1.0 - h.beta2)
    cdef floating b3 = <floating>h.beta3, b3c = <floating>(1.0 - h.beta3)
    cdef bint l2 = h.flags & FLAG_L2
    cdef floating gs = <floating>h.gscale, cv = <floating>h.clip
    cdef bint clip = h.flags & FLAG_CLIP
    cdef floating pi, gi, mi, si, vi
    cdef Py_ssize_t i
    for i in range(n):
        pi = p[i] * decay
        gi = _l2(_grad(g[i], gs, cv, clip), pi, wd, l2, o)
        mi = b1 * m[i] + b1c * gi
        si = b3 * ms[i] + b3c * gi
        vi = b2 * v[i] + b2c * (gi * gi)
        m[i] = mi
        ms[i] = si
        v[i] = vi
        p[i] = pi - lr * ((mi + mix * si) / (_sqrt(vi) * c2 + eps))


cdef void _schedule_free_sgd(floating* p, const floating* g, floating* z, floating* s1,
                             floating* s2, Py_ssize_t n, Py_ssize_t tail, const Hyper* h,
                             ops* o) noexcept nogil:
    _schedule_free_loop(p, g, z, NULL, n, h, <Off*>NULL, o)


cdef void _schedule_free_adamw(floating* p, const floating* g, floating* z, floating* v,
                               floating* s2, Py_ssize_t n, Py_ssize_t tail, const Hyper* h,
                               ops* o) noexcept nogil:
    _schedule_free_loop(p, g, z, v, n, h, <On*>NULL, o)


cdef void _schedule_free_loop(floating* p, const floating* g, floating* z, floating* v,
                              Py_ssize_t n, const Hyper* h, opt1* adaptive,
                              ops* o) noexcept nogil:
    # Schedule-free (Defazio et al. 2024): the array holds y = beta x + (1 - beta) z, where
    # the gradient is taken; x, the average of the z's, is not stored. With c this step's
    # weight of z in the average (h.ck) and u = g (SGD) or g / (sqrt(r_hat) + delta) with
    # r <- b2 r + (1 - b2) g*g (AdamW, opt1; c2 = 1 / sqrt(1 - b2^t)), plus wd * y:
    #   z' = z - eps u,  x' = (1 - c) x + c z',  y' = beta x' + (1 - beta) z'
    # which is y' = y + c (z - y) + eps (beta (1 - c) - 1) u, one pass over y, z and g.
    cdef floating lr = <floating>h.lr, wd = <floating>h.wd, eps = <floating>h.eps
    cdef floating c = <floating>h.ck, c2 = <floating>h.c2
    cdef floating ay = <floating>(h.lr * (h.alpha * (1.0 - h.ck) - 1.0))
    cdef floating b2 = <floating>h.beta2, b2c = <floating>(1.0 - h.beta2)
    cdef bint l2 = h.flags & FLAG_L2
    cdef floating gs = <floating>h.gscale, cv = <floating>h.clip
    cdef bint clip = h.flags & FLAG_CLIP
    cdef floating yi, ui, vi, zi
    cdef Py_ssize_t i
    for i in range(n):
        yi = p[i]
        ui = _grad(g[i], gs, cv, clip)
        if opt1 is On:
            vi = b2 * v[i] + b2c * (ui * ui)
            v[i] = vi
            ui = ui / (_sqrt(vi) * c2 + eps)
        ui = _l2(ui, yi, wd, l2, o)
        zi = z[i]
        p[i] = (yi + c * (zi - yi)) + ay * ui
        z[i] = zi - lr * ui


cdef inline floating _lamb_u(floating mi, floating vi, floating pi, floating c1,
                             floating c2, floating eps, floating wd) noexcept nogil:
    # LAMB's direction: s_hat / (sqrt(r_hat) + delta) + wd theta
    return (mi * c1) / (_sqrt(vi) * c2 + eps) + wd * pi


cdef void _lamb_norms(floating* p, const floating* g, floating* m, floating* v,
                      floating* s2, Py_ssize_t n, const Hyper* h, double* acc_t,
                      double* acc_u) noexcept nogil:
    # LAMB's first pass (You et al. 2020, Algorithm 2): s <- b1 s + (1 - b1) g,
    # r <- b2 r + (1 - b2) g*g, and the sums of theta^2 and u^2 (u by QB elements, in a
    # buffer; lanes by the element's index in its row)
    # (Keras: the decoupled decay first, theta * decay, whose norm is then taken)
    cdef floating wd = <floating>h.wd, eps = <floating>h.eps, decay = <floating>h.decay
    cdef floating c1 = <floating>h.c1, c2 = <floating>h.c2
    cdef floating b1 = <floating>h.beta1, b1c = <floating>(1.0 - h.beta1)
    cdef floating b2 = <floating>h.beta2, b2c = <floating>(1.0 - h.beta2)
    cdef floating gs = <floating>h.gscale, cv = <floating>h.clip
    cdef bint clip = h.flags & FLAG_CLIP
    cdef floating buf[QB]
    cdef floating tbuf[QB]
    cdef floating gi, mi, vi, pi
    cdef Py_ssize_t k = 0, i, mm
    while k < n:
        mm = min(QB, n - k)
        for i in range(mm):
            gi = _grad(g[k + i], gs, cv, clip)
            mi = b1 * m[k + i] + b1c * gi
            vi = b2 * v[k + i] + b2c * (gi * gi)
            m[k + i] = mi
            v[k + i] = vi
            pi = p[k + i] * decay
            tbuf[i] = pi
            buf[i] = _lamb_u(mi, vi, pi, c1, c2, eps, wd)
        _sumsq_piece(<floating*>NULL, tbuf, mm, k % SUM_LANES, acc_t)
        _sumsq_piece(<floating*>NULL, buf, mm, k % SUM_LANES, acc_u)
        k += mm


cdef void _lamb(floating* p, const floating* g, floating* m, floating* v, floating* s2,
                Py_ssize_t n, Py_ssize_t tail, const Hyper* h, ops* o) noexcept nogil:
    # LAMB's second pass: theta <- theta - lr u, u from the moments the first pass left;
    # h.lr is this tensor's rate times its trust ratio |theta| / |u|
    cdef floating lr = <floating>h.lr, wd = <floating>h.wd, eps = <floating>h.eps
    cdef floating c1 = <floating>h.c1, c2 = <floating>h.c2, decay = <floating>h.decay
    cdef floating pi
    cdef Py_ssize_t i
    for i in range(n):
        pi = p[i] * decay
        p[i] = pi - lr * _lamb_u(m[i], v[i], pi, c1, c2, eps, wd)


cdef void _lars_norms(floating* p, const floating* g, floating* vel, floating* s1,
                      floating* s2, Py_ssize_t n, const Hyper* h, double* acc_t,
                      double* acc_u) noexcept nogil:
    # LARS's first pass (You et al. 2017): the sums of theta^2 and u^2, u = g + wd theta
    cdef floating wd = <floating>h.wd
    cdef floating gs = <floating>h.gscale, cv = <floating>h.clip
    cdef bint clip = h.flags & FLAG_CLIP
    cdef floating buf[QB]
    cdef Py_ssize_t k = 0, i, mm
    while k < n:
        mm = min(QB, n - k)
        for i in range(mm):
            buf[i] = _grad(g[k + i], gs, cv, clip) + wd * p[k + i]
        _sumsq_piece(<floating*>NULL, p + k, mm, k % SUM_LANES, acc_t)
        _sumsq_piece(<floating*>NULL, buf, mm, k % SUM_LANES, acc_u)
        k += mm


cdef void _lars(floating* p, const floating* g, floating* vel, floating* s1, floating* s2,
                Py_ssize_t n, Py_ssize_t tail, const Hyper* h, ops* o) noexcept nogil:
    # LARS's second pass: the book's momentum (FLAG_L2: u = g + wd theta; Nesterov in the
    # look-ahead form) with h.lr this tensor's rate times its trust ratio
    _momentum(p, g, vel, s1, s2, n, tail, h, o)


cdef void _adadelta(floating* p, const floating* g, floating* eg, floating* ed, floating* s2,
                    Py_ssize_t n, Py_ssize_t tail, const Hyper* h, ops* o) noexcept nogil:
    # E[g^2] <- rho E[g^2] + (1 - rho) g*g
    # d <- sqrt(E[dx^2] + delta) / sqrt(E[g^2] + delta) * g
    # E[dx^2] <- rho E[dx^2] + (1 - rho) d*d;  theta <- theta - lr * d    (Zeiler 2012)
    # Torch: both averages as mul_(rho).addcmul_(x, x, value=1-rho).
    cdef floating lr = <floating>h.lr, wd = <floating>h.wd, eps = <floating>h.eps
    cdef floating decay = <floating>h.decay
    cdef floating rho = <floating>h.rho, rho1 = <floating>(1.0 - h.rho)
    cdef bint l2 = h.flags & FLAG_L2
    cdef floating gs = <floating>h.gscale, cv = <floating>h.clip
    cdef bint clip = h.flags & FLAG_CLIP
    cdef floating pi, gi, egi, di
    cdef Py_ssize_t i
    for i in range(n):
        pi = p[i] * decay
        gi = _l2(_grad(g[i], gs, cv, clip), pi, wd, l2, o)
        if ops is Torch:
            egi = _fma(rho1 * gi, gi, eg[i] * rho)
        else:
            egi = rho * eg[i] + rho1 * (gi * gi)
        eg[i] = egi
        di = _sqrt(ed[i] + eps) / _sqrt(egi + eps) * gi
        if ops is Torch:
            ed[i] = _fma(rho1 * di, di, ed[i] * rho)
        else:
            ed[i] = rho * ed[i] + rho1 * (di * di)
        p[i] = _step(pi, di, lr, o)


# ---------------------------------------------------------------------------------------
# Layer 2: dispatch on rule and dtype, and the table walker.
# ---------------------------------------------------------------------------------------

cdef inline void _span_ptrs(int rule, floating* p, const floating* g, floating* s0,
                            floating* s1, floating* s2, Py_ssize_t n, Py_ssize_t tail,
                            const Hyper* h) noexcept nogil:
    # One rule over n elements: the parameter p, the gradient g, the state arrays s0.. in
    # the order the rule keeps them; ``tail``: where FLAG_TAIL's scalar-loop elements start.
    # Every walker (tables, blocks of compressed storage, sparse rows) dispatches here.
    if h.flags & FLAG_FMA:
        _rule_span(p, g, s0, s1, s2, n, tail, rule, h, <Torch*>NULL)
    else:
        _rule_span(p, g, s0, s1, s2, n, tail, rule, h, <Plain*>NULL)


cdef inline void _span(floating* tag, int rule, const intptr_t* row, Py_ssize_t ncols,
                       Py_ssize_t lo, Py_ssize_t n, Py_ssize_t numel,
                       const Hyper* h) noexcept nogil:
    # ``tag`` only selects the dtype; ``row`` holds the tensor's ``ncols`` column
    # addresses; the span is elements [lo, lo + n) of a tensor of ``numel`` elements.
    cdef floating* p = (<floating*>row[0]) + lo
    cdef const floating* g
    cdef Py_ssize_t tail = n      # where FLAG_TAIL's scalar-loop elements start in the span
    if rule == TRANSFORM:
        _transform(p, n, h)
        return
    g = (<const floating*>row[1]) + lo
    if h.flags & FLAG_TAIL:
        tail = numel - numel % (TAIL_BYTES // sizeof(floating)) - lo
        tail = 0 if tail < 0 else (n if tail > n else tail)
    if rule == TRAFFIC:        # h.flags holds the number of columns
        _traffic(p, g, (<floating*>row[2]) + lo if h.flags > 2 else NULL,
                 (<floating*>row[3]) + lo if h.flags > 3 else NULL,
                 (<floating*>row[4]) + lo if h.flags > 4 else NULL, n)
        return
    _span_ptrs(rule, p, g, (<floating*>row[2]) + lo if ncols > 2 else NULL,
               (<floating*>row[3]) + lo if ncols > 3 else NULL,
               (<floating*>row[4]) + lo if ncols > 4 else NULL, n, tail, h)


cdef void _walk(int rule, bint f64, const intptr_t* table, Py_ssize_t ncols,
                const Py_ssize_t* offsets, Py_ssize_t nrows, Py_ssize_t start,
                Py_ssize_t stop, const Hyper* h, Py_ssize_t hstride) noexcept nogil:
    # Apply ``rule`` to the global element range [start, stop) of the table, row r with
    # the scalars h[r * hstride] (hstride 0: one Hyper for all; 1: one per row).
    cdef Py_ssize_t r, end
    if start >= stop:
        return
    r = _row_of(offsets, nrows, start)
    while start < stop:
        end = offsets[r + 1]
        if end > stop:
            end = stop
        if end > start:
            # (a row whose gradient is row-sparse has no dense gradient: skipped here)
            if table[r * ncols + 1] != 0 or rule == TRANSFORM:
                if f64:
                    _span(<double*>NULL, rule, table + r * ncols, ncols,
                          start - offsets[r], end - start, offsets[r + 1] - offsets[r],
                          h + r * hstride)
                else:
                    _span(<float*>NULL, rule, table + r * ncols, ncols,
                          start - offsets[r], end - start, offsets[r + 1] - offsets[r],
                          h + r * hstride)
            start = end
        r += 1


cdef void _run(int rule, bint f64, const intptr_t* table, Py_ssize_t ncols,
               const Py_ssize_t* offsets, Py_ssize_t nrows, const Hyper* h,
               Py_ssize_t hstride, int n_threads) noexcept nogil:
    cdef Py_ssize_t total = offsets[nrows]
    cdef Py_ssize_t itemsize = 8 if f64 else 4
    cdef Py_ssize_t chunk
    cdef int t
    if n_threads > 1 and total > 16 * n_threads:
        # One contiguous chunk per thread, a multiple of 16 elements (whole cache lines).
        chunk = (total + n_threads - 1) // n_threads
        chunk = (chunk + 15) // 16 * 16
        for t in prange(n_threads, num_threads=n_threads, schedule='static'):
            _walk(rule, f64, table, ncols, offsets, nrows,
                  min(t * chunk, total), min((t + 1) * chunk, total), h, hstride)
    else:
        _walk(rule, f64, table, ncols, offsets, nrows, 0, total, h, hstride)


cdef void _norm_block(int rule, bint f64, const intptr_t* table, Py_ssize_t ncols,
                      const Py_ssize_t* offsets, Py_ssize_t nrows, const Hyper* hs,
                      const Py_ssize_t* bstart, double* sums, Py_ssize_t b) noexcept nogil:
    # Block b of the first pass of a trust-ratio rule: NORM_BLOCK elements of one row from
    # a multiple of NORM_BLOCK, its two sums in sums[2b], sums[2b + 1] (lanes added in order)
    cdef double acc_t[SUM_LANES]
    cdef double acc_u[SUM_LANES]
    cdef double st = 0.0, su = 0.0
    cdef Py_ssize_t r = _row_of(bstart, nrows, b), lo, n, j
    cdef const intptr_t* row = table + r * ncols
    for j in range(SUM_LANES):
        acc_t[j] = 0.0
        acc_u[j] = 0.0
    lo = (b - bstart[r]) * NORM_BLOCK
    n = min(NORM_BLOCK, offsets[r + 1] - offsets[r] - lo)
    if f64:
        _rule_norms((<double*>row[0]) + lo, (<const double*>row[1]) + lo,
                    (<double*>row[2]) + lo if ncols > 2 else NULL,
                    (<double*>row[3]) + lo if ncols > 3 else NULL, <double*>NULL, n, rule,
                    hs + r, acc_t, acc_u)
    else:
        _rule_norms((<float*>row[0]) + lo, (<const float*>row[1]) + lo,
                    (<float*>row[2]) + lo if ncols > 2 else NULL,
                    (<float*>row[3]) + lo if ncols > 3 else NULL, <float*>NULL, n, rule,
                    hs + r, acc_t, acc_u)
    for j in range(SUM_LANES):
        st += acc_t[j]
        su += acc_u[j]
    sums[2 * b] = st
    sums[2 * b + 1] = su


cdef void _norms(int rule, bint f64, const intptr_t* table, Py_ssize_t ncols,
                 const Py_ssize_t* offsets, Py_ssize_t nrows, const Hyper* hs,
                 const Py_ssize_t* bstart, double* sums, int n_threads) noexcept nogil:
    # The first pass of a trust-ratio rule over a table, row r with the scalars hs[r]: its
    # rows cut into blocks of NORM_BLOCK elements (bstart[r]: the first block of row r),
    # each summed alone, so that the sums are the same bits for any number of threads
    cdef Py_ssize_t nb = bstart[nrows], b
    if n_threads > 1 and nb > 1:
        for b in prange(nb, num_threads=n_threads, schedule='static'):
            _norm_block(rule, f64, table, ncols, offsets, nrows, hs, bstart, sums, b)
    else:
        for b in range(nb):
            _norm_block(rule, f64, table, ncols, offsets, nrows, hs, bstart, sums, b)


cdef double _sumsq_block(int efmt, const intptr_t* table, Py_ssize_t ncols, int col,
                         const Py_ssize_t* offsets, Py_ssize_t nrows, Py_ssize_t start,
                         Py_ssize_t stop) noexcept nogil:
    cdef double acc[SUM_LANES]
    cdef double total = 0.0
    cdef Py_ssize_t r, end, j
    for j in range(SUM_LANES):
        acc[j] = 0.0
    r = _row_of(offsets, nrows, start)
    while start < stop:
        end = offsets[r + 1]
        if end > stop:
            end = stop
        if end > start and table[r * ncols + col] == 0:   # a row-sparse gradient
            start = end
        elif end > start:
            if efmt == EL_F64:
                _sumsq_piece(<double*>NULL,
                             (<const double*>table[r * ncols + col]) + (start - offsets[r]),
                             end - start, start % SUM_LANES, acc)
            elif efmt == EL_F32:
                _sumsq_piece(<float*>NULL,
                             (<const float*>table[r * ncols + col]) + (start - offsets[r]),
                             end - start, start % SUM_LANES, acc)
            else:
                _sumsq_piece16((<const uint16_t*>table[r * ncols + col]) + (start - offsets[r]),
                               end - start, start % SUM_LANES, acc,
                               ST_F16 if efmt == EL_F16 else ST_BF16)
            start = end
        r += 1
    for j in range(SUM_LANES):
        total += acc[j]
    return total


cdef double _sumsq(int efmt, const intptr_t* table, Py_ssize_t ncols, int col,
                   const Py_ssize_t* offsets, Py_ssize_t nrows, double* blocks,
                   int n_threads) noexcept nogil:
    # Sum of squares of column ``col``, the same bits for any thread count and any split
    # of the same values into arrays: fixed blocks, each summed alone, added in order.
    cdef Py_ssize_t total = offsets[nrows]
    cdef Py_ssize_t nb = (total + SUM_BLOCK - 1) // SUM_BLOCK
    cdef Py_ssize_t b
    cdef double out = 0.0
    if n_threads > 1 and nb > 1:
        for b in prange(nb, num_threads=n_threads, schedule='static'):
            blocks[b] = _sumsq_block(efmt, table, ncols, col, offsets, nrows,
                                     b * SUM_BLOCK, min((b + 1) * SUM_BLOCK, total))
    else:
        for b in range(nb):
            blocks[b] = _sumsq_block(efmt, table, ncols, col, offsets, nrows,
                                     b * SUM_BLOCK, min((b + 1) * SUM_BLOCK, total))
    for b in range(nb):
        out += blocks[b]
    return out


# ---------------------------------------------------------------------------------------
# The block walker: updates over arrays stored in fewer bits than they are computed in.
# ---------------------------------------------------------------------------------------
#
#
# A table whose parameters are 16-bit (bfloat16, float16) or whose state is compressed
# (bfloat16, 8-bit codes with a scale per block) runs here instead of ``_run``. The walker
# splits the group into blocks of CH8_QBLOCK (256) elements, blocks restarting at each
# tensor (the last one partial), and threads take whole blocks, so that a block of 8-bit
# codes and its scale belong to one thread and the bits do not depend on the thread count.
# For each block, one pass:
#
#   1. decode: every stored column that is not float32 into a float32 buffer on the stack
#      (float32 columns are used in place);
#   2. update: the rule's span function of Layer 1, unchanged, on those float32 values;
#   3. encode: every buffer back into its storage (nearest or stochastic rounding, the
#      block's new scale for 8-bit codes).
#
# Each stored byte is read once and written once; the buffers stay in L1. The random words
# of stochastic rounding hash (the group's per-step key, the element's index in the group),
# see storage.h.


cdef void _block(int rule, const intptr_t* row, const intptr_t* aux, const Codec* c,
                 Py_ssize_t lo, Py_ssize_t n, uint64_t index, const Hyper* h,
                 intptr_t gp) noexcept nogil:
    # One block: elements [lo, lo + n) of one tensor, ``index`` the index of element lo in
    # its group; ``row`` the tensor's column addresses, ``aux`` its extra arrays (master or
    # compensation for column 0, the scales of each 8-bit column); ``gp`` the address of
    # the block's gradient (of format c.gfmt).
    cdef float pb[QB]
    cdef float gb[QB]
    cdef float sb[3][QB]
    cdef uint32_t w[QB]
    cdef float* P
    cdef const float* G
    cdef float* S[3]
    cdef uint16_t* p16 = NULL
    cdef uint16_t* comp = NULL
    cdef float* master
    cdef uint16_t hi
    cdef Py_ssize_t i, k, blk = lo // QB
    cdef int fmt
    cdef uint32_t i0 = <uint32_t>index, u
    if c.random:
        for u in range(<uint32_t>n):      # 32-bit lanes: the index wraps modulo 2^32
            w[u] = ch8_word(c.key, i0 + u)
    if rule == TRANSFORM:                 # a standalone clip of a 16-bit array
        p16 = (<uint16_t*>row[0]) + lo
        _decode16(p16, pb, n, c.pfmt)
        _transform(pb, n, h)
        _encode16(pb, p16, n, c.pfmt)
        return
    # the parameter
    if c.keep == KEEP_NONE:
        P = (<float*>row[0]) + lo
    else:
        p16 = (<uint16_t*>row[0]) + lo
        if c.keep == KEEP_MASTER:
            master = (<float*>aux[0]) + lo
            # An edit of the 16-bit array takes effect: where it no longer holds the
            # rounding of the master copy, the master copy takes its value.
            _decode16(p16, pb, n, c.pfmt)
            if c.pfmt == ST_F16:
                for i in range(n):
                    master[i] = ch8_u2f(ch8_sel(p16[i] != ch8_f16_rne(master[i]),
                                                ch8_f2u(pb[i]), ch8_f2u(master[i])))
            else:
                for i in range(n):
                    master[i] = ch8_u2f(ch8_sel(p16[i] != ch8_bf16_rne(master[i]),
                                                ch8_f2u(pb[i]), ch8_f2u(master[i])))
            P = master
        else:
            _decode16(p16, pb, n, c.pfmt)
            if c.keep == KEEP_KAHAN:
                comp = (<uint16_t*>aux[0]) + lo
                for i in range(n):
                    pb[i] = pb[i] + ch8_bf16_to_f32(comp[i])
            P = pb
    # the gradient
    if c.gfmt == ST_F32:
        G = <const float*>gp
    else:
        _decode16(<const uint16_t*>gp, gb, n, c.gfmt)
        G = gb
    # the state
    for k in range(3):
        S[k] = NULL
    for k in range(c.nstate):
        fmt = c.sfmt[k]
        if fmt == ST_F32:
            S[k] = (<float*>row[2 + k]) + lo
        elif _is_q8(fmt):
            _decode_q8((<const uint8_t*>row[2 + k]) + lo, (<float*>aux[2 + k])[blk], sb[k], n,
                       fmt)
            S[k] = sb[k]
        else:
            _decode16((<const uint16_t*>row[2 + k]) + lo, sb[k], n, ST_BF16)
            S[k] = sb[k]
    _span_ptrs(rule, P, G, S[0], S[1], S[2], n, n, h)
    # encode the parameter
    if c.keep == KEEP_MASTER:
        _encode16(P, p16, n, c.pfmt)
    elif c.keep == KEEP_STOCHASTIC:
        if c.pfmt == ST_F16:
            for i in range(n):
                p16[i] = ch8_f16_sr(pb[i], w[i] & 0xffffu)
        else:
            for i in range(n):
                p16[i] = ch8_bf16_sr(pb[i], w[i] & 0xffffu)
    elif c.keep == KEEP_KAHAN:
        # theta = hi + lo: hi the 16-bit rounding of theta (saturating at the largest
        # finite value), lo (bfloat16) what it missed
        if c.pfmt == ST_F16:
            for i in range(n):
                hi = ch8_f16_rne_sat(pb[i])
                p16[i] = hi
                comp[i] = ch8_bf16_rne(pb[i] - ch8_f16_to_f32(hi))
        else:
            for i in range(n):
                hi = ch8_bf16_rne_sat(pb[i])
                p16[i] = hi
                comp[i] = ch8_bf16_rne(pb[i] - ch8_bf16_to_f32(hi))
    # encode the state
    for k in range(c.nstate):
        fmt = c.sfmt[k]
        if fmt == ST_F32:
            continue
        if _is_q8(fmt):
            _encode_q8(sb[k], (<uint8_t*>row[2 + k]) + lo, (<float*>aux[2 + k]) + blk, n, fmt,
                       w)
        elif fmt == ST_BF16_SR:
            for i in range(n):
                (<uint16_t*>row[2 + k])[lo + i] = ch8_bf16_sr(sb[k][i], w[i] >> 16)
        else:
            _encode16(sb[k], (<uint16_t*>row[2 + k]) + lo, n, ST_BF16)


cdef void _walk_blocks(int rule, const intptr_t* table, const intptr_t* aux, Py_ssize_t ncols,
                       const Py_ssize_t* offsets, const Py_ssize_t* voff,
                       const Py_ssize_t* base, Py_ssize_t nrows, Py_ssize_t start,
                       Py_ssize_t stop, const Codec* c, const Hyper* h) noexcept nogil:
    # The blocks of the virtual range [start, stop): row r occupies [voff[r], voff[r+1]),
    # its size rounded up to whole blocks; start and stop are multiples of QB.
    cdef Py_ssize_t r, lo, hi, size, b
    cdef Py_ssize_t gsize = 4 if c.gfmt == ST_F32 else 2
    if start >= stop:
        return
    r = _row_of(voff, nrows, start)
    while start < stop and r < nrows:
        size = offsets[r + 1] - offsets[r]
        lo = start - voff[r]
        hi = min(stop - voff[r], size)
        b = lo
        if table[r * ncols + 1] == 0 and rule != TRANSFORM:   # a row-sparse gradient
            b = hi
        while b < hi:
            _block(rule, table + r * ncols, aux + r * ncols, c, b, min(QB, hi - b),
                   <uint64_t>(base[r] + b), h, table[r * ncols + 1] + b * gsize)
            b += QB
        start = voff[r + 1]
        r += 1


cdef void _run_blocks(int rule, const intptr_t* table, const intptr_t* aux, Py_ssize_t ncols,
                      const Py_ssize_t* offsets, const Py_ssize_t* voff,
                      const Py_ssize_t* base, Py_ssize_t nrows, const Codec* c,
                      const Hyper* h, int n_threads) noexcept nogil:
    cdef Py_ssize_t total = voff[nrows], chunk
    cdef int t
    if n_threads > 1 and total > QB:
        chunk = (total + n_threads - 1) // n_threads
        chunk = (chunk + QB - 1) // QB * QB          # whole blocks per thread
        for t in prange(n_threads, num_threads=n_threads, schedule='static'):
            _walk_blocks(rule, table, aux, ncols, offsets, voff, base, nrows,
                         min(t * chunk, total), min((t + 1) * chunk, total), c, h)
    else:
        _walk_blocks(rule, table, aux, ncols, offsets, voff, base, nrows, 0, total, c, h)


cdef void _sumsq_piece16(const uint16_t* x, Py_ssize_t n, Py_ssize_t lane, double* acc,
                         int fmt) noexcept nogil:
    # as _sumsq_piece, of 16-bit values decoded exactly to float32 first
    cdef float buf[QB]
    cdef Py_ssize_t k = 0, m
    while k < n:
        m = min(QB, n - k)
        _decode16(x + k, buf, m, fmt)
        _sumsq_piece(<float*>NULL, buf, m, (lane + k) % SUM_LANES, acc)
        k += m


# ---------------------------------------------------------------------------------------
# Row walks: row-sparse gradients, catch-up, row-wise AdaGrad
# ---------------------------------------------------------------------------------------
# Row-sparse updates (ch8fast.sparse): the gradient of an embedding table for a minibatch
# holds a few of its rows. The rows are deduplicated once (duplicates summed in an order
# that does not depend on theirs), then one pass updates only those rows of the parameter
# and of its state, threads taking whole rows, with the same span functions as a dense
# update. Row-wise AdaGrad (one accumulator per row) runs here for dense gradients too.
#
# ``catch_up``: a row touched after dt skipped steps first gets, in closed form, what those
# steps would have done with a zero gradient (``_catch_up``); ``last_step[r]`` holds the step
# of row r's last update, ``dense_step`` that of the last update of every row.


cdef extern from *:
    """
    #if defined(__GNUC__) || defined(__clang__)
      /* The empty asm keeps a loop of prefetches: GCC deletes a loop whose only effect
         is __builtin_prefetch. */
      #define CH8_PREFETCH_W(p) do { __builtin_prefetch((const void*)(p), 1, 3); \
                                     __asm__ __volatile__("" : : "r"(p)); } while (0)
    #elif defined(_MSC_VER) && (defined(_M_X64) || defined(_M_IX86))
      #include <xmmintrin.h>
      #define CH8_PREFETCH_W(p) _mm_prefetch((const char*)(p), _MM_HINT_T0)
    #else
      #define CH8_PREFETCH_W(p) ((void)0)
    #endif
    """
    void CH8_PREFETCH_W(const void* p) nogil

cdef enum:
    PREFETCH_ROWS = 8     # rows ahead: the touched rows lie anywhere in the table, where
                          # no hardware prefetcher looks; without it each row waits on DRAM


cdef inline void _decay(floating* x, Py_ssize_t n, floating f) noexcept nogil:
    # x <- f x: dt steps of a zero gradient on a decaying state column (f = scalar^dt)
    cdef Py_ssize_t i
    for i in range(n):
        x[i] = x[i] * f


cdef inline void _drift(floating* p, floating* v, Py_ssize_t n, double dt,
                        double a) noexcept nogil:
    # dt steps of a zero gradient on a velocity: theta moves by
    # sum_{k=1..dt} alpha^k v = v alpha (1 - alpha^dt) / (1 - alpha), and v <- alpha^dt v
    cdef floating an = <floating>pow(a, dt)
    cdef floating drift = (<floating>(a * (1.0 - pow(a, dt)) / (1.0 - a)) if a < 1.0
                           else <floating>dt)
    cdef Py_ssize_t i
    for i in range(n):
        p[i] = p[i] + drift * v[i]
        v[i] = v[i] * an


include "dispatch.pxi"


# ---------------------------------------------------------------------------------------
# Duplicate rows of a row-sparse gradient, summed: each element's contributions in
# ascending order, added in double from the smallest, rounded once to the values' dtype.
# ---------------------------------------------------------------------------------------

cdef inline uint64_t _order_key(double x) noexcept nogil:
    # the bits of x, mapped so that unsigned order is the order of the values (negative:
    # every bit flipped; positive: the sign bit set)
    cdef uint64_t u
    memcpy(&u, &x, 8)
    return ~u if u >> 63 else u | (<uint64_t>1 << 63)


cdef inline double _from_key(uint64_t k) noexcept nogil:
    cdef uint64_t u = (k & ~(<uint64_t>1 << 63)) if k >> 63 else ~k
    cdef double x
    memcpy(&x, &u, 8)
    return x


cdef double _sorted_sum(uint64_t* a, uint64_t* b, Py_ssize_t m) noexcept nogil:
    # The sum of the m values whose order keys are in a, added in double from the smallest
    # (b: scratch of m keys). LSD radix sort, a byte a pass; a pass whose byte is the same
    # for every key is skipped (values widened from float32 share their low 29 bits).
    cdef Py_ssize_t count[256]
    cdef Py_ssize_t i, c, s
    cdef int shift
    cdef uint64_t* t
    cdef double x = 0.0
    for shift in range(0, 64, 8):
        for c in range(256):
            count[c] = 0
        for i in range(m):
            count[(a[i] >> shift) & 0xff] += 1
        if count[(a[0] >> shift) & 0xff] == m:
            continue
        s = 0
        for c in range(256):
            s, count[c] = s + count[c], s
        for i in range(m):
            c = (a[i] >> shift) & 0xff
            b[count[c]] = a[i]
            count[c] += 1
        t = a
        a = b
        b = t
    for i in range(m):
        x += _from_key(a[i])
    return x


cdef void _sum_rows(floating* tag, const floating* vals, floating* out, Py_ssize_t d,
                    int64_t first, const int64_t* nxt, Py_ssize_t m, uint64_t* keys,
                    double* acc, uint32_t* lo, uint32_t* hi) noexcept nogil:
    # The rows first, nxt[first], ... (m of them) summed (see above); keys: scratch of 2 m.
    # One pass adds each element in double and keeps the largest and the smallest nonzero
    # magnitude of its contributions (on the bit patterns); where their exponents are
    # within 29 - bitlen(m) binades (float32 values), every partial sum in any order is
    # exact in double, so that sum is the sorted one. Only the other elements (float64
    # values, wide ranges, NaN or Inf) are sorted.
    cdef Py_ssize_t col, k
    cdef int64_t pos, ahead
    cdef const floating* row
    cdef uint32_t a, e_hi, e_lo
    cdef int32_t limit = 29, mm = <int32_t>m
    if floating is float:
        while mm > 0:
            limit -= 1
            mm >>= 1
        for col in range(d):
            acc[col] = 0.0
            lo[col] = 0x7fffffffu
            hi[col] = 0
        # the rows of the chain lie anywhere in the batch: fetch each PREFETCH_ROWS links
        # ahead of its turn (the chain itself, nxt, is small and stays in cache)
        ahead = first
        for k in range(PREFETCH_ROWS):
            if ahead >= 0:
                ahead = nxt[ahead]
        pos = first
        while pos >= 0:
            row = vals + pos * d
            if ahead >= 0:
                CH8_PREFETCH_W(vals + ahead * d)
                CH8_PREFETCH_W(vals + ahead * d + d - 1)
                ahead = nxt[ahead]
            for col in range(d):
                a = ch8_f2u(<float>row[col]) & 0x7fffffffu
                acc[col] += <double>row[col]
                hi[col] = a if a > hi[col] else hi[col]
                a = a if a != 0 else 0x7fffffffu              # a zero adds nothing
                lo[col] = a if a < lo[col] else lo[col]
            pos = nxt[pos]
    for col in range(d):
        if floating is float:
            e_hi = hi[col] >> 23
            e_lo = lo[col] >> 23
            e_lo = e_lo if e_lo else 1        # a subnormal's unit is that of exponent 1
            if e_hi < 255 and (lo[col] == 0x7fffffffu or <int32_t>(e_hi - e_lo) <= limit):
                out[col] = <floating>acc[col]
                continue
        pos = first
        k = 0
        while pos >= 0:
            keys[k] = _order_key(<double>vals[pos * d + col])
            k += 1
            pos = nxt[pos]
        out[col] = <floating>_sorted_sum(keys, keys + m, m)


cdef void _sum_rows_any(bint f64, const void* vals, void* out, Py_ssize_t d, int64_t first,
                        const int64_t* nxt, Py_ssize_t m, uint64_t* keys, double* acc,
                        uint32_t* lo, uint32_t* hi) noexcept nogil:
    if f64:
        _sum_rows(<double*>NULL, <const double*>vals, <double*>out, d, first, nxt, m, keys,
                  acc, lo, hi)
    else:
        _sum_rows(<float*>NULL, <const float*>vals, <float*>out, d, first, nxt, m, keys,
                  acc, lo, hi)


cdef inline void _rowwise(floating* p, const floating* g, floating* r, Py_ssize_t n,
                          const Hyper* h) noexcept nogil:
    # row-wise AdaGrad (above) in the step's operation sequence
    if h.flags & FLAG_FMA:
        _adagrad_rowwise(p, g, r, n, h, <Torch*>NULL)
    else:
        _adagrad_rowwise(p, g, r, n, h, <Plain*>NULL)


cdef void _row(int rule, bint f64, const intptr_t* row, const intptr_t* aux, Py_ssize_t ncols,
               const Codec* c, bint coded, bint rowwise, Py_ssize_t d, int64_t r,
               intptr_t g, double dt, uint64_t index, const Hyper* h) noexcept nogil:
    # Row r of one tensor: its d elements, the gradient row at g.
    cdef Py_ssize_t lo = r * d, b
    cdef Py_ssize_t gsize = 4 if c.gfmt == ST_F32 else 8
    if coded:
        # through the block codec, in pieces of at most one block (its buffers' size);
        # each element keeps its index in the group, so its random words are the dense
        # step's
        b = 0
        while b < d:
            _block(rule, row, aux, c, lo + b, min(QB, d - b), index + <uint64_t>(lo + b),
                   h, g + b * gsize)
            b += QB
        return
    if f64:
        if dt > 0:
            _catch_up(rule, (<double*>row[0]) + lo,
                      (<double*>row[2]) + lo if ncols > 2 else NULL,
                      (<double*>row[3]) + lo if ncols > 3 else NULL,
                      (<double*>row[4]) + lo if ncols > 4 else NULL, d, dt, h)
        if rowwise:
            _rowwise((<double*>row[0]) + lo, <const double*>g, (<double*>row[2]) + r, d, h)
        else:
            _span_ptrs(rule, (<double*>row[0]) + lo, <const double*>g,
                       (<double*>row[2]) + lo if ncols > 2 else NULL,
                       (<double*>row[3]) + lo if ncols > 3 else NULL,
                       (<double*>row[4]) + lo if ncols > 4 else NULL, d, d, h)
    else:
        if dt > 0:
            _catch_up(rule, (<float*>row[0]) + lo,
                      (<float*>row[2]) + lo if ncols > 2 else NULL,
                      (<float*>row[3]) + lo if ncols > 3 else NULL,
                      (<float*>row[4]) + lo if ncols > 4 else NULL, d, dt, h)
        if rowwise:
            _rowwise((<float*>row[0]) + lo, <const float*>g, (<float*>row[2]) + r, d, h)
        else:
            _span_ptrs(rule, (<float*>row[0]) + lo, <const float*>g,
                       (<float*>row[2]) + lo if ncols > 2 else NULL,
                       (<float*>row[3]) + lo if ncols > 3 else NULL,
                       (<float*>row[4]) + lo if ncols > 4 else NULL, d, d, h)


cdef inline void _prefetch_row(const intptr_t* row, Py_ssize_t ncols, bint rowwise,
                               Py_ssize_t itemsize, Py_ssize_t d, int64_t r) noexcept nogil:
    # Prefetch (for writing) row r of the parameter and of each state column (column 1 is
    # the gradient, read from the compact row block). A prefetch never faults.
    cdef Py_ssize_t k, b, nb = d * itemsize
    cdef const char* base
    for k in range(ncols):
        if k == 1:
            continue
        if rowwise and k == 2:
            CH8_PREFETCH_W((<const char*>row[2]) + r * itemsize)
            continue
        base = (<const char*>row[k]) + r * nb
        b = 0
        while b < nb:
            CH8_PREFETCH_W(base + b)
            b += 64


cdef void _run_rows(int rule, bint f64, const intptr_t* row, const intptr_t* aux,
                    Py_ssize_t ncols, const Codec* c, bint coded, bint rowwise,
                    Py_ssize_t d, Py_ssize_t nrows, const int64_t* urows,
                    const intptr_t* gptr, intptr_t gdense, Py_ssize_t gsize, Py_ssize_t u,
                    int64_t* last, int64_t* dense_step, int64_t t, uint64_t index,
                    const Hyper* h, int n_threads) noexcept nogil:
    # The rows urows[0..u) with gradient rows gptr[j]; or, with urows NULL, every row r,
    # its gradient row at gdense + r d gsize. ``last`` (catch_up) is NULL without catch-up.
    cdef Py_ssize_t j, n = nrows if urows == NULL else u
    cdef int64_t r, seen
    cdef double dt
    cdef int nt = n_threads if n > 1 else 1
    for j in prange(n, num_threads=nt, schedule='static'):
        r = j if urows == NULL else urows[j]
        if urows != NULL and not coded and j + PREFETCH_ROWS < n:
            _prefetch_row(row, ncols, rowwise, 8 if f64 else 4, d, urows[j + PREFETCH_ROWS])
        dt = 0
        if last != NULL:
            seen = last[r] if last[r] > dense_step[0] else dense_step[0]
            dt = <double>(t - 1 - seen)
        _row(rule, f64, row, aux, ncols, c, coded, rowwise, d, r,
             gdense + r * d * gsize if urows == NULL else gptr[j], dt, index, h)
        if last != NULL:
            last[r] = t


cdef Loops _LOOPS
_LOOPS.size = sizeof(Loops)
_LOOPS.run = _run
_LOOPS.run_blocks = _run_blocks
_LOOPS.run_rows = _run_rows
_LOOPS.sumsq = _sumsq
_LOOPS.norms = _norms
_LOOPS.sum_rows = _sum_rows_any

LOOPS = PyCapsule_New(<void*>&_LOOPS, "ch8fast.Loops", NULL)
