"""The fused update kernels of ch8fast.

Three layers, from the inside out:

1. Span functions (``_sgd``, ``_adam``, ...): the per-element math of one update rule over
   one contiguous run of ``n`` elements of one tensor, on raw pointers, ``noexcept nogil``.
   Each is a single pass that reads the gradient and the state once, and writes the
   parameter and the state once, in place. The math runs in the array's dtype; the per-step
   scalars arrive in a ``Hyper`` struct computed by Python in double precision and are
   rounded once to the dtype.

2. One walker, ``_run``: a parameter group is a *table* with one row per tensor
   (the addresses of param, grad and state arrays) and cumulative element offsets. The
   walker splits the group's total element count into one contiguous chunk per thread
   (OpenMP ``prange``, static) and calls the span function on each piece of tensor that a
   chunk covers. Many small tensors thus cost one call and one thread team, and the
   arithmetic of every element does not depend on the split, so results are bitwise the
   same for any number of threads.

3. ``Table``, a Python-visible class that owns a group's table. It checks gradients once per
   step with the GIL held (type, dtype, shape, overlap with anything the step writes) and
   binds their addresses, then runs a rule with the GIL released.

Nothing inside layers 1-2 allocates, checks, or touches a Python object.
"""

cimport cython
from cython cimport floating
from cython.parallel cimport prange
from libc.stdint cimport intptr_t, uintptr_t
from libc.math cimport sqrt, sqrtf, isfinite, fabs

