r"""The update rules: one specification each, the only place a rule is described.

A :class:`Rule` holds everything about one optimizer's update rule: its name, the book's
equation numbers and ``.. math::`` block, its hyperparameters (default, check, meaning),
which of them are fixed when the optimizer is made (they decide the state arrays), the
names of its state arrays and their initial values, the kernel it runs, and the function
that turns checked hyperparameters into the kernel's scalars, which it sets by name on a
:class:`ch8fast.rules.Scalars` (the one quantity that changes with the step count by
itself, Adam's bias correction, the kernel folds in from the optimizer's step counter:
``bias_correction``). The optimizer classes
(:mod:`ch8fast.optim`), the functional layer (:mod:`ch8fast.functional`), the benchmark
and the tests all read these specifications; none restates a default or a check.

>>> from ch8fast import rules
>>> rules.ADAM.defaults()["betas"]
(0.9, 0.999)
>>> h = dict(rules.ADAM.defaults(), lr=0.001)
>>> s = rules.ADAM.scalars_for(h)
>>> round(s.kernel_values(t=1)["lr"], 6)   # lr / (1 - beta1^1): the bias correction
0.01
"""

import inspect
from dataclasses import dataclass, field

import numpy as np

from ._isa import K
from ._points import AveragePoint, InterimPoint, average_weight, warmup_factor
from ._validation import (Choice, Exactly, Real, betas_pair, closed_unit, count, flag,
                          nonnegative, positive, unit_interval)

__all__ = ["Hyper", "Rule", "Profile", "Scalars", "GradPlan", "SGD", "ADAGRAD", "RMSPROP",
           "ADAM", "ADAMW", "ADADELTA", "LION", "ADOPT", "ADEMAMIX", "SCHEDULE_FREE_SGD",
           "SCHEDULE_FREE_ADAMW", "LAMB", "LARS", "PARAM", "ALL", "CONVENTIONS",
           "average_weight", "warmup_factor"]

Scalars = K.Scalars
GradPlan = K.GradPlan


@dataclass(frozen=True)
class Hyper:
    """One hyperparameter: its default, its check (``check(value, name) -> value``, with
    ``check.fits(value, name, dtype)``), a line of documentation, and whether it is fixed
    when the optimizer is made (it then decides the state arrays or their initial values,
    cannot be scheduled and cannot change later)."""

    default: object
    check: object
    doc: str
    fixed: bool = False
    in_signature: bool = True


@dataclass(frozen=True)
class Profile:
    """One library's formulas for one rule (``convention=`` of the optimizers): data that
    the rule's scalars function reads.

    Attributes:
        library: what it reproduces, e.g. ``"torch.optim.Adam"``.
        switches: the kernel switches it turns on, by the name of their
            :class:`Scalars` field: ``fma`` (torch's operation sequence, fused
            multiply-adds included), ``torch_fused`` (torch's fused CPU kernels: their
            scalar-tail rule and square root), ``buffer`` (the momentum buffer
            b = mu b + (1 - dampening) g with lr outside it, state ``momentum_buffer``),
            ``eps_inside`` (delta inside the square root), ``eps_hat`` (Adam: delta added
            to sqrt(r) before the bias correction).
        nesterov: ``"shifted"`` (the arrays hold the book's interim point, see
            :class:`ch8fast.SGD`) or ``"lookahead"`` (the arrays hold the library's theta:
            theta + alpha v' - lr g, or theta - lr (g + mu b) with the buffer).
        weight_decay: ``"l2"`` (added to the gradient) or ``"decoupled"``
            (theta <- theta (1 - lr wd) first, in every rule, as Keras).
        lr_float32: the learning rate is rounded to float32 first (Keras keeps it in a
            float32 variable).
        lr_ahead: schedule-free: the average's weight reads the learning rate (and warm-up)
            of the next update, the step this one's (optax counts the wrapper's updates
            from 1, its base optimizer's from 0).
    """

    library: str
    switches: frozenset = frozenset()
    nesterov: str = "shifted"
    weight_decay: str = "l2"
    lr_float32: bool = False
    lr_ahead: bool = False

    @property
    def buffer(self):
        return "buffer" in self.switches


# The kernel switches a profile may turn on (every other one is off).
_SWITCHES = ("fma", "torch_fused", "buffer", "eps_inside", "eps_hat")


@dataclass(frozen=True)
class Rule:
    """The specification of one update rule (see the module docstring).

    Attributes:
        name: the optimizer class name, e.g. ``"Adam"``.
        summary: one line.
        math: the ``.. math::`` block, with the book's equation numbers.
        notes: how other libraries differ, and other remarks (reStructuredText).
        hyper: name -> :class:`Hyper`, in constructor order.
        state: ``state(h) -> tuple of state names`` from the group's hyperparameters as
            given when the optimizer is made (a schedule still a callable).
        state_doc: what each state array holds.
        initial: state name -> ``f(h) -> fill value`` (default 0), or :data:`PARAM`: a
            copy of the parameter's values when its state is made.
        kernel: ``kernel(state names) -> kernel rule name`` (see ``RULES`` of the kernel
            module).
        kinds: state name -> "signed" (a moment or a velocity) or "square" (an
            accumulator of squares): how compressed storage rounds it
            (:mod:`ch8fast.storage`).
        state_formats: the state formats this rule supports (:data:`STATE_FORMATS`), and
            ``state_format_note`` why it lacks the others.
        state_shape: ``state_shape(name, shape, h) -> shape`` of a state array for a
            parameter of ``shape`` (None: the parameter's shape).
        scalars: ``scalars(s, h, h_next)``: set the fields of the :class:`Scalars` ``s``
            from the checked hyperparameters ``h`` of this update (and ``h_next``, those
            of the following update, which places the next Nesterov interim point).
        structure: ``structure(h, state names, where)``: checks that involve several
            hyperparameters; ``where(name)`` names one in a message.
        profiles: convention name -> :class:`Profile`, the libraries whose formulas this
            rule can follow (``"book"`` first).
        point: where the optimizer keeps the parameter arrays between steps, a subclass
            of :class:`ch8fast._points.Point` (None: theta itself). Nesterov momentum's
            shifted form keeps the interim point (:class:`ch8fast._points.InterimPoint`).
    """

    name: str
    summary: str
    math: str
    hyper: dict
    state: object
    state_doc: str
    kernel: object
    scalars: object
    kinds: dict = field(default_factory=dict)
    state_shape: object = None
    initial: dict = field(default_factory=dict)
    structure: object = None
    notes: str = ""
    state_formats: tuple = ("float32", "bfloat16", "q8")
    state_format_note: str = ""
    profiles: dict = field(default_factory=dict)
    point: object = None

    # ---- reading the specification ------------------------------------------------------

    def defaults(self):
        """``{name: default}`` of every hyperparameter."""
        return {k: h.default for k, h in self.hyper.items()}

    def fixed(self):
        """The names of the hyperparameters fixed when the optimizer is made."""
        return tuple(k for k, h in self.hyper.items() if h.fixed)

    def signature_parameters(self):
        """The hyperparameters as :class:`inspect.Parameter` s (positional or keyword, in
        order, with their defaults), for the optimizer's signature."""
        return [inspect.Parameter(k, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                  default=h.default)
                for k, h in self.hyper.items() if h.in_signature]

    def check(self, name, value, where):
        """``value`` of hyperparameter ``name``, checked (a schedule must be called
        first)."""
        return self.hyper[name].check(value, where)

    def check_all(self, values, where, dtypes=(), state=None):
        """Check every hyperparameter of ``values`` (a complete dict of plain values), that
        each survives rounding to ``dtypes``, then the checks that involve several, against
        the state names ``state`` (default: those these values make). Returns the checked
        dict. ``where(name)`` names a hyperparameter in messages."""
        out = {k: h.check(values[k], where(k)) for k, h in self.hyper.items()}
        self.check_dtypes(out, where, dtypes)
        if self.structure is not None:
            self.structure(out, self.state(out) if state is None else state, where)
        return out

    def check_dtypes(self, values, where, dtypes):
        for dt in dtypes:
            for k, h in self.hyper.items():
                h.check.fits(values[k], where(k), dt)

    @property
    def trust_ratio(self):
        """Whether the rule scales each parameter array by a ratio of its norms (LAMB,
        LARS): two passes, no row-sparse steps, float32/float64 parameters."""
        return K.TRUST[self.kernel(self.state(self.defaults()))]

    def profile(self, h):
        """The :class:`Profile` of hyperparameters ``h`` (their ``convention``)."""
        return self.profiles[h["convention"]]

    def shifted(self, h):
        """Whether the arrays of a group with (fixed) hyperparameters ``h`` hold the
        interim point of the shifted Nesterov form between steps."""
        return bool(h.get("nesterov")) and self.profile(h).nesterov == "shifted"

    def ahead(self, h):
        """The hyperparameters whose value at the *next* update this update reads: the
        momentum, in the shifted Nesterov form (it places the next interim point), and the
        learning rate of the optax form of schedule-free methods (the average's weight); no
        other schedule is evaluated a step early."""
        return (("momentum",) if self.shifted(h) else ()) + (
            ("lr",) if self.profile(h).lr_ahead else ())

    def scalars_for(self, h, h_next=None):
        """A new :class:`Scalars` for checked hyperparameters ``h``, for the state layout
        these hyperparameters make."""
        s = Scalars(self.kernel(self.state(h)))
        self.scalars(s, h, h if h_next is None else h_next)
        return s

    # ---- documentation ------------------------------------------------------------------

    def docstring(self, options_doc=""):
        """The optimizer class's docstring: summary, the math, notes, the arguments and the
        state."""
        args = "\n".join(f"    {k}: {h.doc}" for k, h in self.hyper.items()
                         if h.in_signature)
        parts = [self.summary, self.math.strip("\n"), self.notes.strip("\n"),
                 "Args:\n    params: a sequence of C-contiguous float32, float64, "
                 "float16 or\n        bfloat16 arrays, updated in place, or of dicts "
                 "(param groups) with\n        "
                 "``\"params\"`` and their own hyperparameters.\n" + args
                 + ("\n" + options_doc if options_doc else ""),
                 self.state_doc.strip("\n")]
        return "\n\n".join(p for p in parts if p) + "\n"


