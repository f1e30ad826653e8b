"""The product of the axes, not each axis alone: rule x option x storage (parameter dtype,
``param_mode``, ``state_format``) x gradient form (dense, lazy rows, catch-up, row-wise) x
Nesterov form (shifted, literal) x schedule x clipping x row length (below, at and above
the codec's 256-element block) x threads, each case checked against the promise it
carries:

* construction: the optimizer is refused when made exactly where the combination has no
  sound meaning, with a message naming the option;
* a lazy row-sparse step is, by definition, the dense step of the same (zero-filled)
  gradient on the touched rows, and nothing on the others: every case is checked against
  a deep copy of the optimizer stepped densely, bit for bit on the touched rows (the same
  codec, the same random words, the same clipping scale), and the other rows' parameters
  (theta, for the shifted Nesterov form) and state unchanged;
* catch-up equals dense training with zero rows where the docs say it is exact (and its
  moments do for Adam);
* the dense form gives the same bits for 1 and 2 threads.

The full product has a few thousand valid cases; each run checks a seeded random sample of
``CH8FAST_PRODUCT_CASES`` (default 2000) of them, the seed ``CH8FAST_PRODUCT_SEED``
(default: the day's number, so that successive days cover more of it); a failing case's id
says everything needed to rerun it alone.
"""

import copy
import datetime
import itertools
import os
import random
import zlib

import numpy as np
import pytest

import ch8fast
from ch8fast import SparseRows, schedules

ml_dtypes = pytest.importorskip("ml_dtypes")

# (id, class, hyperparameters, flags): "momentum" the rule keeps a velocity (a momentum
# schedule applies), "exact" catch-up is exact, "moments" catch-up is exact for the
# state only, "rowwise" a 2-D parameter only
RULES = [
    ("sgd", ch8fast.SGD, dict(lr=0.1), {"exact"}),
    ("sgd_l2", ch8fast.SGD, dict(lr=0.1, weight_decay=0.01), set()),
    ("momentum", ch8fast.SGD, dict(lr=0.05, momentum=0.9), {"momentum", "exact"}),
    ("nesterov", ch8fast.SGD, dict(lr=0.05, momentum=0.9, nesterov=True), {"momentum"}),
    ("torch_nesterov", ch8fast.SGD, dict(lr=0.05, momentum=0.9, nesterov=True,
                                         convention="torch"), {"momentum"}),
    ("torch_dampening", ch8fast.SGD, dict(lr=0.05, momentum=0.9, dampening=0.1,
                                          convention="torch"), {"momentum"}),
    ("adagrad", ch8fast.AdaGrad, dict(lr=0.1), {"exact"}),
    ("adagrad_optax", ch8fast.AdaGrad, dict(lr=0.1, eps=0.1, convention="optax"), set()),
    ("adagrad_rowwise", ch8fast.AdaGrad, dict(lr=0.1, rowwise=True), {"rowwise"}),
    ("adagrad_rowwise_optax", ch8fast.AdaGrad, dict(lr=0.1, eps=0.1, rowwise=True,
                                                    convention="optax"), {"rowwise"}),
    ("rmsprop", ch8fast.RMSProp, dict(lr=0.01), {"exact"}),
    ("rmsprop_centered", ch8fast.RMSProp, dict(lr=0.01, centered=True), {"exact"}),
    ("rmsprop_momentum_centered", ch8fast.RMSProp,
     dict(lr=0.01, momentum=0.5, centered=True), {"momentum", "exact"}),
    ("rmsprop_nesterov", ch8fast.RMSProp, dict(lr=0.01, momentum=0.5, nesterov=True),
     {"momentum"}),
    ("rmsprop_torch_centered", ch8fast.RMSProp,
     dict(lr=0.01, momentum=0.5, centered=True, convention="torch"), {"momentum"}),
    ("adam", ch8fast.Adam, dict(lr=0.01), {"moments"}),
    ("adam_amsgrad_l2", ch8fast.Adam, dict(lr=0.01, amsgrad=True, weight_decay=0.01),
     set()),
    ("adamw", ch8fast.AdamW, dict(lr=0.01, weight_decay=0.1), {"moments"}),
    ("adam_torch", ch8fast.Adam, dict(lr=0.01, convention="torch"), set()),
    ("adadelta", ch8fast.AdaDelta, dict(), {"exact"}),
    ("lion", ch8fast.Lion, dict(lr=1e-3, weight_decay=0.1), {"no_catch_up"}),
    ("adopt", ch8fast.ADOPT, dict(lr=1e-2, weight_decay=0.01, nesterov=True),
     {"no_catch_up"}),
    ("ademamix", ch8fast.AdEMAMix, dict(lr=1e-2, weight_decay=0.1, beta3=0.99), {"moments"}),
    ("schedule_free_sgd", ch8fast.ScheduleFreeSGD, dict(lr=0.1, weight_decay=0.01,
                                                         warmup_steps=2), {"no_catch_up"}),
    ("schedule_free_adamw_optax", ch8fast.ScheduleFreeAdamW,
     dict(lr=1e-2, weight_decay=0.1, warmup_steps=2, convention="optax"), {"no_catch_up"}),
    ("lamb", ch8fast.LAMB, dict(lr=1e-2, weight_decay=0.01, exclude_1d=True),
     {"no_catch_up", "trust"}),
    ("lars", ch8fast.LARS, dict(lr=0.5, weight_decay=0.01, trust_coefficient=0.02),
     {"no_catch_up", "trust", "momentum"}),
]

