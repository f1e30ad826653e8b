"""The fused update kernels of ch8fast.

Three layers, from the inside out:

1. Span functions (``_sgd``, ``_adam``, ...): the per-element math of one update rule over
   one contiguous run of ``n`` elements of one tensor, on raw pointers, ``noexcept nogil``.
   Each is a single pass that reads the gradient and the state once, and writes the
   parameter and the state once, in place. The math runs in the array's dtype; the per-step
   scalars arrive in a ``Hyper`` struct computed by Python in double precision and are
   rounded once to the dtype. Every rule sees the gradient through ``_grad`` (scale for
   clipping by norm, then clamp for clipping by value): the one code path of the gradient
   transformations, which the standalone clipping functions run too (``_transform``).

2. One walker, ``_run``: a parameter group is a *table* with one row per tensor
   (the addresses of param, grad and state arrays) and cumulative element offsets. The
   walker splits the group's total element count into one contiguous chunk per thread
   (OpenMP ``prange``, static) and calls the span function on each piece of tensor that a
   chunk covers. Many small tensors thus cost one call and one thread team, and the
   arithmetic of every element does not depend on the split, so results are bitwise the
   same for any number of threads.

3. The Python-visible types, all checking with the GIL held before any kernel runs:
   ``Scalars`` (a rule's per-step scalars, set by name), ``GradPlan`` (the gradient
   transformation of a step, by name), ``Table`` (the arrays of one group and dtype: it
   keeps a reference to every array whose address it holds, and checks the gradients and
   the parameters at every step), ``Engine`` (an optimizer's tables and step counters: one
   call binds every gradient, checks every scalar against its dtype, runs every table and
   counts the step, so that an interrupt sees the step whole or not at all) and ``apply``
   (one rule on caller-owned arrays, for ``ch8fast.functional``).

Nothing inside layers 1-2 allocates, checks, or touches a Python object.
"""

cimport cython
from cython cimport floating
from cython.parallel cimport prange
from libc.stdint cimport intptr_t, uintptr_t
from libc.math cimport sqrt, sqrtf, fma, fmaf, isfinite, fabs, pow, INFINITY, NAN

cimport numpy as cnp
from cpython.mem cimport PyMem_Malloc, PyMem_Free
import sys

import numpy as np

cnp.import_array()

cdef extern from "omp.h" nogil:
    int omp_get_max_threads()
    void omp_set_num_threads(int)

cdef extern from *:
    """
    #if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    static int ch8_cpu_has(int which) {
        __builtin_cpu_init();
        if (which == 1) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
        if (which == 2) return __builtin_cpu_supports("avx512f");
        return 1;
    }
    #else
    static int ch8_cpu_has(int which) { return which == 0; }
    #endif
    """
    int ch8_cpu_has(int which)


def cpu_supports(isa):
    """Whether this CPU (and OS) runs code built for ``isa``: "baseline", "avx2" (which
    is built with FMA too, and needs it) or "avx512"."""
    return bool(ch8_cpu_has({"baseline": 0, "avx2": 1, "avx512": 2}[isa]))


# ---------------------------------------------------------------------------------------
# Rules and their per-step scalars
# ---------------------------------------------------------------------------------------

# Operation codes. The rules first, with the number of table columns each uses (param,
# grad, then state); then the two operations that are not rules.
cdef enum:
    SGD = 0               # p, g                                 (Alg 8.1)
    MOMENTUM = 1          # p, g, v       (8.15-8.16; shifted Nesterov with FLAG_NESTEROV)
    ADAGRAD = 2           # p, g, r                              (Alg 8.4)
    RMSPROP = 3           # p, g, r[, gbar with FLAG_CENTERED]   (Alg 8.5)
    RMSPROP_MOMENTUM = 4  # p, g, r, v[, gbar]  (Alg 8.6 with FLAG_NESTEROV)
    ADAM = 5              # p, g, m, v[, vmax with FLAG_AMSGRAD] (Alg 8.7)
    ADADELTA = 6          # p, g, Eg2, Edx2                      (Zeiler 2012)
    N_RULES = 7

    TRANSFORM = 7         # x <- clamp(gscale * x), on column 0: the standalone clipping
    TRAFFIC = 8           # no update: the memory traffic of a rule with h.flags columns

# Flags of a step. The first four are the book's options; the others select another
# library's formulas (the formula profiles of ch8fast.rules).
cdef enum:
    FLAG_L2 = 1           # add weight_decay * p to the gradient first
    FLAG_NESTEROV = 2     # shifted Nesterov form: the arrays hold the interim point
    FLAG_AMSGRAD = 4      # Adam: divide by the running maximum of v
    FLAG_CLIP = 8         # clamp each (scaled) gradient element to [-clip, clip]
    FLAG_FMA = 16         # torch's operation sequence, with its fused multiply-adds
    FLAG_TAIL = 32        # torch's fused kernels: the last numel % lanes elements of each
                          # tensor take the scalar loop's contraction (with FLAG_FMA)
    FLAG_BUFFER = 64      # SGD: momentum buffer b <- mu b + (1 - dampening) g, theta -=
                          # eps b (eps outside the buffer) instead of the velocity v; with
                          # FLAG_NESTEROV theta -= eps (g + mu b). (RMSProp: with FLAG_FMA)
    FLAG_FIRST = 128      # with FLAG_BUFFER: the first step sets b <- g
    FLAG_EPS_INSIDE = 256 # delta inside the square root: sqrt(r + delta), else outside
    FLAG_CENTERED = 512   # RMSProp: divide by sqrt(r - gbar^2), gbar the average gradient

cdef enum:
    SUM_BLOCK = 4096      # sums of squares: fixed blocks of the concatenated elements,
    SUM_LANES = 16        # each summed in 16 lanes by global index, blocks added in order

cdef enum:
    TAIL_BYTES = 32       # the vectors of torch's fused CPU kernels (AVX2 Vectorized<T>):
                          # the last numel % (32 / itemsize) elements of a tensor take the
                          # scalar loop (FLAG_TAIL)

RULES = {"sgd": SGD, "momentum": MOMENTUM, "adagrad": ADAGRAD, "rmsprop": RMSPROP,
         "rmsprop_momentum": RMSPROP_MOMENTUM, "adam": ADAM, "adadelta": ADADELTA}
_RULE_NAMES = {code: name for name, code in RULES.items()}
cdef Py_ssize_t[N_RULES] RULE_COLUMNS = [2, 3, 3, 3, 4, 4, 4]

cdef struct Hyper:
    double lr           # step size (Adam: lr / (1 - beta1^t), see Scalars.fill)
    double wd           # L2 coefficient, used with FLAG_L2
    double decay        # decoupled decay factor applied to p first (1 - lr * wd), else 1
    double alpha        # momentum of this step
    double alpha_next   # momentum of the next step: places the next interim point
    double alpha_prev   # momentum the arrays' interim point was placed with
    double damp         # FLAG_BUFFER: 1 - dampening, the weight of g in the buffer
    double rho          # decay of the squared-gradient average (RMSProp, AdaDelta)
    double beta1
    double beta2
    double c2           # Adam: 1 / sqrt(1 - beta2^t) (a factor); with FLAG_FMA
                        # sqrt(1 - beta2^t) (a divisor, as torch)
    double eps
    double gscale       # every gradient is first multiplied by this (clipping by norm;
                        # negative to maximize)
    double clip         # then clamped to [-clip, clip] with FLAG_CLIP
    int flags


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


cdef void _sgd(floating* p, const floating* g, Py_ssize_t n, const Hyper* h,
               ops* o) noexcept nogil:
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


cdef void _momentum(floating* p, const floating* g, floating* v, Py_ssize_t n,
                    Py_ssize_t tail, const Hyper* h, ops* o) noexcept nogil:
    # v <- alpha v - eps g (8.15);  theta <- theta + v (8.16).
    # Shifted Nesterov (spec section 3): the array holds phi = theta + alpha_prev v, and
    # phi' = phi - alpha_prev v + (1 + alpha') v', alpha' being the next step's momentum
    # (alpha_prev is this step's momentum, unless the user changed it by hand).
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


