"""The report: the machine, the table (text and Markdown) and the figure."""

import glob
import math
import os
import platform
import sys

import numpy as np

from ch8fast import isa

from .peers import import_torch
from .timing import SPREAD, TRUST

# ---------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------

def machine_info(threads):
    """The machine, the load and the versions, as a JSON-able dict."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    caches = []
    for d in sorted(glob.glob("/sys/devices/system/cpu/cpu0/cache/index*")):
        try:
            with open(f"{d}/level") as f1, open(f"{d}/type") as f2, \
                    open(f"{d}/size") as f3:
                level, kind, size = f1.read().strip(), f2.read().strip(), f3.read().strip()
        except OSError:
            continue
        if kind != "Instruction":
            caches.append(f"L{level} {size}")
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    torch = import_torch()
    from ch8fast import __version__
    return {
        "cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable, "caches": caches,
        "load_average": load, "isa": isa(),
        "threads": list(threads), "python": platform.python_version(),
        "numpy": np.__version__, "torch": torch.__version__ if torch else None,
        "ch8fast": __version__, "platform": platform.platform(),
    }


def header(info):
    """The lines that describe the machine and the run, above the table."""
    caches = f" ({', '.join(info['caches'])})" if info.get("caches") else ""
    load = ""
    if info.get("load_average"):
        load = f", load average {info['load_average'][0]} at start"
        if info.get("load_average_end"):
            load += f" and {info['load_average_end'][0]} at end"
    return (f"ch8fast {info['ch8fast']} bench: {info['cpu']}{caches}, {info['cores']} "
            f"cores ({info['usable_cores']} usable){load}, kernels {info['isa']}, threads "
            f"{','.join(map(str, info['threads']))}; Python {info['python']}, "
            f"NumPy {info['numpy']}, torch {info['torch'] or 'absent'}")


def machine_line():
    """One line naming this machine for a benchmark's output: CPU, caches, cores, the
    kernels' instruction set, the versions, and the load average now."""
    info = machine_info(())
    caches = f" ({', '.join(info['caches'])})" if info.get("caches") else ""
    load = f"; load average {info['load_average'][0]}" if info.get("load_average") else ""
    cores = f"{info['cores']} cores ({info['usable_cores']} usable)"
    return (f"{info['cpu']}{caches}, {cores}, "
            f"kernels {info['isa']}; Python {info['python']}, NumPy {info['numpy']}, "
            f"torch {info['torch'] or 'absent'}, ch8fast {info['ch8fast']}{load}")


def fmt_time(t):
    """A time in seconds as ns, us, ms or s with three significant digits."""
    if t is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if t >= scale:
            return f"{t / scale:.3g} {unit}"
    return f"{t / 1e-9:.3g} ns"


def _fmt_size(n):
    if n < 1000:
        return str(n)
    e = int(math.floor(math.log10(n)))
    m = n / 10 ** e
    return f"{m:.3g}e{e}" if m != 1 else f"1e{e}"


def _fmt_x(r, digits=2, withheld=False):
    if r is None:
        return "-"
    return "?" if withheld else f"{r:.{digits}f}"


COLUMNS = ["rule", "dtype", "layout", "thr", "step", "spread", "GB/s", "roofline",
           "x numpy", "x reference", "x torch fused", "x torch foreach", "/ flat"]

WITHHELD_NOTE = ("?: ratio withheld: its estimates disagree (the median of the in-round "
                 "ratios and the ratio of the fastest samples differ by more than "
                 f"{TRUST - 1:.0%}, or the in-round ratios spread wider than "
                 f"{SPREAD:.0%}) after the extra rounds the case's time allowed; the "
                 "machine was too busy. Rerun when it is quieter, or with more --repeats "
                 "and --max-case-time; the JSON keeps every sample. (Also withheld: the "
                 "ratio of a contender that took more than twice as long on an array "
                 "as on a larger one: it was starved.)")


