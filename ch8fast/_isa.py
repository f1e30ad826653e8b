"""Pick the kernel module built for the widest instruction set this CPU runs.

``K`` is ``ch8fast._core``, the checks and types every module uses (built once); the loops
it runs come from one of the kernel modules (``_kernels``, ``_kernels_avx2``,
``_kernels_avx512``), through the table of function pointers each exports.

All variants compute the same IEEE operations in the same order (the compiler contracts
nothing into fused multiply-adds; the fused multiply-adds of torch's formula profile are
explicit C99 fma calls, rounded once on every build), so they give the same bits; only
their speed differs. The AVX2 module is built with FMA and used only on CPUs with both. Set
CH8FAST_ISA=baseline, avx2 or avx512 to choose one (an unavailable choice is an error).
"""

import importlib
import os

ISAS = ("avx512", "avx2", "baseline")
_MODULES = {"baseline": "_kernels", "avx2": "_kernels_avx2",
            "avx512": "_kernels_avx512"}


def load(isa):
    """The kernel module for ``isa``, or None when it is not built or the CPU lacks it.

    The CPU is asked first, by the baseline module: a module built for a wider
    instruction set may use it as soon as it is imported."""
    from . import _core
    if not _core.cpu_supports(isa):
        return None
    try:
        return importlib.import_module(f"{__package__}.{_MODULES[isa]}")
    except ImportError:
        return None


def available():
    """The instruction sets whose kernels are built and run on this CPU, widest first."""
    return [isa for isa in ISAS if load(isa) is not None]


def _choose():
    wanted = os.environ.get("CH8FAST_ISA", "").strip().lower()
    if wanted:
        if wanted not in _MODULES:
            raise ImportError(f"CH8FAST_ISA={wanted!r}: expected one of {list(_MODULES)}")
        mod = load(wanted)
        if mod is None:
            raise ImportError(f"CH8FAST_ISA={wanted!r}: not built or not supported by "
                              f"this CPU (available: {available()})")
        return mod
    for isa in ISAS:
        mod = load(isa)
        if mod is not None:
            return mod
    raise ImportError("no ch8fast kernel module could be loaded")


from . import _core as K  # noqa: E402

_mod = _choose()
K.use_loops(_mod.LOOPS, _mod.ISA)


def use(isa):
    """Run the loops built for ``isa`` from now on (for tests and benchmarks that compare
    the builds); returns the instruction set in use before."""
    mod = load(isa)
    if mod is None:
        raise ValueError(f"no kernels for {isa!r} here (available: {available()})")
    before = K.ISA
    K.use_loops(mod.LOOPS, mod.ISA)
    return before


_requested = 0                # the n > 0 last given to set_num_threads; 0: none


def set_num_threads(n):
    """Use ``n`` threads in the kernels; ``n <= 0`` follows OpenMP again
    (OMP_NUM_THREADS, threadpoolctl). Results are the same bits for any ``n``."""
    global _requested
    n = int(n)
    _requested = max(n, 0)
    set_default_num_threads(n)


def requested_num_threads():
    """The thread count given to :func:`set_num_threads` (0: none, or reset with n <= 0)."""
    return _requested


def set_default_num_threads(n):
    """Use ``n`` kernel threads without counting as a choice of the user's (what
    ch8fast.distributed does for each rank: an explicit setting wins)."""
    K.set_num_threads(int(n))


def get_num_threads():
    """The number of threads a large enough update runs on."""
    return K.get_num_threads()


def isa():
    """The instruction set of the kernels in use: "avx512", "avx2" or "baseline"."""
    return K.ISA
