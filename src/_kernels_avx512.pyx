# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""ch8fast's kernels compiled for AVX-512 (512-bit vectors); the code is in kernels.pxi."""

ISA = "avx512"

include "kernels.pxi"
