"""The cases of the benchmark and the contenders that compute each update: ch8fast's
step and functional call, the roofline, in-place NumPy, the tests' reference rules and
torch.optim."""

import functools
import itertools
import math

import numpy as np

from ch8fast import functional, optim, rules
from ch8fast.apps import reference
from ch8fast.roofline import Roofline

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
    "lion": (optim.Lion, {"lr": LR}),
    "adopt": (optim.ADOPT, {"lr": LR}),
    "ademamix": (optim.AdEMAMix, {"lr": LR}),
    "schedule_free_sgd": (optim.ScheduleFreeSGD, {"lr": LR}),
    "schedule_free_adamw": (optim.ScheduleFreeAdamW, {"lr": LR}),
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


def _inplace_lion(h, p, g, st, a, b, t):
    b1, b2 = h["betas"]
    m = st["exp_avg"]
    if h["weight_decay"]:
        p *= 1.0 - h["lr"] * h["weight_decay"]   # decoupled decay first
    np.multiply(m, b1, out=a)
    np.multiply(g, 1.0 - b1, out=b)
    a += b                                   # c = b1 m + (1 - b1) g
    np.sign(a, out=a)
    a *= h["lr"]
    p -= a                                   # theta - eps sign(c)
    m *= b2
    np.multiply(g, 1.0 - b2, out=b)
    m += b                                   # m <- b2 m + (1 - b2) g


def _inplace_adopt(h, p, g, st, a, b, t):
    b1, b2 = h["betas"]
    m, v = st["exp_avg"], st["exp_avg_sq"]
    if t == 1:
        np.multiply(g, g, out=v)             # the first update: v <- g*g only
        return
    np.sqrt(v, out=a)
    np.maximum(a, h["eps"], out=a)
    np.divide(g, a, out=a)                   # u = g / max(sqrt(v), delta)
    if h["use_clipping"]:
        c = float(t - 1) ** h["clip_exponent"]
        np.clip(a, -c, c, out=a)
    m *= b1
    a *= 1.0 - b1
    m += a                                   # m <- b1 m + (1 - b1) u
    np.multiply(m, h["lr"], out=a)
    p -= a                                   # theta - eps m
    v *= b2
    np.multiply(g, g, out=a)
    a *= 1.0 - b2
    v += a                                   # then v


def _inplace_ademamix(h, p, g, st, a, b, t):
    b1, b2 = h["betas"]
    b3, alpha, lr = h["beta3"], h["alpha"], h["lr"]
    bc1, c2 = 1.0 - b1 ** t, 1.0 / math.sqrt(1.0 - b2 ** t)
    m, ms, v = st["exp_avg_fast"], st["exp_avg_slow"], st["exp_avg_sq"]
    if h["weight_decay"]:
        p *= 1.0 - lr * h["weight_decay"]
    m *= b1
    np.multiply(g, 1.0 - b1, out=a)
    m += a
    ms *= b3
    np.multiply(g, 1.0 - b3, out=a)
    ms += a
    v *= b2
    np.multiply(g, g, out=a)
    a *= 1.0 - b2
    v += a
    np.multiply(ms, alpha * bc1, out=a)
    a += m                                   # (s + alpha (1 - b1^t) s_slow)
    np.sqrt(v, out=b)
    b *= c2
    b += h["eps"]
    a /= b
    a *= lr / bc1
    p -= a                                   # theta - eps (s_hat + alpha s_slow) / ...


