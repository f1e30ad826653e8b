# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""ch8fast's kernels compiled for the baseline instruction set of the platform (SSE2 on x86-64); the code is in kernels.pxi."""

ISA = "baseline"

include "kernels.pxi"
