"""Checks shared by the optimizers and the functional layer.

Every check runs once, before any array is written, and raises a TypeError or ValueError
that names the argument and says what was expected.
"""

import math
import numbers

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def check_param(p, name):
    """A parameter must be a writeable, C-contiguous float32/float64 ndarray.

    It is updated in place, so it is never copied or converted: a copy would take the update
    and the caller's array would not change.
    """
    if not isinstance(p, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray, got {type(p).__name__}")
    if p.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: dtype must be float32 or float64, got {p.dtype}")
    if not p.flags.c_contiguous:
        raise ValueError(f"{name}: must be C-contiguous (it is updated in place, so it "
                         f"cannot be copied); pass np.ascontiguousarray(...) and keep that "
                         f"array as the parameter")
    if not p.flags.writeable:
        raise ValueError(f"{name}: array is read-only")
    if not p.flags.aligned:
        raise ValueError(f"{name}: array is not aligned")
    return p


def check_state(a, like, name, like_name):
    """A state array: like a parameter, with the same shape and dtype as ``like``."""
    check_param(a, name)
    if a.dtype != like.dtype:
        raise TypeError(f"{name}: dtype {a.dtype} does not match {like_name}'s dtype "
                        f"{like.dtype}")
    if a.shape != like.shape:
        raise ValueError(f"{name}: shape {a.shape} does not match {like_name}'s shape "
                         f"{like.shape}")
    return a


def check_disjoint(arrays, names):
    """No two of the arrays that an update writes may share memory."""
    spans = sorted((a.__array_interface__["data"][0], a.nbytes, n)
                   for a, n in zip(arrays, names) if a.nbytes > 0)
    for (s0, nb0, n0), (s1, _, n1) in zip(spans, spans[1:]):
        if s1 < s0 + nb0:
            raise ValueError(f"{n0} and {n1} share memory; every parameter and state array "
                             f"must be a separate buffer")


def real(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    return value


def nonnegative(value, name):
    value = real(value, name)
    if not 0.0 <= value < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def positive(value, name):
    value = real(value, name)
    if not 0.0 < value < math.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def unit_interval(value, name):
    """A decay rate or momentum: in [0, 1)."""
    value = real(value, name)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return value


def betas_pair(value, name):
    if (not isinstance(value, (tuple, list)) or len(value) != 2):
        raise TypeError(f"{name} must be a pair (beta1, beta2), got {value!r}")
    return (unit_interval(value[0], f"{name}[0]"), unit_interval(value[1], f"{name}[1]"))


def step_count(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1 (the number of this update), got {value}")
    return int(value)