cdef void _adagrad(floating* p, const floating* g, floating* r, Py_ssize_t n,
                   const Hyper* h, ops* o) noexcept nogil:
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


cdef void _rmsprop(floating* p, const floating* g, floating* r, floating* ga, Py_ssize_t n,
                   const Hyper* h, ops* o) noexcept nogil:
    # r <- rho r + (1 - rho) g*g;  theta <- theta - eps / sqrt(delta + r) * g   (Alg 8.5)
    # (delta outside the root without FLAG_EPS_INSIDE; r - gbar^2 with FLAG_CENTERED)
    if h.flags & FLAG_CENTERED:
        _rmsprop_loop(p, g, r, ga, n, h, <On*>NULL, o)
    else:
        _rmsprop_loop(p, g, r, ga, n, h, <Off*>NULL, o)


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
                            floating* ga, Py_ssize_t n, const Hyper* h,
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
        _rmsprop_momentum_loop(p, g, r, v, ga, n, h, <Off*>NULL, <On*>NULL, o)
    else:
        _rmsprop_momentum_loop(p, g, r, v, ga, n, h, <Off*>NULL, <Off*>NULL, o)


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
        _adam_loop(p, g, m, v, vmax, tail, h, <Off*>NULL, <Off*>NULL, o)
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


cdef void _adadelta(floating* p, const floating* g, floating* eg, floating* ed,
                    Py_ssize_t n, const Hyper* h, ops* o) noexcept nogil:
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


cdef inline void _rule_span(floating* p, const floating* g, floating* s0, floating* s1,
                            floating* s2, Py_ssize_t n, Py_ssize_t tail, int rule,
                            const Hyper* h, ops* o) noexcept nogil:
    cdef bint centered = h.flags & FLAG_CENTERED
    if rule == SGD:
        _sgd(p, g, n, h, o)
    elif rule == MOMENTUM:
        _momentum(p, g, s0, n, tail, h, o)
    elif rule == ADAGRAD:
        _adagrad(p, g, s0, n, h, o)
    elif rule == RMSPROP:
        _rmsprop(p, g, s0, s1 if centered else NULL, n, h, o)
    elif rule == RMSPROP_MOMENTUM:
        _rmsprop_momentum(p, g, s0, s1, s2 if centered else NULL, n, h, o)
    elif rule == ADAM:
        _adam(p, g, s0, s1, s2 if h.flags & FLAG_AMSGRAD else NULL, n, tail, h, o)
    elif rule == ADADELTA:
        _adadelta(p, g, s0, s1, n, h, o)


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


cdef inline Py_ssize_t _row_of(const Py_ssize_t* offsets, Py_ssize_t nrows,
                               Py_ssize_t pos) noexcept nogil:
    # The last row r with offsets[r] <= pos (binary search; offsets[0] == 0).
    cdef Py_ssize_t lo = 0, hi = nrows - 1, mid
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if offsets[mid] <= pos:
            lo = mid
        else:
            hi = mid - 1
    return lo


cdef void _walk(int rule, bint f64, const intptr_t* table, Py_ssize_t ncols,
                const Py_ssize_t* offsets, Py_ssize_t nrows, Py_ssize_t start,
                Py_ssize_t stop, const Hyper* h) noexcept nogil:
    # Apply ``rule`` to the global element range [start, stop) of the table.
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
                          start - offsets[r], end - start, offsets[r + 1] - offsets[r], h)
                else:
                    _span(<float*>NULL, rule, table + r * ncols, ncols,
                          start - offsets[r], end - start, offsets[r + 1] - offsets[r], h)
            start = end
        r += 1


# A call that moves fewer bytes than this (reads plus writes) runs on one thread: waking a
# thread team costs a few microseconds, more than it saves on less work. Measured with
# bench/cutoff.py on 2 cores: threads start to pay at about 224 KiB of traffic for Adam
# float32 (8k elements), 320 KiB for momentum float64 and 384 KiB for SGD float32.
cdef Py_ssize_t _parallel_min_bytes = 262144
cdef int _num_threads = 0        # 0: follow OpenMP (OMP_NUM_THREADS, threadpoolctl)


cdef void _run(int rule, bint f64, const intptr_t* table, Py_ssize_t ncols,
               const Py_ssize_t* offsets, Py_ssize_t nrows, const Hyper* h,
               int n_threads) noexcept nogil:
    cdef Py_ssize_t total = offsets[nrows]
    cdef Py_ssize_t itemsize = 8 if f64 else 4
    cdef Py_ssize_t chunk
    cdef int t
    # every column is read and all but the gradient written: 2 * ncols - 1 streams
    if n_threads > 1 and total * itemsize * (2 * ncols - 1) >= _parallel_min_bytes:
        # One contiguous chunk per thread, a multiple of 16 elements (whole cache lines).
        chunk = (total + n_threads - 1) // n_threads
        chunk = (chunk + 15) // 16 * 16
        for t in prange(n_threads, num_threads=n_threads, schedule='static'):
            _walk(rule, f64, table, ncols, offsets, nrows,
                  min(t * chunk, total), min((t + 1) * chunk, total), h)
    else:
        _walk(rule, f64, table, ncols, offsets, nrows, 0, total, h)


cdef void _sumsq_piece(floating* tag, const floating* x, Py_ssize_t n, Py_ssize_t lane,
                       double* acc) noexcept nogil:
    # Add x[k]^2 to lane (lane + k) % SUM_LANES, in double precision: the lane of an element
    # depends only on its global index, so the result does not depend on how the elements
    # are split into arrays.
    cdef Py_ssize_t k = 0, j
    cdef double xi
    while k < n and (lane + k) % SUM_LANES != 0:
        xi = x[k]
        acc[(lane + k) % SUM_LANES] += xi * xi
        k += 1
    while k + SUM_LANES <= n:
        for j in range(SUM_LANES):
            xi = x[k + j]
            acc[j] += xi * xi
        k += SUM_LANES
    while k < n:
        xi = x[k]
        acc[(lane + k) % SUM_LANES] += xi * xi
        k += 1


include "codec.pxi"
include "sparse.pxi"


cdef enum:                # how the elements of a summed column are stored
    EL_F32 = 0
    EL_F64 = 1
    EL_BF16 = 2
    EL_F16 = 3


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
    cdef Py_ssize_t itemsize = 8 if efmt == EL_F64 else (4 if efmt == EL_F32 else 2)
    if n_threads > 1 and total * itemsize >= _parallel_min_bytes:
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


cdef inline int _threads() noexcept nogil:
    if _num_threads > 0:
        return _num_threads
    return omp_get_max_threads()


def set_num_threads(int n):
    """Use ``n`` threads in the kernels (``n <= 0``: follow OpenMP's setting again)."""
    global _num_threads
    _num_threads = n if n > 0 else 0


def get_num_threads():
    """The number of threads the kernels use for a large enough group."""
    return _threads()


def set_parallel_min_bytes(Py_ssize_t nbytes):
    """A kernel call that moves fewer than ``nbytes`` (reads plus writes) runs on one
    thread."""
    global _parallel_min_bytes
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    _parallel_min_bytes = nbytes


def get_parallel_min_bytes():
    return _parallel_min_bytes


# ---------------------------------------------------------------------------------------
# Layer 3: the Python-visible types. Everything is checked here, with the GIL held,
# before any kernel runs.
# ---------------------------------------------------------------------------------------

from numpy.ma import MaskedArray

cdef double FLOAT32_MAX = 3.4028234663852886e38

cdef enum:
    _WANT_FLAGS = cnp.NPY_ARRAY_C_CONTIGUOUS | cnp.NPY_ARRAY_ALIGNED | cnp.NPY_ARRAY_WRITEABLE


