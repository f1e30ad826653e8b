"""The memory-bandwidth yardstick of an update, for benchmarks.

An update rule with ``columns`` arrays per tensor (parameter, gradient, state) reads each
once and writes all but the gradient once. :class:`Roofline` runs a kernel that moves
exactly those bytes, with one add per element, over arrays of given sizes, with the
update's threads and chunking. Its time is the floor any single-pass update with those
arrays can reach at the machine's memory (or cache) bandwidth.
"""

import numpy as np

from ._isa import K
from ._validation import FLOAT_DTYPES

__all__ = ["Roofline"]


class Roofline:
    """The traffic of an update with ``columns`` arrays (2 to 5) over tensors of
    ``sizes`` elements of ``dtype``. Call it to run one pass.

    The arrays are filled with ``fill`` (written, so that no page is the shared zero page,
    which reads from cache and fakes bandwidth); with 0 they stay 0.
    """

    def __init__(self, sizes, dtype=np.float32, columns=4, fill=0.0):
        dtype = np.dtype(dtype)
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        if not 2 <= int(columns) <= 5:
            raise ValueError(f"columns must be in [2, 5], got {columns}")
        self.columns = int(columns)
        sizes = [int(n) for n in sizes]
        params = [np.full(n, fill, dtype) for n in sizes]
        states = [[np.full(n, fill, dtype) for n in sizes] for _ in range(self.columns - 2)]
        self._grads = [np.full(n, fill, dtype) for n in sizes]
        arrays = params + [a for col in states for a in col]
        self._table = K.Table(params, states, list(range(len(sizes))), K.Guard(arrays))
        self._table.bind(self._grads)
        self.elements = sum(sizes)
        self.bytes_per_pass = self.elements * dtype.itemsize * (2 * self.columns - 1)

    def __call__(self):
        self._table.traffic()
