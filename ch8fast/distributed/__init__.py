"""Data-parallel training over MPI, with the optimizer state optionally sharded (ZeRO-1).

Every rank (process) holds the whole model in one :class:`ch8fast.FlatParams` arena,
computes the gradient of its share of the minibatch into ``arena.flat_grad``, and calls
:meth:`DataParallel.step`, which checks that the ranks agree (step counts, configuration,
arguments), averages the gradients with one collective, lets an ordinary ch8fast optimizer
step (clipping and skipping by the global norm, decided identically on every rank) and,
with sharded state, gathers the parameters. Parameters start identical (rank 0's are
broadcast) and stay identical.

A job never hangs silently: every collective of a DataParallel is bound by a timeout
(default 300 s) after which the job is aborted with a message naming the rank, the step
and the operation, and an uncaught exception on any rank aborts the job with its
traceback (``[rank r/p]`` on every line).

The package, by job:

* :mod:`~ch8fast.distributed.collectives`: the communicator, deadlines, failing ranks,
  agreement (``get_comm``, ``ranks_on_this_host``, ``abort_on_error``,
  ``install_excepthook``, ``collective_check``);
* :mod:`~ch8fast.distributed.sharding`: how the buffer and the batches are cut
  (``shard_bounds``, ``split_batch``);
* :mod:`~ch8fast.distributed.parallel`: the data-parallel step (``DataParallel``);
* :mod:`~ch8fast.distributed.checkpoints`: sharded checkpoints (``DataParallel.save`` and
  ``load``).

mpi4py is imported only when a function here is first called, so ``import ch8fast`` works
without it. Run with e.g. ``mpirun -n 2 python train.py`` (docs/distributed.rst).
"""

from .checkpoints import DIST_CHECKPOINT_FORMAT, MANIFEST
from .collectives import (DEFAULT_TIMEOUT, abort_on_error, get_comm, install_excepthook,
                          ranks_on_this_host)
from .parallel import DataParallel, default_num_threads
from .sharding import shard_bounds, split_batch

__all__ = ["DataParallel", "abort_on_error", "install_excepthook", "shard_bounds",
           "split_batch", "get_comm", "ranks_on_this_host", "default_num_threads",
           "DEFAULT_TIMEOUT", "DIST_CHECKPOINT_FORMAT", "MANIFEST"]
