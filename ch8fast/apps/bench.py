"""The benchmark: the cost of one optimizer step, against the memory-bandwidth limit and
against other ways of computing the same update.

    ch8fast bench [--rules adam,sgd] [--sizes 1e3,16e6] [--layouts 100x1e4] ...
    python -m ch8fast.apps.bench ...

Every case (rule, dtype, layout, thread count) times these contenders on arrays of the
same sizes, each updating its own parameters and state from the same gradient values:

* ``ch8fast``: ``opt.step(grads)``, the public call, Python overhead included;
* ``roofline``: the traffic-matched copy kernel (:class:`ch8fast.roofline.Roofline`):
  it reads every column once and writes every column but the gradient once, with the
  update's threads and chunking. Its time is the floor a
  single-pass update can reach at the machine's memory (or cache) bandwidth;
* ``flat`` (many-tensor layouts only): ``ch8fast`` on ONE array of the same total size;
* ``numpy``: a careful in-place NumPy update (``out=``, preallocated temporaries, no
  allocation per step);
* ``reference``: the tests' reference rules (:mod:`ch8fast.apps.reference`), the book's
  formulas written with NumPy temporaries;
* ``torch_fused`` / ``torch_foreach``: ``torch.optim`` with ``fused=True`` /
  ``foreach=True`` on tensors of the same sizes (where torch has the rule).

Timing: the contenders are timed round-robin, one sample each per round (the order
rotated every round), so that the noise of a shared machine hits them all alike. A sample
runs enough steps to last ``--min-time`` (small arrays: thousands of steps), and reports the
time per step. Times are medians over the rounds; every ratio is the median over rounds of
the ratio within the round.
"""

import argparse
import functools
import gc
import glob
import itertools
import json
import math
import os
import platform
import sys
import time

import numpy as np

from ch8fast import functional, optim
from ch8fast.apps import reference
from ch8fast.roofline import Roofline
from ch8fast import get_num_threads, isa, set_num_threads

__all__ = ["CASES", "RULES", "DEFAULT_RULES", "DEFAULT_SIZES", "DEFAULT_LAYOUTS",
           "hyperparameters", "state_names", "NumpyOptimizer", "reference_optimizer",
           "machine_info", "make_contenders", "measure", "run_case", "main"]

# ---------------------------------------------------------------------------------------
# The cases and their hyperparameters (every implementation below reads these)
# ---------------------------------------------------------------------------------------

# The benchmark's choices: one learning rate (AdaDelta keeps its own, 1) and one momentum;
# every other hyperparameter is the rule's default, read from its specification.
LR = 1e-3
MOMENTUM = 0.9

# case -> (optimizer class, the hyperparameters that differ from its rule's defaults)
CASES = {
    "sgd": (optim.SGD, {"lr": LR}),
    "momentum": (optim.SGD, {"lr": LR, "momentum": MOMENTUM}),
    "nesterov": (optim.SGD, {"lr": LR, "momentum": MOMENTUM, "nesterov": True}),
    "adagrad": (optim.AdaGrad, {"lr": LR}),
    "rmsprop": (optim.RMSProp, {"lr": LR}),
    "rmsprop_nesterov": (optim.RMSProp, {"lr": LR, "momentum": MOMENTUM,
                                         "nesterov": True}),
    "adam": (optim.Adam, {"lr": LR}),
    "adamw": (optim.AdamW, {"lr": LR}),
    "adadelta": (optim.AdaDelta, {}),
}
RULES = tuple(CASES)


def hyperparameters(case):
    """Every hyperparameter of ``case``: the rule's defaults and the benchmark's choices."""
    cls, given = CASES[case]
    return dict(cls.rule.defaults(), **given)


def state_names(case):
    """The names of the state arrays the case keeps per parameter (from its rule)."""
    return CASES[case][0].rule.state(hyperparameters(case))


def _ch8fast(case, params):
    cls, given = CASES[case]
    return cls(params, **given)


