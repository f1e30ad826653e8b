r"""The Robbins–Monro analysis of step-size schedules (Deep Learning, 8.3.1).

SGD converges (for convex problems, under the usual conditions) when its step sizes
satisfy

.. math::
    \sum_{k=1}^{\infty} \epsilon_k = \infty \quad (8.12), \qquad
    \sum_{k=1}^{\infty} \epsilon_k^2 < \infty \quad (8.13).

:func:`robbins_monro` says whether a schedule does: in closed form for the schedules of
:mod:`ch8fast.schedules`, and as a labelled numeric estimate for any other callable.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Union

from .._validation import Integer
from .schedule import (BatchSizeSchedule, Constant, CosineDecay, ExponentialDecay,
                       InverseTime, Linear, Piecewise, Schedule, StepDecay, Warmup)

__all__ = ["RobbinsMonroReport", "robbins_monro"]


@dataclass(frozen=True)
class RobbinsMonroReport:
    """Does a schedule satisfy the Robbins–Monro conditions (8.12) and (8.13)?

    ``sum_diverges``: Σ ε_k = ∞ (8.12). ``sum_sq_converges``: Σ ε_k² < ∞ (8.13).
    ``satisfies``: both. ``method``: ``"analytic"`` (closed form) or ``"numeric"``
    (an estimate from partial sums). ``explanation``: why, in words.
    """

    sum_diverges: bool
    sum_sq_converges: bool
    satisfies: bool
    method: str
    explanation: str

    def __str__(self):
        verdict = "satisfies" if self.satisfies else "does not satisfy"
        return f"{verdict} Robbins–Monro ({self.method}): {self.explanation}"



# --------------------------------------------------------------------------- closed forms
def _tail_constant(value, what):
    if value > 0.0:
        return (
            True,
            False,
            f"{what} ends at the constant {value:g} > 0: the sum of ε_k diverges, so "
            "(8.12) holds, but the sum of ε_k² diverges too, so (8.13) fails: the gradient "
            "noise never averages out and SGD keeps wandering around the minimum.",
        )
    return (
        False,
        True,
        f"{what} ends at 0 after finitely many steps: both sums are finite, so (8.13) "
        "holds but (8.12) fails: the total distance the parameters can travel is bounded.",
    )


def _constant(s):
    return _tail_constant(s.value, "the constant schedule")


def _linear(s):
    return _tail_constant(
        s.end_value, f"the linear schedule (8.14), after τ = {s.transition_steps} steps,")


def _inverse_time(s):
    if s.init_value == 0.0:
        return _tail_constant(0.0, "the inverse-time schedule with init_value 0")
    return (
        True,
        True,
        "ε_k = ε_0/(1 + k/κ) behaves like ε_0 κ / k: the sum of ε_k diverges like the "
        "harmonic series (8.12 holds) and the sum of ε_k² converges like Σ 1/k² "
        "(8.13 holds).",
    )


def _step_decay(s):
    if s.factor == 1.0 or s.init_value == 0.0:
        return _tail_constant(s.init_value, "the step schedule with factor 1")
    return (
        False,
        True,
        f"each block of {s.every} steps is a factor {s.factor:g} smaller than the "
        "last, so the sum of ε_k is a convergent geometric series "
        f"(= ε_0·{s.every}/(1 − {s.factor:g})): (8.12) fails, the parameters can "
        "only travel a bounded distance and may stop short of a minimum. (8.13) holds.",
    )


def _exponential_decay(s):
    if s.decay_rate == 1.0 or s.init_value == 0.0:
        return _tail_constant(s.init_value, "the exponential schedule with rate 1")
    return (
        False,
        True,
        f"ε_k = ε_0·{s.decay_rate:g}^(k/{s.transition_steps}) is a geometric series: "
        "the sum of ε_k converges, so (8.12) fails (the parameters can only travel a "
        "bounded distance and may stop short of a minimum). (8.13) holds.",
    )


def _cosine_decay(s):
    return _tail_constant(s.end_value,
                          f"the cosine schedule, after T = {s.decay_steps} steps,")


def _warmup(s):
    return ("tail", s.schedule, f"after a warm-up of {s.warmup_steps} steps, ")


def _piecewise(s):
    return ("tail", s.schedules[-1], f"from step {s.boundaries[-1] if s.boundaries else 0} "
                                     "on, ")


def _batch_size(s):
    raise TypeError("robbins_monro applies to step-size schedules, not batch sizes")


# schedule type -> its closed form: (sum diverges, sum of squares converges, why), or
# ("tail", the schedule that decides, the words before its answer)
_CLOSED_FORMS = {
    Constant: _constant, Linear: _linear, InverseTime: _inverse_time,
    StepDecay: _step_decay, ExponentialDecay: _exponential_decay,
    CosineDecay: _cosine_decay, Warmup: _warmup, Piecewise: _piecewise,
    BatchSizeSchedule: _batch_size,
}


def _closed_form(schedule):
    for cls in type(schedule).__mro__:
        if cls in _CLOSED_FORMS:
            return _CLOSED_FORMS[cls](schedule)
    return None


def robbins_monro(schedule: Union[Schedule, Callable[[int], float]], *,
                  horizon: int = 10**7) -> RobbinsMonroReport:
    r"""Report whether ``schedule`` satisfies the sufficient conditions for SGD to converge.

    .. math::
        \sum_{k=1}^{\infty} \epsilon_k = \infty \quad (8.12), \qquad
        \sum_{k=1}^{\infty} \epsilon_k^2 < \infty \quad (8.13)

    The schedules of :mod:`ch8fast.schedules` are answered in closed form
    (``method="analytic"``); warm-up and piecewise schedules are decided by their last,
    unending piece. Any other callable ``step -> float`` is examined numerically
    (``method="numeric"``): the terms are summed exactly up to step 2**14, then over
    geometric blocks ``[2^j, 2^(j+1))`` up to ``horizon`` by stratified sampling, and the
    growth of the block sums is fitted by a power law :math:`\epsilon_k \approx c\,k^{-p}`
    (the series diverges iff p <= 1). A numeric answer is an estimate: a finite horizon
    cannot tell, e.g., :math:`1/k` from :math:`1/k^{1.05}`, and periodic schedules may
    alias with the sampling.

    Args:
        schedule: a :class:`~ch8fast.schedules.Schedule` or any callable ``step -> float``
            (its values must be finite and >= 0).
        horizon: the last step a numeric estimate looks at (>= 2**15).

    Returns:
        A :class:`RobbinsMonroReport`.

    Raises:
        TypeError: ``schedule`` is not callable, or is a batch-size schedule.
        ValueError: a value of ``schedule`` is negative or not finite.
    """
    if isinstance(schedule, Schedule):
        prefix = ""
        while True:
            known = _closed_form(schedule)
            if known is not None and known[0] == "tail":
                prefix += known[2]
                schedule = known[1]
                continue
            break
        if known is not None:
            div, conv, text = known
            return RobbinsMonroReport(div, conv, div and conv, "analytic", prefix + text)
        report = _robbins_monro_numeric(schedule, horizon)
        if prefix:
            report = RobbinsMonroReport(
                report.sum_diverges,
                report.sum_sq_converges,
                report.satisfies,
                report.method,
                prefix + report.explanation,
            )
        return report
    if not callable(schedule):
        raise TypeError(f"schedule must be a Schedule or a callable step -> float, got "
                        f"{type(schedule).__name__}")
    return _robbins_monro_numeric(schedule, horizon)


_EXACT_STEPS = 2**14
_SAMPLES_PER_BLOCK = 64
_horizon = Integer(2 * _EXACT_STEPS)


def _robbins_monro_numeric(schedule, horizon):
    horizon = _horizon(horizon, "horizon")

    def term(k):
        v = float(schedule(k))
        if not math.isfinite(v) or v < 0.0:
            raise ValueError(f"schedule({k}) must be a finite step size >= 0, got {v}")
        return v

    exact = [term(k) for k in range(_EXACT_STEPS)]
    # geometric blocks [2^j, 2^(j+1)) from 2^10 on; those below 2^14 are summed exactly
    blocks_1, blocks_2, starts = [], [], []
    lo = 2**10
    while 2 * lo <= horizon:
        hi = 2 * lo
        if hi <= _EXACT_STEPS:
            vals = exact[lo:hi]
            b1, b2 = math.fsum(vals), math.fsum(v * v for v in vals)
        else:
            width = (hi - lo) / _SAMPLES_PER_BLOCK
            vals = [term(lo + int((i + 0.5) * width)) for i in range(_SAMPLES_PER_BLOCK)]
            b1 = (hi - lo) * math.fsum(vals) / _SAMPLES_PER_BLOCK
            b2 = (hi - lo) * math.fsum(v * v for v in vals) / _SAMPLES_PER_BLOCK
        blocks_1.append(b1)
        blocks_2.append(b2)
        starts.append(lo)
        lo = hi
    reach = starts[-1] * 2

    def classify(blocks, label):
        tail = blocks[-6:]
        if tail[-1] == 0.0:
            return False, (f"{label}: the terms are 0 from step ~{starts[-1]} on (finite "
                           f"sum)")
        pos = [(j, b) for j, b in enumerate(tail) if b > 0.0]
        if len(pos) < 2:
            return False, f"{label}: the terms vanish over the last blocks (finite sum)"
        js = [j for j, _ in pos]
        ls = [math.log(b) for _, b in pos]
        mj, ml = sum(js) / len(js), sum(ls) / len(ls)
        slope = (sum((j - mj) * (y - ml) for j, y in zip(js, ls))
                 / sum((j - mj) ** 2 for j in js))
        p = 1.0 - slope / math.log(2.0)  # block sums of c k^-p scale like 2^(j(1-p))
        diverges = p <= 1.1
        word = "diverges" if diverges else "converges"
        if p <= 0.05:
            return diverges, (f"{label}: the terms do not decay at the horizon, so the sum "
                              f"{word}")
        return diverges, (f"{label}: terms decay like k^-{p:.2f} at the horizon, so the "
                          f"sum {word}")

    div, text1 = classify(blocks_1, "Σ ε_k")
    sq_div, text2 = classify(blocks_2, "Σ ε_k²")
    conv = not sq_div
    explanation = (
        f"numeric estimate up to step {reach:,} (power-law fit of block sums over "
        f"[2^j, 2^(j+1)); a sum is called divergent when its terms decay no faster than "
        f"k^-1.1): {text1}; {text2}. This cannot prove convergence or divergence."
    )
    return RobbinsMonroReport(div, conv, div and conv, "numeric", explanation)
