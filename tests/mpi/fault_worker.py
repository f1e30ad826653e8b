"""Run under mpirun by tests/test_distributed_faults.py: a plain training script (no
abort_on_error, no try) in which one rank misbehaves.

    mpirun -n 2 python tests/mpi/fault_worker.py FAULT TIMEOUT [FOLDER]

FAULT is one of the names in FAULTS; TIMEOUT is DataParallel's timeout in seconds; FOLDER
is where "save_on_one_rank" saves. A least-squares model on a FlatParams arena, 8
minibatches of uneven sizes, each split between the ranks and passed to
``step(local_size, global_size)``; the last rank misbehaves at step 4 (t == 3) or at the
end (with "save_on_one_rank", rank 0 saves at step 4 while the others step). Every rank
that finishes prints "RESULT {...}".
"""
import json
import os
import signal
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))     # the repository root

import ch8fast                                                     # noqa: E402
from ch8fast.distributed import DataParallel, get_comm, split_batch  # noqa: E402

BATCHES = [13, 7, 2, 13, 5, 11, 13, 8]
FAULTS = ["none", "raise", "sigkill", "extra_step", "fewer_step", "extra_step_at_end",
          "fewer_step_at_end", "extra_step_equal_batches", "config_at_construction",
          "config_in_run", "no_global_size", "optimizer_stepped_alone",
          "save_on_one_rank"]


def model(seed=0):
    arena = ch8fast.FlatParams({"W": (6, 3), "b": (3,)}, np.float64)
    arena["W"][...] = np.random.default_rng(seed).standard_normal((6, 3)) * 0.1
    return arena


def gradient(arena, X, Y):
    """The gradient of the mean squared error over the rows given (zeros for none)."""
    if len(X) == 0:
        arena.flat_grad[...] = 0.0
        return
    r = X @ arena["W"] + arena["b"] - Y
    arena.grad("W")[...] = X.T @ r / len(X)
    arena.grad("b")[...] = r.mean(axis=0)


def main(fault, timeout, folder=None):
    comm = get_comm()
    rank, world = comm.Get_rank(), comm.Get_size()
    ch8fast.set_num_threads(1)
    bad = rank == world - 1
    rng = np.random.default_rng(1)
    X, Y = rng.standard_normal((40, 6)), rng.standard_normal((40, 3))
    sizes = [8] * 8 if fault == "extra_step_equal_batches" else BATCHES
    arena = model()
    kw = dict(lr=0.05, momentum=0.9)
    if fault == "config_at_construction" and bad:
        kw["clip_value"] = 1.0
    dp = DataParallel(arena, ch8fast.SGD, comm, timeout=timeout, **kw)
    steps = len(sizes) - (fault == "fewer_step_at_end" and bad)
    for t, b in enumerate(sizes[:steps]):
        idx = rng.choice(len(X), size=b, replace=False)
        mine = split_batch(idx, rank, world)
        gradient(arena, X[mine], Y[mine])
        if t == 3 and rank == 0 and fault == "save_on_one_rank":
            dp.save(folder)
            continue
        if t == 3 and bad:
            if fault == "raise":
                raise RuntimeError(f"deliberate failure in step {t + 1}")
            if fault == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            if fault in ("extra_step", "extra_step_equal_batches"):
                dp.step(len(mine), len(idx)) if fault == "extra_step" else dp.step()
            if fault == "fewer_step":
                continue
            if fault == "config_in_run":
                dp.optimizer.param_groups[0]["lr"] = 0.5
            if fault == "no_global_size":
                dp.step(len(mine))
                continue
            if fault == "optimizer_stepped_alone":
                dp.optimizer.step(dp.grad_view)
        if fault == "extra_step_equal_batches":
            dp.step()
        else:
            dp.step(len(mine), len(idx))
    if fault == "extra_step_at_end" and bad:
        dp.step(len(mine), len(idx))
    print("RESULT " + json.dumps({"rank": rank, "finished": True, "steps": dp.steps}),
          flush=True)


if __name__ == "__main__":
    assert sys.argv[1] in FAULTS, sys.argv[1]
    main(sys.argv[1], float(sys.argv[2]), *sys.argv[3:])
