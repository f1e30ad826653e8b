"""The arithmetic cost of each storage mode: one Adam optimizer stepping 200,000 elements
(its arrays stay in cache), nanoseconds per element, one mode at a time.

    python benchmarks/storage_compute.py [--threads 1]

Where this cost exceeds the memory time of the bytes a mode moves, the mode is bound by
its arithmetic (decoding, the random words, encoding), not by memory traffic.
"""

import argparse
import time

import ml_dtypes
import numpy as np

import ch8fast
from ch8fast.apps.bench.report import machine_line

MODES = (("float32", np.float32, {}),
         ("f32 p, bf16 state", np.float32, {"state_format": "bfloat16"}),
         ("f32 p, q8 state", np.float32, {"state_format": "q8"}),
         ("bf16 p stochastic, f32 state", ml_dtypes.bfloat16, {"param_mode": "stochastic"}),
         ("bf16 p stochastic, q8 state", ml_dtypes.bfloat16,
          {"param_mode": "stochastic", "state_format": "q8"}))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--steps", type=int, default=2000)
    a = ap.parse_args(argv)
    ch8fast.set_num_threads(a.threads)
    rng = np.random.default_rng(0)
    print(f"Machine: {machine_line()}\n")
    print(f"| mode | ns / element ({a.n} elements, {a.threads} thread(s), in cache) |")
    print("|---|---:|")
    for name, dtype, kw in MODES:
        p = rng.standard_normal(a.n).astype(dtype)
        g = rng.standard_normal(a.n).astype(dtype)
        opt = ch8fast.Adam([p], lr=1e-4, seed=1, **kw) if kw else ch8fast.Adam([p], lr=1e-4)
        for _ in range(20):
            opt.step([g])
        best = np.inf
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(a.steps // 5):
                opt.step([g])
            best = min(best, (time.perf_counter() - t0) / (a.steps // 5))
        print(f"| {name} | {best / a.n * 1e9:.2f} |")
    ch8fast.set_num_threads(0)


if __name__ == "__main__":
    main()
