"""Build the Cython kernels of ch8fast.

The kernels are compiled with -O3 and -fno-math-errno (without it gcc will not vectorize
sqrt) and OpenMP. -ffp-contract=off keeps every kernel an exact sequence of IEEE
operations: the compiler never fuses a multiply and an add by itself, so results are the
same bits whatever instructions it picks. A fused multiply-add appears only where a kernel
asks for one explicitly (C99 fma/fmaf, rounded once on every build: torch's formula
profile); the AVX2 module is built with -mfma so that those become vector instructions,
and is used only on CPUs with FMA. No fast-math flags: they change NaN, Inf and rounding
semantics.

The checks and the types Python sees (src/_core.pyx) are built once. The loops
(src/loops.pxi) are built three times on x86-64: for the baseline instruction set, for
AVX2 and for AVX-512; ``ch8fast`` picks the widest one the CPU runs, at import time, and
_core runs its loops through the table of function pointers it exports. Set
CH8FAST_MARCH_NATIVE=1 to add -march=native to a local build.
"""
import os
import platform
import sys

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")

if sys.platform == "win32":
    base_args, link_args = ["/O2", "/openmp", "/fp:precise"], []
    isa_args = {"_kernels_avx2": ["/arch:AVX2"], "_kernels_avx512": ["/arch:AVX512"]}
else:
    base_args = ["-O3", "-fno-math-errno", "-ffp-contract=off"]
    if sys.platform == "darwin":
        base_args += ["-Xpreprocessor", "-fopenmp"]
        link_args = ["-lomp"]
    else:
        base_args += ["-fopenmp"]
        link_args = ["-fopenmp"]
    isa_args = {"_kernels_avx2": ["-mavx2", "-mfma"],
                "_kernels_avx512": ["-mavx512f", "-mprefer-vector-width=512"]}

if os.environ.get("CH8FAST_MARCH_NATIVE") == "1":
    base_args.append("-march=native")

modules = ["_core", "_kernels"] + (["_kernels_avx2", "_kernels_avx512"] if X86 else [])
# (a development build of some of them only: CH8FAST_ONLY=_core,_kernels_avx2)
if os.environ.get("CH8FAST_ONLY"):
    modules = [m for m in modules if m in os.environ["CH8FAST_ONLY"].split(",")]

# The glue the rules' table makes (src/rule_table.py: rule codes, dispatch, catch-up, the
# per-step scalars), filled into src/*.pxi from its Tempita templates before Cython runs.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))
import rule_table  # noqa: E402

rule_table.generate()

extensions = [
    Extension(
        f"ch8fast.{name}",
        [f"src/{name}.pyx"],
        include_dirs=[np.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=base_args + isa_args.get(name, []),
        extra_link_args=link_args,
    )
    for name in modules
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    )
)