def _has_velocity(h):
    """A momentum schedule, or a momentum other than 0, keeps a velocity."""
    m = h["momentum"]
    return callable(m) or m != 0


def _velocity_name(rule_profiles, h):
    """``"momentum_buffer"`` for the profiles with torch's buffer, else ``"velocity"``."""
    return "momentum_buffer" if rule_profiles[h["convention"]].buffer else "velocity"


def _keeps_velocity(state):
    return "velocity" in state or "momentum_buffer" in state


def _momentum_structure(rule_profiles):
    def check(h, state, where):
        if h["nesterov"] and not _keeps_velocity(state):
            raise ValueError(f"{where('nesterov')}: Nesterov momentum needs momentum > 0")
        if not _keeps_velocity(state) and h["momentum"] != 0:
            raise ValueError(f"{where('momentum')}: this group was made without momentum, "
                             f"so it keeps no velocity; make the optimizer with momentum > "
                             f"0 or a momentum schedule")
        damp = h.get("dampening", 0.0)
        if damp != 0 and not rule_profiles[h["convention"]].buffer:
            raise ValueError(f"{where('dampening')}: dampening weighs the gradient in a "
                             f"momentum buffer (convention 'torch' or 'optax'); convention "
                             f"{h['convention']!r} keeps the book's velocity")
        if damp != 0 and h["nesterov"]:
            raise ValueError(f"{where('dampening')}: Nesterov momentum needs dampening 0")
    return check


def _convention(rule_profiles):
    names = tuple(rule_profiles)
    doc = ("whose formulas to follow: " + ", ".join(
        f"``{k!r}`` ({p.library})" for k, p in rule_profiles.items())
        + "; fixed when the optimizer is made.")
    return Hyper("book", Choice(names, "a formula convention"), doc, fixed=True)


_MAXIMIZE = Hyper(False, flag, "ascend: the gradient's sign is flipped first (as torch's "
                               "``maximize``).")


_DECOUPLED = Hyper(False, flag, "scale theta by 1 - lr * weight_decay before the step "
                                "instead of adding an L2 term (as AdamW); fixed when the "
                                "optimizer is made.", fixed=True)


def _decoupled_scalars(s, h):
    """``decoupled_weight_decay``: theta <- theta (1 - lr wd) first, no L2 term."""
    if h["decoupled_weight_decay"]:
        s.decay = 1.0 - s.lr * s.wd
        s.l2 = False


def _common_scalars(s, h, prof):
    """The fields every rule sets: the profile's switches, the step size, the weight
    decay (L2 term or decoupled factor) and the gradient's sign."""
    for k in _SWITCHES:
        setattr(s, k, k in prof.switches)
    lr = h["lr"]
    if prof.lr_float32:
        lr = float(np.float32(lr))
    s.lr = lr
    s.wd = h["weight_decay"]
    if prof.weight_decay == "decoupled":
        s.decay = 1.0 - lr * s.wd
        s.l2 = False
    else:
        s.decay = 1.0
        s.l2 = s.wd != 0.0
    s.maximize = h["maximize"]


#: ``Rule.initial`` value of a state array that starts as a copy of its parameter
PARAM = "param"

_LR = "the learning rate epsilon, a number >= 0 or a schedule ``step -> lr``."
_WD = "L2 penalty coefficient: ``weight_decay * theta`` is added to the gradient."
_MOMENTUM = ("alpha in [0, 1), or a schedule. 0 keeps no velocity (a schedule, even one "
             "starting at 0, allocates one).")
_NESTEROV = "use Nesterov momentum (needs momentum); fixed when the optimizer is made."


# ---------------------------------------------------------------------------------------
# SGD, momentum, Nesterov momentum (8.3.1-8.3.3)
# ---------------------------------------------------------------------------------------

def _momentum_scalars(s, h, h_next, prof):
    s.alpha = h["momentum"]
    s.damp = 1.0 - h.get("dampening", 0.0)
    s.nesterov = h["nesterov"] and prof.nesterov == "shifted"
    s.lookahead = h["nesterov"] and prof.nesterov == "lookahead"
    # the shifted Nesterov form places the next interim point with the next momentum
    s.alpha_next = h_next["momentum"] if s.nesterov else s.alpha
    s.alpha_prev = s.alpha


_BOOK = Profile("the book, ch8fast's default")
_TORCH_SGD = Profile("torch.optim.SGD", frozenset({"fma", "buffer"}), nesterov="lookahead")
_SGD_PROFILES = {
    "book": _BOOK,
    "torch": _TORCH_SGD,
    "torch_fused": Profile("torch.optim.SGD(fused=True)",
                           frozenset({"fma", "buffer", "torch_fused"}),
                           nesterov="lookahead"),
    "optax": Profile("optax.sgd", frozenset({"buffer"}), nesterov="lookahead"),
    "keras": Profile("keras.optimizers.SGD", nesterov="lookahead", weight_decay="decoupled",
                     lr_float32=True),
    "sklearn": Profile("sklearn.neural_network's SGD solver", nesterov="lookahead"),
}


