"""Run under mpirun by tests/test_distributed.py: data-parallel training checks.

    mpirun -n P python tests/mpi/dp_worker.py equivalence          # JSON lines on rank 0
    mpirun -n P python tests/mpi/dp_worker.py save DIR [--shard]    # train, save, train on
    mpirun -n P python tests/mpi/dp_worker.py resume DIR [--shard]  # load, train on, compare
    mpirun -n P python tests/mpi/dp_worker.py fail                  # rank P-1 raises
    mpirun -n 2 python tests/mpi/dp_worker.py robust DIR            # failures stay consistent

Each rank computes the gradient of its share of every minibatch; rank 0 also trains the
same model on whole minibatches in one process (the reference), and every variant is
compared with it and with the others. Results are printed by rank 0 as JSON lines
("RESULT {...}"); the test asserts on them.
"""
import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))                      # tests/: conftest.CONFIGS
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))     # the repository root

import ch8fast                                                     # noqa: E402
from ch8fast.apps.demo import model_on_arena                            # noqa: E402
from ch8fast.distributed import (DataParallel, abort_on_error, get_comm,  # noqa: E402
                                 split_batch)
from ch8fast.apps.mlp import MLP                                        # noqa: E402
from conftest import CONFIGS                                       # noqa: E402

COMM = RANK = WORLD = None        # set in __main__: importing this file starts no MPI
SIZES = [6, 9, 3]
# Minibatch sizes: uneven splits for 2 and 3 ranks, and a batch of 2 (one rank of three
# gets no sample and contributes zeros).
BATCHES = [13, 7, 2, 13, 5, 11, 13, 8]


def result(**kw):
    if RANK == 0:
        print("RESULT " + json.dumps(kw), flush=True)


def data(seed=0, n=40):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, SIZES[0]))
    y = rng.integers(0, SIZES[-1], n)
    return X, y


def batches(n, sizes, seed=1):
    rng = np.random.default_rng(seed)
    for b in sizes:
        yield rng.choice(n, size=b, replace=False)


def new_model(dtype, seed=3):
    model = MLP(SIZES, dtype=dtype, rng=seed)
    return model, model_on_arena(model)


def train_reference(cls, hyper, dtype, X, y, sizes, nan_at=None):
    model, arena = new_model(dtype)
    opt = cls([arena.flat], **hyper)
    for t, idx in enumerate(batches(len(X), sizes)):
        model.loss_and_grad(X[idx].astype(dtype), y[idx])
        if t == nan_at:
            arena.flat_grad[1] = np.nan
        opt.step(arena.flat_grad)
    return arena.flat.copy(), opt


def train_dp(cls, hyper, dtype, X, y, sizes, nan_at=None, dp=None, model=None, **dp_kw):
    if dp is None:
        model, arena = new_model(dtype)
        dp = DataParallel(arena, cls, COMM, **hyper, **dp_kw)
    for t, idx in enumerate(batches(len(X), sizes)):
        mine = split_batch(idx, RANK, WORLD)
        if len(mine):
            model.loss_and_grad(X[mine].astype(dtype), y[mine])
        if t == nan_at and RANK == WORLD - 1:
            dp.flat_grad[1] = np.nan
        dp.step(len(mine), len(idx))
    return dp, model


# Every optimizer configuration of the test suite in float64, a few in float32, and
# clipping by the global norm with a NaN gradient on the last rank at step 3.
CASES = [(name, cls, hyper, np.float64) for name, cls, _, hyper in CONFIGS]
CASES += [(name + "_f32", cls, hyper, np.float32) for name, cls, _, hyper in CONFIGS
          if name in ("sgd", "nesterov", "adam", "adamw", "rmsprop_nesterov")]
CASES.append(("adam_clip_skip", ch8fast.Adam,
              dict(lr=0.01, clip_norm=0.05, skip_nonfinite=True), np.float64))


