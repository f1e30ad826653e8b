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
from ._validation import (Choice, check_param, count, flag, positive,
                          unit_interval)
from . import _statedict
from ._statedict import (_FORMS, _LITERAL, _SHIFTED, _seed,  # noqa: F401
                         decode_hyperparameter, encode_hyperparameter)
from .clip import norm_from_sumsq
from .sparse import SparseRows

__all__ = ["Optimizer", "ParamGroup", "SGD", "AdaGrad", "RMSProp", "Adam", "AdamW",
           "AdaDelta", "encode_hyperparameter", "decode_hyperparameter"]


_OPTIONS = ("clip_norm", "clip_value", "skip_nonfinite", "state_format", "param_mode",
            "seed", "element_offset", "sparse")
_F32, _F64 = np.dtype(np.float32), np.dtype(np.float64)
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


# ---------------------------------------------------------------------------------------
# Param groups that note their changes, and read-only views of the state
# ---------------------------------------------------------------------------------------

class _Edits:
    """Shared by an optimizer's groups: ``dirty`` when any group changed since the last
    check; ``hook(group, keys)`` is told of every change as it happens."""

    __slots__ = ("dirty", "hook")

    def __init__(self, hook):
        self.dirty = True
        self.hook = hook


class ParamList(list):
    """The ``"params"`` list of a param group: editing it (append, remove, slice
    assignment, ...) takes effect at the next step, which checks the new arrays, creates
    their state and rebuilds the kernel tables."""

    __slots__ = ("_group",)

    def __init__(self, items=(), group=None):
        super().__init__(items)
        self._group = group

    def _touch(self):
        if self._group is not None:
            self._group._touch(("params",))

    def __reduce__(self):
        return (list, (list(self),))

    # arrays compare element-wise: find them by identity
    def index(self, value, start=0, stop=None):
        for i in range(len(self))[start:stop]:
            if self[i] is value:
                return i
        raise ValueError("array is not in this params list")

    def __contains__(self, value):
        return any(x is value for x in self)

    def count(self, value):
        return sum(x is value for x in self)

    def remove(self, value):
        del self[self.index(value)]


def _mutator(name):
    base = getattr(list, name)

    def method(self, *args):
        out = base(self, *args)
        self._touch()
        return self if name in ("__iadd__", "__imul__") else out
    method.__name__ = name
    return method


for _name in ("append", "extend", "insert", "pop", "clear", "sort", "reverse",
              "__setitem__", "__delitem__", "__iadd__", "__imul__"):
    setattr(ParamList, _name, _mutator(_name))


def _as_param_list(value):
    if isinstance(value, np.ndarray):
        return [value]
    if isinstance(value, (str, bytes, dict)):
        raise TypeError(f"'params' must be a sequence of arrays, got "
                        f"{type(value).__name__}")
    try:
        return list(value)
    except TypeError:
        raise TypeError(f"'params' must be a sequence of arrays, got "
                        f"{type(value).__name__}") from None


def _own(value):
    """A hyperparameter as a group keeps it: a list (``betas=[0.9, 0.99]``) as a tuple of
    its items, so that the caller's list, edited later, changes nothing here."""
    return tuple(value) if type(value) is list else value


class ParamGroup(dict):
    """A parameter group: a dict of ``"params"`` and hyperparameters that notes when it is
    changed (``group["lr"] = 0.01``, ``update``, ``del``, ...), so that the optimizer
    checks it again at the next step, and only then. A copy (``copy.copy``, pickling) is a
    plain dict."""

    __slots__ = ("changed", "_edits")

    def __init__(self, data, edits=None):
        super().__init__(data)
        self.changed = True
        self._edits = edits
        if "params" in self:
            dict.__setitem__(self, "params",
                             ParamList(_as_param_list(self["params"]), self))

    def _touch(self, keys):
        self.changed = True
        edits = self._edits
        if edits is not None:
            edits.dirty = True
            edits.hook(self, keys)

    def _wrap(self, key, value):
        if key == "params":
            return ParamList(_as_param_list(value), self)
        return _own(value)

    def __reduce__(self):
        return (dict, (dict(self),))

    def __setitem__(self, key, value):
        super().__setitem__(key, self._wrap(key, value))
        self._touch((key,))

    def __delitem__(self, key):
        super().__delitem__(key)
        self._touch((key,))

    def update(self, *args, **kwargs):
        new = dict(*args, **kwargs)
        super().update({k: self._wrap(k, v) for k, v in new.items()})
        self._touch(tuple(new))

    def __ior__(self, other):
        self.update(other)
        return self

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = default
        return self[key]

    def pop(self, *args):
        out = super().pop(*args)
        self._touch(args[:1])
        return out

    def popitem(self):
        out = super().popitem()
        self._touch((out[0],))
        return out

    def clear(self):
        keys = tuple(self)
        super().clear()
        self._touch(keys)