def _sgd_scalars(s, h, h_next):
    prof = _SGD_PROFILES[h["convention"]]
    _common_scalars(s, h, prof)
    _momentum_scalars(s, h, h_next, prof)


SGD = Rule(
    name="SGD",
    summary="Stochastic gradient descent, with optional momentum and Nesterov momentum.",
    math=r"""
.. math::

    \theta \leftarrow \theta - \epsilon_k g                 \quad\text{(Algorithm 8.1)}

    v \leftarrow \alpha v - \epsilon g, \qquad
    \theta \leftarrow \theta + v                           \quad\text{(8.15, 8.16)}
""",
    notes=r"""
With ``nesterov=True`` the gradient is taken at the interim point
:math:`\tilde\theta = \theta + \alpha v` (Algorithm 8.3, 8.21-8.22). ``step(grads)`` uses
the fused shifted form: between steps the arrays hold :math:`\phi = \theta + \alpha v`
(equal to theta before the first step), and one pass computes
:math:`v' = \alpha v - \epsilon g,\ \phi' = \phi - \alpha v + (1 + \alpha') v'` with
:math:`\alpha'` the next step's momentum. Read theta with ``theta()`` or ``at_theta()``.
``step(closure=fn)`` runs the literal algorithm; the arrays then hold theta between
steps. Setting ``momentum`` by hand between steps moves the arrays at once to the new
interim point :math:`\theta + \alpha_{new} v`, so that the next gradient is taken there.

torch.optim.SGD keeps ``momentum_buffer`` = -v / lr at a constant lr, and its Nesterov
parameters are ch8fast's raw arrays (phi), not ``theta()``. ``convention="torch"`` (or
``"optax"``) follows it: the state is that ``momentum_buffer``
b <- momentum b + (1 - dampening) g, theta <- theta - lr b, and Nesterov momentum moves
theta by -lr (g + momentum b), the arrays holding the library's theta (also with
``"keras"`` and ``"sklearn"``: theta + momentum v' - lr g).
""",
    hyper={
        "lr": Hyper(1e-2, nonnegative, _LR),
        "momentum": Hyper(0.0, unit_interval, _MOMENTUM),
        "nesterov": Hyper(False, flag, _NESTEROV, fixed=True),
        "weight_decay": Hyper(0.0, nonnegative, _WD),
        "dampening": Hyper(0.0, closed_unit,
                           "tau in [0, 1]: the buffer takes (1 - tau) g (conventions with "
                           "a momentum buffer: 'torch', 'optax')."),
        "maximize": _MAXIMIZE,
        "convention": _convention(_SGD_PROFILES),
    },
    state=lambda h: (_velocity_name(_SGD_PROFILES, h),) if _has_velocity(h) else (),
    state_doc="State per parameter: ``velocity`` (v), with momentum (``momentum_buffer`` "
              "(b) with the conventions that keep torch's buffer).",
    kinds={"velocity": "signed", "momentum_buffer": "signed"},
    kernel=lambda state: "momentum" if _keeps_velocity(state) else "sgd",
    scalars=_sgd_scalars,
    structure=_momentum_structure(_SGD_PROFILES),
    profiles=_SGD_PROFILES,
    point=InterimPoint,
)


# ---------------------------------------------------------------------------------------
# AdaGrad (Algorithm 8.4)
# ---------------------------------------------------------------------------------------

_ADAGRAD_PROFILES = {
    "book": _BOOK,
    "torch": Profile("torch.optim.Adagrad", frozenset({"fma"})),
    "torch_fused": Profile("torch.optim.Adagrad(fused=True)",
                           frozenset({"fma", "torch_fused"})),
    "optax": Profile("optax.adagrad", frozenset({"eps_inside"})),
    "keras": Profile("keras.optimizers.Adagrad", frozenset({"eps_inside"}),
                     weight_decay="decoupled", lr_float32=True),
}


def _adagrad_scalars(s, h, h_next):
    _common_scalars(s, h, _ADAGRAD_PROFILES[h["convention"]])
    s.eps = h["eps"]
    s.lr_decay = h["lr_decay"]


ADAGRAD = Rule(
    name="AdaGrad",
    summary="AdaGrad (Algorithm 8.4): per-parameter rates scaled by the accumulated "
            "squares.",
    math=r"""
.. math::

    r \leftarrow r + g \odot g, \qquad
    \theta \leftarrow \theta - \frac{\epsilon}{\delta + \sqrt{r}} \odot g
""",
    notes=r"""
``eps`` is the book's delta, *outside* the root (default 1e-7), as in torch.optim.Adagrad
(default 1e-10); optax.adagrad and Keras add it inside the root (``convention="optax"``,
``"keras"``) and start the accumulator at 0.1. ``lr_decay`` d divides the step size by
1 + (t - 1) d at update t, as torch's.
""",
    hyper={
        "lr": Hyper(1e-2, nonnegative, _LR),
        "eps": Hyper(1e-7, positive, "delta, added to sqrt(r); > 0."),
        "weight_decay": Hyper(0.0, nonnegative, _WD),
        "initial_accumulator_value": Hyper(0.0, nonnegative,
                                           "r at the start; fixed when the optimizer is "
                                           "made.", fixed=True),
        "rowwise": Hyper(False, flag,
                         "one accumulator per row (its first axis) of each parameter of 2 "
                         "or more dimensions, the mean of the squared row gradient "
                         "(row-wise AdaGrad, for embedding tables: state divided by the "
                         "row length); fixed when the optimizer is made.", fixed=True),
        "lr_decay": Hyper(0.0, nonnegative, "d: update t steps lr / (1 + (t - 1) d)."),
        "maximize": _MAXIMIZE,
        "convention": _convention(_ADAGRAD_PROFILES),
    },
    state=lambda h: ("sum",),
    state_doc="State per parameter: ``sum`` (r; with ``rowwise``, one per row).",
    kinds={"sum": "square"},
    state_shape=lambda name, shape, h: (shape[:1] if h["rowwise"] and len(shape) >= 2
                                        else shape),
    initial={"sum": lambda h: h["initial_accumulator_value"]},
    kernel=lambda state: "adagrad",
    scalars=_adagrad_scalars,
    profiles=_ADAGRAD_PROFILES,
)


# ---------------------------------------------------------------------------------------
# RMSProp (Algorithm 8.5), with momentum and Nesterov momentum (Algorithm 8.6)
# ---------------------------------------------------------------------------------------

_RMSPROP_PROFILES = {
    "book": Profile("the book, ch8fast's default", frozenset({"eps_inside"})),
    "torch": Profile("torch.optim.RMSprop", frozenset({"fma", "buffer"}),
                     nesterov="lookahead"),
    "optax": Profile("optax.rmsprop", frozenset({"eps_inside"}), nesterov="lookahead"),
    "keras": Profile("keras.optimizers.RMSprop", frozenset({"eps_inside"}),
                     nesterov="lookahead", weight_decay="decoupled", lr_float32=True),
}


def _rmsprop_scalars(s, h, h_next):
    prof = _RMSPROP_PROFILES[h["convention"]]
    _common_scalars(s, h, prof)
    _momentum_scalars(s, h, h_next, prof)
    s.rho = h["rho"]
    s.eps = h["eps"]
    s.centered = h["centered"]


def _rmsprop_state(h):
    names = ("square_avg",)
    if _has_velocity(h):
        names += (_velocity_name(_RMSPROP_PROFILES, h),)
    return names + ("grad_avg",) if h["centered"] else names


