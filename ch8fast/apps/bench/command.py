"""The command line of ``ch8fast bench``."""

import argparse
import json
import math
import os
import sys

from ch8fast import get_num_threads, set_num_threads

from .peers import RULES, import_torch
from .report import (
    COLUMNS,
    WITHHELD_NOTE,
    cells,
    header,
    machine_info,
    markdown,
    plot,
    text_line,
)
from .timing import run_case, withhold_starved

DEFAULT_RULES = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw")
DEFAULT_SIZES = (100, 1000, 10_000, 100_000, 1_000_000, 4_000_000, 16_000_000, 32_000_000)
DEFAULT_LAYOUTS = ((100, 10_000), (1000, 1000))
QUICK_SIZES = (100, 10_000, 1_000_000)
QUICK_LAYOUTS = ((100, 1000),)

# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------

def _parse_list(text, parse, what):
    if text.strip().lower() in ("", "none"):
        return []
    out = []
    for item in text.split(","):
        try:
            out.append(parse(item.strip()))
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"bad {what} {item.strip()!r}") from None
    return out


def _count(text):
    v = float(text)
    if not (1 <= v < 2**62 and v == int(v)):
        raise ValueError(text)
    return int(v)


def _layout(text):
    parts = text.lower().split("x")
    if len(parts) != 2:
        raise ValueError(text)
    return _count(parts[0]), _count(parts[1])


def _rule(text):
    if text not in RULES:
        raise argparse.ArgumentTypeError(f"unknown rule {text!r}; expected some of "
                                         f"{', '.join(RULES)}")
    return text


def _dtype(text):
    if text not in ("float32", "float64"):
        raise ValueError(text)
    return text


def build_parser():
    """The argument parser of ``ch8fast bench``."""
    p = argparse.ArgumentParser(
        prog="ch8fast bench",
        description="Time one optimizer step of each rule against the traffic-matched "
                    "roofline kernel, in-place NumPy, the reference rules in NumPy, "
                    "and torch.optim (fused and foreach), interleaved in one run.")
    p.add_argument("--rules", type=lambda s: _parse_list(s, _rule, "rule"),
                   default=list(DEFAULT_RULES),
                   help=f"comma-separated, of {', '.join(RULES)} "
                        f"(default: {','.join(DEFAULT_RULES)})")
    p.add_argument("--sizes", type=lambda s: _parse_list(s, _count, "size"), default=None,
                   help="elements of the one-array cases, e.g. 1e3,16e6 ('none' for no "
                        "one-array case; default 1e2,1e3,1e4,1e5,1e6,4e6,16e6,32e6)")
    p.add_argument("--layouts", type=lambda s: _parse_list(s, _layout, "layout"),
                   default=None,
                   help="many-tensor layouts NxM: N arrays of M elements, e.g. 100x1e4 "
                        "('none' for none; default 100x1e4,1000x1e3)")
    p.add_argument("--dtype", type=lambda s: _parse_list(s, _dtype, "dtype"),
                   default=["float32"], help="float32, float64 or both (default float32)")
    p.add_argument("--threads", type=lambda s: _parse_list(s, _count, "thread count"),
                   default=None, help="thread counts, each a table of its own, e.g. 1,2 "
                                      "(default: the current setting, "
                                      f"{get_num_threads()})")
    p.add_argument("--repeats", type=_count, default=None,
                   help="interleaved rounds per case, at least (default 9; --quick 3); "
                        "while a ratio's estimates disagree, rounds are added (up to "
                        "3x, at least 15) within --max-case-time")
    p.add_argument("--min-time", type=float, default=None,
                   help="seconds per timing sample: small arrays run many steps per "
                        "sample (default 0.002; --quick 0.001)")
    p.add_argument("--max-case-time", type=float, default=None,
                   help="stop a case's rounds after this many seconds, at least 3 rounds "
                        "(default 4)")
    p.add_argument("--no-peers", action="store_true",
                   help="time ch8fast, the roofline and the flat array only")
    p.add_argument("--no-torch", action="store_true", help="leave out torch.optim")
    p.add_argument("--json", metavar="FILE", help="write every measurement as JSON")
    p.add_argument("--markdown", metavar="FILE", help="write the table in Markdown")
    p.add_argument("--plot", metavar="FILE.png",
                   help="plot time per element against size (needs matplotlib)")
    p.add_argument("--quick", action="store_true",
                   help="small sizes, few repeats (about half a minute)")
    return p


