"""The optimizers: own the state, check the inputs once, compute per-step scalars, and run
the fused kernels over the user's arrays in place.

A parameter group of one dtype is one table in the extension (``Table`` in src/kernels.pxi):
the addresses of its parameter and state arrays are taken once, when the optimizer is made,
and only the gradients' addresses change from step to step. A step is then one kernel call
per group and dtype, however many arrays the group holds.
"""

import contextlib
import math

import numpy as np

from ._isa import K
from . import functional as F
from .clip import _norm_from
from ._validation import (FLOAT_DTYPES, betas_pair, check_disjoint, check_param,
                          nonnegative, positive, unit_interval)

_NESTEROV = K.FLAGS["nesterov"]

__all__ = ["Optimizer", "SGD", "AdaGrad", "RMSProp", "Adam", "AdamW", "AdaDelta"]


def _flag(value, name):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


class ParamGroup(dict):
    """A parameter group: a plain dict of ``"params"`` and hyperparameters that notes when
    it is changed (``group["lr"] = 0.01``, ``update``, ...), so that the optimizer checks
    its hyperparameters again at the next step, and only then."""

    __slots__ = ("changed",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.changed = True

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self.changed = True

    def __delitem__(self, key):
        super().__delitem__(key)
        self.changed = True

    def __ior__(self, other):
        self.changed = True
        return super().__ior__(other)

    def update(self, *args, **kwargs):
        super().update(*args, **kwargs)
        self.changed = True

    def setdefault(self, key, default=None):
        self.changed = True
        return super().setdefault(key, default)

    def pop(self, *args):
        self.changed = True
        return super().pop(*args)

    def popitem(self):
        self.changed = True
        return super().popitem()

    def clear(self):
        super().clear()
        self.changed = True


def _encode(value):
    """A hyperparameter as plain data: a schedule becomes a tagged dict."""
    if callable(value):
        to_dict = getattr(value, "to_dict", None)
        if to_dict is None:
            raise TypeError(f"cannot save the hyperparameter {value!r}: a callable needs "
                            f"a to_dict() method (use a ch8fast.schedules schedule)")
        return {"schedule": to_dict()}
    if isinstance(value, tuple):
        return list(value)
    return value


def _decode(value):
    if isinstance(value, dict) and set(value) == {"schedule"}:
        from . import schedules
        return schedules.Schedule.from_dict(value["schedule"])
    if isinstance(value, list):
        return tuple(value)
    return value


class Optimizer:
    """Base class: parameter groups, state arrays, steps and state dicts.

    A subclass declares ``_checks`` (hyperparameter name -> check, which returns the
    validated value), ``_flags`` (names fixed when the optimizer is made: they decide which
    state arrays exist), and implements ``_state_names(group)`` and
    ``_args(values, group_index)``, which returns the kernel arguments of one step from the
    evaluated hyperparameters (see ``ch8fast.functional``).

    Options of every optimizer, applied to the gradients in the update pass itself:

    * ``clip_norm``: scale all gradients by ``clip_norm / norm`` when their global 2-norm
      exceeds it (the norm is kept in ``last_grad_norm``);
    * ``clip_value``: clamp every gradient element to [-clip_value, clip_value] (after
      ``clip_norm``, before weight decay);
    * ``skip_nonfinite``: a step whose gradients hold a NaN or an Inf changes nothing
      (parameters, state, step count) and adds one to ``skipped_steps``. Without it a NaN
      gradient propagates into the parameters and the state, as in the reference rules.
    """

    _checks = {}
    _flags = ()

    def __init__(self, params, defaults, *, clip_norm=None, clip_value=None,
                 skip_nonfinite=False):
        groups = self._as_groups(params)
        self.clip_norm = None if clip_norm is None else positive(clip_norm, "clip_norm")
        self.clip_value = None if clip_value is None else positive(clip_value, "clip_value")
        self.skip_nonfinite = _flag(skip_nonfinite, "skip_nonfinite")
        self.skipped_steps = 0          # steps skipped for non-finite gradients
        self.last_grad_norm = None      # global norm before clipping, when computed
        self.defaults = dict(defaults)
        self.param_groups = []
        all_params, names = [], []
        for gi, group in enumerate(groups):
            full = dict(self.defaults)
            for k, v in group.items():
                if k != "params" and k not in self.defaults:
                    raise TypeError(f"param_groups[{gi}]: unknown hyperparameter {k!r} for "
                                    f"{type(self).__name__} (expected one of "
                                    f"{sorted(self.defaults)})")
                full[k] = v
            for k in self._flags:
                full[k] = _flag(full[k], self._where(gi, k, len(groups)))
            plist = list(group["params"])
            if not plist:
                raise ValueError(f"param_groups[{gi}]: 'params' is empty")
            for p in plist:
                i = len(all_params)
                check_param(p, f"params[{i}]")
                all_params.append(p)
                names.append(f"params[{i}]")
            full["params"] = plist
            self.param_groups.append(ParamGroup(full))
        self._fixed = [{k: g[k] for k in self._flags} for g in self.param_groups]
        self._names = frozenset(self.defaults)
        self._cache = [None] * len(self.param_groups)
        for gi, group in enumerate(self.param_groups):
            self._check_structure(group, gi)
            self._values(gi, 0)            # every hyperparameter valid at step 0
        check_disjoint(all_params, names)

        # State arrays, zero-initialized, one set per parameter.
        self.state = []
        self._layout = []           # the state names of each group, fixed from here on
        for group in self.param_groups:
            snames = self._state_names(group)
            self._layout.append(snames)
            for p in group["params"]:
                self.state.append({n: self._initial_state(n, p, group) for n in snames})
        self._steps = [0] * len(self.param_groups)
        self._interim = [0.0] * len(self.param_groups)   # alpha of the shifted form
        self._nesterov_form = None                        # "shifted" or "literal"
        self._scratch = None
        self._build_tables()

    # ---- construction helpers ---------------------------------------------------------

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
                if isinstance(g["params"], np.ndarray):
                    g = dict(g, params=[g["params"]])
                    items[gi] = g
            return items
        if any(isinstance(x, dict) for x in items):
            raise TypeError("params mixes arrays and dicts: pass all arrays or all groups")
        return [{"params": items}]

    def _initial_state(self, name, p, group):
        return np.zeros_like(p, order="C")

    def _check_structure(self, group, gi):
        """Checks that involve several hyperparameters, when made and when loading."""

    def _build_tables(self):
        arrays = [p for g in self.param_groups for p in g["params"]]
        arrays += [a for st in self.state for a in st.values()]
        guard = K.Guard(arrays)
        self._params = [p for g in self.param_groups for p in g["params"]]
        self._tables = []           # (group index, Table)
        i0 = 0
        for gi, group in enumerate(self.param_groups):
            idx = range(i0, i0 + len(group["params"]))
            for dt in FLOAT_DTYPES:
                rows = [i for i in idx if self._params[i].dtype == dt]
                if rows:
                    cols = [[self.state[i][n] for i in rows] for n in self._layout[gi]]
                    self._tables.append(
                        (gi, K.Table([self._params[i] for i in rows], cols, rows, guard)))
            i0 += len(group["params"])
        self._table_list = [t for _, t in self._tables]
        self._table_groups = np.array([gi for gi, _ in self._tables], dtype=np.intp)
        self._clip_flags = K.FLAGS["clip"] if self.clip_value is not None else 0
        self._nesterov = self._uses_nesterov()

    def _where(self, gi, name, n_groups=None):
        n = len(self.param_groups) if n_groups is None else n_groups
        return name if n == 1 else f"param_groups[{gi}]['{name}']"

    # ---- per-step hyperparameters -----------------------------------------------------

    def _value(self, gi, name, step):
        """Hyperparameter ``name`` of group ``gi`` for the update after ``step`` completed
        steps: a schedule is called with ``step``. Checked."""
        v = self.param_groups[gi][name]
        if callable(v):
            v = v(step)
        return self._checks[name](v, self._where(gi, name))

    def _values(self, gi, step):
        """The checked hyperparameters of group ``gi`` for the update after ``step``
        completed steps. Checks run again only when the group was changed (or for a
        schedule, whose value is checked at every step)."""
        group = self.param_groups[gi]
        cached = self._cache[gi]
        if cached is not None and type(group) is ParamGroup and not group.changed:
            values, scheduled = cached
            for k in scheduled:              # the cache's own dict, updated in place
                values[k] = self._value(gi, k, step)
            if scheduled:
                self._check_dtype_values(gi, values)
            return values
        # A group that is not a ParamGroup (a dict put in param_groups by hand) is checked
        # at every step.
        if group.keys() != self._names | {"params"}:
            unknown = sorted(set(group) - self._names - {"params"})
            missing = sorted(self._names - set(group))
            raise TypeError(f"param_groups[{gi}]: unknown hyperparameter(s) {unknown}, "
                            f"missing {missing}")
        for k in self._flags:
            if _flag(group[k], self._where(gi, k)) != self._fixed[gi][k]:
                raise ValueError(f"{self._where(gi, k)} was {self._fixed[gi][k]} when the "
                                 f"optimizer was made and cannot change (it decides the "
                                 f"state arrays and what the parameter arrays hold); make "
                                 f"a new optimizer")
        values = {k: self._value(gi, k, step) for k in self._checks}
        self._check_dtype_values(gi, values)
        for k, v in list(group.items()):     # lists become tuples: they cannot change
            if isinstance(v, list) and k != "params":    # behind the cache's back
                group[k] = tuple(v)
        scheduled = tuple(k for k in self._checks if callable(group[k]))
        self._cache[gi] = (values, scheduled)
        if type(group) is ParamGroup:
            group.changed = False
        return values

    def _check_dtype_values(self, gi, values, where=None):
        """Refuse an ``eps`` that rounds to 0 in the dtype of a parameter of the group
        (below float32's smallest subnormal, 1.4e-45): 0/0 would give NaN."""
        eps = values.get("eps")
        if eps is None or np.float32(eps) > 0:
            return
        if any(p.dtype == np.float32 for p in self.param_groups[gi]["params"]):
            name = where or self._where(gi, "eps")
            raise ValueError(f"{name} is {eps}, which rounds to 0 in float32 (the dtype "
                             f"of this group's parameters); use eps >= 1.4e-45")

    # ---- stepping ---------------------------------------------------------------------

    def step(self, grads=None, closure=None):
        """Update the parameters in place.

        ``grads``: the gradients, aligned with the parameters (a single array when there is
        one parameter). Or ``closure``: a callable that returns the gradients, or
        ``(loss, grads)``, evaluated at what the parameter arrays hold when it is called.
        Returns the loss from the closure, else None.

        Everything is checked before any array is written. With ``skip_nonfinite``, a
        step whose gradients hold a NaN or an Inf changes nothing and is counted in
        ``skipped_steps``.
        """
        if (grads is None) == (closure is None):
            raise TypeError("step() takes either grads or closure=, exactly one of them")
        steps = self._steps
        args = [self._args(self._values(gi, steps[gi]), gi) for gi in range(len(steps))]
        loss, plan = None, None
        if closure is not None:
            loss, grads, plan = self._call_closure(closure, args)
        elif self._nesterov:
            self._check_form("shifted")
        grads = self._as_grad_list(grads)
        clip = self.clip_value or 0.0
        if plan is None and self.clip_norm is None and not self.skip_nonfinite:
            # the common case: check and bind every gradient, then update, in one call
            K.step_tables(self._table_list, self._table_groups, args, grads, 1.0,
                          self._clip_flags, clip)
        else:
            for table in self._table_list:
                table.bind(grads)
            if plan is None:
                plan = self._clip_plan(grads)
            gscale, clip_flag, skip = plan
            if skip:
                self.skipped_steps += 1
                return loss
            K.step_tables(self._table_list, self._table_groups, args, grads, gscale,
                          clip_flag, clip, False)
        if self._nesterov:
            self._nesterov_form = "shifted" if closure is None else "literal"
        steps = self._steps                  # (a closure may have loaded a state dict)
        for gi, a in enumerate(args):
            steps[gi] += 1
            if a[-1] & _NESTEROV:
                self._interim[gi] = a[5]
        return loss

    def _clip_plan(self, grads):
        """(gradient scale, clip flag, skip) for the gradients just bound."""
        gscale = 1.0
        if self.clip_norm is not None or self.skip_nonfinite:
            norm = _norm_from(sum(t.sumsq(1) for _, t in self._tables), grads)
            self.last_grad_norm = norm
            if self.skip_nonfinite and not math.isfinite(norm):
                return 1.0, 0, True
            if self.clip_norm is not None and norm > self.clip_norm:
                gscale = self.clip_norm / norm
        return gscale, self._clip_flags, False

    def _as_grad_list(self, grads):
        n = len(self._params)
        if isinstance(grads, np.ndarray):
            if n != 1:
                raise ValueError(f"grads: got a single array for {n} parameters; pass a "
                                 f"sequence of {n} arrays")
            return (grads,)
        if not isinstance(grads, (list, tuple)):
            raise TypeError(f"grads must be a list or tuple of arrays, got "
                            f"{type(grads).__name__}")
        if len(grads) != n:
            raise ValueError(f"grads: expected {n} arrays (one per parameter), "
                             f"got {len(grads)}")
        return grads

    def _uses_nesterov(self):
        return False

    def _check_form(self, form):
        """Refuse to switch between the two Nesterov forms once steps were taken."""
        if self._nesterov_form not in (None, form) and any(self._steps):
            raise ValueError(
                f"this optimizer has taken Nesterov steps in the {self._nesterov_form} "
                f"form (the arrays hold "
                f"{'the interim point' if self._nesterov_form == 'shifted' else 'theta'}); "
                f"use step({'grads' if self._nesterov_form == 'shifted' else 'closure='}) "
                f"throughout, or make a new optimizer")

    def _call_closure(self, closure, args):
        """(loss, grads, None) from the closure; a subclass may return a clip plan."""
        out = closure()
        if (isinstance(out, tuple) and len(out) == 2
                and not isinstance(out[0], (np.ndarray, list, tuple))):
            return out[0], out[1], None
        return None, out, None

    # ---- reading and saving -------------------------------------------------------------

    def theta(self):
        """Copies of the parameters theta, whichever point the arrays hold (see
        ``at_theta``)."""
        return [p.copy() for p in self._params]

    @contextlib.contextmanager
    def at_theta(self):
        """Inside the block the arrays hold theta; afterwards exactly what they held."""
        yield self._params

    def state_dict(self):
        """Plain Python and NumPy data: hyperparameters (schedules as dicts), step counts,
        copies of the state arrays."""
        return self._state_dict(copy=True)

    def _state_dict(self, copy):
        """``state_dict()``, holding the state arrays themselves when ``copy`` is False
        (for a checkpoint writer that only reads them)."""
        groups, i0 = [], 0
        for gi, g in enumerate(self.param_groups):
            d = {k: _encode(v) for k, v in g.items() if k != "params"}
            d["params"] = list(range(i0, i0 + len(g["params"])))
            d["step"] = self._steps[gi]
            d["interim_momentum"] = self._interim[gi]
            i0 += len(g["params"])
            groups.append(d)
        return {
            "optimizer": type(self).__name__,
            "version": 1,
            "nesterov_form": self._nesterov_form,
            "skipped_steps": self.skipped_steps,
            "param_groups": groups,
            "state": [{k: a.copy() if copy else a for k, a in st.items()}
                      for st in self.state],
        }

    def load_state_dict(self, state_dict):
        """Restore a ``state_dict()``. Everything is checked first; a mismatch raises and
        changes nothing. State arrays are copied into the existing arrays."""
        sd = state_dict
        if not isinstance(sd, dict):
            raise TypeError(f"state_dict must be a dict, got {type(sd).__name__}")
        for key in ("optimizer", "version", "param_groups", "state", "nesterov_form",
                    "skipped_steps"):
            if key not in sd:
                raise ValueError(f"state_dict has no {key!r} entry")
        if sd["optimizer"] != type(self).__name__:
            raise ValueError(f"state_dict is for {sd['optimizer']}, not "
                             f"{type(self).__name__}")
        if sd["version"] != 1:
            raise ValueError(f"state_dict version {sd['version']} is not supported")
        if sd["nesterov_form"] not in (None, "shifted", "literal"):
            raise ValueError(f"state_dict['nesterov_form'] is {sd['nesterov_form']!r}")
        skipped = sd["skipped_steps"]
        if isinstance(skipped, bool) or not isinstance(skipped, (int, np.integer)) \
                or skipped < 0:
            raise ValueError(f"state_dict['skipped_steps'] must be an integer >= 0, got "
                             f"{skipped!r}")
        groups = sd["param_groups"]
        if not isinstance(groups, list):
            raise TypeError(f"state_dict['param_groups'] must be a list, got "
                            f"{type(groups).__name__}")
        if len(groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(groups)} param groups, this optimizer "
                             f"has {len(self.param_groups)}")
        new_groups, steps, interim, i0 = [], [], [], 0
        for gi, (saved, group) in enumerate(zip(groups, self.param_groups)):
            where = f"state_dict['param_groups'][{gi}]"
            if not isinstance(saved, dict):
                raise TypeError(f"{where} must be a dict, got {type(saved).__name__}")
            n = len(group["params"])
            if saved.get("params") != list(range(i0, i0 + n)):
                raise ValueError(f"{where}['params'] is {saved.get('params')}, expected "
                                 f"{list(range(i0, i0 + n))}")
            i0 += n
            expected = set(self.defaults) | {"params", "step", "interim_momentum"}
            if set(saved) != expected:
                raise ValueError(f"{where} has entries {sorted(saved)}, expected "
                                 f"{sorted(expected)}")
            values = {k: _decode(saved[k]) for k in self.defaults}
            for k in self._flags:
                if _flag(values[k], f"{where}['{k}']") != group[k]:
                    raise ValueError(f"{where}['{k}'] is {values[k]}, but this optimizer "
                                     f"was made with {k}={group[k]}")
            trial = dict(values, params=group["params"])
            self._check_structure(trial, gi)
            missing = [n for n in self._state_names(trial) if n not in self._layout[gi]]
            if missing:
                raise ValueError(f"{where}: its hyperparameters need the state "
                                 f"{missing} (e.g. momentum > 0 needs 'velocity'), which "
                                 f"this group was made without; make the optimizer with "
                                 f"the same momentum settings")
            step = saved["step"]
            if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
                raise ValueError(f"{where}['step'] must be an integer >= 0, got {step!r}")
            checked = {}
            for k, check in self._checks.items():
                v = values[k]
                checked[k] = check(v(int(step)) if callable(v) else v,
                                   f"{where}['{k}']")
            self._check_dtype_values(gi, checked, f"{where}['eps']")
            steps.append(int(step))
            interim.append(unit_interval(saved["interim_momentum"],
                                         f"{where}['interim_momentum']"))
            new_groups.append(values)
        state = sd["state"]
        if not isinstance(state, list) or len(state) != len(self.state):
            raise ValueError(f"state_dict['state'] must be a list of {len(self.state)} "
                             f"dicts (one per parameter)")
        for i, (saved, mine) in enumerate(zip(state, self.state)):
            if not isinstance(saved, dict) or set(saved) != set(mine):
                raise ValueError(f"state_dict['state'][{i}] must have the entries "
                                 f"{sorted(mine)}, got "
                                 f"{sorted(saved) if isinstance(saved, dict) else saved!r}")
            for k, a in mine.items():
                b = saved[k]
                where = f"state_dict['state'][{i}][{k!r}]"
                if not isinstance(b, np.ndarray):
                    raise TypeError(f"{where} must be a numpy.ndarray, got "
                                    f"{type(b).__name__}")
                if b.dtype != a.dtype or b.shape != a.shape:
                    raise ValueError(f"{where} has shape {b.shape} and dtype {b.dtype}, "
                                     f"expected {a.shape} and {a.dtype}")
        # Everything checked: apply.
        for i, (saved, mine) in enumerate(zip(state, self.state)):
            for k, a in mine.items():
                np.copyto(a, saved[k])
        for group, values in zip(self.param_groups, new_groups):
            group.update(values)
        self._steps = steps
        self._interim = interim
        self._nesterov_form = sd["nesterov_form"]
        self.skipped_steps = int(skipped)

    def __repr__(self):
        lines = [f"{type(self).__name__} ("]
        for gi, g in enumerate(self.param_groups):
            lines.append(f"Parameter Group {gi}")
            for k in sorted(g):
                if k != "params":
                    lines.append(f"    {k}: {g[k]}")
        lines.append(")")
        return "\n".join(lines)


