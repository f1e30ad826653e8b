"""Time per step and bytes communicated per step of ch8fast.distributed.DataParallel, and
the cost of its safety (the watchdog's deadlines and the per-step check).

    python benchmarks/bench_distributed.py                    # 1, 2 ranks; 1e5..1e7 params
    python benchmarks/bench_distributed.py --ranks 1 2 4 --sizes 1e6 --optimizer SGD
    python benchmarks/bench_distributed.py --overhead         # the safety's cost, 2 ranks

Launches itself under mpirun once per number of ranks; each run times ``step()`` (the step
check, the gradient allreduce or reduce-scatter, the fused update, and for sharded state
the allgather) for plain data parallel and for the sharded state, with the time of each
part, and prints one table. float32 parameters; every rank gets DataParallel's default
kernel threads (its share of the host's cores).

``--overhead`` times, on 2 ranks, the data-parallel step with neither the deadlines nor
the check (``timeout=None, check_steps=False``), with each alone and with both (the
default), in interleaved rounds (the median round of each; the slowest rank), and, as the
alternative to the watchdog thread, a blocking ``Allreduce`` against an ``Iallreduce``
polled with ``Test`` until done.

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

SIZES = ["1e5", "1e6", "1e7"]
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


def new_arena(n, rank):
    """A float32 arena of n parameters (random, per rank) and gradients for it."""
    import ch8fast
    arena = ch8fast.FlatParams({"w": (n,)}, np.float32)
    rng = np.random.default_rng(rank)
    arena.flat[:] = rng.standard_normal(arena.flat.size, dtype=np.float32)
    return arena, rng.standard_normal(arena.flat.size, dtype=np.float32)


def worker(args):
    import ch8fast
    from ch8fast.distributed import DataParallel, get_comm
    comm = get_comm()
    rank, p = comm.Get_rank(), comm.Get_size()
    if args.overhead:
        return overhead(args, comm)
    cls = getattr(ch8fast, args.optimizer)
    rows = []
    for size in args.sizes:
        n = int(float(size))
        arena, grads = new_arena(n, rank)
        for label, mode in MODES:
            if p == 1 and mode.get("shard_state"):
                continue
            dp = DataParallel(arena, cls, comm, lr=1e-3, **mode)
            reps = max(5, min(2000, int(args.work / n)))
            parts = {"sync": 0.0, "check": 0.0, "update": 0.0, "gather": 0.0}
            orig_step, orig_gather = dp.optimizer.step, dp._allgather
            orig_check = dp._agree_on_step

            def timed_step(g, grad_norm=None, _f=orig_step):
                t = time.perf_counter()
                _f(g, grad_norm=grad_norm)
                parts["update"] += time.perf_counter() - t

            def timed_gather(_f=orig_gather):
                t = time.perf_counter()
                _f()
                parts["gather"] += time.perf_counter() - t

            def timed_check(*a, _f=orig_check):
                t = time.perf_counter()
                out = _f(*a)
                parts["check"] += time.perf_counter() - t
                return out
            dp.optimizer.step, dp._allgather = timed_step, timed_gather
            dp._agree_on_step = timed_check
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
            chk = parts["check"] / reps
            sync = step_t - upd - gat - chk
            times = comm.gather((step_t, sync, upd, gat, chk), root=0)
            mem = dp.memory_report()
            if rank == 0:
                worst = max(times)                   # the slowest rank sets the pace
                rows.append({"ranks": p, "params": n, "mode": label,
                             "step_ms": worst[0] * 1e3, "sync_ms": worst[1] * 1e3,
                             "update_ms": worst[2] * 1e3, "gather_ms": worst[3] * 1e3,
                             "check_ms": worst[4] * 1e3,
                             "bytes_per_step": ring_bytes(mode, n * 4, p),
                             "state_bytes_per_rank": max(mem["per_rank"]),
                             "state_bytes_unsharded": mem["unsharded"],
                             "threads": ch8fast.get_num_threads(),
                             "reps": reps})
            del dp
    if rank == 0:
        print("ROWS " + json.dumps(rows), flush=True)


SAFETY = [("neither", dict(timeout=None, check_steps=False)),
          ("watchdog", dict(check_steps=False)),
          ("step check", dict(timeout=None)),
          ("both (default)", dict())]


def rounds(comm, contenders, reps, n_rounds):
    """Median seconds per call of each contender over interleaved rounds, on this rank."""
    times = {name: [] for name, _ in contenders}
    for _ in range(n_rounds):
        for name, f in contenders:
            comm.Barrier()
            t = time.perf_counter()
            for _ in range(reps):
                f()
            times[name].append((time.perf_counter() - t) / reps)
    return {name: float(np.median(v)) for name, v in times.items()}


def overhead(args, comm):
    import ch8fast
    from mpi4py import MPI
    from ch8fast.distributed import DataParallel
    rank = comm.Get_rank()
    cls = getattr(ch8fast, args.optimizer)
    rows = []
    for size in args.sizes:
        n = int(float(size))
        arena, grads = new_arena(n, rank)
        arena.flat_grad[:] = grads
        reps = max(10, min(2000, int(2e6 / n)))
        dps = [(name, DataParallel(arena, cls, comm, lr=1e-3, **kw)) for name, kw in SAFETY]
        med = rounds(comm, [(name, dp.step) for name, dp in dps], reps, args.rounds)
        buf = arena.flat_grad

        def blocking():
            comm.Allreduce(MPI.IN_PLACE, [buf, MPI.FLOAT], op=MPI.SUM)

        def polled():
            req = comm.Iallreduce(MPI.IN_PLACE, [buf, MPI.FLOAT], op=MPI.SUM)
            while not req.Test():
                pass
        med.update(rounds(comm, [("Allreduce", blocking), ("Iallreduce + Test", polled)],
                          reps, args.rounds))
        worst = comm.gather(med, root=0)
        if rank == 0:
            rows.append({"params": n, "reps": reps, "rounds": args.rounds,
                         **{k: max(w[k] for w in worst) for k in med}})
    if rank == 0:
        print("ROWS " + json.dumps(rows), flush=True)


def fmt_load(before):
    return (f"load average {' '.join(f'{x:.2f}' for x in before)} before, "
            f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} after")


def print_overhead(rows, optimizer, load):
    print(f"{optimizer}, float32, 2 ranks, data parallel; us per step (median of "
          f"{rows[0]['rounds']} interleaved rounds, slowest rank); {fmt_load(load)}")
    print("| params | neither | + watchdog | + step check | both (default) | cost of both "
          "| Allreduce | Iallreduce + Test |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        us = {k: r[k] * 1e6 for k, _ in SAFETY}
        base = us["neither"]
        print(f"| {r['params']:.0e} | {base:.1f} | {us['watchdog']:.1f} | "
              f"{us['step check']:.1f} | {us['both (default)']:.1f} | "
              f"{us['both (default)'] - base:+.1f} "
              f"({(us['both (default)'] / base - 1) * 100:+.0f} %) | "
              f"{r['Allreduce'] * 1e6:.1f} | {r['Iallreduce + Test'] * 1e6:.1f} "
              f"({(r['Iallreduce + Test'] / r['Allreduce'] - 1) * 100:+.0f} %) |")


def fmt_bytes(b):
    for unit, s in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= s:
            return f"{b / s:.3g} {unit}"
    return f"{b:.0f} B"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--sizes", nargs="+", default=SIZES)
    ap.add_argument("--optimizer", default="Adam")
    ap.add_argument("--work", type=float, default=3e8,
                    help="elements processed per (size, mode): sets the repetitions")
    ap.add_argument("--overhead", action="store_true",
                    help="time the watchdog and the step check (2 ranks)")
    ap.add_argument("--rounds", type=int, default=15,
                    help="--overhead: interleaved rounds per contender")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.overhead:
        args.ranks = [2]
        if args.sizes == SIZES:
            args.sizes = ["1e3", "1e5", "1e6"]
    load = os.getloadavg()
    from ch8fast.apps.bench.report import machine_line
    print(f"Machine: {machine_line()}")
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        sys.exit("bench_distributed: mpirun not found (run .ci/install_mpi.sh)")
    rows = []
    for p in args.ranks:
        cmd = [mpirun, "-n", str(p), "--oversubscribe"]
        if os.geteuid() == 0:
            cmd.append("--allow-run-as-root")
        cmd += [sys.executable, os.path.abspath(__file__), "--worker", "--optimizer",
                args.optimizer, "--work", str(args.work), "--rounds", str(args.rounds),
                "--sizes", *args.sizes] + (["--overhead"] if args.overhead else [])
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"mpirun -n {p} failed:\n{out.stdout}\n{out.stderr}")
        rows += next(json.loads(line[5:]) for line in out.stdout.splitlines()
                     if line.startswith("ROWS "))
    if args.overhead:
        print_overhead(rows, args.optimizer, load)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(rows, fh, indent=1)
        return
    print(f"{args.optimizer}, float32; {os.cpu_count()} cores on one host; times of the "
          f"slowest rank, ms per step; {fmt_load(load)}")
    head = ("| ranks | params | mode | step ms | step check ms | grad sync ms | "
            "update ms | allgather ms | sent per rank per step | state per rank |")
    print(head)
    print("|" + "|".join("---:" if i not in (2,) else "---" for i in range(10)) + "|")
    for r in rows:
        print(f"| {r['ranks']} | {r['params']:.0e} | {r['mode']} | {r['step_ms']:.3f} | "
              f"{r['check_ms']:.3f} | {r['sync_ms']:.3f} | {r['update_ms']:.3f} | "
              f"{r['gather_ms']:.3f} | "
              f"{fmt_bytes(r['bytes_per_step'])} | "
              f"{fmt_bytes(r['state_bytes_per_rank'])} of "
              f"{fmt_bytes(r['state_bytes_unsharded'])} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