cimport numpy as cnp
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
        if (which == 1) return __builtin_cpu_supports("avx2");
        if (which == 2) return __builtin_cpu_supports("avx512f");
        return 1;
    }
    #else
    static int ch8_cpu_has(int which) { return which == 0; }
    #endif
    """
    int ch8_cpu_has(int which)


def cpu_supports(isa):
    """Whether this CPU (and OS) runs code built for ``isa``: "baseline", "avx2" or
    "avx512"."""
    return bool(ch8_cpu_has({"baseline": 0, "avx2": 1, "avx512": 2}[isa]))


# ---------------------------------------------------------------------------------------
# Rules and their per-step scalars
# ---------------------------------------------------------------------------------------

# Rule codes, with the number of table columns each uses (param, grad, then state).
cdef enum:
    SGD = 0               # p, g                                 (Alg 8.1)
    MOMENTUM = 1          # p, g, v       (8.15-8.16; shifted Nesterov with FLAG_NESTEROV)
    ADAGRAD = 2           # p, g, r                              (Alg 8.4)
    RMSPROP = 3           # p, g, r                              (Alg 8.5)
    RMSPROP_MOMENTUM = 4  # p, g, r, v    (Alg 8.6 with FLAG_NESTEROV; plain momentum without)
    ADAM = 5              # p, g, m, v[, vmax with FLAG_AMSGRAD] (Alg 8.7)
    ADADELTA = 6          # p, g, Eg2, Edx2                      (Zeiler 2012)
    N_RULES = 10

    SCALE = 7             # x <- gscale * x, on column 0 (gradient clipping by norm)
    CLAMP = 8             # x <- min(max(x, -clip), clip), on column 0
    ROOFLINE = 9          # no update: the memory traffic of a rule with this many columns

cdef enum:
    FLAG_L2 = 1           # add weight_decay * p to the gradient first
    FLAG_NESTEROV = 2     # shifted Nesterov form: the arrays hold the interim point
    FLAG_AMSGRAD = 4      # Adam: divide by the running maximum of v
    FLAG_CLIP = 8         # clamp each (scaled) gradient element to [-clip, clip]

cdef enum:
    SUM_BLOCK = 4096      # sums of squares: fixed blocks of the concatenated elements,
    SUM_LANES = 16        # each summed in 16 lanes by global index, blocks added in order

RULES = {"sgd": SGD, "momentum": MOMENTUM, "adagrad": ADAGRAD, "rmsprop": RMSPROP,
         "rmsprop_momentum": RMSPROP_MOMENTUM, "adam": ADAM, "adadelta": ADADELTA,
         "scale": SCALE, "clamp": CLAMP, "roofline": ROOFLINE}
RULE_COLUMNS = (2, 3, 3, 3, 4, 4, 4, 2, 2, 2)
FLAGS = {"l2": FLAG_L2, "nesterov": FLAG_NESTEROV, "amsgrad": FLAG_AMSGRAD,
         "clip": FLAG_CLIP}

cdef struct Hyper:
    double lr           # step size (for Adam: lr / (1 - beta1^t))
    double wd           # L2 coefficient, used with FLAG_L2
    double decay        # decoupled decay factor applied to p first (1 - lr * wd), else 1
    double alpha        # momentum of this step
    double alpha_next   # momentum of the next step (shifted Nesterov)
    double rho          # decay of the squared-gradient average (RMSProp, AdaDelta)
    double beta1
    double beta2
    double c2           # Adam: 1 / sqrt(1 - beta2^t)
    double eps
    double gscale       # every gradient is first multiplied by this (clipping by norm)
    double clip         # then clamped to [-clip, clip] with FLAG_CLIP
    int flags


# ---------------------------------------------------------------------------------------
# Layer 1: span functions. ``p`` and the state are written, ``g`` is only read.
# ---------------------------------------------------------------------------------------

cdef inline floating _sqrt(floating x) noexcept nogil:
    if floating is float:
        return sqrtf(x)
    else:
        return sqrt(x)


cdef inline floating _grad(floating x, floating s, floating c, bint clip) noexcept nogil:
    # The gradient as the update sees it: scaled (by 1 unless clipping by norm), then
    # clamped when clipping by value. x * 1 == x exactly, NaN and Inf included.
    x = x * s
    if clip:
        if x > c:
            x = c
        elif x < -c:
            x = -c
    return x


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


cdef void _scale(floating* x, Py_ssize_t n, const Hyper* h) noexcept nogil:
    cdef floating s = <floating>h.gscale
    cdef Py_ssize_t i
    for i in range(n):
        x[i] = x[i] * s


cdef void _clamp(floating* x, Py_ssize_t n, const Hyper* h) noexcept nogil:
    cdef floating c = <floating>h.clip
    cdef Py_ssize_t i
    for i in range(n):
        x[i] = _grad(x[i], <floating>1, c, True)


cdef void _sgd(floating* p, const floating* g, Py_ssize_t n, const Hyper* h) noexcept nogil:
    # theta <- theta - eps * g                                            (Alg 8.1)
    cdef floating lr = <floating>h.lr, wd = <floating>h.wd
    cdef bint l2 = h.flags & FLAG_L2
    cdef floating gs = <floating>h.gscale, cv = <floating>h.clip
    cdef bint clip = h.flags & FLAG_CLIP
    cdef floating gi
    cdef Py_ssize_t i
    for i in range(n):
        gi = _grad(g[i], gs, cv, clip)
        if l2:
            gi = gi + wd * p[i]
        p[i] = p[i] - lr * gi


cdef void _momentum(floating* p, const floating* g, floating* v, Py_ssize_t n,
                    const Hyper* h) noexcept nogil:
    # v <- alpha v - eps g (8.15);  theta <- theta + v (8.16).
    # Shifted Nesterov (spec section 3): the array holds phi = theta + alpha v, and
    # phi' = phi - alpha v + (1 + alpha') v', alpha' being the next step's momentum.
    cdef floating lr = <floating>h.lr, wd = <floating>h.wd
    cdef floating a = <floating>h.alpha, a_next1 = <floating>(1.0 + h.alpha_next)
    cdef bint l2 = h.flags & FLAG_L2, nesterov = h.flags & FLAG_NESTEROV
    cdef floating gs = <floating>h.gscale, cv = <floating>h.clip
    cdef bint clip = h.flags & FLAG_CLIP
    cdef floating gi, vi, vn
    cdef Py_ssize_t i
    for i in range(n):
        gi = _grad(g[i], gs, cv, clip)
        if l2:
            gi = gi + wd * p[i]
        vi = v[i]
        vn = a * vi - lr * gi
        v[i] = vn
        if nesterov:
            p[i] = p[i] - a * vi + a_next1 * vn
        else:
            p[i] = p[i] + vn


cdef void _adagrad(floating* p, const floating* g, floating* r, Py_ssize_t n,
                   const Hyper* h) noexcept nogil:
    # r <- r + g*g;  theta <- theta - eps / (delta + sqrt(r)) * g          (Alg 8.4)
    cdef floating lr = <floating>h.lr, wd = <floating>h.wd, eps = <floating>h.eps
    cdef bint l2 = h.flags & FLAG_L2
    cdef floating gs = <floating>h.gscale, cv = <floating>h.clip
    cdef bint clip = h.flags & FLAG_CLIP
    cdef floating gi, ri
    cdef Py_ssize_t i
    for i in range(n):
        gi = _grad(g[i], gs, cv, clip)
        if l2:
            gi = gi + wd * p[i]
        ri = r[i] + gi * gi
        r[i] = ri
        p[i] = p[i] - lr * (gi / (eps + _sqrt(ri)))


cdef void _rmsprop(floating* p, const floating* g, floating* r, Py_ssize_t n,
                   const Hyper* h) noexcept nogil:
    # r <- rho r + (1 - rho) g*g;  theta <- theta - eps / sqrt(delta + r) * g   (Alg 8.5)
    cdef floating lr = <floating>h.lr, wd = <floating>h.wd, eps = <floating>h.eps
    cdef floating rho = <floating>h.rho, rho1 = <floating>(1.0 - h.rho)
    cdef bint l2 = h.flags & FLAG_L2
    cdef floating gs = <floating>h.gscale, cv = <floating>h.clip
    cdef bint clip = h.flags & FLAG_CLIP
    cdef floating gi, ri
    cdef Py_ssize_t i
    for i in range(n):
        gi = _grad(g[i], gs, cv, clip)
        if l2:
            gi = gi + wd * p[i]
        ri = rho * r[i] + rho1 * (gi * gi)
        r[i] = ri
        p[i] = p[i] - lr * (gi / _sqrt(eps + ri))


cdef void _rmsprop_momentum(floating* p, const floating* g, floating* r, floating* v,
                            Py_ssize_t n, const Hyper* h) noexcept nogil:
    # r <- rho r + (1 - rho) g*g;  v <- alpha v - eps / sqrt(delta + r) * g;
    # theta <- theta + v  (Alg 8.6; shifted Nesterov form as in _momentum)
    cdef floating lr = <floating>h.lr, wd = <floating>h.wd, eps = <floating>h.eps
    cdef floating rho = <floating>h.rho, rho1 = <floating>(1.0 - h.rho)
    cdef floating a = <floating>h.alpha, a_next1 = <floating>(1.0 + h.alpha_next)
    cdef bint l2 = h.flags & FLAG_L2, nesterov = h.flags & FLAG_NESTEROV
    cdef floating gs = <floating>h.gscale, cv = <floating>h.clip
    cdef bint clip = h.flags & FLAG_CLIP
    cdef floating gi, ri, vi, vn
    cdef Py_ssize_t i
    for i in range(n):
        gi = _grad(g[i], gs, cv, clip)
        if l2:
            gi = gi + wd * p[i]
        ri = rho * r[i] + rho1 * (gi * gi)
        r[i] = ri
        vi = v[i]
        vn = a * vi - lr * (gi / _sqrt(eps + ri))
        v[i] = vn
        if nesterov:
            p[i] = p[i] - a * vi + a_next1 * vn
        else:
            p[i] = p[i] + vn


cdef void _adam(floating* p, const floating* g, floating* m, floating* v, floating* vmax,
                Py_ssize_t n, const Hyper* h) noexcept nogil:
    # s <- b1 s + (1 - b1) g;  r <- b2 r + (1 - b2) g*g                   (Alg 8.7)
    # theta <- theta - eps * s_hat / (sqrt(r_hat) + delta), with the bias corrections
    # folded into two scalars: lr = eps / (1 - b1^t) and c2 = 1 / sqrt(1 - b2^t).
    # AdamW first scales theta by decay = 1 - eps * wd; AMSGrad divides by max(r) so far.
    cdef floating lr = <floating>h.lr, wd = <floating>h.wd, eps = <floating>h.eps
    cdef floating decay = <floating>h.decay, c2 = <floating>h.c2
    cdef floating b1 = <floating>h.beta1, b1c = <floating>(1.0 - h.beta1)
    cdef floating b2 = <floating>h.beta2, b2c = <floating>(1.0 - h.beta2)
    cdef bint l2 = h.flags & FLAG_L2, amsgrad = h.flags & FLAG_AMSGRAD
    cdef floating gs = <floating>h.gscale, cv = <floating>h.clip
    cdef bint clip = h.flags & FLAG_CLIP
    cdef floating pi, gi, mi, vi
    cdef Py_ssize_t i
    for i in range(n):
        pi = p[i] * decay
        gi = _grad(g[i], gs, cv, clip)
        if l2:
            gi = gi + wd * pi
        mi = b1 * m[i] + b1c * gi
        vi = b2 * v[i] + b2c * (gi * gi)
        m[i] = mi
        v[i] = vi
        if amsgrad:
            if vmax[i] > vi:
                vi = vmax[i]
            vmax[i] = vi
        p[i] = pi - lr * (mi / (_sqrt(vi) * c2 + eps))


cdef void _adadelta(floating* p, const floating* g, floating* eg, floating* ed,
                    Py_ssize_t n, const Hyper* h) noexcept nogil:
    # E[g^2] <- rho E[g^2] + (1 - rho) g*g
    # d <- sqrt(E[dx^2] + delta) / sqrt(E[g^2] + delta) * g
    # E[dx^2] <- rho E[dx^2] + (1 - rho) d*d;  theta <- theta - lr * d    (Zeiler 2012)
    cdef floating lr = <floating>h.lr, wd = <floating>h.wd, eps = <floating>h.eps
    cdef floating rho = <floating>h.rho, rho1 = <floating>(1.0 - h.rho)
    cdef bint l2 = h.flags & FLAG_L2
    cdef floating gs = <floating>h.gscale, cv = <floating>h.clip
    cdef bint clip = h.flags & FLAG_CLIP
    cdef floating gi, egi, di
    cdef Py_ssize_t i
    for i in range(n):
        gi = _grad(g[i], gs, cv, clip)
        if l2:
            gi = gi + wd * p[i]
        egi = rho * eg[i] + rho1 * (gi * gi)
        eg[i] = egi
        di = _sqrt(ed[i] + eps) / _sqrt(egi + eps) * gi
        ed[i] = rho * ed[i] + rho1 * (di * di)
        p[i] = p[i] - lr * di


# ---------------------------------------------------------------------------------------
# Layer 2: dispatch on rule and dtype, and the table walker.
# ---------------------------------------------------------------------------------------

cdef inline void _span(floating* tag, int rule, const intptr_t* row, Py_ssize_t lo,
                       Py_ssize_t n, const Hyper* h) noexcept nogil:
    # ``tag`` only selects the dtype; ``row`` holds the tensor's column addresses.
    cdef floating* p = (<floating*>row[0]) + lo
    cdef const floating* g
    if rule == SCALE:
        _scale(p, n, h)
        return
    if rule == CLAMP:
        _clamp(p, n, h)
        return
    g = (<const floating*>row[1]) + lo
    if rule == ROOFLINE:       # h.flags holds the number of columns
        _traffic(p, g, (<floating*>row[2]) + lo if h.flags > 2 else NULL,
                 (<floating*>row[3]) + lo if h.flags > 3 else NULL,
                 (<floating*>row[4]) + lo if h.flags > 4 else NULL, n)
    elif rule == SGD:
        _sgd(p, g, n, h)
    elif rule == MOMENTUM:
        _momentum(p, g, (<floating*>row[2]) + lo, n, h)
    elif rule == ADAGRAD:
        _adagrad(p, g, (<floating*>row[2]) + lo, n, h)
    elif rule == RMSPROP:
        _rmsprop(p, g, (<floating*>row[2]) + lo, n, h)
    elif rule == RMSPROP_MOMENTUM:
        _rmsprop_momentum(p, g, (<floating*>row[2]) + lo, (<floating*>row[3]) + lo, n, h)
    elif rule == ADAM:
        _adam(p, g, (<floating*>row[2]) + lo, (<floating*>row[3]) + lo,
              (<floating*>row[4]) + lo if h.flags & FLAG_AMSGRAD else NULL, n, h)
    elif rule == ADADELTA:
        _adadelta(p, g, (<floating*>row[2]) + lo, (<floating*>row[3]) + lo, n, h)


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
            if f64:
                _span(<double*>NULL, rule, table + r * ncols, start - offsets[r],
                      end - start, h)
            else:
                _span(<float*>NULL, rule, table + r * ncols, start - offsets[r],
                      end - start, h)
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


cdef double _sumsq_block(bint f64, const intptr_t* table, Py_ssize_t ncols, int col,
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
        if end > start:
            if f64:
                _sumsq_piece(<double*>NULL,
                             (<const double*>table[r * ncols + col]) + (start - offsets[r]),
                             end - start, start % SUM_LANES, acc)
            else:
                _sumsq_piece(<float*>NULL,
                             (<const float*>table[r * ncols + col]) + (start - offsets[r]),
                             end - start, start % SUM_LANES, acc)
            start = end
        r += 1
    for j in range(SUM_LANES):
        total += acc[j]
    return total


cdef double _sumsq(bint f64, const intptr_t* table, Py_ssize_t ncols, int col,
                   const Py_ssize_t* offsets, Py_ssize_t nrows, double* blocks,
                   int n_threads) noexcept nogil:
    # Sum of squares of column ``col``, the same bits for any thread count and any split
    # of the same values into arrays: fixed blocks, each summed alone, added in order.
    cdef Py_ssize_t total = offsets[nrows]
    cdef Py_ssize_t nb = (total + SUM_BLOCK - 1) // SUM_BLOCK
    cdef Py_ssize_t b
    cdef double out = 0.0
    cdef Py_ssize_t itemsize = 8 if f64 else 4
    if n_threads > 1 and total * itemsize >= _parallel_min_bytes:
        for b in prange(nb, num_threads=n_threads, schedule='static'):
            blocks[b] = _sumsq_block(f64, table, ncols, col, offsets, nrows,
                                     b * SUM_BLOCK, min((b + 1) * SUM_BLOCK, total))
    else:
        for b in range(nb):
            blocks[b] = _sumsq_block(f64, table, ncols, col, offsets, nrows,
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
# Layer 3: tables, gradient binding and the Python entry point.
# ---------------------------------------------------------------------------------------

cdef class Guard:
    """Sorted address intervals of every array an optimizer writes (params and state).

    A gradient that overlaps one of them is refused: the update would read a value it has
    already overwritten.
    """
    cdef uintptr_t[::1] starts
    cdef uintptr_t[::1] stops
    cdef Py_ssize_t n

    def __init__(self, arrays):
        spans = sorted((a.__array_interface__["data"][0], a.nbytes) for a in arrays
                       if a.nbytes > 0)
        self.n = len(spans)
        self.starts = np.array([s for s, _ in spans] or [0], dtype=np.uintp)
        self.stops = np.array([s + nb for s, nb in spans] or [0], dtype=np.uintp)

    cdef bint overlaps(self, uintptr_t lo, uintptr_t hi) noexcept:
        # Does [lo, hi) meet any interval? The intervals are disjoint (checked by the
        # optimizer), so only the last one starting before ``hi`` can meet it.
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

    ``columns`` is a list of ``ncols - 1`` lists of arrays: the parameters first, then each
    state array; column 1 of the table (the gradients) is bound at every step. ``index``
    gives each row's position in the optimizer's list of gradients.
    """
    cdef intptr_t[:, ::1] table
    cdef Py_ssize_t[::1] offsets
    cdef Py_ssize_t[::1] index
    cdef Py_ssize_t nrows, ncols
    cdef bint f64
    cdef int typenum
    cdef tuple shapes
    cdef Py_ssize_t[::1] ndims       # each row's number of dimensions
    cdef Py_ssize_t[::1] dims        # all rows' dimensions, concatenated
    cdef Guard guard
    cdef uintptr_t[::1] checked  # each row's last gradient address found clear of the guard
    cdef list keep            # contiguous copies of non-contiguous gradients, this step
    cdef double[::1] blocks   # per-block sums of squares

    def __init__(self, list params, list states, index, Guard guard):
        cdef Py_ssize_t r, c
        self.nrows = len(params)
        self.ncols = 2 + len(states)
        self.f64 = params[0].dtype == np.float64
        self.typenum = params[0].dtype.num
        self.shapes = tuple(p.shape for p in params)
        self.ndims = np.array([p.ndim for p in params], dtype=np.intp)
        self.dims = np.array([d for p in params for d in p.shape] or [0], dtype=np.intp)
        self.guard = guard
        self.checked = np.zeros(max(1, self.nrows), dtype=np.uintp)
        self.keep = []
        self.index = np.asarray(index, dtype=np.intp).copy()
        self.table = np.zeros((self.nrows, self.ncols), dtype=np.intp)
        self.offsets = np.zeros(self.nrows + 1, dtype=np.intp)
        for r in range(self.nrows):
            self.offsets[r + 1] = self.offsets[r] + params[r].size
        n_blocks = (self.offsets[self.nrows] + SUM_BLOCK - 1) // SUM_BLOCK
        self.blocks = np.zeros(max(1, n_blocks))
        for r in range(self.nrows):
            self.table[r, 0] = params[r].__array_interface__["data"][0]
            for c in range(len(states)):
                self.table[r, 2 + c] = states[c][r].__array_interface__["data"][0]

    @property
    def size(self):
        return self.offsets[self.nrows]

    def bind(self, grads):
        """Check this table's gradients in ``grads`` and take their addresses.

        Raises TypeError/ValueError naming ``grads[i]``; writes only to the table.
        """
        cdef Py_ssize_t r, i, k, d0 = 0, nd
        cdef cnp.ndarray g
        cdef cnp.npy_intp* gd
        cdef uintptr_t lo
        cdef bint same
        if self.keep:
            self.keep.clear()
        for r in range(self.nrows):
            i = self.index[r]
            obj = grads[i]
            nd = self.ndims[r]
            if not cnp.PyArray_Check(obj):
                raise TypeError(f"grads[{i}]: expected a numpy.ndarray, got "
                                f"{type(obj).__name__}")
            g = <cnp.ndarray>obj
            if cnp.PyArray_TYPE(g) != self.typenum:
                raise TypeError(f"grads[{i}]: dtype {(<object>g).dtype} does not match its "
                                f"parameter's dtype {np.dtype(self._dtype())}")
            same = cnp.PyArray_NDIM(g) == nd
            if same:
                gd = cnp.PyArray_DIMS(g)
                for k in range(nd):
                    if gd[k] != self.dims[d0 + k]:
                        same = False
                        break
            if not same:
                raise ValueError(f"grads[{i}]: shape {(<object>g).shape} does not match its "
                                 f"parameter's shape {self.shapes[r]}")
            d0 += nd
            lo = <uintptr_t>cnp.PyArray_DATA(g)
            # The guarded arrays never move and the shape fixes the byte count, so a
            # gradient at the address checked last time is still clear of them.
            if lo != self.checked[r]:
                if self.guard.overlaps(lo, lo + <uintptr_t>cnp.PyArray_NBYTES(g)):
                    raise ValueError(f"grads[{i}] shares memory with a parameter or an "
                                     f"optimizer state array; pass a separate gradient "
                                     f"array")
                self.checked[r] = lo
            if not cnp.PyArray_IS_C_CONTIGUOUS(g):
                g = np.ascontiguousarray(g)
                self.keep.append(g)
            self.table[r, 1] = <intptr_t>cnp.PyArray_DATA(g)

    def _dtype(self):
        return np.float64 if self.f64 else np.float32

    def sumsq(self, int col=1):
        """Sum of squares of column ``col`` (1: the gradients last bound; 0: the
        parameters), in double precision, the same bits for any thread count."""
        cdef int nt = _threads()
        cdef double out
        if not 0 <= col < self.ncols:
            raise ValueError(f"col must be in [0, {self.ncols}), got {col}")
        if self.offsets[self.nrows] == 0:
            return 0.0
        with nogil:
            out = _sumsq(self.f64, &self.table[0, 0], self.ncols, col, &self.offsets[0],
                         self.nrows, &self.blocks[0], nt)
        return out

    def run(self, int rule, double lr, double wd=0.0, double decay=1.0, double alpha=0.0,
            double alpha_next=0.0, double rho=0.0, double beta1=0.0, double beta2=0.0,
            double c2=1.0, double eps=0.0, int flags=0, double gscale=1.0,
            double clip=0.0):
        """Apply ``rule`` to every row, with the gradients last bound: each gradient
        element is multiplied by ``gscale``, then clamped to [-clip, clip] if
        ``flags`` has FLAG_CLIP. Gradient copies made by ``bind`` are kept until the
        next ``bind``."""
        cdef Hyper h
        cdef int nt = _threads()
        h.lr = lr; h.wd = wd; h.decay = decay; h.alpha = alpha; h.alpha_next = alpha_next
        h.rho = rho; h.beta1 = beta1; h.beta2 = beta2; h.c2 = c2; h.eps = eps
        h.gscale = gscale; h.clip = clip
        h.flags = flags
        if self.ncols < RULE_COLUMNS[rule] + (1 if flags & FLAG_AMSGRAD else 0):
            raise ValueError("table has too few state columns for this rule")
        with nogil:
            _run(rule, self.f64, &self.table[0, 0], self.ncols, &self.offsets[0],
                 self.nrows, &h, nt)