BF16, F16 = np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16)
STORAGES = ([("float64", None, None), ("float32", None, None),
             ("float32", None, "bfloat16"), ("float32", None, "q8")]
            + [(dt, keep, fmt) for dt in ("bfloat16", "float16")
               for keep in ("master", "stochastic", "kahan")
               for fmt in (None, "bfloat16", "q8")])
FORMS = ["dense", "lazy", "catch_up"]
NESTEROV_FORMS = ["shifted", "literal"]
SCHEDULES = ["constant", "lr", "momentum"]
CLIPS = [None, "norm", "value"]
ROW_LENGTHS = [7, 256, 300]
THREADS = [1, 2]


def _dtype(name):
    return {"float64": np.float64, "float32": np.float32, "bfloat16": BF16,
            "float16": F16}[name]


def refusal(rule, store, form, nform):
    """Why the optimizer must be refused when made, or None."""
    name, cls, hyper, flags = rule
    dt, keep, fmt = store
    convention = hyper.get("convention", "book")
    if form == "catch_up":
        if "no_catch_up" in flags:
            return "sparse"
        if hyper.get("nesterov"):
            return "Nesterov"
        if convention != "book":
            return "convention"
        if fmt not in (None, "float32"):
            return "state_format"
        if keep is not None:
            return "16-bit"
    if "rowwise" in flags and (fmt is not None or keep is not None):
        return "rowwise"
    if fmt is not None and fmt not in cls.rule.state_formats:
        return "state_format"
    if "trust" in flags and dt not in ("float32", "float64"):
        return "16-bit"
    return None


def step_refusal(opt, store, form, nform):
    """Why a step must be refused (a gradient's sparsity is known at the step only)."""
    dt, keep, fmt = store
    has_state = any(k not in ("master", "compensation", "last_step", "dense_step")
                    for k in opt.state[0])
    if form != "dense" and fmt == "q8" and has_state:
        return "state_format"
    if nform == "literal" and keep is not None:
        return "literal"
    if form == "lazy" and opt.rule.trust_ratio:
        return "row-sparse"
    return None


def _all_cases():
    out = []
    for rule, store, form, sched, clip, d, nt in itertools.product(
            RULES, STORAGES, FORMS, SCHEDULES, CLIPS, ROW_LENGTHS, THREADS):
        name, cls, hyper, flags = rule
        if sched == "momentum" and "momentum" not in flags:
            continue
        # the two forms of a step where the arrays hold the shifted Nesterov interim point
        nforms = (NESTEROV_FORMS if cls.rule.shifted(dict(cls.rule.defaults(), **hyper))
                  else ["shifted"])
        for nform in nforms:
            out.append((rule, store, form, nform, sched, clip, d, nt))
    return out


def _case_id(c):
    rule, store, form, nform, sched, clip, d, nt = c
    return "-".join(str(x) for x in (rule[0], *store, form, nform, sched, clip, d, nt))


def _sample():
    cases = _all_cases()
    n = int(os.environ.get("CH8FAST_PRODUCT_CASES", "2000"))
    seed = int(os.environ.get("CH8FAST_PRODUCT_SEED",
                              datetime.date.today().toordinal()))
    rng = random.Random(seed)
    # every rule and every storage at least once, then the rest at random
    picked = {}
    for key in [r[0] for r in RULES] + [s for s in STORAGES]:
        pool = [c for c in cases if c[0][0] == key or c[1] == key]
        c = rng.choice(pool)
        picked[_case_id(c)] = c
    for c in rng.sample(cases, min(n, len(cases))):
        if len(picked) >= max(n, len(RULES) + len(STORAGES)):
            break
        picked[_case_id(c)] = c
    return list(picked.values()), len(cases), seed


