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
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from ch8fast.distributed import shard_bounds, split_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "mpi", "dp_worker.py")
MPIRUN = shutil.which("mpirun") or shutil.which("mpiexec")
HAVE_MPI4PY = importlib.util.find_spec("mpi4py") is not None
RTOL = {"float64": 1e-12, "float32": 2e-5}

needs_mpi = pytest.mark.skipif(
    MPIRUN is None or not HAVE_MPI4PY,
    reason="needs mpirun and mpi4py (run .ci/install_mpi.sh: Open MPI + pip mpi4py); "
           f"mpirun: {MPIRUN or 'not found'}, mpi4py: "
           f"{'installed' if HAVE_MPI4PY else 'not installed'}")


def _is_open_mpi():
    try:
        out = subprocess.run([MPIRUN, "--version"], capture_output=True, text=True,
                             timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "Open MPI" in out.stdout + out.stderr or "OpenRTE" in out.stdout + out.stderr


def mpirun(n, *args, timeout=90, module=False):
    """Run ``python WORKER args`` (or ``python -m args``) on n ranks; returns
    (CompletedProcess, RESULT dicts printed by rank 0)."""
    cmd = [MPIRUN, "-n", str(n)]
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    if _is_open_mpi():
        # --oversubscribe: 3 ranks on 2 cores; as root Open MPI refuses without
        # --allow-run-as-root. Containers often forbid the cross-memory attach that
        # the shared-memory transport uses for large messages: copy through the buffer.
        cmd += ["--oversubscribe"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd += ["--allow-run-as-root"]
        env.setdefault("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        env.setdefault("OMPI_MCA_rmaps_base_oversubscribe", "1")
    cmd += [sys.executable] + (["-m"] if module else [WORKER]) + list(args)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=ROOT)
    results = [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines()
               if line.startswith("RESULT ")]
    return proc, results


def check(proc):
    assert proc.returncode == 0, (f"mpirun exited {proc.returncode}\nstdout:\n"
                                  f"{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")


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
    assert r["one_rank_refuses"] is not None and "rank 1" in r["one_rank_refuses"]
    assert r["state_unchanged"] == [True, True]


# ---------------------------------------------------------------------------------------
# A failing rank ends the job
# ---------------------------------------------------------------------------------------

@needs_mpi
def test_failing_rank_aborts_the_job_quickly():
    t0 = time.perf_counter()
    proc, _ = mpirun(2, "fail", timeout=60)
    elapsed = time.perf_counter() - t0
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
