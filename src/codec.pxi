# The block walker: updates over arrays stored in fewer bits than they are computed in.
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

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

cdef extern from "storage.h" nogil:
    float ch8_bf16_to_f32(uint16_t h)
    uint16_t ch8_bf16_rne(float x)
    uint16_t ch8_bf16_sr(float x, uint32_t r16)
    float ch8_f16_to_f32(uint16_t h)
    uint16_t ch8_f16_rne(float x)
    uint16_t ch8_f16_sr(float x, uint32_t r16)
    uint16_t ch8_f16_rne_sat(float x)
    uint16_t ch8_bf16_rne_sat(float x)
    float ch8_e4m3_decode(uint8_t b)
    uint8_t ch8_e4m3_rne(float y)
    float ch8_e5m3_decode(uint8_t b)
    uint8_t ch8_e5m3_sr(float y, uint32_t r16, float x)
    uint32_t ch8_f2u(float f)
    float ch8_u2f(uint32_t u)
    uint32_t ch8_sel(int c, uint32_t a, uint32_t b)
    uint64_t ch8_step_key(uint64_t seed, uint64_t group, uint64_t step)
    uint32_t ch8_word(uint64_t key, uint32_t i)
    int CH8_QBLOCK

cdef enum:
    QB = 256              # = CH8_QBLOCK: elements per block (and per 8-bit scale)

# A block scale below this (the smallest normal float32, 2^-126) is encoded with the
# block multiplied by TINY_UP = 2^64 (exact), so that the scale's reciprocal never
# overflows.
cdef float TINY_SCALE = 1.1754943508222875e-38
cdef double TINY_UP = 18446744073709551616.0

# How a column is stored.
cdef enum:
    ST_F32 = 0
    ST_F64 = 1
    ST_BF16 = 2           # bfloat16, round to nearest even
    ST_F16 = 3            # float16, round to nearest even
    ST_BF16_SR = 4        # bfloat16 state, stochastic rounding (accumulators of squares)
    ST_Q8_SIGNED = 5      # E4M3 codes, nearest; a float32 absmax per block
    ST_Q8_UNSIGNED = 6    # E5M3 codes, stochastic; a float32 absmax per block

# How a 16-bit parameter is kept.
cdef enum:
    KEEP_NONE = 0         # a float32 parameter (only its state is compressed)
    KEEP_MASTER = 1       # a float32 master copy; the 16-bit array gets its rounding
    KEEP_STOCHASTIC = 2   # the 16-bit array alone, rounded stochastically
    KEEP_KAHAN = 3        # the 16-bit array plus a bfloat16 compensation (its error)

STORAGE = {"float32": ST_F32, "float64": ST_F64, "bfloat16": ST_BF16, "float16": ST_F16,
           "bfloat16_sr": ST_BF16_SR, "q8_signed": ST_Q8_SIGNED,
           "q8_unsigned": ST_Q8_UNSIGNED}
KEEP = {"none": KEEP_NONE, "master": KEEP_MASTER, "stochastic": KEEP_STOCHASTIC,
        "kahan": KEEP_KAHAN}
BLOCK = QB


cdef struct Codec:
    int pfmt              # the parameter's storage: ST_F32, ST_BF16 or ST_F16
    int gfmt              # the gradients', set when they are bound
    int keep
    int nstate
    int[3] sfmt           # each state column's storage
    bint random           # some column rounds stochastically
    uint64_t key          # this step's key (random words)


cdef inline bint _is_q8(int fmt) noexcept nogil:
    return fmt == ST_Q8_SIGNED or fmt == ST_Q8_UNSIGNED


cdef inline void _decode16(const uint16_t* x, float* out, Py_ssize_t n, int fmt) noexcept nogil:
    cdef Py_ssize_t i
    if fmt == ST_F16:
        for i in range(n):
            out[i] = ch8_f16_to_f32(x[i])
    else:
        for i in range(n):
            out[i] = ch8_bf16_to_f32(x[i])


