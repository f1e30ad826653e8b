"""Run under mpirun by tests/test_distributed.py: data-parallel training checks.

    mpirun -n P python tests/mpi/dp_worker.py equivalence          # JSON lines on rank 0
    mpirun -n P python tests/mpi/dp_worker.py save DIR [--shard]    # train, save, train on
    mpirun -n P python tests/mpi/dp_worker.py resume DIR [--shard]  # load, train on, compare
    mpirun -n P python tests/mpi/dp_worker.py fail                  # rank P-1 raises
    mpirun -n 2 python tests/mpi/dp_worker.py robust DIR            # failures stay consistent
    mpirun -n 2 python tests/mpi/dp_worker.py agree DIR             # disagreements raise
    mpirun -n P python tests/mpi/dp_worker.py single                # reduce_scatter, 1 rank
    mpirun -n 2 python tests/mpi/dp_worker.py threads               # threads per rank
    mpirun -n 2 python tests/mpi/dp_worker.py killsave DIR [kill]   # killed mid-save
    mpirun -n P python tests/mpi/dp_worker.py storage               # bf16 and 8-bit state
    mpirun -n P python tests/mpi/dp_worker.py rows                  # row-sparse gradients
    mpirun -n P python tests/mpi/dp_worker.py storage16             # 16-bit parameters
    mpirun -n P python tests/mpi/dp_worker.py storage_save DIR      # compressed state saved
    mpirun -n Q python tests/mpi/dp_worker.py storage_resume DIR    # ... and resumed
    mpirun -n 3 python tests/mpi/dp_worker.py audit DIR             # re-cuts, mismatches
    mpirun -n 2 python tests/mpi/dp_worker.py save_alone DIR        # save() on rank 0 only

Each rank computes the gradient of its share of every minibatch; rank 0 also trains the
same model on whole minibatches in one process (the reference), and every variant is
compared with it and with the others. Results are printed by rank 0 as JSON lines
("RESULT {...}"); the test asserts on them.
"""
import argparse
import json
import os
import sys

import ml_dtypes
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
# (LAMB and LARS scale each array by its own norms: DataParallel, one flat buffer, refuses
# them, tests/test_distributed.py)
CASES = [(name, cls, hyper, np.float64) for name, cls, _, hyper in CONFIGS
         if cls not in (ch8fast.LAMB, ch8fast.LARS)]
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


