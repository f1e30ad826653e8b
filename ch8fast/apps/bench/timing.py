"""Timing: the contenders round-robin, one sample each per round; medians and the
trust of each ratio."""

import gc
import itertools
import time

import numpy as np

from ch8fast import set_num_threads

from .peers import CONTENDERS, PEERS, import_torch, make_contenders


def _time(fn, k):
    t0 = time.perf_counter()
    for _ in itertools.repeat(None, k):
        fn()
    return time.perf_counter() - t0


def _calibrate(fn, min_time, max_steps=1 << 20):
    """Steps per sample so that a sample lasts at least ``min_time`` seconds."""
    k = 1
    while True:
        t = _time(fn, k)
        if t >= min_time or k >= max_steps:
            return k
        k = min(max_steps, max(2 * k, int(k * 1.2 * min_time / max(t, 1e-9)) + 1))


def measure(fns, repeats, min_time, max_seconds=None, *, base="ch8fast",
            max_rounds=None):
    """Interleaved timing: ``repeats`` rounds, each one sample of every contender, the
    order rotated every round. Returns (samples, steps): seconds per step of every
    sample, by contender, and the steps per sample.

    With ``max_seconds``, stops after the round that passes it (at least 3 rounds). While
    a ratio to ``base`` is not yet trustworthy (:func:`ratio`), more rounds are added, up
    to ``max_rounds`` (default ``3 * repeats``, at least 15) and within ``max_seconds``:
    on a loaded machine the benchmark measures longer rather than report noise."""
    names = list(fns)
    steps = {n: _calibrate(fns[n], min_time) for n in names}
    samples = {n: [] for n in names}
    limit = max(3 * repeats, 15) if max_rounds is None else max_rounds
    enabled = gc.isenabled()
    gc.disable()
    t_start = time.perf_counter()
    try:
        r = 0
        while True:
            for j in range(len(names)):
                n = names[(r + j) % len(names)]
                samples[n].append(_time(fns[n], steps[n]) / steps[n])
            r += 1
            late = (max_seconds is not None and r >= 3
                    and time.perf_counter() - t_start > max_seconds)
            if r >= repeats and (late or r >= limit or _all_trusted(samples, base)):
                break
            if r < repeats and late:
                break
    finally:
        if enabled:
            gc.enable()
    return samples, steps


# A ratio of two contenders' times is reported when its estimates agree: the median over
# rounds of the ratio within each round, and the ratio of the two fastest samples (noise
# only ever adds time), within TRUST of each other, and the in-round ratios not spread
# wider than SPREAD (interquartile range over median), over at least 3 rounds.
TRUST = 1.25
SPREAD = 0.5


def ratio(num, den):
    """``(value, trusted)`` of the time ratio ``num / den`` of two contenders' samples
    (taken in the same rounds): the median of the in-round ratios, and whether it can be
    trusted (see ``TRUST`` and ``SPREAD``)."""
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    within = num / den
    med = float(np.median(within))
    fastest = float(num.min() / den.min())
    q75, q25 = np.percentile(within, [75, 25])
    trusted = bool(len(within) >= 3 and med > 0 and fastest > 0
                   and max(med, fastest) / min(med, fastest) <= TRUST
                   and (q75 - q25) / med <= SPREAD)
    return med, trusted


# A step over fewer elements never takes longer than one over more (the same rule, dtype,
# thread count and one array): a contender that took more than STARVED times its time on a
# larger array was starved in that case (on a loaded machine a thread team waits whole time
# slices for a descheduled thread, in every sample alike, which the estimates of ``ratio``
# cannot see), and its ratio is withheld. (ch8fast starved: every ratio of the row.)
STARVED = 2.0


def withhold_starved(rows):
    """Withhold, in place, the ratios of the contenders that were starved in one of
    ``rows`` (the cases of one rule, dtype and thread count): see ``STARVED``. Each row
    starved this way names the contenders in ``"starved"``."""
    one = sorted((r for r in rows if r["tensors"] == 1), key=lambda r: r["size"])
    for i, small in enumerate(one):
        larger = one[i + 1:]
        starved = sorted(c for c, t in small["time"].items()
                         if any(t > STARVED * big["time"].get(c, float("inf"))
                                for big in larger))
        if not starved:
            continue
        names = set(small["speedup"]) | {"roofline", "flat"}
        out = names if "ch8fast" in starved else (set(starved) & names)
        if "flat" in starved:
            out.add("flat")
        small["withheld"] = sorted(set(small["withheld"]) | out)
        small["starved"] = starved


def _all_trusted(samples, base):
    if base not in samples:
        return True
    return all(ratio(s, samples[base])[1] for n, s in samples.items() if n != base)





def run_case(rule, dtype, tensors, size, threads, which=CONTENDERS, repeats=7,
             min_time=2e-3, max_seconds=None, seed=0):
    """Time one case; returns a plain dict (see ``main``'s JSON). Arrays are freed on
    return. A ratio that cannot be trusted (:func:`ratio`) is kept, and named in
    ``"withheld"``."""
    dtype = np.dtype(dtype)
    set_num_threads(threads)
    torch = import_torch() if {"torch_fused", "torch_foreach"} & set(which) else None
    if torch is not None:
        torch.set_num_threads(threads)
    fns, ncols = make_contenders(rule, dtype, tensors, size, which, seed)
    samples, steps = measure(fns, repeats, min_time, max_seconds)
    del fns
    gc.collect()
    n = tensors * size
    bytes_per_step = dtype.itemsize * (2 * ncols - 1) * n
    times = {c: float(np.median(s)) for c, s in samples.items()}
    ch8 = samples["ch8fast"]
    ratios = {c: ratio(samples[c], ch8) for c in PEERS + ("functional",) if c in samples}
    if "roofline" in samples:
        ratios["roofline"] = ratio(samples["roofline"], ch8)
    if "flat" in samples:
        ratios["flat"] = ratio(ch8, samples["flat"])
    return {
        "rule": rule, "dtype": dtype.name, "tensors": tensors, "size": size,
        "elements": n, "layout": f"{tensors}x{size}", "threads": threads,
        "ncols": ncols, "bytes_per_step": bytes_per_step,
        "rounds": len(ch8), "steps_per_sample": steps,
        "time": times,
        "time_min": {c: float(np.min(s)) for c, s in samples.items()},
        # (75th - 25th percentile) / median of ch8fast's samples: how noisy the case was
        "spread": float(np.subtract(*np.percentile(ch8, [75, 25])) / np.median(ch8)),
        "gbps": {c: bytes_per_step / t / 1e9 for c, t in times.items()},
        "roofline_fraction": ratios["roofline"][0] if "roofline" in ratios else None,
        "speedup": {c: ratios[c][0] for c in PEERS + ("functional",) if c in ratios},
        "vs_flat": ratios["flat"][0] if "flat" in ratios else None,
        # the ratios whose estimates disagree: printed as "?", kept here
        "withheld": sorted(c for c, (_, ok) in ratios.items() if not ok),
    }


