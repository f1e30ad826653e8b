# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""ch8fast's kernels compiled for AVX2 (256-bit vectors); the code is in kernels.pxi."""

ISA = "avx2"

include "kernels.pxi"