def construction_error(**kw):
    """The error DataParallel(SGD, **kw) raises on this rank, or None."""
    model, arena = new_model(np.float64)
    try:
        DataParallel(arena, ch8fast.SGD, COMM, **kw)
        return None
    except (TypeError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"


def robust(folder):
    """Failures that must leave every rank consistent and no rank hanging (2 ranks)."""
    from ch8fast.checkpoint import _canonical, _checksum
    out = {}
    X, y = data()
    # A bad argument on one rank, or ranks that disagree: every rank raises.
    for what, kw in (("bad_lr_on_one_rank", dict(lr=-1.0 if RANK == 1 else 0.1)),
                     ("clip_norm_differs", dict(lr=0.1, clip_norm=1.0 + RANK))):
        out[what] = construction_error(**kw)
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
    # the ranks compare what they read, and every rank refuses before loading.
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


def agree(folder):
    """Disagreements at construction, bad step arguments on one rank, the lr on load:
    every rank raises (2 ranks), or loads the same."""
    from ch8fast import schedules
    out = {}

    def factory(rate):
        return lambda k: rate

    cases = {
        "clip_value_differs": dict(lr=0.1, clip_value=1.0 if RANK == 1 else None),
        "two_lambdas": dict(lr=(lambda k: 0.1) if RANK == 0 else (lambda k: 0.2)),
        "one_factory": dict(lr=factory(0.1 + RANK)),
        "broadcast_differs": dict(lr=0.1, broadcast=RANK == 0),
        "schedules_differ": dict(lr=schedules.ExponentialDecay(0.1, 0.5 + 0.1 * RANK, 10)),
        "schedules_equal": dict(lr=schedules.ExponentialDecay(0.1, 0.5, 10)),
        "timeout_bad_on_one_rank": dict(lr=0.1, timeout=-1.0 if RANK == 1 else 10.0),
    }
    for what, kw in cases.items():
        out[what] = construction_error(**kw)
    # broadcast=False: the parameters must already be the same
    for what, seed in (("no_broadcast_same", 3), ("no_broadcast_differ", 3 + RANK)):
        model, arena = new_model(np.float64, seed=seed)
        try:
            DataParallel(arena, ch8fast.SGD, COMM, lr=0.1, broadcast=False)
            out[what] = None
        except ValueError as exc:
            out[what] = str(exc)

    # A bad local_size on one rank: every rank raises, nothing changes, training goes on.
    X, y = data()
    model, arena = new_model(np.float64)
    dp = DataParallel(arena, ch8fast.Adam, COMM, lr=0.01)
    idx = np.arange(10)
    mine = split_batch(idx, RANK, WORLD)
    model.loss_and_grad(X[mine], y[mine])
    before = (dp.flat.tobytes(), dp.optimizer.state_dict()["param_groups"][0]["step"])
    try:
        dp.step(-1 if RANK == 1 else len(mine), len(idx))
        out["bad_local_size"] = None
    except (TypeError, ValueError) as exc:
        out["bad_local_size"] = f"{type(exc).__name__}: {exc}"
    out["unchanged_after_bad_step"] = (dp.flat.tobytes(), dp.optimizer.state_dict()[
        "param_groups"][0]["step"]) == before
    dp.step(len(mine), len(idx))
    out["steps_after"] = dp.steps
    out["in_sync_after"] = dp.check_in_sync()

    # dp.load restores the saved lr (as torch does); set after loading, it holds.
    dp.save(folder)
    model2, arena2 = new_model(np.float64, seed=5)
    dp2 = DataParallel(arena2, ch8fast.Adam, COMM, lr=0.5)
    dp2.load(folder)
    out["lr_after_load"] = dp2.optimizer.param_groups[0]["lr"]
    dp2.optimizer.param_groups[0]["lr"] = 0.02          # on every rank alike
    model2.loss_and_grad(X[mine], y[mine])
    dp2.step(len(mine), len(idx))
    out["lr_changed_after_load_steps"] = dp2.steps
    out["lr_changed_in_sync"] = dp2.check_in_sync()
    out = {k: COMM.allgather(v) for k, v in out.items()}
    result(**out)


def single():
    """Every mode on one rank (plain python or mpirun -n 1) equals the plain optimizer."""
    X, y = data()
    ref, _ = train_reference(CK_CLS, CK_HYPER, np.float64, X, y, BATCHES)
    _, start = new_model(np.float64)
    out = {"world": WORLD}
    for vname, kw in (("dp", {}), ("zero", dict(shard_state=True)),
                      ("zero_rs", dict(shard_state=True, grad_sync="reduce_scatter"))):
        dp, _ = train_dp(CK_CLS, CK_HYPER, np.float64, X, y, BATCHES, **kw)
        out[vname] = {"moved": dp.flat.tobytes() != start.flat.tobytes(),
                      "bitwise_eq_ref": dp.flat.tobytes() == ref.tobytes(),
                      "steps": dp.steps}
    result(**out)


STORAGE_SIZES = [6, 40, 20, 3]          # 1,163 parameters: blocks of 8-bit codes split
STORAGE_CASES = [("adam", ch8fast.Adam, dict(lr=0.01)),
                 ("adamw_amsgrad", ch8fast.AdamW, dict(lr=0.01, amsgrad=True)),
                 ("momentum", ch8fast.SGD, dict(lr=0.05, momentum=0.9)),
                 ("rmsprop", ch8fast.RMSProp, dict(lr=0.01)),
                 ("adagrad", ch8fast.AdaGrad, dict(lr=0.05))]


def sharded_against_unsharded(flats):
    """Whether the sharded variants ended with the unsharded one's parameter bits."""
    return {f"{v}_bitwise_eq_dp": flats[v].tobytes() == flats["dp"].tobytes()
            for v in ("zero", "zero_rs")}


def storage_modes():
    """Compressed state with data parallelism: unsharded, each step equals one process
    stepping with the averaged gradient, bit for bit; sharded (8-bit blocks and random
    words of stochastic rounding where one process has them) equals unsharded."""
    X, y = data()
    for fmt in ("bfloat16", "q8"):
        for name, cls, hyper in STORAGE_CASES:
            flats, out = {}, {"case": f"{name}_{fmt}", "world": WORLD}
            for vname, kw in (("dp", {}), ("zero", dict(shard_state=True)),
                              ("zero_rs", dict(shard_state=True,
                                               grad_sync="reduce_scatter"))):
                model = MLP(STORAGE_SIZES, dtype=np.float32, rng=3)
                arena = model_on_arena(model)
                dp = DataParallel(arena, cls, COMM, state_format=fmt, seed=5, **hyper, **kw)
                start, ref, ref_opt = arena.flat.copy(), None, None
                if vname == "dp":
                    ref = arena.flat.copy()
                    ref_opt = cls([ref], state_format=fmt, seed=5, **hyper)
                same = True
                for idx in batches(len(X), BATCHES):
                    mine = split_batch(idx, RANK, WORLD)
                    if len(mine):
                        model.loss_and_grad(X[mine].astype(np.float32), y[mine])
                    else:
                        arena.flat_grad[...] = 0
                    dp.step(len(mine), len(idx))
                    if ref_opt is not None:     # the averaged gradient, one process
                        ref_opt.step(dp.averaged_grad.copy())
                        same = same and ref.tobytes() == dp.flat.tobytes()
                flats[vname] = dp.flat.copy()
                out[vname] = {"in_sync": dp.check_in_sync(), "bounds": dp.bounds,
                              "moved": dp.flat.tobytes() != start.tobytes(),
                              "state_keys": sorted(dp.optimizer.state[0]),
                              "state_bytes_per_rank": dp.memory_report()["per_rank"]}
                if vname == "dp":
                    out["dp_bitwise_eq_one_process"] = same
            result(**out, **sharded_against_unsharded(flats))


def rows():
    """reduce_rows: an embedding table replicated on every rank, trained by lazy Adam on
    the averaged row-sparse gradient, against one process stepping with the rows of the
    whole batch; both ways (allgather of rows, allreduce of a dense buffer); bad calls."""
    n_rows, d, B = 30, 4, 14
    _, arena = new_model(np.float32)
    dp = DataParallel(arena, ch8fast.SGD, COMM, lr=0.1)
    for way, dense_above in (("sparse", 1e9), ("dense", 0.0)):
        for weighted in (True, False):
            table = np.random.default_rng(1).standard_normal((n_rows, d)).astype(np.float32)
            ref = table.copy()
            opt = ch8fast.Adam([table], lr=0.01)
            ref_opt = ch8fast.Adam([ref], lr=0.01)
            gaps, same_bits, got_rows = [], True, True
            for t in range(8):
                rng = np.random.default_rng(100 + t)
                idx = rng.integers(0, n_rows // 2 if t % 2 else n_rows, B)  # duplicates
                vals = rng.standard_normal((B, d)).astype(np.float32)
                mine = split_batch(np.arange(B), RANK, WORLD)
                if weighted:          # each rank: the mean over its samples
                    local = vals[mine] / np.float32(max(1, len(mine)))
                    g = dp.reduce_rows(table, ch8fast.SparseRows(idx[mine], local),
                                       len(mine), B, dense_above=dense_above)
                    whole = vals / np.float32(B)
                else:                 # each rank's rows as they are: sum / world
                    g = dp.reduce_rows(table, ch8fast.SparseRows(idx[mine], vals[mine]),
                                       dense_above=dense_above)
                    whole = vals / np.float32(WORLD)
                want = ch8fast.SparseRows(idx, whole).to_dense(n_rows)
                have = g.to_dense(n_rows)
                gaps.append(float(np.max(np.abs(have - want)) / np.max(np.abs(want))))
                got_rows = got_rows and set(np.unique(g.indices)) == set(np.unique(idx))
                opt.step([g])
                ref_opt.step([ch8fast.SparseRows(idx, whole)])
                mine_bits = table.tobytes() + g.indices.tobytes() + g.values.tobytes()
                same_bits = same_bits and len(set(COMM.allgather(mine_bits))) == 1
            result(case=f"rows_{way}_{'weighted' if weighted else 'plain'}", world=WORLD,
                   grad_rel_gap=max(gaps), rows_touched_match=got_rows,
                   same_bits_on_every_rank=same_bits,
                   table_rel_gap=float(np.max(np.abs(table - ref)) / np.max(np.abs(ref))),
                   moved=bool(np.any(table != np.random.default_rng(1).standard_normal(
                       (n_rows, d)).astype(np.float32))))
    table = np.zeros((n_rows, d), np.float32)
    good = ch8fast.SparseRows(np.array([1, 2]), np.ones((2, d), np.float32))
    errors = {}
    cases = {
        "out_of_range": lambda: dp.reduce_rows(table, ch8fast.SparseRows(
            np.array([n_rows if RANK == WORLD - 1 else 0]), np.ones((1, d), np.float32))),
        "other_table": lambda: dp.reduce_rows(
            np.zeros((n_rows + (RANK == 0), d), np.float32), good),
        "dtype": lambda: dp.reduce_rows(table, ch8fast.SparseRows(
            np.array([1]), np.ones((1, d), np.float64 if RANK == WORLD - 1 else np.float32))),
        "local_size_on_one_rank": lambda: dp.reduce_rows(
            table, good, *((1,) if RANK == 0 else ())),
        "not_sparse": lambda: dp.reduce_rows(table, np.ones((n_rows, d), np.float32)),
        "dense_above_differs": lambda: dp.reduce_rows(table, good,
                                                      dense_above=1.0 + (RANK == 0)),
        "dense_above_bad": lambda: dp.reduce_rows(
            table, good, dense_above=-1.0 if RANK == WORLD - 1 else 1.0),
        "table_dtype": lambda: dp.reduce_rows(
            np.zeros((n_rows, d), np.float16 if RANK == WORLD - 1 else np.float32), good),
    }
    for name, call in cases.items():
        try:
            call()
            errors[name] = None
        except (TypeError, ValueError) as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
    agree = {k: len(set(COMM.allgather(v))) == 1 for k, v in errors.items()}
    after = dp.reduce_rows(table, good)         # the ranks still make calls together
    result(case="rows_errors", world=WORLD, errors=errors, same_on_every_rank=agree,
           table_unchanged=bool(np.all(table == 0)),
           after_ok=after.to_dense(n_rows)[1, 0].item())


STORAGE_CK_SIZES = {"w": (700,), "b": (333,)}      # 1,033: blocks end inside tensors
# (state_format, parameter dtype, param_mode) of the checkpoint tests
STORAGE_CK_CASES = [("bfloat16", "float32", None), ("q8", "float32", None),
                    ("q8", "bfloat16", "master"), ("float32", "float16", "stochastic")]


def storage_run(dp, steps, seed):
    """``steps`` steps of random gradients, the same on any number of ranks: rank 0 holds
    the whole gradient (local_size 1 of 1), the others none."""
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        g = rng.standard_normal(dp.flat.size).astype(np.float32)
        dp.arena.flat_grad[...] = g if RANK == 0 else 0
        dp.step(int(RANK == 0), 1)


def storage_dp(fmt, pdtype, mode, shard, **kw):
    arena = ch8fast.FlatParams(STORAGE_CK_SIZES, np.dtype(getattr(ml_dtypes, pdtype, pdtype)))
    arena.flat[...] = np.random.default_rng(4).standard_normal(arena.flat.size)
    extra = {} if mode is None else {"param_mode": mode}
    return DataParallel(arena, ch8fast.Adam, COMM, lr=1e-2, state_format=fmt, seed=9,
                        shard_state=shard, **extra, **kw)


def storage_save(folder):
    """Compressed state and 16-bit parameters in a data-parallel checkpoint: save after 4
    steps, record the parameters 3 steps later."""
    expected = {}
    for fmt, pdtype, mode in STORAGE_CK_CASES:
        for shard in (False, True):
            key = f"{fmt}-{pdtype}-{mode}-{shard}"
            dp = storage_dp(fmt, pdtype, mode, shard)
            storage_run(dp, 4, 1)
            dp.save(os.path.join(folder, key))
            storage_run(dp, 3, 2)
            expected[key] = dp.flat.view(np.uint8).tobytes().hex()
    if RANK == 0:
        with open(os.path.join(folder, "expected.json"), "w") as f:
            json.dump({"world": WORLD, "flat": expected}, f)
    result(saved=True)


def storage_resume(folder):
    """Each checkpoint of storage_save loaded on this number of ranks, sharded or not,
    then 3 steps: the parameters of the run that went on without a checkpoint."""
    with open(os.path.join(folder, "expected.json")) as f:
        saved = json.load(f)
    for key, flat in saved["flat"].items():
        fmt, pdtype, mode, _ = key.split("-")
        mode = None if mode == "None" else mode
        for shard in (False, True):
            dp = storage_dp(fmt, pdtype, mode, shard)
            dp.load(os.path.join(folder, key))
            storage_run(dp, 3, 2)
            result(case=f"{key} -> shard {shard}", saved_on=saved["world"], world=WORLD,
                   bitwise=dp.flat.view(np.uint8).tobytes().hex() == flat,
                   in_sync=dp.check_in_sync())


class GradArena:
    """A 16-bit parameter buffer with float32 gradients."""

    def __init__(self, size, dtype):
        self.flat = np.zeros(size, dtype)
        self.flat_grad = np.zeros(size, np.float32)


def storage16():
    """16-bit parameters with data parallelism, every param_mode, float32 and 8-bit state,
    16-bit or float32 gradients: each unsharded step equals one process stepping with the
    averaged gradient, bit for bit, and sharded equals unsharded."""
    for pdtype in ("bfloat16", "float16"):
        dt = np.dtype(getattr(ml_dtypes, pdtype, pdtype))
        n = ch8fast.FlatParams(STORAGE_CK_SIZES, dt).flat.size     # padded tensors
        for mode in ("master", "stochastic", "kahan"):
            for fmt in ("float32", "q8"):
                grads16 = mode != "kahan"          # kahan: float32 gradients
                flats, out = {}, {"case": f"{pdtype}_{mode}_{fmt}", "world": WORLD,
                                  "grads": "16-bit" if grads16 else "float32"}
                start = np.random.default_rng(4).standard_normal(n).astype(dt)
                for vname, kw in (("dp", {}), ("zero", dict(shard_state=True)),
                                  ("zero_rs", dict(shard_state=True,
                                                   grad_sync="reduce_scatter"))):
                    arena = (ch8fast.FlatParams(STORAGE_CK_SIZES, dt) if grads16
                             else GradArena(n, dt))
                    arena.flat[...] = start
                    dp = DataParallel(arena, ch8fast.Adam, COMM, lr=1e-2, param_mode=mode,
                                      state_format=fmt, seed=5, **kw)
                    ref = ref_opt = None
                    if vname == "dp":
                        ref = start.copy()
                        ref_opt = ch8fast.Adam([ref], lr=1e-2, param_mode=mode,
                                               state_format=fmt, seed=5)
                    same = True
                    for t in range(6):
                        rng = np.random.default_rng(1000 * t + RANK)
                        arena.flat_grad[...] = rng.standard_normal(n)
                        dp.step(RANK + 1, WORLD * (WORLD + 1) // 2)
                        if ref_opt is not None:
                            ref_opt.step([dp.averaged_grad.copy()])
                            same = same and ref.view(np.uint16).tobytes() == \
                                dp.flat.view(np.uint16).tobytes()
                    flats[vname] = dp.flat.view(np.uint16).copy()
                    out[vname] = {"in_sync": dp.check_in_sync(),
                                  "moved": flats[vname].tobytes() !=
                                  start.view(np.uint16).tobytes()}
                    if vname == "dp":
                        out["dp_bitwise_eq_one_process"] = same
                result(**out, **sharded_against_unsharded(flats))


def threads():
    """The kernel threads each rank uses after DataParallel(), with and without an
    explicit setting (argv: 'default', 'set 2')."""
    mode = sys.argv[2] if len(sys.argv) > 2 else "default"
    if mode == "set":
        ch8fast.set_num_threads(int(sys.argv[3]))
    before = ch8fast.get_num_threads()
    model, arena = new_model(np.float64)
    DataParallel(arena, ch8fast.SGD, COMM, lr=0.1)
    from ch8fast.distributed import default_num_threads, ranks_on_this_host
    here = ranks_on_this_host(COMM)
    out = COMM.allgather({"before": before, "after": ch8fast.get_num_threads(),
                          "share": default_num_threads(here), "ranks_here": here,
                          "cpu_count": os.cpu_count(),
                          "omp": os.environ.get("OMP_NUM_THREADS")})
    result(ranks=out)


def killsave(folder, kill):
    """Save; with ``kill``, the last rank is killed (SIGKILL) while it writes its shard,
    after the data and before the rename: the job dies, leaving temporary files."""
    import signal
    X, y = data()
    dp, model = train_dp(CK_CLS, CK_HYPER, np.float64, X, y, FIRST, shard_state=True)
    if not kill:
        dp.save(folder, extra={"epoch": 1})
        result(saved=True)
        return
    if RANK == WORLD - 1:
        real = np.savez

        def savez_then_die(f, **arrays):
            real(f, **arrays)
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        np.savez = savez_then_die
    dp.save(folder, extra={"epoch": 2})
    result(not_reached=True)


def error_of(call):
    """``"Type: message"`` of what ``call()`` raises (ValueError, TypeError or
    RuntimeError), or None."""
    try:
        call()
        return None
    except (TypeError, ValueError, RuntimeError) as exc:
        return f"{type(exc).__name__}: {exc}"


def state_bytes(dp):
    """The parameter bytes, state bytes and step count of this rank, to see that nothing
    changed."""
    return (dp.flat.tobytes(), [a.tobytes() for st in dp.optimizer.state for a in
                                st.values()], dp.optimizer.state_dict()["param_groups"][0]["step"])


def audit(folder):
    """Checkpoints and agreement on 3 ranks: 8-bit state re-cut to a slice of one element,
    ranks that load different checkpoints of as many steps, arenas of one size and other
    shapes, ranks that save to different folders or at different steps."""
    out = {}
    # 513 elements, 8-bit state: the slices of three ranks are 256, 256 and 1 elements;
    # the last one has one scale. Saved unsharded, loaded sharded: the run goes on with
    # the same bits.
    expected = {}
    for shard in (False, True):
        dp = DataParallel(GradArena(513, np.float32), ch8fast.Adam, COMM, lr=1e-2,
                          state_format="q8", seed=9, shard_state=shard)
        dp.flat[...] = np.random.default_rng(4).standard_normal(513)
        if not shard:
            storage_run(dp, 2, 1)
            dp.save(os.path.join(folder, "q8"))
            storage_run(dp, 2, 2)
            expected = dp.flat.tobytes()
            continue
        out["q8_one_element_bounds"] = dp.bounds
        out["q8_one_element_load"] = error_of(lambda: dp.load(os.path.join(folder, "q8")))
        if out["q8_one_element_load"] is None:
            storage_run(dp, 2, 2)
        out["q8_one_element_bitwise"] = dp.flat.tobytes() == expected
        out["q8_one_element_in_sync"] = dp.check_in_sync()

    # Two checkpoints of the same run at the same step, other parameters; the last rank
    # loads the other one: refused on every rank, nothing changes.
    for shard in ("unsharded", "sharded"):
        arena = ch8fast.FlatParams({"w": (40,)}, np.float64)
        dp = DataParallel(arena, ch8fast.Adam, COMM, lr=0.1, shard_state=shard == "sharded")
        arena.flat_grad[...] = 1.0
        dp.step()
        one, two = (os.path.join(folder, f"{shard}-{k}") for k in ("one", "two"))
        dp.save(one)
        arena.flat[...] += 1.0                      # on every rank alike
        dp.save(two)
        dp2 = DataParallel(ch8fast.FlatParams({"w": (40,)}, np.float64), ch8fast.Adam, COMM,
                           lr=0.1, shard_state=shard == "sharded")
        before = state_bytes(dp2)
        out[f"other_checkpoint_{shard}"] = error_of(
            lambda: dp2.load(two if RANK == WORLD - 1 else one))
        out[f"other_checkpoint_{shard}_unchanged"] = state_bytes(dp2) == before
        out[f"other_checkpoint_{shard}_then_loads"] = error_of(lambda: dp2.load(one))

    # The same buffer size, other shapes on the last rank.
    def made(shape):
        return lambda: DataParallel(ch8fast.FlatParams({"W": shape, "b": (3,)},
                                                       np.float64), ch8fast.SGD, COMM, lr=0.1)
    out["layout_differs"] = error_of(made((3, 2) if RANK == WORLD - 1 else (2, 3)))
    out["layout_same"] = error_of(made((2, 3)))

    # Each rank saves to a folder of its own: refused, nothing written.
    arena = ch8fast.FlatParams({"w": (40,)}, np.float64)
    dp = DataParallel(arena, ch8fast.SGD, COMM, lr=0.1)
    own = os.path.join(folder, f"own-{RANK}")
    out["folders_differ"] = error_of(lambda: dp.save(own))
    out["own_folder_written"] = os.path.exists(own)
    # A rank whose optimizer stepped alone: its save would mix two points of the run.
    if RANK == 0:
        dp.optimizer.step(dp.grad_view)
    out["save_out_of_step"] = error_of(lambda: dp.save(os.path.join(folder, "mixed")))
    out["out_of_step_written"] = os.path.exists(os.path.join(folder, "mixed"))
    result(**{k: COMM.allgather(v) for k, v in out.items()})


def save_alone(folder):
    """Rank 0 calls save() while rank 1 steps, each catching its error (2 ranks); then a
    save on every rank and a load of it."""
    arena = ch8fast.FlatParams({"w": (40,)}, np.float64)
    dp = DataParallel(arena, ch8fast.SGD, COMM, lr=0.1, shard_state=True, timeout=20)
    out = {}
    for t in range(5):
        arena.flat_grad[...] = 1.0
        if t == 1:
            dp.save(folder)                                 # every rank: a good save
        if t == 2:
            try:                        # MPI's own errors too: the job must go on here
                dp.save(folder) if RANK == 0 else dp.step()
                out["error"] = None
            except Exception as exc:
                out["error"] = f"{type(exc).__name__}: {exc}"
        else:
            dp.step()
    dp.save(folder)                                         # every rank
    fresh = DataParallel(ch8fast.FlatParams({"w": (40,)}, np.float64), ch8fast.SGD, COMM,
                         lr=0.1, shard_state=True, timeout=20)
    out["load"] = error_of(lambda: fresh.load(folder))
    out["loaded_bitwise"] = fresh.flat.tobytes() == dp.flat.tobytes()
    result(**{k: COMM.allgather(v) for k, v in out.items()})


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
    ap.add_argument("what", choices=["equivalence", "save", "resume", "fail", "robust",
                                     "agree", "single", "threads", "killsave",
                                     "storage", "rows", "storage_save",
                                     "storage_resume", "storage16", "audit",
                                     "save_alone"])
    ap.add_argument("folder", nargs="?")
    ap.add_argument("more", nargs="*")
    ap.add_argument("--shard", action="store_true")
    a = ap.parse_args()
    COMM = get_comm()
    RANK, WORLD = COMM.Get_rank(), COMM.Get_size()
    if a.what == "threads":
        threads()
        sys.exit(0)
    ch8fast.set_num_threads(1)
    if a.what == "equivalence":
        equivalence()
    elif a.what == "fail":
        fail()
    elif a.what == "robust":
        robust(a.folder)
    elif a.what == "agree":
        agree(a.folder)
    elif a.what == "killsave":
        killsave(a.folder, a.more == ["kill"])
    elif a.what == "storage":
        storage_modes()
    elif a.what == "rows":
        rows()
    elif a.what == "storage16":
        storage16()
    elif a.what == "storage_save":
        storage_save(a.folder)
    elif a.what == "storage_resume":
        storage_resume(a.folder)
    elif a.what == "single":
        single()
    elif a.what == "audit":
        audit(a.folder)
    elif a.what == "save_alone":
        save_alone(a.folder)
    else:
        {"save": save, "resume": resume}[a.what](a.folder, a.shard)
