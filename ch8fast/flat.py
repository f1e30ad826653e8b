"""A flat arena: many parameters in one contiguous buffer, gradients in another.

A model built on a :class:`FlatParams` holds views into ``flat`` (its parameters) and
writes its gradients into views of ``flat_grad``. One optimizer over ``[arena.flat]`` then
updates every parameter with a single kernel call, and clipping norms run over one buffer.

>>> import numpy as np, ch8fast
>>> arena = ch8fast.FlatParams({"W1": (64, 32), "b1": (32,), "W2": (32, 10), "b2": (10,)})
>>> W1, b1 = arena["W1"], arena["b1"]              # views into arena.flat
>>> opt = ch8fast.Adam([arena.flat], lr=1e-3)
>>> arena.grad("W1")[...] = 0.5                    # the model's backward pass writes here
>>> opt.step(arena.flat_grad)
"""

import numbers
from typing import Dict, Iterator, Mapping, Sequence, Tuple, Union

import numpy as np

from . import storage
from ._validation import FLOAT_DTYPES

__all__ = ["FlatParams", "ALIGN_BYTES"]

ALIGN_BYTES = 64           # each view starts on a cache line: whole vectors, no splits


def _aligned_zeros(n, dtype):
    """n zeros whose first element sits on a cache-line boundary."""
    pad = ALIGN_BYTES // dtype.itemsize
    buf = np.zeros(n + pad, dtype)
    start = (-buf.__array_interface__["data"][0] % ALIGN_BYTES) // dtype.itemsize
    return buf[start:start + n]


class FlatParams:
    """Parameters and their gradients as views into two contiguous buffers.

    Args:
        shapes: a dict ``name -> shape`` (or a sequence of shapes, named "0", "1", ...).
        dtype: float32 (default), float64, float16 or bfloat16 ("bfloat16" needs the
            ml_dtypes package).

    Attributes:
        flat, flat_grad: the two buffers (C-contiguous, the same length; the padding
            between views, for alignment, stays zero).
        params, grads: lists of views, in the order of ``shapes``.
        names: the names, in that order.
    """

    def __init__(self, shapes: Union[Mapping[str, Union[int, Tuple[int, ...]]],
                                     Sequence[Union[int, Tuple[int, ...]]]],
                 dtype=np.float32):
        if isinstance(dtype, str) and dtype == "bfloat16":
            try:
                dtype = storage.bfloat16()
            except ImportError as exc:
                raise ImportError(f"FlatParams(dtype='bfloat16'): {exc}") from None
        dtype = np.dtype(dtype)
        if dtype not in FLOAT_DTYPES and not storage.is_16bit(dtype):
            raise TypeError(f"dtype must be float32, float64, float16 or bfloat16, got "
                            f"{dtype}")
        if isinstance(shapes, dict):
            items = list(shapes.items())
        else:
            try:
                items = [(str(i), s) for i, s in enumerate(shapes)]
            except TypeError:
                raise TypeError(f"shapes must be a dict name -> shape or a sequence of "
                                f"shapes, got {type(shapes).__name__}") from None
        if not items:
            raise ValueError("shapes must hold at least one shape, got none")
        step = ALIGN_BYTES // dtype.itemsize
        offsets, total, norm_shapes = [], 0, []
        for name, shape in items:
            if not isinstance(name, str):
                raise TypeError(f"shapes' names must be strings, got {name!r}")
            shape = (shape,) if isinstance(shape, numbers.Integral) else tuple(shape)
            if not all(isinstance(d, numbers.Integral) and d >= 0 for d in shape):
                raise ValueError(f"shapes[{name!r}] must be non-negative integers, got "
                                 f"{shape}")
            shape = tuple(int(d) for d in shape)
            size = int(np.prod(shape, dtype=np.int64))
            offsets.append(total)
            norm_shapes.append(shape)
            total += -(-size // step) * step
        self.dtype = dtype
        self.names = [n for n, _ in items]
        self.shapes = norm_shapes
        self.offsets = offsets
        self.flat = _aligned_zeros(total, dtype)
        self.flat_grad = _aligned_zeros(total, dtype)
        self.params = [self._view(self.flat, i) for i in range(len(items))]
        self.grads = [self._view(self.flat_grad, i) for i in range(len(items))]
        self._index = {n: i for i, n in enumerate(self.names)}
        if len(self._index) != len(self.names):
            dup = sorted({n for n in self.names if self.names.count(n) > 1})
            raise ValueError(f"shapes' names must be unique, got {dup} more than once")

    def _view(self, buf, i):
        size = int(np.prod(self.shapes[i], dtype=np.int64))
        return buf[self.offsets[i]:self.offsets[i] + size].reshape(self.shapes[i])

    def __getitem__(self, name: str) -> np.ndarray:
        """The parameter view called ``name``."""
        return self.params[self._index[name]]

    def grad(self, name: str) -> np.ndarray:
        """The gradient view of parameter ``name``."""
        return self.grads[self._index[name]]

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter(self.params)

    def state_arrays(self) -> Dict[str, np.ndarray]:
        """``{name: parameter view}``, e.g. for ``ch8fast.init.load_matching`` or saving."""
        return dict(zip(self.names, self.params))

    def __repr__(self):
        return (f"FlatParams({len(self.names)} arrays, {self.flat.size} elements, "
                f"{self.dtype})")