def main(argv=None):
    """Run ``ch8fast bench`` with the command-line arguments ``argv``; returns 0."""
    args = build_parser().parse_args(argv)
    sizes = args.sizes if args.sizes is not None else list(
        QUICK_SIZES if args.quick else DEFAULT_SIZES)
    layouts = args.layouts if args.layouts is not None else list(
        QUICK_LAYOUTS if args.quick else DEFAULT_LAYOUTS)
    repeats = args.repeats or (3 if args.quick else 9)
    min_time = args.min_time if args.min_time is not None else (1e-3 if args.quick
                                                                 else 2e-3)
    max_case = args.max_case_time if args.max_case_time is not None else 4.0
    if not (0 < min_time < math.inf and 0 < max_case < math.inf):
        print("ch8fast bench: --min-time and --max-case-time must be finite and > 0",
              file=sys.stderr)
        return 2
    if not args.rules or not args.dtype or not (sizes or layouts):
        print("ch8fast bench: nothing to run (no rule, dtype, size or layout)",
              file=sys.stderr)
        return 2
    old_threads = get_num_threads()
    threads = args.threads or [old_threads]
    which = ["ch8fast", "roofline", "flat"]
    if not args.no_peers:
        which += ["numpy", "reference"]
        if not args.no_torch:
            if import_torch() is None:
                print("ch8fast bench: torch is not installed; no torch columns",
                      file=sys.stderr)
            else:
                which += ["torch_fused", "torch_foreach"]
    info = machine_info(threads)
    print(header(info))
    if info["load_average"] and info["load_average"][0] > 0.5:
        print(f"note: load average {info['load_average'][0]} on {info['usable_cores']} "
              f"cores: other processes compete for the cores; multi-threaded times "
              f"suffer most (a thread team waits for its slowest thread)")
    print("step: median time of one opt.step; spread: interquartile range of its samples "
          "over the median;\nGB/s: its traffic, itemsize*(2*ncols-1) bytes per element; "
          "roofline: roofline time / step time; x peer: peer time / "
          "step time (>1: ch8fast faster);\n/ flat: step time over N tensors / step time "
          "over one array of the same total")
    print(text_line(COLUMNS))
    sys.stdout.flush()
    torch = import_torch() if "torch_fused" in which else None
    torch_threads = torch.get_num_threads() if torch else None
    cases = [(1, n) for n in sizes] + list(layouts)
    rows = []
    try:
        for n_threads in threads:
            for dtype in args.dtype:
                for rule in args.rules:
                    # a rule's rows are printed together, once its cases can be compared
                    # with each other (withhold_starved)
                    done = [run_case(rule, dtype, tensors, size, n_threads, which, repeats,
                                     min_time, max_case) for tensors, size in cases]
                    withhold_starved(done)
                    rows += done
                    for row in done:
                        print(text_line(cells(row)))
                    sys.stdout.flush()
    finally:
        set_num_threads(old_threads)
        if torch is not None:
            torch.set_num_threads(torch_threads)
    if any(r["withheld"] for r in rows):
        print(WITHHELD_NOTE)
    try:
        info["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    settings = {"rules": args.rules, "sizes": sizes,
                "layouts": [f"{t}x{s}" for t, s in layouts], "dtypes": args.dtype,
                "threads": threads, "repeats": repeats, "min_time": min_time,
                "max_case_time": max_case, "contenders": which,
                "argv": list(sys.argv[1:] if argv is None else argv)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "settings": settings, "results": rows}, f,
                      indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(info, rows))
    if args.plot:
        plot(rows, args.plot, info)
    return 0


if __name__ == "__main__":
    sys.exit(main())

