"""A fault on one rank ends the whole job with a non-zero exit and a message naming the
rank, within the timeout; nothing trains on silently.

Each test runs tests/mpi/fault_worker.py, a plain training script (no abort_on_error, no
try), under ``mpirun -n 2`` with DataParallel's timeout at TIMEOUT seconds; mpirun itself
is bounded by a subprocess timeout, so a hang fails the test. Three kinds of ending:

* found at once, by the per-step check (ranks out of step, on different batches, with
  another configuration or other arguments) or at construction: every rank raises, and
  the uncaught exception aborts the job (well before TIMEOUT);
* the rank raises or is killed: the excepthook aborts, or mpirun sees the death;
* a rank waits for a collective that another rank never joins (one step more or fewer at
  the end of the run, where no later step can compare): the watchdog aborts after TIMEOUT.
"""
import os
import re

import pytest

import _mpi
from _mpi import ROOT, needs_mpi

WORKER = os.path.join(ROOT, "tests", "mpi", "fault_worker.py")
TIMEOUT = 10                 # DataParallel(timeout=...) in the worker, seconds
BOUND = 120                  # mpirun must have ended by then, whatever happens
START = 20                   # allowance for starting 2 Python processes on a busy host

AT_ONCE = {
    # fault: (rank named, what the message says)
    "raise": (1, "rank 1 failed (uncaught exception) with RuntimeError: deliberate "
                 "failure in step 4"),
    "extra_step": (1, "the ranks disagree on global_size: 5 on rank(s) [0], 13 on "
                      "rank(s) [1] (are they on different batches?"),
    "fewer_step": (1, "the ranks disagree on global_size: 13 on rank(s) [0], 5 on "
                      "rank(s) [1]"),
    "config_at_construction": (1, "DataParallel: the ranks disagree on clip_value "
                                  "(rank 0: None, rank 1: 1.0)"),
    "config_in_run": (1, "step 4 on rank 1: the ranks' configurations differ"),
    "no_global_size": (1, "rank(s) [1] gave no global_size, rank(s) [0] did"),
    "optimizer_stepped_alone": (1, "the ranks are out of step: rank(s) [0] had made 3 "
                                   "steps, rank(s) [1] had made 4 steps"),
}

BY_TIMEOUT = {
    # fault: (the rank left waiting, its step)
    "extra_step_at_end": (1, 9),
    "fewer_step_at_end": (0, 8),
    "extra_step_equal_batches": (1, 9),   # no sizes to compare: found at the end
}


def run(fault, *more):
    proc, results, elapsed = _mpi.mpirun(2, WORKER, fault, str(TIMEOUT), *more,
                                         timeout=BOUND)
    return proc, results, elapsed, proc.stdout + proc.stderr


def explain(proc, elapsed):
    return (f"exit {proc.returncode} after {elapsed:.1f} s\nstdout:\n{proc.stdout[-2500:]}"
            f"\nstderr:\n{proc.stderr[-2500:]}")


@needs_mpi
def test_a_run_without_faults_finishes():
    proc, results, elapsed, _ = run("none")
    assert proc.returncode == 0, explain(proc, elapsed)
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert all(r["steps"] == 8 for r in results)


@needs_mpi
@pytest.mark.parametrize("fault", sorted(AT_ONCE))
def test_fault_ends_the_job_at_once(fault):
    rank, says = AT_ONCE[fault]
    proc, results, elapsed, out = run(fault)
    assert proc.returncode != 0, explain(proc, elapsed)
    assert not results, "a rank finished training: " + explain(proc, elapsed)
    assert says in out, explain(proc, elapsed)
    assert re.search(rf"^\[rank {rank}/2\] ch8fast\.distributed: rank {rank} failed", out,
                     re.M), explain(proc, elapsed)
    assert elapsed < TIMEOUT + START, explain(proc, elapsed)   # not by the watchdog


@needs_mpi
def test_killed_rank_ends_the_job():
    proc, results, elapsed, out = run("sigkill")
    assert proc.returncode != 0 and not results, explain(proc, elapsed)
    # mpirun names the rank that died
    assert re.search(r"rank 1\b.*(signal 9|Killed)", out), explain(proc, elapsed)
    assert elapsed < TIMEOUT + START, explain(proc, elapsed)


@needs_mpi
@pytest.mark.parametrize("fault", sorted(BY_TIMEOUT))
def test_rank_left_waiting_aborts_after_the_timeout(fault):
    rank, step = BY_TIMEOUT[fault]
    proc, results, elapsed, out = run(fault)
    assert proc.returncode != 0, explain(proc, elapsed)
    assert [r["rank"] for r in results] == [1 - rank]    # the other one finished
    assert re.search(rf"^\[rank {rank}/2\] ch8fast\.distributed: rank {rank} \(host .*\) "
                     rf"waited more than {TIMEOUT} s in the step check \(allgather\), step "
                     rf"{step}: not every rank joined it", out, re.M), explain(proc, elapsed)
    assert "aborting all 2 ranks" in out
    assert TIMEOUT <= elapsed < TIMEOUT + START, explain(proc, elapsed)


@needs_mpi
def test_a_call_made_on_one_rank_is_reported_as_such(tmp_path):
    """Rank 0 saves while rank 1 steps: the ranks are in different collective calls, and
    the rank that finds it says so (not the bytes of the other call read as step counts);
    the job ends at once."""
    proc, results, elapsed, out = run("save_on_one_rank", str(tmp_path))
    assert proc.returncode != 0 and not results, explain(proc, elapsed)
    assert re.search(r"^\[rank ([01])/2\] ch8fast\.distributed: rank \1 failed .*another "
                     r"collective call", out, re.M), explain(proc, elapsed)
    assert not re.search(r"had made \d+ steps", out), explain(proc, elapsed)
    assert elapsed < TIMEOUT + START, explain(proc, elapsed)