def _torch(torch, case, params, impl):
    """A torch.optim optimizer for ``case`` with ``impl`` ("fused" or "foreach"), or None
    where torch has no such rule or implementation. torch's RMSprop puts eps outside the
    root and its Nesterov SGD is written differently; the memory traffic is the same."""
    o = torch.optim
    h = hyperparameters(case)
    kw = {impl: True}
    try:
        if case in ("sgd", "momentum", "nesterov"):
            return o.SGD(params, lr=h["lr"], momentum=h["momentum"],
                         nesterov=h["nesterov"], **kw)
        if case == "adagrad":
            return o.Adagrad(params, lr=h["lr"], eps=h["eps"], **kw)
        if case == "rmsprop":
            return o.RMSprop(params, lr=h["lr"], alpha=h["rho"], eps=h["eps"], **kw)
        if case in ("adam", "adamw"):
            cls = o.AdamW if case == "adamw" else o.Adam
            return cls(params, lr=h["lr"], betas=h["betas"], eps=h["eps"],
                       weight_decay=h["weight_decay"], **kw)
        if case == "adadelta":
            return o.Adadelta(params, lr=h["lr"], rho=h["rho"], eps=h["eps"], **kw)
    except (TypeError, RuntimeError, ValueError):    # no such implementation
        return None
    return None                                       # rmsprop_nesterov: no equivalent


# ---------------------------------------------------------------------------------------
# The in-place NumPy peer: the same update with ``out=`` and two preallocated temporaries,
# the same IEEE operations in the same order as the kernel. The Nesterov rules use the
# shifted form of ch8fast's step(grads): the arrays hold phi = theta + alpha v, and
# phi' = phi - alpha v + (1 + alpha) v'. (The other NumPy peer, the formulas as written, is
# the tests' reference, ch8fast.apps.reference.)
# ---------------------------------------------------------------------------------------

def _inplace_sgd(h, p, g, st, a, b, t):
    np.multiply(g, h["lr"], out=a)
    p -= a


def _inplace_momentum(h, p, g, st, a, b, t):
    v = st["velocity"]
    v *= h["momentum"]
    np.multiply(g, h["lr"], out=a)
    v -= a                                   # v <- alpha v - eps g          (8.15)
    p += v                                   # theta <- theta + v           (8.16)


def _inplace_nesterov(h, p, g, st, a, b, t):
    v, alpha = st["velocity"], h["momentum"]
    np.multiply(v, alpha, out=a)             # alpha v
    p -= a
    np.multiply(g, h["lr"], out=b)
    np.subtract(a, b, out=v)                 # v' = alpha v - eps g
    np.multiply(v, 1.0 + alpha, out=a)
    p += a                                   # phi - alpha v + (1 + alpha) v'


def _inplace_adagrad(h, p, g, st, a, b, t):
    r = st["sum"]
    np.multiply(g, g, out=a)
    r += a                                   # r <- r + g*g
    np.sqrt(r, out=a)
    a += h["eps"]
    np.divide(g, a, out=a)
    a *= h["lr"]
    p -= a                                   # theta - eps g / (delta + sqrt(r))


def _rms_scaled(h, g, r, a):
    """r <- rho r + (1 - rho) g*g; a = eps g / sqrt(delta + r)."""
    rho = h["rho"]
    r *= rho
    np.multiply(g, g, out=a)
    a *= 1.0 - rho
    r += a
    np.add(r, h["eps"], out=a)
    np.sqrt(a, out=a)
    np.divide(g, a, out=a)
    a *= h["lr"]


def _inplace_rmsprop(h, p, g, st, a, b, t):
    _rms_scaled(h, g, st["square_avg"], a)
    p -= a


def _inplace_rmsprop_nesterov(h, p, g, st, a, b, t):
    v, alpha = st["velocity"], h["momentum"]
    _rms_scaled(h, g, st["square_avg"], a)
    np.multiply(v, alpha, out=b)             # alpha v
    p -= b
    np.subtract(b, a, out=v)                 # v' = alpha v - eps g / sqrt(delta + r)
    np.multiply(v, 1.0 + alpha, out=a)
    p += a


