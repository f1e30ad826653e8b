# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""ch8fast's loops compiled for AVX2 (256-bit vectors) and FMA: the code is in
loops.pxi; ch8fast._core runs them through ``LOOPS``."""

from cpython.pycapsule cimport PyCapsule_New

ISA = "avx2"

include "types.pxi"
include "shared.pxi"
include "loops.pxi"
