"""Hyperparameter schedules: pure ``step -> value`` functions (Deep Learning, 8.3.1-8.3.2).

A schedule is a small immutable object. Calling it with ``step`` returns the value of the
hyperparameter for that step; nothing else happens, so a schedule may be called any number
of times, in any order, and shared between optimizers. Every argument is checked once, at
construction, and a bad one raises :class:`ValueError` (or :class:`TypeError`) naming it.

The step convention
-------------------
``step`` is an ``int >= 0`` that counts the optimizer updates already *completed*: the first
update of a run uses ``schedule(0)``, the second ``schedule(1)``, and so on. The optimizers
keep this counter. The book writes its schedules with an iteration counter ``k``, and its
formulas, e.g. the linear decay (8.14), are evaluated at our ``step = k`` unchanged::

    linear_decay(eps0, tau, eps_tau)(k) == (1 - k/tau) * eps0 + (k/tau) * eps_tau   # k <= tau

so ``schedule(0)`` is the book's initial rate :math:`\\epsilon_0` and ``schedule(tau)`` is
:math:`\\epsilon_\\tau`. (Algorithm 8.1 starts its loop at ``k = 1``; its ``k``-th update
therefore uses our ``schedule(k - 1)``.)

The same objects drive any hyperparameter: the learning rate, the momentum coefficient
(:func:`momentum_ramp`: the book suggests starting with a small α and raising it), and the
minibatch size (:func:`batch_size_schedule`, used by :func:`minibatches`).

Every schedule has a readable ``repr``, and ``to_dict()`` / :meth:`Schedule.from_dict`
convert it to and from plain JSON-able data for checkpoints.
:func:`robbins_monro` reports whether a schedule satisfies the sufficient conditions
(8.12) and (8.13) for the convergence of SGD.
"""
from __future__ import annotations

import bisect
import math
import numbers
import operator
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Schedule",
    "Constant",
    "Linear",
    "InverseTime",
    "StepDecay",
    "ExponentialDecay",
    "CosineDecay",
    "Warmup",
    "Piecewise",
    "BatchSizeSchedule",
    "constant",
    "linear",
    "linear_decay",
    "momentum_ramp",
    "inverse_time",
    "step_decay",
    "exponential_decay",
    "cosine_decay",
    "warmup",
    "piecewise",
    "batch_size_schedule",
    "RobbinsMonroReport",
    "robbins_monro",
    "MinibatchSampler",
    "minibatches",
]