CASES, N_ALL, SEED = _sample()


def test_the_sample_is_reported():
    """(The sample's size and seed, for the test log.)"""
    print(f"product: {len(CASES)} of {N_ALL} cases, seed {SEED}")
    assert len(CASES) >= len(RULES)


def _make(rule, store, form, sched, clip, params, seed=3):
    name, cls, hyper, flags = rule
    dt, keep, fmt = store
    hyper = dict(hyper)
    if sched == "lr":
        hyper["lr"] = schedules.linear_decay(hyper.get("lr", 1.0), 5)
    elif sched == "momentum":
        hyper["momentum"] = schedules.momentum_ramp(0.5, 0.9, 4)
    kw = {}
    if keep is not None:
        kw["param_mode"] = keep
    if fmt is not None:
        kw["state_format"] = fmt
    if clip == "norm":
        kw["clip_norm"] = 1.0
    elif clip == "value":
        kw["clip_value"] = 0.5
    if form == "catch_up":
        kw["sparse"] = "catch_up"
    return cls(params, **hyper, **kw, seed=seed, skip_nonfinite=True)


def _bytes(opt, i):
    st = {k: np.array(v).tobytes() for k, v in opt.state[i].items()}
    return opt.params[i].tobytes(), st


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_product(case):
    rule, store, form, nform, sched, clip, d, nt = case
    name, cls, hyper, flags = rule
    dtype = _dtype(store[0])
    rng = np.random.default_rng(zlib.crc32(_case_id(case).encode()))
    n_rows = 9 if d != 300 or nt == 1 else 120     # 2 threads: a table past the cutoff
    E = rng.standard_normal((n_rows, d)).astype(np.float32).astype(dtype)
    b = rng.standard_normal(5).astype(np.float32).astype(dtype)
    params = [E] if "rowwise" in flags else [E, b]
    why = refusal(rule, store, form, nform)
    if why is not None:
        before = [p.copy() for p in params]
        with pytest.raises((ValueError, TypeError)) as err:
            _make(rule, store, form, sched, clip, params)
        msg = str(err.value)
        assert any(word in msg for word in ("sparse", "state_format", "param_mode",
                                            "convention", "nesterov", "Nesterov",
                                            "rowwise", "float32/float64")), msg
        for p, q in zip(params, before):
            assert p.tobytes() == q.tobytes()
        return
    ch8fast.set_num_threads(nt)
    try:
        opt = _make(rule, store, form, sched, clip, params)
        refused = step_refusal(opt, store, form, nform)
        if refused is not None:
            _check_step_refused(opt, params, rng, dtype, nform, form)
        elif form == "dense":
            _check_dense(opt, params, rng, dtype, nform)
        elif form == "lazy":
            _check_lazy(opt, params, rng, dtype, nform)
        else:
            _check_catch_up(rule, store, sched, clip, opt, params, rng, dtype)
    finally:
        ch8fast.set_num_threads(0)


def _grads(params, rng, dtype, k):
    gdt = dtype if dtype in (np.float64, np.float32) else np.float32
    rows = rng.integers(0, params[0].shape[0], k)
    rows[:2] = rows[2]                                 # duplicates
    sp = SparseRows(rows, (rng.standard_normal((k, params[0].shape[1])) * 0.5).astype(gdt))
    rest = [(rng.standard_normal(p.shape) * 0.5).astype(gdt) for p in params[1:]]
    return sp, rest


def _step(opt, grads, nform, grad_norm=None):
    if nform == "literal":
        return opt.step(closure=lambda: list(grads), grad_norm=grad_norm)
    return opt.step(list(grads), grad_norm=grad_norm)


def _check_dense(opt, params, rng, dtype, nform):
    """The same bits for 1 and 2 threads (and any split), dense gradients."""
    twin = copy.deepcopy(opt)
    for t in range(4):
        sp, rest = _grads(params, rng, dtype, 4)
        grads = [sp.to_dense(params[0].shape[0]).astype(sp.values.dtype)] + rest
        _step(opt, grads, nform)
        ch8fast.set_num_threads(3 - ch8fast.get_num_threads())
        _step(twin, [g.copy() for g in grads], nform)
        ch8fast.set_num_threads(3 - ch8fast.get_num_threads())
        for i in range(len(params)):
            assert _bytes(opt, i) == _bytes(twin, i), (t, i)