cdef class Scalars:
    """The per-step scalars of one rule, set by name (``s.lr = 0.1``), in double precision.

    ``rule`` is the rule's name (``"adam"``, see ``RULES``); the kernel reads every field
    of this object, by name, at every step. A field a rule does not use is ignored by it.
    The boolean fields after ``bias_correction`` select another library's formulas (the
    formula profiles of ``ch8fast.rules``); all false is the book's.
    """
    cdef int code
    cdef public double lr          # step size (for Adam: lr / (1 - beta1^t))
    cdef public double wd          # L2 coefficient, used when ``l2``
    cdef public double decay       # decoupled decay factor applied to p first, else 1
    cdef public double alpha       # momentum of this step
    cdef public double alpha_next  # momentum that places the next interim point (Nesterov)
    cdef public double alpha_prev  # momentum the current interim point was placed with
    cdef public double damp        # ``buffer``: 1 - dampening, the weight of g in the buffer
    cdef public double rho         # decay of the squared-gradient average
    cdef public double beta1
    cdef public double beta2
    cdef public double c2          # Adam: 1 / sqrt(1 - beta2^t) (set by bias_correction)
    cdef public double eps
    cdef public double lr_decay    # lr / (1 + (t - 1) lr_decay) at update t (torch Adagrad)
    cdef public bint l2            # add wd * p to the gradient
    cdef public bint nesterov      # the shifted Nesterov form
    cdef public bint amsgrad       # Adam: divide by the running maximum of v
    cdef public bint bias_correction  # Adam: lr and c2 from the update number t
    cdef public bint maximize      # ascend: the gradient's sign is flipped first
    cdef public bint eps_inside    # delta inside the square root (RMSProp, AdaGrad)
    cdef public bint eps_hat       # Adam: delta added to sqrt(r) before the bias correction
    cdef public bint centered      # RMSProp: divide by sqrt(r - gbar^2)
    cdef public bint lookahead     # Nesterov as torch, Keras, optax and scikit-learn write
                                   # it: the arrays hold their theta (no interim point)
    cdef public bint buffer        # momentum buffer, eps outside it (torch, optax)
    cdef public bint fma           # torch's operation sequence, fused multiply-adds included
    cdef public bint torch_fused   # torch's fused CPU kernels: their tail rule and sqrt

    def __init__(self, str rule):
        self.rule = rule
        self.decay = 1.0
        self.c2 = 1.0
        self.damp = 1.0

    @property
    def rule(self):
        return _RULE_NAMES[self.code]

    @rule.setter
    def rule(self, str name):
        if name not in RULES:
            raise ValueError(f"unknown rule {name!r}: expected one of {sorted(RULES)}")
        self.code = RULES[name]

    def fields(self):
        """``{name: value}`` of every field."""
        return {k: getattr(self, k) for k in _SCALAR_FIELDS}

    def __repr__(self):
        inner = ", ".join(f"{k}={v!r}" for k, v in self.fields().items())
        return f"Scalars({inner})"

    cdef int fill(self, Hyper* h, GradPlan plan, long long t, bint f64, Py_ssize_t ncols,
                  Py_ssize_t group) except -1:
        """The kernel's Hyper for update number ``t`` (from 1), checked: the rule's
        columns are there, and every scalar can be rounded to the dtype without
        overflowing (and eps without vanishing). ``group`` (or -1) names the group in
        messages."""
        cdef double[12] vals
        cdef double bc1, bc2
        cdef int k
        cdef Py_ssize_t need = RULE_COLUMNS[self.code]
        if self.code == ADAM and self.amsgrad:
            need += 1
        if (self.code == RMSPROP or self.code == RMSPROP_MOMENTUM) and self.centered:
            need += 1
        if ncols < need:
            raise ValueError(f"{_where(group)}rule {self.rule!r} needs more state arrays "
                             f"than this table has ({ncols - 2})")
        h.lr = self.lr; h.wd = self.wd; h.decay = self.decay; h.alpha = self.alpha
        h.alpha_next = self.alpha_next; h.alpha_prev = self.alpha_prev; h.rho = self.rho
        h.damp = self.damp
        h.beta1 = self.beta1; h.beta2 = self.beta2; h.c2 = self.c2; h.eps = self.eps
        if self.lr_decay != 0.0:
            h.lr = self.lr / (1.0 + <double>(t - 1) * self.lr_decay)
        if self.bias_correction:
            # Algorithm 8.7's bias corrections folded into two scalars: the step size
            # lr / (1 - beta1^t) and c2 = 1 / sqrt(1 - beta2^t), so that the kernel
            # computes theta - step * s / (sqrt(r) * c2 + delta). With eps_hat (Keras,
            # scikit-learn) delta is added to sqrt(r) itself: step = lr sqrt(1 - beta2^t)
            # / (1 - beta1^t), c2 = 1. With fma (torch) the kernel divides by
            # c2 = sqrt(1 - beta2^t): bias_correction2 ** 0.5 in torch.optim.Adam, std::sqrt
            # in its fused kernel.
            bc1 = 1.0 - pow(self.beta1, <double>t)
            bc2 = 1.0 - pow(self.beta2, <double>t)
            if self.eps_hat:
                h.lr = self.lr * sqrt(bc2) / bc1
                h.c2 = 1.0
            elif self.fma:
                h.lr = self.lr / bc1
                h.c2 = sqrt(bc2) if self.torch_fused else pow(bc2, 0.5)
            else:
                h.lr = self.lr / bc1
                h.c2 = 1.0 / sqrt(bc2)
        h.flags = ((FLAG_L2 if self.l2 else 0) | (FLAG_NESTEROV if self.nesterov else 0)
                   | (FLAG_AMSGRAD if self.amsgrad else 0)
                   | (FLAG_FMA if self.fma else 0)
                   | (FLAG_TAIL if self.fma and self.torch_fused else 0)
                   | (FLAG_NESTEROV if self.lookahead else 0)
                   | (FLAG_BUFFER if self.buffer else 0)
                   | (FLAG_FIRST if self.buffer and t == 1 else 0)
                   | (FLAG_EPS_INSIDE if self.eps_inside else 0)
                   | (FLAG_CENTERED if self.centered else 0))
        if self.lookahead and not self.buffer:
            # Nesterov as Keras and scikit-learn write it, theta + alpha v' - eps g: the
            # shifted form's phi - alpha v + (1 + alpha) v' with this step's momentum
            h.alpha_prev = self.alpha
            h.alpha_next = self.alpha
        plan.fill(h)
        if self.maximize:
            h.gscale = -h.gscale
        if f64:
            return 0
        vals[0] = h.lr; vals[1] = h.wd; vals[2] = h.decay; vals[3] = h.alpha
        vals[4] = h.alpha_next; vals[5] = h.alpha_prev; vals[6] = h.rho
        vals[7] = h.beta1; vals[8] = h.beta2; vals[9] = h.c2; vals[10] = h.eps
        vals[11] = h.damp
        for k in range(12):
            if not fabs(vals[k]) <= FLOAT32_MAX:
                raise ValueError(f"{_where(group)}the per-step scalar {_HYPER_FIELDS[k]} = "
                                 f"{vals[k]!r} overflows float32, the dtype of these "
                                 f"parameters (check lr, weight_decay and the other "
                                 f"hyperparameters)")
        if h.eps != 0.0 and <float>h.eps == 0.0:
            raise ValueError(f"{_where(group)}eps = {h.eps!r} rounds to 0 in float32, the "
                             f"dtype of these parameters")
        return 0

    def kernel_values(self, long long t=1, GradPlan plan=None):
        """``{name: value}`` of what the kernel receives for update number ``t`` (float64
        parameters): the fields after the bias corrections, and the plan."""
        cdef Hyper h
        self.fill(&h, _IDENTITY if plan is None else plan, t, True, 5, -1)
        return {"lr": h.lr, "wd": h.wd, "decay": h.decay, "alpha": h.alpha,
                "alpha_next": h.alpha_next, "alpha_prev": h.alpha_prev, "damp": h.damp,
                "rho": h.rho, "beta1": h.beta1, "beta2": h.beta2, "c2": h.c2, "eps": h.eps,
                "gscale": h.gscale, "clip": h.clip, "flags": h.flags}


