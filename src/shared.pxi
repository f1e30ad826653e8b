# Small helpers both sides of ch8fast's kernels use (inline, or tiny): where an element
# lies in a table, sums of squares by lane, and the element codecs of storage.h applied
# to runs of elements.

from cython cimport floating
from libc.math cimport INFINITY, NAN


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
