"""How an optimizer is built from its groups: each group checked (``check_group``), the
state of new parameters made, the kernel tables and engine built, and installed at once
(``rebuild``); a group edited between steps checked again (``refresh``). Everything a step
reads is one ``Core``, replaced whole."""

import math

import numpy as np

from . import storage
from ._groups import ParamGroup, StateList, StateView
from ._isa import K
from ._statedict import SHIFTED
from ._validation import check_param
from .rules import PARAM

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)


# ---------------------------------------------------------------------------------------
# What an optimizer holds between steps
# ---------------------------------------------------------------------------------------

class Meta:
    """One group: its parameters as the tables were built, the fixed hyperparameters and
    state names, the checked hyperparameters of the coming update, the names that are
    schedules, and the kernel's scalars."""

    __slots__ = ("params", "fixed", "layout", "values", "next_values", "scheduled",
                 "ahead", "scalars", "dtypes")


class Core:
    """Everything a step reads, replaced as a whole (one assignment) when the groups
    change: ``engine``, ``meta`` (per group), ``params``, ``state`` (owned arrays),
    ``views``, ``rows`` (global parameter indices per group), ``live`` (groups whose scalars
    change every step), ``nesterov`` (groups with Nesterov momentum), ``hooked`` (groups
    whose arrays the rule's point keeps elsewhere than theta: its step hooks run),
    ``form`` (what a grads step records), ``plain`` (no clipping by norm, no skipping),
    ``plan``, and ``how`` (per parameter: how it is kept and each state entry's storage)."""

    __slots__ = ("engine", "meta", "params", "state", "views", "rows", "live", "nesterov",
                 "hooked", "form", "plain", "plan", "how")

    def __init__(self, **kw):
        for k, v in kw.items():
            setattr(self, k, v)

    def replace(self, **kw):
        return Core(**dict({k: getattr(self, k) for k in self.__slots__}, **kw))


def dtypes_in(arrays):
    """The distinct dtypes of ``arrays``, in order of first appearance."""
    out = []
    for a in arrays:
        if a.dtype not in out:
            out.append(a.dtype)
    return out





def same_arrays(a, b):
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def check_group(opt, gi, group, step, n_groups, first_index, old):
    """Check one group at update number ``step`` (completed steps); returns its
    :class:`Meta`. ``old`` is its previous meta (None for a new group): the fixed
    hyperparameters and state names then stay as they were."""
    rule, where = opt.rule, opt._where(gi, n_groups)
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
    dtypes = tuple(dt for dt in (F32, F64)
                   if any((p.dtype == F64) == (dt == F64) for p in plist))
    meta = Meta()
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
        meta.next_values[k] = scheduled(opt, group, meta, k, step + 1, where)
    meta.scalars = K.Scalars(rule.kernel(meta.layout))
    rule.scalars(meta.scalars, meta.values, meta.next_values)
    return meta


def scheduled(opt, group, meta, name, step, where):
    h = opt.rule.hyper[name]
    value = h.check(group[name](step), where(name))
    for dt in meta.dtypes:
        h.check.fits(value, where(name), dt)
    return value


