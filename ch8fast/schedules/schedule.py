r"""Hyperparameter schedules: pure ``step -> value`` functions (Deep Learning, 8.3.1-8.3.2).

A schedule is a small immutable object. Calling it with ``step`` returns the value of the
hyperparameter for that step; nothing else happens, so a schedule may be called any number
of times, in any order, and shared between optimizers. Every argument is checked once, at
construction, and a bad one raises :class:`ValueError` (or :class:`TypeError`) naming it,
e.g. ``kappa must be a finite number > 0, got -3.0``.

The step convention: ``step`` is an ``int >= 0`` that counts the optimizer updates already
*completed*: the first update of a run uses ``schedule(0)``, the second ``schedule(1)``,
and so on. The book's formulas, written with an iteration counter ``k``, are evaluated at
``step = k`` unchanged, so ``schedule(0)`` is the book's initial rate :math:`\epsilon_0`
and ``linear_decay(eps0, tau)(tau)`` is :math:`\epsilon_\tau`. (Algorithm 8.1 starts its
loop at ``k = 1``; its ``k``-th update therefore uses ``schedule(k - 1)``.)

Every schedule has a readable ``repr``, and ``to_dict()`` / :meth:`Schedule.from_dict`
convert it to and from plain JSON-able data for checkpoints.
"""
from __future__ import annotations

import bisect
import math
import numbers
from typing import Any, Dict, Optional, Sequence, Union

from .._validation import Real, at_least_one, nonnegative, positive

__all__ = [
    "Schedule",
    "AdemamixAlpha",
    "AdemamixBeta3",
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
    "ademamix_alpha",
    "ademamix_beta3",
]

# --------------------------------------------------------------------------- checks
_below_one = Real(0.0, 1.0, hi_open=True)          # a momentum coefficient
_decay_factor = Real(0.0, 1.0, lo_open=True)       # multiplies the value: in (0, 1]
_growth = Real(1.0, math.inf)                      # a batch size grows: >= 1
_open_unit = Real(0.0, 1.0, lo_open=True, hi_open=True)   # a decay rate with a half-life

ScheduleLike = Union["Schedule", float]


def _bad_step(step):
    raise ValueError(f"step must be an integer >= 0, got {step}")


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

    def to_dict(self) -> Dict[str, Any]:
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
    def from_dict(data: Dict[str, Any]) -> "Schedule":
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


# --------------------------------------------------------------------------- schedules
class Constant(Schedule):
    r"""A constant value.

    .. math::
        \epsilon_k = \epsilon \quad \text{for all } k \ge 0

    Robbins–Monro: fails (8.13) when ε > 0 (see :func:`robbins_monro`).
    """

    kind = "constant"
    _fields = ("value",)
    __slots__ = ("value",)

    def __init__(self, value: float):
        self.value = nonnegative(value, "value")

    def __call__(self, step: int) -> float:
        if step < 0:
            _bad_step(step)
        return self.value


class Linear(Schedule):
    r"""Linear interpolation from ``init_value`` to ``end_value``, then hold (book, 8.14).

    .. math::
        \epsilon_k = (1 - \alpha)\,\epsilon_0 + \alpha\,\epsilon_\tau,\quad
        \alpha = \frac{k}{\tau}\ \ (k \le \tau);\qquad \epsilon_k = \epsilon_\tau\ \ (k >
        \tau)

    with :math:`\epsilon_0` = ``init_value``, :math:`\epsilon_\tau` = ``end_value`` and
    :math:`\tau` = ``transition_steps``. ``end_value`` may be below (a decay, the book's
    learning-rate schedule) or above ``init_value`` (a ramp, e.g. for momentum).
    """

    kind = "linear"
    _fields = ("init_value", "end_value", "transition_steps")
    __slots__ = ("init_value", "end_value", "transition_steps")

    def __init__(self, init_value: float, end_value: float, transition_steps: int):
        init_value = nonnegative(init_value, "init_value")
        end_value = nonnegative(end_value, "end_value")
        transition_steps = at_least_one(transition_steps, "transition_steps")
        self.init_value = init_value
        self.end_value = end_value
        self.transition_steps = transition_steps

    def __call__(self, step: int) -> float:
        if step < 0:
            _bad_step(step)
        tau = self.transition_steps
        if step >= tau:
            return self.end_value
        alpha = step / tau
        return (1.0 - alpha) * self.init_value + alpha * self.end_value


