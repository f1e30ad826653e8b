# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The checks and the Python-visible types of ch8fast's kernels, compiled once.

Everything here runs with the GIL held and checks before any kernel runs: ``Scalars`` (a
rule's per-step scalars, set by name), ``GradPlan`` (the gradient transformation of a
step, by name), ``Table`` (the arrays of one group and dtype: it keeps a reference to every
array whose address it holds, and checks the gradients and the parameters at every step),
``Engine`` (an optimizer's tables and step counters: one call binds every gradient, checks
every scalar against its dtype, runs every table and counts the step, so that an interrupt
sees the step whole or not at all), ``apply`` (one rule on caller-owned arrays, for
``ch8fast.functional``), row-sparse gradients (``RowBatch``) and the storage codecs for
Python. The loops themselves are in the kernel module of the instruction set in use
(``_kernels*.pyx``, ``loops.pxi``), reached through its ``Loops`` table: ``use_loops``.
"""

from cython cimport floating
from libc.math cimport INFINITY, NAN

cimport numpy as cnp
from cpython.mem cimport PyMem_Malloc, PyMem_Free
from cpython.pycapsule cimport PyCapsule_GetPointer
import sys

import numpy as np

cnp.import_array()

include "types.pxi"
include "shared.pxi"

cdef extern from "omp.h" nogil:
    int omp_get_max_threads()

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
# The loops in use
# ---------------------------------------------------------------------------------------

cdef const Loops* L = NULL
ISA = None


def use_loops(capsule, str isa):
    """Run the loops of a kernel module (its ``LOOPS`` capsule), built for ``isa``."""
    global L, ISA
    cdef const Loops* p = <const Loops*>PyCapsule_GetPointer(capsule, "ch8fast.Loops")
    if p.size != sizeof(Loops):
        raise ImportError(f"the {isa} kernel module was built from other sources than "
                          f"ch8fast._core; rebuild the package")
    L = p
    ISA = isa


cdef inline int _need_loops() except -1:
    if L == NULL:
        raise RuntimeError("no kernel module in use (import ch8fast, which chooses one)")
    return 0


# A call that moves fewer bytes than this (reads plus writes) runs on one thread: waking a
# thread team costs a few microseconds, more than it saves on less work. Measured with
# bench/cutoff.py on 2 cores: threads start to pay at about 224 KiB of traffic for Adam
# float32 (8k elements), 320 KiB for momentum float64 and 384 KiB for SGD float32.
cdef Py_ssize_t _parallel_min_bytes = 262144
cdef int _num_threads = 0        # 0: follow OpenMP (OMP_NUM_THREADS, threadpoolctl)


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


STORAGE = {"float32": ST_F32, "float64": ST_F64, "bfloat16": ST_BF16, "float16": ST_F16,
           "bfloat16_sr": ST_BF16_SR, "q8_signed": ST_Q8_SIGNED,
           "q8_unsigned": ST_Q8_UNSIGNED}
KEEP = {"none": KEEP_NONE, "master": KEEP_MASTER, "stochastic": KEEP_STOCHASTIC,
        "kahan": KEEP_KAHAN}
BLOCK = QB


# ---------------------------------------------------------------------------------------
# Layer 3: the Python-visible types. Everything is checked here, with the GIL held,
# before any kernel runs.
# ---------------------------------------------------------------------------------------

from numpy.ma import MaskedArray

cdef double FLOAT32_MAX = 3.4028234663852886e38

cdef enum:
    _WANT_FLAGS = cnp.NPY_ARRAY_C_CONTIGUOUS | cnp.NPY_ARRAY_ALIGNED | cnp.NPY_ARRAY_WRITEABLE


include "scalars.pxi"


FLAGS = {"l2": FLAG_L2, "nesterov": FLAG_NESTEROV, "amsgrad": FLAG_AMSGRAD,
         "clip": FLAG_CLIP, "fma": FLAG_FMA, "tail": FLAG_TAIL, "buffer": FLAG_BUFFER,
         "first": FLAG_FIRST, "eps_inside": FLAG_EPS_INSIDE, "centered": FLAG_CENTERED,
         "bound": FLAG_BOUND}


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

    Storage other than the parameters' dtype (the block walker of loops.pxi): ``storage``
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
    # row-sparse gradients and row-wise state (the row walker of loops.pxi)
    cdef bint rowwise         # row-wise AdaGrad: every row through the row walker
    cdef bint catch           # catch_up: the rows' last steps are kept
    cdef list batches         # this step's RowBatch of each row, or None
    cdef list slots           # per row: int32 marks of the rows seen while deduplicating
    cdef list last            # per row (catch_up): int64 step of each row's last update
    cdef list dense_step      # per row (catch_up): int64[1], the last update of all rows
    cdef list saved           # per row: the dense gradient a catch-up row walk takes
    cdef Py_ssize_t[::1] rowlen   # per row: the length of its rows (-1: not 2-D)
    # trust-ratio rules (two passes, per-tensor norms)
    cdef bint trust
    cdef unsigned char[::1] adapt     # per row: takes the trust ratio and weight decay
    cdef Py_ssize_t[::1] bstart       # per row: its first norm block (NORM_BLOCK)
    cdef double[::1] nsums            # per norm block: sum of theta^2, of u^2
    cdef Hyper* row_h                 # per row: the second pass's scalars

    def __init__(self, list params, list states, index, Guard guard, storage=None,
                 str keep="none", aux=None, base=None, bint rowwise=False, last=None,
                 dense_step=None, trust=None):
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
        # trust-ratio rules: ``trust`` is, per row, whether it takes the ratio
        self.trust = trust is not None
        if self.trust:
            if self.coded or rowwise or self.catch:
                raise ValueError("trust-ratio rules need float32/float64 parameters and "
                                 "state, dense")
            if len(trust) != self.nrows:
                raise ValueError("one trust flag per row")
            self.adapt = np.array([bool(x) for x in trust] or [False], np.uint8)
            self.bstart = np.zeros(self.nrows + 1, np.intp)
            for r in range(self.nrows):
                self.bstart[r + 1] = self.bstart[r] + (
                    self.offsets[r + 1] - self.offsets[r] + NORM_BLOCK - 1) // NORM_BLOCK
            self.nsums = np.zeros(max(2, 2 * self.bstart[self.nrows]))
            self.row_h = <Hyper*>PyMem_Malloc(max(1, self.nrows) * sizeof(Hyper))
            if self.row_h == NULL:
                raise MemoryError()
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

    def __dealloc__(self):
        PyMem_Free(self.row_h)

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
        cdef uintptr_t lo
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
            self._set_grad(r, lo, lo + <uintptr_t>cnp.PyArray_NBYTES(g))
        if gfmt >= 0:
            self.codec.gfmt = gfmt
        return 0

    cdef int _set_grad(self, Py_ssize_t r, uintptr_t lo, uintptr_t hi) except -1:
        # Row r's gradient is the bytes [lo, hi). The guarded arrays never move (checked
        # for the parameters; the state arrays are the optimizer's own), so a gradient over
        # the bytes checked last time is still clear of them. (Its byte count is not fixed
        # by the shape: a float32 gradient of a 16-bit parameter covers twice a 16-bit
        # one's.)
        if lo != self.checked[r] or hi != self.checked_hi[r]:
            if self.guard.overlaps(lo, hi):
                raise ValueError(f"{self.names[r][0]} shares memory with a parameter or an "
                                 f"optimizer state array; pass a separate gradient array")
            self.checked[r] = lo
            self.checked_hi[r] = hi
        self.table[r, 1] = <intptr_t>lo
        return 0

    cdef int _bind_addresses(self, list addresses) except -1:
        # Gradients given by address, by a caller that has checked each one: a C-contiguous
        # buffer of its parameter's dtype and element count, alive until the step returns
        # (ch8fast.torch's step, whose gradients are tensors). Plain tables only.
        cdef Py_ssize_t r, itemsize = 8 if self.f64 else 4
        cdef uintptr_t lo
        if self.coded or self.rowwise or self.catch or self.elfmt >= EL_BF16:
            raise ValueError("gradient addresses bind float32/float64 tables only")
        if self.keep:
            self.keep.clear()
        for r in range(self.nrows):
            self.batches[r] = None
            self._check_param(r)
            lo = <uintptr_t>addresses[self.index[r]]
            self._set_grad(r, lo, lo + <uintptr_t>(
                (self.offsets[r + 1] - self.offsets[r]) * itemsize))
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
        if self.offsets[self.nrows] * (8 if efmt == EL_F64 else (4 if efmt == EL_F32
                                                                 else 2)) < _parallel_min_bytes:
            nt = 1
        with nogil:
            out = L.sumsq(efmt, &self.table[0, 0], self.ncols, col, &self.offsets[0],
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
        _need_loops()
        return self._sumsq(col)

    cdef int _go(self, int op, const Hyper* h, uint64_t key, int64_t t=0) except -1:
        # A small update runs with the GIL held: releasing it would cost more than the
        # update (and threads would not start below the cutoff anyway).
        cdef int nt = _threads()
        cdef Py_ssize_t nbytes, r
        cdef bint rows = False
        _need_loops()
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
                    L.run_blocks(op, &self.table[0, 0], &self.aux_table[0, 0], self.ncols,
                                 &self.offsets[0], &self.voff[0], &self.base[0], self.nrows,
                                 &self.codec, h, nt)
            else:
                L.run_blocks(op, &self.table[0, 0], &self.aux_table[0, 0], self.ncols,
                             &self.offsets[0], &self.voff[0], &self.base[0], self.nrows,
                             &self.codec, h, nt)
        else:
            nbytes = active * (8 if self.f64 else 4) * (2 * self.ncols - 1)
            if nbytes < _parallel_min_bytes:
                nt = 1                    # few active elements: no thread team
            if nbytes >= _parallel_min_bytes // 4:
                if self.trust and op < N_RULES:
                    self._trust_go(op, h, nt, True)
                else:
                    with nogil:
                        L.run(op, self.f64, &self.table[0, 0], self.ncols,
                              &self.offsets[0], self.nrows, h, 0, nt)
            elif self.trust and op < N_RULES:
                self._trust_go(op, h, nt, False)
            else:
                L.run(op, self.f64, &self.table[0, 0], self.ncols, &self.offsets[0],
                      self.nrows, h, 0, nt)
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

    cdef int _trust_go(self, int op, const Hyper* h, int nt, bint release) except -1:
        # A trust-ratio rule: its first pass (per-tensor sums of theta^2 and u^2, in fixed
        # blocks), each tensor's ratio c |theta| / (|u| + e) (1 where either norm is 0, or
        # for a tensor the group excludes, which also takes no weight decay), then the
        # second pass with each tensor's rate times its ratio.
        cdef Py_ssize_t r, b
        cdef double tn, un, ratio
        cdef Hyper* hs = self.row_h
        for r in range(self.nrows):
            hs[r] = h[0]
            if not self.adapt[r]:
                hs[r].wd = 0.0
        if release:
            with nogil:
                L.norms(op, self.f64, &self.table[0, 0], self.ncols, &self.offsets[0],
                        self.nrows, hs, &self.bstart[0], &self.nsums[0], nt)
        else:
            L.norms(op, self.f64, &self.table[0, 0], self.ncols, &self.offsets[0],
                    self.nrows, hs, &self.bstart[0], &self.nsums[0], nt)
        for r in range(self.nrows):
            tn = 0.0
            un = 0.0
            for b in range(self.bstart[r], self.bstart[r + 1]):
                tn += self.nsums[2 * b]
                un += self.nsums[2 * b + 1]
            tn = sqrt(tn)
            un = sqrt(un)
            ratio = 1.0
            if self.adapt[r] and not (tn == 0.0 or un == 0.0):
                ratio = h.trust * tn / (un + h.trust_eps)
            hs[r].lr = h.lr * ratio
        if release:
            with nogil:
                L.run(op, self.f64, &self.table[0, 0], self.ncols, &self.offsets[0],
                      self.nrows, hs, 1, nt)
        else:
            L.run(op, self.f64, &self.table[0, 0], self.ncols, &self.offsets[0],
                  self.nrows, hs, 1, nt)
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
        if nbytes < _parallel_min_bytes:
            nt = 1
        with nogil:
            L.run_rows(op, self.f64, &self.table[r, 0], &self.aux_table[r, 0], self.ncols,
                       &c, self.coded, self.rowwise, d, n,
                       &urows[0] if b is not None else NULL, gptr, gdense, gsize, u,
                       lastp, dsp, t, <uint64_t>self.base[r], h, nt)
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
    cdef readonly tuple tables       # (tuples: what the kernels cast is checked here, once)
    cdef readonly tuple scalars
    cdef Py_ssize_t[::1] group_of
    cdef readonly list steps
    cdef readonly list interim
    cdef public int form
    cdef readonly uint64_t seed      # of the random words of stochastic rounding

    def __init__(self, list tables, groups, list scalars, list steps, list interim,
                 int form=0, uint64_t seed=0):
        cdef Py_ssize_t g
        for k, t in enumerate(tables):
            if type(t) is not Table:
                raise TypeError(f"tables[{k}] must be a Table, got {type(t).__name__}")
        for k, s in enumerate(scalars):
            if type(s) is not Scalars:
                raise TypeError(f"scalars[{k}] must be a Scalars, got {type(s).__name__}")
        self.tables = tuple(tables)
        self.group_of = np.asarray(groups, dtype=np.intp).copy()
        self.scalars = tuple(scalars)
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
        _need_loops()
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
        cdef Py_ssize_t i, g, r
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
                if t.trust:
                    for r in range(t.nrows):
                        if t.batches[r] is not None:
                            raise ValueError(
                                f"{t.names[r][0]} is row-sparse: a trust-ratio rule "
                                f"scales each tensor by the norms of all of it; pass "
                                f"the dense gradient")
                (<Scalars>self.scalars[g]).fill(
                    &hs[i], plan, <long long>self.steps[g] + 1, t.f64, t.ncols,
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

    def step_addresses(self, list addresses, GradPlan plan not None, int form):
        """``step`` with each gradient given by the address of its data: a C-contiguous
        buffer of its parameter's dtype and element count, checked by the caller, alive
        until this returns (float32/float64 tables only; the overlap of each with what the
        step writes is checked here)."""
        for t in self.tables:
            (<Table>t)._bind_addresses(addresses)
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
    cdef int nt
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
    _need_loops()
    nt = _threads()
    if offsets[1] * (8 if f64 else 4) * (2 * (n + 2) - 1) < _parallel_min_bytes:
        nt = 1
    with nogil:
        L.run(s.code, f64, row, n + 2, offsets, 1, &h, 0, nt)


# ---------------------------------------------------------------------------------------
# Storage, for Python (initial state, tests); the kernels encode as they update
# ---------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------
# Row-sparse gradients: checked and deduplicated here; their rows are walked by
# ``Loops.run_rows``
# ---------------------------------------------------------------------------------------

_SPARSE_TYPE = None


def register_sparse_type(t):
    """The class of row-sparse gradients (ch8fast.sparse.SparseRows)."""
    global _SPARSE_TYPE
    _SPARSE_TYPE = t


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


_SCRATCH = {}


cdef cnp.ndarray _scratch(str name, Py_ssize_t n, dtype):
    """A reusable array of at least ``n`` elements for the sums of duplicates (kept
    between steps, so that a large batch does not map fresh pages every step; only used
    with the GIL held)."""
    a = _SCRATCH.get(name)
    if a is None or a.shape[0] < n:
        a = _SCRATCH[name] = np.empty(max(1, n), dtype)
    return a


cdef RowBatch _dedup(object obj, cnp.ndarray param, int32_t[::1] slot, str name,
                     str pname):
    """Check a row-sparse gradient against its 2-D parameter and sum its duplicates."""
    _need_loops()
    cdef Py_ssize_t k, j, u, n_rows, d
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
    # (one allocation for the five; every entry read below is written first)
    work = np.empty((5, k), np.int64)
    rows, first, count, nxt, last_pos = work
    cdef int64_t[::1] rw = rows, fi = first, cn = count, nx = nxt, lp = last_pos
    cdef int32_t s
    u = 0
    try:
        for j in range(k):
            nx[j] = -1
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
    vals = values.reshape(k, d)
    if wide:
        vf = np.empty((k, d), np.float32)
        vf.reshape(-1)[...] = decode_block_state(
            "float16" if vel == EL_F16 else "bfloat16", values.view(np.uint16).reshape(-1))
        vals = vf
    cdef cnp.ndarray buf = b.buf
    cdef Py_ssize_t vitem = cnp.PyArray_ITEMSIZE(<cnp.ndarray>vals)
    cdef Py_ssize_t bitem = cnp.PyArray_ITEMSIZE(buf)
    cdef intptr_t vbase = <intptr_t>cnp.PyArray_DATA(<cnp.ndarray>vals)
    cdef intptr_t bbase = <intptr_t>cnp.PyArray_DATA(buf)
    cdef Py_ssize_t nout = 0
    if u:
        mx = int(np.max(count[:u]))
        keys_arr = _scratch("keys", 2 * mx, np.uint64)
        acc_arr = _scratch("acc", d, np.float64)
        lo_arr = _scratch("lo", d, np.uint32)
        hi_arr = _scratch("hi", d, np.uint32)
    for j in range(u):
        if cn[j] == 1 and not wide:            # it appears once: its values in place
            b.ptrs[j] = vbase + fi[j] * d * vitem
            continue
        # (the loops of this instruction set: the one-pass sum vectorizes)
        L.sum_rows(b.elfmt == EL_F64, <const void*>vbase, <void*>(bbase + nout * d * bitem),
                   d, fi[j], &nx[0], cn[j], <uint64_t*>cnp.PyArray_DATA(keys_arr),
                   <double*>cnp.PyArray_DATA(acc_arr), <uint32_t*>cnp.PyArray_DATA(lo_arr),
                   <uint32_t*>cnp.PyArray_DATA(hi_arr))
        b.ptrs[j] = bbase + nout * d * bitem
        nout += 1
    return b


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