def rebuild(opt, groups, steps, interim, form):
    """Check ``groups`` (plain dicts or this optimizer's ParamGroups), make the state of
    new parameters (a parameter already optimized keeps its state arrays), build the
    tables, and install it all at once. On any error nothing changes."""
    old = opt._core
    old_meta = {id(g): m for g, m in zip(opt.param_groups, old.meta)} if old else {}
    n = len(groups)
    metas, params, rows = [], [], []
    for gi, g in enumerate(groups):
        m = check_group(opt, gi, g, steps[gi], n, len(params), old_meta.get(id(g)))
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
    check_storage(opt, params)
    check_sparse(opt, metas, params)
    state, layouts = [], []       # layouts: (state storage, first element index)
    for gi, m in enumerate(metas):
        fixed = dict(m.values, **m.fixed)
        index = opt.element_offset        # the group's elements, concatenated
        for p in m.params:
            st, stor = new_state(opt, p, m.layout, fixed, kept.get(id(p), {}),
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
        kinds = [(dt, rw) for dt in dtypes_in(params[i] for i in rows[gi])
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
            keep = keep_mode(opt, dt)
            catch = opt.sparse == "catch_up"
            trust = None
            if opt.rule.trust_ratio:        # per row: whether it takes the trust ratio
                trust = [not (m.fixed.get("exclude_1d") and params[i].ndim < 2)
                         for i in sel]
            tables.append(K.Table(
                [params[i] for i in sel], cols, sel, guard, storage=stor, keep=keep,
                aux=aux, base=[layouts[i][1] for i in sel], rowwise=rw,
                last=[state[i].get("last_step") for i in sel] if catch else None,
                dense_step=[state[i].get("dense_step") for i in sel] if catch
                else None, trust=trust))
            owners.append(gi)
    engine = K.Engine(tables, owners, [m.scalars for m in metas], steps, interim, form,
                      opt.seed)
    pgroups = [g if isinstance(g, ParamGroup) and g._edits is opt._edits
               else ParamGroup(g, opt._edits) for g in groups]
    how = [(keep_mode(opt, p.dtype), dict(zip(metas[gi].layout, layouts[i][0])))
           for gi in range(len(metas)) for i, p in
           ((i, params[i]) for i in rows[gi])]
    core = make_core(opt, engine, metas, params, state, rows, how)
    # install (one assignment for everything a step reads)
    opt._core = core
    list.__init__(opt.param_groups, pgroups)
    for g in pgroups:
        g.changed = False
    opt._edits.dirty = False
    opt._point.rebuilt()


def check_storage(opt, params):
    sixteen = [i for i, p in enumerate(params) if storage.is_16bit(p.dtype)]
    if sixteen and opt.rule.trust_ratio:
        raise ValueError(f"params[{sixteen[0]}] is {params[sixteen[0]].dtype}: "
                         f"{type(opt).__name__}'s per-tensor norms run on float32/float64 "
                         f"parameters only")
    if opt._param_mode is not None and not sixteen:
        raise ValueError(f"param_mode={opt._param_mode!r} is for float16/bfloat16 "
                         f"parameters; these are {dtypes_in(params)[0]}")
    f64 = [i for i, p in enumerate(params) if p.dtype == F64]
    if f64 and opt._state_format is not None:
        raise ValueError(f"state_format={opt._state_format!r}: params[{f64[0]}] is "
                         f"float64, whose state stays float64; leave state_format "
                         f"unset or make the parameters float32")


def check_sparse(opt, metas, params):
    for m in metas:
        if not m.fixed.get("rowwise"):
            continue
        sixteen = [p for p in m.params if storage.is_16bit(p.dtype)]
        if sixteen or opt._state_format not in (None, "float32"):
            what = (f"a {sixteen[0].dtype} parameter" if sixteen
                    else f"state_format={opt._state_format!r}")
            raise ValueError(f"rowwise=True needs float32/float64 parameters and "
                             f"float32 state (got {what}); use rowwise=False for "
                             f"16-bit parameters or compressed state")
    if opt.sparse != "catch_up":
        return
    for m in metas:
        kernel = opt.rule.kernel(m.layout)
        if not K.CATCH_UP[kernel]:
            raise ValueError(f"sparse='catch_up': {type(opt).__name__} has no closed form "
                             f"for the steps a row misses (a zero gradient still moves "
                             f"theta); use sparse='lazy'")
    why = None
    if any(m.fixed.get("nesterov") for m in metas):
        why = "Nesterov momentum has no closed-form catch-up"
    elif any(m.fixed.get("convention", "book") != "book" for m in metas):
        why = "the catch-up is the book's rules' (convention='book')"
    elif opt._state_format not in (None, "float32"):
        why = f"state_format={opt._state_format!r}"
    elif any(storage.is_16bit(p.dtype) for p in params):
        why = "16-bit parameters"
    if why:
        raise ValueError(f"sparse='catch_up' needs float32/float64 parameters and "
                         f"state and no Nesterov momentum ({why}); use sparse='lazy'")


def keep_mode(opt, dtype):
    """How parameters of ``dtype`` are kept (the kernels' name)."""
    if not storage.is_16bit(dtype):
        return "none"
    return opt._param_mode or "master"


def new_state(opt, p, layout, fixed, have, step):
    """The state entries of parameter ``p`` (reusing the arrays of ``have`` that fit)
    and the storage of each layout name; ``step``: the group's completed steps (a
    parameter added later has missed none of them: catch-up starts there)."""
    compute = F64 if p.dtype == F64 else F32
    fmt = None if p.dtype == F64 else opt._state_format
    stor = [storage.state_storage(fmt, opt.rule.kinds[name]) for name in layout]
    st = {}
    for name, how in zip(layout, stor):
        a = have.get(name)
        scales = have.get(name + ".absmax")
        want = compute if how == "float32" else (np.uint8 if how.startswith("q8")
                                                else np.uint16)
        shape = (p.shape if opt.rule.state_shape is None
                 else tuple(opt.rule.state_shape(name, p.shape, fixed)))
        if shape != p.shape and how != "float32":
            raise ValueError(f"row-wise state needs state_format 'float32', got "
                             f"{opt._state_format!r}")
        if (a is None or a.shape != shape or a.dtype != want
                or how.startswith("q8") != (scales is not None)):
            fill = opt.rule.initial.get(name)
            if fill == PARAM:                      # a copy of p's values
                a, scales = (storage.to_float32(p) if compute == F32
                             else np.array(p, compute)), None
            else:
                a, scales = storage.new_state(how, shape, 0.0 if fill is None
                                              else fill(fixed), compute)
        st[name] = a
        if scales is not None:
            st[name + ".absmax"] = scales
    if opt.sparse == "catch_up" and p.ndim == 2:
        last, ds = have.get("last_step"), have.get("dense_step")
        fits = last is not None and last.shape == p.shape[:1] and ds is not None
        st["last_step"] = last if fits else np.full(p.shape[:1], step, np.int64)
        st["dense_step"] = ds if fits else np.full(1, step, np.int64)
    keep = keep_mode(opt, p.dtype)
    if keep == "master":
        m = have.get("master")
        st["master"] = (m if m is not None and m.shape == p.shape
                        else storage.to_float32(p))
    elif keep == "kahan":
        c = have.get("compensation")
        st["compensation"] = (c if c is not None and c.shape == p.shape
                              else np.zeros(p.shape, np.uint16))
    return st, stor


def make_core(opt, engine, metas, params, state, rows, how):
    nesterov = tuple(gi for gi, m in enumerate(metas) if opt.rule.shifted(m.fixed))
    plain = opt.clip_norm is None and not opt.skip_nonfinite
    plan = K.GradPlan(1.0, math.inf if opt.clip_value is None else opt.clip_value)
    return Core(engine=engine, meta=metas, params=params, state=state,
                 views=StateList(StateView(st) for st in state), rows=rows,
                 live=tuple(gi for gi, m in enumerate(metas) if m.scheduled),
                 nesterov=nesterov, hooked=opt._point.hooked(metas),
                 form=SHIFTED if nesterov else 0, plain=plain,
                 plan=plan, how=how)


def refresh(opt):
    """Check the groups changed since the last step; rebuild if any ``"params"``
    changed."""
    core, groups = opt._core, opt.param_groups
    engine = core.engine
    changed = [gi for gi, g in enumerate(groups) if g.changed]
    for gi in changed:
        if "params" not in groups[gi]:
            raise TypeError(f"param_groups[{gi}]: missing the 'params' entry")
    if any(not same_arrays(groups[gi]["params"], core.meta[gi].params)
           for gi in changed):
        rebuild(opt, list(groups), list(engine.steps), list(engine.interim),
                      engine.form)
        return
    metas = list(core.meta)
    first = [r[0] for r in core.rows]
    for gi in changed:
        metas[gi] = check_group(opt, gi, groups[gi], engine.steps[gi], len(groups),
                                      first[gi], core.meta[gi])
    new_engine = K.Engine(list(engine.tables), engine.groups,
                          [m.scalars for m in metas], list(engine.steps),
                          list(engine.interim), engine.form, engine.seed)
    opt._core = make_core(opt, new_engine, metas, core.params, core.state,
                                 core.rows, core.how).replace(views=core.views)
    for gi in changed:
        groups[gi].changed = False
    opt._edits.dirty = False
