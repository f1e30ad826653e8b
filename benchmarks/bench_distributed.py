"""Time per step and bytes communicated per step of ch8fast.distributed.DataParallel.

    python benchmarks/bench_distributed.py              # 1 and 2 ranks, 1e5..1e7 params
    python benchmarks/bench_distributed.py --ranks 1 2 4 --sizes 1e6 --optimizer SGD

Launches itself under mpirun once per number of ranks; each run times ``step()`` (the
gradient allreduce or reduce-scatter, the fused update, and for sharded state the
allgather) for plain data parallel and for the sharded state, with the time of each part,
and prints one table. float32 parameters; every rank gets cores // ranks kernel threads.

Bytes per step are those each rank sends in a ring algorithm (what Open MPI uses for large
messages): an allreduce of B bytes sends 2 (p - 1) / p x B per rank, a reduce-scatter or
an allgather (p - 1) / p x B.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODES = [("data parallel", dict()),
         ("sharded, allreduce", dict(shard_state=True)),
         ("sharded, reduce-scatter", dict(shard_state=True, grad_sync="reduce_scatter"))]


def ring_bytes(mode, nbytes, p):
    f = (p - 1) / p
    if not mode.get("shard_state"):
        return 2 * f * nbytes
    if mode.get("grad_sync") == "reduce_scatter":
        return 2 * f * nbytes                      # reduce-scatter + allgather
    return 3 * f * nbytes                          # allreduce + allgather


def worker(args):
    import ch8fast
    from ch8fast.distributed import DataParallel, get_comm, ranks_on_this_host
    comm = get_comm()
    rank, p = comm.Get_rank(), comm.Get_size()
    ch8fast.set_num_threads(max(1, (os.cpu_count() or 1) // ranks_on_this_host(comm)))
    cls = getattr(ch8fast, args.optimizer)
    rows = []
    for size in args.sizes:
        n = int(float(size))
        arena = ch8fast.FlatParams({"w": (n,)}, np.float32)
        rng = np.random.default_rng(rank)
        arena.flat[:] = rng.standard_normal(n, dtype=np.float32)
        grads = rng.standard_normal(n, dtype=np.float32)
        for label, mode in MODES:
            if p == 1 and mode.get("shard_state"):
                continue
            dp = DataParallel(arena, cls, comm, lr=1e-3, **mode)
            reps = max(5, min(2000, int(args.work / n)))
            parts = {"sync": 0.0, "update": 0.0, "gather": 0.0}
            orig_step, orig_gather = dp.optimizer.step, dp._allgather

            def timed_step(g, _f=orig_step):
                t = time.perf_counter()
                _f(g)
                parts["update"] += time.perf_counter() - t

            def timed_gather(_f=orig_gather):
                t = time.perf_counter()
                _f()
                parts["gather"] += time.perf_counter() - t
            dp.optimizer.step, dp._allgather = timed_step, timed_gather
            for it in range(reps + 2):
                if it == 2:                          # two warm-up steps
                    comm.Barrier()
                    parts = dict.fromkeys(parts, 0.0)
                np.copyto(arena.flat_grad, grads)      # fresh gradients, not timed
                t = time.perf_counter()
                dp.step()
                parts["sync"] -= time.perf_counter() - t
            step_t = -parts["sync"] / reps
            upd, gat = parts["update"] / reps, parts["gather"] / reps
            sync = step_t - upd - gat
            times = comm.gather((step_t, sync, upd, gat), root=0)
            mem = dp.memory_report()
            if rank == 0:
                worst = max(times)                   # the slowest rank sets the pace
                rows.append({"ranks": p, "params": n, "mode": label,
                             "step_ms": worst[0] * 1e3, "sync_ms": worst[1] * 1e3,
                             "update_ms": worst[2] * 1e3, "gather_ms": worst[3] * 1e3,
                             "bytes_per_step": ring_bytes(mode, n * 4, p),
                             "state_bytes_per_rank": max(mem["per_rank"]),
                             "state_bytes_unsharded": mem["unsharded"],
                             "threads": ch8fast.get_num_threads(),
                             "reps": reps})
            del dp
    if rank == 0:
        print("ROWS " + json.dumps(rows), flush=True)


def fmt_bytes(b):
    for unit, s in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= s:
            return f"{b / s:.3g} {unit}"
    return f"{b:.0f} B"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--sizes", nargs="+", default=["1e5", "1e6", "1e7"])
    ap.add_argument("--optimizer", default="Adam")
    ap.add_argument("--work", type=float, default=3e8,
                    help="elements processed per (size, mode): sets the repetitions")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        sys.exit("bench_distributed: mpirun not found (run .ci/install_mpi.sh)")
    rows = []
    for p in args.ranks:
        cmd = [mpirun, "-n", str(p), "--oversubscribe"]
        if os.geteuid() == 0:
            cmd.append("--allow-run-as-root")
        cmd += [sys.executable, os.path.abspath(__file__), "--worker", "--optimizer",
                args.optimizer, "--work", str(args.work), "--sizes", *args.sizes]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"mpirun -n {p} failed:\n{out.stdout}\n{out.stderr}")
        rows += next(json.loads(line[5:]) for line in out.stdout.splitlines()
                     if line.startswith("ROWS "))
    print(f"{args.optimizer}, float32; {os.cpu_count()} cores on one host; times of the "
          f"slowest rank, ms per step")
    head = ("| ranks | params | mode | step ms | grad sync ms | update ms | allgather ms | "
            "sent per rank per step | state per rank |")
    print(head)
    print("|" + "|".join("---:" if i not in (2,) else "---" for i in range(9)) + "|")
    for r in rows:
        print(f"| {r['ranks']} | {r['params']:.0e} | {r['mode']} | {r['step_ms']:.3f} | "
              f"{r['sync_ms']:.3f} | {r['update_ms']:.3f} | {r['gather_ms']:.3f} | "
              f"{fmt_bytes(r['bytes_per_step'])} | "
              f"{fmt_bytes(r['state_bytes_per_rank'])} of "
              f"{fmt_bytes(r['state_bytes_unsharded'])} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