cdef inline void _decode_q8(const uint8_t* q, float s, float* out, Py_ssize_t n,
                            int fmt) noexcept nogil:
    # x = raw(byte) * (s / 0.9375); s NaN (a block that held a NaN or an Inf) -> NaN
    cdef float d = s / <float>0.9375
    cdef Py_ssize_t i
    if fmt == ST_Q8_SIGNED:
        for i in range(n):
            out[i] = ch8_e4m3_decode(q[i]) * d
    else:
        for i in range(n):
            out[i] = ch8_e5m3_decode(q[i]) * d


cdef inline float _absmax(const float* x, Py_ssize_t n) noexcept nogil:
    # on the bit patterns: exact, order-free, and a NaN (bits above an Inf's) wins
    cdef uint32_t m = 0, a
    cdef Py_ssize_t i
    for i in range(n):
        a = ch8_f2u(x[i]) & 0x7fffffffu
        if a > m:
            m = a
    return ch8_u2f(m)


cdef inline void _encode_q8(const float* x, uint8_t* q, float* s_out, Py_ssize_t n, int fmt,
                            const uint32_t* w) noexcept nogil:
    cdef float s = _absmax(x, n), f
    cdef Py_ssize_t i
    if not s < INFINITY or s == 0:        # NaN/Inf in the block, or all zero
        for i in range(n):
            q[i] = 0
        s_out[0] = s if s == 0 else <float>NAN
        return
    s_out[0] = s
    if s < TINY_SCALE:
        # 0.9375 / s would overflow (s below ~2.8e-39): scale the block up by 2^64 first.
        # Both products are exact, so x * 2^64 * (0.9375 / (s 2^64)) rounds the same real
        # number x * 0.9375 / s that the plain loop rounds for larger scales.
        f = <float>0.9375 / (s * <float>TINY_UP)
        if fmt == ST_Q8_SIGNED:
            for i in range(n):
                q[i] = ch8_e4m3_rne((x[i] * <float>TINY_UP) * f)
        else:
            for i in range(n):
                q[i] = ch8_e5m3_sr((x[i] * <float>TINY_UP) * f, w[i] >> 16, x[i])
        return
    f = <float>0.9375 / s
    if fmt == ST_Q8_SIGNED:
        for i in range(n):
            q[i] = ch8_e4m3_rne(x[i] * f)
    else:
        for i in range(n):
            q[i] = ch8_e5m3_sr(x[i] * f, w[i] >> 16, x[i])


cdef inline void _encode16(const float* x, uint16_t* out, Py_ssize_t n, int fmt) noexcept nogil:
    cdef Py_ssize_t i
    if fmt == ST_F16:
        for i in range(n):
            out[i] = ch8_f16_rne(x[i])
    else:
        for i in range(n):
            out[i] = ch8_bf16_rne(x[i])


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
                      const Hyper* h, Py_ssize_t nbytes, int n_threads) noexcept nogil:
    cdef Py_ssize_t total = voff[nrows], chunk
    cdef int t
    if n_threads > 1 and nbytes >= _parallel_min_bytes and total > QB:
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


