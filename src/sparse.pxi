# Row-sparse updates (ch8fast.sparse): the gradient of an embedding table for a minibatch
# holds a few of its rows. The rows are deduplicated once (duplicates summed in an order
# that does not depend on theirs), then one pass updates only those rows of the parameter
# and of its state, threads taking whole rows, with the same span functions as a dense
# update. Row-wise AdaGrad (one accumulator per row) runs here for dense gradients too.
#
# ``catch_up``: a row touched after dt skipped steps first gets, in closed form, what those
# steps would have done with a zero gradient (``_catch_up``); ``last_step[r]`` holds the step
# of row r's last update, ``dense_step`` that of the last update of every row.

from libc.stdint cimport int32_t, int64_t
from libc.stdlib cimport qsort

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

_SPARSE_TYPE = None


def register_sparse_type(t):
    """The class of row-sparse gradients (ch8fast.sparse.SparseRows)."""
    global _SPARSE_TYPE
    _SPARSE_TYPE = t


cdef int _cmp_double(const void* a, const void* b) noexcept nogil:
    cdef double x = (<const double*>a)[0], y = (<const double*>b)[0]
    return (x > y) - (x < y)


cdef void _catch_up(int rule, floating* p, floating* s0, floating* s1, floating* s2,
                    Py_ssize_t n, double dt, const Hyper* h) noexcept nogil:
    # dt steps of a zero gradient, in closed form: the state decays (rho^dt, beta^dt,
    # alpha^dt; centered RMSProp's average gradient by rho^dt too); momentum moves theta by
    # sum_{k=1..dt} alpha^k v = v alpha (1 - alpha^dt) / (1 - alpha) first; AdamW's
    # decoupled decay multiplies theta by decay^dt. s0.. are the rule's state columns in
    # its order (RMSProp: r[, gbar]; with momentum: r, v[, gbar]).
    cdef floating f0 = 1, f1 = 1, drift = 0, an
    cdef floating* v = NULL
    cdef floating* gbar = NULL
    cdef Py_ssize_t i
    cdef double a = h.alpha
    if rule == RMSPROP or rule == RMSPROP_MOMENTUM:
        f0 = <floating>pow(h.rho, dt)
        for i in range(n):
            s0[i] = s0[i] * f0
        if h.flags & FLAG_CENTERED:
            gbar = s1 if rule == RMSPROP else s2
            for i in range(n):
                gbar[i] = gbar[i] * f0
    if rule == MOMENTUM or rule == RMSPROP_MOMENTUM:
        v = s0 if rule == MOMENTUM else s1
        an = <floating>pow(a, dt)
        drift = <floating>(a * (1.0 - pow(a, dt)) / (1.0 - a)) if a < 1.0 else <floating>dt
        for i in range(n):
            p[i] = p[i] + drift * v[i]
            v[i] = v[i] * an
    elif rule == ADAM:
        f0 = <floating>pow(h.beta1, dt)
        f1 = <floating>pow(h.beta2, dt)
        for i in range(n):
            s0[i] = s0[i] * f0
            s1[i] = s1[i] * f1
        if h.decay != 1.0:
            f0 = <floating>pow(h.decay, dt)
            for i in range(n):
                p[i] = p[i] * f0
    elif rule == ADADELTA:
        f0 = <floating>pow(h.rho, dt)
        for i in range(n):
            s0[i] = s0[i] * f0
            s1[i] = s1[i] * f0


cdef inline void _rowwise(floating* p, const floating* g, floating* r, Py_ssize_t n,
                          const Hyper* h) noexcept nogil:
    # row-wise AdaGrad (kernels.pxi) in the step's operation sequence
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
                    const Hyper* h, Py_ssize_t nbytes, int n_threads) noexcept nogil:
    # The rows urows[0..u) with gradient rows gptr[j]; or, with urows NULL, every row r,
    # its gradient row at gdense + r d gsize. ``last`` (catch_up) is NULL without catch-up.
    cdef Py_ssize_t j, n = nrows if urows == NULL else u
    cdef int64_t r, seen
    cdef double dt
    cdef int nt = n_threads if (n_threads > 1 and nbytes >= _parallel_min_bytes
                                and n > 1) else 1
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