RMSPROP = Rule(
    name="RMSProp",
    summary="RMSProp (Algorithm 8.5), with optional momentum and Nesterov momentum "
            "(Algorithm 8.6).",
    math=r"""
.. math::

    r \leftarrow \rho r + (1 - \rho) g \odot g, \qquad
    \theta \leftarrow \theta - \frac{\epsilon}{\sqrt{\delta + r}} \odot g
""",
    notes=r"""
With momentum: :math:`v \leftarrow \alpha v - \frac{\epsilon}{\sqrt{\delta + r}} \odot g,
\ \theta \leftarrow \theta + v`; with ``nesterov=True`` the gradient is taken at
:math:`\theta + \alpha v` (Algorithm 8.6), in the same two forms as :class:`ch8fast.SGD`.

``eps`` is the book's delta, *inside* the root (default 1e-6); Algorithm 8.6 writes no
delta, and ch8fast keeps it there too so that r = 0 is safe. optax.rmsprop also adds it
inside (1e-8); torch.optim.RMSprop adds it outside (1e-8, ``convention="torch"``), keeps
lr outside its momentum buffer, and calls rho ``alpha`` (default 0.99).
``centered=True`` divides by the root of r - gbar^2, gbar the running average of the
gradient (Graves 2013), as torch's, optax's and Keras's ``centered``.
""",
    hyper={
        "lr": Hyper(1e-3, nonnegative, _LR),
        "rho": Hyper(0.9, unit_interval, "the decay rate of the average of squares, in "
                                         "[0, 1)."),
        "eps": Hyper(1e-6, positive, "delta, inside the square root; > 0."),
        "momentum": Hyper(0.0, unit_interval, _MOMENTUM),
        "nesterov": Hyper(False, flag, _NESTEROV, fixed=True),
        "weight_decay": Hyper(0.0, nonnegative, _WD),
        "centered": Hyper(False, flag, "divide by sqrt(r - gbar^2) (keeps ``grad_avg``, "
                                       "gbar); fixed when the optimizer is made.",
                          fixed=True),
        "maximize": _MAXIMIZE,
        "convention": _convention(_RMSPROP_PROFILES),
    },
    state=_rmsprop_state,
    state_doc="State per parameter: ``square_avg`` (r), ``velocity`` (v) with momentum "
              "(``momentum_buffer`` with ``convention='torch'``), and ``grad_avg`` when "
              "centered.",
    kinds={"square_avg": "square", "velocity": "signed", "momentum_buffer": "signed",
           "grad_avg": "signed"},
    kernel=lambda state: "rmsprop_momentum" if _keeps_velocity(state) else "rmsprop",
    scalars=_rmsprop_scalars,
    structure=_momentum_structure(_RMSPROP_PROFILES),
    profiles=_RMSPROP_PROFILES,
    point=InterimPoint,
)


# ---------------------------------------------------------------------------------------
# Adam (Algorithm 8.7), AdamW
# ---------------------------------------------------------------------------------------

_ADAM_PROFILES = {
    "book": _BOOK,
    "torch": Profile("torch.optim.Adam / AdamW", frozenset({"fma"})),
    "torch_fused": Profile("torch.optim.Adam / AdamW (fused=True)",
                           frozenset({"fma", "torch_fused"})),
    "optax": Profile("optax.adam / adamw"),
    "keras": Profile("keras.optimizers.Adam / AdamW", frozenset({"eps_hat"}),
                     weight_decay="decoupled", lr_float32=True),
    "sklearn": Profile("sklearn.neural_network's adam solver; torch.optim.SparseAdam",
                       frozenset({"eps_hat"})),
}


def _adam_scalars(s, h, h_next):
    prof = _ADAM_PROFILES[h["convention"]]
    _common_scalars(s, h, prof)
    s.beta1, s.beta2 = h["betas"]
    # The kernel folds in the bias corrections of update t (from the step counter): the
    # step size lr / (1 - beta1^t) and c2 = 1 / sqrt(1 - beta2^t), so that
    # theta <- theta - step_size * s / (sqrt(r) * c2 + delta).
    s.bias_correction = True
    s.eps = h["eps"]
    s.amsgrad = h["amsgrad"]
    _decoupled_scalars(s, h)


def _adam_structure(h, state, where):
    if (_ADAM_PROFILES[h["convention"]].weight_decay == "decoupled"
            and h["weight_decay"] != 0 and not h["decoupled_weight_decay"]):
        raise ValueError(f"{where('weight_decay')}: convention {h['convention']!r} decays "
                         f"decoupled (it has no L2 term); pass decoupled_weight_decay=True "
                         f"or use AdamW")


_ADAM_HYPER = {
    "lr": Hyper(1e-3, nonnegative, _LR),
    "betas": Hyper((0.9, 0.999), betas_pair, "(rho1, rho2), the decay rates of the two "
                                             "moments, each in [0, 1)."),
    "eps": Hyper(1e-8, positive, "delta, added to sqrt(r_hat); > 0."),
    "weight_decay": Hyper(0.0, nonnegative,
                          "L2 coefficient added to the gradient, or with "
                          "``decoupled_weight_decay`` the decoupled decay rate."),
    "amsgrad": Hyper(False, flag, "divide by the running maximum of r (Reddi et al.); "
                                  "fixed when the optimizer is made.", fixed=True),
    "decoupled_weight_decay": _DECOUPLED,
    "maximize": _MAXIMIZE,
    "convention": _convention(_ADAM_PROFILES),
}

_ADAM_STATE_DOC = ("The step count t is kept per param group; state per parameter: "
                   "``exp_avg`` (s), ``exp_avg_sq`` (r), and ``max_exp_avg_sq`` with "
                   "AMSGrad.")


_ADAM_KINDS = {"exp_avg": "signed", "exp_avg_sq": "square", "max_exp_avg_sq": "square"}


def _adam_state(h):
    names = ("exp_avg", "exp_avg_sq")
    return names + ("max_exp_avg_sq",) if h["amsgrad"] else names


ADAM = Rule(
    name="Adam",
    summary="Adam (Algorithm 8.7), with bias correction; AMSGrad and decoupled decay "
            "optional.",
    math=r"""
.. math::

    t \leftarrow t + 1, \quad
    s \leftarrow \rho_1 s + (1 - \rho_1) g, \quad
    r \leftarrow \rho_2 r + (1 - \rho_2) g \odot g

    \hat s = \frac{s}{1 - \rho_1^t}, \quad \hat r = \frac{r}{1 - \rho_2^t}, \quad
    \theta \leftarrow \theta - \epsilon \frac{\hat s}{\sqrt{\hat r} + \delta}
""",
    notes=r"""
``eps`` is delta, outside the root (default 1e-8, as in torch.optim.Adam and optax.adam;
Keras uses 1e-7; scikit-learn adds it before the bias correction). ``weight_decay`` adds
an L2 term to the gradient; with ``decoupled_weight_decay=True`` (or :class:`ch8fast.AdamW`)
theta is first scaled by 1 - lr * weight_decay instead (Loshchilov & Hutter); when
lr * weight_decay > 1 that factor is negative and flips theta's sign every step, as in
torch.optim.AdamW. ``amsgrad=True`` divides by the running maximum of r (Reddi et al.).
Keras and scikit-learn add delta to sqrt(r) before the bias correction
(``convention="keras"``, ``"sklearn"``: step lr sqrt(1 - rho2^t) / (1 - rho1^t) times
s / (sqrt(r) + delta)), and so does torch.optim.SparseAdam: lazy Adam on row-sparse
gradients with ``convention="sklearn"`` equals SparseAdam to rounding, the default does
not (:doc:`sparse`).
""",
    hyper=_ADAM_HYPER,
    state=_adam_state,
    state_doc=_ADAM_STATE_DOC,
    kinds=_ADAM_KINDS,
    kernel=lambda state: "adam",
    scalars=_adam_scalars,
    structure=_adam_structure,
    profiles=_ADAM_PROFILES,
)

