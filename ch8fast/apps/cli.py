"""The ``ch8fast`` command (also ``python -m ch8fast``): the applications' command line.

* ``ch8fast demo``: train a small MLP with every optimizer of the chapter and compare
  them (``mpirun -n 2 ch8fast demo --distributed``: data parallel over MPI);
* ``ch8fast tour``: reproduce the chapter's claims, and those of the papers of Lion, ADOPT,
  AdEMAMix, schedule-free SGD, LARS and LAMB, as figures and a Markdown report;
* ``ch8fast bench``: benchmark the fused kernels;
* ``ch8fast --version``.
"""
import argparse
import sys

from ch8fast import __version__

__all__ = ["main", "build_parser"]


def build_parser():
    """The parser of ``ch8fast demo`` and ``ch8fast tour`` (``bench`` parses its own)."""
    from ch8fast.apps import demo, tour
    parser = argparse.ArgumentParser(
        prog="ch8fast",
        description="Fused, in-place NumPy optimizers for chapter 8.3-8.5 of Goodfellow, "
                    "Bengio & Courville, Deep Learning.")
    parser.add_argument("--version", action="version", version=f"ch8fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = sub.add_parser(
        "demo", help="train a small MLP with SGD, momentum, Nesterov, AdaGrad, RMSProp, "
                     "RMSProp+Nesterov, Adam, AdamW and AdaDelta, and compare them",
        description="Train one small NumPy MLP (ch8fast.apps.mlp) on the embedded "
                    "handwritten digits, or your data, once per optimizer, from the same "
                    "initialization; print a table and write learning curves (PNG), CSV "
                    "and JSON to the output folder.")
    demo.add_arguments(p)
    p.set_defaults(run=demo.main, subparser=p)
    p = sub.add_parser(
        "tour", help="reproduce the chapter's claims (momentum, rates, drag, AdaGrad vs "
                     "RMSProp, initialization, learning-rate choice) and those of the "
                     "Lion, ADOPT, AdEMAMix, schedule-free, LARS and LAMB papers as "
                     "figures and tour.md",
        description="Reproduce the claims of sections 8.3-8.5, and of the papers of Lion, "
                    "ADOPT, AdEMAMix, schedule-free SGD, LARS and LAMB, with ch8fast's "
                    "optimizers; "
                    "write figures and a Markdown report with each measured number "
                    "beside the statement it checks.")
    tour.add_arguments(p)
    p.set_defaults(run=tour.main, subparser=p)
    sub.add_parser("bench", help="benchmark the fused kernels (arguments are passed to "
                                 "ch8fast.apps.bench)", add_help=False)
    return parser


def main(argv=None):
    """Run the command ``argv`` (default: the process's arguments); returns 0."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "bench":
        return _bench(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.run(args, args.subparser)


def _bench(rest):
    from ch8fast.apps import bench
    return bench.main(rest)


if __name__ == "__main__":
    sys.exit(main())
