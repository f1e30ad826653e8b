"""The data-parallel step: check that the ranks agree, reduce the gradients, let the
optimizer step, gather the parameters.

One step of :class:`DataParallel` is

1. the step check: one allgather of five integers per rank (a constant that marks a step
   check, the steps this rank's optimizer has made, a hash of its configuration,
   ``local_size`` and ``global_size``), from which every rank reaches the same verdict: a
   rank out of step, with another configuration, calling ``step()`` with other arguments
   or in another collective call makes every rank that sees it raise, naming the ranks,
   before any array changes;
2. the gradient reduction: one in-place ``Allreduce`` of ``arena.flat_grad`` (or a
   ``Reduce_scatter`` into this rank's slice), after weighting each rank's gradient by
   its share of the batch, or followed by the division by the number of ranks;
3. the optimizer's own ``step(grads, grad_norm=...)``: with clipping or skipping, the
   global norm of the averaged gradient (from the norms of every rank's slice, the same
   bits on every rank and in both modes) decides, with the optimizer's counters and skip
   logic;
4. with sharded state, one in-place ``Allgatherv`` of the parameters.

Every collective is bound by the timeout (:mod:`ch8fast.distributed.collectives`).
"""

import contextlib
import hashlib
import math
import operator
import os
import secrets

import numpy as np

from .. import _isa, storage
from .._validation import count, flag, nonnegative, positive
from ..clip import global_norm
from ..flat import ALIGN_BYTES
from ..optim import Optimizer, encode_hyperparameter
from ..sparse import SparseRows
from . import checkpoints
from .collectives import (DEFAULT_TIMEOUT, Collectives, by_value, get_comm,
                          install_excepthook, mismatched_calls, mpi, ranks_on_this_host)
from .sharding import shard_bounds

__all__ = ["DataParallel", "default_num_threads"]

_NONE, _BAD = -1, -2          # step check: an argument not given, or refused
_STEP_CHECK = 0x6368386661737431   # "ch8fast1": the first integer of a step check's row
DENSE_ROWS_ABOVE = 2.0        # reduce_rows: allreduce a dense buffer above this


