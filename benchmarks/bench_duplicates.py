"""The lazy step of a row-sparse batch with duplicate rows against the step of its distinct
rows alone: the cost of summing duplicates (order-free, the same bits for any order).

    python benchmarks/bench_duplicates.py [--rows 200000] [--dim 32] [--lookups 4096]

A bfloat16 table, lazy ``ch8fast.Adam``, 1 thread; batches of ``--lookups`` indices:
the distinct rows of a Zipf batch, the Zipf batch itself (s = 1.2), one row repeated, and
uniform draws. Each batch has an optimizer of its own over the same table's copy; they
step in turn, 20 steps a sample, ``--rounds`` rounds, the order rotated every round. Times
are medians; ``x distinct`` is the median over rounds of the in-round ratio of a batch's
time to that of the Zipf batch's distinct rows.
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
    ap.add_argument("--rounds", type=int, default=15)
    a = ap.parse_args(argv)
    import ml_dtypes
    ch8fast.set_num_threads(1)
    rng = np.random.default_rng(0)
    table = (rng.standard_normal((a.rows, a.dim)).astype(np.float32)
             .astype(ml_dtypes.bfloat16))
    zipf = (rng.zipf(1.2, a.lookups) - 1) % a.rows
    cases = {"distinct": np.unique(zipf), "zipf": zipf,
             "one_row": np.zeros(a.lookups, np.int64),
             "uniform": rng.integers(0, a.rows, a.lookups)}
    print(f"Machine: {machine_line()}")
    steps = {}
    for name, idx in cases.items():
        sp = ch8fast.SparseRows(idx.astype(np.int64),
                                rng.standard_normal((len(idx), a.dim)).astype(np.float32))
        opt = ch8fast.Adam([table.copy()], lr=1e-3)
        opt.step([sp])
        steps[name] = (lambda o, s: lambda: o.step([s]))(opt, sp)
    names = list(cases)
    samples = {n: [] for n in names}
    for r in range(a.rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            samples[n].append(timeit.timeit(steps[n], number=20) / 20)
    base = np.array(samples["distinct"])
    for name, idx in cases.items():
        t = np.array(samples[name])
        print(f"{name:9s} {len(idx):6d} lookups {len(np.unique(idx)):6d} distinct "
              f"{np.median(t) * 1e3:8.3f} ms"
              + (f"  {np.median(t / base):.2f} x distinct"
                 if name in ("zipf", "one_row") else ""))


if __name__ == "__main__":
    main()