ADAMW = Rule(
    name="AdamW",
    summary="Adam with decoupled weight decay (Loshchilov & Hutter, 2019).",
    math=r"""
.. math::

    \theta \leftarrow \theta (1 - \epsilon \lambda), \text{ then the Adam step of
    Algorithm 8.7}
""",
    notes=r"""
Default ``weight_decay`` 1e-2, as in torch.optim.AdamW (optax.adamw: 1e-4). When
lr * weight_decay > 1 the factor 1 - lr * weight_decay is negative and flips theta's sign
every step (torch does the same).
""",
    hyper=dict(_ADAM_HYPER,
               weight_decay=Hyper(1e-2, nonnegative, "the decoupled decay rate lambda."),
               decoupled_weight_decay=Hyper(True, Exactly(True, "AdamW decays decoupled"),
                                            "always True for AdamW.", fixed=True,
                                            in_signature=False)),
    state=_adam_state,
    state_doc=_ADAM_STATE_DOC,
    kinds=_ADAM_KINDS,
    kernel=lambda state: "adam",
    scalars=_adam_scalars,
    structure=_adam_structure,
    profiles=_ADAM_PROFILES,
)


# ---------------------------------------------------------------------------------------
# AdaDelta (Zeiler 2012; named in 8.5.4)
# ---------------------------------------------------------------------------------------

_ADADELTA_PROFILES = {
    "book": _BOOK,
    "torch": Profile("torch.optim.Adadelta", frozenset({"fma"})),
    "optax": Profile("optax.adadelta (with a learning rate)"),
    "keras": Profile("keras.optimizers.Adadelta", weight_decay="decoupled",
                     lr_float32=True),
}


def _adadelta_scalars(s, h, h_next):
    _common_scalars(s, h, _ADADELTA_PROFILES[h["convention"]])
    s.rho = h["rho"]
    s.eps = h["eps"]


ADADELTA = Rule(
    name="AdaDelta",
    summary="AdaDelta (Zeiler 2012; named in section 8.5.4).",
    math=r"""
.. math::

    E[g^2] \leftarrow \rho E[g^2] + (1-\rho) g^2, \quad
    \Delta\theta = -\frac{\sqrt{E[\Delta\theta^2] + \delta}}{\sqrt{E[g^2] + \delta}} g

    E[\Delta\theta^2] \leftarrow \rho E[\Delta\theta^2] + (1-\rho)\Delta\theta^2, \quad
    \theta \leftarrow \theta + \epsilon \Delta\theta
""",
    notes=r"""
``lr`` (epsilon) scales the step and defaults to 1, which is Zeiler's rule; the
accumulated update E[dtheta^2] is of the unscaled step, as in torch.optim.Adadelta.
Defaults rho = 0.95, eps = 1e-6 are Zeiler's (torch: rho 0.9).
""",
    hyper={
        "lr": Hyper(1.0, nonnegative, _LR),
        "rho": Hyper(0.95, unit_interval, "the decay rate of both averages, in [0, 1)."),
        "eps": Hyper(1e-6, positive, "delta, inside both square roots; > 0."),
        "weight_decay": Hyper(0.0, nonnegative, _WD),
        "maximize": _MAXIMIZE,
        "convention": _convention(_ADADELTA_PROFILES),
    },
    state=lambda h: ("square_avg", "acc_delta"),
    state_doc="State per parameter: ``square_avg`` (E[g^2]), ``acc_delta`` "
              "(E[dtheta^2]).",
    kinds={"square_avg": "square", "acc_delta": "square"},
    state_formats=("float32", "bfloat16"),
    state_format_note=("its step is the ratio of two accumulated averages, "
                       "sqrt(E[dtheta^2] + delta) / sqrt(E[g^2] + delta), so the errors of "
                       "two 8-bit codes multiply into every step instead of averaging out"),
    kernel=lambda state: "adadelta",
    scalars=_adadelta_scalars,
    profiles=_ADADELTA_PROFILES,
)

# ---------------------------------------------------------------------------------------
# Lion (Chen et al. 2023): a rule from after the book
# ---------------------------------------------------------------------------------------

_LION_PROFILES = {
    "book": Profile("Chen et al. 2023, as optax.lion", weight_decay="decoupled"),
    "optax": Profile("optax.lion", weight_decay="decoupled"),
    "keras": Profile("keras.optimizers.Lion", weight_decay="decoupled", lr_float32=True),
}


def _lion_scalars(s, h, h_next):
    _common_scalars(s, h, _LION_PROFILES[h["convention"]])
    s.beta1, s.beta2 = h["betas"]


LION = Rule(
    name="Lion",
    summary="Lion, the sign of an interpolated momentum (Chen et al. 2023, \"Symbolic "
            "Discovery of Optimization Algorithms\").",
    math=r"""
.. math::

    c = \beta_1 m + (1 - \beta_1) g, \quad
    \theta \leftarrow \theta - \epsilon\,(\operatorname{sign}(c) + \lambda \theta),
    \quad m \leftarrow \beta_2 m + (1 - \beta_2) g
""",
    notes=r"""
Every coordinate moves by exactly ``lr`` (or not at all), so Lion's learning rate is
typically 3-10 times smaller than Adam's, and its weight decay as many times larger (the
paper's advice). The weight decay is decoupled: theta is scaled by 1 - lr * weight_decay
first, as optax.lion and keras.optimizers.Lion do. Keras keeps the learning rate in
float32 (``convention="keras"`` rounds it so too; ``"optax"`` is the paper's, the
default). ``sign(0) = 0``. Steps of zero gradient
still move theta, so there is no closed-form catch-up (``sparse="catch_up"`` is refused;
lazy row-sparse updates work).
""",
    hyper={
        "lr": Hyper(1e-4, nonnegative, _LR),
        "betas": Hyper((0.9, 0.99), betas_pair,
                       "(beta1, beta2): beta1 interpolates the update's direction, beta2 "
                       "is the decay of the momentum; each in [0, 1)."),
        "weight_decay": Hyper(0.0, nonnegative, "decoupled decay rate lambda: theta is "
                                                "scaled by 1 - lr * lambda first."),
        "maximize": _MAXIMIZE,
        "convention": _convention(_LION_PROFILES),
    },
    state=lambda h: ("exp_avg",),
    state_doc="State per parameter: ``exp_avg`` (m).",
    kinds={"exp_avg": "signed"},
    kernel=lambda state: "lion",
    scalars=_lion_scalars,
    profiles=_LION_PROFILES,
)

# ---------------------------------------------------------------------------------------
# ADOPT (Taniguchi et al. 2024): Adam with the previous step's second moment
# ---------------------------------------------------------------------------------------

_ADOPT_PROFILES = {
    "book": Profile("Taniguchi et al. 2024, as optax.contrib.adopt", nesterov="lookahead"),
    "optax": Profile("optax.contrib.adopt", nesterov="lookahead"),
}


def _adopt_scalars(s, h, h_next):
    _common_scalars(s, h, _ADOPT_PROFILES[h["convention"]])
    s.beta1, s.beta2 = h["betas"]
    s.eps = h["eps"]
    s.first_fills_v = True
    s.bounded = h["use_clipping"]
    s.clip_exponent = h["clip_exponent"]
    s.lookahead = h["nesterov"]
    _decoupled_scalars(s, h)