class _NesterovMixin:
    """The two forms of Nesterov momentum (spec section 3) for SGD and RMSProp.

    ``step(grads)`` is the fused shifted form: between steps the arrays hold the interim
    point phi = theta + alpha v, so a gradient computed at "the parameters" is the gradient
    at the interim point. ``step(closure=fn)`` is the book's literal algorithm: the arrays
    hold theta; the optimizer moves them to theta + alpha v, calls ``fn``, puts theta back,
    and applies the update.
    """

    def _uses_nesterov(self):
        return any(g["nesterov"] for g in self.param_groups)

    @staticmethod
    def _has_velocity(group):
        m = group["momentum"]
        return callable(m) or m != 0

    def _check_structure(self, group, gi):
        if group["nesterov"] and not self._has_velocity(group):
            raise ValueError(f"{self._where(gi, 'nesterov')}: Nesterov momentum needs "
                             f"momentum > 0")

    def _momentum_next(self, h, gi):
        """None for a group without velocity, else the momentum that places the next
        interim point (the next step's, in the shifted Nesterov form)."""
        if "velocity" not in self._layout[gi]:
            if h["momentum"] != 0:
                raise ValueError(f"{self._where(gi, 'momentum')}: this group was made "
                                 f"without momentum, so it keeps no velocity; make the "
                                 f"optimizer with momentum > 0 or a momentum schedule")
            return None
        if self.param_groups[gi]["nesterov"]:
            return self._value(gi, "momentum", self._steps[gi] + 1)
        return h["momentum"]

    def _call_closure(self, closure, args):
        if not self._uses_nesterov():
            return Optimizer._call_closure(self, closure, args)
        self._check_form("literal")
        if self._scratch is None:
            self._scratch = [np.empty_like(p) for p in self._params]
        moved, i0 = [], 0
        try:
            for gi, g in enumerate(self.param_groups):
                n = len(g["params"])
                if g["nesterov"]:
                    alpha = args[gi][4]
                    for i in range(i0, i0 + n):
                        p, th = self._params[i], self._scratch[i]
                        np.copyto(th, p)
                        moved.append(i)
                        np.multiply(self.state[i]["velocity"], alpha, out=p)
                        np.add(th, p, out=p)             # theta + alpha v
                    # the update itself is plain momentum at theta
                    args[gi] = args[gi][:-1] + (args[gi][-1] & ~K.FLAGS["nesterov"],)
                i0 += n
            loss, grads, _ = Optimizer._call_closure(self, closure, args)
            grads = self._as_grad_list(grads)
            for _, table in self._tables:
                table.bind(grads)
            plan = self._clip_plan(grads)
            l2 = [gi for gi, g in enumerate(self.param_groups)
                  if g["nesterov"] and args[gi][-1] & K.FLAGS["l2"]]
            if plan[2] or not l2:
                return loss, grads, plan
            # The L2 term belongs to the gradient at the interim point, which only this
            # window holds: clip the gradients here, then add it.
            gscale, clip_flag, _ = plan
            grads = [g * gscale for g in grads]
            if clip_flag:
                grads = [np.clip(g, -self.clip_value, self.clip_value) for g in grads]
            for gi in l2:
                i0 = sum(len(g["params"]) for g in self.param_groups[:gi])
                for i in range(i0, i0 + len(self.param_groups[gi]["params"])):
                    grads[i] = grads[i] + args[gi][2] * self._params[i]
                args[gi] = args[gi][:-1] + (args[gi][-1] & ~K.FLAGS["l2"],)
            return loss, grads, (1.0, 0, False)
        finally:
            for i in moved:
                np.copyto(self._params[i], self._scratch[i])

    def _group_theta(self, gi, i, out):
        """theta = phi - alpha v for a shifted-form group, into ``out``."""
        v = self.state[i]["velocity"]
        np.multiply(v, self._interim[gi], out=out)
        np.subtract(self._params[i], out, out=out)
        return out

    def _shifted(self):
        """(group index, parameter index) of every array that holds an interim point."""
        if self._nesterov_form != "shifted":
            return []
        out, i0 = [], 0
        for gi, g in enumerate(self.param_groups):
            n = len(g["params"])
            if g["nesterov"]:
                out += [(gi, i) for i in range(i0, i0 + n)]
            i0 += n
        return out

    def theta(self):
        """The parameters theta, as new arrays. In the shifted Nesterov form the arrays hold
        phi = theta + alpha v, and this returns phi - alpha v."""
        out = [p.copy() for p in self._params]
        for gi, i in self._shifted():
            self._group_theta(gi, i, out[i])
        return out

    @contextlib.contextmanager
    def at_theta(self):
        """Within the block the parameter arrays hold theta (to evaluate or save the
        model); afterwards they hold exactly the bits they held before."""
        shifted = self._shifted()
        saved = {i: self._params[i].copy() for _, i in shifted}
        tmp = {i: np.empty_like(self._params[i]) for _, i in shifted}
        for gi, i in shifted:
            np.copyto(self._params[i], self._group_theta(gi, i, tmp[i]))
        try:
            yield self._params
        finally:
            for i, a in saved.items():
                np.copyto(self._params[i], a)


