"""Data-parallel training over MPI (ch8fast.distributed), run under mpirun.

Each MPI check runs tests/mpi/dp_worker.py with ``mpirun -n 2`` or ``-n 3`` (three ranks
split the buffer and the minibatches unevenly) in a subprocess; rank 0 prints JSON lines
that the tests read. Skipped, with the reason, when mpirun or mpi4py is missing
(.ci/install_mpi.sh installs both).

Tolerances. Data-parallel training is compared with one process training on the whole
minibatches. The gradients differ in their last bits: each rank's matmul sums over its
own samples, each partial mean is weighted by its share of the batch, and the allreduce
adds the ranks' sums, so the additions happen in another order than in the single
gradient. That is about one unit in the last place per step; after the 8 steps here the
largest difference measured is 5e-16 (float64) and 2e-7 (float32), relative to
max(|theta|, 1). The tests allow 1e-12 and 2e-5: a margin of ~100x. The sharded variant
(state per rank, Allgatherv) runs the same elementwise kernels on the same averaged
gradient values as the unsharded one, so it is equal bit for bit. With a reduce-scatter
instead of the allreduce, two ranks still give the same bits (a + b == b + a in IEEE
arithmetic), three may not (the reduction may associate differently): to rounding.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import _mpi
import ch8fast
from _mpi import HAVE_MPI4PY, ROOT, check, needs_mpi
from ch8fast.distributed import shard_bounds, split_batch

WORKER = os.path.join(ROOT, "tests", "mpi", "dp_worker.py")
RTOL = {"float64": 1e-12, "float32": 2e-5}


def mpirun(n, *args, timeout=90, module=False, **kw):
    """Run ``python WORKER args`` (or ``python -m args``) on n ranks; returns
    (CompletedProcess, RESULT dicts printed by rank 0)."""
    if module:
        proc, results, _ = _mpi.mpirun(n, args[0], *args[1:], timeout=timeout, module=True,
                                       **kw)
    else:
        proc, results, _ = _mpi.mpirun(n, WORKER, *args, timeout=timeout, **kw)
    return proc, results


_CACHE = {}


def equivalence(n):
    if n not in _CACHE:
        proc, results = mpirun(n, "equivalence")
        check(proc)
        _CACHE[n] = {r["case"]: r for r in results}
    return _CACHE[n]


def case_names():
    sys.path.insert(0, os.path.join(ROOT, "tests", "mpi"))
    try:
        import dp_worker                   # starts no MPI on import
    finally:
        sys.path.pop(0)
    return [c[0] for c in dp_worker.CASES]


CASES = case_names() if HAVE_MPI4PY else ["(no mpi4py)"]


# ---------------------------------------------------------------------------------------
# Without MPI: the split of the buffer and of the batch, and the lazy import
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,world,itemsize", [(112, 2, 8), (112, 3, 8), (128, 3, 4),
                                              (1000, 7, 4), (16, 3, 4), (0, 2, 4),
                                              (10**6 + 5, 3, 4)])
def test_shard_bounds_tile_aligned_and_even(n, world, itemsize):
    b = shard_bounds(n, world, itemsize)
    block = 64 // itemsize
    assert len(b) == world + 1 and b[0] == 0 and b[-1] == n
    assert all(lo <= hi for lo, hi in zip(b, b[1:]))
    assert all(x % block == 0 for x in b[:-1])
    counts = [hi - lo for lo, hi in zip(b, b[1:])]
    assert max(counts) - min(counts) <= block + (-n % block)


def test_split_batch_covers_the_batch_in_order():
    idx = np.arange(100, 113)
    parts = [split_batch(idx, r, 3) for r in range(3)]
    assert [len(p) for p in parts] == [5, 4, 4]
    assert np.array_equal(np.concatenate(parts), idx)
    assert [len(split_batch(2, r, 3)) for r in range(3)] == [1, 1, 0]


def test_import_ch8fast_does_not_import_mpi4py():
    code = ("import sys, ch8fast, ch8fast.distributed, ch8fast.apps.demo; "
            "assert 'mpi4py' not in sys.modules, 'mpi4py imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


# ---------------------------------------------------------------------------------------
# Data parallel == one process; sharded == unsharded; in sync; memory
# ---------------------------------------------------------------------------------------

@needs_mpi
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("case", CASES)
def test_data_parallel_equals_single_process(world, case):
    r = equivalence(world)[case]
    tol = RTOL[r["dtype"]]
    for variant in ("dp", "zero", "zero_rs"):
        v = r[variant]
        assert v["in_sync"], f"{variant}: parameters differ across ranks"
        assert v["max_rel_diff_vs_ref"] <= tol, (variant, v["max_rel_diff_vs_ref"], tol)
        assert v["skipped"] == r["ref_skipped"]
    assert r["zero_bitwise_eq_dp"], "sharded state changed the result"
    if world == 2:
        assert r["zero_rs_bitwise_eq_dp"]
    assert r["zero_rs_max_rel_diff_vs_dp"] <= tol


@needs_mpi
@pytest.mark.parametrize("world", [2, 3])
def test_clipping_and_skipping_agree_across_ranks(world):
    r = equivalence(world)["adam_clip_skip"]
    assert r["ref_skipped"] == 1
    for variant in ("dp", "zero", "zero_rs"):
        assert r[variant]["skipped"] == 1           # the NaN was on one rank only
        assert r[variant]["last_grad_norm"] > 0.05  # so clipping was active


@needs_mpi
@pytest.mark.parametrize("world", [2, 3])
def test_sharded_state_memory_is_total_over_ranks(world, capsys):
    rows = []
    for case, r in equivalence(world).items():
        dp, zero = r["dp"], r["zero"]
        itemsize = 8 if r["dtype"] == "float64" else 4
        counts = [hi - lo for lo, hi in zip(zero["bounds"], zero["bounds"][1:])]
        k = zero["n_state_arrays"]
        assert zero["state_bytes_per_rank"] == [k * c * itemsize for c in counts]
        assert sum(zero["state_bytes_per_rank"]) == dp["state_bytes_per_rank"][0]
        assert dp["state_bytes_per_rank"] == [dp["state_bytes_unsharded"]] * world
        block = k * (64 // itemsize) * itemsize
        assert max(zero["state_bytes_per_rank"]) <= -(-dp["state_bytes_unsharded"] //
                                                     world) + block
        if case not in ("momentum", "adam", "adam_l2_amsgrad", "adam_f32"):
            continue
        rows.append(f"{case} ({r['dtype']}): unsharded {dp['state_bytes_per_rank']} -> sharded "
                    f"{zero['state_bytes_per_rank']} bytes per rank")
    with capsys.disabled():
        print(f"\nstate memory per rank, {world} ranks:\n  " + "\n  ".join(rows))


def check_sharded_as_one_process(results, world):
    """Every case: unsharded steps are one process's, bit for bit, and the sharded variants
    end with the unsharded bits (with a reduce-scatter, on 2 ranks only: 3 add in another
    order); every variant in sync and moved."""
    for r in results:
        assert r["dp_bitwise_eq_one_process"], r["case"]
        assert r["zero_bitwise_eq_dp"], r["case"]
        if world == 2:
            assert r["zero_rs_bitwise_eq_dp"], r["case"]
        for v in ("dp", "zero", "zero_rs"):
            assert r[v]["in_sync"] and r[v]["moved"], (r["case"], v)


@needs_mpi
@pytest.mark.parametrize("world", [2, 3])
def test_compressed_state_shards_as_one_process_stores_it(world):
    """bfloat16 and 8-bit state with data parallelism: every unsharded step equals one
    process stepping with the averaged gradient, bit for bit, and sharded state equals
    unsharded (8-bit slices start on a block of 256 elements; each shard draws the random
    bits of stochastic rounding by its offset in the buffer)."""
    proc, results = mpirun(world, "storage", timeout=180)
    check(proc)
    assert len(results) == 10
    check_sharded_as_one_process(results, world)
    for r in results:
        bounds = r["zero"]["bounds"]
        if r["case"].endswith("_q8"):
            assert all(b % 256 == 0 for b in bounds[:-1]), bounds
            assert any(k.endswith(".absmax") for k in r["zero"]["state_keys"])
        assert sum(r["zero"]["state_bytes_per_rank"]) <= r["dp"]["state_bytes_per_rank"][0]


_ROWS = {}


def rows_results(world):
    if world not in _ROWS:
        proc, results = mpirun(world, "rows", timeout=120)
        check(proc)
        _ROWS[world] = {r["case"]: r for r in results}
    return _ROWS[world]


@needs_mpi
@pytest.mark.parametrize("world", [2, 3])
def test_row_sparse_gradients_average_over_ranks(world):
    """DataParallel.reduce_rows: the averaged row-sparse gradient (duplicates within and
    across ranks, uneven shares, weighted or not) equals that of the whole batch to
    rounding, has the same bits on every rank, and lazy Adam on the replicated table
    follows one process; the allgather of rows and the dense allreduce agree."""
    cases = rows_results(world)
    assert len(cases) == 5
    for way in ("sparse", "dense"):
        for weighting in ("weighted", "plain"):
            r = cases[f"rows_{way}_{weighting}"]
            assert r["grad_rel_gap"] < 1e-6, r              # float32 rounding
            assert r["rows_touched_match"] and r["moved"], r
            assert r["same_bits_on_every_rank"], r
            assert r["table_rel_gap"] < 1e-5, r


@needs_mpi
@pytest.mark.parametrize("world", [2])
def test_bad_row_sparse_reductions_raise_on_every_rank(world):
    r = rows_results(world)["rows_errors"]
    e = r["errors"]
    assert all(r["same_on_every_rank"].values()), r
    assert f"rank {world - 1}: ValueError: grad: indices must lie in [0, 30)" in \
        e["out_of_range"]
    assert "the ranks differ in table shape" in e["other_table"]
    assert "dtype float64 for a table of float32" in e["dtype"]
    assert "the ranks differ in use of local_size" in e["local_size_on_one_rank"]
    assert "grad: a ch8fast.SparseRows, got ndarray" in e["not_sparse"]
    assert "the ranks differ in dense_above: " in e["dense_above_differs"]
    assert f"rank {world - 1}: ValueError: dense_above must be" in e["dense_above_bad"]
    assert r["table_unchanged"] and r["after_ok"] == 1.0


@needs_mpi
def test_row_sparse_reduction_compares_the_table_dtype():
    """A float16 table on one rank, float32 on the other, the same float32 gradient rows:
    refused on every rank (the replicas would differ after one step)."""
    r = rows_results(2)["rows_errors"]
    msg = r["errors"]["table_dtype"]
    assert msg is not None and "the ranks differ in table dtype: float32 on rank(s) [0], " \
        "float16 on rank(s) [1]" in msg, msg
    assert r["same_on_every_rank"]["table_dtype"] and r["table_unchanged"], r


@needs_mpi
@pytest.mark.parametrize("saved_on, resumed_on", [(2, 2), (3, 2), (2, 3)])
def test_compressed_state_checkpoints_resume_bit_for_bit(tmp_path, saved_on, resumed_on):
    """bfloat16 and 8-bit state, and 16-bit parameters (master copy, stochastic rounding),
    saved by DataParallel (sharded or not) and loaded on another number of ranks, sharded
    or not: the run goes on with the same bits (the 8-bit scales are cut by block)."""
    folder = str(tmp_path)
    proc, _ = mpirun(saved_on, "storage_save", folder, timeout=120)
    check(proc)
    proc, results = mpirun(resumed_on, "storage_resume", folder, timeout=120)
    check(proc)
    assert len(results) == 16
    for r in results:
        assert r["bitwise"] and r["in_sync"], r


@needs_mpi
@pytest.mark.parametrize("world", [2, 3])
def test_16bit_parameters_shard_as_one_process_updates_them(world):
    """bfloat16 and float16 arenas (master copy, stochastic rounding, kahan; float32 and
    8-bit state; 16-bit or float32 gradients, reduced in float32): every unsharded step
    equals one process stepping with the averaged gradient, bit for bit, and sharded state
    equals unsharded."""
    proc, results = mpirun(world, "storage16", timeout=180)
    check(proc)
    assert len(results) == 12
    check_sharded_as_one_process(results, world)


@needs_mpi
def test_16bit_arenas_need_matching_or_float32_gradients():
    from ch8fast.distributed import DataParallel
    ml_dtypes = pytest.importorskip("ml_dtypes")

    class Arena:
        def __init__(self, p, g):
            self.flat, self.flat_grad = np.zeros(64, p), np.zeros(64, g)

    for p, g in ((np.float16, ml_dtypes.bfloat16), (ml_dtypes.bfloat16, np.float64),
                 (np.float32, np.float16)):
        with pytest.raises(ValueError, match="float32 gradients are accepted for 16-bit"):
            DataParallel(Arena(p, g), ch8fast.Adam, lr=0.1)
    with pytest.raises(TypeError, match="float32, float64, float16 or bfloat16, got int32"):
        DataParallel(Arena(np.int32, np.int32), ch8fast.Adam, lr=0.1)
    dp = DataParallel(Arena(ml_dtypes.bfloat16, np.float32), ch8fast.Adam, lr=0.1)
    dp.arena.flat_grad[...] = 1
    dp.step()
    assert dp.flat_grad is dp.arena.flat_grad and dp.averaged_grad is dp.flat_grad
    arena16 = ch8fast.FlatParams({"w": (64,)}, ml_dtypes.bfloat16)
    dp16 = DataParallel(arena16, ch8fast.SGD, lr=0.5)
    arena16.flat_grad[...] = 2
    dp16.step()
    assert dp16.flat_grad is arena16.flat_grad            # the input, left as written
    assert dp16.averaged_grad.dtype == np.float32 and np.all(dp16.averaged_grad == 2)
    assert np.all(np.asarray(arena16.flat, np.float32) == -1)
    assert np.all(np.asarray(dp.flat, np.float32) == np.float32(-0.1).astype(
        ml_dtypes.bfloat16).astype(np.float32))


@needs_mpi
@pytest.mark.parametrize("name", ["LAMB", "LARS"])
def test_data_parallel_refuses_trust_ratio_rules(name):
    """LAMB and LARS scale each array by its own norms; DataParallel updates one flat
    buffer, which would make one ratio for the whole model: refused, naming the rule."""
    from ch8fast.distributed import DataParallel
    arena = ch8fast.FlatParams({"w": (10,), "b": (3,)}, np.float32)
    with pytest.raises(ValueError, match=f"{name} scales each parameter array"):
        DataParallel(arena, name, lr=0.5)


@needs_mpi
def test_what_data_parallel_holds_cannot_be_replaced():
    """Replacing an array the collectives or the optimizer hold (the reduction would run
    on one array and the step on another) is refused; writing into it works."""
    from ch8fast.distributed import DataParallel
    arena = ch8fast.FlatParams({"w": (10,)}, np.float32)
    dp = DataParallel(arena, ch8fast.SGD, lr=0.5)
    for name in ("flat", "flat_grad", "grad_view", "param_view", "optimizer", "arena",
                 "bounds", "lo", "hi", "shard_state", "grad_sync", "comm", "rank",
                 "world", "timeout", "check_steps", "averaged_grad"):
        with pytest.raises(AttributeError):
            setattr(dp, name, getattr(dp, name))
    dp.flat_grad[...] = 1.0                   # in place: takes effect
    dp.step()
    assert np.all(dp.flat == -0.5) and dp.optimizer.params[0] is not None


@needs_mpi
def test_element_offset_is_left_to_data_parallel():
    from ch8fast.distributed import DataParallel
    arena = ch8fast.FlatParams({"w": (10,)}, np.float32)
    with pytest.raises(ValueError, match="element_offset is DataParallel's to set"):
        DataParallel(arena, ch8fast.Adam, lr=0.1, element_offset=3)


# ---------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------

@needs_mpi
def test_sharded_checkpoint_resumes_bit_for_bit(tmp_path):
    folder = str(tmp_path / "ckpt")
    proc, res = mpirun(2, "save", folder, "--shard")
    check(proc)
    assert res[0]["reload_identity"] and res[1]["saved"]
    files = sorted(os.listdir(folder))
    assert len(files) == 4 and files[:2] == ["final-2.npy", "manifest.json"]
    with open(os.path.join(folder, "manifest.json")) as fh:
        sid = json.load(fh)["save_id"]
    assert files[2:] == [f"shard-{sid}-00000-of-00002.npz", f"shard-{sid}-00001-of-00002.npz"]
    # Same number of ranks, sharded: each rank reads its own file; bit for bit.
    proc, res = mpirun(2, "resume", folder, "--shard")
    check(proc)
    r = res[0]
    assert r["bitwise"] and r["in_sync"] and r["extra"] == {"epoch": 1} and r["steps"] == 8
    assert "holds Adam state; this optimizer is AdamW" in r["errors"]["wrong_optimizer"]
    assert "holds 112 parameters" in r["errors"]["wrong_size"]
    assert "no such file" in r["errors"]["missing"]
    # Same ranks, unsharded: the shards are stitched together; still bit for bit.
    proc, res = mpirun(2, "resume", folder)
    check(proc)
    assert res[0]["bitwise"] and res[0]["in_sync"]
    # Three ranks: the state is re-cut exactly; later steps differ by reduction order.
    proc, res = mpirun(3, "resume", folder, "--shard")
    check(proc)
    assert res[0]["in_sync"] and res[0]["max_rel_diff"] <= RTOL["float64"]


@needs_mpi
def test_failures_leave_every_rank_consistent(tmp_path):
    """Bad arguments or disagreement on one rank raise on every rank; a norm whose square
    overflows is still clipped; a failed save keeps the previous one loadable and a later
    save removes the old files; a load one rank refuses is undone on the others."""
    proc, res = mpirun(2, "robust", str(tmp_path / "ck"))
    check(proc)
    r = res[0]
    assert all(m is not None and "lr" in m for m in r["bad_lr_on_one_rank"]), r
    assert all(m is not None and "disagree" in m for m in r["clip_norm_differs"]), r
    n0, n1 = r["huge_norm"]
    assert n0 == n1 and abs(n0 / 5e159 - 1) < 1e-12 and r["huge_in_sync"]   # mean of 2
    assert r["bad_extra"] is not None and "JSON" in r["bad_extra"]
    assert r["files_kept"] and r["previous_save_loads"] and r["old_files_removed"]
    assert len(r["files_after_second_save"]) == 3
    # the forged file is refused on every rank, naming the rank that read it
    assert r["one_rank_refuses"] is not None and "rank(s) [1]" in r["one_rank_refuses"]
    assert "different hyperparameters" in r["one_rank_refuses"]
    assert r["state_unchanged"] == [True, True]


_AUDIT = {}


def audit(tmp_path_factory):
    """The RESULT of ``dp_worker.py audit`` on 3 ranks (every value gathered from every
    rank), run once."""
    if not _AUDIT:
        proc, res = mpirun(3, "audit", str(tmp_path_factory.mktemp("audit")))
        check(proc)
        _AUDIT.update(res[0])
    return _AUDIT


def same_error_everywhere(messages, *parts):
    assert len(messages) == 3 and len(set(messages)) == 1, messages
    assert messages[0] is not None and all(p in messages[0] for p in parts), messages


@needs_mpi
def test_8bit_state_recut_to_a_slice_of_one_element(tmp_path_factory):
    """513 elements of 8-bit state on 3 ranks: the last slice holds one element and one
    scale. Saved unsharded, loaded sharded (each scale told from each element by what it
    is, not by its length): the run goes on with the same bits."""
    r = audit(tmp_path_factory)
    assert r["q8_one_element_bounds"][0] == [0, 256, 512, 513]
    assert r["q8_one_element_load"] == [None] * 3, r["q8_one_element_load"]
    assert r["q8_one_element_bitwise"] == [True] * 3
    assert r["q8_one_element_in_sync"] == [True] * 3


@needs_mpi
@pytest.mark.parametrize("mode", ["unsharded", "sharded"])
def test_load_refuses_ranks_that_read_other_checkpoints(tmp_path_factory, mode):
    """Two saves of one run at the same step, the last rank given the other folder: every
    rank refuses, naming the ranks and what they read, and nothing changes; loading one
    checkpoint on every rank then works."""
    r = audit(tmp_path_factory)
    same_error_everywhere(r[f"other_checkpoint_{mode}"],
                          "ValueError: DataParallel.load(): the ranks read different "
                          "checkpoints: rank(s) [0, 1] save ", f"{mode}-one', rank(s) [2] "
                          "save ", f"{mode}-two' (every rank must load the same checkpoint)")
    assert r[f"other_checkpoint_{mode}_unchanged"] == [True] * 3
    assert r[f"other_checkpoint_{mode}_then_loads"] == [None] * 3


@needs_mpi
def test_construction_compares_the_arena_layout(tmp_path_factory):
    """One buffer size, other shapes on the last rank: refused on every rank, naming the
    first tensor that differs and the rank."""
    r = audit(tmp_path_factory)
    same_error_everywhere(r["layout_differs"], "ValueError: DataParallel: the ranks disagree "
                          "on the arena's layout (names, shapes, offsets): tensor 0: 'W' "
                          "(2, 3) at offset 0 on rank 0, 'W' (3, 2) at offset 0 on rank 2")
    assert r["layout_same"] == [None] * 3


@needs_mpi
def test_save_refuses_other_folders_and_steps(tmp_path_factory):
    """Ranks that pass different folders, or whose optimizers made different numbers of
    steps, are refused on every rank before anything is written."""
    r = audit(tmp_path_factory)
    same_error_everywhere(r["folders_differ"], "ValueError: DataParallel.save(): the ranks "
                          "passed different folders: rank(s) [0]: '", "own-0', rank(s) [1]: "
                          "'", "own-1', rank(s) [2]: '", "own-2'")
    assert r["own_folder_written"] == [False] * 3
    same_error_everywhere(r["save_out_of_step"], "ValueError: DataParallel.save(): the "
                          "ranks are out of step: rank(s) [1, 2] had made 0 steps, rank(s) "
                          "[0] had made 1 steps")
    assert r["out_of_step_written"] == [False] * 3


@needs_mpi
def test_save_on_one_rank_leaves_nothing_for_the_next_save(tmp_path):
    """Rank 0 saves while rank 1 steps, each catching its error: both say that the ranks
    are in different collective calls (not the other call's bytes read as step counts),
    and rank 0's save leaves no save id waiting: the next save on every rank writes every
    shard under its own id and loads."""
    proc, res = mpirun(2, "save_alone", str(tmp_path / "ck"), timeout=60)
    check(proc)
    r = res[0]
    assert r["load"] == [None, None] and r["loaded_bitwise"] == [True, True], r
    e0, e1 = r["error"]
    assert e0.startswith("RuntimeError: ch8fast.distributed: rank 0 received more data in "
                         "the save id and folder check of save()"), e0
    assert "another rank is in another collective call" in e0, e0
    assert e1.startswith("RuntimeError: DataParallel.step(), step 3 on rank 1: "
                         "ch8fast.distributed: the ranks are in different collective "
                         "calls: rank(s) [0] in another collective call, rank(s) [1] in the "
                         "step check"), e1


# ---------------------------------------------------------------------------------------
# Agreement at construction and in a step; the lr on load
# ---------------------------------------------------------------------------------------

@needs_mpi
def test_disagreements_raise_on_every_rank(tmp_path):
    """clip_value, callables and broadcast are compared at construction; a bad argument
    of step() on one rank raises on every rank and changes nothing."""
    proc, res = mpirun(2, "agree", str(tmp_path / "ck"), timeout=120)
    check(proc)
    r = res[0]

    def everywhere(key, *parts):
        msgs = r[key]
        assert len(msgs) == 2 and all(m is not None for m in msgs), (key, msgs)
        for m in msgs:
            assert all(p in m for p in parts), (key, m)

    everywhere("clip_value_differs", "disagree on clip_value", "rank 0: None",
               "rank 1: 1.0")
    everywhere("broadcast_differs", "disagree on broadcast")
    everywhere("schedules_differ", "disagree on hyperparameters", "'decay_rate': 0.6")
    assert r["schedules_equal"] == [None, None]           # schedules compare by content
    # plain callables are refused: two lambdas, or closures of one factory, cannot be
    # compared (they have the same names)
    everywhere("two_lambdas", "TypeError: lr is a plain callable", "ch8fast.schedules")
    everywhere("one_factory", "TypeError: lr is a plain callable", "factory")
    everywhere("timeout_bad_on_one_rank", "timeout must be a finite number > 0")
    assert r["no_broadcast_same"] == [None, None]
    everywhere("no_broadcast_differ", "broadcast=False", "rank(s) [1] differ from rank 0")
    assert r["bad_local_size"][1] == "ValueError: local_size must be an integer in [0, " \
                                    "2**62], got -1"
    assert "rank(s) [1] gave an invalid local_size" in r["bad_local_size"][0]
    assert r["unchanged_after_bad_step"] == [True, True]
    assert r["steps_after"] == [1, 1] and r["in_sync_after"] == [True, True]


@needs_mpi
def test_load_restores_the_saved_lr(tmp_path):
    """dp.load makes the hyperparameters the checkpoint's (as torch's load_state_dict
    does): a DataParallel made with lr=0.5 has the saved 0.01 after loading; an lr set
    after loading, on every rank, holds and the ranks stay in sync."""
    proc, res = mpirun(2, "agree", str(tmp_path / "ck"), timeout=120)
    check(proc)
    r = res[0]
    assert r["lr_after_load"] == [0.01, 0.01]
    assert r["lr_changed_after_load_steps"] == [2, 2]
    assert r["lr_changed_in_sync"] == [True, True]


@needs_mpi
@pytest.mark.parametrize("launch", ["python", "mpirun -n 1"])
def test_one_rank_uses_the_gradients_in_every_mode(launch):
    """On one process (e.g. resuming a checkpoint alone) every mode, reduce_scatter
    included, steps on the gradients: the same bits as the plain optimizer."""
    if launch == "python":
        out = subprocess.run([sys.executable, WORKER, "single"], capture_output=True,
                             text=True, timeout=120, cwd=ROOT,
                             env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert out.returncode == 0, out.stderr
        r = [json.loads(line[7:]) for line in out.stdout.splitlines()
             if line.startswith("RESULT ")][0]
    else:
        proc, res = mpirun(1, "single")
        check(proc)
        r = res[0]
    assert r["world"] == 1
    for mode in ("dp", "zero", "zero_rs"):
        assert r[mode]["moved"] and r[mode]["bitwise_eq_ref"] and r[mode]["steps"] == 8, \
            (mode, r[mode])


# ---------------------------------------------------------------------------------------
# Threads per rank
# ---------------------------------------------------------------------------------------

def test_default_num_threads_is_the_share_of_the_host():
    from ch8fast.distributed import default_num_threads
    assert default_num_threads(2, cores=2, affinity=2) == 1
    assert default_num_threads(2, cores=16, affinity=16) == 8
    assert default_num_threads(3, cores=16, affinity=16) == 5
    assert default_num_threads(4, cores=2, affinity=2) == 1       # never 0
    assert default_num_threads(2, cores=16, affinity=1) == 1      # bound to one core
    assert default_num_threads(1, cores=8, affinity=8) == 8


@needs_mpi
@pytest.mark.parametrize("setting", ["default", "OMP_NUM_THREADS=2", "set_num_threads(2)"])
def test_ranks_share_the_cores_unless_told(setting):
    """Two ranks on this host, not bound to cores: each uses its share of the cores (on 2
    cores, one thread), instead of OpenMP's default of every core; OMP_NUM_THREADS or
    ch8fast.set_num_threads wins."""
    env = {"OMP_NUM_THREADS": "2" if setting.startswith("OMP") else None}
    args = ["threads"] + (["set", "2"] if setting.startswith("set") else [])
    mpi_args = (["--bind-to", "none"] if _mpi.is_open_mpi() else [])
    if setting.startswith("OMP") and _mpi.is_open_mpi():
        mpi_args += ["-x", "OMP_NUM_THREADS"]
    proc, res = mpirun(2, *args, env=env, mpi_args=mpi_args)
    check(proc)
    ranks = res[0]["ranks"]
    assert [r["ranks_here"] for r in ranks] == [2, 2]
    cores = ranks[0]["cpu_count"]
    for r in ranks:
        if setting == "default":
            assert r["omp"] is None
            assert r["after"] == r["share"] == max(1, cores // 2), r
        else:
            assert r["after"] == 2, r


# ---------------------------------------------------------------------------------------
# Temporary files of killed saves
# ---------------------------------------------------------------------------------------

@needs_mpi
def test_killed_saves_leave_no_temporary_files(tmp_path):
    """Each save uses a new id, so the temporary files of killed saves never share a name
    with a later one: a save removes those of this host whose process is gone, and those
    of any host older than a day, never a live writer's or an unrelated file."""
    import socket
    import time
    from ch8fast.checkpoint import _host_tag
    folder = str(tmp_path / "ck")
    proc, res = mpirun(2, "killsave", folder)
    check(proc)
    left = []
    for _ in range(2):                               # two saves killed mid-write
        proc, _ = mpirun(2, "killsave", folder, "kill")
        assert proc.returncode != 0
        assert "not_reached" not in proc.stdout
        left.append({n for n in os.listdir(folder) if ".tmp-" in n})
    assert left[0] and left[1], left                 # each killed save left some
    assert not left[0] & left[1], left    # the second save removed the first one's
    host = _host_tag()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    fake = {
        "other_host_old": ".shard-00ff-00000-of-00002.npz.tmp-otherhost-123-abc",
        "other_host_new": ".shard-00fe-00000-of-00002.npz.tmp-otherhost-123-abd",
        "live_writer": f".shard-00fd-00001-of-00002.npz.tmp-{host}-{os.getpid()}-abe",
        "manifest_dead": f".manifest.json.tmp-{host}-{dead.pid}-abf",
        "unrelated_dead": f".notes.txt.tmp-{host}-{dead.pid}-abg",
    }
    for what, name in fake.items():
        with open(os.path.join(folder, name), "w") as fh:
            fh.write("x")
    day = 24 * 3600
    old = time.time() - day - 60
    os.utime(os.path.join(folder, fake["other_host_old"]), (old, old))
    proc, res = mpirun(2, "killsave", folder)              # a save that completes
    check(proc)
    names = set(os.listdir(folder))
    with open(os.path.join(folder, "manifest.json")) as fh:
        sid = json.load(fh)["save_id"]
    expected = {"manifest.json", f"shard-{sid}-00000-of-00002.npz",
                f"shard-{sid}-00001-of-00002.npz",
                fake["other_host_new"], fake["live_writer"], fake["unrelated_dead"]}
    assert names == expected, (sorted(names - expected), sorted(expected - names),
                               socket.gethostname())


