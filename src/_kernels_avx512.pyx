# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""ch8fast's loops compiled for AVX-512 (512-bit vectors): the code is in
loops.pxi; ch8fast._core runs them through ``LOOPS``."""

from cpython.pycapsule cimport PyCapsule_New

ISA = "avx512"

include "types.pxi"
include "shared.pxi"
include "loops.pxi"