def _inplace_adam(h, p, g, st, a, b, t):
    b1, b2 = h["betas"]
    step_size, c2 = h["lr"] / (1.0 - b1 ** t), 1.0 / math.sqrt(1.0 - b2 ** t)
    m, v = st["exp_avg"], st["exp_avg_sq"]
    if h["decoupled_weight_decay"]:
        p *= 1.0 - h["lr"] * h["weight_decay"]   # AdamW: theta (1 - eps lambda) first
    m *= b1
    np.multiply(g, 1.0 - b1, out=a)
    m += a                                   # s <- b1 s + (1 - b1) g
    v *= b2
    np.multiply(g, g, out=a)
    a *= 1.0 - b2
    v += a                                   # r <- b2 r + (1 - b2) g*g
    np.sqrt(v, out=a)
    a *= c2
    a += h["eps"]
    np.divide(m, a, out=a)
    a *= step_size
    p -= a                                   # theta - eps s_hat / (sqrt(r_hat) + delta)


def _inplace_adadelta(h, p, g, st, a, b, t):
    eg, ed, rho, eps = st["square_avg"], st["acc_delta"], h["rho"], h["eps"]
    eg *= rho
    np.multiply(g, g, out=a)
    a *= 1.0 - rho
    eg += a                                  # E[g^2]
    np.add(ed, eps, out=a)
    np.sqrt(a, out=a)
    np.add(eg, eps, out=b)
    np.sqrt(b, out=b)
    np.divide(a, b, out=a)
    a *= g                                   # d = sqrt(E[dx^2] + d) / sqrt(E[g^2] + d) g
    ed *= rho
    np.multiply(a, a, out=b)
    b *= 1.0 - rho
    ed += b                                  # E[dx^2]
    a *= h["lr"]
    p -= a


_INPLACE = {
    "sgd": _inplace_sgd, "momentum": _inplace_momentum, "nesterov": _inplace_nesterov,
    "adagrad": _inplace_adagrad, "rmsprop": _inplace_rmsprop,
    "rmsprop_nesterov": _inplace_rmsprop_nesterov, "adam": _inplace_adam,
    "adamw": _inplace_adam, "adadelta": _inplace_adadelta,
}
DEFAULT_RULES = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw")
DEFAULT_SIZES = (100, 1000, 10_000, 100_000, 1_000_000, 4_000_000, 16_000_000, 32_000_000)
DEFAULT_LAYOUTS = ((100, 10_000), (1000, 1000))
QUICK_SIZES = (100, 10_000, 1_000_000)
QUICK_LAYOUTS = ((100, 1000),)


class NumpyOptimizer:
    """One case in NumPy over a list of arrays, updated in place with ``out=`` and two
    temporaries allocated here (sized to the largest array): a step allocates nothing.
    The hyperparameters and state names are the case's (:func:`hyperparameters`)."""

    def __init__(self, case, params):
        self._update = _INPLACE[case]
        self.hyper = hyperparameters(case)
        self.params = list(params)
        self.state = [{n: np.zeros_like(p) for n in state_names(case)} for p in self.params]
        self.t = 0
        big = max(p.size for p in self.params)
        dtype = self.params[0].dtype
        self._tmp = (np.zeros(big, dtype), np.zeros(big, dtype))
        self._views = [(self._tmp[0][:p.size].reshape(p.shape),
                        self._tmp[1][:p.size].reshape(p.shape)) for p in self.params]

    def step(self, grads):
        self.t += 1
        h, t, update = self.hyper, self.t, self._update
        for p, g, st, (a, b) in zip(self.params, grads, self.state, self._views):
            update(h, p, g, st, a, b, t)


