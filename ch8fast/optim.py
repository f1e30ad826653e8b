"""The optimizers: own the state, check the inputs once, compute per-step scalars, and run
the fused kernels over the user's arrays in place.

Each class is its rule's specification (:mod:`ch8fast.rules`) plus this shared machinery.
A parameter group of one dtype is one table in the extension (``Table`` in
src/_core.pyx), and all the tables of an optimizer form its ``Engine``, which also keeps
the step counters. The engine holds a reference to every array whose address it holds:
the parameters (the user's arrays, checked at every step to be still the same arrays) and
the state arrays, which the optimizer owns and lends out only as views in read-only
mappings (``opt.state[i]["exp_avg"][...] = x`` writes into them; replacing one is refused).
Changes to ``param_groups`` are noticed: hyperparameters are checked again at the next
step, an edited ``"params"`` list rebuilds the tables (state created for new arrays).

A step holds the optimizer's lock: two threads stepping one optimizer run one after the
other, and ``state_dict()`` or a checkpoint taken from another thread sees a whole step or
none. The kernels, the step counters and the Nesterov bookkeeping are updated in one call
into the extension, so a KeyboardInterrupt during a step leaves it applied and counted, or
not applied.
"""

import contextlib
import inspect
import math
import threading

import numpy as np

from . import rules, storage
from ._isa import K
from ._validation import Choice, count, flag, positive
from . import _statedict
from ._statedict import (SHIFTED, seed_value, decode_hyperparameter,  # noqa: F401
                         encode_hyperparameter)
from . import _build
from ._groups import (Edits, GroupList, ParamGroup, StateView, as_param_list,  # noqa: F401
                      own)
from ._points import Point
from .clip import norm_from_sumsq
from .sparse import SparseRows

__all__ = ["Optimizer", "ParamGroup", "SGD", "AdaGrad", "RMSProp", "Adam", "AdamW",
           "AdaDelta", "Lion", "ADOPT", "AdEMAMix", "ScheduleFreeSGD",
           "ScheduleFreeAdamW", "LAMB", "LARS", "encode_hyperparameter",
           "decode_hyperparameter"]


_OPTIONS = ("clip_norm", "clip_value", "skip_nonfinite", "state_format", "param_mode",
            "seed", "element_offset", "sparse")
_state_format = Choice(storage.STATE_FORMATS)
_param_mode = Choice(storage.PARAM_MODES)
_sparse = Choice(("lazy", "catch_up"))
_OPTIONS_DOC = """\
    clip_norm: scale all gradients by ``clip_norm / norm`` when their global 2-norm
        exceeds it (keyword only; the norm is kept in ``last_grad_norm``).
    clip_value: clamp every gradient element to [-clip_value, clip_value] (after
        ``clip_norm``, before weight decay; keyword only).
    skip_nonfinite: a step whose gradients hold a NaN or an Inf changes nothing
        (parameters, state, step count) and adds one to ``skipped_steps`` (keyword
        only). Without it a NaN gradient propagates, as in the reference rules.
    state_format: how the state is stored for float32 and 16-bit parameters:
        ``"float32"`` (default), ``"bfloat16"`` or ``"q8"`` (8 bits and a scale per
        block of 256; see :mod:`ch8fast.storage`). Keyword only.
    param_mode: how float16/bfloat16 parameters are kept: ``"master"`` (a float32
        master copy; the default), ``"stochastic"`` or ``"kahan"``. Keyword only.
    seed: the seed of stochastic rounding (keyword only; default 0).
    element_offset: the index of the first element of each group in a larger whole (for
        the shards of a data-parallel job, so that stochastic rounding draws the random
        bits one process would); keyword only, default 0.
    sparse: how a row-sparse gradient (:class:`ch8fast.SparseRows`) of a 2-D parameter
        updates it: ``"lazy"`` (default: only the touched rows and their state) or
        ``"catch_up"`` (and, when a row is next touched, the decay of the steps it missed,
        in closed form; see :mod:`ch8fast.sparse`). Keyword only."""


def _restore(cls, groups, options, state_dict):
    """Unpickle an optimizer: make it again over the same groups, then load its state."""
    opt = cls(groups, **options)
    opt.load_state_dict(state_dict)
    return opt


# ---------------------------------------------------------------------------------------
# The optimizer
# ---------------------------------------------------------------------------------------

