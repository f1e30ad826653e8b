"""The lazy step of a row-sparse batch with duplicate rows against the step of its distinct
rows alone: the cost of summing duplicates (order-free, the same bits for any order).

    python benchmarks/bench_duplicates.py [--rows 200000] [--dim 32] [--lookups 4096]

A bfloat16 table, lazy ``ch8fast.Adam``, 1 thread; batches of ``--lookups`` indices:
the distinct rows of a Zipf batch, the Zipf batch itself (s = 1.2), one row repeated, and
uniform draws. Each time is the best of 7 rounds of 20 steps; ``x distinct`` is the Zipf
and one-row batches' time over that of the Zipf batch's distinct rows.
"""

import argparse
import timeit

import numpy as np

import ch8fast
from ch8fast.apps.bench.report import machine_line


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--lookups", type=int, default=4096)
    a = ap.parse_args(argv)
    import ml_dtypes
    ch8fast.set_num_threads(1)
    rng = np.random.default_rng(0)
    table = (rng.standard_normal((a.rows, a.dim)).astype(np.float32)
             .astype(ml_dtypes.bfloat16))
    opt = ch8fast.Adam([table], lr=1e-3)
    zipf = (rng.zipf(1.2, a.lookups) - 1) % a.rows
    cases = {"distinct": np.unique(zipf), "zipf": zipf,
             "one_row": np.zeros(a.lookups, np.int64),
             "uniform": rng.integers(0, a.rows, a.lookups)}
    times = {}
    print(f"Machine: {machine_line()}")
    for name, idx in cases.items():
        sp = ch8fast.SparseRows(idx.astype(np.int64),
                                rng.standard_normal((len(idx), a.dim)).astype(np.float32))
        opt.step([sp])
        times[name] = min(timeit.repeat(lambda: opt.step([sp]), number=20, repeat=7)) / 20
        print(f"{name:9s} {len(idx):6d} lookups {len(np.unique(idx)):6d} distinct "
              f"{times[name] * 1e3:8.3f} ms"
              + (f"  {times[name] / times['distinct']:.2f} x distinct"
                 if name in ("zipf", "one_row") else ""))


if __name__ == "__main__":
    main()