cdef class RowBatch:
    """The deduplicated rows of one row-sparse gradient: ``rows`` (int64, in order of
    first appearance) and a pointer to each one's gradient row (into the given values, or
    into ``buf`` where duplicates were summed or 16-bit values widened to float32)."""
    cdef readonly object rows
    cdef readonly object buf
    cdef object values
    cdef intptr_t[::1] ptrs
    cdef readonly Py_ssize_t u, d
    cdef readonly int elfmt          # the gradient rows' EL_*

    def sumsq(self):
        """Sum of squares of the rows, in double precision."""
        cdef double acc[SUM_LANES]
        cdef double out = 0.0
        cdef Py_ssize_t j, k
        for k in range(SUM_LANES):
            acc[k] = 0.0
        for j in range(self.u):
            if self.elfmt == EL_F64:
                _sumsq_piece(<double*>NULL, <const double*>self.ptrs[j], self.d, 0, acc)
            else:
                _sumsq_piece(<float*>NULL, <const float*>self.ptrs[j], self.d, 0, acc)
        for k in range(SUM_LANES):
            out += acc[k]
        return out


cdef RowBatch _dedup(object obj, cnp.ndarray param, int32_t[::1] slot, str name,
                     str pname):
    """Check a row-sparse gradient against its 2-D parameter and sum its duplicates."""
    cdef Py_ssize_t k, j, u, m, col, i, n_rows, d
    cdef int pel = _elfmt(param), vel
    cdef RowBatch b = RowBatch()
    if cnp.PyArray_NDIM(param) != 2:
        raise TypeError(f"{name}: a row-sparse gradient is for a 2-D parameter; {pname} "
                        f"has shape {(<object>param).shape}")
    n_rows = cnp.PyArray_DIMS(param)[0]
    d = cnp.PyArray_DIMS(param)[1]
    indices, values = obj.indices, obj.values
    if not isinstance(indices, np.ndarray) or indices.dtype.kind not in "iu" \
            or indices.ndim != 1:
        raise TypeError(f"{name}: indices must be a 1-D integer array, got "
                        f"{getattr(indices, 'dtype', type(indices).__name__)}")
    err = _dtype_problem(values, f"{name}.values", True)
    if err is not None:
        raise err
    vel = _elfmt(<cnp.ndarray>values)
    if vel != pel and not (vel == EL_F32 and pel >= EL_BF16):
        raise TypeError(f"{name}: values of dtype {values.dtype} do not match {pname}'s "
                        f"dtype {(<object>param).dtype}")
    if values.ndim != 2 or values.shape[0] != indices.shape[0] or values.shape[1] != d:
        raise ValueError(f"{name}: values must have shape ({indices.shape[0]}, {d}) (one "
                         f"row of {pname} per index), got {values.shape}")
    idx_arr = np.ascontiguousarray(indices, np.int64)
    cdef const int64_t[::1] idx = idx_arr
    k = idx.shape[0]
    for j in range(k):
        if not 0 <= idx[j] < n_rows:
            raise ValueError(f"{name}: index {idx[j]} (at position {j}) is out of range "
                             f"for {pname}'s {n_rows} rows")
    if not (values.flags.c_contiguous and values.flags.aligned):
        values = np.array(values, order="C", copy=True)
    b.values = values
    b.d = d
    # first appearances, and the chain of each row's later duplicates
    rows = np.empty(k, np.int64)
    first = np.empty(k, np.int64)
    count = np.zeros(k, np.int64)
    nxt = np.full(k, -1, np.int64)
    last_pos = np.empty(k, np.int64)
    cdef int64_t[::1] rw = rows, fi = first, cn = count, nx = nxt, lp = last_pos
    cdef int32_t s
    u = 0
    try:
        for j in range(k):
            s = slot[idx[j]]
            if s < 0:
                slot[idx[j]] = <int32_t>u
                rw[u] = idx[j]
                fi[u] = j
                cn[u] = 1
                lp[u] = j
                u += 1
            else:
                cn[s] += 1
                nx[lp[s]] = j
                lp[s] = j
    finally:
        for j in range(u):
            slot[rw[j]] = -1
    b.u = u
    b.rows = rows[:u]
    b.ptrs = np.empty(max(1, u), np.intp)
    wide = pel >= EL_BF16 and vel >= EL_BF16     # 16-bit values: widened to float32
    ndup = int(np.count_nonzero(count[:u] > 1))
    b.elfmt = EL_F32 if (wide or vel == EL_F32) else EL_F64
    out_dtype = np.float32 if b.elfmt == EL_F32 else np.float64
    b.buf = np.empty((u if wide else ndup, d), out_dtype)
    tmp = np.empty(max(1, int(count[:u].max()) if u else 1), np.float64)
    cdef double[::1] t = tmp
    cdef Py_ssize_t slot_out = 0, row_out
    vals = values.reshape(k, d)
    if wide:
        vf = np.empty((k, d), np.float32)
        vf.reshape(-1)[...] = decode_block_state(
            "float16" if vel == EL_F16 else "bfloat16", values.view(np.uint16).reshape(-1))
        vals = vf
    cdef cnp.ndarray buf = b.buf
    cdef Py_ssize_t vitem = cnp.PyArray_ITEMSIZE(<cnp.ndarray>vals)
    cdef intptr_t vbase = <intptr_t>cnp.PyArray_DATA(<cnp.ndarray>vals)
    cdef intptr_t bbase = <intptr_t>cnp.PyArray_DATA(buf)
    cdef bint f64 = b.elfmt == EL_F64
    for j in range(u):
        if cn[j] == 1 and not wide:
            b.ptrs[j] = vbase + fi[j] * d * vitem
            continue
        row_out = j if wide else slot_out
        if not wide:
            slot_out += 1
        if f64:
            _sum_rows(<const double*>vbase, <double*>bbase + row_out * d, d, fi[j], &nx[0],
                      cn[j], &t[0])
        else:
            _sum_rows(<const float*>vbase, <float*>bbase + row_out * d, d, fi[j], &nx[0],
                      cn[j], &t[0])
        b.ptrs[j] = bbase + row_out * d * cnp.PyArray_ITEMSIZE(buf)
    return b