ADOPT = Rule(
    name="ADOPT",
    summary="ADOPT, Adam normalized by the previous step's second moment (Taniguchi et al. "
            "2024, \"ADOPT: Modified Adam Can Converge with Any beta2 with the Optimal "
            "Rate\").",
    math=r"""
.. math::

    t \leftarrow t + 1, \quad
    u = \operatorname{clip}\Big(\frac{g}{\max(\sqrt{v}, \delta)},\ (t - 1)^{1/4}\Big),
    \quad m \leftarrow \beta_1 m + (1 - \beta_1) u

    \theta \leftarrow \theta - \epsilon\, m, \quad
    v \leftarrow \beta_2 v + (1 - \beta_2)\, g \odot g

and the first update only sets :math:`v \leftarrow g \odot g`.
""",
    notes=r"""
Unlike Adam, the gradient is divided by the second moment of the *previous* steps before
it enters the momentum, which is what lets ADOPT converge for any beta2 (the paper's
Theorem); no bias correction is needed. The first update sets v to g*g and leaves m (and
so theta, from fresh state). ``use_clipping`` clamps the normalized gradient to
[-(t - 1)^p, (t - 1)^p] with ``p = clip_exponent`` (the paper's stabilizer for early
steps, default 1/4, as optax.contrib.adopt and the authors' code). ``nesterov=True`` is
optax's: theta moves by lr (beta1 m + (1 - beta1) u). ``weight_decay`` adds an L2 term
to the gradient (before v and the normalization); with ``decoupled_weight_decay=True``
theta is scaled by 1 - lr * weight_decay first (the authors' ``decouple``). Steps of zero
gradient still move theta by lr m, so there is no closed-form catch-up
(``sparse="catch_up"`` is refused; lazy row-sparse updates work).
""",
    hyper={
        "lr": Hyper(1e-3, nonnegative, _LR),
        "betas": Hyper((0.9, 0.9999), betas_pair,
                       "(beta1, beta2): the decay rates of the momentum and of the second "
                       "moment, each in [0, 1) (the paper: 0.9, 0.9999)."),
        "eps": Hyper(1e-6, positive, "delta: the gradient is divided by max(sqrt(v), "
                                     "delta); > 0."),
        "weight_decay": Hyper(0.0, nonnegative,
                              "L2 coefficient added to the gradient, or with "
                              "``decoupled_weight_decay`` the decoupled decay rate."),
        "use_clipping": Hyper(True, flag, "clamp the normalized gradient to "
                                          "(t - 1)^clip_exponent at update t."),
        "clip_exponent": Hyper(0.25, closed_unit, "p of the clipping bound (t - 1)^p, in "
                                                  "[0, 1]."),
        "nesterov": Hyper(False, flag, "optax's Nesterov form of the update; fixed when "
                                       "the optimizer is made.", fixed=True),
        "decoupled_weight_decay": _DECOUPLED,
        "maximize": _MAXIMIZE,
        "convention": _convention(_ADOPT_PROFILES),
    },
    state=lambda h: ("exp_avg", "exp_avg_sq"),
    state_doc="The step count t is kept per param group; state per parameter: ``exp_avg`` "
              "(m) and ``exp_avg_sq`` (v).",
    kinds={"exp_avg": "signed", "exp_avg_sq": "square"},
    kernel=lambda state: "adopt",
    scalars=_adopt_scalars,
    profiles=_ADOPT_PROFILES,
)

# ---------------------------------------------------------------------------------------
# AdEMAMix (Pagliardini et al. 2024): Adam with a second, slow first moment
# ---------------------------------------------------------------------------------------

_ADEMAMIX_PROFILES = {
    "book": Profile("Pagliardini et al. 2024, as optax.contrib.ademamix",
                    weight_decay="decoupled"),
    "optax": Profile("optax.contrib.ademamix", weight_decay="decoupled"),
}


def _ademamix_scalars(s, h, h_next):
    _common_scalars(s, h, _ADEMAMIX_PROFILES[h["convention"]])
    s.beta1, s.beta2 = h["betas"]
    s.beta3 = h["beta3"]
    s.mix = h["alpha"]
    s.eps = h["eps"]
    s.bias_correction = True


ADEMAMIX = Rule(
    name="AdEMAMix",
    summary="AdEMAMix, Adam with a mixture of a fast and a slow first moment (Pagliardini "
            "et al. 2024, \"The AdEMAMix Optimizer: Better, Faster, Older\").",
    math=r"""
.. math::

    t \leftarrow t + 1, \quad
    s \leftarrow \beta_1 s + (1 - \beta_1) g, \quad
    s_{\text{slow}} \leftarrow \beta_3 s_{\text{slow}} + (1 - \beta_3) g, \quad
    r \leftarrow \beta_2 r + (1 - \beta_2) g \odot g

    \theta \leftarrow \theta - \epsilon \Big(\frac{\hat s + \alpha\, s_{\text{slow}}}
    {\sqrt{\hat r} + \delta} + \lambda \theta\Big), \quad
    \hat s = \frac{s}{1 - \beta_1^t}, \ \hat r = \frac{r}{1 - \beta_2^t}
""",
    notes=r"""
The slow moment (``beta3`` close to 1: its half-life is thousands of steps) keeps old
gradients in the update, and is not bias-corrected: early in training it is small, and
the paper warms ``alpha`` and ``beta3`` up over the run's first steps, which
:func:`ch8fast.schedules.ademamix_alpha` and :func:`ch8fast.schedules.ademamix_beta3` do
(pass them as ``alpha=`` and ``beta3=``). Defaults: betas (0.9, 0.999), beta3 0.9999,
alpha 5 (optax.contrib.ademamix; the paper uses 5 to 8 for language models). The weight
decay is decoupled, multiplied by the learning rate (optax's and the paper's). As for Adam,
``sparse="catch_up"`` decays the three moments over the skipped steps but does not move
theta by them (that has no closed form).
""",
    hyper={
        "lr": Hyper(1e-3, nonnegative, _LR),
        "betas": Hyper((0.9, 0.999), betas_pair,
                       "(beta1, beta2): the decay rates of the fast first moment and of "
                       "the second moment, each in [0, 1)."),
        "beta3": Hyper(0.9999, unit_interval, "the decay rate of the slow first moment, in "
                                              "[0, 1), or a schedule (see "
                                              ":func:`ch8fast.schedules.ademamix_beta3`)."),
        "alpha": Hyper(5.0, nonnegative, "the weight of the slow moment, >= 0, or a "
                                         "schedule (see "
                                         ":func:`ch8fast.schedules.ademamix_alpha`)."),
        "eps": Hyper(1e-8, positive, "delta, added to sqrt(r_hat); > 0."),
        "weight_decay": Hyper(0.0, nonnegative, "decoupled decay rate lambda: theta is "
                                                "scaled by 1 - lr * lambda first."),
        "maximize": _MAXIMIZE,
        "convention": _convention(_ADEMAMIX_PROFILES),
    },
    state=lambda h: ("exp_avg_fast", "exp_avg_slow", "exp_avg_sq"),
    state_doc="The step count t is kept per param group; state per parameter: "
              "``exp_avg_fast`` (s), ``exp_avg_slow`` (s_slow) and ``exp_avg_sq`` (r), as "
              "the authors' code names them.",
    kinds={"exp_avg_fast": "signed", "exp_avg_slow": "signed", "exp_avg_sq": "square"},
    kernel=lambda state: "ademamix",
    scalars=_ademamix_scalars,
    profiles=_ADEMAMIX_PROFILES,
)

# ---------------------------------------------------------------------------------------
# Schedule-free SGD and AdamW (Defazio et al. 2024): no schedule, an average of iterates
# ---------------------------------------------------------------------------------------

