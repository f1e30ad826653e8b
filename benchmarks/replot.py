"""Redraw a benchmark figure from a stored JSON result, without timing anything.

    python benchmarks/replot.py benchmarks/results/float32.json docs/figures/bench.png

The figure is the one ``ch8fast bench --plot`` draws (ch8fast.apps.bench.plot), from the
samples stored in the JSON file. Results stored before the ``reference`` contender existed
show its predecessor, ``textbook`` (the same book formulas with NumPy temporaries).
"""
import argparse
import json

from ch8fast.apps import bench


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", help="a file written by ch8fast bench --json")
    p.add_argument("png", help="the figure to write")
    args = p.parse_args(argv)
    with open(args.json) as f:
        data = json.load(f)
    return 0 if bench.plot(data["results"], args.png, data["machine"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
