"""Row-sparse updates of an embedding table: the lazy step against the dense step of the
same table, against torch's sparse optimizers, and against the bytes the touched rows
must move, in one run.

    python benchmarks/bench_sparse.py [--rows 1000000] [--dim 64]
        [--fractions 0.001,0.01,0.1] [--lookups 10000] [--kinds uniform,zipf,one_row]

The batches: for each of ``--fractions``, that fraction of the rows, distinct, drawn at
random; then ``--lookups`` lookups with duplicates, of each of ``--kinds``: uniform
draws, a Zipf law (s = 1.2: a few rows most of the time, as recommender batches), one row
every time. For each batch every contender updates its own table (float32, written before
timing) and the contenders are timed round-robin, one step each per round, the order
rotated every round; times are medians over rounds, ratios the median over rounds of the
ratio within the round.

* ``lazy``: ``ch8fast.Adam`` (and ``AdaGrad``) stepping a ``ch8fast.SparseRows``;
* ``dense``: the same optimizer stepping the dense gradient (zeros but the touched rows,
  duplicates summed);
* ``torch``: ``torch.optim.SparseAdam`` / ``torch.optim.Adagrad`` with a sparse COO
  gradient, where torch is installed;
* ``limit``: the bytes the touched rows must move (parameter, gradient and state rows read
  once, all but the gradient written once) at this machine's memory bandwidth: the
  traffic-matched copy kernel over a buffer the size of the whole table (out of cache,
  as the table is), timed in the same rounds, times the fraction of rows touched. (A copy
  of only the touched rows' bytes would fit in cache and measure the cache instead.)
"""

import argparse
import os
from functools import partial
import time

import numpy as np

import ch8fast
from ch8fast.apps.bench.report import machine_line
from ch8fast.roofline import Roofline


def _timed(fns, rounds):
    names = list(fns)
    samples = {k: [] for k in names}
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            fns[k]()
            samples[k].append(time.perf_counter() - t0)
    return {k: np.array(v) for k, v in samples.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--fractions", default="0.001,0.01,0.1")
    ap.add_argument("--lookups", type=int, default=10_000)
    ap.add_argument("--kinds", default="uniform,zipf,one_row",
                    help="batches with duplicates: uniform, zipf, one_row ('none': none)")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    try:
        import torch
    except ImportError:
        torch = None
    n, d = a.rows, a.dim
    rng = np.random.default_rng(0)
    print(f"Machine: {machine_line()} at start; {ch8fast.get_num_threads()} threads; "
          f"table {n} x {d} float32")
    lines = ["| rule | batch | rows touched | lazy ms | dense ms | dense / lazy | "
             "torch ms | torch / lazy | limit ms | limit / lazy |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    batches = []
    for frac in (float(f) for f in a.fractions.split(",")):
        k = max(1, int(round(frac * n)))
        batches.append(("distinct", np.sort(rng.choice(n, k, replace=False))))
    for kind in ([] if a.kinds == "none" else a.kinds.split(",")):
        if kind == "uniform":
            idx = rng.integers(0, n, a.lookups)
        elif kind == "zipf":
            idx = (rng.zipf(1.2, a.lookups) - 1) % n
        elif kind == "one_row":
            idx = np.full(a.lookups, int(rng.integers(0, n)))
        else:
            ap.error(f"--kinds: unknown batch kind {kind!r}")
        batches.append((f"{kind}, {a.lookups} lookups", idx.astype(np.int64)))
    for rule in ("adam", "adagrad"):
        for label, idx in batches:
            k = len(idx)
            rows = np.unique(idx)
            frac = len(rows) / n
            vals = rng.standard_normal((k, d), dtype=np.float32) * 0.01

            def table():
                t = np.empty((n, d), np.float32)
                t[...] = rng.standard_normal((n, d), dtype=np.float32) * 0.1
                return t
            make = (lambda ps: ch8fast.Adam(ps, lr=1e-3)) if rule == "adam" else \
                (lambda ps: ch8fast.AdaGrad(ps, lr=1e-2))
            E1, E2 = table(), table()
            lazy, dense = make([E1]), make([E2])
            sp = ch8fast.SparseRows(idx, vals)
            g = np.zeros((n, d), np.float32)
            np.add.at(g, idx, vals)
            lazy.step([sp])
            dense.step([g])
            fns = {"lazy": partial(lazy.step, [sp]), "dense": partial(dense.step, [g])}
            ncols = 2 + len(lazy.state[0])
            lim = Roofline([n * d], np.float32, ncols)
            lim()
            fns["table copy"] = lim
            if torch is not None:
                E3 = torch.from_numpy(table())
                p = torch.nn.Parameter(E3)
                # (not coalesced: torch's step sums the duplicates, as ch8fast's does)
                tg = torch.sparse_coo_tensor(
                    torch.from_numpy(idx[None, :].astype(np.int64)),
                    torch.from_numpy(vals), (n, d))
                p.grad = tg
                topt = (torch.optim.SparseAdam([p], lr=1e-3) if rule == "adam"
                        else torch.optim.Adagrad([p], lr=1e-2))
                topt.step()
                fns["torch"] = topt.step
            s = _timed(fns, a.rounds)
            s["limit"] = s.pop("table copy") * frac
            ms = {k: 1e3 * float(np.median(v)) for k, v in s.items()}
            ratio = {k: float(np.median(v / s["lazy"])) for k, v in s.items()}
            tms = f"{ms['torch']:.3f}" if "torch" in ms else "-"
            tr = f"{ratio['torch']:.1f}" if "torch" in ms else "-"
            lines.append(f"| {rule} | {label} | {len(rows)} ({100 * frac:.2g} %) | "
                         f"{ms['lazy']:.3f} | "
                         f"{ms['dense']:.2f} | {ratio['dense']:.1f} | {tms} | {tr} | "
                         f"{ms['limit']:.3f} | {ratio['limit']:.2f} |")
            print(lines[-1], flush=True)
            del E1, E2, g, lazy, dense, fns
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