cdef str _where(Py_ssize_t group):
    return f"param_groups[{group}]: " if group >= 0 else ""


_SCALAR_FIELDS = ("lr", "wd", "decay", "alpha", "alpha_next", "alpha_prev", "damp", "rho",
                  "beta1", "beta2", "c2", "eps", "lr_decay", "l2", "nesterov", "amsgrad",
                  "bias_correction", "maximize", "eps_inside", "eps_hat", "centered",
                  "lookahead", "buffer", "fma", "torch_fused")
_HYPER_FIELDS = ("lr", "wd", "decay", "alpha", "alpha_next", "alpha_prev", "rho", "beta1",
                 "beta2", "c2", "eps", "damp")

FLAGS = {"l2": FLAG_L2, "nesterov": FLAG_NESTEROV, "amsgrad": FLAG_AMSGRAD,
         "clip": FLAG_CLIP, "fma": FLAG_FMA, "tail": FLAG_TAIL, "buffer": FLAG_BUFFER, "first": FLAG_FIRST, "eps_inside": FLAG_EPS_INSIDE,
         "centered": FLAG_CENTERED}


cdef class GradPlan:
    """How the gradients of a step are transformed before the update, by name: each
    element is multiplied by ``scale`` (clipping by norm; 1: unchanged), then clamped to
    [-clamp, clamp] unless ``clamp`` is infinite."""
    cdef public double scale
    cdef public double clamp

    def __init__(self, double scale=1.0, double clamp=float("inf")):
        self.scale = scale
        self.clamp = clamp

    def __repr__(self):
        return f"GradPlan(scale={self.scale!r}, clamp={self.clamp!r})"

    cdef void fill(self, Hyper* h) noexcept:
        h.gscale = self.scale
        h.clip = self.clamp
        if self.clamp < INFINITY:
            h.flags = h.flags | FLAG_CLIP


cdef GradPlan _IDENTITY = GradPlan()


# ---- array checks: one place for the rules every array of an update must satisfy -------

cdef enum:
    _NPY_HALF = 23                # numpy's type numbers of float16 and of the first user
    _NPY_USERDEF = 256            # dtype (fixed by numpy's C API)

cdef int _bf16_num = -1         # ml_dtypes' bfloat16 type number, once it is imported


cdef int _bf16_typenum():
    # bfloat16 is a user dtype whose number depends on registration order; an array of it
    # exists only once ml_dtypes is imported, so look then (and never import it here).
    global _bf16_num
    if _bf16_num < 0:
        m = sys.modules.get("ml_dtypes")
        if m is not None:
            _bf16_num = np.dtype(m.bfloat16).num
    return _bf16_num


cdef int _elfmt(cnp.ndarray a):
    """EL_F32, EL_F64, EL_F16 or EL_BF16 for an array of one of those dtypes, else -1."""
    cdef int t = cnp.PyArray_TYPE(a)
    if t == cnp.NPY_FLOAT:
        return EL_F32
    if t == cnp.NPY_DOUBLE:
        return EL_F64
    if t == _NPY_HALF:
        return EL_F16
    if t >= _NPY_USERDEF and t == _bf16_typenum():
        return EL_BF16
    return -1


cdef inline bint _is_float(cnp.ndarray a) noexcept:
    cdef int t = cnp.PyArray_TYPE(a)
    return t == cnp.NPY_FLOAT or t == cnp.NPY_DOUBLE


cdef object _dtype_problem(object obj, str name, bint allow16=False):
    """The TypeError for an object that is not a native-order float32/float64 ndarray (or,
    with ``allow16``, float16/bfloat16), or None."""
    if not cnp.PyArray_Check(obj):
        return TypeError(f"{name}: expected a numpy.ndarray, got {type(obj).__name__}")
    if type(obj) is not cnp.ndarray and isinstance(obj, MaskedArray):
        return TypeError(f"{name}: masked arrays are not supported (the update would ignore "
                         f"the mask); pass the array of values you mean, e.g. "
                         f"np.ma.filled(a, 0)")
    cdef int el = _elfmt(<cnp.ndarray>obj)
    if el < 0 or (not allow16 and el >= EL_BF16):
        what = ("float32, float64, float16 or bfloat16" if allow16
                else "float32 or float64")
        return TypeError(f"{name}: dtype must be {what}, got {(<object>obj).dtype}")
    if not cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>obj):
        return TypeError(f"{name}: dtype {(<object>obj).dtype.str} is not in the machine's "
                         f"byte order; convert it with a.astype(a.dtype.newbyteorder('='))")
    return None


def check_param(obj, str name, bint allow16=False):
    """An array the update writes (a parameter or a state array): a native-order
    float32/float64 ndarray (float16 and bfloat16 too with ``allow16``; no masked array),
    C-contiguous, aligned and writeable. It is updated in place, so it is never copied or
    converted."""
    _check_written(obj, name, allow16)
    return obj


cdef int _check_written(object obj, str name, bint allow16=False) except -1:
    if not (type(obj) is cnp.ndarray and _is_float(<cnp.ndarray>obj)
            and cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>obj)):
        err = _dtype_problem(obj, name, allow16)
        if err is not None:
            raise err
    cdef cnp.ndarray a = <cnp.ndarray>obj
    if (cnp.PyArray_FLAGS(a) & _WANT_FLAGS) == _WANT_FLAGS:
        return 0
    if not cnp.PyArray_IS_C_CONTIGUOUS(a):
        raise ValueError(f"{name}: must be C-contiguous (it is updated in place, so it "
                         f"cannot be copied); pass np.ascontiguousarray(...) and keep that "
                         f"array as the parameter")
    if not cnp.PyArray_ISWRITEABLE(a):
        raise ValueError(f"{name}: array is read-only")
    raise ValueError(f"{name}: array is not aligned")


cdef inline bint _same_shape(cnp.ndarray a, cnp.ndarray b) noexcept:
    cdef int k, nd = cnp.PyArray_NDIM(a)
    if cnp.PyArray_NDIM(b) != nd:
        return False
    for k in range(nd):
        if cnp.PyArray_DIMS(a)[k] != cnp.PyArray_DIMS(b)[k]:
            return False
    return True


cdef cnp.ndarray _check_grad(object obj, cnp.ndarray param, str name, str pname):
    """A gradient of ``param``: its dtype (or float32 for a 16-bit parameter) and shape, any
    layout. A gradient that is not C-contiguous or not aligned is read through an aligned
    contiguous copy (a gradient is only read, so the copy loses nothing); returns the
    array the kernel reads."""
    if not (type(obj) is cnp.ndarray and cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>obj)):
        err = _dtype_problem(obj, name, True)
        if err is not None:
            raise err
    cdef cnp.ndarray g = <cnp.ndarray>obj
    cdef int tg = cnp.PyArray_TYPE(g), tp = cnp.PyArray_TYPE(param)
    if tg != tp and not (tg == cnp.NPY_FLOAT and _elfmt(param) >= EL_BF16):
        extra = " (or float32)" if _elfmt(param) >= EL_BF16 else ""
        raise TypeError(f"{name}: dtype {(<object>g).dtype} does not match {pname}'s dtype "
                        f"{(<object>param).dtype}{extra}")
    if not _same_shape(g, param):
        raise ValueError(f"{name}: shape {(<object>g).shape} does not match {pname}'s shape "
                         f"{(<object>param).shape}")
    if not (cnp.PyArray_IS_C_CONTIGUOUS(g) and cnp.PyArray_ISALIGNED(g)):
        g = np.array(g, order="C", copy=True)
    return g


cdef bint _overlap(uintptr_t lo0, uintptr_t hi0, uintptr_t lo1, uintptr_t hi1) noexcept:
    return lo0 < hi0 and lo1 < hi1 and lo0 < hi1 and lo1 < hi0


