"""Where do threads start to pay? Times one update on 1 thread and on all threads, with the
parallel cutoff disabled, for sizes around the cutoff, interleaving the two so that noise
hits both alike. The cutoff in the kernels (``set_parallel_min_bytes``) is chosen from this.

    python benchmarks/cutoff.py [--rule adam] [--dtype float32] [--repeats 400]
"""

import argparse
import time

import numpy as np

import ch8fast
from ch8fast._isa import K

MAKERS = {
    "sgd": lambda ps: ch8fast.SGD(ps, lr=1e-3),
    "momentum": lambda ps: ch8fast.SGD(ps, lr=1e-3, momentum=0.9),
    "adagrad": lambda ps: ch8fast.AdaGrad(ps, lr=1e-3),
    "rmsprop": lambda ps: ch8fast.RMSProp(ps, lr=1e-3),
    "adam": lambda ps: ch8fast.Adam(ps, lr=1e-3),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rule", default="adam", choices=sorted(MAKERS))
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--repeats", type=int, default=400)
    ap.add_argument("--threads", type=int, default=0, help="the 'many' side (0: all)")
    args = ap.parse_args(argv)
    dtype = np.dtype(args.dtype)
    many = args.threads or K.get_num_threads()
    saved = K.get_parallel_min_bytes()
    print(f"{args.rule} {dtype}, 1 thread against {many}, kernels: {ch8fast.isa()}")
    print(f"{'elements':>10} {'KiB':>7} {'1 thread us':>12} {f'{many} threads us':>13} "
          f"{'speed-up':>9}")
    try:
        K.set_parallel_min_bytes(0)
        for n in (2048, 4096, 8192, 16384, 24576, 32768, 49152, 65536, 131072, 262144):
            p = np.zeros(n, dtype)
            g = np.full(n, 1e-3, dtype)
            opt = MAKERS[args.rule]([p])
            opt.step(g)
            reps = max(20, args.repeats)
            times = {1: [], many: []}
            for _ in range(reps):
                for nt in (1, many):
                    ch8fast.set_num_threads(nt)
                    t0 = time.perf_counter()
                    opt.step(g)
                    times[nt].append(time.perf_counter() - t0)
            t1, tm = np.median(times[1]), np.median(times[many])
            print(f"{n:>10} {n * dtype.itemsize / 1024:>7.0f} {t1 * 1e6:>12.2f} "
                  f"{tm * 1e6:>13.2f} {t1 / tm:>9.2f}")
    finally:
        K.set_parallel_min_bytes(saved)
        ch8fast.set_num_threads(0)


if __name__ == "__main__":
    main()