class _GroupList(list):
    """``optimizer.param_groups``: the groups can be edited in place; the list itself
    cannot be replaced or resized (``add_param_group`` adds one)."""

    __slots__ = ()

    def __reduce__(self):
        return (list, (list(self),))


def _refuse_group_list_change(self, *args, **kwargs):
    raise TypeError("param_groups cannot be resized or its groups replaced: edit a group "
                    "in place (optimizer.param_groups[0]['lr'] = 0.1), or call "
                    "add_param_group()")


for _name in ("append", "extend", "insert", "remove", "pop", "clear", "sort", "reverse",
              "__setitem__", "__delitem__", "__iadd__", "__imul__"):
    setattr(_GroupList, _name, _refuse_group_list_change)


class StateView:
    """The state arrays of one parameter, read-only as a mapping: ``view["exp_avg"]`` is a
    new view of the optimizer's own array at each access (write into it in place to change
    the state; reshaping it changes only that view); replacing or removing an entry is
    refused."""

    __slots__ = ("_arrays",)

    def __init__(self, arrays):
        self._arrays = arrays

    def __getitem__(self, key):
        return self._arrays[key].view()

    def __iter__(self):
        return iter(self._arrays)

    def __len__(self):
        return len(self._arrays)

    def __contains__(self, key):
        return key in self._arrays

    def keys(self):
        return self._arrays.keys()

    def values(self):
        return [a.view() for a in self._arrays.values()]

    def items(self):
        return [(k, a.view()) for k, a in self._arrays.items()]

    def get(self, key, default=None):
        return self[key] if key in self._arrays else default

    def _refuse(self, *args, **kwargs):
        raise TypeError("an optimizer's state arrays cannot be replaced or removed: write "
                        "into them in place (opt.state[0]['exp_avg'][...] = x), or use "
                        "load_state_dict()")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = _refuse

    def __repr__(self):
        return f"StateView({dict(self.items())!r})"


class _StateList(tuple):
    """``optimizer.state``: one :class:`StateView` per parameter, in parameter order."""

    __slots__ = ()

    def __setitem__(self, key, value):
        raise TypeError("optimizer.state cannot be changed: write into the state arrays in "
                        "place (opt.state[0]['exp_avg'][...] = x), or use "
                        "load_state_dict()")

    __delitem__ = __setitem__


# ---------------------------------------------------------------------------------------
# What an optimizer holds between steps
# ---------------------------------------------------------------------------------------

class _Meta:
    """One group: its parameters as the tables were built, the fixed hyperparameters and
    state names, the checked hyperparameters of the coming update, the names that are
    schedules, and the kernel's scalars."""

    __slots__ = ("params", "fixed", "layout", "values", "next_values", "scheduled",
                 "ahead", "scalars", "dtypes")


class _Core:
    """Everything a step reads, replaced as a whole (one assignment) when the groups
    change: ``engine``, ``meta`` (per group), ``params``, ``state`` (owned arrays),
    ``views``, ``rows`` (global parameter indices per group), ``live`` (groups whose scalars
    change every step), ``nesterov`` (groups with Nesterov momentum), ``form`` (what a
    grads step records), ``plain`` (no clipping by norm, no skipping), ``plan``, and
    ``how`` (per parameter: how it is kept and each state entry's storage)."""

    __slots__ = ("engine", "meta", "params", "state", "views", "rows", "live", "nesterov",
                 "form", "plain", "plan", "how")

    def __init__(self, **kw):
        for k, v in kw.items():
            setattr(self, k, v)

    def replace(self, **kw):
        return _Core(**dict({k: getattr(self, k) for k in self.__slots__}, **kw))


def _dtypes_in(arrays):
    """The distinct dtypes of ``arrays``, in order of first appearance."""
    out = []
    for a in arrays:
        if a.dtype not in out:
            out.append(a.dtype)
    return out