_SCHEDULE_FREE_PROFILES = {
    "book": Profile("Defazio et al. 2024, as the authors' SGDScheduleFree and "
                    "AdamWScheduleFree"),
    "optax": Profile("optax.contrib.schedule_free_sgd and schedule_free_adamw",
                     lr_ahead=True),
}

_SF_MATH = r"""
.. math::

    y_t = \beta x_t + (1 - \beta) z_t, \quad
    z_{t+1} = z_t - \epsilon_t\, u(y_t), \quad
    x_{t+1} = (1 - c_{t+1})\, x_t + c_{t+1} z_{t+1}, \quad
    c_{t+1} = \frac{w_{t+1}}{\sum_{i \le t+1} w_i}, \
    w_i = i^{\,r} \max_{j \le i} \epsilon_j^{\,p}
"""

_SF_NOTES = r"""
The gradient is taken at :math:`y`, between the plain iterate :math:`z` and the running
average :math:`x` of the :math:`z`'s, each weighted by the largest learning rate so far to
the power ``weight_lr_power`` (p). The average replaces the decaying schedule: the
learning rate stays constant after an optional linear warm-up over ``warmup_steps``
updates (:math:`\epsilon_t = \epsilon \min(1, t / T_w)`), and the run's length need not be
known. The parameter arrays hold :math:`y`; the state holds :math:`z` (a copy of the
parameters at the start); :math:`x`, the point to evaluate and save, is
:math:`(y - (1 - \beta) z) / \beta`: ``opt.theta()`` returns it and ``with
opt.at_theta():`` puts it in the arrays for a block (the ``eval()`` and ``train()`` of the
authors' PyTorch optimizers). The running weight sum and largest learning rate are kept per
param group (in ``state_dict()`` as ``weight_sum`` and ``lr_max``). ``beta`` is fixed when
the optimizer is made (the arrays' y is placed with it). The weight decay is evaluated at
:math:`y`, as the authors' code and optax do. Steps of zero gradient still move y towards
z, so there is no closed-form catch-up (``sparse="catch_up"`` is refused; lazy row-sparse
updates work). z is the sequence the parameters are averaged from, so it is kept as
precisely as the parameters: no compressed state formats.

The authors' code and optax differ in one place: optax's step at update t (from 1) takes
the learning rate of t - 1 (its base optimizer counts from 0: the warm-up's first step is
0) while the average's weight takes that of t; the authors' take t for both.
``convention="optax"`` follows optax (the learning rate, scheduled or warmed up, is read a
step ahead for the weight); ``"book"`` the authors'. Without a warm-up or schedule the two
are the same.
"""

_SF_HYPER = {
    "weight_decay": Hyper(0.0, nonnegative, "``weight_decay * y`` is added to the update "
                                            "direction u (evaluated at y)."),
    "warmup_steps": Hyper(0, count, "the learning rate rises linearly to ``lr`` over this "
                                    "many updates (0: none)."),
    "r": Hyper(0.0, nonnegative, "the average weighs update i by i^r as well (0: "
                                 "uniformly)."),
    "weight_lr_power": Hyper(2.0, nonnegative, "p: the average weighs each update by the "
                                               "largest learning rate so far to this power "
                                               "(2, the paper's; 0: uniformly)."),
    "maximize": _MAXIMIZE,
    "convention": _convention(_SCHEDULE_FREE_PROFILES),
}

_SF_BETA = Real(0.0, 1.0, lo_open=True, hi_open=True)


def _schedule_free_scalars(s, h, h_next, beta):
    """The fields of both schedule-free rules: ``lr`` and ``ck`` are this step's, which
    the rule's point (:class:`ch8fast._points.AveragePoint`) sets before each step."""
    _common_scalars(s, h, _SCHEDULE_FREE_PROFILES[h["convention"]])
    s.alpha = beta


def _sf_sgd_scalars(s, h, h_next):
    _schedule_free_scalars(s, h, h_next, h["momentum"])


SCHEDULE_FREE_SGD = Rule(
    name="ScheduleFreeSGD",
    summary="Schedule-free SGD (Defazio et al. 2024, \"The Road Less Scheduled\"): "
            "gradients at an interpolation of the iterate and its average, no schedule.",
    math=_SF_MATH + r"""
with :math:`u(y) = \nabla J(y) + \lambda y`, in one pass over y, z and g:
:math:`y \leftarrow y + c (z - y) + \epsilon (\beta (1 - c) - 1)\, u`,
:math:`z \leftarrow z - \epsilon u`.
""",
    notes=_SF_NOTES + r"""
Defaults: lr 1, momentum (beta) 0.9, as the authors' ``SGDScheduleFree`` and
``optax.contrib.schedule_free_sgd``.
""",
    hyper={
        "lr": Hyper(1.0, nonnegative, _LR),
        "momentum": Hyper(0.9, _SF_BETA, "beta, the interpolation y = beta x + (1 - beta) "
                                         "z, in (0, 1); fixed when the optimizer is made.",
                          fixed=True),
        **_SF_HYPER,
    },
    state=lambda h: ("z",),
    state_doc="The step count, the weight sum and the largest learning rate so far are "
              "kept per param group; state per parameter: ``z``.",
    kinds={"z": "signed"},
    initial={"z": PARAM},
    state_formats=("float32",),
    state_format_note="its state z is the sequence the parameters are averaged from",
    kernel=lambda state: "schedule_free_sgd",
    scalars=_sf_sgd_scalars,
    profiles=_SCHEDULE_FREE_PROFILES,
    point=AveragePoint,
)


def _sf_adamw_scalars(s, h, h_next):
    beta, s.beta2 = h["betas"]
    _schedule_free_scalars(s, h, h_next, beta)
    s.beta1 = 0.0                  # bias_correction: lr / (1 - 0^t) = lr, c2 from beta2
    s.bias_correction = True
    s.eps = h["eps"]


def _sf_adamw_structure(h, state, where):
    if h["betas"][0] == 0.0:
        raise ValueError(f"{where('betas')}[0] must be in (0, 1): x = (y - (1 - beta) z) / "
                         f"beta, got 0.0")


SCHEDULE_FREE_ADAMW = Rule(
    name="ScheduleFreeAdamW",
    summary="Schedule-free AdamW (Defazio et al. 2024, \"The Road Less Scheduled\"): "
            "Adam's normalization without its momentum, at an interpolation of the iterate "
            "and its average, no schedule.",
    math=_SF_MATH + r"""
with :math:`r \leftarrow \beta_2 r + (1 - \beta_2)\, g \odot g`,
:math:`u = g / (\sqrt{r / (1 - \beta_2^t)} + \delta) + \lambda y` and
:math:`\beta = \beta_1`, in one pass over y, z, r and g.
""",
    notes=_SF_NOTES + r"""
Defaults: lr 0.0025, betas (0.9, 0.999), eps 1e-8, as the authors' ``AdamWScheduleFree``
and ``optax.contrib.schedule_free_adamw``.
""",
    hyper={
        "lr": Hyper(0.0025, nonnegative, _LR),
        "betas": Hyper((0.9, 0.999), betas_pair,
                       "(beta1, beta2): beta1 is beta, the interpolation y = beta x + "
                       "(1 - beta) z, in (0, 1); beta2 the decay of the second moment, in "
                       "[0, 1); fixed when the optimizer is made.", fixed=True),
        "eps": Hyper(1e-8, positive, "delta, added to sqrt(r_hat); > 0."),
        **_SF_HYPER,
    },
    state=lambda h: ("z", "exp_avg_sq"),
    state_doc="The step count, the weight sum and the largest learning rate so far are "
              "kept per param group; state per parameter: ``z`` and ``exp_avg_sq`` (r).",
    kinds={"z": "signed", "exp_avg_sq": "square"},
    initial={"z": PARAM},
    state_formats=("float32",),
    state_format_note="its state z is the sequence the parameters are averaged from",
    kernel=lambda state: "schedule_free_adamw",
    scalars=_sf_adamw_scalars,
    structure=_sf_adamw_structure,
    profiles=_SCHEDULE_FREE_PROFILES,
    point=AveragePoint,
)

