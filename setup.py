"""Build the Cython kernels of ch8fast.

The kernels are compiled with -O3 and -fno-math-errno (without it gcc will not vectorize
sqrt) and OpenMP. -ffp-contract=off keeps every kernel an exact sequence of IEEE
operations, so results do not depend on which instructions the compiler picks.
Never -ffast-math. Set CH8FAST_MARCH_NATIVE=1 to add -march=native for a local build.
"""
import os
import sys

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

if sys.platform == "win32":
    compile_args = ["/O2", "/openmp", "/fp:precise"]
    link_args = []
elif sys.platform == "darwin":
    compile_args = ["-O3", "-fno-math-errno", "-ffp-contract=off", "-Xpreprocessor", "-fopenmp"]
    link_args = ["-lomp"]
else:
    compile_args = ["-O3", "-fno-math-errno", "-ffp-contract=off", "-fopenmp"]
    link_args = ["-fopenmp"]

if os.environ.get("CH8FAST_MARCH_NATIVE") == "1":
    compile_args.append("-march=native")

extensions = [
    Extension(
        "ch8fast._kernels",
        ["src/_kernels.pyx"],
        include_dirs=[np.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
    )
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