cdef inline uintptr_t _lo(cnp.ndarray a) noexcept:
    return <uintptr_t>cnp.PyArray_DATA(a)


cdef inline uintptr_t _hi(cnp.ndarray a) noexcept:
    return <uintptr_t>cnp.PyArray_DATA(a) + <uintptr_t>cnp.PyArray_NBYTES(a)


cdef class Guard:
    """Sorted address intervals of every array an optimizer writes (params and state).

    A gradient that overlaps one of them is refused: the update would read a value it has
    already overwritten. The arrays themselves must be disjoint (``disjoint``).
    """
    cdef uintptr_t[::1] starts
    cdef uintptr_t[::1] stops
    cdef Py_ssize_t n

    def __init__(self, arrays, names=None):
        spans = sorted((a.__array_interface__["data"][0], a.nbytes, i)
                       for i, a in enumerate(arrays) if a.nbytes > 0)
        for (s0, nb0, i0), (s1, _, i1) in zip(spans, spans[1:]):
            if s1 < s0 + nb0:
                n0, n1 = (names[i0], names[i1]) if names is not None else (i0, i1)
                raise ValueError(f"{n0} and {n1} share memory; every parameter and state "
                                 f"array must be a separate buffer")
        self.n = len(spans)
        self.starts = np.array([s for s, _, _ in spans] or [0], dtype=np.uintp)
        self.stops = np.array([s + nb for s, nb, _ in spans] or [0], dtype=np.uintp)

    cdef bint overlaps(self, uintptr_t lo, uintptr_t hi) noexcept:
        # Does [lo, hi) meet any interval? The intervals are disjoint, so only the last
        # one starting before ``hi`` can meet it.
        cdef Py_ssize_t a = 0, b = self.n, mid
        if lo >= hi or self.n == 0:
            return False
        while a < b:                 # first interval with start >= hi
            mid = (a + b) // 2
            if self.starts[mid] < hi:
                a = mid + 1
            else:
                b = mid
        return a > 0 and self.stops[a - 1] > lo