# ---------------------------------------------------------------------------------------
# The optimizers
# ---------------------------------------------------------------------------------------

class SGD(_NesterovMixin, Optimizer):
    r"""Stochastic gradient descent, with optional momentum and Nesterov momentum.

    .. math::

        \theta \leftarrow \theta - \epsilon_k g                 \quad\text{(Algorithm 8.1)}

        v \leftarrow \alpha v - \epsilon g, \qquad
        \theta \leftarrow \theta + v                           \quad\text{(8.15, 8.16)}

    With ``nesterov=True`` the gradient is taken at the interim point
    :math:`\tilde\theta = \theta + \alpha v` (Algorithm 8.3, 8.21-8.22). ``step(grads)``
    uses the fused shifted form: between steps the arrays hold
    :math:`\phi = \theta + \alpha v` (equal to theta before the first step), and one pass
    computes :math:`v' = \alpha v - \epsilon g,\ \phi' = \phi - \alpha v + (1 + \alpha') v'`
    with :math:`\alpha'` the next step's momentum. Read theta with :meth:`theta` or
    :meth:`at_theta`. ``step(closure=fn)`` runs the literal algorithm; the arrays then hold
    theta between steps.

    Args:
        params: a sequence of float32/float64 C-contiguous arrays, updated in place, or of
            dicts (param groups) with ``"params"`` and their own hyperparameters.
        lr: the learning rate epsilon, a number >= 0 or a schedule ``step -> lr``.
        momentum: alpha in [0, 1), or a schedule. 0 (the default) is plain SGD and keeps no
            velocity; a schedule allocates one.
        nesterov: use Nesterov momentum (needs momentum).
        weight_decay: L2 penalty coefficient, added to the gradient as ``wd * theta``.

    State per parameter: ``velocity`` (v; torch's ``momentum_buffer`` is -v / lr at a
    constant lr).
    """

    _checks = {"lr": nonnegative, "momentum": unit_interval, "weight_decay": nonnegative}
    _flags = ("nesterov",)

    def __init__(self, params, lr=1e-2, momentum=0.0, nesterov=False, weight_decay=0.0,
                 **options):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov,
                                      weight_decay=weight_decay), **options)

    def _state_names(self, group):
        return ("velocity",) if self._has_velocity(group) else ()

    def _args(self, h, gi):
        a_next = self._momentum_next(h, gi)
        if a_next is None:
            return F.sgd_args(h["lr"], h["weight_decay"])
        return F.momentum_args(h["lr"], h["momentum"], h["weight_decay"],
                               self.param_groups[gi]["nesterov"], a_next)