class AdemamixAlpha(Schedule):
    r"""AdEMAMix's warm-up of ``alpha`` (Pagliardini et al. 2024): linear from 0 to
    ``alpha`` over ``warmup`` updates, then hold.

    .. math::
        \alpha_k = \alpha \min\Big(\frac{k + 1}{T}, 1\Big)

    with :math:`T` = ``warmup``: as the authors' code, which evaluates it at the update's
    number :math:`k + 1` (ch8fast's ``step`` :math:`k` counts the completed updates).
    """

    kind = "ademamix_alpha"
    _fields = ("alpha", "warmup")
    __slots__ = ("alpha", "warmup")

    def __init__(self, alpha: float, warmup: int):
        self.alpha = nonnegative(alpha, "alpha")
        self.warmup = at_least_one(warmup, "warmup")

    def __call__(self, step: int) -> float:
        if step < 0:
            _bad_step(step)
        k = step + 1
        if k >= self.warmup:
            return self.alpha
        a = k / float(self.warmup)
        return a * self.alpha


class AdemamixBeta3(Schedule):
    r"""AdEMAMix's warm-up of ``beta3`` (Pagliardini et al. 2024): from ``beta1`` to
    ``beta3`` over ``warmup`` updates, linear in the half-life
    :math:`f(\beta) = \ln(1/2) / \ln(\beta) - 1` (so the slow moment's memory grows
    steadily), then hold.

    .. math::
        \beta_{3,k} = f^{-1}\Big((1 - a) f(\beta_1) + a f(\beta_3)\Big), \quad
        a = \frac{k + 1}{T}, \quad f^{-1}(h) = 2^{-1/(h + 1)}

    with :math:`T` = ``warmup``, evaluated at the update's number :math:`k + 1` and with
    :math:`\ln(\beta + 10^{-8})` in :math:`f`, as the authors' code.
    """

    kind = "ademamix_beta3"
    _fields = ("beta3", "beta1", "warmup")
    __slots__ = ("beta3", "beta1", "warmup")

    def __init__(self, beta3: float, beta1: float, warmup: int):
        self.beta3 = _open_unit(beta3, "beta3")
        self.beta1 = _open_unit(beta1, "beta1")
        self.warmup = at_least_one(warmup, "warmup")

    def __call__(self, step: int) -> float:
        if step < 0:
            _bad_step(step)
        k = step + 1
        if k >= self.warmup:
            return self.beta3

        def half_life(beta):
            return math.log(0.5) / math.log(beta + 1e-8) - 1

        a = k / float(self.warmup)
        h = (1.0 - a) * half_life(self.beta1) + a * half_life(self.beta3)
        return math.pow(0.5, 1 / (h + 1))


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

    def __init__(self, init_value: float, kappa: float):
        self.init_value = nonnegative(init_value, "init_value")
        self.kappa = positive(kappa, "kappa")

    def __call__(self, step: int) -> float:
        if step < 0:
            _bad_step(step)
        return self.init_value / (1.0 + step / self.kappa)