def reference_optimizer(case, params):
    """The tests' reference of ``case`` (:mod:`ch8fast.apps.reference`) over copies of
    ``params``, with every hyperparameter of the case."""
    return reference.for_rule(CASES[case][0].rule)(params, **hyperparameters(case))


# ---------------------------------------------------------------------------------------
# Contenders and timing
# ---------------------------------------------------------------------------------------

def _import_torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _filled(shape_list, dtype, rng, scale):
    """Separate arrays (one allocation each, as a model's tensors are), written now, so
    their pages are in memory before any timing."""
    out = []
    for n in shape_list:
        a = np.empty(n, dtype)
        a[...] = rng.standard_normal(n, dtype=np.float32) * scale
        out.append(a)
    return out


def _table_columns(opt):
    return 2 + len(opt.state[0])


def _functional(opt, params, grads):
    """The same update through ``ch8fast.functional.update``, one call per array, with
    state arrays of its own (the call a framework that keeps its own state makes), naming
    the hyperparameters that differ from the rule's defaults, as a user writes it (each
    keyword costs CPython about 0.2 us to pass)."""
    spec = opt.rule
    group = opt.param_groups[0]
    hyper = {k: group[k] for k, h in spec.hyper.items()
             if h.in_signature and group[k] != h.default}
    states = [{k: np.zeros_like(p) for k in st} for p, st in zip(params, opt.state)]
    count = itertools.count(1)
    update = functional.update
    if len(params) == 1:
        p, g, st = params[0], grads[0], states[0]

        def step():
            update(spec, p, g, st, step=next(count), **hyper)
        return step

    def step_all():
        t = next(count)
        for p, g, st in zip(params, grads, states):
            update(spec, p, g, st, step=t, **hyper)
    return step_all


def make_contenders(rule, dtype, tensors, size, which, seed=0):
    """(contenders, ncols): ``contenders`` is a dict name -> zero-argument step function,
    for the names in ``which`` that apply, over ``tensors`` arrays of ``size`` elements.
    Each contender owns its parameters and state; ch8fast and NumPy read one gradient
    buffer, each torch contender a copy of it."""
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(seed)
    flat_grad = np.empty(tensors * size, dtype)
    flat_grad[...] = rng.standard_normal(tensors * size, dtype=np.float32) * 0.1
    grads = [flat_grad[i * size:(i + 1) * size] for i in range(tensors)]
    init = rng.standard_normal(size, dtype=np.float32)
    sizes = [size] * tensors

    def params():
        out = []
        for _ in range(tensors):
            a = np.empty(size, dtype)
            a[...] = init
            out.append(a)
        return out

    fns = {}
    opt = _ch8fast(rule, params())
    opt.step(grads)
    ncols = _table_columns(opt)
    if "ch8fast" in which:
        fns["ch8fast"] = functools.partial(opt.step, grads)
    if "roofline" in which:
        # Arrays of its own, zero so that its adds keep them at zero (no overflow).
        fns["roofline"] = Roofline(sizes, dtype, ncols)
    if "functional" in which:
        fns["functional"] = _functional(opt, params(), grads)
    if "flat" in which and tensors > 1:
        flat_p = np.empty(tensors * size, dtype)
        flat_p[...] = np.tile(init, tensors)
        flat = _ch8fast(rule, [flat_p])
        flat.step([flat_grad])
        fns["flat"] = functools.partial(flat.step, [flat_grad])
    if "numpy" in which:
        fns["numpy"] = functools.partial(NumpyOptimizer(rule, params()).step, grads)
    if "reference" in which:
        fns["reference"] = functools.partial(reference_optimizer(rule, params()).step,
                                             grads)
    torch = _import_torch() if {"torch_fused", "torch_foreach"} & set(which) else None
    if torch is not None:
        for impl in ("fused", "foreach"):
            if f"torch_{impl}" not in which:
                continue
            # torch gets gradients of its own: its foreach Nesterov SGD writes into them
            own = flat_grad.copy()
            tgrads = [torch.from_numpy(own[i * size:(i + 1) * size])
                      for i in range(tensors)]
            tparams = [torch.nn.Parameter(torch.from_numpy(p)) for p in params()]
            for p, g in zip(tparams, tgrads):
                p.grad = g
            topt = _torch(torch, rule, tparams, impl)
            if topt is None:
                continue
            try:
                topt.step()
            except (RuntimeError, TypeError):
                continue
            fns[f"torch_{impl}"] = topt.step
    for f in fns.values():                       # warm: pages touched, state allocated
        f()
    return fns, ncols


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