def equivalence():
    X, y = data()
    for name, cls, hyper, dtype in CASES:
        nan_at = 3 if "skip" in name else None
        ref, ref_opt = train_reference(cls, hyper, dtype, X, y, BATCHES, nan_at)
        ref = COMM.bcast(ref if RANK == 0 else None, root=0)
        out = {"case": name, "dtype": np.dtype(dtype).name, "world": WORLD,
               "ref_skipped": ref_opt.skipped_steps}
        variants = {"dp": {}, "zero": dict(shard_state=True),
                    "zero_rs": dict(shard_state=True, grad_sync="reduce_scatter")}
        flats = {}
        for vname, kw in variants.items():
            dp, _ = train_dp(cls, hyper, dtype, X, y, BATCHES, nan_at, **kw)
            flats[vname] = dp.flat.copy()
            scale = np.maximum(np.abs(ref), 1.0)
            mem = dp.memory_report()
            out[vname] = {
                "max_rel_diff_vs_ref": float(np.max(np.abs(dp.flat - ref) / scale)),
                "in_sync": dp.check_in_sync(),
                "skipped": dp.skipped_steps,
                "last_grad_norm": dp.last_grad_norm,
                "state_bytes_per_rank": mem["per_rank"],
                "state_bytes_unsharded": mem["unsharded"],
                "bounds": dp.bounds,
                "n_state_arrays": len(dp.optimizer.state[0]),
            }
        out["zero_bitwise_eq_dp"] = flats["zero"].tobytes() == flats["dp"].tobytes()
        out["zero_rs_bitwise_eq_dp"] = flats["zero_rs"].tobytes() == flats["dp"].tobytes()
        out["zero_rs_max_rel_diff_vs_dp"] = float(
            np.max(np.abs(flats["zero_rs"] - flats["dp"]) / np.maximum(np.abs(flats["dp"]),
                                                                       1.0)))
        result(**out)


CK_CLS, CK_HYPER = ch8fast.Adam, dict(lr=0.01, weight_decay=0.01, amsgrad=True)
FIRST, SECOND = BATCHES[:4], BATCHES[4:]


def save(folder, shard):
    X, y = data()
    dp, model = train_dp(CK_CLS, CK_HYPER, np.float64, X, y, FIRST, shard_state=shard)
    dp.save(folder, extra={"epoch": 1})
    before = dp.flat.copy()
    dp.load(folder)                                     # loading what was just saved
    result(reload_identity=dp.flat.tobytes() == before.tobytes())
    dp, model = train_dp(CK_CLS, CK_HYPER, np.float64, X, y, SECOND, dp=dp, model=model)
    if RANK == 0:
        np.save(os.path.join(folder, f"final-{WORLD}.npy"), dp.flat)
    result(saved=True, steps=dp.steps, state_bytes_per_rank=dp.memory_report()["per_rank"])


def resume(folder, shard):
    X, y = data()
    model, arena = new_model(np.float64, seed=99)       # different values: load replaces
    dp = DataParallel(arena, CK_CLS, COMM, shard_state=shard, **CK_HYPER)
    extra = dp.load(folder)
    dp, model = train_dp(CK_CLS, CK_HYPER, np.float64, X, y, SECOND, dp=dp, model=model)
    final = [f for f in os.listdir(folder) if f.startswith("final-")][0]
    expected = np.load(os.path.join(folder, final))
    scale = np.maximum(np.abs(expected), 1.0)
    errors = {}
    for what, kw in (("wrong_optimizer", dict(optimizer=ch8fast.AdamW)),
                     ("wrong_size", dict(sizes=[6, 10, 3]))):
        m2 = MLP(kw.get("sizes", SIZES), dtype=np.float64, rng=0)
        dp2 = DataParallel(model_on_arena(m2), kw.get("optimizer", CK_CLS), COMM,
                           shard_state=shard, **CK_HYPER)
        try:
            dp2.load(folder)
            errors[what] = None
        except ValueError as exc:
            errors[what] = str(exc)
    try:
        dp.load(os.path.join(folder, "missing"))
        errors["missing"] = None
    except ValueError as exc:
        errors["missing"] = str(exc)
    result(extra=extra, steps=dp.steps, saved_by=final,
           bitwise=dp.flat.tobytes() == expected.tobytes(),
           max_rel_diff=float(np.max(np.abs(dp.flat - expected) / scale)),
           in_sync=dp.check_in_sync(), errors=errors)