class Optimizer:
    """Base class of the optimizers: parameter groups, owned state, steps, state dicts.

    A subclass sets ``rule``, its :class:`ch8fast.rules.Rule`; the constructor signature,
    the defaults, the checks, the state arrays, the kernel and its per-step scalars all
    come from it.
    """

    rule = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        rule = cls.__dict__.get("rule")
        if rule is None:
            return
        P = inspect.Parameter
        cls.__signature__ = inspect.Signature(
            [P("params", P.POSITIONAL_OR_KEYWORD)] + rule.signature_parameters()
            + [P("clip_norm", P.KEYWORD_ONLY, default=None),
               P("clip_value", P.KEYWORD_ONLY, default=None),
               P("skip_nonfinite", P.KEYWORD_ONLY, default=False),
               P("state_format", P.KEYWORD_ONLY, default=None),
               P("param_mode", P.KEYWORD_ONLY, default=None),
               P("seed", P.KEYWORD_ONLY, default=0),
               P("element_offset", P.KEYWORD_ONLY, default=0),
               P("sparse", P.KEYWORD_ONLY, default="lazy")])
        if "__doc__" not in cls.__dict__ or cls.__doc__ is None:
            cls.__doc__ = rule.docstring(_OPTIONS_DOC)

    def __init__(self, params, *args, **kwargs):
        rule = self.rule
        if rule is None:
            raise TypeError("Optimizer is the base class: use ch8fast.SGD, "
                            "ch8fast.Adam, ...")
        try:
            bound = self.__signature__.bind(params, *args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{type(self).__name__}(): {exc}") from None
        bound.apply_defaults()
        given = dict(bound.arguments)
        given.pop("params")
        options = {k: given.pop(k) for k in _OPTIONS}
        self.clip_norm = (None if options["clip_norm"] is None
                          else positive(options["clip_norm"], "clip_norm"))
        self.clip_value = (None if options["clip_value"] is None
                           else positive(options["clip_value"], "clip_value"))
        self.skip_nonfinite = flag(options["skip_nonfinite"], "skip_nonfinite")
        self._state_format = (None if options["state_format"] is None
                              else _state_format(options["state_format"], "state_format"))
        if self._state_format not in (None,) + rule.state_formats:
            raise ValueError(f"state_format={self._state_format!r} is not available for "
                             f"{type(self).__name__}: {rule.state_format_note}; use "
                             + " or ".join(f"state_format={f!r}" for f in
                                           rule.state_formats[::-1]))
        self._param_mode = (None if options["param_mode"] is None
                            else _param_mode(options["param_mode"], "param_mode"))
        self.seed = seed_value(options["seed"], "seed")
        self.element_offset = count(options["element_offset"], "element_offset")
        self.sparse = _sparse(options["sparse"], "sparse")
        self.defaults = dict(rule.defaults(), **{k: own(v) for k, v in given.items()})
        self.skipped_steps = 0          # steps skipped for non-finite gradients
        self.last_grad_norm = None      # global norm before clipping, when computed
        self._lock = threading.RLock()
        self._busy = False              # a step is running (its closure may call back)
        # where the arrays are kept between steps (the rule's hook: theta, or an interim
        # point)
        self._point = (rule.point or Point)(self)
        self._edits = Edits(self._point.group_changed)
        self._core = None
        self.param_groups = GroupList()
        groups = [self._complete(g, gi) for gi, g in enumerate(self._as_groups(params))]
        _build.rebuild(self, groups, [0] * len(groups), [0.0] * len(groups), 0)

    # ---- construction and rebuilding ----------------------------------------------------

    @staticmethod
    def _as_groups(params):
        if isinstance(params, np.ndarray):
            raise TypeError("params must be a sequence of arrays or of dicts (param "
                            "groups), not a single array; wrap it in a list")
        if isinstance(params, dict):
            raise TypeError("params must be a sequence of arrays or of dicts, not a dict")
        try:
            items = list(params)
        except TypeError:
            raise TypeError(f"params must be a sequence of arrays or of dicts, got "
                            f"{type(params).__name__}") from None
        if not items:
            raise ValueError("params is empty")
        if all(isinstance(x, dict) for x in items):
            for gi, g in enumerate(items):
                if "params" not in g:
                    raise ValueError(f"param_groups[{gi}] has no 'params' entry")
            return items
        if any(isinstance(x, dict) for x in items):
            raise TypeError("params mixes arrays and dicts: pass all arrays or all groups")
        return [{"params": items}]

    def _complete(self, group, gi):
        """A new group as a plain dict: the defaults, then the group's own entries."""
        unknown = sorted(k for k in group if k != "params" and k not in self.rule.hyper)
        if unknown:
            raise TypeError(f"param_groups[{gi}]: unknown hyperparameter {unknown[0]!r} "
                            f"for {type(self).__name__} (expected one of "
                            f"{sorted(self.rule.hyper)})")
        out = dict(self.defaults)
        out.update({k: own(v) for k, v in group.items()})
        out["params"] = as_param_list(group["params"])
        return out

    def _where(self, gi, n_groups):
        if n_groups == 1:
            return lambda name: name
        return lambda name: f"param_groups[{gi}]['{name}']"

    # ---- properties ----------------------------------------------------------------------

    @property
    def state(self):
        """One read-only mapping per parameter (in parameter order), of views of the state
        arrays: write into them in place; they cannot be replaced."""
        return self._core.views

    @state.setter
    def state(self, value):
        raise AttributeError("optimizer.state cannot be replaced: write into the state "
                             "arrays in place, or use load_state_dict()")

    @property
    def params(self):
        """The parameters, in order (the arrays the optimizer updates)."""
        return list(self._core.params)

    @property
    def storage(self):
        """How the state and 16-bit parameters are stored: ``{"state_format",
        "param_mode", "seed"}`` (see :mod:`ch8fast.storage`)."""
        return _statedict.storage_record(self)

    @property
    def steps(self):
        """The number of completed steps of each param group."""
        return list(self._core.engine.steps)

    # ---- the momentum hand-change hook ---------------------------------------------------

    # ---- what the arrays hold, whatever their storage ------------------------------------

    # ---- stepping ---------------------------------------------------------------------

    def step(self, grads=None, closure=None, *, grad_norm=None):
        """Update the parameters in place.

        Args:
            grads: the gradients, aligned with the parameters (a single array when there
                is one parameter).
            closure: instead of ``grads``, a callable that returns the gradients, or
                ``(loss, grads)``, evaluated at what the parameter arrays hold when it is
                called (for Nesterov groups: the interim point, the book's literal form).
            grad_norm: the global norm of the gradients when it was computed elsewhere
                (e.g. across processes): ``clip_norm`` and ``skip_nonfinite`` then use it
                instead of the norm of ``grads``.

        Returns the loss from the closure, else None. Everything is checked before any
        array is written. With ``skip_nonfinite``, a step whose gradients hold a NaN or an
        Inf changes nothing and is counted in ``skipped_steps``.
        """
        lock = self._lock
        lock.acquire()
        try:
            if self._busy or self._point.depth:
                self._refuse_reentry("step()")
            self._busy = True
            if self._edits.dirty:
                _build.refresh(self)
            core = self._core
            if core.live:
                self._prepare(core)
            if closure is not None:
                if grads is not None:
                    raise TypeError("step() takes either grads or closure=, exactly one of "
                                    "them")
                return self._point.closure_step(core, closure, grad_norm)
            if grads is None:
                raise TypeError("step() takes either grads or closure=, exactly one of "
                                "them")
            # (the rule's hook runs for groups that keep their arrays elsewhere than theta)
            token = self._point.before_step(core) if core.hooked else None
            t = type(grads)
            if not ((t is list or t is tuple) and len(grads) == len(core.params)):
                grads = self._as_grads(grads, len(core.params))
            if core.plain and grad_norm is None:
                core.engine.step(grads, core.plan, core.form)
            else:
                core.engine.bind(grads)
                plan = self._clip_plan(core, grads, grad_norm)
                if plan is None:
                    self.skipped_steps += 1
                else:
                    core.engine.run(plan, core.form)
            if token is not None:
                self._point.after_step(core, grads, token)
            return None
        finally:
            self._busy = False
            lock.release()

    def _refuse_reentry(self, what):
        if self._point.depth:
            raise RuntimeError(f"{what} inside at_theta(): the arrays hold theta there, "
                               f"not what a step updates; step after the block")
        raise RuntimeError(f"{what} called while this optimizer is stepping (from its "
                           f"closure, a schedule or a gradient's code)")

    def _prepare(self, core):
        """The scalars of the coming update of every group with scheduled
        hyperparameters."""
        steps = core.engine.steps
        for gi in core.live:
            self._prepare_scheduled(core, gi, core.meta[gi], steps[gi])

    def _prepare_scheduled(self, core, gi, meta, k):
        # in place: a step allocates nothing (a schedule that fails leaves values that the
        # next step computes again)
        group, where = self.param_groups[gi], self._where(gi, len(core.meta))
        values, nxt = meta.values, meta.next_values
        for name in meta.scheduled:
            values[name] = nxt[name] = _build.scheduled(self, group, meta, name, k, where)
        for name in meta.ahead:
            nxt[name] = _build.scheduled(self, group, meta, name, k + 1, where)
        self.rule.scalars(meta.scalars, values, nxt)

    @staticmethod
    def _as_grads(grads, n):
        t = type(grads)
        if t is list or t is tuple or isinstance(grads, (list, tuple)):
            if len(grads) != n:
                raise ValueError(f"grads: expected {n} arrays (one per parameter), got "
                                 f"{len(grads)}")
            return grads
        if isinstance(grads, (np.ndarray, SparseRows)):
            if n != 1:
                raise ValueError(f"grads: got a single array for {n} parameters; pass a "
                                 f"sequence of {n} arrays")
            return (grads,)
        raise TypeError(f"grads must be a list or tuple of arrays, got {t.__name__}")

    def _clip_plan(self, core, grads, grad_norm):
        """The GradPlan for the gradients just bound, or None to skip the step."""
        if grad_norm is None:
            norm = norm_from_sumsq(core.engine.sumsq(), grads)
        else:
            norm = float(grad_norm)
        self.last_grad_norm = norm
        if self.skip_nonfinite and not math.isfinite(norm):
            return None
        if self.clip_norm is not None and norm > self.clip_norm:
            return K.GradPlan(self.clip_norm / norm, core.plan.clamp)
        return core.plan

    # ---- theta and the interim point ----------------------------------------------------

    def theta(self):
        """The parameters theta, as new arrays. In the shifted Nesterov form the arrays hold
        phi = theta + alpha v, and this returns phi - alpha v (inside ``at_theta()`` the
        arrays hold theta, and this returns copies of them)."""
        return self._point.theta()

    def at_theta(self):
        """Within the block the parameter arrays hold theta (to evaluate or save the
        model); afterwards they hold exactly the bits they held before. Nested blocks are
        the outer one; no step can run inside (other threads wait for the block's end). A
        checkpoint saved inside saves what the arrays hold between steps, so it resumes
        exactly. A momentum set inside takes effect (the arrays move to its interim point)
        when the block ends."""
        return self._point.at_theta()

    # ---- state dicts --------------------------------------------------------------------

    def state_dict(self):
        """Plain Python and NumPy data: hyperparameters (schedules as dicts), step counts,
        copies of the state arrays. Waits for a step running in another thread. A
        callable hyperparameter must be a schedule (with ``to_dict()``); any other
        raises ``TypeError`` here, though pickle and ``copy.deepcopy`` take what pickle
        can save (:doc:`contract`)."""
        with self._lock:
            return _statedict.state_dict(self, copy=True)

    @contextlib.contextmanager
    def snapshot(self, params=None):
        """Hold the optimizer still: inside the block no step runs (other threads wait)
        and this yields ``(state_dict, params)``, the state dict holding the state arrays
        themselves (read them only) and the arrays ``params`` (None if None) as they are
        between steps: inside ``at_theta()``, the optimizer's own parameters are replaced
        by the arrays it put aside. For writers such as ``save_checkpoint`` that must not
        copy the state."""
        with self._lock:
            if self._busy:
                self._refuse_reentry("snapshot()")
            core = self._core
            between = None if params is None else list(params)
            saved = self._point.between
            if saved and between is not None:
                index = {id(p): i for i, p in enumerate(core.params)}
                between = [saved.get(index.get(id(p), -1), p) for p in between]
            yield _statedict.state_dict(self, copy=False), between

    def load_state_dict(self, state_dict):
        """Restore a ``state_dict()``. Everything is checked first; a mismatch raises and
        changes nothing. State arrays are copied into the optimizer's own arrays."""
        with self._lock:
            if self._busy or self._point.depth:
                self._refuse_reentry("load_state_dict()")
            if self._edits.dirty:
                _build.refresh(self)
            _statedict.load(self, state_dict)

    @property
    def state_format(self):
        """How the state is stored: ``"float32"``, ``"bfloat16"`` or ``"q8"``; None when
        not chosen (float32 state, float64 for float64 parameters). Fixed when the
        optimizer is made."""
        return self._state_format

    @property
    def param_mode(self):
        """How 16-bit parameters are kept (``"master"``, ``"stochastic"``, ``"kahan"``);
        None when not chosen. Fixed when the optimizer is made."""
        return self._param_mode

    def hyperparameters(self):
        """The hyperparameters the next step uses, one plain dict per param group, each
        schedule evaluated at that step (``param_groups`` holds the schedules themselves):
        ``opt.hyperparameters()[0]["lr"]`` is the learning rate in force, as torch's
        ``scheduler.get_last_lr()``."""
        with self._lock:
            steps = self._core.engine.steps
            return [{k: (v(steps[gi]) if callable(v) else v) for k, v in group.items()
                     if k != "params"}
                    for gi, group in enumerate(self.param_groups)]

    def decoded_state(self, i):
        """The state of parameter ``i`` as float32/float64 numbers, copies (decoded from
        bfloat16 or 8-bit storage), with ``"master"`` for a master copy and ``"theta"``
        for the parameter's value between steps in float32 (16-bit parameters)."""
        with self._lock:
            core = self._core
            out = {name: np.array(self._point.state_values(i, name))
                   for name in core.how[i][1]}
            if core.how[i][0] != "none":
                out["theta"] = np.array(self._point.phi_values(i), np.float32)
            return out

    # ---- groups, copies, printing -------------------------------------------------------

    def add_param_group(self, param_group):
        """Add a param group, as ``torch.optim.Optimizer.add_param_group``: a dict with
        ``"params"`` (an array or a sequence of arrays) and any hyperparameters; the
        others are taken from ``defaults``. Its parameters get new state; its step count
        starts at 0. A parameter already optimized is refused."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        if "params" not in param_group:
            raise ValueError("param_group has no 'params' entry")
        with self._lock:
            if self._busy or self._point.depth:
                self._refuse_reentry("add_param_group()")
            if self._edits.dirty:
                _build.refresh(self)
            engine = self._core.engine
            groups = list(self.param_groups)
            groups.append(self._complete(param_group, len(groups)))
            _build.rebuild(self, groups, list(engine.steps) + [0],
                           list(engine.interim) + [0.0], engine.form)

    def __reduce__(self):
        """Pickle and ``copy.deepcopy``: the groups and options, then the state dict. A
        callable hyperparameter may be anything pickle saves (a module-level function, a
        ``functools.partial`` of one, a picklable callable object, a schedule); a lambda
        or a nested function raises ``TypeError``."""
        with self._lock:
            groups = [dict(g, params=list(g["params"])) for g in self.param_groups]
            options = {"clip_norm": self.clip_norm, "clip_value": self.clip_value,
                       "skip_nonfinite": self.skip_nonfinite,
                       "state_format": self._state_format, "param_mode": self._param_mode,
                       "seed": self.seed, "element_offset": self.element_offset,
                       "sparse": self.sparse}
            # Through the state dict, with callables that have no to_dict() kept as
            # themselves where pickle can save them (module-level functions by name).
            return (_restore, (type(self), groups, options,
                               _statedict.state_dict(self, copy=True, pickling=True)))

    def __repr__(self):
        lines = [f"{type(self).__name__} ("]
        for gi, g in enumerate(self.param_groups):
            lines.append(f"Parameter Group {gi}")
            for k in sorted(g):
                if k != "params":
                    lines.append(f"    {k}: {g[k]}")
        lines.append(")")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# The optimizers: each is its rule's specification (ch8fast.rules)
# ---------------------------------------------------------------------------------------

class SGD(Optimizer):
    rule = rules.SGD


class AdaGrad(Optimizer):
    rule = rules.ADAGRAD


class RMSProp(Optimizer):
    rule = rules.RMSPROP


class Adam(Optimizer):
    rule = rules.ADAM


class AdamW(Adam):
    rule = rules.ADAMW


class AdaDelta(Optimizer):
    rule = rules.ADADELTA


class Lion(Optimizer):
    rule = rules.LION


class ADOPT(Optimizer):
    rule = rules.ADOPT


class AdEMAMix(Optimizer):
    rule = rules.ADEMAMIX


class ScheduleFreeSGD(Optimizer):
    rule = rules.SCHEDULE_FREE_SGD


class ScheduleFreeAdamW(Optimizer):
    rule = rules.SCHEDULE_FREE_ADAMW


class LAMB(Optimizer):
    rule = rules.LAMB


class LARS(Optimizer):
    rule = rules.LARS
