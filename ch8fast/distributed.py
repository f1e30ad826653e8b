"""Data-parallel training over MPI, with the optimizer state optionally sharded (ZeRO-1).

Every rank (process) holds the whole model in one :class:`ch8fast.FlatParams` arena,
computes the gradient of its share of the minibatch into ``arena.flat_grad``, and calls
:meth:`DataParallel.step`, which

1. averages the gradients of all ranks with one in-place ``Allreduce`` over the whole
   gradient buffer (sum, then divide by the number of ranks; or, given the sample counts,
   each rank's gradient weighted by its share of the batch, so uneven shards give exactly
   the mean over the whole batch);
2. clips by the global norm and skips non-finite steps, if asked, deciding identically on
   every rank (the squared norm of each rank's slice, gathered and added with ``math.fsum``,
   which rounds once and so does not depend on the order);
3. updates the parameters with an ordinary ch8fast optimizer (one fused kernel call):

   * ``shard_state=False``: every rank updates the whole buffer and keeps the whole state;
   * ``shard_state=True`` (ZeRO stage 1): rank ``r`` owns the contiguous slice
     ``flat[lo_r:hi_r]`` (cache-line aligned, as even as alignment allows) and keeps
     optimizer state only for it, so state memory per rank is about total / ranks; it
     updates its slice, and one in-place ``Allgatherv`` hands every rank the whole buffer.

Both modes run the same elementwise kernels on the same averaged gradient values, so
they give the same parameters bit for bit (tested). Parameters start identical (rank 0's
are broadcast) and stay identical: :meth:`DataParallel.check_in_sync` compares a hash of
the parameter bytes across ranks.

A rank that raises must not leave the others waiting in a collective forever: run the
training inside :func:`abort_on_error`, which prints the error with the rank and calls
``MPI_Abort``, ending the whole job.

mpi4py is imported only when a function here is first called, so ``import ch8fast`` works
without it. Run with e.g. ``mpirun -n 2 python train.py`` (see the documentation,
"Training on several processes or hosts", docs/distributed.rst).
"""

import contextlib
import hashlib
import json
import math
import os
import secrets
import sys
import traceback

import numpy as np

from .clip import global_norm
from .flat import ALIGN_BYTES

__all__ = ["DataParallel", "abort_on_error", "shard_bounds", "split_batch", "get_comm",
           "ranks_on_this_host",
           "DIST_CHECKPOINT_FORMAT", "MANIFEST"]

DIST_CHECKPOINT_FORMAT = "ch8fast-distributed-checkpoint"
DIST_CHECKPOINT_VERSION = 1
MANIFEST = "manifest.json"


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ImportError(
            "ch8fast.distributed needs mpi4py and an MPI library: install Open MPI "
            "(Debian/Ubuntu: apt-get install openmpi-bin libopenmpi-dev) and "
            "`pip install mpi4py`, or run .ci/install_mpi.sh") from exc
    return MPI


def get_comm(comm=None):
    """``comm``, or ``MPI.COMM_WORLD`` when None (importing mpi4py on first use)."""
    if comm is not None:
        return comm
    return _mpi().COMM_WORLD


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


# ---------------------------------------------------------------------------------------
# Failing ranks
# ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def abort_on_error(comm=None, errorcode=1, stream=None):
    """Inside the block, an exception on any rank prints ``[rank r/p] <traceback>`` to
    stderr and calls ``comm.Abort(errorcode)``, so that mpirun ends every rank (the others
    would otherwise wait in their next collective forever). With a single process the
    exception propagates as usual. ``SystemExit(0)`` passes through. Usable as a decorator:
    ``@abort_on_error()``.
    """
    comm = get_comm(comm)
    try:
        yield comm
    except BaseException as exc:
        if comm.Get_size() == 1 or (isinstance(exc, SystemExit) and exc.code in (0, None)):
            raise
        stream = stream or sys.stderr
        tag = f"[rank {comm.Get_rank()}/{comm.Get_size()}]"
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        try:
            stream.write("".join(f"{tag} {line}\n" for line in text.splitlines()))
            stream.write(f"{tag} ch8fast.distributed: rank {comm.Get_rank()} failed with "
                         f"{type(exc).__name__}: {exc}; aborting all "
                         f"{comm.Get_size()} ranks (MPI_Abort, error code {errorcode})\n")
            stream.flush()
        finally:
            comm.Abort(errorcode)