cdef void _sum_rows(const floating* vals, floating* out, Py_ssize_t d, int64_t first,
                    const int64_t* nxt, Py_ssize_t m, double* tmp) noexcept nogil:
    # The rows first, nxt[first], ... (m of them) summed: each element's m contributions
    # sorted, added in double from the smallest, rounded once.
    cdef Py_ssize_t col, k, i, q
    cdef int64_t pos
    cdef double x
    for col in range(d):
        pos = first
        k = 0
        while pos >= 0:
            tmp[k] = vals[pos * d + col]
            k += 1
            pos = nxt[pos]
        if m <= 16:                        # insertion sort: few duplicates
            for i in range(1, m):
                x = tmp[i]
                q = i - 1
                while q >= 0 and tmp[q] > x:
                    tmp[q + 1] = tmp[q]
                    q -= 1
                tmp[q + 1] = x
        else:
            qsort(tmp, m, sizeof(double), _cmp_double)
        x = 0.0
        for i in range(m):
            x += tmp[i]
        out[col] = <floating>x


def sum_duplicate_rows(indices, values, Py_ssize_t n_rows):
    """``(rows, summed)`` of a row-sparse gradient over ``n_rows`` rows: the distinct
    indices in order of first appearance and each one's summed row (see ``_dedup``)."""
    if not isinstance(values, np.ndarray) or values.ndim != 2:
        raise ValueError("values must be a 2-D array")
    probe = np.empty((n_rows, values.shape[1]), values.dtype)
    slot = np.full(n_rows, -1, np.int32)
    b = _dedup(_Rows(indices, values), probe, slot, "grad", "the parameter")
    out = np.empty((b.u, values.shape[1]), np.float32 if b.elfmt == EL_F32 else np.float64)
    for j in range(b.u):
        out[j] = np.frombuffer(_row_bytes(b, j), out.dtype)
    return np.asarray(b.rows), out


cdef bytes _row_bytes(RowBatch b, Py_ssize_t j):
    cdef Py_ssize_t nb = b.d * (8 if b.elfmt == EL_F64 else 4)
    return (<char*>b.ptrs[j])[:nb]


class _Rows:
    __slots__ = ("indices", "values")

    def __init__(self, indices, values):
        self.indices, self.values = indices, values
