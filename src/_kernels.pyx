# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""ch8fast's loops compiled for the baseline instruction set of the platform (SSE2 on
x86-64): the code is in loops.pxi; ch8fast._core runs them through ``LOOPS``."""

from cpython.pycapsule cimport PyCapsule_New

ISA = "baseline"

include "types.pxi"
include "shared.pxi"
include "loops.pxi"