# ---------------------------------------------------------------------------------------
# Data parallel training
# ---------------------------------------------------------------------------------------

def _collective_check(comm, message):
    """Raise the same ValueError on every rank when any rank has a message (None: fine)."""
    msgs = comm.allgather(message)
    bad = [(r, m) for r, m in enumerate(msgs) if m is not None]
    if bad and len(bad) == len(msgs) and len({m for _, m in bad}) == 1:
        raise ValueError(bad[0][1])
    if bad:
        raise ValueError("; ".join(f"rank {r}: {m}" for r, m in bad))


class DataParallel:
    """Data-parallel training of the parameters in ``arena`` with a ch8fast optimizer.

    Args:
        arena: a :class:`ch8fast.FlatParams` (or any object with 1-D C-contiguous
            ``flat`` and ``flat_grad`` of one float dtype and length). The model's
            parameters are views of ``arena.flat``; its backward pass writes into
            ``arena.flat_grad``.
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
        broadcast: copy rank 0's parameters to every rank first (default True).
        **opt_kwargs: the optimizer's hyperparameters (``lr=...``, schedules too) and
            ``clip_norm``, ``clip_value``, ``skip_nonfinite``. The norm for ``clip_norm``
            and ``skip_nonfinite`` is that of the averaged gradient over the whole buffer,
            the same on every rank.

    Every rank must make the same calls in the same order (they are collective):
    ``step``, ``check_in_sync``, ``memory_report``, ``save``, ``load``, ``at_theta``.

    Attributes:
        optimizer: the ch8fast optimizer over ``[flat]`` or ``[flat[lo:hi]]``.
        bounds: the slice boundaries of every rank; ``lo, hi`` this rank's.
        steps, skipped_steps, last_grad_norm: counters and the last global norm.
    """

    def __init__(self, arena, optimizer, comm=None, *, shard_state=False,
                 grad_sync="allreduce", broadcast=True, **opt_kwargs):
        MPI = _mpi()
        self.comm = comm = get_comm(comm)
        self.rank, self.world = comm.Get_rank(), comm.Get_size()
        self._MPI = MPI
        # Check and build locally, then compare once: a rank whose arguments are bad, or
        # that disagrees with the others (which would make the collectives mismatch and
        # hang), makes every rank raise.
        error, mine = None, None
        try:
            mine = self._setup(arena, optimizer, shard_state, grad_sync, opt_kwargs)
        except Exception as exc:             # raised below, once every rank knows
            error = exc
        everyone = comm.allgather((None if error is None
                                   else f"{type(error).__name__}: {error}", mine))
        failed = [(r, m) for r, (m, _) in enumerate(everyone) if m is not None]
        if error is not None:
            raise error
        if failed:
            raise ValueError("DataParallel: " + "; ".join(f"rank {r}: {m}"
                                                          for r, m in failed))
        if any(other != mine for _, other in everyone):
            raise ValueError("DataParallel: the ranks disagree on (size, dtype, optimizer, "
                             "shard_state, grad_sync, clip_norm, skip_nonfinite, "
                             f"hyperparameters): {[other for _, other in everyone]}")
        if broadcast and self.world > 1:
            comm.Bcast([self.flat, self._mpi_type], root=0)

    def _setup(self, arena, optimizer, shard_state, grad_sync, opt_kwargs):
        """Check the arguments and build this rank's optimizer; returns what every rank
        must agree on."""
        import ch8fast
        from ._validation import flag, positive
        from .optim import Optimizer, encode_hyperparameter
        flat, flat_grad = getattr(arena, "flat", None), getattr(arena, "flat_grad", None)
        for name, a in (("arena.flat", flat), ("arena.flat_grad", flat_grad)):
            if not isinstance(a, np.ndarray):
                raise TypeError(f"{name} must be a numpy.ndarray (pass a "
                                f"ch8fast.FlatParams), got {type(a).__name__}")
            if a.ndim != 1 or not a.flags.c_contiguous or not a.flags.writeable:
                raise ValueError(f"{name} must be 1-D, C-contiguous and writeable")
            if a.dtype not in (np.float32, np.float64):
                raise TypeError(f"{name} must be float32 or float64, got {a.dtype}")
        if flat.shape != flat_grad.shape or flat.dtype != flat_grad.dtype:
            raise ValueError(f"arena.flat ({flat.size} {flat.dtype}) and arena.flat_grad "
                             f"({flat_grad.size} {flat_grad.dtype}) must match")
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
        if grad_sync not in ("allreduce", "reduce_scatter"):
            raise ValueError(f"grad_sync must be 'allreduce' or 'reduce_scatter', got "
                             f"{grad_sync!r}")
        shard_state = flag(shard_state, "shard_state")
        if grad_sync == "reduce_scatter" and not shard_state:
            raise ValueError("grad_sync='reduce_scatter' needs shard_state=True (without "
                             "sharding every rank needs every averaged gradient)")
        opt_kwargs = dict(opt_kwargs)
        clip_norm = opt_kwargs.get("clip_norm")
        self.clip_norm = None if clip_norm is None else positive(clip_norm, "clip_norm")
        self.skip_nonfinite = flag(opt_kwargs.get("skip_nonfinite", False),
                                   "skip_nonfinite")

        self.arena, self.flat, self.flat_grad = arena, flat, flat_grad
        self.shard_state, self.grad_sync = shard_state, grad_sync
        self.bounds = shard_bounds(flat.size, self.world, flat.dtype.itemsize)
        self.lo, self.hi = self.bounds[self.rank], self.bounds[self.rank + 1]
        self._mpi_type = self._MPI.FLOAT if flat.dtype == np.float32 else self._MPI.DOUBLE
        self._counts = [self.bounds[r + 1] - self.bounds[r] for r in range(self.world)]
        self._displs = self.bounds[:-1]
        if self.shard_state:
            self.param_view = flat[self.lo:self.hi]
            self.grad_view = (np.zeros(self.hi - self.lo, flat.dtype)
                              if grad_sync == "reduce_scatter"
                              else flat_grad[self.lo:self.hi])
        else:
            self.param_view, self.grad_view = flat, flat_grad
        self.optimizer = optimizer([self.param_view], **opt_kwargs)

        def describe(v):                     # schedules by content, other callables by name
            if callable(v) and not hasattr(v, "to_dict"):
                return f"callable {getattr(v, '__qualname__', type(v).__name__)}"
            return encode_hyperparameter(v)
        hyper = [{k: describe(v) for k, v in g.items() if k != "params"}
                 for g in self.optimizer.param_groups]
        return (flat.size, flat.dtype.str, optimizer.__name__, shard_state, grad_sync,
                self.clip_norm, self.skip_nonfinite, hyper)

    # ---- one step -----------------------------------------------------------------------

    def step(self, local_size=None, global_size=None):
        """Average the gradients in ``arena.flat_grad`` over the ranks and update the
        parameters on every rank. Collective.

        ``local_size``: the number of samples this rank's gradient (a mean over them) was
        computed from. Given, each rank's gradient is weighted by ``local_size /
        global_size`` (``global_size``, if not given, is summed over the ranks with one
        scalar allreduce), which gives the exact mean over the whole batch for uneven
        shards; a rank with no samples contributes zeros. Not given, the gradients are
        summed and divided by the number of ranks. Returns the global gradient norm when
        clipping or skipping needed it, else None.
        """
        MPI, comm, g = self._MPI, self.comm, self.flat_grad
        world = self.world
        if local_size is not None:
            local_size = int(local_size)
            if global_size is None:
                global_size = comm.allreduce(local_size)
            global_size = int(global_size)
            if not (0 <= local_size <= global_size and global_size > 0):
                raise ValueError(f"need 0 <= local_size <= global_size and global_size > "
                                 f"0, got {local_size} and {global_size}")
            if local_size == 0:
                g[...] = 0
            elif local_size != global_size:
                np.multiply(g, g.dtype.type(local_size / global_size), out=g)
        if world > 1:
            if self.grad_sync == "reduce_scatter":
                comm.Reduce_scatter([g, self._mpi_type], [self.grad_view, self._mpi_type],
                                    self._counts, op=MPI.SUM)
            else:
                comm.Allreduce(MPI.IN_PLACE, [g, self._mpi_type], op=MPI.SUM)
        if local_size is None and world > 1:
            np.divide(self.grad_view, g.dtype.type(world), out=self.grad_view)

        norm = None
        if self.clip_norm is not None or self.skip_nonfinite:
            norm = self._global_norm()
        # the optimizer's own step: clipping and skipping by the global norm, its counters
        before = self.optimizer.skipped_steps
        self.optimizer.step(self.grad_view, grad_norm=norm)
        if self.shard_state and world > 1 and self.optimizer.skipped_steps == before:
            self._allgather()
        return norm

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
        self.comm.Allgatherv(self._MPI.IN_PLACE,
                             [self.flat, self._counts, self._displs, self._mpi_type])

    def _global_norm(self):
        """The 2-norm of the averaged gradient, from the norm of every rank's slice:
        scaled by the largest (so that no square overflows, even for norms above 1e154)
        and added with math.fsum (one rounding: independent of the order), so both modes
        and every rank get the same bits."""
        if self.shard_state:
            parts = self.comm.allgather(global_norm(self.grad_view))
        else:
            parts = [global_norm(self.flat_grad[self.bounds[r]:self.bounds[r + 1]])
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
        h.update(memoryview(self.flat).cast("B"))
        h.update(str(self.steps).encode())
        return h.hexdigest()

    def check_in_sync(self, raise_error=False):
        """Whether every rank holds the same parameter bytes and step count (a hash of
        them, gathered). The same answer on every rank; ``raise_error=True`` raises a
        RuntimeError naming the ranks that differ from rank 0. Collective."""
        digests = self.comm.allgather(self.digest())
        ok = all(d == digests[0] for d in digests)
        if not ok and raise_error:
            off = [r for r, d in enumerate(digests) if d != digests[0]]
            raise RuntimeError(f"parameters out of sync: rank(s) {off} differ from rank 0")
        return ok

    def state_memory_bytes(self):
        """Bytes of optimizer state this rank keeps."""
        return sum(a.nbytes for st in self.optimizer.state for a in st.values())

    def memory_report(self):
        """``{"per_rank": [bytes of state on each rank], "unsharded": bytes the whole
        state would take, "params": bytes of the parameters}``. Collective."""
        per_rank = self.comm.allgather(self.state_memory_bytes())
        per_elem = (self.state_memory_bytes() / self.param_view.size
                    if self.param_view.size else
                    max(per_rank) / max(1, max(self._counts)))
        return {"per_rank": per_rank,
                "unsharded": int(round(per_elem * self.flat.size)),
                "params": self.flat.nbytes}

    # ---- checkpoints --------------------------------------------------------------------

    @staticmethod
    def _shard_file(save_id, r, world):
        return f"shard-{save_id}-{r:05d}-of-{world:05d}.npz"

    def _layout(self):
        a = self.arena
        if all(hasattr(a, k) for k in ("names", "shapes", "offsets")):
            return [[n, list(s), int(o)] for n, s, o in zip(a.names, a.shapes, a.offsets)]
        return None

    def save(self, path, extra=None):
        """Write a checkpoint to the folder ``path``. Collective.

        Sharded: every rank writes its slice of the parameters and its optimizer state to
        ``shard-<save id>-<r>-of-<p>.npz`` (a ch8fast.checkpoint file: atomic,
        checksummed); not sharded: rank 0 writes one file for the whole buffer. Then rank
        0 writes ``manifest.json`` (atomically) naming the files, their slices, the save
        id that every file also carries, the step counters and ``extra`` (JSON), and
        only then removes the files of earlier saves. Until the new manifest is in place
        the previous save stays complete and loadable, so a save that fails or is killed
        loses nothing. Needs a folder every rank can write (a shared file system across
        hosts).
        """
        from .checkpoint import atomic_write, canonical_json, save_checkpoint
        comm = self.comm
        save_id = comm.bcast(secrets.token_hex(8) if self.rank == 0 else None, root=0)
        if self.shard_state:
            shards = [{"file": self._shard_file(save_id, r, self.world),
                       "lo": self.bounds[r], "hi": self.bounds[r + 1]}
                      for r in range(self.world)]
            mine = shards[self.rank]
        else:
            shards = [{"file": self._shard_file(save_id, 0, 1), "lo": 0,
                       "hi": self.flat.size}]
            mine = shards[0] if self.rank == 0 else None
        norm = self.last_grad_norm
        manifest = {
            "format": DIST_CHECKPOINT_FORMAT, "format_version": DIST_CHECKPOINT_VERSION,
            "save_id": save_id, "optimizer": type(self.optimizer).__name__,
            "dtype": self.flat.dtype.str, "size": int(self.flat.size),
            "layout": self._layout(), "world_size": self.world,
            "shard_state": self.shard_state, "shards": shards,
            "steps": self.steps, "skipped_steps": self.skipped_steps,
            "last_grad_norm": norm if norm is None or math.isfinite(norm) else repr(norm),
            "extra": extra,
        }
        err = None
        try:                                 # refuse what JSON cannot hold before writing
            text = canonical_json(manifest)
            if self.rank == 0:
                os.makedirs(path, exist_ok=True)
        except (TypeError, ValueError, OSError) as exc:
            err = f"cannot save to {path!r}: {type(exc).__name__}: {exc}"
        _collective_check(comm, err)
        try:
            if mine is not None:
                save_checkpoint(os.path.join(path, mine["file"]), self.optimizer,
                                params=[self.param_view],
                                extra={"save_id": save_id, "lo": mine["lo"],
                                       "hi": mine["hi"]})
        except Exception as exc:           # report on every rank, never hang
            err = f"{type(exc).__name__}: {exc}"
        _collective_check(comm, err)
        if self.rank == 0:
            try:
                atomic_write(os.path.join(path, MANIFEST), lambda f: f.write(text))
                keep = {sh["file"] for sh in shards}
                for name in os.listdir(path):
                    if name.startswith("shard-") and name.endswith(".npz") \
                            and name not in keep:
                        os.remove(os.path.join(path, name))
            except Exception as exc:
                err = f"{type(exc).__name__}: {exc}"
        _collective_check(comm, err)

    def load(self, path):
        """Restore a checkpoint written by :meth:`save`; returns its ``extra``.
        Collective.

        With the same number of ranks and the same mode every rank reads only its own file
        and the run continues bit for bit. Otherwise (another number of ranks, sharded
        to unsharded or back) each rank assembles its new slice from the files that
        overlap it: the state values are copied exactly, only re-cut (so the files must be
        readable from every rank). Everything is verified on every rank (format, save ids,
        checksums, optimizer, hyperparameters, sizes) before anything changes; any
        mismatch raises the same ValueError on every rank.
        """
        from .checkpoint import read_checkpoint
        comm = self.comm
        err, manifest, pieces = None, None, None
        try:
            manifest = self._read_manifest(path)
            pieces = self._read_pieces(path, manifest, read_checkpoint)
        except Exception as exc:
            err = (str(exc) if isinstance(exc, ValueError)
                   else f"{type(exc).__name__}: {exc}")
        _collective_check(comm, err)
        sd, params = pieces
        err, before = None, self.optimizer.state_dict()
        try:
            self.optimizer.load_state_dict(sd)      # checks everything, then applies
        except Exception as exc:
            err = f"checkpoint {path!r}: {exc}"
        try:
            _collective_check(comm, err)
        except ValueError:
            if err is None:                  # this rank loaded, another refused: undo
                self.optimizer.load_state_dict(before)
            raise
        np.copyto(self.param_view, params)
        if self.shard_state and self.world > 1:
            self._allgather()
        norm = manifest["last_grad_norm"]
        self.optimizer.last_grad_norm = float(norm) if isinstance(norm, str) else norm
        return manifest["extra"]

    def _read_manifest(self, path):
        where = os.path.join(path, MANIFEST)
        try:
            with open(where) as fh:
                m = json.load(fh)
        except FileNotFoundError:
            raise ValueError(f"{where}: no such file (not a ch8fast.distributed "
                             f"checkpoint, or its save did not finish)") from None
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{where}: unreadable ({exc})") from None
        if not isinstance(m, dict) or m.get("format") != DIST_CHECKPOINT_FORMAT \
                or m.get("format_version") != DIST_CHECKPOINT_VERSION:
            raise ValueError(f"{where}: not a {DIST_CHECKPOINT_FORMAT} version "
                             f"{DIST_CHECKPOINT_VERSION} manifest")
        mine = type(self.optimizer).__name__
        if m["optimizer"] != mine:
            raise ValueError(f"{where}: holds {m['optimizer']} state; this optimizer is "
                             f"{mine}")
        if m["size"] != self.flat.size or m["dtype"] != self.flat.dtype.str:
            raise ValueError(f"{where}: holds {m['size']} parameters of dtype "
                             f"{m['dtype']}, this arena has {self.flat.size} of "
                             f"{self.flat.dtype.str}")
        layout = self._layout()
        if layout is not None and m["layout"] is not None and m["layout"] != layout:
            raise ValueError(f"{where}: the arena's names, shapes or offsets differ from "
                             f"the checkpoint's")
        lo = 0
        for s in m["shards"]:
            if s["lo"] != lo or s["hi"] < s["lo"]:
                raise ValueError(f"{where}: the shards do not tile the buffer")
            lo = s["hi"]
        if lo != self.flat.size:
            raise ValueError(f"{where}: the shards do not cover the buffer")
        return m

    def _read_pieces(self, path, m, read_checkpoint):
        """(state dict, parameters) of this rank's slice, cut from the overlapping
        files."""
        lo, hi = self.lo, self.hi
        if not self.shard_state:
            lo, hi = 0, self.flat.size
        n = hi - lo
        names = list(self.optimizer.state[0])
        state = {k: np.empty(n, self.flat.dtype) for k in names}
        params = np.empty(n, self.flat.dtype)
        meta = None
        overlap = [s for s in m["shards"] if max(lo, s["lo"]) < min(hi, s["hi"])]
        for s in overlap or m["shards"][:1]:      # an empty slice still checks one file
            a, b = max(lo, s["lo"]), min(hi, s["hi"])
            fname = os.path.join(path, s["file"])
            header, arrays = read_checkpoint(fname)
            ex = header.get("extra") or {}
            if ex.get("save_id") != m["save_id"] or ex.get("lo") != s["lo"] \
                    or ex.get("hi") != s["hi"]:
                raise ValueError(f"{fname}: belongs to another save than {MANIFEST} "
                                 f"(save id or slice differ): an interrupted save?")
            if header["n_params"] != 1 or not header["has_params"]:
                raise ValueError(f"{fname}: expected one parameter slice with its values")
            sd = header["state_dict"]
            if meta is None:
                meta = sd
            elif sd != meta:
                raise ValueError(f"{fname}: hyperparameters or step counts differ from "
                                 f"the other shards'")
            if a >= b:
                continue
            saved_names = sorted(k[len("state.0."):] for k in arrays
                                 if k.startswith("state.0."))
            if saved_names != sorted(names):
                raise ValueError(f"{fname}: holds state {saved_names}, the optimizer keeps "
                                 f"{sorted(names)}")
            for k in names:
                state[k][a - lo:b - lo] = arrays["state.0." + k][a - s["lo"]:b - s["lo"]]
            params[a - lo:b - lo] = arrays["param.0"][a - s["lo"]:b - s["lo"]]
        if meta is None:
            raise ValueError(f"{path}: no shard file to read")
        return dict(meta, state=[state]), params



def ranks_on_this_host(comm=None):
    """How many ranks of ``comm`` share this host (MPI_COMM_TYPE_SHARED), e.g. to give
    each ``cores // ranks`` kernel threads. Collective."""
    MPI = _mpi()
    comm = get_comm(comm)
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return local.Get_size()
    finally:
        local.Free()