class AdaGrad(Optimizer):
    r"""AdaGrad (Algorithm 8.4): per-parameter rates scaled by the accumulated squares.

    .. math::

        r \leftarrow r + g \odot g, \qquad
        \theta \leftarrow \theta - \frac{\epsilon}{\delta + \sqrt{r}} \odot g

    ``eps`` is the book's delta, *outside* the root (default 1e-7), as in
    torch.optim.Adagrad (default 1e-10); optax.adagrad adds it inside the root and starts
    the accumulator at 0.1. ``initial_accumulator_value`` sets r at the start.

    State per parameter: ``sum`` (r).
    """

    _checks = {"lr": nonnegative, "eps": positive, "weight_decay": nonnegative,
               "initial_accumulator_value": nonnegative}

    def __init__(self, params, lr=1e-2, eps=1e-7, weight_decay=0.0,
                 initial_accumulator_value=0.0, **options):
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay,
                                      initial_accumulator_value=initial_accumulator_value),
                         **options)

    def _state_names(self, group):
        return ("sum",)

    def _initial_state(self, name, p, group):
        return np.full_like(p, group["initial_accumulator_value"], order="C")

    def _args(self, h, gi):
        return F.adagrad_args(h["lr"], h["eps"], h["weight_decay"])


class RMSProp(_NesterovMixin, Optimizer):
    r"""RMSProp (Algorithm 8.5), with optional momentum and Nesterov momentum (8.6).

    .. math::

        r \leftarrow \rho r + (1 - \rho) g \odot g, \qquad
        \theta \leftarrow \theta - \frac{\epsilon}{\sqrt{\delta + r}} \odot g

    With momentum: :math:`v \leftarrow \alpha v - \frac{\epsilon}{\sqrt{\delta + r}} \odot g,
    \ \theta \leftarrow \theta + v`; with ``nesterov=True`` the gradient is taken at
    :math:`\theta + \alpha v` (Algorithm 8.6), in the same two forms as :class:`SGD`.

    ``eps`` is the book's delta, *inside* the root (default 1e-6); Algorithm 8.6 writes no
    delta, and ch8fast keeps it there too so that r = 0 is safe. optax.rmsprop also adds
    it inside (1e-8); torch.optim.RMSprop adds it outside (1e-8) and calls rho ``alpha``
    (default 0.99).

    State per parameter: ``square_avg`` (r), and ``velocity`` (v) with momentum.
    """

    _checks = {"lr": nonnegative, "rho": unit_interval, "eps": positive,
               "momentum": unit_interval, "weight_decay": nonnegative}
    _flags = ("nesterov",)

    def __init__(self, params, lr=1e-3, rho=0.9, eps=1e-6, momentum=0.0, nesterov=False,
                 weight_decay=0.0, **options):
        super().__init__(params, dict(lr=lr, rho=rho, eps=eps, momentum=momentum,
                                      nesterov=nesterov, weight_decay=weight_decay),
                         **options)

    def _state_names(self, group):
        return ("square_avg", "velocity") if self._has_velocity(group) else ("square_avg",)

    def _args(self, h, gi):
        a_next = self._momentum_next(h, gi)
        if a_next is None:
            return F.rmsprop_args(h["lr"], h["rho"], h["eps"], h["weight_decay"])
        return F.rmsprop_args(h["lr"], h["rho"], h["eps"], h["weight_decay"],
                              h["momentum"], self.param_groups[gi]["nesterov"], a_next)


