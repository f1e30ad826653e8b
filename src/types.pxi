# The types both sides of ch8fast's kernels share: the rule and flag codes, the per-step
# scalars (``Hyper``), how arrays are stored (``Codec``), and ``Loops``, the table of the
# loops one kernel module exports. Included by the module of the checks and types
# (``_core.pyx``, compiled once) and by each kernel module (``_kernels*.pyx``, compiled
# once per instruction set): the same declarations on both sides of the capsule.

from libc.stdint cimport (intptr_t, uintptr_t, int32_t, int64_t, uint8_t, uint16_t,
                          uint32_t, uint64_t)

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
    FLAG_EPS_INSIDE = 256  # delta inside the square root: sqrt(r + delta), else outside
    FLAG_CENTERED = 512   # RMSProp: divide by sqrt(r - gbar^2), gbar the average gradient
    FLAG_BOUND = 1024     # ADOPT: clamp the normalized gradient to [-bound, bound]

include "rules.pxi"

cdef enum:
    SUM_BLOCK = 4096      # sums of squares: fixed blocks of the concatenated elements,
    SUM_LANES = 16        # each summed in 16 lanes by global index, blocks added in order
    NORM_BLOCK = 4096     # the blocks of a trust-ratio rule's per-tensor sums (a multiple
                          # of SUM_LANES and of QB)

cdef enum:
    TAIL_BYTES = 32       # the vectors of torch's fused CPU kernels (AVX2 Vectorized<T>):
                          # the last numel % (32 / itemsize) elements of a tensor take the
                          # scalar loop (FLAG_TAIL)


cdef enum:                # how the elements of a summed column are stored
    EL_F32 = 0
    EL_F64 = 1
    EL_BF16 = 2
    EL_F16 = 3


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


cdef struct Codec:
    int pfmt              # the parameter's storage: ST_F32, ST_BF16 or ST_F16
    int gfmt              # the gradients', set when they are bound
    int keep
    int nstate
    int[3] sfmt           # each state column's storage
    bint random           # some column rounds stochastically
    uint64_t key          # this step's key (random words)


# The loops of one kernel module (``_kernels*.pyx``), reached through the capsule it
# exports as ``LOOPS``. ``n_threads`` is how many threads to run on (the caller applies
# the cutoff for small calls); the results are the same bits for any value.
ctypedef void (*run_fn)(int rule, bint f64, const intptr_t* table, Py_ssize_t ncols,
                        const Py_ssize_t* offsets, Py_ssize_t nrows, const Hyper* h,
                        Py_ssize_t hstride, int n_threads) noexcept nogil
ctypedef void (*norms_fn)(int rule, bint f64, const intptr_t* table, Py_ssize_t ncols,
                          const Py_ssize_t* offsets, Py_ssize_t nrows, const Hyper* hs,
                          const Py_ssize_t* bstart, double* sums,
                          int n_threads) noexcept nogil
ctypedef void (*run_blocks_fn)(int rule, const intptr_t* table, const intptr_t* aux,
                               Py_ssize_t ncols, const Py_ssize_t* offsets,
                               const Py_ssize_t* voff, const Py_ssize_t* base,
                               Py_ssize_t nrows, const Codec* c, const Hyper* h,
                               int n_threads) noexcept nogil
ctypedef void (*run_rows_fn)(int rule, bint f64, const intptr_t* row, const intptr_t* aux,
                             Py_ssize_t ncols, const Codec* c, bint coded, bint rowwise,
                             Py_ssize_t d, Py_ssize_t nrows, const int64_t* urows,
                             const intptr_t* gptr, intptr_t gdense, Py_ssize_t gsize,
                             Py_ssize_t u, int64_t* last, int64_t* dense_step, int64_t t,
                             uint64_t index, const Hyper* h, int n_threads) noexcept nogil
ctypedef double (*sumsq_fn)(int efmt, const intptr_t* table, Py_ssize_t ncols, int col,
                            const Py_ssize_t* offsets, Py_ssize_t nrows, double* blocks,
                            int n_threads) noexcept nogil

ctypedef void (*sum_rows_fn)(bint f64, const void* vals, void* out, Py_ssize_t d,
                             int64_t first, const int64_t* nxt, Py_ssize_t m,
                             uint64_t* keys, double* acc, uint32_t* lo,
                             uint32_t* hi) noexcept nogil

cdef struct Loops:
    Py_ssize_t size       # sizeof(Loops) as the kernel module was built: a check
    run_fn run            # a rule over a table of float32/float64 arrays (or TRANSFORM,
                          # TRAFFIC)
    run_blocks_fn run_blocks    # the same over 16-bit or compressed storage, by blocks
    run_rows_fn run_rows  # the rows of one 2-D tensor (row-sparse, catch-up, row-wise)
    sumsq_fn sumsq        # the sum of squares of one column of a table
    sum_rows_fn sum_rows  # the duplicates of one row of a row-sparse gradient, summed
    norms_fn norms        # the first pass of a trust-ratio rule: per-tensor sums