def encode_block_state(str storage, const float[::1] x, uint64_t key=0, uint64_t index=0):
    """The stored form of float32 values ``x`` (one tensor) in ``storage`` ("bfloat16",
    "bfloat16_sr", "q8_signed", "q8_unsigned"): ``(data, scales)``, ``scales`` None but for
    8-bit codes. Stochastic rounding draws the words of ``key`` from element ``index`` on.
    For initial state and tests; the kernels encode as they update."""
    cdef int fmt = STORAGE[storage]
    cdef Py_ssize_t n = x.shape[0], b, m, i
    cdef uint32_t w[QB]
    cdef uint8_t[::1] q
    cdef float[::1] s
    cdef uint16_t[::1] h
    if fmt in (ST_F32, ST_F64, ST_F16):
        raise ValueError(f"storage {storage!r} is not a state encoding")
    if _is_q8(fmt):
        data = np.zeros(n, np.uint8)
        scales = np.zeros((n + QB - 1) // QB, np.float32)
        q = data
        s = scales
        for b in range(0, n, QB):
            m = min(QB, n - b)
            for i in range(m):
                w[i] = ch8_word(key, <uint32_t>(index + <uint64_t>(b + i)))
            _encode_q8(&x[b], &q[b], &s[b // QB], m, fmt, w)
        return data, scales
    data = np.zeros(n, np.uint16)
    h = data
    for i in range(n):
        if fmt == ST_BF16_SR:
            h[i] = ch8_bf16_sr(x[i], ch8_word(key, <uint32_t>(index + <uint64_t>i)) >> 16)
        else:
            h[i] = ch8_bf16_rne(x[i])
    return data, None


def decode_block_state(str storage, data, scales=None):
    """float32 values of stored state (the inverse of ``encode_block_state``; exact for
    bfloat16)."""
    cdef int fmt = STORAGE[storage]
    cdef Py_ssize_t n, b, m
    cdef const uint8_t[::1] q
    cdef const float[::1] s
    cdef const uint16_t[::1] h
    cdef float[::1] o
    out = None
    if _is_q8(fmt):
        q = np.ascontiguousarray(data, np.uint8).reshape(-1)
        s = np.ascontiguousarray(scales, np.float32).reshape(-1)
        n = q.shape[0]
        if s.shape[0] != (n + QB - 1) // QB:
            raise ValueError(f"expected {(n + QB - 1) // QB} scales for {n} codes, got "
                             f"{s.shape[0]}")
        out = np.empty(n, np.float32)
        o = out
        for b in range(0, n, QB):
            m = min(QB, n - b)
            _decode_q8(&q[b], s[b // QB], &o[b], m, fmt)
        return out
    h = np.ascontiguousarray(data).view(np.uint16).reshape(-1)
    n = h.shape[0]
    out = np.empty(n, np.float32)
    o = out
    if n:
        _decode16(&h[0], &o[0], n, ST_F16 if fmt == ST_F16 else ST_BF16)
    return out


def round16(str storage, const float[::1] x, str rounding="nearest", uint64_t key=0,
            uint64_t index=0):
    """float32 values ``x`` as 16-bit bits (uint16) of ``storage`` ("bfloat16" or
    "float16"), by nearest-even or stochastic rounding (the random words of ``key`` from
    element ``index`` on, low 16 bits, as for a parameter), or nearest-even saturating at
    the largest finite value ("saturate": the 16-bit part of a "kahan" parameter)."""
    cdef int fmt = STORAGE[storage]
    cdef Py_ssize_t i, n = x.shape[0]
    cdef uint16_t[::1] o
    cdef bint sr = rounding == "stochastic"
    if fmt not in (ST_BF16, ST_F16):
        raise ValueError(f"storage must be 'bfloat16' or 'float16', got {storage!r}")
    if rounding not in ("nearest", "stochastic", "saturate"):
        raise ValueError(f"rounding must be 'nearest', 'stochastic' or 'saturate', got "
                         f"{rounding!r}")
    out = np.empty(n, np.uint16)
    o = out
    if rounding == "saturate":
        for i in range(n):
            o[i] = ch8_f16_rne_sat(x[i]) if fmt == ST_F16 else ch8_bf16_rne_sat(x[i])
        return out
    for i in range(n):
        if fmt == ST_F16:
            o[i] = (ch8_f16_sr(x[i], ch8_word(key, <uint32_t>(index + <uint64_t>i)) & 0xffffu)
                    if sr else ch8_f16_rne(x[i]))
        else:
            o[i] = (ch8_bf16_sr(x[i], ch8_word(key, <uint32_t>(index + <uint64_t>i)) & 0xffffu)
                    if sr else ch8_bf16_rne(x[i]))
    return out


def random_words(uint64_t key, uint64_t index, Py_ssize_t n):
    """The random words of elements ``index .. index + n - 1`` under ``key``."""
    out = np.empty(n, np.uint32)
    cdef uint32_t[::1] o = out
    cdef Py_ssize_t i
    for i in range(n):
        o[i] = ch8_word(key, <uint32_t>(index + <uint64_t>i))
    return out


def step_key(uint64_t seed, uint64_t group, uint64_t step):
    """The key of the random words of update number ``step`` of group ``group``."""
    return ch8_step_key(seed, group, step)