def robust(folder):
    """Failures that must leave every rank consistent and no rank hanging (2 ranks)."""
    from ch8fast.checkpoint import _canonical, _checksum
    out = {}
    X, y = data()
    # A bad argument on one rank, or ranks that disagree: every rank raises.
    for what, kw in (("bad_lr_on_one_rank", dict(lr=-1.0 if RANK == 1 else 0.1)),
                     ("clip_norm_differs", dict(lr=0.1, clip_norm=1.0 + RANK))):
        model, arena = new_model(np.float64)
        try:
            DataParallel(arena, ch8fast.SGD, COMM, **kw)
            out[what] = None
        except (TypeError, ValueError) as exc:
            out[what] = f"{type(exc).__name__}: {exc}"
    out = {k: COMM.allgather(v) for k, v in out.items()}

    # A gradient whose norm squared overflows float64 (only in rank 1's slice): clipping
    # still works, on every rank alike.
    model, arena = new_model(np.float64)
    dp = DataParallel(arena, ch8fast.SGD, COMM, shard_state=True, lr=0.1, clip_norm=1.0,
                      skip_nonfinite=True)
    dp.flat_grad[...] = 0.0
    if RANK == 1:
        dp.flat_grad[dp.lo] = 1e160
    norm = dp.step()
    out["huge_norm"] = COMM.allgather(norm)
    out["huge_in_sync"] = dp.check_in_sync()

    # A save that fails (extra is not JSON) loses nothing; a later save removes the files
    # of the earlier one.
    dp, model = train_dp(CK_CLS, CK_HYPER, np.float64, X, y, FIRST, shard_state=True)
    dp.save(folder, extra={"epoch": 1})
    first = dp.flat.copy()
    first_files = sorted(os.listdir(folder))
    dp, model = train_dp(CK_CLS, CK_HYPER, np.float64, X, y, SECOND, dp=dp, model=model)
    try:
        dp.save(folder, extra={"epoch": object()})
        out["bad_extra"] = None
    except ValueError as exc:
        out["bad_extra"] = str(exc)
    out["files_kept"] = sorted(os.listdir(folder)) == first_files
    dp.load(folder)
    out["previous_save_loads"] = dp.flat.tobytes() == first.tobytes()
    dp.save(folder, extra={"epoch": 2})
    files = sorted(os.listdir(folder))
    out["files_after_second_save"] = files
    out["old_files_removed"] = not set(first_files) & set(files) - {"manifest.json"}

    # A load that one rank refuses (its shard's hyperparameters forged, checksum fixed):
    # the rank that could load undoes it.
    COMM.Barrier()
    if RANK == 1:
        name = [f for f in files if f.startswith("shard-") and "-00001-of-" in f][0]
        path = os.path.join(folder, name)
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        header = json.loads(arrays.pop("__header__").tobytes())
        header.pop("checksum")
        header["state_dict"]["param_groups"][0]["lr"] = -1.0
        header["checksum"] = {"algorithm": "sha256", "hexdigest": _checksum(header, arrays)}
        arrays["__header__"] = np.frombuffer(_canonical(header), dtype=np.uint8)
        with open(path, "wb") as f:
            np.savez(f, **arrays)
    COMM.Barrier()
    dp2, model2 = train_dp(CK_CLS, CK_HYPER, np.float64, X, y, FIRST, shard_state=True)
    before = [a.tobytes() for st in dp2.optimizer.state for a in st.values()]
    steps_before = dp2.optimizer.state_dict()["param_groups"][0]["step"]
    try:
        dp2.load(folder)
        out["one_rank_refuses"] = None
    except ValueError as exc:
        out["one_rank_refuses"] = str(exc)
    out["state_unchanged"] = COMM.allgather(
        [a.tobytes() for st in dp2.optimizer.state for a in st.values()] == before
        and dp2.optimizer.state_dict()["param_groups"][0]["step"] == steps_before)
    result(**out)


def fail():
    X, y = data()
    model, arena = new_model(np.float64)
    dp = DataParallel(arena, ch8fast.SGD, COMM, lr=0.1)
    with abort_on_error(COMM):
        for t, idx in enumerate(batches(len(X), BATCHES)):
            mine = split_batch(idx, RANK, WORLD)
            model.loss_and_grad(X[mine], y[mine])
            if t == 2 and RANK == WORLD - 1:
                raise RuntimeError(f"deliberate failure in step {t}")
            dp.step(len(mine), len(idx))
        COMM.Barrier()                       # the surviving ranks wait here forever
    print("not reached", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["equivalence", "save", "resume", "fail", "robust"])
    ap.add_argument("folder", nargs="?")
    ap.add_argument("--shard", action="store_true")
    a = ap.parse_args()
    COMM = get_comm()
    RANK, WORLD = COMM.Get_rank(), COMM.Get_size()
    ch8fast.set_num_threads(1)
    if a.what == "equivalence":
        equivalence()
    elif a.what == "fail":
        fail()
    elif a.what == "robust":
        robust(a.folder)
    else:
        {"save": save, "resume": resume}[a.what](a.folder, a.shard)
