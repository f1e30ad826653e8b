"""LAMB and LARS against the one-pass rules they extend (Adam, momentum SGD): the time of
a step on float32 arrays, interleaved in rounds, and the ratio of the times beside the
ratio of the bytes each moves (LAMB: 10 streams of its elements per step against Adam's
7, two passes; LARS: 7 against momentum's 5).

    python benchmarks/trust_ratio_speed.py [--sizes 1e3,16e6] [--threads 1,2] [--rounds 7]
"""
import argparse
import os
import time

import numpy as np

import ch8fast

PAIRS = [("LAMB", ch8fast.LAMB, dict(lr=1e-3), "Adam", ch8fast.Adam, dict(lr=1e-3), 10, 7),
         ("LARS", ch8fast.LARS, dict(lr=1e-3), "momentum", ch8fast.SGD,
          dict(lr=1e-3, momentum=0.9), 7, 5)]


def _make(cls, kw, n, tensors=4):
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(n // tensors, dtype=np.float32) for _ in range(tensors)]
    grads = [rng.standard_normal(n // tensors, dtype=np.float32) * 1e-3
             for _ in range(tensors)]
    opt = cls(params, **kw)
    opt.step(grads)
    return lambda: opt.step(grads)


def _time(fn, n):
    reps = max(3, int(2e7 // max(n, 1)))
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1e3,16e6")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args()
    print(f"Machine: {os.uname().machine}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.2f} at start")
    print("| rule | against | elements | threads | step | its step | time ratio | bytes "
          "ratio |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for nt in (int(x) for x in a.threads.split(",")):
        ch8fast.set_num_threads(nt)
        for n in (int(float(x)) for x in a.sizes.split(",")):
            for name, cls, kw, base, bcls, bkw, streams, bstreams in PAIRS:
                f, g = _make(cls, kw, n), _make(bcls, bkw, n)
                tf, tg = [], []
                for _ in range(a.rounds):
                    tf.append(_time(f, n))
                    tg.append(_time(g, n))
                ratios = sorted(x / y for x, y in zip(tf, tg))
                print(f"| {name} | {base} | {n:.3g} | {nt} | "
                      f"{np.median(tf) * 1e6:.3g} us | "
                      f"{np.median(tg) * 1e6:.3g} us | {ratios[len(ratios) // 2]:.2f} | "
                      f"{streams / bstreams:.2f} |")
    print(f"load average {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