def _inplace_schedule_free(h, p, g, st, a, b, t):
    # y <- y + c (z - y) + lr (beta (1 - c) - 1) u, z <- z - lr u (u = g, or AdamW's
    # g / (sqrt(r_hat) + delta)); c is this step's weight of z, set by the optimizer
    lr, c = h["lr"], h["ck"]
    z = st["z"]
    u = g
    if "exp_avg_sq" in st:
        beta, b2 = h["betas"]
        v = st["exp_avg_sq"]
        v *= b2
        np.multiply(g, g, out=a)
        a *= 1.0 - b2
        v += a                                   # r <- b2 r + (1 - b2) g*g
        np.sqrt(v, out=a)
        a *= 1.0 / math.sqrt(1.0 - b2 ** t)
        a += h["eps"]
        np.divide(g, a, out=a)
        u = a
    else:
        beta = h["momentum"]
    if h["weight_decay"]:
        np.multiply(p, h["weight_decay"], out=b)
        if u is g:
            u = a
            np.add(g, b, out=a)
        else:
            a += b                               # u + wd y
    np.subtract(z, p, out=b)
    b *= c
    b += p                                       # y + c (z - y)
    np.multiply(u, lr * (beta * (1.0 - c) - 1.0), out=p)
    p += b
    np.multiply(u, lr, out=b)
    z -= b                                       # z - lr u


_INPLACE = {
    "sgd": _inplace_sgd, "momentum": _inplace_momentum, "nesterov": _inplace_nesterov,
    "adagrad": _inplace_adagrad, "rmsprop": _inplace_rmsprop,
    "rmsprop_nesterov": _inplace_rmsprop_nesterov, "adam": _inplace_adam,
    "adamw": _inplace_adam, "adadelta": _inplace_adadelta, "lion": _inplace_lion,
    "adopt": _inplace_adopt, "ademamix": _inplace_ademamix,
    "schedule_free_sgd": _inplace_schedule_free,
    "schedule_free_adamw": _inplace_schedule_free,
}



class NumpyOptimizer:
    """One case in NumPy over a list of arrays, updated in place with ``out=`` and two
    temporaries allocated here (sized to the largest array): a step allocates nothing.
    The hyperparameters and state names are the case's (:func:`hyperparameters`)."""

    def __init__(self, case, params):
        self._update = _INPLACE[case]
        self.hyper = hyperparameters(case)
        self.params = list(params)
        rule = CASES[case][0].rule
        self.state = [{n: p.copy() if rule.initial.get(n) == rules.PARAM
                       else np.zeros_like(p) for n in state_names(case)}
                      for p in self.params]
        self.t = 0
        # schedule-free: the running numbers of the average (a constant lr, no warm-up)
        self.average = ([0.0, 0.0] if rule.point is not None and rule.point.COUNTERS
                        else None)
        big = max(p.size for p in self.params)
        dtype = self.params[0].dtype
        self._tmp = (np.zeros(big, dtype), np.zeros(big, dtype))
        self._views = [(self._tmp[0][:p.size].reshape(p.shape),
                        self._tmp[1][:p.size].reshape(p.shape)) for p in self.params]

    def step(self, grads):
        self.t += 1
        h, t, update = self.hyper, self.t, self._update
        if self.average is not None:
            h["ck"], *self.average = rules.average_weight(h["lr"], t - 1, h["r"],
                                                          h["weight_lr_power"],
                                                          *self.average)
        for p, g, st, (a, b) in zip(self.params, grads, self.state, self._views):
            update(h, p, g, st, a, b, t)


def reference_optimizer(case, params):
    """The tests' reference of ``case`` (:mod:`ch8fast.apps.reference`) over copies of
    ``params``, with every hyperparameter of the case."""
    return reference.for_rule(CASES[case][0].rule)(params, **hyperparameters(case))


# ---------------------------------------------------------------------------------------
# Contenders and timing
# ---------------------------------------------------------------------------------------


def import_torch():
    """torch, or None where it is not installed."""
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
    if "functional" in which and not (opt.rule.point and opt.rule.point.COUNTERS):
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
    torch = import_torch() if {"torch_fused", "torch_foreach"} & set(which) else None
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



PEERS = ("numpy", "reference", "torch_fused", "torch_foreach")
CONTENDERS = ("ch8fast", "roofline", "flat") + PEERS
# also measured on request: "functional", the same update through ch8fast.functional