cdef class Table:
    """The arrays of one parameter group of one dtype, laid out for the kernels.

    ``params`` are the group's parameters of this dtype, ``states`` a list of columns (one
    list of arrays per state name, aligned with ``params``), ``index`` each row's position
    in the optimizer's list of gradients. The table keeps a reference to every array whose
    address it holds; column 1 (the gradients) is bound at every step, after checking the
    gradients and that each parameter is still the array the table was built on.

    Storage other than the parameters' dtype (the block walker, codec.pxi): ``storage``
    names each state column's ("float32" native, "bfloat16", "bfloat16_sr",
    "q8_signed", "q8_unsigned"); ``keep`` how 16-bit parameters are kept ("master",
    "stochastic", "kahan"); ``aux`` per column a list of extra arrays per row (column 0:
    the master copies or compensations; an 8-bit state column: its float32 scales, one per
    block of 256); ``base`` each row's first element index in its group (random words).
    """
    cdef intptr_t[:, ::1] table
    cdef intptr_t[:, ::1] aux_table
    cdef Py_ssize_t[::1] offsets
    cdef Py_ssize_t[::1] voff         # offsets in whole blocks (block walker)
    cdef Py_ssize_t[::1] base
    cdef Py_ssize_t[::1] index
    cdef readonly Py_ssize_t nrows, ncols
    cdef bint f64
    cdef int typenum
    cdef readonly int elfmt          # the parameters' EL_*
    cdef bint coded                  # runs through the block walker
    cdef Codec codec
    cdef Py_ssize_t bytes_per_element
    cdef list params          # the parameter arrays (references held)
    cdef list states          # the state columns (references held)
    cdef list aux             # the extra arrays (references held)
    cdef list names           # "grads[i]" and "params[i]" of each row, for messages
    cdef Guard guard
    cdef uintptr_t[::1] checked  # each row's last gradient span [checked, checked_hi)
    cdef uintptr_t[::1] checked_hi  # found clear of the guard
    cdef list keep            # contiguous copies of non-contiguous gradients, this step
    cdef double[::1] blocks   # per-block sums of squares
    # row-sparse gradients and row-wise state (sparse.pxi)
    cdef bint rowwise         # row-wise AdaGrad: every row through the row walker
    cdef bint catch           # catch_up: the rows' last steps are kept
    cdef list batches         # this step's RowBatch of each row, or None
    cdef list slots           # per row: int32 marks of the rows seen while deduplicating
    cdef list last            # per row (catch_up): int64 step of each row's last update
    cdef list dense_step      # per row (catch_up): int64[1], the last update of all rows
    cdef list saved           # per row: the dense gradient a catch-up row walk takes
    cdef Py_ssize_t[::1] rowlen   # per row: the length of its rows (-1: not 2-D)

    def __init__(self, list params, list states, index, Guard guard, storage=None,
                 str keep="none", aux=None, base=None, bint rowwise=False, last=None,
                 dense_step=None):
        cdef Py_ssize_t r, c, k
        cdef cnp.ndarray p0
        self.nrows = len(params)
        self.ncols = 2 + len(states)
        if self.ncols > 5:
            raise ValueError("a table holds at most 3 state columns")
        self.params = list(params)
        self.states = [list(col) for col in states]
        self.guard = guard
        self.checked = np.zeros(max(1, self.nrows), dtype=np.uintp)
        self.checked_hi = np.zeros(max(1, self.nrows), dtype=np.uintp)
        self.keep = []
        self.index = np.asarray(index, dtype=np.intp).copy()
        self.names = [(f"grads[{i}]", f"params[{i}]") for i in self.index]
        self.table = np.zeros((max(1, self.nrows), self.ncols), dtype=np.intp)
        self.aux_table = np.zeros((max(1, self.nrows), self.ncols), dtype=np.intp)
        self.offsets = np.zeros(self.nrows + 1, dtype=np.intp)
        self.voff = np.zeros(self.nrows + 1, dtype=np.intp)
        self.elfmt = EL_F32
        self.typenum = cnp.NPY_FLOAT
        if self.nrows:
            p0 = <cnp.ndarray>params[0]
            self.elfmt = _elfmt(p0)
            if self.elfmt < 0:
                raise TypeError(f"unsupported parameter dtype {params[0].dtype}")
            self.typenum = cnp.PyArray_TYPE(p0)
        self.f64 = self.elfmt == EL_F64
        # storage
        storage = list(storage) if storage is not None else ["float32"] * len(states)
        if len(storage) != len(states):
            raise ValueError("one storage name per state column")
        self.codec.pfmt = (ST_F32 if self.elfmt == EL_F32 else ST_F64 if self.f64
                           else ST_F16 if self.elfmt == EL_F16 else ST_BF16)
        self.codec.gfmt = self.codec.pfmt
        self.codec.keep = KEEP[keep]
        self.codec.nstate = len(states)
        self.codec.random = False
        self.codec.key = 0
        for k in range(3):
            self.codec.sfmt[k] = ST_F32
        for k in range(len(states)):
            self.codec.sfmt[k] = STORAGE[storage[k]]
            if self.codec.sfmt[k] in (ST_BF16_SR, ST_Q8_UNSIGNED):
                self.codec.random = True
        if self.codec.keep == KEEP_STOCHASTIC:
            self.codec.random = True
        sixteen = self.elfmt in (EL_BF16, EL_F16)
        if (sixteen and self.codec.keep == KEEP_NONE and states) or (
                not sixteen and self.codec.keep != KEEP_NONE):
            raise ValueError("16-bit parameters need keep 'master', 'stochastic' or "
                             "'kahan'; float32/float64 ones 'none'")
        compressed = any(self.codec.sfmt[k] != ST_F32 for k in range(len(states)))
        if self.f64 and compressed:
            raise ValueError("float64 parameters keep float64 state")
        # (16-bit arrays with keep 'none' and no state: a table for the clipping functions,
        # which only sum and transform them)
        self.coded = (sixteen and self.codec.keep != KEEP_NONE) or compressed
        self.aux = [list(col) if col is not None else None for col in aux] if aux else []
        base = np.zeros(self.nrows, np.intp) if base is None else np.asarray(base, np.intp)
        self.base = base.copy() if self.nrows else np.zeros(1, np.intp)
        for r in range(self.nrows):
            if params[r].dtype != params[0].dtype:
                raise ValueError("a table holds parameters of one dtype")
            n = params[r].size
            self.offsets[r + 1] = self.offsets[r] + n
            self.voff[r + 1] = self.voff[r] + (n + QB - 1) // QB * QB
            self.table[r, 0] = params[r].__array_interface__["data"][0]
            for c in range(len(states)):
                a = states[c][r]
                if a.size != (params[r].shape[0] if rowwise else n):
                    raise ValueError("a state array must match its parameter")
                self.table[r, 2 + c] = a.__array_interface__["data"][0]
            for c in range(len(self.aux)):
                if self.aux[c] is not None:
                    self.aux_table[r, c] = self.aux[c][r].__array_interface__["data"][0]
        self.rowwise = rowwise
        self.catch = last is not None
        self.last = list(last) if last is not None else None
        self.dense_step = list(dense_step) if dense_step is not None else None
        self.batches = [None] * self.nrows
        self.saved = [0] * self.nrows
        self.slots = [None] * self.nrows
        self.rowlen = np.full(max(1, self.nrows), -1, np.intp)
        for r in range(self.nrows):
            if params[r].ndim >= 2 and params[r].shape[0]:
                self.rowlen[r] = params[r].size // params[r].shape[0]
            if rowwise and self.rowlen[r] < 0:
                raise ValueError("row-wise state is for parameters of 2 or more dimensions")
            if self.catch and (self.last[r] is None) != (params[r].ndim != 2):
                raise ValueError("catch_up keeps the last steps of every 2-D parameter")
        if (rowwise or self.catch) and self.coded:
            raise ValueError("row-wise state and catch-up need float32/float64 parameters "
                             "and state")
        self._check_layout(storage)
        n_blocks = (self.offsets[self.nrows] + SUM_BLOCK - 1) // SUM_BLOCK
        self.blocks = np.zeros(max(1, n_blocks))
        # bytes moved per element (reads and writes), for the thread cutoff
        item = {EL_F32: 4, EL_F64: 8, EL_F16: 2, EL_BF16: 2}[self.elfmt]
        nbytes = 3 * item                       # p read and written, g read
        if self.codec.keep == KEEP_MASTER:
            nbytes += 8
        elif self.codec.keep == KEEP_KAHAN:
            nbytes += 4
        for k in range(len(states)):
            nbytes += {ST_F32: 2 * item if not self.coded else 8, ST_BF16: 4,
                       ST_BF16_SR: 4, ST_Q8_SIGNED: 2, ST_Q8_UNSIGNED: 2}[self.codec.sfmt[k]]
        self.bytes_per_element = nbytes

    def _check_layout(self, storage):
        # every array of the right dtype and size for its storage
        cdef Py_ssize_t r, c
        want = {"float32": np.float32, "bfloat16": np.uint16, "bfloat16_sr": np.uint16,
                "q8_signed": np.uint8, "q8_unsigned": np.uint8}
        for r in range(self.nrows):
            p = self.params[r]
            for c in range(len(self.states)):
                a = self.states[c][r]
                if storage[c] == "float32":
                    dt = np.float32 if self.coded else p.dtype
                else:
                    dt = want[storage[c]]
                if a.dtype != dt:
                    raise ValueError(f"state column {c} must be {np.dtype(dt)}, got {a.dtype}")
                if storage[c].startswith("q8"):
                    sc = self.aux[2 + c][r] if len(self.aux) > 2 + c else None
                    if sc is None or sc.dtype != np.float32 or sc.size != (p.size + QB - 1) // QB:
                        raise ValueError(f"state column {c} needs float32 scales, one per "
                                         f"block of {QB}")
            if self.codec.keep in (KEEP_MASTER, KEEP_KAHAN):
                m = self.aux[0][r] if self.aux and self.aux[0] is not None else None
                dt = np.float32 if self.codec.keep == KEEP_MASTER else np.uint16
                if m is None or m.dtype != dt or m.size != p.size:
                    raise ValueError(f"keep {'master' if dt is np.float32 else 'kahan'} "
                                     f"needs a {np.dtype(dt)} array of the parameter's size")

    @property
    def size(self):
        return self.offsets[self.nrows]

    @property
    def dtype(self):
        return self.params[0].dtype if self.nrows else np.dtype(np.float32)

    cdef int _check_param(self, Py_ssize_t r) except -1:
        # The parameter must still be the array the table holds the address of: a
        # reallocation (resize), a smaller size, a new dtype or read-only flag would make
        # the kernel write where the user no longer looks, or where nothing is.
        cdef cnp.ndarray p = <cnp.ndarray>self.params[r]
        if ((cnp.PyArray_FLAGS(p) & _WANT_FLAGS) != _WANT_FLAGS
                or <intptr_t>cnp.PyArray_DATA(p) != self.table[r, 0]
                or cnp.PyArray_SIZE(p) != self.offsets[r + 1] - self.offsets[r]
                or cnp.PyArray_TYPE(p) != self.typenum or not cnp.PyArray_ISNOTSWAPPED(p)):
            check_param(p, self.names[r][1], True)
            raise ValueError(f"{self.names[r][1]}: the array's data moved, or its size or "
                             f"dtype changed, since the optimizer was made (resize with "
                             f"refcheck=False?); make a new optimizer for it")
        return 0

    def bind(self, grads):
        """Check this table's gradients in ``grads`` (and its parameters) and take their
        addresses. Raises TypeError/ValueError naming ``grads[i]``; writes only to the
        table."""
        self._bind(grads)

    cdef int _bind(self, object grads) except -1:
        cdef Py_ssize_t r
        cdef cnp.ndarray g, p
        cdef uintptr_t lo, hi
        cdef int gfmt = -1, f
        cdef RowBatch b
        if self.keep:
            self.keep.clear()
        for r in range(self.nrows):
            self.batches[r] = None
        for r in range(self.nrows):
            self._check_param(r)
            p = <cnp.ndarray>self.params[r]
            obj = grads[self.index[r]]
            if _SPARSE_TYPE is not None and type(obj) is _SPARSE_TYPE:
                b = self._bind_rows(r, obj)
                self.batches[r] = b
                self.table[r, 1] = 0
                continue
            g = _check_grad(obj, p, self.names[r][0], "its parameter")
            if g is not obj:
                self.keep.append(g)
            if self.coded:
                f = ST_F32 if cnp.PyArray_TYPE(g) == cnp.NPY_FLOAT else self.codec.pfmt
                if gfmt >= 0 and f != gfmt:
                    raise TypeError(f"{self.names[r][0]}: dtype {(<object>g).dtype} differs "
                                    f"from the other gradients of these parameters; pass "
                                    f"all of them in the parameters' dtype or all float32")
                gfmt = f
            lo = <uintptr_t>cnp.PyArray_DATA(g)
            hi = lo + <uintptr_t>cnp.PyArray_NBYTES(g)
            # The guarded arrays never move (checked above for the parameters; the state
            # arrays are the optimizer's own), so a gradient over the bytes checked last
            # time is still clear of them. (Its byte count is not fixed by the shape: a
            # float32 gradient of a 16-bit parameter covers twice a 16-bit one's.)
            if lo != self.checked[r] or hi != self.checked_hi[r]:
                if self.guard.overlaps(lo, hi):
                    raise ValueError(f"{self.names[r][0]} shares memory with a parameter or "
                                     f"an optimizer state array; pass a separate gradient "
                                     f"array")
                self.checked[r] = lo
                self.checked_hi[r] = hi
            self.table[r, 1] = <intptr_t>lo
        if gfmt >= 0:
            self.codec.gfmt = gfmt
        return 0

    cdef RowBatch _bind_rows(self, Py_ssize_t r, object obj):
        cdef RowBatch b
        cdef cnp.ndarray v
        for k in range(self.codec.nstate):
            if _is_q8(self.codec.sfmt[k]):
                raise ValueError(f"{self.names[r][0]}: a row-sparse gradient needs "
                                 f"state_format 'float32' or 'bfloat16' (8-bit codes share a "
                                 f"scale per block of 256 elements, across rows)")
        if self.slots[r] is None:
            p = self.params[r]
            self.slots[r] = np.full(p.shape[0] if p.ndim else 0, -1, np.int32)
        b = _dedup(obj, <cnp.ndarray>self.params[r], self.slots[r], self.names[r][0],
                   self.names[r][1])
        for v in (b.values, b.buf):
            lo = <uintptr_t>cnp.PyArray_DATA(v)
            if self.guard.overlaps(lo, lo + <uintptr_t>cnp.PyArray_NBYTES(v)):
                raise ValueError(f"{self.names[r][0]}: its values share memory with a "
                                 f"parameter or an optimizer state array; pass a separate "
                                 f"array")
        if self.f64 != (b.elfmt == EL_F64):
            raise TypeError(f"{self.names[r][0]}: values of dtype "
                            f"{b.values.dtype} do not match its parameter's dtype "
                            f"{self.params[r].dtype}")
        return b

    cdef double _sumsq(self, int col) noexcept:
        cdef int nt = _threads()
        cdef double out
        cdef int efmt = self.elfmt
        if col == 1 and self.coded and self.codec.gfmt == ST_F32:
            efmt = EL_F32
        if self.offsets[self.nrows] == 0:
            return 0.0
        with nogil:
            out = _sumsq(efmt, &self.table[0, 0], self.ncols, col, &self.offsets[0],
                         self.nrows, &self.blocks[0], nt)
        if col == 1:
            for b in self.batches:
                if b is not None:
                    out += (<RowBatch>b).sumsq()
        return out

    def sumsq(self, int col=1):
        """Sum of squares of column ``col`` (1: the gradients last bound; 0: the
        parameters), in double precision, the same bits for any thread count."""
        if not 0 <= col < 2:
            raise ValueError(f"col must be 0 or 1, got {col}")
        return self._sumsq(col)

    cdef int _go(self, int op, const Hyper* h, uint64_t key, int64_t t=0) except -1:
        # A small update runs with the GIL held: releasing it would cost more than the
        # update (and threads would not start below the cutoff anyway).
        cdef int nt = _threads()
        cdef Py_ssize_t nbytes, r
        cdef bint rows = False
        if self.nrows == 0:
            return 0
        if op < N_RULES and (self.rowwise or self.catch):
            rows = True
            for r in range(self.nrows):       # these go through the row walker
                self.saved[r] = self.table[r, 1]
                if self.rowwise or (self.last[r] is not None and self._stale(r, t)):
                    self.table[r, 1] = 0
        cdef Py_ssize_t active = self.offsets[self.nrows]
        if op < N_RULES:                  # rows with a row-sparse gradient run below
            for r in range(self.nrows):
                if self.table[r, 1] == 0:
                    active -= self.offsets[r + 1] - self.offsets[r]
        if active == 0:
            pass
        elif self.coded or op == TRANSFORM and self.elfmt >= EL_BF16:
            self.codec.key = key
            nbytes = active * self.bytes_per_element
            if nbytes < _parallel_min_bytes:
                nt = 1
            if nbytes >= _parallel_min_bytes // 4:
                with nogil:
                    _run_blocks(op, &self.table[0, 0], &self.aux_table[0, 0], self.ncols,
                                &self.offsets[0], &self.voff[0], &self.base[0], self.nrows,
                                &self.codec, h, nbytes, nt)
            else:
                _run_blocks(op, &self.table[0, 0], &self.aux_table[0, 0], self.ncols,
                            &self.offsets[0], &self.voff[0], &self.base[0], self.nrows,
                            &self.codec, h, nbytes, nt)
        else:
            nbytes = active * (8 if self.f64 else 4) * (2 * self.ncols - 1)
            if nbytes < _parallel_min_bytes:
                nt = 1                    # few active elements: no thread team
            if nbytes >= _parallel_min_bytes // 4:
                with nogil:
                    _run(op, self.f64, &self.table[0, 0], self.ncols, &self.offsets[0],
                         self.nrows, h, nt)
            else:
                _run(op, self.f64, &self.table[0, 0], self.ncols, &self.offsets[0],
                     self.nrows, h, nt)
        if op >= N_RULES:
            return 0
        for r in range(self.nrows):
            if self.batches[r] is not None:
                self._rows(op, r, <RowBatch>self.batches[r], 0, h, key, t, nt)
            elif rows and self.table[r, 1] == 0:
                self._rows(op, r, None, self.saved[r], h, key, t, nt)
            if self.catch and self.last[r] is not None and self.batches[r] is None:
                self.dense_step[r][0] = t
        return 0

    cdef bint _stale(self, Py_ssize_t r, int64_t t):
        # Does some row of tensor r lag behind step t - 1 (a catch-up is due)?
        cdef const int64_t[::1] last = self.last[r]
        cdef int64_t ds = self.dense_step[r][0]
        cdef Py_ssize_t i
        if ds >= t - 1:
            return False
        for i in range(last.shape[0]):
            if last[i] < t - 1:
                return True
        return False

    cdef int _rows(self, int op, Py_ssize_t r, RowBatch b, intptr_t gdense,
                   const Hyper* h, uint64_t key, int64_t t, int nt) except -1:
        cdef Codec c = self.codec
        cdef int64_t* lastp = NULL
        cdef int64_t* dsp = NULL
        cdef int64_t[::1] last
        cdef int64_t[::1] ds
        cdef const int64_t[::1] urows
        cdef Py_ssize_t d = self.rowlen[r], n = self.params[r].shape[0], u = 0
        cdef Py_ssize_t gsize = 8 if self.f64 else (4 if (b is not None or c.gfmt == ST_F32)
                                                    else 2)
        cdef const intptr_t* gptr = NULL
        cdef Py_ssize_t nbytes
        c.key = key
        if b is not None:
            c.gfmt = ST_F64 if b.elfmt == EL_F64 else ST_F32
            urows = b.rows
            u = b.u
            gptr = &b.ptrs[0]
        if self.catch and self.last[r] is not None:
            last = self.last[r]
            ds = self.dense_step[r]
            lastp = &last[0]
            dsp = &ds[0]
        nbytes = (u if b is not None else n) * d * self.bytes_per_element
        if b is not None and u == 0:
            return 0
        with nogil:
            _run_rows(op, self.f64, &self.table[r, 0], &self.aux_table[r, 0], self.ncols,
                      &c, self.coded, self.rowwise, d, n,
                      &urows[0] if b is not None else NULL, gptr, gdense, gsize, u,
                      lastp, dsp, t, <uint64_t>self.base[r], h, nbytes, nt)
        return 0

    def transform(self, GradPlan plan not None):
        """Apply ``plan`` (scale, then clamp) in place to column 0 (16-bit arrays are
        rounded back to nearest)."""
        cdef Hyper h
        h.flags = 0
        plan.fill(&h)
        self._go(TRANSFORM, &h, 0)

    def traffic(self):
        """The bandwidth yardstick: read every column once and write every column but the
        gradient once (the traffic of a rule with these columns), with the update's
        threads and chunking. Needs the gradients bound; float32/float64 only."""
        cdef Hyper h
        if self.coded or self.elfmt >= EL_BF16:
            raise ValueError("traffic() runs on float32/float64 tables")
        h.flags = <int>self.ncols
        self._go(TRAFFIC, &h, 0)


