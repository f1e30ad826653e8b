"""The two ways of averaging row-sparse gradients over ranks, timed under mpirun:
``DataParallel.reduce_rows`` with the allgather of indices and rows, and with the
allreduce of a table-sized buffer, each followed by the lazy Adam step of the replicated
table, for batches touching a growing fraction of the rows.

    mpirun -n 2 python benchmarks/bench_reduce_rows.py [--rows 1000000] [--dim 64]

Each rank contributes its own distinct random rows (``fraction`` of the table each);
times are medians over rounds, the two ways alternating; printed by rank 0.
"""

import argparse
import time

import numpy as np

import ch8fast
from ch8fast.distributed import DataParallel, get_comm


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--fractions", default="0.001,0.01,0.05,0.1,0.25")
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args(argv)
    comm = get_comm()
    rank, world = comm.Get_rank(), comm.Get_size()
    n, d = a.rows, a.dim
    arena = ch8fast.FlatParams({"w": (8,)}, np.float32)
    dp = DataParallel(arena, ch8fast.SGD, comm, lr=0.1)
    ways = {"allgather": 1e300, "dense allreduce": 0.0}
    tables = {w: np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)
              for w in ways}
    opts = {w: ch8fast.Adam([t], lr=1e-3) for w, t in tables.items()}
    if rank == 0:
        print(f"{world} ranks, {ch8fast.get_num_threads()} kernel threads each, table "
              f"{n} x {d} float32")
        print("| rows per rank | gathered / table rows | allgather ms | dense allreduce ms "
              "| dense / allgather |")
        print("|---:|---:|---:|---:|---:|")
    rng = np.random.default_rng(1 + rank)
    for frac in (float(f) for f in a.fractions.split(",")):
        k = max(1, int(frac * n))
        idx = rng.choice(n, k, replace=False)
        g = ch8fast.SparseRows(idx, rng.standard_normal((k, d)).astype(np.float32))
        times = {w: [] for w in ways}
        for r in range(a.rounds):
            for w, above in (list(ways.items()) if r % 2 else list(ways.items())[::-1]):
                comm.Barrier()
                t0 = time.perf_counter()
                opts[w].step([dp.reduce_rows(tables[w], g, dense_above=above)])
                times[w].append(time.perf_counter() - t0)
        ms = {w: 1e3 * float(np.median(max_over_ranks(comm, v))) for w, v in times.items()}
        if rank == 0:
            dense, gather = ms["dense allreduce"], ms["allgather"]
            print(f"| {k} | {world * k / n:.3g} | {gather:.2f} | {dense:.2f} | "
                  f"{dense / gather:.2f} |", flush=True)


def max_over_ranks(comm, values):
    """Each round's slowest rank."""
    return np.max(np.array(comm.allgather(values)), axis=0)


if __name__ == "__main__":
    main()