# ---------------------------------------------------------------------------------------
# LAMB and LARS: a trust ratio per tensor (You et al. 2017, 2020)
# ---------------------------------------------------------------------------------------

_TRUST_NOTE = r"""
The ratio is computed per parameter array, once per step, from sums of squares in fixed
blocks added in order: the same bits for any number of threads. A group made with
``exclude_1d=True`` leaves its arrays of fewer than 2 dimensions (biases, normalization
scales) out of the ratio and the weight decay, as the papers' and optax's masks usually
do. Two passes over the
arrays (the first updates the state and sums the norms, the second applies the step).
Row-sparse gradients are refused (the ratio is of the whole tensor), as are 16-bit
parameters and compressed state for now, and :class:`ch8fast.distributed.DataParallel`
(it updates one flat buffer, which would make one ratio for the whole model).
"""

_EXCLUDE_1D = Hyper(False, flag, "parameters of the group with fewer than 2 dimensions "
                                 "(biases, normalization scales) take neither the trust "
                                 "ratio nor the weight decay; fixed when the optimizer is "
                                 "made.", fixed=True)

_LAMB_PROFILES = {
    "book": Profile("You et al. 2020, as optax.lamb"),
    "optax": Profile("optax.lamb"),
    "keras": Profile("keras.optimizers.Lamb", weight_decay="decoupled", lr_float32=True),
}


def _lamb_scalars(s, h, h_next):
    prof = _LAMB_PROFILES[h["convention"]]
    _common_scalars(s, h, prof)
    s.l2 = False                 # (the book's decay is in u, after the normalization)
    if prof.weight_decay == "decoupled":
        s.wd = 0.0               # (Keras: theta (1 - lr wd) first, none in u)
    s.beta1, s.beta2 = h["betas"]
    s.eps = h["eps"]
    s.bias_correction = True
    s.corrected_lr = True        # lr stays; s_hat = s c1
    s.trust, s.trust_eps = 1.0, 0.0


LAMB = Rule(
    name="LAMB",
    summary="LAMB, Adam's direction scaled per tensor by a trust ratio (You et al. 2020, "
            "\"Large Batch Optimization for Deep Learning: Training BERT in 76 minutes\").",
    math=r"""
.. math::

    s \leftarrow \beta_1 s + (1 - \beta_1) g, \quad
    r \leftarrow \beta_2 r + (1 - \beta_2) g \odot g, \quad
    u = \frac{\hat s}{\sqrt{\hat r} + \delta} + \lambda \theta

    \theta \leftarrow \theta - \epsilon\, \frac{\|\theta\|}{\|u\|}\, u
    \quad \text{per parameter array (ratio 1 where either norm is 0)}
""",
    notes=_TRUST_NOTE + r"""
Defaults: betas (0.9, 0.999), eps 1e-6, weight decay 0, as optax.lamb (whose formulas
these are: its ``scale_by_trust_ratio`` with coefficient 1 and no epsilon).
``convention="keras"`` is keras.optimizers.Lamb's: its weight decay is decoupled,
theta (1 - lr wd) first, and the ratio is of that theta and of u without the decay; the
learning rate is rounded to float32 (Keras keeps it in a float32 variable).
""",
    hyper={
        "lr": Hyper(1e-3, nonnegative, _LR),
        "betas": Hyper((0.9, 0.999), betas_pair,
                       "(beta1, beta2): the moments' decay rates, each in [0, 1)."),
        "eps": Hyper(1e-6, positive, "delta, added to sqrt(r_hat); > 0."),
        "weight_decay": Hyper(0.0, nonnegative, "lambda: ``lambda * theta`` is added to "
                                                "the normalized direction u."),
        "exclude_1d": _EXCLUDE_1D,
        "maximize": _MAXIMIZE,
        "convention": _convention(_LAMB_PROFILES),
    },
    state=lambda h: ("exp_avg", "exp_avg_sq"),
    state_doc="The step count t is kept per param group; state per parameter: ``exp_avg`` "
              "(s) and ``exp_avg_sq`` (r).",
    kinds={"exp_avg": "signed", "exp_avg_sq": "square"},
    state_formats=("float32",),
    state_format_note="its per-tensor norms run on float32/float64 state only",
    kernel=lambda state: "lamb",
    scalars=_lamb_scalars,
    profiles=_LAMB_PROFILES,
)

_LARS_PROFILES = {"book": Profile("You et al. 2017, as optax.lars", nesterov="lookahead")}


def _lars_scalars(s, h, h_next):
    prof = _LARS_PROFILES[h["convention"]]
    _common_scalars(s, h, prof)
    s.l2 = True                  # u = g + wd theta (also when wd is 0: the same u)
    _momentum_scalars(s, h, h_next, prof)
    s.trust, s.trust_eps = h["trust_coefficient"], h["eps"]


LARS = Rule(
    name="LARS",
    summary="LARS, momentum SGD scaled per tensor by a trust ratio (You, Gitman & Ginsburg "
            "2017, \"Large Batch Training of Convolutional Networks\").",
    math=r"""
.. math::

    u = g + \lambda \theta, \quad
    v \leftarrow \alpha v - \epsilon\, \frac{c\, \|\theta\|}{\|u\| + e}\, u, \quad
    \theta \leftarrow \theta + v
    \quad \text{per parameter array (ratio 1 where either norm is 0)}
""",
    notes=_TRUST_NOTE + r"""
``nesterov=True`` is optax's look-ahead form (theta moves by alpha v' plus the step).
Defaults: momentum 0.9, trust coefficient c = 0.001, e = 0, weight decay 0, as optax.lars
(whose formulas these are); the velocity is the book's (theta + v), optax's trace.
""",
    hyper={
        "lr": Hyper(1.0, nonnegative, _LR),
        "momentum": Hyper(0.9, unit_interval, "alpha in [0, 1), or a schedule."),
        "nesterov": Hyper(False, flag, "optax's Nesterov form; fixed when the optimizer is "
                                       "made.", fixed=True),
        "weight_decay": Hyper(0.0, nonnegative, "lambda: ``lambda * theta`` is added to "
                                                "the gradient before the ratio."),
        "trust_coefficient": Hyper(0.001, positive, "c, the ratio's coefficient; > 0."),
        "eps": Hyper(0.0, nonnegative, "e, added to the norm of u in the ratio; >= 0."),
        "exclude_1d": _EXCLUDE_1D,
        "maximize": _MAXIMIZE,
        "convention": _convention(_LARS_PROFILES),
    },
    state=lambda h: ("velocity",),
    state_doc="State per parameter: ``velocity`` (v, optax's trace).",
    kinds={"velocity": "signed"},
    state_formats=("float32",),
    state_format_note="its per-tensor norms run on float32/float64 state only",
    kernel=lambda state: "lars",
    scalars=_lars_scalars,
    profiles=_LARS_PROFILES,
)

ALL = (SGD, ADAGRAD, RMSPROP, ADAM, ADAMW, ADADELTA, LION, ADOPT, ADEMAMIX,
       SCHEDULE_FREE_SGD, SCHEDULE_FREE_ADAMW, LAMB, LARS)

#: every convention name, in the order of the SGD rule's (the widest set)
CONVENTIONS = tuple(SGD.profiles)