cdef class Engine:
    """An optimizer's tables, the ``Scalars`` of each of its groups, and its step counters.

    ``tables[i]`` belongs to group ``groups[i]``. ``steps[g]`` counts the completed steps
    of group ``g``, ``interim[g]`` is the momentum its arrays' interim point was placed
    with (shifted Nesterov form; 0 otherwise) and ``form`` the Nesterov form of the steps
    taken (0: none yet, 1: shifted, 2: literal). ``run`` updates them in the same C call
    that runs the kernels, so that an interrupt (KeyboardInterrupt) sees a step either
    whole and counted, or not applied.
    """
    cdef readonly list tables
    cdef readonly list scalars
    cdef Py_ssize_t[::1] group_of
    cdef readonly list steps
    cdef readonly list interim
    cdef public int form
    cdef readonly uint64_t seed      # of the random words of stochastic rounding

    def __init__(self, list tables, groups, list scalars, list steps, list interim,
                 int form=0, uint64_t seed=0):
        cdef Py_ssize_t g
        self.tables = list(tables)
        self.group_of = np.asarray(groups, dtype=np.intp).copy()
        self.scalars = list(scalars)
        if not (len(steps) == len(interim) == len(scalars)
                and len(self.group_of) == len(self.tables)):
            raise ValueError("one Scalars, step count and interim momentum per group")
        for g in self.group_of:
            if not 0 <= g < len(scalars):
                raise ValueError("group index out of range")
        self.steps = [int(s) for s in steps]
        self.interim = [float(a) for a in interim]
        self.form = form
        self.seed = seed

    @property
    def groups(self):
        """The group of each table."""
        return list(self.group_of)

    def bind(self, grads):
        """Check and bind every table's gradients; nothing is written but the tables."""
        for t in self.tables:
            (<Table>t)._bind(grads)

    def sumsq(self):
        """The sum of squares of all gradients last bound (tables added in order)."""
        cdef double out = 0.0
        for t in self.tables:
            out += (<Table>t)._sumsq(1)
        return out

    def set_counters(self, steps, interim, int form):
        """Replace the step counters (when loading a state dict)."""
        if len(steps) != len(self.steps) or len(interim) != len(self.interim):
            raise ValueError("one step count and interim momentum per group")
        self.steps = [int(s) for s in steps]
        self.interim = [float(a) for a in interim]
        self.form = form

    def run(self, GradPlan plan not None, int form):
        """Check every table's scalars against its dtype, then update every table with the
        gradients last bound, transformed by ``plan``, and count the step of every group.
        In the shifted Nesterov form (``form`` 1) each Nesterov group's ``alpha_prev`` is
        its ``interim`` momentum, the one its arrays' interim point was placed with.

        A scalar that overflows the table's dtype raises ValueError before anything is
        written."""
        cdef Py_ssize_t i, g
        cdef Table t
        cdef Scalars s
        if form == 1:
            for g in range(len(self.scalars)):
                s = <Scalars>self.scalars[g]
                if s.nesterov:
                    s.alpha_prev = self.interim[g]
        cdef Hyper[8] local
        cdef Hyper* hs = local
        if len(self.tables) > 8:
            hs = <Hyper*>PyMem_Malloc(len(self.tables) * sizeof(Hyper))
            if hs == NULL:
                raise MemoryError()
        try:
            for i in range(len(self.tables)):     # every check before any write
                t = <Table>self.tables[i]
                g = self.group_of[i]
                if t.elfmt >= EL_BF16 and not t.coded:
                    raise ValueError("16-bit parameters need a keeping mode")
                (<Scalars>self.scalars[g]).fill(&hs[i], plan, <long long>self.steps[g] + 1,
                                                 t.f64, t.ncols,
                                                 g if len(self.scalars) > 1 else -1)
            for i in range(len(self.tables)):
                t = <Table>self.tables[i]
                g = self.group_of[i]
                t._go((<Scalars>self.scalars[g]).code, &hs[i],
                      ch8_step_key(self.seed, <uint64_t>g, <uint64_t>self.steps[g] + 1)
                      if t.coded and t.codec.random else 0,
                      <int64_t>self.steps[g] + 1)
        finally:
            if hs != local:
                PyMem_Free(hs)
        # Count the step: no Python code runs between the kernels and here.
        for g in range(len(self.steps)):
            self.steps[g] = self.steps[g] + 1
            s = <Scalars>self.scalars[g]
            if s.nesterov:
                self.interim[g] = s.alpha_next
        if form:
            self.form = form

    def step(self, grads, GradPlan plan not None, int form):
        """``bind(grads)``, then ``run(plan, form)``: one call for the common step."""
        for t in self.tables:
            (<Table>t)._bind(grads)
        self.run(plan, form)


