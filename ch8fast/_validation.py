"""The argument checks of ch8fast: one vocabulary of constraints, one message style.

Every check runs once, before any array is written, and raises a TypeError (a value of the
wrong kind) or a ValueError (the right kind, a wrong value) whose message starts with the
argument's name and says what was expected, e.g. ``lr must be a finite number >= 0, got
-1.0``. A constraint is a callable ``check(value, name) -> checked value``; the numeric ones
also say whether a value survives rounding to a parameter dtype (``fits``).

The kinds: :class:`Real`, :class:`Integer`, :class:`Pair`, :class:`Flag`,
:class:`Exactly` (the hyperparameters of :mod:`ch8fast.rules`), :class:`OneOf` (a choice
of strings), :class:`Callable`, :class:`Generator` (a seed or a NumPy generator, returned
as a Generator) and :class:`FloatArray` (an array to be filled in place, as the
initializers fill them); the instances below name the common ones.

Arrays that reach a kernel are checked in the kernel module (``check_param``), so that the
classes, the functional layer and the clipping functions share one implementation and one
message for each rule an array must satisfy.
"""

import math
import numbers

import numpy as np

from ._isa import K

__all__ = ["FLOAT_DTYPES", "Real", "Integer", "Pair", "Flag", "Exactly", "Choice",
           "OneOf", "Callable", "Generator", "FloatArray", "check_param", "nonnegative",
           "positive", "finite", "unit_interval", "closed_unit", "betas_pair", "flag",
           "step_count", "count", "at_least_one", "generator", "function",
           "fillable_array"]

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_F32 = np.dtype(np.float32)
_F32_MAX = float(np.finfo(np.float32).max)
_F32_TINY = float(np.finfo(np.float32).smallest_subnormal)
_F32_ROUNDS_TO_0 = _F32_TINY / 2          # and below: rounds to 0 (ties to even)

check_param = K.check_param


def _kind(value):
    return type(value).__name__


class Real:
    """A real number (not a bool) in an interval; returns it as a Python float.

    ``lo``/``hi`` bound the interval, ``lo_open``/``hi_open`` exclude the bounds. NaN is
    refused; an infinite bound refuses infinities too (the interval is of finite numbers).
    """

    def __init__(self, lo=-math.inf, hi=math.inf, lo_open=False, hi_open=False, what=None):
        self.lo, self.hi, self.lo_open, self.hi_open = lo, hi, lo_open, hi_open
        self.what = what or self._describe()

    def _describe(self):
        if self.hi == math.inf:
            if self.lo == -math.inf:
                return "a finite number"
            return f"a finite number {'>' if self.lo_open else '>='} {self.lo:g}"
        left = "(" if self.lo_open else "["
        right = ")" if self.hi_open else "]"
        return f"in {left}{self.lo:g}, {self.hi:g}{right}"

    def __call__(self, value, name):
        v = value if type(value) is float else self._as_float(value, name)
        lo, hi = self.lo, self.hi
        if not ((v > lo if self.lo_open else v >= lo)
                and (v < hi if self.hi_open else v <= hi) and -math.inf < v < math.inf):
            if v != v:
                raise ValueError(f"{name} must not be NaN")
            raise ValueError(f"{name} must be {self.what}, got {v}")
        return v

    def _as_float(self, value, name):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a real number, got {_kind(value)}")
        try:
            return float(value)
        except OverflowError:
            raise ValueError(f"{name} must be {self.what}, got an integer too large for a "
                             f"float ({len(str(abs(int(value))))} digits)") from None

    def fits(self, value, name, dtype):
        """Refuse a checked ``value`` that the kernels, rounding it to ``dtype``, would turn
        into an infinity, or (for an interval open at 0) into 0."""
        if dtype != _F32 or value == 0.0:
            return
        a = abs(value)
        if a > _F32_MAX:
            raise ValueError(f"{name} is {value}, which overflows float32 (the dtype of "
                             f"these parameters); use |{name}| <= {_F32_MAX:.4g}")
        if a <= _F32_ROUNDS_TO_0 and self.lo_open and self.lo == 0.0:
            raise ValueError(f"{name} is {value}, which rounds to 0 in float32 (the dtype "
                             f"of these parameters); use {name} >= {_F32_TINY:.2g}")


class Integer:
    """An integer (not a bool) in [lo, hi] (``hi=None``: no upper bound); returns it as a
    Python int."""

    def __init__(self, lo, hi=None, what=None):
        self.lo, self.hi = lo, math.inf if hi is None else hi
        self.what = what or (f"an integer >= {lo}" if hi is None
                             else f"an integer in [{lo}, {hi}]")

    def __call__(self, value, name):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an integer, got {_kind(value)}")
        v = int(value)
        if not self.lo <= v <= self.hi:
            shown = v if abs(v) < 10 ** 30 else f"an integer of {len(str(abs(v)))} digits"
            raise ValueError(f"{name} must be {self.what}, got {shown}")
        return v

    def fits(self, value, name, dtype):
        pass