def _all_trusted(samples, base):
    if base not in samples:
        return True
    return all(ratio(s, samples[base])[1] for n, s in samples.items() if n != base)


PEERS = ("numpy", "reference", "torch_fused", "torch_foreach")
CONTENDERS = ("ch8fast", "roofline", "flat") + PEERS
# also measured on request: "functional", the same update through ch8fast.functional


def run_case(rule, dtype, tensors, size, threads, which=CONTENDERS, repeats=7,
             min_time=2e-3, max_seconds=None, seed=0):
    """Time one case; returns a plain dict (see ``main``'s JSON). Arrays are freed on
    return. A ratio that cannot be trusted (:func:`ratio`) is kept, and named in
    ``"withheld"``."""
    dtype = np.dtype(dtype)
    set_num_threads(threads)
    torch = _import_torch() if {"torch_fused", "torch_foreach"} & set(which) else None
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
    torch = _import_torch()
    from ch8fast import __version__
    return {
        "cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable, "caches": caches,
        "load_average": load, "isa": isa(),
        "threads": list(threads), "python": platform.python_version(),
        "numpy": np.__version__, "torch": torch.__version__ if torch else None,
        "ch8fast": __version__, "platform": platform.platform(),
    }


def header(info):
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


def _fmt_time(t):
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
                 "and --max-case-time; the JSON keeps every sample.")


def _cells(row):
    layout = (_fmt_size(row["size"]) if row["tensors"] == 1
              else f"{row['tensors']}x{_fmt_size(row['size'])}")
    sp = row["speedup"]
    out = set(row.get("withheld", ()))
    return [row["rule"], row["dtype"], layout, str(row["threads"]),
            _fmt_time(row["time"]["ch8fast"]), f"{100 * row['spread']:.0f}%",
            f"{row['gbps']['ch8fast']:.1f}",
            _fmt_x(row["roofline_fraction"], 2, "roofline" in out),
            _fmt_x(sp.get("numpy"), 1, "numpy" in out),
            _fmt_x(sp.get("reference"), 1, "reference" in out),
            _fmt_x(sp.get("torch_fused"), 2, "torch_fused" in out),
            _fmt_x(sp.get("torch_foreach"), 2, "torch_foreach" in out),
            _fmt_x(row["vs_flat"], 2, "flat" in out)]


_WIDTHS = [16, 7, 12, 3, 9, 6, 6, 8, 7, 11, 13, 15, 6]


def text_line(cells):
    return "  ".join(c.rjust(w) if i >= 3 else c.ljust(w)
                     for i, (c, w) in enumerate(zip(cells, _WIDTHS)))


def markdown(info, rows):
    lines = [f"Machine: {header(info)}.", "",
             "| " + " | ".join(COLUMNS) + " |",
             "|" + "|".join("---" if i < 3 else "---:" for i in range(len(COLUMNS))) + "|"]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
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
            if _import_torch() is None:
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
    torch = _import_torch() if "torch_fused" in which else None
    torch_threads = torch.get_num_threads() if torch else None
    cases = [(1, n) for n in sizes] + list(layouts)
    rows = []
    try:
        for n_threads in threads:
            for dtype in args.dtype:
                for rule in args.rules:
                    for tensors, size in cases:
                        row = run_case(rule, dtype, tensors, size, n_threads, which,
                                       repeats, min_time, max_case)
                        rows.append(row)
                        print(text_line(_cells(row)))
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
