"""Stateless update functions, for frameworks that keep their own optimizer state.

Each function applies one step of one rule, in place, to one parameter array and the state
arrays the caller owns (all C-contiguous, of the parameter's shape and dtype, and separate
buffers). It reads the rule's specification (:mod:`ch8fast.rules`: defaults, checks,
per-step scalars) and runs the same fused kernel as the optimizer classes, through
:func:`update`.

>>> import numpy as np, ch8fast.functional as F
>>> w = np.zeros(3); g = np.ones(3); m = np.zeros(3); v = np.zeros(3)
>>> F.adam(w, g, m, v, step=1, lr=0.1)
>>> w
array([-0.1, -0.1, -0.1])
"""

import numpy as np

from . import rules
from ._isa import K
from ._validation import step_count, unit_interval

__all__ = ["update", "sgd", "momentum", "adagrad", "rmsprop", "adam", "adadelta", "lion",
           "adopt", "ademamix"]


def update(rule, param, grad, states, *, step=1, momentum_next=None, **hyper):
    """One update of ``rule`` (a :class:`ch8fast.rules.Rule`) in place.

    Args:
        rule: e.g. ``ch8fast.rules.ADAM``.
        param: the parameter, written in place.
        grad: its gradient (any layout; read only).
        states: ``{name: array}``, exactly the state arrays this rule keeps for these
            hyperparameters (``rule.state(h)``), written in place.
        step: the number of this update, counting from 1 (Adam's bias corrections).
        momentum_next: the momentum of the next update, which places the next interim
            point of the shifted Nesterov form (default: ``momentum``).
        **hyper: hyperparameters; the rule's defaults fill the others. Checked exactly as
            the optimizer classes check them (a flag must be a bool, ...).
    """
    if not isinstance(states, dict):
        raise TypeError(f"states must be a dict name -> array, got {type(states).__name__}")
    _update(rule, param, grad, states, step, momentum_next, hyper)


def _update(rule, param, grad, states, step, momentum_next, hyper):
    """``update``, with the hyperparameters as a dict: the one code path of every function
    here."""
    try:
        key = (rule.name, param.dtype.num, momentum_next, *hyper.items(),
               *map(type, hyper.values()))
        prepared = _PREPARED.get(key)
    except (TypeError, AttributeError):     # unhashable, or not an array: no memo
        key, prepared = None, None
    if prepared is None:
        prepared = _prepare(rule, getattr(param, "dtype", None), hyper, momentum_next)
        if key is not None:
            if len(_PREPARED) >= 256:
                _PREPARED.clear()
            _PREPARED[key] = prepared
    s, layout = prepared
    try:
        K.apply(s, param, grad, states, layout,
                step=step if type(step) is int and step >= 1 else step_count(step, "step"))
    except ValueError as exc:
        if str(exc).startswith("these hyperparameters keep"):
            raise ValueError(f"{rule.name.lower()}(): {exc}") from None
        raise


def _prepare(rule, dtype, hyper, momentum_next):
    """(Scalars, state names) for these hyperparameters, checked as the classes check
    them. The same hyperparameters (equal values of the same types) give the same
    result, which ``update`` remembers, so a loop that calls it with the same
    hyperparameters checks them once."""
    if rule.trust_ratio:
        raise ValueError(f"{rule.name} runs two passes over its arrays (the trust ratio "
                         f"needs each array's norms first); use ch8fast.{rule.name}")
    if rule.point is not None and rule.point.COUNTERS:
        raise ValueError(f"{rule.name} keeps running numbers of the run per param group "
                         f"({', '.join(rule.point.COUNTERS)}) that one step cannot be "
                         f"given; use ch8fast.{rule.name}")
    h = dict(_checked_defaults(rule))
    for k, v in hyper.items():
        spec = rule.hyper.get(k)
        if spec is None:
            raise TypeError(f"{rule.name.lower()}(): unknown hyperparameter {k!r} "
                            f"(expected one of {sorted(rule.hyper)})")
        h[k] = spec.check(v, k)
        if dtype == _F32:
            spec.check.fits(h[k], k, _F32)
    layout = rule.state(h)
    if rule.structure is not None:
        rule.structure(h, layout, _same)
    nxt = h
    if momentum_next is not None:
        nxt = dict(h, momentum=unit_interval(momentum_next, "momentum_next"))
    s = K.Scalars(rule.kernel(layout))
    rule.scalars(s, h, nxt)
    return s, layout


_F32 = np.dtype(np.float32)
_DEFAULTS = {}
_PREPARED = {}


def _checked_defaults(rule):
    """The rule's defaults, checked once (they fit float32)."""
    h = _DEFAULTS.get(rule.name)
    if h is None:
        h = _DEFAULTS[rule.name] = rule.check_all(rule.defaults(), _same, (_F32,))
    return h


def _same(name):
    return name