def _check_step_refused(opt, params, rng, dtype, nform, form):
    """A clear ValueError naming the option, and nothing changed."""
    sp, rest = _grads(params, rng, dtype, 4)
    g0 = sp if form != "dense" else sp.to_dense(params[0].shape[0])
    before = [_bytes(opt, i) for i in range(len(params))]
    with pytest.raises(ValueError, match="state_format|literal Nesterov|row-sparse"):
        _step(opt, [g0] + rest, nform)
    assert [_bytes(opt, i) for i in range(len(params))] == before


def _check_lazy(opt, params, rng, dtype, nform):
    n_rows = params[0].shape[0]
    for t in range(5):
        sp, rest = _grads(params, rng, dtype, 4)
        if t == 3:                               # a step skipped for a non-finite gradient
            sp.values[0, 0] = np.inf
        dense = [sp.to_dense(n_rows)] + [g.copy() for g in rest]
        twin = copy.deepcopy(opt)
        theta_before = opt.theta()[0] if nform == "shifted" else None
        state_before = {k: np.array(v) for k, v in opt.state[0].items()}
        p_before = params[0].copy()
        _step(opt, [sp] + rest, nform)
        _step(twin, dense, nform, grad_norm=opt.last_grad_norm)
        assert opt.skipped_steps == twin.skipped_steps
        touched = np.unique(sp.indices)
        other = np.setdiff1d(np.arange(n_rows), touched)
        # the touched rows: the dense step's bits; the others: unchanged
        assert params[0][touched].tobytes() == twin.params[0][touched].tobytes(), t
        for i in range(1, len(params)):
            assert _bytes(opt, i) == _bytes(twin, i), (t, i)
        for k, v in opt.state[0].items():
            if k in ("last_step", "dense_step") or np.ndim(v) == 0:
                continue
            if theta_before is not None and k in ("master", "compensation"):
                continue          # the interim point (checked as theta below)
            rows_t = _state_rows(v, touched, n_rows)
            rows_o = _state_rows(v, other, n_rows)
            assert rows_t.tobytes() == _state_rows(twin.state[0][k], touched,
                                                   n_rows).tobytes(), (t, k)
            assert rows_o.tobytes() == _state_rows(state_before[k], other,
                                                   n_rows).tobytes(), (t, k)
        if theta_before is not None and opt.steps[0] > 1:
            # the shifted form: theta of a row left alone does not move (its interim point
            # may, with the momentum)
            th = opt.theta()[0].astype(np.float64)
            np.testing.assert_allclose(th[other], theta_before[other].astype(np.float64),
                                       rtol=_rtol(dtype), atol=_rtol(dtype))
        elif theta_before is not None:
            # the first step: a row left alone keeps its values (its velocity is 0), but its
            # re-placed interim point phi - alpha v + alpha' v may turn a -0 into +0
            assert np.array_equal(params[0][other].astype(np.float64),
                                  p_before[other].astype(np.float64)), t
        else:
            assert params[0][other].tobytes() == p_before[other].tobytes(), t


def _state_rows(v, rows, n_rows):
    v = np.asarray(v)
    if v.shape[:1] == (n_rows,):
        return v[rows]
    return v                                   # (a scalar-per-tensor entry)


def _rtol(dtype):
    return {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-6}.get(
        np.dtype(dtype), 1e-2)


def _check_catch_up(rule, store, sched, clip, opt, params, rng, dtype):
    """Against dense training with zero rows: exact rules to rounding (params and state),
    Adam's moments; the other rules run and stay finite."""
    name, cls, hyper, flags = rule
    n_rows = params[0].shape[0]
    dense_params = [p.copy() for p in params]
    dense = _make(rule, store, "dense", sched, clip, dense_params)
    for t in range(6):
        sp, rest = _grads(params, rng, dtype, 3)
        opt.step([sp] + rest)
        dense.step([sp.to_dense(n_rows)] + [g.copy() for g in rest],
                   grad_norm=opt.last_grad_norm)
    g = [(rng.standard_normal(p.shape) * 0.1).astype(p.dtype) for p in params]
    opt.step(g)
    dense.step([x.copy() for x in g], grad_norm=opt.last_grad_norm)
    exact = "exact" in flags and sched == "constant" and clip != "value"
    rtol = 1e-9 if dtype == np.float64 else 1e-4
    if exact or "moments" in flags and sched == "constant" and clip != "value":
        for k, v in dense.state[0].items():
            np.testing.assert_allclose(opt.state[0][k], v, rtol=rtol, atol=rtol * 1e-3,
                                       err_msg=k)
    if exact:
        np.testing.assert_allclose(params[0], dense_params[0], rtol=rtol, atol=rtol * 1e-3)
    assert np.isfinite(params[0]).all()