# ---------------------------------------------------------------------------------------
# A failing rank ends the job
# ---------------------------------------------------------------------------------------

@needs_mpi
def test_failing_rank_aborts_the_job_quickly():
    proc, _, elapsed = _mpi.mpirun(2, WORKER, "fail", timeout=60)
    assert proc.returncode != 0
    assert elapsed < 30, f"took {elapsed:.1f} s: the other rank hung?"
    err = proc.stderr + proc.stdout
    assert "[rank 1/2] RuntimeError: deliberate failure in step 2" in err
    assert "rank 1 failed with RuntimeError" in err and "aborting all 2 ranks" in err
    assert "not reached" not in proc.stdout


# ---------------------------------------------------------------------------------------
# The demo
# ---------------------------------------------------------------------------------------

@needs_mpi
def test_demo_distributed_matches_the_single_process_demo(tmp_path):
    from ch8fast.apps.demo import run_demo
    args = ["--epochs", "2", "--optimizers", "nesterov,adam", "--no-plot", "--quiet"]
    out = tmp_path / "dist"
    proc, _ = mpirun(2, "ch8fast", "demo", "--distributed", "--shard-state", *args,
                     "--out", str(out), module=True)
    check(proc)
    assert proc.stdout.count("| optimizer |") == 1        # rank 0 alone prints
    assert "data parallel over 2 MPI rank(s)" in proc.stdout
    assert "parameters identical on all 2 ranks" in proc.stdout
    with open(out / "demo_results.json") as fh:
        dist = json.load(fh)
    assert dist["mpi_ranks"] == 2
    single = run_demo(optimizers=["nesterov", "adam"], epochs=2, out=str(tmp_path / "one"),
                      why=False,
                      plot=False, quiet=True, stream=open(os.devnull, "w"))
    for a, b in zip(dist["results"], single["results"]):
        assert a["optimizer"] == b["optimizer"] and a["iterations"] == b["iterations"]
        assert a["distributed"]["in_sync"]
        # float32, 90 steps: the reduction order moves the loss in the 5th digit at most
        assert abs(a["final_train_loss"] - b["final_train_loss"]) <= 1e-4 * b["final_train_loss"]


def test_demo_shard_state_needs_distributed(capsys):
    from ch8fast.apps.cli import main
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--shard-state", "--epochs", "1"])
    assert exc.value.code == 2
    assert "--shard-state needs --distributed" in capsys.readouterr().err


def test_demo_help_lists_distributed(capsys):
    from ch8fast.apps.cli import main
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = capsys.readouterr().out
    assert "--distributed" in out and "--shard-state" in out and "mpirun -n 2" in out