def _same_arrays(a, b):
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


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
                             f"state_format={rule.state_formats[-1]!r} or "
                             f"{rule.state_formats[0]!r}")
        self._param_mode = (None if options["param_mode"] is None
                            else _param_mode(options["param_mode"], "param_mode"))
        self.seed = _seed(options["seed"], "seed")
        self.element_offset = count(options["element_offset"], "element_offset")
        self.sparse = _sparse(options["sparse"], "sparse")
        self.defaults = dict(rule.defaults(), **{k: _own(v) for k, v in given.items()})
        self.skipped_steps = 0          # steps skipped for non-finite gradients
        self.last_grad_norm = None      # global norm before clipping, when computed
        self._lock = threading.RLock()
        self._busy = False              # a step is running (its closure may call back)
        self._theta_depth = 0           # inside at_theta()
        self._phi = None                # inside at_theta(): the arrays as between steps
        self._scratch = None            # theta during a literal Nesterov step
        self._pending = set()           # groups whose momentum was set inside at_theta()
        self._edits = _Edits(self._group_changed)
        self._core = None
        self.param_groups = _GroupList()
        groups = [self._complete(g, gi) for gi, g in enumerate(self._as_groups(params))]
        self._rebuild(groups, [0] * len(groups), [0.0] * len(groups), 0)

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
        out.update({k: _own(v) for k, v in group.items()})
        out["params"] = _as_param_list(group["params"])
        return out

    def _where(self, gi, n_groups):
        if n_groups == 1:
            return lambda name: name
        return lambda name: f"param_groups[{gi}]['{name}']"

    def _check_group(self, gi, group, step, n_groups, first_index, old):
        """Check one group at update number ``step`` (completed steps); returns its
        :class:`_Meta`. ``old`` is its previous meta (None for a new group): the fixed
        hyperparameters and state names then stay as they were."""
        rule, where = self.rule, self._where(gi, n_groups)
        keys = set(group) - {"params"}
        if keys != set(rule.hyper):
            raise TypeError(f"param_groups[{gi}]: unknown hyperparameter(s) "
                            f"{sorted(keys - set(rule.hyper))}, missing "
                            f"{sorted(set(rule.hyper) - keys)}")
        plist = list(group["params"])
        if not plist:
            raise ValueError(f"param_groups[{gi}]: 'params' is empty")
        for k, p in enumerate(plist):
            check_param(p, f"params[{first_index + k}]", True)
        # the dtypes the kernels compute in (float32 for 16-bit parameters)
        dtypes = tuple(dt for dt in (_F32, _F64)
                       if any((p.dtype == _F64) == (dt == _F64) for p in plist))
        meta = _Meta()
        meta.params = tuple(plist)
        meta.dtypes = dtypes
        if old is None:
            meta.fixed = {k: rule.check(k, group[k], where(k)) for k in rule.fixed()}
            meta.layout = rule.state(group)
        else:
            meta.fixed, meta.layout = old.fixed, old.layout
            for k, v in old.fixed.items():
                if rule.check(k, group[k], where(k)) != v:
                    raise ValueError(f"{where(k)} was {v} when the optimizer was made and "
                                     f"cannot change (it decides the state arrays); make "
                                     f"a new optimizer")
        meta.scheduled = tuple(k for k in rule.hyper
                               if callable(group[k]) and k not in meta.fixed)
        plain = {k: (group[k](step) if k in meta.scheduled else group[k])
                 for k in rule.hyper}
        meta.values = rule.check_all(plain, where, dtypes, meta.layout)
        # those of the update after this one, where the rule reads them (else this one's)
        meta.ahead = tuple(k for k in rule.ahead(meta.fixed) if k in meta.scheduled)
        meta.next_values = dict(meta.values)
        for k in meta.ahead:
            meta.next_values[k] = self._scheduled(group, meta, k, step + 1, where)
        meta.scalars = K.Scalars(rule.kernel(meta.layout))
        rule.scalars(meta.scalars, meta.values, meta.next_values)
        return meta

    def _scheduled(self, group, meta, name, step, where):
        h = self.rule.hyper[name]
        value = h.check(group[name](step), where(name))
        for dt in meta.dtypes:
            h.check.fits(value, where(name), dt)
        return value

    def _rebuild(self, groups, steps, interim, form):
        """Check ``groups`` (plain dicts or this optimizer's ParamGroups), make the state of
        new parameters (a parameter already optimized keeps its state arrays), build the
        tables, and install it all at once. On any error nothing changes."""
        old = self._core
        old_meta = {id(g): m for g, m in zip(self.param_groups, old.meta)} if old else {}
        n = len(groups)
        metas, params, rows = [], [], []
        for gi, g in enumerate(groups):
            m = self._check_group(gi, g, steps[gi], n, len(params), old_meta.get(id(g)))
            rows.append(tuple(range(len(params), len(params) + len(m.params))))
            metas.append(m)
            params.extend(m.params)
        seen = {}
        for i, p in enumerate(params):
            if id(p) in seen:
                raise ValueError(f"params[{i}] is params[{seen[id(p)]}] again (they share "
                                 f"memory): a parameter can be in one param group "
                                 f"only, once")
            seen[id(p)] = i
        kept = {}
        if old is not None:
            kept = {id(p): st for p, st in zip(old.params, old.state)}
        self._check_storage(params)
        self._check_sparse(metas, params)
        state, layouts = [], []       # layouts: (state storage, first element index)
        for gi, m in enumerate(metas):
            fixed = dict(m.values, **m.fixed)
            index = self.element_offset        # the group's elements, concatenated
            for p in m.params:
                st, stor = self._new_state(p, m.layout, fixed, kept.get(id(p), {}),
                                           steps[gi])
                state.append(st)
                layouts.append((stor, index))
                index += p.size
        names = [f"params[{i}]" for i in range(len(params))]
        arrays = list(params)
        for i, st in enumerate(state):
            arrays += st.values()
            names += [f"state[{i}][{k!r}]" for k in st]
        guard = K.Guard(arrays, names)        # also: no two of them share memory
        tables, owners = [], []
        for gi, m in enumerate(metas):
            rowwise = bool(m.fixed.get("rowwise"))
            kinds = [(dt, rw) for dt in _dtypes_in(params[i] for i in rows[gi])
                     for rw in ((False, True) if rowwise else (False,))]
            for dt, rw in kinds:
                sel = [i for i in rows[gi] if params[i].dtype == dt
                       and (not rowwise or (params[i].ndim >= 2) == rw)]
                if not sel:
                    continue
                cols = [[state[i][k] for i in sel] for k in m.layout]
                stor = layouts[sel[0]][0]
                aux = [None] * (2 + len(m.layout))
                if "master" in state[sel[0]] or "compensation" in state[sel[0]]:
                    key = "master" if "master" in state[sel[0]] else "compensation"
                    aux[0] = [state[i][key] for i in sel]
                for c, name in enumerate(m.layout):
                    if stor[c].startswith("q8"):
                        aux[2 + c] = [state[i][name + ".absmax"] for i in sel]
                keep = self._keep(dt)
                catch = self.sparse == "catch_up"
                tables.append(K.Table(
                    [params[i] for i in sel], cols, sel, guard, storage=stor, keep=keep,
                    aux=aux, base=[layouts[i][1] for i in sel], rowwise=rw,
                    last=[state[i].get("last_step") for i in sel] if catch else None,
                    dense_step=[state[i].get("dense_step") for i in sel] if catch
                    else None))
                owners.append(gi)
        engine = K.Engine(tables, owners, [m.scalars for m in metas], steps, interim, form,
                          self.seed)
        pgroups = [g if isinstance(g, ParamGroup) and g._edits is self._edits
                   else ParamGroup(g, self._edits) for g in groups]
        how = [(self._keep(p.dtype), dict(zip(metas[gi].layout, layouts[i][0])))
               for gi in range(len(metas)) for i, p in
               ((i, params[i]) for i in rows[gi])]
        core = self._make_core(engine, metas, params, state, rows, how)
        # install (one assignment for everything a step reads)
        self._core = core
        list.__init__(self.param_groups, pgroups)
        for g in pgroups:
            g.changed = False
        self._edits.dirty = False
        if self._scratch is not None:
            self._scratch = None

    def _check_storage(self, params):
        sixteen = [i for i, p in enumerate(params) if storage.is_16bit(p.dtype)]
        if self._param_mode is not None and not sixteen:
            raise ValueError(f"param_mode={self._param_mode!r} is for float16/bfloat16 "
                             f"parameters; these are {_dtypes_in(params)[0]}")
        f64 = [i for i, p in enumerate(params) if p.dtype == _F64]
        if f64 and self._state_format is not None:
            raise ValueError(f"state_format={self._state_format!r}: params[{f64[0]}] is "
                             f"float64, whose state stays float64; leave state_format "
                             f"unset or make the parameters float32")

    def _check_sparse(self, metas, params):
        for m in metas:
            if not m.fixed.get("rowwise"):
                continue
            sixteen = [p for p in m.params if storage.is_16bit(p.dtype)]
            if sixteen or self._state_format not in (None, "float32"):
                what = (f"a {sixteen[0].dtype} parameter" if sixteen
                        else f"state_format={self._state_format!r}")
                raise ValueError(f"rowwise=True needs float32/float64 parameters and "
                                 f"float32 state (got {what}); use rowwise=False for "
                                 f"16-bit parameters or compressed state")
        if self.sparse != "catch_up":
            return
        why = None
        if any(m.fixed.get("nesterov") for m in metas):
            why = "Nesterov momentum has no closed-form catch-up"
        elif any(m.fixed.get("convention", "book") != "book" for m in metas):
            why = "the catch-up is the book's rules' (convention='book')"
        elif self._state_format not in (None, "float32"):
            why = f"state_format={self._state_format!r}"
        elif any(storage.is_16bit(p.dtype) for p in params):
            why = "16-bit parameters"
        if why:
            raise ValueError(f"sparse='catch_up' needs float32/float64 parameters and "
                             f"state and no Nesterov momentum ({why}); use sparse='lazy'")

    def _keep(self, dtype):
        """How parameters of ``dtype`` are kept (the kernels' name)."""
        if not storage.is_16bit(dtype):
            return "none"
        return self._param_mode or "master"

    def _new_state(self, p, layout, fixed, have, step):
        """The state entries of parameter ``p`` (reusing the arrays of ``have`` that fit)
        and the storage of each layout name; ``step``: the group's completed steps (a
        parameter added later has missed none of them: catch-up starts there)."""
        compute = _F64 if p.dtype == _F64 else _F32
        fmt = None if p.dtype == _F64 else self._state_format
        stor = [storage.state_storage(fmt, self.rule.kinds[name]) for name in layout]
        st = {}
        for name, how in zip(layout, stor):
            a = have.get(name)
            scales = have.get(name + ".absmax")
            want = compute if how == "float32" else (np.uint8 if how.startswith("q8")
                                                    else np.uint16)
            shape = (p.shape if self.rule.state_shape is None
                     else tuple(self.rule.state_shape(name, p.shape, fixed)))
            if shape != p.shape and how != "float32":
                raise ValueError(f"row-wise state needs state_format 'float32', got "
                                 f"{self._state_format!r}")
            if (a is None or a.shape != shape or a.dtype != want
                    or how.startswith("q8") != (scales is not None)):
                fill = self.rule.initial.get(name)
                a, scales = storage.new_state(how, shape, 0.0 if fill is None
                                              else fill(fixed), compute)
            st[name] = a
            if scales is not None:
                st[name + ".absmax"] = scales
        if self.sparse == "catch_up" and p.ndim == 2:
            last, ds = have.get("last_step"), have.get("dense_step")
            fits = last is not None and last.shape == p.shape[:1] and ds is not None
            st["last_step"] = last if fits else np.full(p.shape[:1], step, np.int64)
            st["dense_step"] = ds if fits else np.full(1, step, np.int64)
        keep = self._keep(p.dtype)
        if keep == "master":
            m = have.get("master")
            st["master"] = (m if m is not None and m.shape == p.shape
                            else storage.to_float32(p))
        elif keep == "kahan":
            c = have.get("compensation")
            st["compensation"] = (c if c is not None and c.shape == p.shape
                                  else np.zeros(p.shape, np.uint16))
        return st, stor

    def _make_core(self, engine, metas, params, state, rows, how):
        nesterov = tuple(gi for gi, m in enumerate(metas) if self.rule.shifted(m.fixed))
        plain = self.clip_norm is None and not self.skip_nonfinite
        plan = K.GradPlan(1.0, math.inf if self.clip_value is None else self.clip_value)
        return _Core(engine=engine, meta=metas, params=params, state=state,
                     views=_StateList(StateView(st) for st in state), rows=rows,
                     live=tuple(gi for gi, m in enumerate(metas) if m.scheduled),
                     nesterov=nesterov, form=_SHIFTED if nesterov else 0, plain=plain,
                     plan=plan, how=how)

    def _refresh(self):
        """Check the groups changed since the last step; rebuild if any ``"params"``
        changed."""
        core, groups = self._core, self.param_groups
        engine = core.engine
        changed = [gi for gi, g in enumerate(groups) if g.changed]
        for gi in changed:
            if "params" not in groups[gi]:
                raise TypeError(f"param_groups[{gi}]: missing the 'params' entry")
        if any(not _same_arrays(groups[gi]["params"], core.meta[gi].params)
               for gi in changed):
            self._rebuild(list(groups), list(engine.steps), list(engine.interim),
                          engine.form)
            return
        metas = list(core.meta)
        first = [r[0] for r in core.rows]
        for gi in changed:
            metas[gi] = self._check_group(gi, groups[gi], engine.steps[gi], len(groups),
                                          first[gi], core.meta[gi])
        new_engine = K.Engine(list(engine.tables), engine.groups,
                              [m.scalars for m in metas], list(engine.steps),
                              list(engine.interim), engine.form, engine.seed)
        self._core = self._make_core(new_engine, metas, core.params, core.state,
                                     core.rows, core.how).replace(views=core.views)
        for gi in changed:
            groups[gi].changed = False
        self._edits.dirty = False

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

    def _group_changed(self, group, keys):
        """Called as a group is edited. Setting the momentum of a Nesterov group whose
        arrays hold an interim point moves them at once to the new one, theta + alpha v,
        so that the next gradient is taken at the right point."""
        if "momentum" not in keys or self._core is None:
            return
        with self._lock:
            core = self._core
            engine = core.engine
            if self._busy or engine.form != _SHIFTED:
                return
            for gi in core.nesterov:
                if self.param_groups[gi] is group:
                    break
            else:
                return
            if self._theta_depth:            # the arrays hold theta: move at the end
                self._pending.add(gi)
                return
            self._replace_interim(gi)

    def _replace_interim(self, gi):
        """Move group ``gi``'s arrays to the interim point of its momentum now."""
        core = self._core
        engine, meta = core.engine, core.meta[gi]
        group, where = self.param_groups[gi], self._where(gi, len(core.meta))
        try:
            v = group["momentum"]
            alpha = unit_interval(v(engine.steps[gi]) if callable(v) else v,
                                  where("momentum"))
            for dt in meta.dtypes:
                unit_interval.fits(alpha, where("momentum"), dt)
        except (KeyError, TypeError, ValueError):
            return                           # the next step refuses the value
        delta = alpha - engine.interim[gi]
        if delta:
            for i in core.rows[gi]:
                phi = self._phi_values(i)
                self._set_phi(i, phi + self._state_values(i, "velocity")
                              * phi.dtype.type(delta))
        engine.interim[gi] = alpha

    # ---- what the arrays hold, whatever their storage ------------------------------------

    def _state_values(self, i, name):
        """State ``name`` of parameter ``i`` as computed numbers: the array itself if it is
        stored so, else a decoded float32 copy."""
        core = self._core
        how = core.how[i][1][name]
        st = core.state[i]
        if how == "float32":
            return st[name]
        return storage.decode(how, st[name], st.get(name + ".absmax"))

    def _phi_values(self, i):
        """What parameter ``i`` is, precisely, between steps (float32 for a 16-bit one:
        its master copy, or the array plus its compensation)."""
        core = self._core
        keep, p, st = core.how[i][0], core.params[i], core.state[i]
        if keep == "none":
            return p
        if keep == "master":
            return storage.sync_master(p, st["master"])
        phi = storage.to_float32(p)
        if keep == "kahan":
            phi = phi + storage.decode("bfloat16", st["compensation"])
        return phi

    def _set_phi(self, i, values, rows=None):
        """Make parameter ``i`` (or its ``rows``) hold ``values`` (float32 for a 16-bit
        one), keeping its master copy or compensation consistent."""
        core = self._core
        keep, p, st = core.how[i][0], core.params[i], core.state[i]
        sel = slice(None) if rows is None else rows
        if keep == "none":
            p[sel] = values
            return
        if keep == "master":
            st["master"][sel] = values
        part = p[sel] if rows is not None else p         # (a copy for rows)
        storage.round_to(part, values, saturate=keep == "kahan")
        if rows is not None:
            p[rows] = part
        if keep == "kahan":
            st["compensation"][sel] = K.encode_block_state(
                "bfloat16", np.ascontiguousarray(values - storage.to_float32(part),
                                                 np.float32).reshape(-1))[0].reshape(
                np.shape(part))

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
            if self._busy or self._theta_depth:
                self._refuse_reentry("step()")
            self._busy = True
            if self._edits.dirty:
                self._refresh()
            core = self._core
            if core.live:
                self._prepare(core)
            if closure is not None:
                if grads is not None:
                    raise TypeError("step() takes either grads or closure=, exactly one of "
                                    "them")
                return self._closure_step(core, closure, grad_norm)
            if grads is None:
                raise TypeError("step() takes either grads or closure=, exactly one of "
                                "them")
            if core.nesterov and core.engine.form == _LITERAL:
                self._check_form(_SHIFTED)
            t = type(grads)
            if not ((t is list or t is tuple) and len(grads) == len(core.params)):
                grads = self._as_grads(grads, len(core.params))
            interim = list(core.engine.interim) if core.nesterov else None
            if core.plain and grad_norm is None:
                core.engine.step(grads, core.plan, core.form)
            else:
                core.engine.bind(grads)
                plan = self._clip_plan(core, grads, grad_norm)
                if plan is None:
                    self.skipped_steps += 1
                else:
                    core.engine.run(plan, core.form)
            if interim is not None and interim != core.engine.interim:
                self._replace_untouched(core, grads, interim)
            return None
        finally:
            self._busy = False
            lock.release()

    def _replace_untouched(self, core, grads, before):
        """After a shifted-form step whose momentum differs from the last one's: the rows
        that a row-sparse gradient left alone still hold theta + alpha_prev v; move them to
        theta + alpha v, as the step moved the others (their theta does not change)."""
        engine = core.engine
        for gi in core.nesterov:
            delta = engine.interim[gi] - before[gi]
            for i in core.rows[gi]:
                g = grads[i]
                if not delta or type(g) is not SparseRows:
                    continue
                rest = np.ones(core.params[i].shape[0], bool)
                rest[g.indices] = False
                phi = self._phi_values(i)
                v = self._state_values(i, "velocity")
                self._set_phi(i, phi[rest] + v[rest] * phi.dtype.type(delta), rest)

    def _refuse_reentry(self, what):
        if self._theta_depth:
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
            values[name] = nxt[name] = self._scheduled(group, meta, name, k, where)
        for name in meta.ahead:
            nxt[name] = self._scheduled(group, meta, name, k + 1, where)
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

    def _closure_step(self, core, closure, grad_norm):
        """A step whose gradients come from ``closure``. For Nesterov groups this is the
        book's literal algorithm: their arrays move to the interim point theta + alpha v
        for the closure, and the update, applied there by the shifted kernel with no next
        interim point (phi' = phi - alpha v + v'), leaves theta' in them."""
        engine = core.engine
        if core.nesterov:
            self._check_form(_LITERAL)
            for gi in core.nesterov:
                for i in core.rows[gi]:
                    if core.how[i][0] != "none":
                        raise ValueError(
                            f"params[{i}] is {core.params[i].dtype}: the literal Nesterov "
                            f"form (step(closure=...)) needs float32/float64 parameters; "
                            f"use step(grads), the shifted form, with 16-bit parameters")
        if self._scratch is None and core.nesterov:
            self._scratch = {i: np.empty_like(core.params[i])
                             for gi in core.nesterov for i in core.rows[gi]}
        before = list(engine.steps)
        moved = []
        kept = [(s, s.alpha_prev, s.alpha_next)
                for s in (core.meta[gi].scalars for gi in core.nesterov)]
        try:
            for gi in core.nesterov:
                s = core.meta[gi].scalars
                alpha = s.alpha
                for i in core.rows[gi]:
                    p, th = core.params[i], self._scratch[i]
                    np.copyto(th, p)
                    moved.append(i)
                    np.multiply(self._state_values(i, "velocity"), alpha, out=p)
                    np.add(th, p, out=p)             # theta + alpha v
                s.alpha_prev, s.alpha_next = alpha, 0.0
            out = closure()
            loss, grads = None, out
            if (isinstance(out, tuple) and len(out) == 2
                    and not isinstance(out[0], (np.ndarray, list, tuple))):
                loss, grads = out
            grads = self._as_grads(grads, len(core.params))
            engine.bind(grads)
            plan = self._clip_plan(core, grads, grad_norm)
            if plan is None:
                self.skipped_steps += 1
            else:
                engine.run(plan, _LITERAL if core.nesterov else 0)
                for i in moved:          # rows a row-sparse gradient left: back to theta
                    g = grads[i]
                    if type(g) is SparseRows:
                        rest = np.ones(core.params[i].shape[0], bool)
                        rest[g.indices] = False
                        core.params[i][rest] = self._scratch[i][rest]
            return loss
        finally:
            for s, prev, nxt in kept:         # the shifted form's scalars, as they were
                s.alpha_prev, s.alpha_next = prev, nxt
            if engine.steps == before:        # not applied: put theta back
                for i in moved:
                    np.copyto(core.params[i], self._scratch[i])

    def _check_form(self, form):
        """Refuse to switch between the two Nesterov forms once steps were taken."""
        engine = self._core.engine
        if engine.form not in (0, form) and any(engine.steps):
            taken = _FORMS[engine.form]
            raise ValueError(
                f"this optimizer has taken Nesterov steps in the {taken} form (the arrays "
                f"hold {'the interim point' if taken == 'shifted' else 'theta'}); use "
                f"step({'grads' if taken == 'shifted' else 'closure='}) throughout, or "
                f"make a new optimizer")

    # ---- theta and the interim point ----------------------------------------------------

    def _shifted_rows(self):
        """(group index, parameter index) of every array that holds an interim point."""
        core = self._core
        if core.engine.form != _SHIFTED or self._theta_depth:
            return []
        return [(gi, i) for gi in core.nesterov for i in core.rows[gi]]

    def _theta_into(self, gi, i, out):
        """theta = phi - alpha v for a shifted-form row, into ``out`` (rounded to nearest
        for a 16-bit parameter)."""
        core = self._core
        phi = self._phi_values(i)
        theta = phi - self._state_values(i, "velocity") * phi.dtype.type(
            core.engine.interim[gi])
        storage.round_to(out, theta)
        return out

    def theta(self):
        """The parameters theta, as new arrays. In the shifted Nesterov form the arrays hold
        phi = theta + alpha v, and this returns phi - alpha v (inside ``at_theta()`` the
        arrays hold theta, and this returns copies of them)."""
        with self._lock:
            out = [p.copy() for p in self._core.params]
            for gi, i in self._shifted_rows():
                self._theta_into(gi, i, out[i])
            return out

    @contextlib.contextmanager
    def at_theta(self):
        """Within the block the parameter arrays hold theta (to evaluate or save the
        model); afterwards they hold exactly the bits they held before. Nested blocks are
        the outer one; no step can run inside (other threads wait for the block's end). A
        checkpoint saved inside saves what the arrays hold between steps, so it resumes
        exactly. A momentum set inside takes effect (the arrays move to its interim point)
        when the block ends."""
        with self._lock:
            if self._busy:
                self._refuse_reentry("at_theta()")
            if self._theta_depth:
                self._theta_depth += 1
                try:
                    yield self._core.params
                finally:
                    self._theta_depth -= 1
                return
            shifted = self._shifted_rows()
            params = self._core.params
            saved = {i: params[i].copy() for _, i in shifted}
            for gi, i in shifted:
                self._theta_into(gi, i, params[i])
            self._phi = saved
            self._theta_depth = 1
            try:
                yield params
            finally:
                for i, a in saved.items():
                    np.copyto(params[i], a)
                self._theta_depth = 0
                self._phi = None
                pending, self._pending = self._pending, set()
                for gi in sorted(pending):
                    self._replace_interim(gi)

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
            if self._phi and between is not None:
                index = {id(p): i for i, p in enumerate(core.params)}
                between = [self._phi.get(index.get(id(p), -1), p) for p in between]
            yield _statedict.state_dict(self, copy=False), between

    def load_state_dict(self, state_dict):
        """Restore a ``state_dict()``. Everything is checked first; a mismatch raises and
        changes nothing. State arrays are copied into the optimizer's own arrays."""
        with self._lock:
            if self._busy or self._theta_depth:
                self._refuse_reentry("load_state_dict()")
            if self._edits.dirty:
                self._refresh()
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

    def decoded_state(self, i):
        """The state of parameter ``i`` as float32/float64 numbers, copies (decoded from
        bfloat16 or 8-bit storage), with ``"master"`` for a master copy and ``"theta"``
        for the parameter's value between steps in float32 (16-bit parameters)."""
        with self._lock:
            core = self._core
            out = {name: np.array(self._state_values(i, name)) for name in core.how[i][1]}
            if core.how[i][0] != "none":
                out["theta"] = np.array(self._phi_values(i), np.float32)
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
            if self._busy or self._theta_depth:
                self._refuse_reentry("add_param_group()")
            if self._edits.dirty:
                self._refresh()
            engine = self._core.engine
            groups = list(self.param_groups)
            groups.append(self._complete(param_group, len(groups)))
            self._rebuild(groups, list(engine.steps) + [0], list(engine.interim) + [0.0],
                          engine.form)

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