class StepDecay(Schedule):
    r"""Piecewise-constant decay: multiply by ``factor`` every ``every`` steps.

    .. math::
        \epsilon_k = \epsilon_0\, \gamma^{\lfloor k / n \rfloor}

    with :math:`\gamma` = ``factor`` in (0, 1] and :math:`n` = ``every`` >= 1.
    """

    kind = "step_decay"
    _fields = ("init_value", "factor", "every")
    __slots__ = ("init_value", "factor", "every")

    def __init__(self, init_value: float, factor: float, every: int):
        self.init_value = nonnegative(init_value, "init_value")
        self.factor = _decay_factor(factor, "factor")
        self.every = at_least_one(every, "every")

    def __call__(self, step: int) -> float:
        if step < 0:
            _bad_step(step)
        return self.init_value * self.factor ** (step // self.every)


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

    def __init__(self, init_value: float, decay_rate: float, transition_steps: int = 1):
        self.init_value = nonnegative(init_value, "init_value")
        self.decay_rate = _decay_factor(decay_rate, "decay_rate")
        self.transition_steps = at_least_one(transition_steps, "transition_steps")

    def __call__(self, step: int) -> float:
        if step < 0:
            _bad_step(step)
        return self.init_value * self.decay_rate ** (step / self.transition_steps)


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

    def __init__(self, init_value: float, decay_steps: int, end_value: float = 0.0):
        self.init_value = nonnegative(init_value, "init_value")
        self.decay_steps = at_least_one(decay_steps, "decay_steps")
        self.end_value = nonnegative(end_value, "end_value")

    def __call__(self, step: int) -> float:
        if step < 0:
            _bad_step(step)
        if step >= self.decay_steps:
            return self.end_value
        c = 0.5 * (1.0 + math.cos(math.pi * step / self.decay_steps))
        return self.end_value + (self.init_value - self.end_value) * c


class Warmup(Schedule):
    r"""Linear warm-up over ``warmup_steps``, then ``schedule`` from its own step 0.

    .. math::
        \epsilon_k = \epsilon_{\text{init}} + (s(0) - \epsilon_{\text{init}})\,\frac{k}{w}
        \ \ (k < w);\qquad \epsilon_k = s(k - w)\ \ (k \ge w)

    where :math:`s` is ``schedule`` (a Schedule or a number) and :math:`w` =
    ``warmup_steps``.
    """

    kind = "warmup"
    _fields = ("schedule", "warmup_steps", "init_value")
    __slots__ = ("schedule", "warmup_steps", "init_value", "_target")

    def __init__(self, schedule: ScheduleLike, warmup_steps: int, init_value: float = 0.0):
        schedule = _as_schedule(schedule, "schedule")
        self.schedule = schedule
        self.warmup_steps = at_least_one(warmup_steps, "warmup_steps")
        self.init_value = nonnegative(init_value, "init_value")
        self._target = float(schedule(0))

    @classmethod
    def _from_config(cls, kwargs):
        kwargs = dict(kwargs)
        s = kwargs.get("schedule")
        if isinstance(s, dict):
            kwargs["schedule"] = Schedule.from_dict(s)
        return cls(**kwargs)

    def __call__(self, step: int) -> float:
        if step < 0:
            _bad_step(step)
        w = self.warmup_steps
        if step < w:
            return self.init_value + (self._target - self.init_value) * (step / w)
        return self.schedule(step - w)


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

    def __init__(self, schedules: Sequence[ScheduleLike], boundaries: Sequence[int]):
        if (isinstance(schedules, (Schedule, numbers.Real))
                or not hasattr(schedules, "__len__")):
            raise TypeError(f"schedules must be a sequence of Schedule objects or numbers, "
                            f"got {type(schedules).__name__}")
        schedules = tuple(_as_schedule(s, f"schedules[{i}]")
                          for i, s in enumerate(schedules))
        if len(schedules) == 0:
            raise ValueError("schedules must hold at least one schedule, got none")
        if not hasattr(boundaries, "__len__"):
            raise TypeError(f"boundaries must be a sequence of integers, got "
                            f"{type(boundaries).__name__}")
        boundaries = tuple(at_least_one(b, f"boundaries[{i}]")
                           for i, b in enumerate(boundaries))
        if len(boundaries) != len(schedules) - 1:
            raise ValueError(
                f"boundaries must hold {len(schedules) - 1} boundaries (one fewer than the "
                f"{len(schedules)} schedules), got {len(boundaries)}"
            )
        for i in range(1, len(boundaries)):
            if boundaries[i] <= boundaries[i - 1]:
                raise ValueError(
                    f"boundaries must be strictly increasing, got {list(boundaries)}"
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

    def __call__(self, step: int) -> float:
        if step < 0:
            _bad_step(step)
        i = bisect.bisect_right(self.boundaries, step)
        return self.schedules[i](step - self._starts[i])


class BatchSizeSchedule(Schedule):
    r"""An integer minibatch size that grows geometrically, up to an optional cap.

    .. math::
        m_k = \min\left(m_{\max},\ \operatorname{round}\left(m_0\, \rho^{\lfloor k/n
        \rfloor} \right)\right)

    with :math:`m_0` = ``init_size``, :math:`\rho` = ``factor`` >= 1, :math:`n` = ``every``
    and :math:`m_{\max}` = ``max_size`` (None: no cap). Growing the minibatch trades SGD's
    fast start for the lower gradient noise of larger batches (book, 8.3.1).
    """

    kind = "batch_size"
    _fields = ("init_size", "factor", "every", "max_size")
    __slots__ = ("init_size", "factor", "every", "max_size")

    def __init__(self, init_size: int, factor: float = 2.0, every: int = 1000,
                 max_size: Optional[int] = None):
        init_size = at_least_one(init_size, "init_size")
        factor = _growth(factor, "factor")
        every = at_least_one(every, "every")
        if max_size is not None:
            max_size = at_least_one(max_size, "max_size")
            if max_size < init_size:
                raise ValueError(
                    f"max_size must be >= init_size ({init_size}), got {max_size}"
                )
        self.init_size = init_size
        self.factor = factor
        self.every = every
        self.max_size = max_size

    def __call__(self, step: int) -> int:
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


# --------------------------------------------------------------------------- factories
def constant(value: float) -> Constant:
    """A constant schedule (see :class:`Constant`)."""
    return Constant(value)


def ademamix_alpha(alpha: float, warmup: int) -> AdemamixAlpha:
    """AdEMAMix's ``alpha`` warm-up: linear from 0 over ``warmup`` updates; see
    :class:`AdemamixAlpha`. Pass it as ``AdEMAMix(..., alpha=ademamix_alpha(5.0, T))``."""
    return AdemamixAlpha(alpha, warmup)


def ademamix_beta3(beta3: float, beta1: float, warmup: int) -> AdemamixBeta3:
    """AdEMAMix's ``beta3`` warm-up from ``beta1``, linear in the half-life over ``warmup``
    updates; see :class:`AdemamixBeta3`."""
    return AdemamixBeta3(beta3, beta1, warmup)


def linear(init_value: float, end_value: float, transition_steps: int) -> Linear:
    """Linear from ``init_value`` to ``end_value`` over ``transition_steps``, then hold.

    Decreasing or increasing; see :class:`Linear`.
    """
    return Linear(init_value, end_value, transition_steps)


def linear_decay(init_value: float, transition_steps: int,
                 end_value: Optional[float] = None) -> Linear:
    r"""The book's learning-rate schedule (8.14): decay linearly until step τ, then hold.

    .. math::
        \epsilon_k = (1 - \alpha)\,\epsilon_0 + \alpha\,\epsilon_\tau,\quad \alpha = k/\tau
        \ \ (k \le \tau);\qquad \epsilon_k = \epsilon_\tau\ \ (k > \tau)

    ``end_value`` (:math:`\epsilon_\tau`) defaults to 1 % of ``init_value``, the book's rule
    of thumb, and must not exceed it. The book suggests τ of a few hundred passes over
    the training set. ``linear_decay(e0, tau)(k)`` is the book's :math:`\epsilon_k`.
    """
    init_value = nonnegative(init_value, "init_value")
    if end_value is None:
        end_value = 0.01 * init_value
    end_value = nonnegative(end_value, "end_value")
    if end_value > init_value:
        raise ValueError(
            f"end_value must be <= init_value ({init_value}) for a decay (linear() makes a "
            f"ramp), got {end_value}"
        )
    return Linear(init_value, end_value, transition_steps)


def momentum_ramp(init_value: float = 0.5, end_value: float = 0.9,
                  transition_steps: int = 1000) -> Linear:
    r"""Raise the momentum coefficient α linearly, then hold (book, 8.3.2).

    .. math::
        \alpha_k = (1 - k/\tau)\,\alpha_0 + (k/\tau)\,\alpha_\tau\ \ (k \le \tau);\qquad
        \alpha_k = \alpha_\tau\ \ (k > \tau)

    "Start small, raise it later": both values must lie in [0, 1), and ``end_value`` must
    not be below ``init_value``. Returns a :class:`Linear`.
    """
    init_value = _below_one(init_value, "init_value")
    end_value = _below_one(end_value, "end_value")
    if end_value < init_value:
        raise ValueError(
            f"end_value must be >= init_value ({init_value}) for a ramp, got {end_value}"
        )
    return Linear(init_value, end_value, transition_steps)


def inverse_time(init_value: float, kappa: float) -> InverseTime:
    """ε_k = ε_0 / (1 + k/κ), satisfies (8.12) and (8.13); see :class:`InverseTime`."""
    return InverseTime(init_value, kappa)


def step_decay(init_value: float, factor: float, every: int) -> StepDecay:
    """Multiply by ``factor`` every ``every`` steps; see :class:`StepDecay`."""
    return StepDecay(init_value, factor, every)


def exponential_decay(init_value: float, decay_rate: float,
                      transition_steps: int = 1) -> ExponentialDecay:
    """ε_k = ε_0 γ^(k/n); see :class:`ExponentialDecay`."""
    return ExponentialDecay(init_value, decay_rate, transition_steps)


def cosine_decay(init_value: float, decay_steps: int,
                 end_value: float = 0.0) -> CosineDecay:
    """Half-cosine to ``end_value`` over ``decay_steps``, then hold; see
    :class:`CosineDecay`."""
    return CosineDecay(init_value, decay_steps, end_value)


def warmup(schedule: ScheduleLike, warmup_steps: int, init_value: float = 0.0) -> Warmup:
    """Linear warm-up over ``warmup_steps``, then ``schedule`` from its step 0.

    See :class:`Warmup`.
    """
    return Warmup(schedule, warmup_steps, init_value)


def piecewise(schedules: Sequence[ScheduleLike], boundaries: Sequence[int]) -> Piecewise:
    """Join schedules at ``boundaries``, each restarting at 0; see :class:`Piecewise`."""
    return Piecewise(schedules, boundaries)


def batch_size_schedule(init_size: int, factor: float = 2.0, every: int = 1000,
                        max_size: Optional[int] = None) -> BatchSizeSchedule:
    """Integer minibatch sizes growing by ``factor`` every ``every`` steps.

    See :class:`BatchSizeSchedule`.
    """
    return BatchSizeSchedule(init_size, factor, every, max_size)
