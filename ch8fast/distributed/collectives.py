"""Collectives that end the job instead of hanging, agreement between ranks, failing ranks.

Deadlines. Every collective that :class:`~ch8fast.distributed.DataParallel` makes goes
through :meth:`Collectives.run`, which notes what is under way and until when it may wait
(two attribute writes), then makes the ordinary blocking MPI call. One watchdog thread per
process wakes every ``min(1 s, timeout / 10)`` and, when a collective has outlasted its
deadline, prints on stderr which rank waited, in which operation and at which step, and
ends the job with ``MPI_Abort``. The blocking calls stay as fast as they are (mpi4py
releases the GIL while MPI waits); non-blocking collectives polled with ``Test`` were
measured slower (benchmarks/bench_distributed.py prints both).

Failing ranks. A rank that raises while the others wait in a collective would leave them
waiting: :func:`abort_on_error` (a block) and :func:`install_excepthook` (the whole
script; DataParallel installs it on every rank of a job of two or more ranks) print the
traceback, each line prefixed ``[rank r/p]``, and call ``MPI_Abort``, which ends every
rank with a non-zero exit.

Agreement. :func:`collective_check` turns an error on some ranks into the same exception
on every rank, so that no rank goes on into a collective that the others skip.
:meth:`Collectives.allgather` sends the name of the call with the value: a rank in another
call (one that some ranks skipped) makes the others raise, naming it and its call, rather
than read its data as theirs.

mpi4py is imported on first use, so ``import ch8fast`` works without it.
"""

import contextlib
import math
import os
import socket
import sys
import threading
import time
import traceback
import weakref

__all__ = ["DEFAULT_TIMEOUT", "Collectives", "abort_on_error", "by_value",
           "collective_check", "get_comm", "install_excepthook", "mismatched_calls", "mpi",
           "ranks_on_this_host"]

DEFAULT_TIMEOUT = 300.0        # seconds a rank may wait in one collective
SAME_CALLS = ("every rank must make the same calls of a DataParallel, in the same order: "
              "its construction, step(), save(), load(), check_in_sync(), memory_report(), "
              "reduce_rows(), at_theta()")
_NEVER = math.inf


def mpi():
    """The ``mpi4py.MPI`` module, with a message that says how to install it."""
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
    return mpi().COMM_WORLD


def ranks_on_this_host(comm=None):
    """How many ranks of ``comm`` share this host (MPI_COMM_TYPE_SHARED), e.g. to give
    each ``cores // ranks`` kernel threads. Collective."""
    MPI = mpi()
    comm = get_comm(comm)
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return local.Get_size()
    finally:
        local.Free()


def _host():
    return socket.gethostname() or "?"


# ---------------------------------------------------------------------------------------
# Ending the job with a message
# ---------------------------------------------------------------------------------------

def _abort(comm, lines, errorcode, stream=None, from_thread=False):
    """Print ``lines`` prefixed ``[rank r/p]`` and end every rank of the job."""
    rank, world = comm.Get_rank(), comm.Get_size()
    tag = f"[rank {rank}/{world}]"
    stream = stream or sys.stderr
    try:
        stream.write("".join(f"{tag} {line}\n" for line in lines))
        stream.flush()
    finally:
        MPI = mpi()
        if from_thread and MPI.Query_thread() != MPI.THREAD_MULTIPLE:
            # MPI may not be called while the main thread is inside it: leave without
            # MPI_Finalize, which mpirun answers by ending the other ranks.
            os._exit(errorcode)
        comm.Abort(errorcode)


def _fail(comm, exc, errorcode, stream, where):
    world = comm.Get_size()
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    _abort(comm, text.splitlines() + [
        f"ch8fast.distributed: rank {comm.Get_rank()} failed {where}with "
        f"{type(exc).__name__}: {exc}; aborting all {world} ranks (MPI_Abort, error code "
        f"{errorcode})"], errorcode, stream)


@contextlib.contextmanager
def abort_on_error(comm=None, errorcode=1, stream=None):
    """Inside the block, an exception on any rank prints ``[rank r/p] <traceback>`` to
    stderr and calls ``comm.Abort(errorcode)``, so that mpirun ends every rank (the others
    would otherwise wait in their next collective). With a single process the exception
    propagates as usual. ``SystemExit(0)`` passes through. Usable as a decorator:
    ``@abort_on_error()``.
    """
    comm = get_comm(comm)
    try:
        yield comm
    except BaseException as exc:
        if comm.Get_size() == 1 or (isinstance(exc, SystemExit) and exc.code in (0, None)):
            raise
        _fail(comm, exc, errorcode, stream, "")


class _Hook:
    comm = None
    previous = None


def _excepthook(exc_type, exc, tb):
    comm, previous = _Hook.comm, _Hook.previous
    MPI = sys.modules.get("mpi4py.MPI")
    if (comm is None or MPI is None or MPI.Is_finalized() or comm.Get_size() == 1):
        return previous(exc_type, exc, tb)
    if previous is not sys.__excepthook__:
        with contextlib.suppress(Exception):
            previous(exc_type, exc, tb)
    _fail(comm, exc, 1, None, "(uncaught exception) ")


