"""The cost of an Adam step in every storage mode, against float32 Adam and the float32
roofline, in one run.

    python benchmarks/bench_storage.py [--sizes 1e6,16e6,64e6] [--threads 1,2] [--rounds 7]

For each size and thread count, every contender updates its own arrays (written before
timing, so no page is the shared zero page) and the contenders are timed round-robin, one
step each per round, the order rotated every round; times are medians over rounds and
speed-ups the median over rounds of the ratio within the round (float32 Adam's time over
the mode's). Bytes per parameter are the bytes the step reads and writes (ch8fast.storage);
the state memory is measured: the bytes of the optimizer's state arrays over the number of
parameters.
"""

import argparse
import os
import time

import numpy as np

import ch8fast
from ch8fast.apps.bench.report import machine_line
from ch8fast.roofline import Roofline

try:
    import ml_dtypes
    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:                       # bfloat16 modes are left out
    BF16 = None

# (name, parameter dtype, param_mode, state_format, bytes per parameter per step)
MODES = [
    ("float32", np.float32, None, None, 28),
    ("f32 p, bf16 state", np.float32, None, "bfloat16", 20),
    ("f32 p, q8 state", np.float32, None, "q8", 16.06),
    ("bf16 p master, f32 state", "bf16", "master", None, 30),
    ("bf16 p stochastic, f32 state", "bf16", "stochastic", None, 22),
    ("bf16 p stochastic, bf16 state", "bf16", "stochastic", "bfloat16", 14),
    ("bf16 p stochastic, q8 state", "bf16", "stochastic", "q8", 10.06),
    ("bf16 p kahan, q8 state", "bf16", "kahan", "q8", 14.06),
    ("f16 p stochastic, q8 state", np.float16, "stochastic", "q8", 10.06),
]


def _contender(dtype, mode, fmt, n, rng):
    if dtype == "bf16":
        dtype = BF16
    w = np.empty(n, dtype)
    w[...] = rng.standard_normal(n, dtype=np.float32) * 0.1
    g = np.empty(n, dtype)
    g[...] = rng.standard_normal(n, dtype=np.float32) * 0.01
    opt = ch8fast.Adam([w], lr=1e-3, state_format=fmt, param_mode=mode)
    opt.step(g)                                   # state written: no zero pages
    # the optimizer's state proper (a master copy or a compensation keeps the parameter)
    state_bytes = sum(a.nbytes for k, a in opt.state[0].items()
                      if k not in ("master", "compensation"))
    return (lambda: opt.step(g)), state_bytes / n, opt


def run(sizes, threads, rounds, out):
    rng = np.random.default_rng(0)
    modes = [m for m in MODES if m[1] != "bf16" or BF16 is not None]
    rows = []
    for n in sizes:
        for nt in threads:
            ch8fast.set_num_threads(nt)
            fns, state_bytes, keep = {}, {}, []
            for name, dtype, mode, fmt, _ in modes:
                fns[name], state_bytes[name], opt = _contender(dtype, mode, fmt, n, rng)
                keep.append(opt)
            fns["roofline"] = Roofline([n], np.float32, 4)
            fns["roofline"]()
            names = list(fns)
            samples = {k: [] for k in names}
            for r in range(rounds):
                order = names[r % len(names):] + names[:r % len(names)]
                for k in order:
                    t0 = time.perf_counter()
                    fns[k]()
                    samples[k].append(time.perf_counter() - t0)
            base = np.array(samples["float32"])
            for name, dtype, mode, fmt, nbytes in modes:
                t = np.array(samples[name])
                rows.append(dict(n=n, threads=nt, mode=name, ms=1e3 * np.median(t),
                                 speedup=float(np.median(base / t)),
                                 roofline=float(np.median(np.array(samples["roofline"])
                                                          / t)),
                                 bytes=nbytes, state=state_bytes[name]))
            del fns, keep
    ch8fast.set_num_threads(0)
    lines = ["| elements | threads | mode | ms / step | x float32 Adam | x f32 roofline | "
             "bytes / param / step | state bytes / param |",
             "|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['n'] / 1e6:g}e6 | {r['threads']} | {r['mode']} | "
                     f"{r['ms']:.2f} | "
                     f"{r['speedup']:.2f} | {r['roofline']:.2f} | {r['bytes']:g} | "
                     f"{r['state']:.2f} |")
    text = "\n".join(lines)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1e6,16e6,64e6")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default=None, help="also write the table to this file")
    a = ap.parse_args(argv)
    sizes = [int(float(s)) for s in a.sizes.split(",")]
    threads = [int(t) for t in a.threads.split(",")]
    print(f"Machine: {machine_line()} at start")
    run(sizes, threads, a.rounds, a.out)
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
