"""Gradient clipping, the book's answer to cliffs and exploding gradients (8.2.4): by value
element-wise, by the global norm of all gradients, or by each array's norm.

All functions work in place on a list of gradient arrays (or one array) and run fused
``nogil`` kernels. Norms are sums of squares in double precision over fixed blocks of the
concatenated elements, added in a fixed order, so the same values give the same bits for
any thread count and for any split of them into arrays (in the same order).

The optimizers take ``clip_norm=``, ``clip_value=`` and ``skip_nonfinite=`` and fold the
clipping into the update pass itself; these functions are for code that clips on its own.
"""

import math

import numpy as np

from ._isa import K
from ._validation import check_param, positive
from .sparse import SparseRows, sum_duplicates

__all__ = ["global_norm", "clip_by_global_norm", "clip_by_norm", "clip_by_value",
           "all_finite", "norm_from_sumsq"]


def _as_list(grads, name="grads"):
    if isinstance(grads, np.ndarray):
        grads = [grads]
    elif not isinstance(grads, (list, tuple)):
        raise TypeError(f"{name} must be an array or a list of arrays, got "
                        f"{type(grads).__name__}")
    for i, g in enumerate(grads):
        check_param(g, f"{name}[{i}]", True)
    return list(grads)


def _tables(grads):
    """One kernel table per dtype, the gradients as column 0 (read or written in place)."""
    guard = K.Guard([])
    out = []     # (the arrays must not overlap each other either: one may be scaled twice)
    K.Guard(grads, [f"grads[{i}]" for i in range(len(grads))])
    for dt in dict.fromkeys(g.dtype for g in grads):
        rows = [i for i, g in enumerate(grads) if g.dtype == dt]
        out.append(K.Table([grads[i] for i in rows], [], rows, guard))
    return out


def norm_from_sumsq(sumsq, grads):
    """The 2-norm of ``grads`` from their sum of squares ``sumsq``: sqrt(sumsq), unless the
    sum overflowed (float64 squares above ~1e308 do), a rare case redone scaled by the
    largest magnitude; an Inf or NaN entry gives inf/nan."""
    if not math.isinf(sumsq):
        return math.sqrt(sumsq)
    grads = [_summed_rows(g) if isinstance(g, SparseRows) else g for g in grads]
    if not all(np.isfinite(g).all() for g in grads):
        return math.inf
    big = max(float(np.max(np.abs(g))) for g in grads if g.size)
    return big * math.sqrt(sum(float(np.sum(np.square(g / big))) for g in grads))


def _summed_rows(g):
    """The rows of a row-sparse gradient with its duplicates summed, as a step sums them
    (the norm is that of the gradient the step applies)."""
    return sum_duplicates(g.indices, g.values,
                          int(g.indices.max()) + 1 if g.indices.size else 0)[1]


def global_norm(grads):
    """The 2-norm of all gradients together, as a Python float (inf or nan when an entry
    is)."""
    grads = _as_list(grads)
    return norm_from_sumsq(sum(t.sumsq(0) for t in _tables(grads)), grads)


def all_finite(grads):
    """Whether every gradient element is finite (no NaN, no Inf)."""
    return math.isfinite(global_norm(grads))


def clip_by_global_norm(grads, max_norm):
    """Scale all gradients by ``max_norm / norm`` when their global 2-norm exceeds
    ``max_norm``, in place. Returns the norm before clipping.

    A non-finite norm (a NaN or Inf gradient) leaves the gradients unscaled; check it, or
    use an optimizer with ``skip_nonfinite=True``. ``torch.nn.utils.clip_grad_norm_``
    scales by ``max_norm / (norm + 1e-6)``; ``optax.clip_by_global_norm`` by
    ``max_norm / norm``, as here.
    """
    grads = _as_list(grads)
    max_norm = positive(max_norm, "max_norm")
    tables = _tables(grads)
    norm = norm_from_sumsq(sum(t.sumsq(0) for t in tables), grads)
    if math.isfinite(norm) and norm > max_norm:
        scale = max_norm / norm
        plan = K.GradPlan(scale=scale)
        for t in tables:
            t.transform(plan)
    return norm


def clip_by_norm(grads, max_norm):
    """Clip each array separately to 2-norm ``max_norm``, in place. Returns the norms
    before clipping, one per array."""
    grads = _as_list(grads)
    max_norm = positive(max_norm, "max_norm")
    return [clip_by_global_norm([g], max_norm) for g in grads]


def clip_by_value(grads, clip_value):
    """Clamp every gradient element to [-clip_value, clip_value], in place (NaN stays
    NaN)."""
    grads = _as_list(grads)
    clip_value = positive(clip_value, "clip_value")
    plan = K.GradPlan(clamp=clip_value)
    for t in _tables(grads):
        t.transform(plan)