def cells(row):
    """The table's cells of one result row, formatted."""
    layout = (_fmt_size(row["size"]) if row["tensors"] == 1
              else f"{row['tensors']}x{_fmt_size(row['size'])}")
    sp = row["speedup"]
    out = set(row.get("withheld", ()))
    return [row["rule"], row["dtype"], layout, str(row["threads"]),
            fmt_time(row["time"]["ch8fast"]), f"{100 * row['spread']:.0f}%",
            f"{row['gbps']['ch8fast']:.1f}",
            _fmt_x(row["roofline_fraction"], 2, "roofline" in out),
            _fmt_x(sp.get("numpy"), 1, "numpy" in out),
            _fmt_x(sp.get("reference"), 1, "reference" in out),
            _fmt_x(sp.get("torch_fused"), 2, "torch_fused" in out),
            _fmt_x(sp.get("torch_foreach"), 2, "torch_foreach" in out),
            _fmt_x(row["vs_flat"], 2, "flat" in out)]


_WIDTHS = [16, 7, 12, 3, 9, 6, 6, 8, 7, 11, 13, 15, 6]


def text_line(cells):
    """One line of the text table, its cells padded to the columns' widths."""
    return "  ".join(c.rjust(w) if i >= 3 else c.ljust(w)
                     for i, (c, w) in enumerate(zip(cells, _WIDTHS)))


def markdown(info, rows):
    """The results as a Markdown table, the machine above it."""
    lines = [f"Machine: {header(info)}.", "",
             "| " + " | ".join(COLUMNS) + " |",
             "|" + "|".join("---" if i < 3 else "---:" for i in range(len(COLUMNS))) + "|"]
    lines += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    if any(r.get("withheld") for r in rows):
        lines += ["", WITHHELD_NOTE]
    return "\n".join(lines) + "\n"


PLOT_STYLE = {"ch8fast": ("C0", "-", "o"), "numpy": ("C1", "-", "s"),
              "reference": ("C2", "-", "^"), "textbook": ("C2", "-", "^"),
              "torch_fused": ("C3", "-", "D"),
              "torch_foreach": ("C4", "-", "v")}


def plot(rows, path, info):
    """Time per element against size, log-log, one panel per (rule, dtype, threads)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"ch8fast bench: matplotlib is not installed, so no plot was written to "
              f"{path} (pip install matplotlib)", file=sys.stderr)
        return False
    keys = list(dict.fromkeys((r["rule"], r["dtype"], r["threads"]) for r in rows))
    ncol = min(4, len(keys))
    nrow = math.ceil(len(keys) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.4 * nrow), squeeze=False,
                             sharex=True)
    layout_markers = {}
    for ax, key in zip(axes.flat, keys):
        case = [r for r in rows if (r["rule"], r["dtype"], r["threads"]) == key]
        single = sorted((r for r in case if r["tensors"] == 1), key=lambda r: r["elements"])
        multi = [r for r in case if r["tensors"] > 1]
        x = [r["elements"] for r in single]
        if single:
            ax.plot(x, [r["time"]["roofline"] / r["elements"] * 1e9 for r in single],
                    "k--", lw=1.5, label="roofline (copy kernel)")
        for c, (color, ls, mk) in PLOT_STYLE.items():
            pts = [(r["elements"], r["time"][c] / r["elements"] * 1e9)
                   for r in single if c in r["time"]]
            if pts:
                ax.plot(*zip(*pts), color=color, ls=ls, marker=mk, ms=3.5, lw=1.2,
                        label=c.replace("_", " "))
        for r in multi:           # a marker per layout, named in the legend (no labels)
            y = r["time"]["ch8fast"] / r["elements"] * 1e9
            mk = layout_markers.setdefault(r["layout"], "xP*D^v"[len(layout_markers) % 6])
            ax.plot(r["elements"], y, mk, color="C0", ms=8, mew=2, ls="none",
                    label=f"ch8fast, {r['tensors']} arrays of {_fmt_size(r['size'])}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{key[0]} {key[1]}, {key[2]} thread{'s' if key[2] > 1 else ''}",
                     fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("elements", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("time per element per step (ns)", fontsize=8)
    legend = {}
    for ax in axes.flat[:len(keys)]:          # every name once, whichever panel has it
        for h, lab in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(lab, h)
    ncol = min(len(legend), 5)
    rows_of_legend = math.ceil(len(legend) / ncol)
    fig.legend(list(legend.values()), list(legend), loc="upper center", ncol=ncol,
               fontsize=8, frameon=False)
    fig.suptitle(header(info), fontsize=7, y=0.005, va="bottom", wrap=True)
    height = fig.get_size_inches()[1]            # room for the legend: ~0.22 in a row
    fig.tight_layout(rect=(0, 0.25 / height, 1, 1 - (0.1 + 0.22 * rows_of_legend) / height))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