# --------------------------------------------------------------------------- checks
def _check_value(value, name, *, upper=None):
    """A finite real number >= 0 (and < ``upper`` when given), returned as float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"Invalid {name}: {value} (must be finite)")
    if value < 0.0:
        raise ValueError(f"Invalid {name}: {value} (must be >= 0)")
    if upper is not None and value >= upper:
        raise ValueError(f"Invalid {name}: {value} (must be < {upper})")
    return value


def _check_positive(value, name):
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and value <= 0:
        raise ValueError(f"Invalid {name}: {float(value)} (must be > 0)")
    value = _check_value(value, name)
    if value == 0.0:
        raise ValueError(f"Invalid {name}: {value} (must be > 0)")
    return value


def _check_int(value, name, minimum):
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}") from None
    if value < minimum:
        raise ValueError(f"Invalid {name}: {value} (must be >= {minimum})")
    return value


def _check_decay_factor(value, name):
    """A real number in (0, 1]."""
    value = _check_value(value, name)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"Invalid {name}: {value} (must be in (0, 1])")
    return value


def _bad_step(step):
    raise ValueError(f"Invalid step: {step} (must be >= 0)")


def _as_schedule(obj, name):
    """A Schedule stays as it is; a plain number becomes a Constant."""
    if isinstance(obj, Schedule):
        return obj
    if isinstance(obj, numbers.Real) and not isinstance(obj, bool):
        return Constant(obj)
    raise TypeError(
        f"{name} must be a Schedule or a number, got {type(obj).__name__} "
        "(wrap a custom function in a Schedule subclass)"
    )


# --------------------------------------------------------------------------- base
class Schedule:
    """Base class: a pure function ``step -> value`` with ``step`` an int >= 0.

    Subclasses set the class attribute ``kind`` (the ``"type"`` written by
    :meth:`to_dict`), store their constructor arguments as attributes named like the
    arguments, list them in ``_fields``, and implement ``__call__``. They are then
    registered for :meth:`from_dict`, and get ``repr``, equality and ``to_dict`` for free.
    """

    kind = None
    _fields = ()
    _registry = {}
    __slots__ = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        kind = cls.__dict__.get("kind")
        if kind is not None:
            Schedule._registry[kind] = cls

    def __call__(self, step):  # pragma: no cover - abstract
        raise NotImplementedError

    def _config(self):
        return {name: getattr(self, name) for name in self._fields}

    def to_dict(self):
        """Plain JSON-able data: ``{"type": kind, <arguments>}``; nested schedules nest."""
        if self.kind is None:
            raise TypeError(f"{type(self).__name__} has no 'kind' and cannot be serialized")
        out = {"type": self.kind}
        for name, value in self._config().items():
            if isinstance(value, Schedule):
                value = value.to_dict()
            elif isinstance(value, (list, tuple)):
                value = [v.to_dict() if isinstance(v, Schedule) else v for v in value]
            out[name] = value
        return out

    @staticmethod
    def from_dict(data):
        """Rebuild a schedule written by :meth:`to_dict` (arguments are checked again)."""
        if not isinstance(data, dict) or "type" not in data:
            raise ValueError("from_dict expects a dict with a 'type' key")
        kind = data["type"]
        try:
            cls = Schedule._registry[kind]
        except KeyError:
            raise ValueError(f"unknown schedule type {kind!r}") from None
        kwargs = {k: v for k, v in data.items() if k != "type"}
        return cls._from_config(kwargs)

    @classmethod
    def _from_config(cls, kwargs):
        return cls(**kwargs)

    def __repr__(self):
        args = ", ".join(f"{name}={value!r}" for name, value in self._config().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return self._config() == other._config()

    def _robbins_monro(self):
        """(sum_diverges, sum_sq_converges, explanation) when known in closed form."""
        return None


# --------------------------------------------------------------------------- schedules
def _tail_constant_report(value, what):
    if value > 0.0:
        return (
            True,
            False,
            f"{what} ends at the constant {value:g} > 0: the sum of ε_k diverges, so (8.12) "
            "holds, but the sum of ε_k² diverges too, so (8.13) fails: the gradient noise "
            "never averages out and SGD keeps wandering around the minimum.",
        )
    return (
        False,
        True,
        f"{what} ends at 0 after finitely many steps: both sums are finite, so (8.13) holds "
        "but (8.12) fails: the total distance the parameters can travel is bounded.",
    )


class Constant(Schedule):
    r"""A constant value.

    .. math::
        \epsilon_k = \epsilon \quad \text{for all } k \ge 0

    Robbins–Monro: fails (8.13) when ε > 0 (see :func:`robbins_monro`).
    """

    kind = "constant"
    _fields = ("value",)
    __slots__ = ("value",)

    def __init__(self, value):
        self.value = _check_value(value, "value")

    def __call__(self, step):
        if step < 0:
            _bad_step(step)
        return self.value

    def _robbins_monro(self):
        return _tail_constant_report(self.value, "the constant schedule")


class Linear(Schedule):
    r"""Linear interpolation from ``init_value`` to ``end_value``, then hold (book, 8.14).

    .. math::
        \epsilon_k = (1 - \alpha)\,\epsilon_0 + \alpha\,\epsilon_\tau,\quad
        \alpha = \frac{k}{\tau}\ \ (k \le \tau);\qquad \epsilon_k = \epsilon_\tau\ \ (k > \tau)

    with :math:`\epsilon_0` = ``init_value``, :math:`\epsilon_\tau` = ``end_value`` and
    :math:`\tau` = ``transition_steps``. ``end_value`` may be below (a decay, the book's
    learning-rate schedule) or above ``init_value`` (a ramp, e.g. for momentum).
    """

    kind = "linear"
    _fields = ("init_value", "end_value", "transition_steps")
    __slots__ = ("init_value", "end_value", "transition_steps")

    def __init__(self, init_value, end_value, transition_steps):
        init_value = _check_value(init_value, "init_value")
        end_value = _check_value(end_value, "end_value")
        transition_steps = _check_int(transition_steps, "transition_steps", 1)
        self.init_value = init_value
        self.end_value = end_value
        self.transition_steps = transition_steps

    def __call__(self, step):
        if step < 0:
            _bad_step(step)
        tau = self.transition_steps
        if step >= tau:
            return self.end_value
        alpha = step / tau
        return (1.0 - alpha) * self.init_value + alpha * self.end_value

    def _robbins_monro(self):
        return _tail_constant_report(
            self.end_value, f"the linear schedule (8.14), after τ = {self.transition_steps} steps,"
        )


class InverseTime(Schedule):
    r"""Inverse-time decay, the book's example that satisfies (8.12) and (8.13).

    .. math::
        \epsilon_k = \frac{\epsilon_0}{1 + k/\kappa}

    with :math:`\epsilon_0` = ``init_value`` and :math:`\kappa` = ``kappa`` > 0 (the step at
    which the rate has halved).
    """

    kind = "inverse_time"
    _fields = ("init_value", "kappa")
    __slots__ = ("init_value", "kappa")

    def __init__(self, init_value, kappa):
        self.init_value = _check_value(init_value, "init_value")
        self.kappa = _check_positive(kappa, "kappa")

    def __call__(self, step):
        if step < 0:
            _bad_step(step)
        return self.init_value / (1.0 + step / self.kappa)

    def _robbins_monro(self):
        if self.init_value == 0.0:
            return _tail_constant_report(0.0, "the inverse-time schedule with init_value 0")
        return (
            True,
            True,
            "ε_k = ε_0/(1 + k/κ) behaves like ε_0 κ / k: the sum of ε_k diverges like the "
            "harmonic series (8.12 holds) and the sum of ε_k² converges like Σ 1/k² "
            "(8.13 holds).",
        )


class StepDecay(Schedule):
    r"""Piecewise-constant decay: multiply by ``factor`` every ``every`` steps.

    .. math::
        \epsilon_k = \epsilon_0\, \gamma^{\lfloor k / n \rfloor}

    with :math:`\gamma` = ``factor`` in (0, 1] and :math:`n` = ``every`` >= 1.
    """

    kind = "step_decay"
    _fields = ("init_value", "factor", "every")
    __slots__ = ("init_value", "factor", "every")

    def __init__(self, init_value, factor, every):
        self.init_value = _check_value(init_value, "init_value")
        self.factor = _check_decay_factor(factor, "factor")
        self.every = _check_int(every, "every", 1)

    def __call__(self, step):
        if step < 0:
            _bad_step(step)
        return self.init_value * self.factor ** (step // self.every)

    def _robbins_monro(self):
        if self.factor == 1.0 or self.init_value == 0.0:
            return _tail_constant_report(self.init_value, "the step schedule with factor 1")
        return (
            False,
            True,
            f"each block of {self.every} steps is a factor {self.factor:g} smaller than the "
            "last, so the sum of ε_k is a convergent geometric series "
            f"(= ε_0·{self.every}/(1 − {self.factor:g})): (8.12) fails, the parameters can "
            "only travel a bounded distance and may stop short of a minimum. (8.13) holds.",
        )


class ExponentialDecay(Schedule):
    r"""Exponential decay.

    .. math::
        \epsilon_k = \epsilon_0\, \gamma^{k / n}

    with :math:`\gamma` = ``decay_rate`` in (0, 1] and :math:`n` = ``transition_steps``
    (the rate is multiplied by :math:`\gamma` every :math:`n` steps, smoothly).
    """

    kind = "exponential_decay"
    _fields = ("init_value", "decay_rate", "transition_steps")
    __slots__ = ("init_value", "decay_rate", "transition_steps")

    def __init__(self, init_value, decay_rate, transition_steps=1):
        self.init_value = _check_value(init_value, "init_value")
        self.decay_rate = _check_decay_factor(decay_rate, "decay_rate")
        self.transition_steps = _check_int(transition_steps, "transition_steps", 1)

    def __call__(self, step):
        if step < 0:
            _bad_step(step)
        return self.init_value * self.decay_rate ** (step / self.transition_steps)

    def _robbins_monro(self):
        if self.decay_rate == 1.0 or self.init_value == 0.0:
            return _tail_constant_report(self.init_value, "the exponential schedule with rate 1")
        return (
            False,
            True,
            f"ε_k = ε_0·{self.decay_rate:g}^(k/{self.transition_steps}) is a geometric series: "
            "the sum of ε_k converges, so (8.12) fails (the parameters can only travel a "
            "bounded distance and may stop short of a minimum). (8.13) holds.",
        )


class CosineDecay(Schedule):
    r"""Half-cosine from ``init_value`` to ``end_value`` over ``decay_steps``, then hold.

    .. math::
        \epsilon_k = \epsilon_T + \tfrac12(\epsilon_0 - \epsilon_T)
        \left(1 + \cos\frac{\pi k}{T}\right)\ \ (k \le T);\qquad
        \epsilon_k = \epsilon_T\ \ (k > T)

    Not in the book; a smooth alternative to (8.14) with the same constant tail.
    """

    kind = "cosine_decay"
    _fields = ("init_value", "decay_steps", "end_value")
    __slots__ = ("init_value", "decay_steps", "end_value")

    def __init__(self, init_value, decay_steps, end_value=0.0):
        self.init_value = _check_value(init_value, "init_value")
        self.decay_steps = _check_int(decay_steps, "decay_steps", 1)
        self.end_value = _check_value(end_value, "end_value")

    def __call__(self, step):
        if step < 0:
            _bad_step(step)
        if step >= self.decay_steps:
            return self.end_value
        c = 0.5 * (1.0 + math.cos(math.pi * step / self.decay_steps))
        return self.end_value + (self.init_value - self.end_value) * c

    def _robbins_monro(self):
        return _tail_constant_report(
            self.end_value, f"the cosine schedule, after T = {self.decay_steps} steps,"
        )


class Warmup(Schedule):
    r"""Linear warm-up over ``warmup_steps``, then ``schedule`` from its own step 0.

    .. math::
        \epsilon_k = \epsilon_{\text{init}} + (s(0) - \epsilon_{\text{init}})\,\frac{k}{w}
        \ \ (k < w);\qquad \epsilon_k = s(k - w)\ \ (k \ge w)

    where :math:`s` is ``schedule`` (a Schedule or a number) and :math:`w` = ``warmup_steps``.
    """

    kind = "warmup"
    _fields = ("schedule", "warmup_steps", "init_value")
    __slots__ = ("schedule", "warmup_steps", "init_value", "_target")

    def __init__(self, schedule, warmup_steps, init_value=0.0):
        schedule = _as_schedule(schedule, "schedule")
        self.schedule = schedule
        self.warmup_steps = _check_int(warmup_steps, "warmup_steps", 1)
        self.init_value = _check_value(init_value, "init_value")
        self._target = float(schedule(0))

    @classmethod
    def _from_config(cls, kwargs):
        kwargs = dict(kwargs)
        s = kwargs.get("schedule")
        if isinstance(s, dict):
            kwargs["schedule"] = Schedule.from_dict(s)
        return cls(**kwargs)

    def __call__(self, step):
        if step < 0:
            _bad_step(step)
        w = self.warmup_steps
        if step < w:
            return self.init_value + (self._target - self.init_value) * (step / w)
        return self.schedule(step - w)

    def _robbins_monro(self):
        return ("tail", self.schedule, f"after a warm-up of {self.warmup_steps} steps, ")


class Piecewise(Schedule):
    r"""Join schedules at step boundaries; each piece restarts its own count at 0.

    .. math::
        \epsilon_k = s_i(k - b_i)\quad\text{for } b_i \le k < b_{i+1},\qquad b_0 = 0

    ``schedules`` has one more entry than ``boundaries`` (strictly increasing ints > 0).
    Numbers are accepted as constant pieces.
    """

    kind = "piecewise"
    _fields = ("schedules", "boundaries")
    __slots__ = ("schedules", "boundaries", "_starts")

    def __init__(self, schedules, boundaries):
        if isinstance(schedules, (Schedule, numbers.Real)) or not hasattr(schedules, "__len__"):
            raise TypeError("schedules must be a sequence of Schedule objects or numbers")
        schedules = tuple(_as_schedule(s, f"schedules[{i}]") for i, s in enumerate(schedules))
        if len(schedules) == 0:
            raise ValueError("Invalid schedules: at least one schedule is required")
        if not hasattr(boundaries, "__len__"):
            raise TypeError("boundaries must be a sequence of integers")
        boundaries = tuple(_check_int(b, f"boundaries[{i}]", 1) for i, b in enumerate(boundaries))
        if len(boundaries) != len(schedules) - 1:
            raise ValueError(
                f"Invalid boundaries: expected {len(schedules) - 1} boundaries for "
                f"{len(schedules)} schedules, got {len(boundaries)}"
            )
        for i in range(1, len(boundaries)):
            if boundaries[i] <= boundaries[i - 1]:
                raise ValueError(
                    f"Invalid boundaries: must be strictly increasing, got {list(boundaries)}"
                )
        self.schedules = schedules
        self.boundaries = boundaries
        self._starts = (0,) + boundaries

    def _config(self):
        return {"schedules": list(self.schedules), "boundaries": list(self.boundaries)}

    @classmethod
    def _from_config(cls, kwargs):
        kwargs = dict(kwargs)
        kwargs["schedules"] = [
            Schedule.from_dict(s) if isinstance(s, dict) else s for s in kwargs["schedules"]
        ]
        return cls(**kwargs)

    def __call__(self, step):
        if step < 0:
            _bad_step(step)
        i = bisect.bisect_right(self.boundaries, step)
        return self.schedules[i](step - self._starts[i])

    def _robbins_monro(self):
        return ("tail", self.schedules[-1], f"from step {self._starts[-1]} on, ")


class BatchSizeSchedule(Schedule):
    r"""An integer minibatch size that grows geometrically, up to an optional cap.

    .. math::
        m_k = \min\left(m_{\max},\ \operatorname{round}\left(m_0\, \rho^{\lfloor k/n \rfloor}
        \right)\right)

    with :math:`m_0` = ``init_size``, :math:`\rho` = ``factor`` >= 1, :math:`n` = ``every``
    and :math:`m_{\max}` = ``max_size`` (None: no cap). Growing the minibatch trades SGD's
    fast start for the lower gradient noise of larger batches (book, 8.3.1).
    """

    kind = "batch_size"
    _fields = ("init_size", "factor", "every", "max_size")
    __slots__ = ("init_size", "factor", "every", "max_size")

    def __init__(self, init_size, factor=2.0, every=1000, max_size=None):
        init_size = _check_int(init_size, "init_size", 1)
        factor = _check_value(factor, "factor")
        if factor < 1.0:
            raise ValueError(f"Invalid factor: {factor} (must be >= 1 for a growing batch)")
        every = _check_int(every, "every", 1)
        if max_size is not None:
            max_size = _check_int(max_size, "max_size", 1)
            if max_size < init_size:
                raise ValueError(
                    f"Invalid max_size: {max_size} (must be >= init_size = {init_size})"
                )
        self.init_size = init_size
        self.factor = factor
        self.every = every
        self.max_size = max_size

    def __call__(self, step):
        if step < 0:
            _bad_step(step)
        j = step // self.every
        cap = self.max_size
        if self.factor == 1.0 or j == 0:
            return self.init_size
        try:
            size = int(round(self.init_size * self.factor**j))
        except OverflowError:
            size = None
        if cap is not None and (size is None or size > cap):
            return cap
        if size is None:
            raise OverflowError(f"batch size overflows at step {step}; set max_size")
        return size

    def _robbins_monro(self):
        raise TypeError("robbins_monro applies to step-size schedules, not batch sizes")


# --------------------------------------------------------------------------- factories
def constant(value):
    """A constant schedule (see :class:`Constant`)."""
    return Constant(value)


def linear(init_value, end_value, transition_steps):
    """Linear from ``init_value`` to ``end_value`` over ``transition_steps``, then hold (8.14).

    Decreasing or increasing; see :class:`Linear`.
    """
    return Linear(init_value, end_value, transition_steps)


def linear_decay(init_value, transition_steps, end_value=None):
    r"""The book's learning-rate schedule (8.14): decay linearly until step τ, then hold.

    .. math::
        \epsilon_k = (1 - \alpha)\,\epsilon_0 + \alpha\,\epsilon_\tau,\quad \alpha = k/\tau
        \ \ (k \le \tau);\qquad \epsilon_k = \epsilon_\tau\ \ (k > \tau)

    ``end_value`` (:math:`\epsilon_\tau`) defaults to 1 % of ``init_value``, the book's rule
    of thumb, and must not exceed it. The book suggests τ of a few hundred passes over
    the training set. ``linear_decay(e0, tau)(k)`` is the book's :math:`\epsilon_k`.
    """
    init_value = _check_value(init_value, "init_value")
    if end_value is None:
        end_value = 0.01 * init_value
    end_value = _check_value(end_value, "end_value")
    if end_value > init_value:
        raise ValueError(
            f"Invalid end_value: {end_value} (must be <= init_value = {init_value} for a "
            "decay; use linear() for a ramp)"
        )
    return Linear(init_value, end_value, transition_steps)


def momentum_ramp(init_value=0.5, end_value=0.9, transition_steps=1000):
    r"""Raise the momentum coefficient α linearly, then hold (book, 8.3.2).

    .. math::
        \alpha_k = (1 - k/\tau)\,\alpha_0 + (k/\tau)\,\alpha_\tau\ \ (k \le \tau);\qquad
        \alpha_k = \alpha_\tau\ \ (k > \tau)

    "Start small, raise it later": both values must lie in [0, 1), and ``end_value`` must
    not be below ``init_value``. Returns a :class:`Linear`.
    """
    init_value = _check_value(init_value, "init_value", upper=1.0)
    end_value = _check_value(end_value, "end_value", upper=1.0)
    if end_value < init_value:
        raise ValueError(
            f"Invalid end_value: {end_value} (must be >= init_value = {init_value} for a ramp)"
        )
    return Linear(init_value, end_value, transition_steps)


def inverse_time(init_value, kappa):
    """ε_k = ε_0 / (1 + k/κ), satisfies (8.12) and (8.13); see :class:`InverseTime`."""
    return InverseTime(init_value, kappa)


def step_decay(init_value, factor, every):
    """Multiply by ``factor`` every ``every`` steps; see :class:`StepDecay`."""
    return StepDecay(init_value, factor, every)


def exponential_decay(init_value, decay_rate, transition_steps=1):
    """ε_k = ε_0 γ^(k/n); see :class:`ExponentialDecay`."""
    return ExponentialDecay(init_value, decay_rate, transition_steps)


def cosine_decay(init_value, decay_steps, end_value=0.0):
    """Half-cosine to ``end_value`` over ``decay_steps``, then hold; see :class:`CosineDecay`."""
    return CosineDecay(init_value, decay_steps, end_value)


def warmup(schedule, warmup_steps, init_value=0.0):
    """Linear warm-up over ``warmup_steps``, then ``schedule`` from its step 0; see :class:`Warmup`."""
    return Warmup(schedule, warmup_steps, init_value)


def piecewise(schedules, boundaries):
    """Join schedules at ``boundaries``, each restarting at 0; see :class:`Piecewise`."""
    return Piecewise(schedules, boundaries)


def batch_size_schedule(init_size, factor=2.0, every=1000, max_size=None):
    """Integer minibatch sizes growing by ``factor`` every ``every`` steps; see :class:`BatchSizeSchedule`."""
    return BatchSizeSchedule(init_size, factor, every, max_size)


# --------------------------------------------------------------------------- Robbins–Monro
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


def robbins_monro(schedule, *, horizon=10**7):
    r"""Report whether ``schedule`` satisfies the sufficient conditions for SGD to converge.

    .. math::
        \sum_{k=1}^{\infty} \epsilon_k = \infty \quad (8.12), \qquad
        \sum_{k=1}^{\infty} \epsilon_k^2 < \infty \quad (8.13)

    The schedules of this module are answered in closed form (``method="analytic"``);
    warm-up and piecewise schedules are decided by their last, unending piece. Any other
    callable ``step -> float`` is examined numerically (``method="numeric"``): the terms
    are summed exactly up to step 2**14, then over geometric blocks ``[2^j, 2^(j+1))`` up
    to ``horizon`` by stratified sampling, and the growth of the block sums is fitted by
    a power law :math:`\epsilon_k \approx c\,k^{-p}` (the series diverges iff p <= 1).
    A numeric answer is an estimate: a finite horizon cannot tell, e.g., :math:`1/k`
    from :math:`1/k^{1.05}`, and periodic schedules may alias with the sampling.
    """
    if isinstance(schedule, Schedule):
        prefix = ""
        while True:
            known = schedule._robbins_monro()
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
        raise TypeError(f"schedule must be callable, got {type(schedule).__name__}")
    return _robbins_monro_numeric(schedule, horizon)


_EXACT_STEPS = 2**14
_SAMPLES_PER_BLOCK = 64


def _robbins_monro_numeric(schedule, horizon):
    horizon = _check_int(horizon, "horizon", 2 * _EXACT_STEPS)

    def term(k):
        v = float(schedule(k))
        if not math.isfinite(v) or v < 0.0:
            raise ValueError(f"schedule({k}) = {v}: a step size must be finite and >= 0")
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
            return False, f"{label}: the terms are 0 from step ~{starts[-1]} on (finite sum)"
        pos = [(j, b) for j, b in enumerate(tail) if b > 0.0]
        if len(pos) < 2:
            return False, f"{label}: the terms vanish over the last blocks (finite sum)"
        js = [j for j, _ in pos]
        ls = [math.log(b) for _, b in pos]
        mj, ml = sum(js) / len(js), sum(ls) / len(ls)
        slope = sum((j - mj) * (l - ml) for j, l in zip(js, ls)) / sum((j - mj) ** 2 for j in js)
        p = 1.0 - slope / math.log(2.0)  # block sums of c k^-p scale like 2^(j(1-p))
        diverges = p <= 1.1
        word = "diverges" if diverges else "converges"
        if p <= 0.05:
            return diverges, f"{label}: the terms do not decay at the horizon, so the sum {word}"
        return diverges, f"{label}: terms decay like k^-{p:.2f} at the horizon, so the sum {word}"

    div, text1 = classify(blocks_1, "Σ ε_k")
    sq_div, text2 = classify(blocks_2, "Σ ε_k²")
    conv = not sq_div
    explanation = (
        f"numeric estimate up to step {reach:,} (power-law fit of block sums over "
        f"[2^j, 2^(j+1)); a sum is called divergent when its terms decay no faster than "
        f"k^-1.1): {text1}; {text2}. This cannot prove convergence or divergence."
    )
    return RobbinsMonroReport(div, conv, div and conv, "numeric", explanation)


# --------------------------------------------------------------------------- minibatches
class MinibatchSampler:
    """Yield minibatch index arrays, epoch after epoch, with scheduled sizes.

    Each epoch draws a fresh permutation of ``range(n_samples)`` from the NumPy Generator,
    and cuts it into consecutive batches. The size of the batch number ``step`` (counted
    from 0 over the whole run, like the optimizer's step) is ``batch_size(step)``, where
    ``batch_size`` is an int, a :class:`BatchSizeSchedule`, or any callable
    ``step -> int``. A batch never spans two epochs: when fewer indices remain in the
    epoch than the scheduled size, the remainder is yielded as a smaller final batch
    (``drop_last=False``, the default; it still counts as a step) or discarded
    (``drop_last=True``; then a scheduled size above ``n_samples`` raises ValueError).
    With ``drop_last=False`` every epoch visits each sample exactly once.

    Yielded arrays are read-only ``int64`` views of the epoch's permutation. The sampler
    is infinite unless ``epochs`` is given. ``state_dict()`` (JSON-able) and
    ``load_state_dict()`` save and restore the generator state and position, so a
    resumed sampler yields exactly the batches an uninterrupted one would.
    """

    def __init__(self, n_samples, batch_size, rng=None, *, drop_last=False, epochs=None):
        self.n_samples = _check_int(n_samples, "n_samples", 1)
        if isinstance(batch_size, numbers.Integral) and not isinstance(batch_size, bool):
            batch_size = _check_int(batch_size, "batch_size", 1)
            if drop_last and batch_size > self.n_samples:
                raise ValueError(
                    f"Invalid batch_size: {batch_size} (must be <= n_samples = "
                    f"{self.n_samples} when drop_last=True)"
                )
        elif not callable(batch_size):
            raise TypeError("batch_size must be an int or a callable step -> int")
        self.batch_size = batch_size
        if rng is None or isinstance(rng, (numbers.Integral, np.random.SeedSequence)):
            rng = np.random.default_rng(rng)
        elif not isinstance(rng, np.random.Generator):
            raise TypeError("rng must be None, an int seed, or a numpy.random.Generator")
        self.rng = rng
        self.drop_last = bool(drop_last)
        self.epochs = None if epochs is None else _check_int(epochs, "epochs", 1)
        self.step = 0  # batches yielded so far
        self.epoch = 0  # epochs started so far
        self._perm = None  # permutation of the current epoch, None before it starts
        self._pos = 0
        self._epoch_rng_state = None

    def _size(self):
        bs = self.batch_size
        size = bs if isinstance(bs, int) else bs(self.step)
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
            raise ValueError(f"batch_size({self.step}) = {size!r}: must be an int >= 1")
        size = int(size)
        if self.drop_last and size > self.n_samples:
            raise ValueError(
                f"batch_size({self.step}) = {size} exceeds n_samples = {self.n_samples} "
                "with drop_last=True: no batch could ever be drawn"
            )
        return size

    def _new_epoch(self):
        if self.epochs is not None and self.epoch >= self.epochs:
            raise StopIteration
        self._epoch_rng_state = self.rng.bit_generator.state
        perm = self.rng.permutation(self.n_samples)
        perm.flags.writeable = False
        self._perm = perm
        self._pos = 0
        self.epoch += 1

    def __iter__(self):
        return self

    def __next__(self):
        size = self._size()
        while True:
            if self._perm is None or self._pos >= self.n_samples:
                self._perm = None
                self._new_epoch()
            remaining = self.n_samples - self._pos
            if remaining < size and self.drop_last:
                self._pos = self.n_samples  # discard the remainder; next epoch
                continue
            start = self._pos
            stop = start + min(size, remaining)
            self._pos = stop
            self.step += 1
            return self._perm[start:stop]

    def state_dict(self):
        """JSON-able state: generator state at the start of the epoch, and position."""
        started = self._perm is not None
        return {
            "n_samples": self.n_samples,
            "drop_last": self.drop_last,
            "step": self.step,
            "epoch": self.epoch,
            "position": self._pos if started else None,
            "rng_state": self._epoch_rng_state if started else self.rng.bit_generator.state,
        }

    def load_state_dict(self, state):
        """Restore a state written by :meth:`state_dict` (the epoch's permutation is redrawn)."""
        if state["n_samples"] != self.n_samples:
            raise ValueError(
                f"state is for n_samples = {state['n_samples']}, sampler has {self.n_samples}"
            )
        if bool(state["drop_last"]) != self.drop_last:
            raise ValueError("state was saved with a different drop_last")
        self.rng.bit_generator.state = state["rng_state"]
        self.step = _check_int(state["step"], "step", 0)
        if state["position"] is None:
            self._perm = None
            self._pos = 0
            self._epoch_rng_state = None
            self.epoch = _check_int(state["epoch"], "epoch", 0)
        else:
            self.epoch = _check_int(state["epoch"], "epoch", 1) - 1
            self._new_epoch()  # redraws the same permutation from the saved state
            self._pos = _check_int(state["position"], "position", 0)

    def __repr__(self):
        return (
            f"MinibatchSampler(n_samples={self.n_samples}, batch_size={self.batch_size!r}, "
            f"drop_last={self.drop_last}, epochs={self.epochs}, step={self.step}, "
            f"epoch={self.epoch})"
        )


def minibatches(n_samples, batch_size, rng=None, *, drop_last=False, epochs=None):
    """Minibatch index arrays of scheduled size, reshuffled each epoch; see :class:`MinibatchSampler`.

    >>> sampler = minibatches(1000, batch_size_schedule(32, factor=2, every=100), rng=0)
    >>> idx = next(sampler)          # 32 distinct indices in [0, 1000)
    """
    return MinibatchSampler(n_samples, batch_size, rng, drop_last=drop_last, epochs=epochs)
