"""The first benchmark: one Adam step on float32 parameters, ch8fast against careful
in-place NumPy, at 1e3 elements (call overhead) and 16e6 elements (memory bandwidth); and
the cost of the same step through ``ch8fast.functional`` (a framework keeping its own
state), as a ratio to the class step.

    python benchmarks/bench_update.py [--threads N] [--repeats R]

All are timed in the same run, round-robin (see ch8fast.apps.bench.measure); the ratios are
medians over rounds: NumPy's time over ch8fast's (> 1 when ch8fast is faster) and the
functional call's over the class step's.
"""
import argparse

import ch8fast
from ch8fast.apps import bench


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=ch8fast.get_num_threads())
    p.add_argument("--repeats", type=int, default=9)
    args = p.parse_args(argv)
    print(bench.header(bench.machine_info([args.threads])))
    print(f"{'elements':>10}  {'ch8fast step':>13}  {'in-place NumPy':>15}  "
          f"{'NumPy / ch8fast':>16}  {'roofline fraction':>17}  {'functional':>11}  "
          f"{'functional / step':>17}")
    for n in (1000, 16_000_000):
        row = bench.run_case("adam", "float32", 1, n, args.threads,
                             which=("ch8fast", "numpy", "roofline", "functional"),
                             repeats=args.repeats)
        print(f"{n:>10}  {bench.fmt_time(row['time']['ch8fast']):>13}  "
              f"{bench.fmt_time(row['time']['numpy']):>15}  "
              f"{row['speedup']['numpy']:>16.2f}  {row['roofline_fraction']:>17.2f}  "
              f"{bench.fmt_time(row['time']['functional']):>11}  "
              f"{row['speedup']['functional']:>17.2f}")


if __name__ == "__main__":
    main()