class Adam(Optimizer):
    r"""Adam (Algorithm 8.7), with bias correction; AMSGrad and decoupled decay optional.

    .. math::

        t \leftarrow t + 1, \quad
        s \leftarrow \rho_1 s + (1 - \rho_1) g, \quad
        r \leftarrow \rho_2 r + (1 - \rho_2) g \odot g

        \hat s = \frac{s}{1 - \rho_1^t}, \quad \hat r = \frac{r}{1 - \rho_2^t}, \quad
        \theta \leftarrow \theta - \epsilon \frac{\hat s}{\sqrt{\hat r} + \delta}

    ``betas`` are (rho1, rho2), ``eps`` is delta, outside the root (default 1e-8, as in
    torch.optim.Adam, optax.adam; Keras uses 1e-7). ``weight_decay`` adds an L2 term to
    the gradient; with ``decoupled_weight_decay=True`` (or :class:`AdamW`) theta is first
    scaled by 1 - lr * weight_decay instead (Loshchilov & Hutter). ``amsgrad=True`` divides
    by the running maximum of r (Reddi et al.).

    The step count t is kept per param group; state per parameter: ``exp_avg`` (s),
    ``exp_avg_sq`` (r), and ``max_exp_avg_sq`` with AMSGrad.
    """

    _checks = {"lr": nonnegative, "betas": betas_pair, "eps": positive,
               "weight_decay": nonnegative}
    _flags = ("amsgrad", "decoupled_weight_decay")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, decoupled_weight_decay=False, **options):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      amsgrad=amsgrad,
                                      decoupled_weight_decay=decoupled_weight_decay),
                         **options)

    def _state_names(self, group):
        names = ("exp_avg", "exp_avg_sq")
        return names + ("max_exp_avg_sq",) if group["amsgrad"] else names

    def _args(self, h, gi):
        group = self.param_groups[gi]
        return F.adam_args(h["lr"], h["betas"][0], h["betas"][1], h["eps"],
                           h["weight_decay"], self._steps[gi] + 1,
                           group["decoupled_weight_decay"], group["amsgrad"])