def install_excepthook(comm=None):
    """Make an uncaught exception on any rank end the whole job: ``sys.excepthook`` then
    prints the traceback with every line prefixed ``[rank r/p]`` and calls
    ``MPI_Abort(1)`` (a hook installed before is called first). DataParallel installs it
    on every rank when there are two or more; calling it again changes nothing. Remove it
    with ``sys.excepthook = sys.__excepthook__``."""
    if sys.excepthook is _excepthook:
        return
    _Hook.comm = get_comm(comm)
    _Hook.previous = sys.excepthook
    sys.excepthook = _excepthook


# ---------------------------------------------------------------------------------------
# Deadlines
# ---------------------------------------------------------------------------------------

class _Watchdog:
    """One daemon thread per process that ends the job when a collective of any live
    :class:`Collectives` has passed its deadline."""

    lock = threading.Lock()
    guards = weakref.WeakSet()
    poll = 1.0
    thread = None

    @classmethod
    def watch(cls, guard):
        with cls.lock:
            cls.guards.add(guard)
            cls.poll = min(cls.poll, max(0.01, guard.timeout / 10))
            if cls.thread is None:
                cls.thread = threading.Thread(target=cls._loop, daemon=True,
                                              name="ch8fast.distributed watchdog")
                cls.thread.start()

    @classmethod
    def _loop(cls):
        while True:
            time.sleep(cls.poll)
            now = time.monotonic()
            with cls.lock:
                guards = list(cls.guards)
            for g in guards:
                if now > g.deadline:
                    g.expire()


class Collectives:
    """The collectives of one DataParallel over ``comm``, each bound by ``timeout``
    seconds (None: no deadline).

    ``describe()`` tells where the caller is (e.g. "step 9"), for the message."""

    def __init__(self, comm, timeout, describe=lambda: ""):
        self.comm = comm
        self.timeout = timeout
        self.describe = describe
        self.what = None
        self.deadline = _NEVER
        if timeout is not None and comm.Get_size() > 1:
            _Watchdog.watch(self)

    def run(self, what, call, *args, **kwargs):
        """``call(*args, **kwargs)``, a collective; ``what`` names it in the message. MPI's
        "message truncated" error becomes a RuntimeError that says what it means here."""
        timed = self.timeout is not None
        if timed:
            self.what = what
            self.deadline = time.monotonic() + self.timeout
        try:
            return call(*args, **kwargs)
        except Exception as exc:
            MPI = mpi()
            if isinstance(exc, MPI.Exception) and exc.Get_error_class() == MPI.ERR_TRUNCATE:
                raise RuntimeError(self._truncated(what, exc)) from exc
            raise
        finally:
            if timed:
                self.deadline = _NEVER

    def _truncated(self, what, exc):
        # every collective here sends what the receivers expect (the counts are agreed
        # first): more data comes only from a rank that is in another call
        return (f"ch8fast.distributed: rank {self.comm.Get_rank()} received more data in "
                f"{what} than that call sends ({exc}): another rank is in another "
                f"collective call ({SAME_CALLS})")

    def allgather(self, what, value):
        """Every rank's ``value`` (``comm.allgather``), each sent with ``what``. A rank
        whose contribution is not this call's (it is in another collective of this
        DataParallel, one that some ranks skipped or made in another order) makes every
        rank that received it raise a RuntimeError naming the ranks and their calls,
        instead of reading its data as this call's."""
        got = self.run(what, self.comm.allgather, (what, value))
        calls = [g[0] if isinstance(g, tuple) and len(g) == 2 and isinstance(g[0], str)
                 else "another collective call" for g in got]
        if calls.count(what) != len(calls):
            raise RuntimeError(mismatched_calls(calls))
        return [v for _, v in got]

    def expire(self):
        """Called by the watchdog: this rank waited longer than ``timeout``."""
        comm = self.comm
        rank, world = comm.Get_rank(), comm.Get_size()
        where = self.describe()
        _abort(comm, [
            f"ch8fast.distributed: rank {rank} (host {_host()}, pid {os.getpid()}) waited "
            f"more than {self.timeout:g} s in {self.what}{', ' + where if where else ''}: "
            f"not every rank joined it (a rank stopped, hangs or is slower than the "
            f"timeout, or made a different number of steps or other collective calls)",
            f"ch8fast.distributed: aborting all {world} ranks (MPI_Abort, error code 1); "
            f"the timeout is DataParallel(..., timeout=seconds)"],
            1, from_thread=True)


def by_value(values):
    """``[(value, [ranks holding it]), ...]``, the most common value first."""
    groups = {}
    for r, v in enumerate(values):
        groups.setdefault(v, []).append(r)
    return sorted(groups.items(), key=lambda item: (-len(item[1]), item[1]))


def mismatched_calls(calls):
    """The message for ranks found in different collective calls (``calls[r]``: what rank
    r is in)."""
    return ("ch8fast.distributed: the ranks are in different collective calls: " +
            ", ".join(f"rank(s) {ranks} in {c}" for c, ranks in by_value(calls)) +
            f" ({SAME_CALLS})")


def collective_check(coll, message, what="the error check"):
    """Raise the same ValueError on every rank when any rank has a message (None: fine).
    Collective (an allgather through ``coll``)."""
    msgs = coll.allgather(what, message)
    bad = [(r, m) for r, m in enumerate(msgs) if m is not None]
    if bad and len(bad) == len(msgs) and len({m for _, m in bad}) == 1:
        raise ValueError(bad[0][1])
    if bad:
        raise ValueError("; ".join(f"rank {r}: {m}" for r, m in bad))