def step_tables(list tables, Py_ssize_t[::1] groups, list args, grads, double gscale=1.0,
                int clip_flags=0, double clip=0.0, bint bind=True):
    """One optimizer step over many tables: bind every table's gradients first (so that a
    bad gradient raises before anything is written), then run each table with the kernel
    arguments of its group, ``args[groups[i]]`` (the argument tuple of ``Table.run``
    without ``gscale`` and ``clip``), OR-ing ``clip_flags`` into its flags."""
    cdef Py_ssize_t i
    cdef Table t
    cdef tuple a
    cdef Hyper h
    cdef int rule, nt = _threads()
    for i in range(len(tables)):
        a = <tuple>args[groups[i]]
        rule = a[0]
        if not 0 <= rule < N_RULES or rule == ROOFLINE or (<Table>tables[i]).ncols < (
                RULE_COLUMNS[rule] + (1 if (<int>a[11]) & FLAG_AMSGRAD else 0)):
            raise ValueError(f"rule {rule} needs more state columns than table {i} has")
    if bind:
        for i in range(len(tables)):
            (<Table>tables[i]).bind(grads)
    for i in range(len(tables)):
        t = <Table>tables[i]
        a = <tuple>args[groups[i]]
        h.lr = a[1]; h.wd = a[2]; h.decay = a[3]; h.alpha = a[4]; h.alpha_next = a[5]
        h.rho = a[6]; h.beta1 = a[7]; h.beta2 = a[8]; h.c2 = a[9]; h.eps = a[10]
        h.flags = <int>a[11] | clip_flags
        h.gscale = gscale
        h.clip = clip
        rule = a[0]
        if t.nrows:
            with nogil:
                _run(rule, t.f64, &t.table[0, 0], t.ncols, &t.offsets[0], t.nrows,
                     &h, nt)