class AdamW(Adam):
    r"""Adam with decoupled weight decay (Loshchilov & Hutter, 2019).

    .. math::

        \theta \leftarrow \theta (1 - \epsilon \lambda), \text{ then the Adam step of
        Algorithm 8.7}

    Default ``weight_decay`` 1e-2, as in torch.optim.AdamW (optax.adamw: 1e-4).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, **options):
        Optimizer.__init__(self, params, dict(lr=lr, betas=betas, eps=eps,
                                              weight_decay=weight_decay, amsgrad=amsgrad,
                                              decoupled_weight_decay=True), **options)


class AdaDelta(Optimizer):
    r"""AdaDelta (Zeiler 2012; named in section 8.5.4).

    .. math::

        E[g^2] \leftarrow \rho E[g^2] + (1-\rho) g^2, \quad
        \Delta\theta = -\frac{\sqrt{E[\Delta\theta^2] + \delta}}{\sqrt{E[g^2] + \delta}} g

        E[\Delta\theta^2] \leftarrow \rho E[\Delta\theta^2] + (1-\rho)\Delta\theta^2, \quad
        \theta \leftarrow \theta + \epsilon \Delta\theta

    ``lr`` (epsilon) scales the step and defaults to 1, which is Zeiler's rule; the
    accumulated update E[dtheta^2] is of the unscaled step, as in torch.optim.Adadelta.
    Defaults rho = 0.95, eps = 1e-6 are Zeiler's (torch: rho 0.9).

    State per parameter: ``square_avg`` (E[g^2]), ``acc_delta`` (E[dtheta^2]).
    """

    _checks = {"lr": nonnegative, "rho": unit_interval, "eps": positive,
               "weight_decay": nonnegative}

    def __init__(self, params, lr=1.0, rho=0.95, eps=1e-6, weight_decay=0.0, **options):
        super().__init__(params, dict(lr=lr, rho=rho, eps=eps, weight_decay=weight_decay),
                         **options)

    def _state_names(self, group):
        return ("square_avg", "acc_delta")

    def _args(self, h, gi):
        return F.adadelta_args(h["lr"], h["rho"], h["eps"], h["weight_decay"])
