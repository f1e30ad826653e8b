"""State dicts of the optimizers: what ``Optimizer.state_dict()`` returns and
``load_state_dict()`` restores, checked entirely before anything changes, and the
hyperparameters as plain data (schedules as dicts)."""

import numpy as np

from ._isa import K
from ._validation import Integer, count, nonnegative, unit_interval

SHIFTED, LITERAL = 1, 2            # the Engine's codes of the two Nesterov forms
FORMS = {0: None, SHIFTED: "shifted", LITERAL: "literal"}
FORM_CODES = {v: k for k, v in FORMS.items()}
seed_value = Integer(0, 2 ** 64 - 1, "an integer in [0, 2**64)")


def encode_hyperparameter(value, pickling=False):
    """A hyperparameter as plain (JSON) data, for ``state_dict()`` and checkpoints: a
    schedule becomes ``{"schedule": ...}`` (its ``to_dict()``), a tuple a list. Plain data
    cannot hold code, so any other callable raises ``TypeError``.

    With ``pickling=True`` (pickle and ``copy.deepcopy`` of an optimizer) a callable
    without ``to_dict()`` is kept as it is, if pickle can save it: a module-level function
    (pickle stores it by its importable name), a ``functools.partial`` of one, an instance
    of a picklable class with ``__call__``. What pickle cannot save (a lambda, a function
    defined inside another) raises ``TypeError``."""
    if callable(value):
        to_dict = getattr(value, "to_dict", None)
        if to_dict is not None:
            return {"schedule": to_dict()}
        if not pickling:
            raise TypeError(f"cannot save the hyperparameter {value!r} in a state dict or "
                            f"checkpoint: a callable needs a to_dict() method (use a "
                            f"ch8fast.schedules schedule; pickle and copy.deepcopy also "
                            f"take a module-level function)")
        return _picklable_callable(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def _picklable_callable(value):
    """``value`` if pickle can save it, else a ``TypeError`` that says why."""
    import pickle
    try:
        pickle.dumps(value)
    except Exception as e:        # PicklingError, AttributeError or TypeError by case
        raise TypeError(
            f"cannot pickle or deep-copy the hyperparameter {value!r}: pickle stores a "
            f"function by its importable name (module and qualified name), and a lambda "
            f"or a function defined inside another function has none ({e}); use a "
            f"ch8fast.schedules schedule, or a function defined at module level (with a "
            f"functools.partial of it for its arguments)") from e
    return value


def decode_hyperparameter(value):
    """The inverse of :func:`encode_hyperparameter`."""
    if isinstance(value, dict) and set(value) == {"schedule"}:
        from . import schedules
        return schedules.Schedule.from_dict(value["schedule"])
    if isinstance(value, list):
        return tuple(value)
    return value


def _namer(where):
    return lambda k: f"{where}['{k}']"


def state_dict(opt, copy, pickling=False):
    """The state dict of optimizer ``opt`` (its arrays copied, or the arrays themselves;
    callables as pickle takes them with ``pickling``)."""
    core = opt._core
    engine = core.engine
    groups = []
    for gi, g in enumerate(opt.param_groups):
        d = {k: encode_hyperparameter(v, pickling) for k, v in g.items()
             if k != "params"}
        d["params"] = list(core.rows[gi])
        d["step"] = engine.steps[gi]
        d["interim_momentum"] = engine.interim[gi]
        d.update(opt._point.counters(gi))
        groups.append(d)
    return {
        "optimizer": type(opt).__name__,
        "version": 2,
        "storage": storage_record(opt),
        "nesterov_form": FORMS[engine.form],
        "skipped_steps": opt.skipped_steps,
        "param_groups": groups,
        "state": [{k: a.copy() if copy else a for k, a in st.items()}
                  for st in core.state],
    }


def storage_record(opt):
    """How ``opt`` stores its state, as a state dict records it."""
    return {"state_format": opt._state_format, "param_mode": opt._param_mode,
            "seed": opt.seed}


def load(opt, sd):
    """Check the state dict ``sd`` against ``opt`` entirely, then restore it (a mismatch
    raises and changes nothing)."""
    rule, core = opt.rule, opt._core
    if not isinstance(sd, dict):
        raise TypeError(f"state_dict must be a dict, got {type(sd).__name__}")
    for key in ("optimizer", "version", "param_groups", "state", "nesterov_form",
                "skipped_steps"):
        if key not in sd:
            raise ValueError(f"state_dict has no {key!r} entry")
    if sd["optimizer"] != type(opt).__name__:
        raise ValueError(f"state_dict is for {sd['optimizer']}, not "
                         f"{type(opt).__name__}")
    if sd["version"] not in (1, 2):
        raise ValueError(f"state_dict version {sd['version']} is not supported")
    saved_storage = (sd.get("storage") if sd["version"] == 2 else
                     {"state_format": None, "param_mode": None, "seed": 0})
    if not isinstance(saved_storage, dict) or set(saved_storage) != {
            "state_format", "param_mode", "seed"}:
        raise ValueError(f"state_dict['storage'] must be a dict of state_format, "
                         f"param_mode and seed, got {saved_storage!r}")
    mine = storage_record(opt)
    for k in ("state_format", "param_mode"):
        if saved_storage[k] != mine[k]:
            raise ValueError(f"state_dict was saved with {k}={saved_storage[k]!r}, "
                             f"this optimizer has {k}={mine[k]!r}")
    seed = seed_value(saved_storage["seed"], "state_dict['storage']['seed']")
    if sd["nesterov_form"] not in FORM_CODES:
        raise ValueError(f"state_dict['nesterov_form'] is {sd['nesterov_form']!r}")
    skipped = count(sd["skipped_steps"], "state_dict['skipped_steps']")
    groups = sd["param_groups"]
    if not isinstance(groups, list):
        raise TypeError(f"state_dict['param_groups'] must be a list, got "
                        f"{type(groups).__name__}")
    if len(groups) != len(opt.param_groups):
        raise ValueError(f"state_dict has {len(groups)} param groups, this optimizer "
                         f"has {len(opt.param_groups)}")
    new_values, steps, interim, counters = [], [], [], []
    kept = opt._point.COUNTERS
    for gi, (saved, meta) in enumerate(zip(groups, core.meta)):
        where = f"state_dict['param_groups'][{gi}]"
        if not isinstance(saved, dict):
            raise TypeError(f"{where} must be a dict, got {type(saved).__name__}")
        if saved.get("params") != list(core.rows[gi]):
            raise ValueError(f"{where}['params'] is {saved.get('params')}, expected "
                             f"{list(core.rows[gi])}")
        expected = set(rule.hyper) | {"params", "step", "interim_momentum", *kept}
        if set(saved) != expected:
            raise ValueError(f"{where} has entries {sorted(saved)}, expected "
                             f"{sorted(expected)}")
        name = _namer(where)
        values = {k: decode_hyperparameter(saved[k]) for k in rule.hyper}
        for k, v in meta.fixed.items():
            if rule.check(k, values[k], name(k)) != v:
                raise ValueError(f"{name(k)} is {values[k]}, but this optimizer was "
                                 f"made with {k}={v}")
        step = count(saved["step"], name("step"))
        need = rule.state({**values, **meta.fixed})
        missing = [n for n in need if n not in meta.layout]
        if missing:
            raise ValueError(f"{where}: its hyperparameters need the state {missing} "
                             f"(e.g. momentum > 0 needs 'velocity'), which this group "
                             f"was made without; make the optimizer with the same "
                             f"momentum settings")
        plain = {k: (v(step) if callable(v) and k not in meta.fixed else v)
                 for k, v in values.items()}
        rule.check_all(plain, name, meta.dtypes, meta.layout)
        steps.append(step)
        interim.append(unit_interval(saved["interim_momentum"],
                                     name("interim_momentum")))
        counters.append({k: nonnegative(saved[k], name(k)) for k in kept})
        new_values.append(values)
    state = sd["state"]
    if not isinstance(state, list) or len(state) != len(core.state):
        raise ValueError(f"state_dict['state'] must be a list of {len(core.state)} "
                         f"dicts (one per parameter)")
    for i, (saved, mine) in enumerate(zip(state, core.state)):
        if not isinstance(saved, dict) or set(saved) != set(mine):
            raise ValueError(f"state_dict['state'][{i}] must have the entries "
                             f"{sorted(mine)}, got "
                             f"{sorted(saved) if isinstance(saved, dict) else saved!r}")
        for k, a in mine.items():
            b = saved[k]
            where = f"state_dict['state'][{i}][{k!r}]"
            if not isinstance(b, np.ndarray) or isinstance(b, np.ma.MaskedArray):
                raise TypeError(f"{where} must be a numpy.ndarray (not masked), got "
                                f"{type(b).__name__}")
            if b.dtype != a.dtype or b.shape != a.shape:
                raise ValueError(f"{where} has shape {b.shape} and dtype {b.dtype}, "
                                 f"expected {a.shape} and {a.dtype}")
    # Everything checked: apply, with the momentum hook quiet (the saved interim
    # momentum is restored as it was).
    for saved, mine in zip(state, core.state):
        for k, a in mine.items():
            np.copyto(a, saved[k])
    hook = opt._edits.hook
    opt._edits.hook = lambda group, keys: None
    try:
        for group, values in zip(opt.param_groups, new_values):
            group.update(values)
    finally:
        opt._edits.hook = hook
    core.engine.set_counters(steps, interim, FORM_CODES[sd["nesterov_form"]])
    opt._point.set_counters(counters)
    opt.skipped_steps = skipped
    if seed != opt.seed:                 # the saved seed: resuming is exact
        opt.seed = seed
        rebuild_engine_seed(opt)
    from ._build import refresh      # (the builder imports this module)
    refresh(opt)


def rebuild_engine_seed(opt):
    """A new engine for ``opt``'s new seed (its random words), the rest as it was."""
    core = opt._core
    e = core.engine
    opt._core = core.replace(engine=K.Engine(list(e.tables), e.groups, list(e.scalars),
                                              list(e.steps), list(e.interim), e.form,
                                              opt.seed))
