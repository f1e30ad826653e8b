"""How the buffer and the minibatches are cut between the ranks."""

import numpy as np

from ..flat import ALIGN_BYTES

__all__ = ["shard_bounds", "split_batch"]


def shard_bounds(n, world, itemsize=4, align_bytes=ALIGN_BYTES):
    """The ``world + 1`` boundaries that cut ``n`` elements into contiguous slices, one per
    rank: every boundary but the last is a multiple of ``align_bytes // itemsize``
    elements, and the slices differ by at most one aligned block (the first ranks get the
    extra blocks). ``bounds[r]:bounds[r + 1]`` is rank ``r``'s slice; it may be empty when
    there are more ranks than blocks."""
    n, world = int(n), int(world)
    if n < 0 or world < 1:
        raise ValueError(f"need n >= 0 and world >= 1, got n={n}, world={world}")
    block = max(1, align_bytes // itemsize)
    blocks = -(-n // block)
    base, extra = divmod(blocks, world)
    bounds, b = [0], 0
    for r in range(world):
        b += base + (r < extra)
        bounds.append(min(n, b * block))
    return bounds


def split_batch(batch, rank, world):
    """Rank ``rank``'s contiguous share of ``batch`` (a sequence or array of sample indices,
    or an int ``n`` meaning ``range(n)``): sizes differ by at most one, larger first, like
    ``numpy.array_split``."""
    if isinstance(batch, (int, np.integer)):
        batch = np.arange(int(batch))
    n = len(batch)
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return batch[lo:lo + base + (rank < extra)]