def apply(Scalars s not None, param, grad, dict state, tuple names,
          GradPlan plan=None, long long step=1):
    """One update of rule ``s.rule`` on caller-owned arrays: ``param`` and the arrays of
    ``state`` (a dict that must hold exactly the state ``names`` of the rule) are written
    in place, ``grad`` is read. Everything is checked first: the arrays (as
    ``check_param``; states of the parameter's dtype and shape), that nothing the update
    writes overlaps anything else, and the scalars against the dtype. ``step`` is the
    number of this update, counting from 1."""
    cdef Py_ssize_t k, j, n = len(names)
    cdef list states = [None] * n
    cdef cnp.ndarray p, a, g
    cdef intptr_t row[5]
    cdef Py_ssize_t offsets[2]
    cdef Hyper h
    cdef bint f64
    cdef uintptr_t[5] lo, hi
    if n > 3:
        raise ValueError("apply takes at most 3 state arrays")
    if len(state) != n:
        raise ValueError(f"these hyperparameters keep the state {list(names)}, got "
                         f"{sorted(state)}")
    for k in range(n):
        a_obj = state.get(names[k])
        if a_obj is None:
            raise ValueError(f"these hyperparameters keep the state {list(names)}, got "
                             f"{sorted(state)}")
        states[k] = a_obj
    _check_written(param, "param")
    p = <cnp.ndarray>param
    lo[0] = _lo(p)
    hi[0] = _hi(p)
    for k in range(n):
        _check_written(states[k], names[k])
        a = <cnp.ndarray>states[k]
        if cnp.PyArray_TYPE(a) != cnp.PyArray_TYPE(p):
            raise TypeError(f"{names[k]}: dtype {states[k].dtype} does not match param's "
                            f"dtype {param.dtype}")
        if not _same_shape(a, p):
            raise ValueError(f"{names[k]}: shape {states[k].shape} does not match param's "
                             f"shape {param.shape}")
        lo[k + 1] = _lo(a)
        hi[k + 1] = _hi(a)
    for k in range(n + 1):
        for j in range(k + 1, n + 1):
            if _overlap(lo[k], hi[k], lo[j], hi[j]):
                wn = ("param",) + names
                raise ValueError(f"{wn[k]} and {wn[j]} share memory; every parameter and "
                                 f"state array must be a separate buffer")
    g = _check_grad(grad, p, "grad", "param")
    for k in range(n + 1):
        if _overlap(_lo(g), _hi(g), lo[k], hi[k]):
            wn = ("param",) + names
            raise ValueError(f"grad shares memory with {wn[k]}; pass a separate gradient "
                             f"array")
    f64 = cnp.PyArray_TYPE(p) == cnp.NPY_DOUBLE
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    s.fill(&h, _IDENTITY if plan is None else plan, step, f64, n + 2, -1)
    row[0] = <intptr_t>cnp.PyArray_DATA(p)
    row[1] = <intptr_t>cnp.PyArray_DATA(g)
    for k in range(n):
        row[2 + k] = <intptr_t>cnp.PyArray_DATA(<cnp.ndarray>states[k])
    offsets[0] = 0
    offsets[1] = cnp.PyArray_SIZE(p)
    if offsets[1] == 0:
        return
    with nogil:
        _run(s.code, f64, row, n + 2, offsets, 1, &h, _threads())