def default_num_threads(ranks_here, cores=None, affinity=None):
    """The kernel threads of one of ``ranks_here`` ranks on a host: its share of the
    host's cores (``os.cpu_count()``), at most the cores it may run on
    (``os.sched_getaffinity``), at least 1."""
    cores = cores or os.cpu_count() or 1
    if affinity is None:
        try:
            affinity = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            affinity = cores
    return max(1, min(affinity, cores // max(1, ranks_here)))


def _describe_hyperparameter(name, value):
    if callable(value) and not hasattr(value, "to_dict"):
        raise TypeError(
            f"{name} is a plain callable "
            f"({getattr(value, '__qualname__', type(value).__name__)}"
            f"): DataParallel cannot check that every rank has the same one, and a "
            f"checkpoint cannot save it; use a ch8fast.schedules schedule (compared by "
            f"content)")
    return encode_hyperparameter(value)


def _disagreement(key, values):
    """``key`` and every rank's value of it, for the message of the agreement check. For
    the arena's layout (a list of ``[name, shape, offset]``, or None), the first tensor
    where a rank's differs from rank 0's."""
    if key != "layout" or not all(isinstance(v, list) for v in values):
        return f"{key} (" + ", ".join(f"rank {r}: {v!r}"
                                     for r, v in enumerate(values)) + ")"

    def tensor(layout, i):
        if i >= len(layout):
            return "no tensor"
        name, shape, offset = layout[i]
        return f"{name!r} {tuple(shape)} at offset {offset}"
    first = values[0]
    parts = []
    for r, v in enumerate(values[1:], 1):
        if v != first:
            i = next((i for i, (a, b) in enumerate(zip(first, v)) if a != b),
                     min(len(first), len(v)))
            parts.append(f"tensor {i}: {tensor(first, i)} on rank 0, {tensor(v, i)} on "
                         f"rank {r}")
    return "the arena's layout (names, shapes, offsets): " + "; ".join(parts)


def _fixed(name, doc, attr=None):
    """A read-only attribute of DataParallel (stored as ``attr``, default ``_name``): the
    collectives, the optimizer's tables and the shards hold what it names, so replacing it
    would be ignored or worse."""
    attr = attr or "_" + name

    def get(self):
        return getattr(self, attr)

    def refuse(self, value):
        raise AttributeError(f"DataParallel.{name} cannot be replaced: the step's "
                             f"collectives and the optimizer hold it (write into the "
                             f"arrays in place, or make a new DataParallel)")
    return property(get, refuse, doc=doc)


class DataParallel:
    """Data-parallel training of the parameters in ``arena`` with a ch8fast optimizer.

    Args:
        arena: a :class:`ch8fast.FlatParams` (or any object with 1-D C-contiguous
            ``flat`` and ``flat_grad`` of one float dtype and length; float32 gradients
            are accepted for 16-bit parameters). The model's parameters are views of
            ``arena.flat``; its backward pass writes into ``arena.flat_grad``. 16-bit
            gradients are widened into a float32 buffer, ``dp.averaged_grad``, and
            reduced there. Every rank's arena must have the same size, dtype and layout
            (the names, shapes and offsets of a FlatParams' tensors): construction
            compares them.
        optimizer: a ch8fast optimizer class (``ch8fast.Adam``) or its name (``"Adam"``).
        comm: an mpi4py communicator (default ``MPI.COMM_WORLD``).
        shard_state: keep optimizer state only for this rank's slice (ZeRO stage 1).
        grad_sync: ``"allreduce"`` (default) or, with ``shard_state``,
            ``"reduce_scatter"``: each rank receives only the summed gradients of its own
            slice (half the traffic of an allreduce). ``arena.flat_grad`` then keeps this
            rank's own gradients, and the summation order of a reduce-scatter may differ
            from the allreduce's for more than two ranks (equal to rounding, not bitwise).
            After a step with the allreduce and ``shard_state``, and without sample
            counts, only this rank's slice of ``arena.flat_grad`` is divided by the
            number of ranks; the rest holds the summed gradients.
        broadcast: copy rank 0's parameters to every rank first (default True). With
            False the parameters must already be identical: construction compares them.
        timeout: seconds a rank may wait in one collective (default 300) before the job
            is aborted with a message naming the rank, the step and the operation;
            None waits forever.
        check_steps: the per-step check that the ranks agree (default True; it costs one
            allgather of five integers per step).
        **opt_kwargs: the optimizer's hyperparameters (``lr=...``; schedules from
            ``ch8fast.schedules``, compared across ranks by content; plain callables are
            refused) and ``clip_norm``, ``clip_value``, ``skip_nonfinite``,
            ``state_format`` and ``seed`` (with ``state_format="q8"`` the slices start on
            a block of 256 elements, and each slice's stochastic rounding draws the bits
            of its place in the buffer: sharded state gives the bits of unsharded). The
            norm for ``clip_norm`` and ``skip_nonfinite`` is that of the averaged gradient
            over the whole buffer, the same on every rank.

    Every rank must make the same calls in the same order (they are collective):
    ``step``, ``check_in_sync``, ``memory_report``, ``save``, ``load``, ``at_theta``,
    ``reduce_rows``. A rank found in another call than the others (one that some ranks
    skipped) makes the ranks that find it raise a RuntimeError that says so.

    Its attributes (``optimizer``, ``flat``, ``flat_grad``, ``bounds``, ...) are read-only:
    the collectives and the optimizer hold what they name. ``steps``, ``skipped_steps`` and
    ``last_grad_norm`` are the optimizer's counters and last norm.
    """

    comm = _fixed("comm", "The communicator.")
    rank = _fixed("rank", "This rank.")
    world = _fixed("world", "The number of ranks.")
    timeout = _fixed("timeout", "Seconds a rank may wait in a collective (None: forever).")
    check_steps = _fixed("check_steps", "Whether each step checks that the ranks agree.")
    arena = _fixed("arena", "The arena given at construction.")
    flat = _fixed("flat", "``arena.flat``: every parameter, one 1-D array.")
    shard_state = _fixed("shard_state", "Whether the state is sharded over the ranks.")
    grad_sync = _fixed("grad_sync", "``'allreduce'`` or ``'reduce_scatter'``.")
    bounds = _fixed("bounds", "The shards' bounds in ``flat``: rank r's is "
                    "``[bounds[r], bounds[r + 1])``.")
    lo = _fixed("lo", "The start of this rank's shard in ``flat``.")
    hi = _fixed("hi", "The end of this rank's shard in ``flat``.")
    param_view = _fixed("param_view", "The parameters this rank's optimizer updates: its "
                        "shard of ``flat`` (all of it, unsharded).")
    grad_view = _fixed("grad_view", "The averaged gradient of ``param_view`` after a step.")
    optimizer = _fixed("optimizer", "This rank's optimizer (of ``param_view``).")

    flat_grad = _fixed("flat_grad", "``arena.flat_grad``: where the backward pass writes "
                       "this rank's gradient. For float32 and float64 arenas a step "
                       "averages it in place.", attr="_user_grad")

    @property
    def averaged_grad(self):
        """The buffer that holds the averaged gradient after a step: ``flat_grad`` itself,
        or, for 16-bit gradients, the float32 buffer they are widened into (see
        ``grad_view`` for this rank's part of it with a reduce-scatter)."""
        return self._grad

    def __init__(self, arena, optimizer, comm=None, *, shard_state=False,
                 grad_sync="allreduce", broadcast=True, timeout=DEFAULT_TIMEOUT,
                 check_steps=True, **opt_kwargs):
        self._MPI = mpi()
        self._comm = comm = get_comm(comm)
        self._rank, self._world = comm.Get_rank(), comm.Get_size()
        self._in_step = False
        self._row_calls = 0
        if self.world > 1:
            install_excepthook(comm)
        # Check and build locally, then compare once: a rank whose arguments are bad, or
        # that disagrees with the others (which would make the collectives mismatch, or
        # the ranks train apart), makes every rank raise.
        error, mine = None, None
        try:
            timeout = None if timeout is None else positive(timeout, "timeout")
        except (TypeError, ValueError) as exc:
            error, timeout = exc, DEFAULT_TIMEOUT
        self._timeout = timeout
        self._coll = coll = Collectives(comm, timeout, self._where)
        if error is None:
            try:
                mine = self._setup(arena, optimizer, shard_state, grad_sync, broadcast,
                                   check_steps, opt_kwargs)
            except Exception as exc:         # raised below, once every rank knows
                error = exc
        token = secrets.randbits(62) if self.rank == 0 else None
        everyone = coll.allgather("the agreement check of DataParallel()",
                                  (None if error is None else
                                   f"{type(error).__name__}: {error}", mine, token))
        failed = [(r, m) for r, (m, _, _) in enumerate(everyone) if m is not None]
        if error is not None:
            raise error
        if failed:
            raise ValueError("DataParallel: " + "; ".join(f"rank {r}: {m}"
                                                          for r, m in failed))
        differ = [k for k in mine if any(other[k] != mine[k] for _, other, _ in everyone)]
        if differ:
            raise ValueError("DataParallel: the ranks disagree on " + "; ".join(
                _disagreement(k, [other[k] for _, other, _ in everyone]) for k in differ))
        self._token = everyone[0][2]
        self._config = (None, None)
        if self.world > 1:
            here = coll.run("ranks_on_this_host() in DataParallel()", ranks_on_this_host,
                            comm)
            if not (_isa.requested_num_threads() or
                    os.environ.get("OMP_NUM_THREADS", "").strip()):
                _isa.set_default_num_threads(default_num_threads(here))
            if broadcast:
                coll.run("the broadcast of rank 0's parameters in DataParallel()",
                         comm.Bcast, self._param_msg, root=0)
            else:
                off = self._out_of_sync()
                if off:
                    raise ValueError(f"DataParallel(broadcast=False): the parameters of "
                                     f"rank(s) {off} differ from rank 0's; pass "
                                     f"broadcast=True to start from rank 0's")

    def _setup(self, arena, optimizer, shard_state, grad_sync, broadcast, check_steps,
               opt_kwargs):
        """Check the arguments and build this rank's optimizer; returns what every rank
        must agree on."""
        import ch8fast
        flat, flat_grad = getattr(arena, "flat", None), getattr(arena, "flat_grad", None)
        for name, a in (("arena.flat", flat), ("arena.flat_grad", flat_grad)):
            if not isinstance(a, np.ndarray):
                raise TypeError(f"{name} must be a numpy.ndarray (pass a "
                                f"ch8fast.FlatParams), got {type(a).__name__}")
            if a.ndim != 1 or not a.flags.c_contiguous or not a.flags.writeable:
                raise ValueError(f"{name} must be 1-D, C-contiguous and writeable")
            if a.dtype not in (np.float32, np.float64) and not storage.is_16bit(a.dtype):
                raise TypeError(f"{name} must be float32, float64, float16 or bfloat16, "
                                f"got {a.dtype}")
        wide16 = storage.is_16bit(flat.dtype) and flat_grad.dtype == np.float32
        if flat.shape != flat_grad.shape or (flat.dtype != flat_grad.dtype and not wide16):
            raise ValueError(f"arena.flat ({flat.size} {flat.dtype}) and arena.flat_grad "
                             f"({flat_grad.size} {flat_grad.dtype}) must match (float32 "
                             f"gradients are accepted for 16-bit parameters)")
        if np.shares_memory(flat, flat_grad):
            raise ValueError("arena.flat and arena.flat_grad share memory")
        if isinstance(optimizer, str):
            cls = getattr(ch8fast, optimizer, None)
            if not (isinstance(cls, type) and issubclass(cls, Optimizer)):
                raise ValueError(f"unknown optimizer {optimizer!r}")
            optimizer = cls
        if not (isinstance(optimizer, type) and issubclass(optimizer, Optimizer)):
            raise TypeError(f"optimizer must be a ch8fast optimizer class or its name, got "
                            f"{optimizer!r}")
        rule = optimizer.rule
        if rule.trust_ratio:
            raise ValueError(f"optimizer: {rule.name} scales each parameter array by its "
                             f"own norms, and DataParallel updates one flat buffer (one "
                             f"ratio for the whole model); it is not supported here")
        if grad_sync not in ("allreduce", "reduce_scatter"):
            raise ValueError(f"grad_sync must be 'allreduce' or 'reduce_scatter', got "
                             f"{grad_sync!r}")
        shard_state = flag(shard_state, "shard_state")
        broadcast = flag(broadcast, "broadcast")
        self._check_steps = flag(check_steps, "check_steps")
        if grad_sync == "reduce_scatter" and not shard_state:
            raise ValueError("grad_sync='reduce_scatter' needs shard_state=True (without "
                             "sharding every rank needs every averaged gradient)")
        for k, v in opt_kwargs.items():
            _describe_hyperparameter(k, v)

        self._arena, self._flat = arena, flat
        # The gradients are reduced in float32 or float64: 16-bit gradients are widened
        # (exactly) into a float32 buffer first, which is then the averaged gradient.
        self._user_grad = flat_grad
        self._widen = storage.is_16bit(flat_grad.dtype)
        self._grad = np.zeros(flat.size, np.float32) if self._widen else flat_grad
        self._shard_state, self._grad_sync = shard_state, grad_sync
        if "element_offset" in opt_kwargs:
            raise ValueError("element_offset is DataParallel's to set (each rank's slice "
                             "starts at its offset in the buffer, so that stochastic "
                             "rounding draws the bits of one process); leave it out")
        # 8-bit state has a scale per block of storage.BLOCK elements: slices that start
        # on a block give every rank the blocks one process has (the same bits)
        align = ALIGN_BYTES
        if opt_kwargs.get("state_format") == "q8":
            align = max(ALIGN_BYTES, storage.BLOCK * flat.dtype.itemsize)
        self._bounds = shard_bounds(flat.size, self.world, flat.dtype.itemsize, align)
        self._lo, self._hi = self.bounds[self.rank], self.bounds[self.rank + 1]
        g_dtype = self._grad.dtype
        self._mpi_type = self._MPI.FLOAT if g_dtype == np.float32 else self._MPI.DOUBLE
        # the parameters travel as their bits (MPI has no 16-bit float type)
        if storage.is_16bit(flat.dtype):
            self._param_msg = [flat.view(np.uint16), self._MPI.UINT16_T]
        else:
            self._param_msg = [flat, self._mpi_type]
        self._counts = [self.bounds[r + 1] - self.bounds[r] for r in range(self.world)]
        self._displs = self.bounds[:-1]
        if self.shard_state:
            self._param_view = flat[self.lo:self.hi]
            self._grad_view = (np.zeros(self.hi - self.lo, g_dtype)
                               if grad_sync == "reduce_scatter" and self.world > 1
                               else self._grad[self.lo:self.hi])
        else:
            self._param_view, self._grad_view = flat, self._grad
        if self.shard_state:
            opt_kwargs = dict(opt_kwargs, element_offset=self.lo)
        self._optimizer = opt = optimizer([self.param_view], **opt_kwargs)
        self._row = np.array([_STEP_CHECK, 0, 0, 0, 0], np.int64)
        # the step check's key of a group: its hyperparameters as objects
        self._hyper_of = operator.itemgetter(*(k for k in opt.param_groups[0]
                                               if k != "params"))
        self._table = np.zeros(5 * self.world, np.int64)
        self._norms = np.zeros(self.world, np.float64)
        return {"size": flat.size, "dtype": flat.dtype.name,
                "layout": checkpoints.arena_layout(arena),
                "grad_dtype": self._user_grad.dtype.name, "optimizer": optimizer.__name__,
                "shard_state": shard_state, "grad_sync": grad_sync, "broadcast": broadcast,
                "check_steps": self.check_steps, **self._options(opt),
                "hyperparameters": self._hyperparameters(opt)}

    @staticmethod
    def _options(opt):
        return {"clip_norm": opt.clip_norm, "clip_value": opt.clip_value,
                "skip_nonfinite": opt.skip_nonfinite, "state_format": opt.state_format,
                "seed": opt.seed}

    @staticmethod
    def _hyperparameters(opt):
        return [{k: _describe_hyperparameter(k, v) for k, v in g.items() if k != "params"}
                for g in opt.param_groups]

    def _where(self):
        """Where this rank is, for the watchdog's message."""
        opt = getattr(self, "optimizer", None)
        if opt is None:
            return "while constructing DataParallel"
        done = opt.steps[0] + opt.skipped_steps
        return f"step {done + 1}" if self._in_step else f"after {done} steps"

    # ---- one step -----------------------------------------------------------------------

    def step(self, local_size=None, global_size=None):
        """Average the gradients in ``arena.flat_grad`` over the ranks and update the
        parameters on every rank. Collective.

        ``local_size``: the number of samples this rank's gradient (a mean over them) was
        computed from. Given, each rank's gradient is weighted by ``local_size /
        global_size``, which gives the exact mean over the whole batch for uneven
        shards; a rank with no samples contributes zeros. ``global_size`` is the sum of
        ``local_size`` over the ranks: it is computed if not given (in the step check,
        at no extra cost), and checked if given. Every rank must pass the same kind of
        arguments. Without ``local_size`` the gradients are summed and divided by the
        number of ranks. Returns the global gradient norm when clipping or skipping
        needed it, else None.

        Raises (on every rank, before anything changes) ValueError when a rank's
        arguments are bad or differ in kind from the others', RuntimeError when the
        ranks are out of step or configured differently.
        """
        opt, g, world = self.optimizer, self._grad, self.world
        self._in_step = True
        try:
            local_size, global_size = self._agree_on_step(opt, local_size, global_size)
            if self._widen:
                np.copyto(g, self._user_grad)
            if local_size is not None:
                if local_size == 0:
                    g[...] = 0
                elif local_size != global_size:
                    np.multiply(g, g.dtype.type(local_size / global_size), out=g)
            if world > 1:
                self._reduce(g)
                if local_size is None:
                    np.divide(self.grad_view, g.dtype.type(world), out=self.grad_view)
            norm = None
            if opt.clip_norm is not None or opt.skip_nonfinite:
                norm = self._global_norm()
            # the optimizer's own step: clipping and skipping by the global norm, its
            # counters
            before = opt.skipped_steps
            opt.step(self.grad_view, grad_norm=norm)
            if self.shard_state and world > 1 and opt.skipped_steps == before:
                self._allgather()
            return norm
        finally:
            self._in_step = False

    def _reduce(self, g):
        MPI, comm = self._MPI, self.comm
        if self.grad_sync == "reduce_scatter":
            self._coll.run("the gradient reduce-scatter", comm.Reduce_scatter,
                           [g, self._mpi_type], [self.grad_view, self._mpi_type],
                           self._counts, op=MPI.SUM)
        else:
            self._coll.run("the gradient allreduce", comm.Allreduce, MPI.IN_PLACE,
                           [g, self._mpi_type], op=MPI.SUM)

    # ---- row-sparse gradients -----------------------------------------------------------

    def reduce_rows(self, table, grad, local_size=None, global_size=None, *,
                    dense_above=DENSE_ROWS_ABOVE):
        """The average over the ranks of the row-sparse gradients of an embedding table
        (``grad``, a :class:`ch8fast.SparseRows` for the 2-D array ``table``), as a
        ``SparseRows`` that every rank passes to the optimizer of its own replica of
        the table. Collective.

        The table is not part of the arena: each rank keeps a whole copy and its own
        optimizer (for instance ``ch8fast.Adam([table], sparse="lazy")``). Given the same
        averaged gradient, the replicas stay identical, bit for bit: the returned rows and
        values are the same bits on every rank.

        Each rank's rows are first weighted as in :meth:`step` (``local_size /
        global_size``, or ``1 / world`` without ``local_size``). Then, while the rows
        gathered from all ranks number at most ``dense_above`` (default 2) times the
        table's rows, the indices and rows are allgathered: the result holds every rank's
        rows, duplicates included, which the optimizer sums in an order-free way. Above it,
        each rank adds its rows into a table-sized buffer and the buffers are summed by
        one allreduce; the result holds the union of the touched rows, once each. The
        two ways agree to rounding; the optimizer updates the same rows with either.

        Raises ValueError on every rank, before anything is exchanged, when a rank's
        arguments are bad or the ranks' tables (shape or dtype) or calls differ (naming
        the ranks).
        """
        world = self.world
        error, header = None, None
        try:
            header, weight = self._rows_header(table, grad, local_size, global_size,
                                               dense_above)
        except (TypeError, ValueError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        self._row_calls += 1
        everyone = self._coll.allgather("the row-sparse gradient check (allgather)",
                                        (error, header, self._row_calls))
        bad = [(r, e) for r, (e, _, _) in enumerate(everyone) if e is not None]
        if bad:
            raise ValueError("DataParallel.reduce_rows(): " + "; ".join(
                f"rank {r}: {e}" for r, e in bad))
        calls = [c for _, _, c in everyone]
        if len(set(calls)) > 1:
            raise ValueError("DataParallel.reduce_rows(): the ranks are out of step: " +
                             ", ".join(f"rank(s) {ranks} at call {c}"
                                       for c, ranks in by_value(calls)))
        for key, what in ((1, "table shape"), (7, "table dtype"), (2, "gradient dtype"),
                          (3, "use of local_size"), (6, "dense_above")):
            values = [h[key] for _, h, _ in everyone]
            if len(set(values)) > 1:
                raise ValueError(f"DataParallel.reduce_rows(): the ranks differ in "
                                 f"{what}: " + ", ".join(f"{v} on rank(s) {ranks}"
                                                         for v, ranks in by_value(values)))
        sizes = [h[4] for _, h, _ in everyone]
        if header[3]:
            total = sum(sizes)
            given = {h[5] for _, h, _ in everyone} - {None}
            if total == 0 or (given and given != {total}):
                raise ValueError(f"DataParallel.reduce_rows(): local_size adds up to "
                                 f"{total} over the ranks; global_size is "
                                 f"{sorted(given) or 'not given'} (it must be their "
                                 f"sum, and positive)")
            weight = sizes[self.rank] / total
        (n_rows, d), dtype = header[1], np.dtype(header[2])
        idx = np.ascontiguousarray(grad.indices, np.int64)
        vals = np.array(grad.values, dtype, order="C")      # a copy: the user's stays
        if weight != 1:
            np.multiply(vals, dtype.type(weight), out=vals)
        if world == 1:
            return SparseRows(idx, vals)
        counts = [h[0] for _, h, _ in everyone]
        T = self._MPI.INT64_T
        all_idx = np.empty(sum(counts), np.int64)
        self._coll.run("the allgather of the row indices", self.comm.Allgatherv, [idx, T],
                       [all_idx, (counts, None), T])
        V = self._MPI.FLOAT if dtype == np.float32 else self._MPI.DOUBLE
        if len(all_idx) <= header[6] * n_rows:
            all_vals = np.empty((len(all_idx), d), dtype)
            self._coll.run("the allgather of the gradient rows", self.comm.Allgatherv,
                           [vals, V], [all_vals, ([c * d for c in counts], None), V])
            return SparseRows(all_idx, all_vals)
        buf = np.zeros((n_rows, d), dtype)
        np.add.at(buf, idx, vals)
        self._coll.run("the allreduce of the table-sized gradient", self.comm.Allreduce,
                       self._MPI.IN_PLACE, [buf, V], op=self._MPI.SUM)
        rows = np.unique(all_idx)
        return SparseRows(rows, buf[rows])

    def _rows_header(self, table, grad, local_size, global_size, dense_above):
        """This rank's checked arguments of reduce_rows: ``(header, weight)``."""
        dense_above = nonnegative(dense_above, "dense_above")
        if not isinstance(table, np.ndarray) or table.ndim != 2:
            raise TypeError(f"table: a 2-D numpy array (the embedding table), got "
                            f"{getattr(table, 'shape', type(table).__name__)}")
        if not isinstance(grad, SparseRows):
            raise TypeError(f"grad: a ch8fast.SparseRows, got {type(grad).__name__}")
        n_rows, d = table.shape
        idx, vals = grad.indices, grad.values
        if vals.shape[1] != d:
            raise ValueError(f"grad: rows of {vals.shape[1]} elements for a table of rows "
                             f"of {d}")
        if len(idx) and (idx.min() < 0 or idx.max() >= n_rows):
            raise ValueError(f"grad: indices must lie in [0, {n_rows}) (the table's rows), "
                             f"got {idx.min()} to {idx.max()}")
        wide = table.dtype if table.dtype in (np.float32, np.float64) else np.float32
        if vals.dtype not in (np.dtype(table.dtype), np.dtype(wide)):
            raise ValueError(f"grad: values of dtype {vals.dtype} for a table of "
                             f"{table.dtype} (expected {np.dtype(wide)})")
        weight = 1.0 / self.world
        lsize = gsize = None
        if local_size is not None:
            lsize = count(local_size, "local_size")
            if global_size is not None:
                gsize = count(global_size, "global_size")
        elif global_size is not None:
            raise ValueError("global_size given without local_size")
        header = (len(idx), (n_rows, d), np.dtype(wide).str, local_size is not None,
                  lsize, gsize, dense_above, storage.storage_name(table.dtype))
        return header, weight

    # ---- the step check -----------------------------------------------------------------

    def _config_hash(self, opt):
        """A 62-bit hash of what every rank must share: this DataParallel (a token drawn
        at construction), the clipping options and the current hyperparameters. Computed
        again only when one of them changed (the values are compared as objects first:
        the same objects as at the last step cost a tuple comparison)."""
        try:
            key = (opt.clip_norm, opt.clip_value, opt.skip_nonfinite,
                   *map(self._hyper_of, opt.param_groups))
        except KeyError:                         # a group lost a key: the step refuses it
            key = None
        cached_key, cached = self._config
        if key is not None and key == cached_key:
            return cached
        text = repr((self._token, self._options(opt), self._hyperparameters(opt)))
        h = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")
        h &= (1 << 62) - 1
        self._config = (key, h)
        return h

    def _agree_on_step(self, opt, local_size, global_size):
        """The step check; returns ``(local_size, global_size)`` as ints (or None, None)."""
        errors = {}
        row = [opt.steps[0] + opt.skipped_steps, 0, _NONE, _NONE]
        if local_size is not None or global_size is not None:
            for j, name, v in ((2, "local_size", local_size),
                               (3, "global_size", global_size)):
                if v is not None:
                    try:
                        row[j] = count(v, name)
                    except (TypeError, ValueError) as exc:
                        row[j], errors[name] = _BAD, exc
        world = self.world
        if world == 1:
            return self._verdict([row], errors)
        if not self.check_steps:
            if local_size is None or global_size is not None:   # nothing to exchange
                if errors:
                    raise next(iter(errors.values()))
                if local_size is None:
                    return None, None
                if not row[2] <= row[3] or row[3] == 0:
                    raise ValueError(f"step(): need 0 <= local_size <= global_size and "
                                     f"global_size > 0, got {row[2]} and {row[3]}")
                return row[2], row[3]
            row[0] = 0                          # exchange the sizes only
        else:
            row[1] = self._config_hash(opt)
        mine, table = self._row, self._table
        mine[1], mine[2], mine[3], mine[4] = row
        T = self._MPI.INT64_T
        # a rank in another collective call sends no step check: its row must not keep
        # the mark of an earlier one (nor have its bytes read as step counts)
        table[::5] = 0
        self._coll.run("the step check (allgather)", self.comm.Allgather,
                       [mine, T], [table, T])
        t = table.tolist()
        if t[0::5].count(_STEP_CHECK) != world:
            raise RuntimeError(self._not_a_step_check(t[0::5]))
        # the usual case, decided with a few list operations
        steps, configs, local, glob = t[1::5], t[2::5], t[3::5], t[4::5]
        if (not errors and steps.count(steps[0]) == world
                and configs.count(configs[0]) == world and glob.count(glob[0]) == world):
            if glob[0] == _NONE and local.count(_NONE) == world:
                return None, None
            if _NONE not in local and _BAD not in local:
                total = sum(local)
                if total > 0 and glob[0] in (_NONE, total):
                    return local[self.rank], total
        return self._verdict([t[i + 1:i + 5] for i in range(0, len(t), 5)], errors)

    def _verdict(self, rows, errors):
        """The same decision on every rank, from every rank's row."""
        first = rows[0]
        if any(r[0] != first[0] or r[1] != first[1] for r in rows):
            raise RuntimeError(self._out_of_step(rows))
        local = [r[2] for r in rows]
        glob = [r[3] for r in rows]
        me = self.rank
        for name, col in (("local_size", local), ("global_size", glob)):
            bad = [r for r, v in enumerate(col) if v == _BAD]
            if bad:
                if name in errors:
                    raise errors[name]
                raise ValueError(f"step(): rank(s) {bad} gave an invalid {name} (see "
                                 f"{'their' if len(bad) > 1 else 'its'} error)")
        if all(v == _NONE for v in local):
            given = [r for r, v in enumerate(glob) if v != _NONE]
            if given:
                raise ValueError(f"step(): global_size given without local_size (rank(s) "
                                 f"{given})")
            return None, None
        missing = [r for r, v in enumerate(local) if v == _NONE]
        if missing:
            raise ValueError(self._uneven_calls("local_size", missing, len(rows)))
        total = sum(local)
        if total == 0:
            raise ValueError("step(): local_size is 0 on every rank: no sample to average")
        missing = [r for r, v in enumerate(glob) if v == _NONE]
        if missing and len(missing) < len(rows):
            raise ValueError(self._uneven_calls("global_size", missing, len(rows)))
        if len(set(glob)) > 1:
            raise ValueError("step(): the ranks disagree on global_size: " + ", ".join(
                f"{v} on rank(s) {ranks}" for v, ranks in by_value(glob))
                + " (are they on different batches? a rank made an extra step() call, "
                  "or skipped one)")
        if glob[0] not in (_NONE, total):
            raise ValueError(f"step(): global_size is {glob[0]}, but local_size adds up to "
                             f"{total} over the ranks (it must be their sum)")
        return local[me if len(rows) > 1 else 0], total

    @staticmethod
    def _uneven_calls(name, missing, world):
        given = [r for r in range(world) if r not in missing]
        return (f"step(): rank(s) {missing} gave no {name}, rank(s) {given} did: every "
                f"rank must call step() with the same arguments (give {name} on every "
                f"rank or on none)")

    def _not_a_step_check(self, marks):
        """The message for rows that are not step checks (what those ranks sent is not
        read: it may be any bytes of another call)."""
        calls = ["the step check" if m == _STEP_CHECK else "another collective call"
                 for m in marks]
        return (f"DataParallel.step(), {self._where()} on rank {self.rank}: " +
                mismatched_calls(calls))

    def _out_of_step(self, rows):
        steps = by_value([row[0] for row in rows])
        configs = by_value([row[1] for row in rows])
        parts = []
        if len(steps) > 1:
            parts.append("the ranks are out of step: " + ", ".join(
                f"rank(s) {ranks} had made {s} steps" for s, ranks in steps)
                + " (every rank must call step() equally often, and load the same "
                  "checkpoints)")
        if len(configs) > 1:
            parts.append("the ranks' configurations differ (hyperparameters, clipping, or "
                         "a different DataParallel) between " + " and ".join(
                             f"rank(s) {ranks}" for _, ranks in configs))
        where = rows[self.rank if len(rows) > 1 else 0][0] + 1
        return f"DataParallel.step(), step {where} on rank {self.rank}: " + "; ".join(parts)

    # ---- counters -----------------------------------------------------------------------

    @property
    def steps(self):
        """The number of steps applied (skipped ones not counted)."""
        return self.optimizer.steps[0]

    @property
    def skipped_steps(self):
        """Steps skipped for a non-finite global gradient norm."""
        return self.optimizer.skipped_steps

    @property
    def last_grad_norm(self):
        """The global norm of the last step's averaged gradient, when computed."""
        return self.optimizer.last_grad_norm

    def _allgather(self):
        self._coll.run("the parameter allgather", self.comm.Allgatherv, self._MPI.IN_PLACE,
                       [self._param_msg[0], self._counts, self._displs, self._param_msg[1]])

    def _global_norm(self):
        """The 2-norm of the averaged gradient, from the norm of every rank's slice:
        scaled by the largest (so that no square overflows, even for norms above 1e154)
        and added with math.fsum (one rounding: independent of the order), so both modes
        and every rank get the same bits."""
        if self.shard_state and self.world > 1:
            mine = np.array([global_norm(self.grad_view)])
            D = self._MPI.DOUBLE
            self._coll.run("the allgather of the gradient norms", self.comm.Allgather,
                           [mine, D], [self._norms, D])
            parts = self._norms.tolist()
        else:
            parts = [global_norm(self._grad[self.bounds[r]:self.bounds[r + 1]])
                     for r in range(self.world)]
        if any(math.isnan(p) for p in parts):
            return math.nan
        top = max(parts)
        if top == 0.0 or math.isinf(top):
            return top
        return top * math.sqrt(math.fsum((p / top) ** 2 for p in parts))

    # ---- reading the parameters ---------------------------------------------------------

    @contextlib.contextmanager
    def at_theta(self):
        """Inside the block the whole buffer holds theta (for shifted-form Nesterov the
        arrays otherwise hold the interim point); afterwards exactly what it held.
        Collective when the state is sharded."""
        if not self.shard_state or self.world == 1:
            with self.optimizer.at_theta():
                yield self.arena
            return
        saved = self.flat.copy()
        try:
            with self.optimizer.at_theta():
                self._allgather()
                yield self.arena
        finally:
            np.copyto(self.flat, saved)

    def digest(self):
        """A hash of this rank's parameter bytes (and step count)."""
        h = hashlib.blake2b(digest_size=16)
        h.update(self.flat.view(np.uint8))
        h.update(str(self.steps).encode())
        return h.hexdigest()

    def _out_of_sync(self):
        digests = self._coll.allgather("the parameter hash allgather", self.digest())
        return [r for r, d in enumerate(digests) if d != digests[0]]

    def check_in_sync(self, raise_error=False):
        """Whether every rank holds the same parameter bytes and step count (a hash of
        them, gathered). The same answer on every rank; ``raise_error=True`` raises a
        RuntimeError naming the ranks that differ from rank 0. Collective."""
        off = self._out_of_sync()
        if off and raise_error:
            raise RuntimeError(f"parameters out of sync: rank(s) {off} differ from rank 0")
        return not off

    def state_memory_bytes(self):
        """Bytes of optimizer state this rank keeps."""
        return sum(a.nbytes for st in self.optimizer.state for a in st.values())

    def memory_report(self):
        """``{"per_rank": [bytes of state on each rank], "unsharded": bytes the whole
        state would take, "params": bytes of the parameters}``. Collective."""
        per_rank = self._coll.allgather("the allgather of memory_report()",
                                        self.state_memory_bytes())
        per_elem = (self.state_memory_bytes() / self.param_view.size
                    if self.param_view.size else
                    max(per_rank) / max(1, max(self._counts)))
        return {"per_rank": per_rank,
                "unsharded": int(round(per_elem * self.flat.size)),
                "params": self.flat.nbytes}

    # ---- checkpoints --------------------------------------------------------------------

    def save(self, path, extra=None):
        """Write a checkpoint to the folder ``path``. Collective.

        Sharded: every rank writes its slice of the parameters and its optimizer state to
        ``shard-<save id>-<r>-of-<p>.npz`` (a ch8fast.checkpoint file: atomic,
        checksummed); not sharded: rank 0 writes one file for the whole buffer. Then rank
        0 writes ``manifest.json`` (atomically) naming the files, their slices, the save
        id that every file also carries, the step counters and ``extra`` (JSON), and
        only then removes the files of earlier saves. Until the new manifest is in place
        the previous save stays complete and loadable, so a save that fails or is killed
        loses nothing; the temporary files a killed save leaves are removed by the next
        save (a writer that has died but is not yet reaped by its parent, a zombie,
        counts as gone where /proc tells). Needs a folder every rank can write (a
        shared file system across hosts).

        Every rank must pass the same folder: the ranks compare their folders (as
        absolute paths) and step counts, and take rank 0's save id, in one allgather that
        no rank completes alone; a difference raises the same ValueError on every rank,
        naming the ranks, before anything is written.
        """
        checkpoints.save(self, path, extra)

    def load(self, path):
        """Restore a checkpoint written by :meth:`save`; returns its ``extra``.
        Collective.

        The optimizer's state, step counters and hyperparameters become the saved ones
        (as ``load_state_dict`` does, and torch's): an ``lr`` given to this DataParallel
        is replaced by the checkpoint's; set it again after loading (on every rank) to
        change it. ``clip_norm``, ``clip_value`` and ``skip_nonfinite`` stay this
        DataParallel's. With the same number of ranks and the same mode every rank reads
        only its own file and the run continues bit for bit. Otherwise (another number of
        ranks, sharded to unsharded or back) each rank assembles its new slice from the
        files that overlap it: the state values are copied exactly, only re-cut (so the
        files must be readable from every rank). Everything is verified on every rank
        (format, save ids, checksums, optimizer, sizes, the same hyperparameters in every
        file, and that every rank read the same checkpoint: its save id and a digest of
        its manifest) before anything changes; any mismatch raises the same ValueError on
        every rank, naming the ranks.
        """
        return checkpoints.load(self, path)