def sgd(param, grad, **hyper):
    """theta <- theta - lr * g (Algorithm 8.1), in place. Hyperparameters: those of
    :class:`ch8fast.SGD` without momentum."""
    _update(rules.SGD, param, grad, {}, 1, None, hyper)


def momentum(param, grad, velocity, *, momentum, momentum_next=None, **hyper):
    """v <- alpha v - lr g (8.15); theta <- theta + v (8.16), in place.

    With ``nesterov=True``, ``param`` holds the interim point phi = theta + alpha v of the
    shifted Nesterov form (see ``ch8fast.SGD``). Other hyperparameters: those of
    :class:`ch8fast.SGD`.
    """
    if momentum == 0 and unit_interval(momentum, "momentum") == 0.0:
        raise ValueError("momentum must be > 0 here (a velocity is kept); use sgd() for "
                         "plain SGD")
    hyper["momentum"] = momentum
    _update(rules.SGD, param, grad, {_velocity_name(rules.SGD, hyper): velocity}, 1,
            momentum_next, hyper)


def adagrad(param, grad, sum_sq, **hyper):
    """r <- r + g*g; theta <- theta - lr g / (eps + sqrt(r)) (Algorithm 8.4), in place.
    Hyperparameters: those of :class:`ch8fast.AdaGrad`."""
    _update(rules.ADAGRAD, param, grad, {"sum": sum_sq}, 1, None, hyper)


def rmsprop(param, grad, square_avg, velocity=None, grad_avg=None, *, momentum_next=None,
            **hyper):
    """r <- rho r + (1 - rho) g*g; theta <- theta - lr g / sqrt(eps + r) (Algorithm 8.5).

    With a ``velocity`` array (and ``momentum`` > 0): v <- alpha v - lr g / sqrt(eps + r);
    theta <- theta + v (Algorithm 8.6, in the shifted form when ``nesterov``). With a
    ``grad_avg`` array (and ``centered=True``): the centered form. Hyperparameters: those
    of :class:`ch8fast.RMSProp`.
    """
    states = {"square_avg": square_avg}
    if velocity is not None:
        states[_velocity_name(rules.RMSPROP, hyper)] = velocity
    if grad_avg is not None:
        states["grad_avg"] = grad_avg
        hyper.setdefault("centered", True)
    _update(rules.RMSPROP, param, grad, states, 1, momentum_next, hyper)


def _velocity_name(rule, hyper):
    """The name of the momentum state for these hyperparameters' convention."""
    prof = rule.profiles.get(hyper.get("convention", "book"))
    return "momentum_buffer" if prof is not None and prof.buffer else "velocity"


def adam(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq=None, *, step, **hyper):
    """One Adam step (Algorithm 8.7), in place; ``step`` is t, counting from 1.

    Pass ``max_exp_avg_sq`` (and ``amsgrad=True``) for AMSGrad,
    ``decoupled_weight_decay=True`` for AdamW. Hyperparameters: those of
    :class:`ch8fast.Adam`.
    """
    states = {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    if max_exp_avg_sq is not None:
        states["max_exp_avg_sq"] = max_exp_avg_sq
        hyper.setdefault("amsgrad", True)
    _update(rules.ADAM, param, grad, states, step, None, hyper)


def adadelta(param, grad, square_avg, acc_delta, **hyper):
    """One AdaDelta step (Zeiler 2012), in place. Hyperparameters: those of
    :class:`ch8fast.AdaDelta`."""
    _update(rules.ADADELTA, param, grad, {"square_avg": square_avg,
                                          "acc_delta": acc_delta}, 1, None, hyper)


def lion(param, grad, exp_avg, **hyper):
    """One Lion step (Chen et al. 2023), in place. Hyperparameters: those of
    :class:`ch8fast.Lion`."""
    _update(rules.LION, param, grad, {"exp_avg": exp_avg}, 1, None, hyper)


def adopt(param, grad, exp_avg, exp_avg_sq, *, step, **hyper):
    """One ADOPT step (Taniguchi et al. 2024), in place; ``step`` is t, counting from 1
    (the first update only sets ``exp_avg_sq``; the clipping bound grows with t).
    Hyperparameters: those of :class:`ch8fast.ADOPT`."""
    _update(rules.ADOPT, param, grad, {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}, step,
            None, hyper)


def ademamix(param, grad, exp_avg_fast, exp_avg_slow, exp_avg_sq, *, step, **hyper):
    """One AdEMAMix step (Pagliardini et al. 2024), in place; ``step`` is t, counting
    from 1. Hyperparameters: those of :class:`ch8fast.AdEMAMix` (``alpha`` and ``beta3``
    as numbers: evaluate a schedule at the step first)."""
    _update(rules.ADEMAMIX, param, grad, {"exp_avg_fast": exp_avg_fast,
                                          "exp_avg_slow": exp_avg_slow,
                                          "exp_avg_sq": exp_avg_sq}, step, None, hyper)