class Pair:
    """Two values, each checked by ``item`` (named ``name[0]`` and ``name[1]``); returns a
    tuple."""

    def __init__(self, item, what):
        self.item, self.what = item, what

    def __call__(self, value, name):
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            raise TypeError(f"{name} must be {self.what}, got {value!r}")
        return (self.item(value[0], f"{name}[0]"), self.item(value[1], f"{name}[1]"))

    def fits(self, value, name, dtype):
        self.item.fits(value[0], f"{name}[0]", dtype)
        self.item.fits(value[1], f"{name}[1]", dtype)


class Flag:
    """True or False (a Python or NumPy bool, nothing else: the string "False" is not
    false); returns a Python bool."""

    def __call__(self, value, name):
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{name} must be True or False, got {value!r}")
        return bool(value)

    def fits(self, value, name, dtype):
        pass


class Exactly:
    """One allowed value, e.g. AdamW's ``decoupled_weight_decay=True``."""

    def __init__(self, value, why):
        self.value, self.why = value, why

    def __call__(self, value, name):
        if not (type(value) is type(self.value) and value == self.value) \
                and not (isinstance(value, np.bool_) and bool(value) is self.value):
            raise ValueError(f"{name} must be {self.value!r} ({self.why}), got {value!r}")
        return self.value

    def fits(self, value, name, dtype):
        pass


class Choice:
    """One of a few strings (e.g. a formula profile's name); returns it. ``what`` says
    what they are, in messages."""

    def __init__(self, options, what=None):
        self.options, self.what = tuple(options), what

    def _expected(self):
        one_of = f"one of {list(self.options)}"
        return f"{self.what} ({one_of})" if self.what else one_of

    def __call__(self, value, name):
        if not isinstance(value, str):
            raise TypeError(f"{name} must be {self._expected()}, got {value!r}")
        if value not in self.options:
            raise ValueError(f"{name} must be {self._expected()}, got {value!r}")
        return value

    def fits(self, value, name, dtype):
        pass


class OneOf(Choice):
    """``Choice(options)`` written ``OneOf("a", "b")``, its message listing the options
    as ``one of 'a', 'b'``, e.g. ``mode`` of an initializer."""

    def __init__(self, *options):
        super().__init__(options)

    def _expected(self):
        return "one of " + ", ".join(repr(o) for o in self.options)


class Callable:
    """A callable, e.g. ``forward`` or ``loss_and_grad``; ``what`` says what it computes."""

    def __init__(self, what="a callable"):
        self.what = what

    def __call__(self, value, name):
        if not callable(value):
            raise TypeError(f"{name} must be {self.what}, got {_kind(value)}")
        return value


class Generator:
    """A source of random numbers, returned as a :class:`numpy.random.Generator`: None
    (fresh OS entropy), an int seed >= 0, a SeedSequence, a bit generator, or a Generator
    (returned as it is, so that the caller's generator advances)."""

    what = ("None, an int seed, a numpy.random.SeedSequence, a bit generator or a "
            "numpy.random.Generator")

    def __call__(self, value, name):
        if isinstance(value, np.random.Generator):
            return value
        kinds = (numbers.Integral, np.random.SeedSequence, np.random.BitGenerator)
        if isinstance(value, (bool, np.bool_)) or not (value is None
                                                      or isinstance(value, kinds)):
            raise TypeError(f"{name} must be {self.what}, got {_kind(value)}")
        if isinstance(value, numbers.Integral) and value < 0:
            raise ValueError(f"{name} must be an int seed >= 0, got {value}")
        return np.random.default_rng(value)


class FloatArray:
    """A NumPy array of dtype float32 or float64, writeable when ``writeable`` (it is to be
    filled in place); returns it (never a copy)."""

    def __init__(self, writeable=True):
        self.writeable = writeable

    def __call__(self, value, name):
        if not isinstance(value, np.ndarray):
            raise TypeError(f"{name} must be a numpy.ndarray of float32 or float64"
                            f"{' (it is filled in place)' if self.writeable else ''}, got "
                            f"{_kind(value)}")
        if value.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must have dtype float32 or float64, got {value.dtype}")
        if self.writeable and not value.flags.writeable:
            raise ValueError(f"{name} must be writeable (it is filled in place), got a "
                             f"read-only array")
        return value


nonnegative = Real(0.0, math.inf)
positive = Real(0.0, math.inf, lo_open=True)
unit_interval = Real(0.0, 1.0, hi_open=True)      # a decay rate or a momentum
closed_unit = Real(0.0, 1.0)                       # a weight, e.g. SGD's dampening
betas_pair = Pair(unit_interval, "a pair (beta1, beta2)")
flag = Flag()
# Step counts: Adam raises beta ** t, schedules take k; 2**62 steps is beyond any run and
# still an exact int64.
step_count = Integer(1, 2 ** 62, "an integer in [1, 2**62] (the number of this update)")
count = Integer(0, 2 ** 62, "an integer in [0, 2**62]")
at_least_one = Integer(1)
finite = Real()
generator = Generator()
function = Callable()
fillable_array = FloatArray(writeable=True)
