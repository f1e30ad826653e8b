"""Minibatch sampling: index arrays of scheduled size, reshuffled every epoch (8.3.1).

A :class:`MinibatchSampler` is a stream of batches. Iterating it (``for idx in sampler``)
yields the batches of its next ``epochs`` epochs (one by default) and stops, so that

.. code-block:: python

    for epoch in range(n_epochs):
        for idx in sampler:              # one pass over the data, a new permutation
            ...

reshuffles every epoch, as a data loader does; ``next(sampler)`` draws the next batch of
the stream and never stops (for loops that count steps, not epochs). ``state_dict()`` and
``load_state_dict()`` save and restore the position in the stream exactly.
"""
from __future__ import annotations

import numbers
from typing import Any, Callable, Dict, Iterator, Optional, Union

import numpy as np

from .._validation import Integer, at_least_one, count, flag, generator

__all__ = ["MinibatchSampler", "minibatches"]

BatchSize = Union[int, Callable[[int], int]]
_epochs_started = Integer(1, what="an integer >= 1 (the epoch in progress)")


class MinibatchSampler:
    """Yield minibatch index arrays, epoch after epoch, with scheduled sizes.

    Each epoch draws a fresh permutation of ``range(n_samples)`` from the NumPy Generator,
    and cuts it into consecutive batches. The size of the batch number ``step`` (counted
    from 0 over the whole stream, like the optimizer's step) is ``batch_size(step)``, where
    ``batch_size`` is an int, a :class:`~ch8fast.schedules.BatchSizeSchedule`, or any
    callable ``step -> int``. A batch never spans two epochs: when fewer indices remain in
    the epoch than the scheduled size, the remainder is yielded as a smaller final batch
    (``drop_last=False``, the default; it still counts as a step) or discarded
    (``drop_last=True``; then a scheduled size above ``n_samples`` raises ValueError).
    With ``drop_last=False`` every epoch visits each sample exactly once.

    Iterating the sampler yields the batches of its next ``epochs`` epochs (the rest of an
    epoch in progress counts as one) and stops; ``epochs=None`` iterates without end.
    ``next(sampler)`` draws the next batch and never stops. Yielded arrays are read-only
    ``int64`` views of the epoch's permutation.

    Args:
        n_samples: the number of samples, >= 1.
        batch_size: an int >= 1, or a callable ``step -> int`` (a batch-size schedule).
        rng: None, an int seed, a SeedSequence, a bit generator or a Generator.
        drop_last: discard the last, smaller batch of every epoch.
        epochs: epochs per iteration of the sampler (an int >= 1), or None for no end.
    """

    def __init__(self, n_samples: int, batch_size: BatchSize, rng=None, *,
                 drop_last: bool = False, epochs: Optional[int] = 1):
        self.n_samples = at_least_one(n_samples, "n_samples")
        self.drop_last = flag(drop_last, "drop_last")
        if isinstance(batch_size, numbers.Integral) and not isinstance(batch_size, bool):
            batch_size = at_least_one(batch_size, "batch_size")
            if self.drop_last and batch_size > self.n_samples:
                raise ValueError(
                    f"batch_size must be <= n_samples ({self.n_samples}) with "
                    f"drop_last=True, got {batch_size}"
                )
        elif not callable(batch_size):
            raise TypeError(f"batch_size must be an int or a callable step -> int, got "
                            f"{type(batch_size).__name__}")
        self.batch_size = batch_size
        self.rng = generator(rng, "rng")
        self.epochs = None if epochs is None else at_least_one(epochs, "epochs")
        self.step = 0  # batches yielded so far
        self.epoch = 0  # epochs started so far
        self._perm = None  # permutation of the current epoch, None before it starts
        self._pos = 0
        self._epoch_rng_state = None

    def _size(self):
        bs = self.batch_size
        size = bs if isinstance(bs, int) else bs(self.step)
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
            raise ValueError(f"batch_size({self.step}) must be an int >= 1, got {size!r}")
        size = int(size)
        if self.drop_last and size > self.n_samples:
            raise ValueError(
                f"batch_size({self.step}) must be <= n_samples ({self.n_samples}) with "
                f"drop_last=True (no batch could ever be drawn), got {size}"
            )
        return size

    def _new_epoch(self):
        self._epoch_rng_state = self.rng.bit_generator.state
        perm = self.rng.permutation(self.n_samples)
        perm.flags.writeable = False
        self._perm = perm
        self._pos = 0
        self.epoch += 1

    def _epoch_over(self):
        """Whether the epoch in progress has no batch left to yield."""
        if self._perm is None:
            return False
        remaining = self.n_samples - self._pos
        return remaining == 0 or (self.drop_last and remaining < self._size())

    def __next__(self) -> np.ndarray:
        size = self._size()
        while True:
            if self._perm is None or self._pos >= self.n_samples:
                self._perm = None
                self._new_epoch()
            remaining = self.n_samples - self._pos
            if remaining < size and self.drop_last:
                self._pos = self.n_samples  # discard the remainder; next epoch
                continue
            start = self._pos
            stop = start + min(size, remaining)
            self._pos = stop
            self.step += 1
            return self._perm[start:stop]

    def __iter__(self) -> Iterator[np.ndarray]:
        return self._iterate(self.epochs)

    def _iterate(self, epochs):
        ended = 0
        while epochs is None or ended < epochs:
            batch = next(self)
            if self._epoch_over():
                ended += 1
            yield batch

    def state_dict(self) -> Dict[str, Any]:
        """JSON-able state: generator state at the start of the epoch, and position."""
        started = self._perm is not None
        return {
            "n_samples": self.n_samples,
            "drop_last": self.drop_last,
            "step": self.step,
            "epoch": self.epoch,
            "position": self._pos if started else None,
            "rng_state": self._epoch_rng_state if started else self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a state written by :meth:`state_dict` (the epoch's permutation is
        redrawn)."""
        if state["n_samples"] != self.n_samples:
            raise ValueError(
                f"state['n_samples'] must be this sampler's n_samples ({self.n_samples}), "
                f"got {state['n_samples']}"
            )
        if bool(state["drop_last"]) != self.drop_last:
            raise ValueError(f"state['drop_last'] must be this sampler's drop_last "
                             f"({self.drop_last}), got {state['drop_last']!r}")
        self.rng.bit_generator.state = state["rng_state"]
        self.step = count(state["step"], "state['step']")
        if state["position"] is None:
            self._perm = None
            self._pos = 0
            self._epoch_rng_state = None
            self.epoch = count(state["epoch"], "state['epoch']")
        else:
            self.epoch = _epochs_started(state["epoch"], "state['epoch']") - 1
            self._new_epoch()  # redraws the same permutation from the saved state
            self._pos = count(state["position"], "state['position']")

    def __repr__(self):
        return (
            f"MinibatchSampler(n_samples={self.n_samples}, batch_size={self.batch_size!r}, "
            f"drop_last={self.drop_last}, epochs={self.epochs}, step={self.step}, "
            f"epoch={self.epoch})"
        )


def minibatches(n_samples: int, batch_size: BatchSize, rng=None, *, drop_last: bool = False,
                epochs: Optional[int] = 1) -> MinibatchSampler:
    """Minibatch index arrays of scheduled size, reshuffled each epoch.

    A ``for`` loop over the result is one epoch (``epochs=1``, the default); see
    :class:`MinibatchSampler` for the arguments.

    >>> import ch8fast
    >>> sampler = ch8fast.minibatches(10, 4, rng=0)
    >>> [len(idx) for idx in sampler]          # one epoch: 4 + 4 + 2 samples
    [4, 4, 2]
    >>> sorted(int(i) for idx in sampler for i in idx) == list(range(10))   # the next epoch
    True
    """
    return MinibatchSampler(n_samples, batch_size, rng, drop_last=drop_last, epochs=epochs)
