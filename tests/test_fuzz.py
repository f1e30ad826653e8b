"""Property tests with hypothesis: random configurations against the NumPy reference, and
random bad inputs, which must raise TypeError/ValueError and change nothing.

Profiles: "ci" (the default, a few hundred examples in all) and "deep" (many more), chosen
with the environment variable CH8FAST_FUZZ=deep. They are applied per test, so the global
hypothesis settings of other test files are left alone.

What the reference comparison compares, after every step: for every parameter and state
array, NaN at the same places, infinities at the same places with the same signs, and the finite entries at
rtol 1e-12 (float64) or 1e-6 (float32) with an absolute floor of rtol times the largest
finite magnitude, among the entries whose gradients come from the same magnitude class
(tiny, normal or huge), of the reference's result and of the values the step combined
into it (the array before the step; for a parameter also the velocity), since a sum
that cancels keeps the rounding of its terms. The update rules are element-wise, so entries of one class see
values of one scale. Before each step the reference takes ch8fast's parameters and state,
so that a rounding difference of one step is not amplified by an ill-conditioned next
step (with weight decay, Adam divides by |g + wd theta| + eps, which can turn one ulp of
theta into 1/eps ulps of the step); tests/test_optim.py compares free-running
trajectories of fixed configurations.
"""

import contextlib
import copy
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ch8fast
import reference as R

settings.register_profile("ci", max_examples=100, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow],
                          print_blob=True)
settings.register_profile("deep", max_examples=2000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow], print_blob=True)
PROFILE = os.environ.get("CH8FAST_FUZZ", "ci")
if PROFILE not in ("ci", "deep"):
    raise ValueError(f"CH8FAST_FUZZ must be 'ci' or 'deep', got {PROFILE!r}")


def fuzz(ci_examples):
    """The profile's settings, with ``ci_examples`` examples in the ci profile."""
    base = settings.get_profile(PROFILE)
    n = ci_examples if PROFILE == "ci" else base.max_examples
    return settings(base, max_examples=n)


OPTIMIZERS = ["sgd", "adagrad", "rmsprop", "adam", "adamw", "adadelta"]
CLASSES = {"sgd": (ch8fast.SGD, "SGD"), "adagrad": (ch8fast.AdaGrad, "AdaGrad"),
           "rmsprop": (ch8fast.RMSProp, "RMSProp"), "adam": (ch8fast.Adam, "Adam"),
           "adamw": (ch8fast.AdamW, "Adam"), "adadelta": (ch8fast.AdaDelta, "AdaDelta")}

unit = st.one_of(st.sampled_from([0.0, 0.5, 0.9, 0.99, 0.999]),
                 st.floats(0.0, 0.9999, allow_nan=False))
log_uniform = lambda lo, hi: st.floats(lo, hi).map(lambda x: 10.0 ** x)  # noqa: E731


@st.composite
def configs(draw):
    """(name, ch8fast class, reference class, hyperparameters) in their valid ranges."""
    name = draw(st.sampled_from(OPTIMIZERS))
    lr = draw(st.one_of(st.just(0.0), log_uniform(-4, 0)))
    wd = draw(st.one_of(st.just(0.0), log_uniform(-4, -1)))
    eps = draw(log_uniform(-10, -3))
    if name == "sgd":
        m = draw(st.one_of(st.just(0.0), unit))
        h = dict(lr=lr, momentum=m, weight_decay=wd, nesterov=m > 0 and draw(st.booleans()))
    elif name == "adagrad":
        h = dict(lr=lr, eps=eps, weight_decay=wd,
                 initial_accumulator_value=draw(st.sampled_from([0.0, 0.1, 1.0])))
    elif name == "rmsprop":
        m = draw(st.one_of(st.just(0.0), unit))
        h = dict(lr=lr, rho=draw(unit), eps=eps, momentum=m, weight_decay=wd,
                 nesterov=m > 0 and draw(st.booleans()))
    elif name in ("adam", "adamw"):
        h = dict(lr=lr, betas=(draw(unit), draw(unit)), eps=eps, weight_decay=wd,
                 amsgrad=draw(st.booleans()))
    else:
        h = dict(lr=draw(st.one_of(st.just(1.0), st.just(0.0), log_uniform(-3, 0))),
                 rho=draw(unit), eps=eps, weight_decay=wd)
    cls, ref = CLASSES[name]
    ref_h = dict(h, decoupled_weight_decay=True) if name == "adamw" else dict(h)
    return name, cls, ref, h, ref_h


shape = st.one_of(
    st.sampled_from([(0,), (1,), (), (1, 1), (2, 0, 3), (40000,)]),
    st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple),
)

MAGNITUDES = ("normal", "tiny", "huge", "mixed")
# Exponent ranges: tiny gradients have squares that underflow (and are often denormal
# themselves); huge ones have squares that overflow to inf in the dtype.
TINY = {np.float32: (-45, -30), np.float64: (-320, -160)}
HUGE = {np.float32: (20, 30), np.float64: (160, 200)}


def gradient_classes(rng, shape_, magnitude):
    if magnitude == "mixed":
        return rng.integers(0, 3, size=shape_)
    return np.full(shape_, {"normal": 0, "tiny": 1, "huge": 2}[magnitude])


def gradient(rng, cls_, dtype, normal_scale):
    """One gradient with the magnitude class of each element (0 normal, 1 tiny, 2 huge)."""
    sign = rng.choice([-1.0, 1.0], size=cls_.shape)
    g = np.asarray(rng.standard_normal(cls_.shape) * normal_scale)
    for c, (lo, hi) in ((1, TINY[dtype]), (2, HUGE[dtype])):
        mask = cls_ == c
        g[mask] = sign[mask] * 10.0 ** rng.uniform(lo, hi, size=int(mask.sum()))
    with np.errstate(all="ignore"):
        return g.astype(dtype)


def compare(got, ref, dtype, classes, what, operands=()):
    """NaNs and signed infinities at the same places; finite entries at dtype tolerance
    with a floor scaled by the magnitude of their class, in the result and in the
    ``operands`` the step combined into it (a sum that cancels keeps their rounding)."""
    rtol = 1e-12 if dtype == np.float64 else 1e-6
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    mag = np.abs(ref)
    for o in operands:
        with np.errstate(invalid="ignore"):
            mag = np.fmax(mag, np.abs(np.asarray(o, dtype=np.float64)))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref), err_msg=f"{what}: NaNs")
    np.testing.assert_array_equal(np.isposinf(got), np.isposinf(ref), err_msg=f"{what}: +inf")
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(ref), err_msg=f"{what}: -inf")
    fin = np.isfinite(ref)
    for c in np.unique(classes):
        mask = fin & (classes == c)
        if mask.any():
            m = mag[mask]
            scale = float(np.max(m[np.isfinite(m)], initial=0.0))
            np.testing.assert_allclose(got[mask], ref[mask], rtol=rtol, atol=rtol * scale,
                                       err_msg=f"{what}: class {c}")


@contextlib.contextmanager
def num_threads(n):
    before = ch8fast.get_num_threads()
    ch8fast.set_num_threads(n)
    try:
        yield
    finally:
        ch8fast.set_num_threads(0)
        assert ch8fast.get_num_threads() == before


EXAMPLES_RUN = {"reference": 0, "bad_init": 0, "bad_step": 0, "bad_state_dict": 0}


@fuzz(600)
@given(config=configs(),
       shapes=st.lists(shape, min_size=1, max_size=4),
       dtype=st.sampled_from([np.float32, np.float64]),
       threads=st.sampled_from([1, 2]),
       magnitudes=st.lists(st.sampled_from(MAGNITUDES), min_size=4, max_size=4),
       n_steps=st.integers(1, 5),
       seed=st.integers(0, 2**32 - 1))
def test_matches_reference(config, shapes, dtype, threads, magnitudes,
                           n_steps, seed):
    name, cls, ref_name, hyper, ref_hyper = config
    rng = np.random.default_rng(seed)
    params = [np.asarray(rng.standard_normal(s), dtype=dtype) for s in shapes]
    classes = [gradient_classes(rng, s, m) for s, m in zip(shapes, magnitudes)]
    scales = [10.0 ** rng.uniform(-3, 3) for _ in shapes]
    grads = [[gradient(rng, c, dtype, sc) for c, sc in zip(classes, scales)]
             for _ in range(n_steps)]
    ref = getattr(R, ref_name)(params, **ref_hyper)
    opt = cls(params, **hyper)
    with np.errstate(all="ignore"), num_threads(threads):
        for t, g in enumerate(grads):
            old_p = [p.copy() for p in params]
            old_s = [{k: a.copy() for k, a in st_.items()} for st_ in opt.state]
            opt.step(g)
            ref.step(g)
            for i, (p, c) in enumerate(zip(params, classes)):
                vel = [a[k] for a in (old_s[i], opt.state[i]) for k in a if k == "velocity"]
                compare(p, ref.params[i], dtype, c, f"{name} {hyper} step {t} param {i}",
                        [old_p[i]] + vel)
                for k, a in opt.state[i].items():
                    compare(a, ref.state[i][k], dtype, c,
                            f"{name} {hyper} step {t} state {k} {i}", [old_s[i][k]])
                # The next step of the reference starts from ch8fast's values.
                ref.params[i] = p.copy()
                ref.state[i] = {k: a.copy() for k, a in opt.state[i].items()}
    EXAMPLES_RUN["reference"] += 1


# ---------------------------------------------------------------------------------------
# Bad inputs: TypeError/ValueError, nothing changed
# ---------------------------------------------------------------------------------------

BAD_REAL = [float("nan"), float("inf"), -float("inf"), -1.0, -1e-300, "0.1", None, [0.1],
            1j, True, np.array([0.1, 0.2]), np.float64("nan"), object()]
BAD_UNIT = BAD_REAL + [1.0, 1.5, np.float32(1.0)]
BAD_POSITIVE = BAD_REAL + [0.0, -0.0]
BAD_BETAS = [(0.9,), (0.9, 0.999, 0.5), (1.0, 0.9), (0.9, float("nan")), "ab", None, 0.9,
             (0.9, -0.1), (float("inf"), 0.9), ("0.9", 0.9), {0.9, 0.99}]
BAD_FLAG = ["yes", 1, None, 0.0, np.array([True])]
KIND = {"lr": BAD_REAL, "weight_decay": BAD_REAL, "initial_accumulator_value": BAD_REAL,
        "momentum": BAD_UNIT, "rho": BAD_UNIT, "eps": BAD_POSITIVE, "betas": BAD_BETAS,
        "nesterov": BAD_FLAG, "amsgrad": BAD_FLAG}


def _bad_value(draw, key):
    v = draw(st.sampled_from(KIND[key]))
    return copy.copy(v)


def _params(draw, rng, dtype=None):
    dtype = dtype or draw(st.sampled_from([np.float32, np.float64]))
    shapes = draw(st.lists(st.sampled_from([(3,), (2, 4), (1,), (0,), (5, 1)]),
                           min_size=1, max_size=3))
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


BAD_PARAM_KINDS = ["not_a_list", "element", "int_dtype", "int16", "complex",
                   "strided", "transposed", "readonly", "same_twice", "overlap", "empty",
                   "group_no_params", "group_unknown_key", "group_empty", "mixed_groups",
                   "group_bad_hyper", "unknown_kwarg", "bad_hyper", "nesterov_no_momentum",
                   "schedule_nan", "clip_option"]


@st.composite
def bad_constructions(draw):
    """(cls, args, kwargs, arrays to check) for a call that must fail."""
    name, cls, _, hyper, _ = draw(configs())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    params = _params(draw, rng)
    kind = draw(st.sampled_from(BAD_PARAM_KINDS))
    hyper = dict(hyper)
    arrays = list(params)
    big = rng.standard_normal((4, 6))
    arrays.append(big)
    i = draw(st.integers(0, len(params) - 1))
    if kind == "not_a_list":
        params = draw(st.sampled_from([3, None, "abc", params[0], {"params": params}, 1.5]))
    elif kind == "element":
        params[i] = draw(st.sampled_from([[1.0, 2.0], 3.0, None, "x", np.float64(1.0)]))
    elif kind == "int_dtype":
        params[i] = np.arange(4)
    elif kind == "int16":
        params[i] = np.ones(3, dtype=np.int16)
    elif kind == "complex":
        params[i] = np.ones(3, dtype=np.complex128)
    elif kind == "strided":
        params[i] = big[:, ::2]
    elif kind == "transposed":
        params[i] = big.T
    elif kind == "readonly":
        params[i] = params[i].copy()
        params[i].flags.writeable = False
    elif kind == "same_twice":
        params = params + [params[i]] if params[i].size else params + [params[i], "x"]
    elif kind == "overlap":
        params = params + [big, big[1:]]
    elif kind == "empty":
        params = draw(st.sampled_from([[], (), [{"params": []}]]))
    elif kind == "group_no_params":
        params = [{"lr": 0.1}]
    elif kind == "group_unknown_key":
        params = [{"params": params, "bogus": 1}]
    elif kind == "group_empty":
        params = [{"params": params}, {"params": []}]
    elif kind == "mixed_groups":
        params = [{"params": params[:1]}] + params[1:] + [big]
    elif kind == "group_bad_hyper":
        key = draw(st.sampled_from(sorted(k for k in hyper if k in KIND)))
        params = [{"params": params[:1]}, {"params": params[1:] + [big],
                                           key: _bad_value(draw, key)}]
    elif kind == "unknown_kwarg":
        hyper["foo"] = 1
    elif kind == "bad_hyper":
        key = draw(st.sampled_from(sorted(k for k in hyper if k in KIND)))
        hyper[key] = _bad_value(draw, key)
    elif kind == "nesterov_no_momentum":
        if name not in ("sgd", "rmsprop"):
            hyper["nesterov"] = True         # not a hyperparameter of this class
        else:
            hyper.update(nesterov=True, momentum=0.0)
    elif kind == "schedule_nan":
        hyper["lr"] = draw(st.sampled_from([lambda k: float("nan"), lambda k: -1.0,
                                            lambda k: "x", lambda k: None]))
    elif kind == "clip_option":
        opt = draw(st.sampled_from(["clip_norm", "clip_value", "skip_nonfinite"]))
        hyper[opt] = draw(st.sampled_from(      # None is valid here: the option is off
            BAD_FLAG if opt == "skip_nonfinite" else [v for v in BAD_POSITIVE if v is not None]))
    return cls, params, hyper, arrays, kind


@fuzz(400)
@given(case=bad_constructions())
def test_bad_construction_raises_and_changes_nothing(case):
    cls, params, hyper, arrays, kind = case
    before = [a.tobytes() for a in arrays]
    with pytest.raises((TypeError, ValueError)):
        cls(params, **hyper)
    assert [a.tobytes() for a in arrays] == before
    EXAMPLES_RUN["bad_init"] += 1


def snapshot(opt, params):
    sd = opt.state_dict()
    arrays = [a.tobytes() for st_ in sd.pop("state") for a in st_.values()]
    return repr(sd), arrays, [p.tobytes() for p in params]


@st.composite
def working_optimizers(draw):
    name, cls, _, hyper, _ = draw(configs())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    params = _params(draw, rng, dtype)
    if draw(st.booleans()) and len(params) > 1:
        other = [p.astype(np.float64 if dtype == np.float32 else np.float32)
                 for p in params[1:]]
        groups = [{"params": params[:1]}, {"params": other, "lr": 0.5}]
        params = params[:1] + other
    else:
        groups = params
    n_good = draw(st.integers(0, 2))
    return name, cls, hyper, groups, params, rng, n_good


def _good_grads(rng, params):
    return [rng.standard_normal(p.shape).astype(p.dtype) for p in params]


BAD_GRAD_KINDS = ["count_less", "count_more", "dtype", "int", "complex", "shape", "list",
                  "none", "param_alias", "state_alias", "param_view", "container",
                  "both", "neither", "bad_lr", "bad_schedule", "unknown_group_key",
                  "single_array"]


@fuzz(400)
@given(setup=working_optimizers(), kind=st.sampled_from(BAD_GRAD_KINDS),
       pick=st.integers(0, 10**6))
def test_bad_step_raises_and_changes_nothing(setup, kind, pick):
    name, cls, hyper, groups, params, rng, n_good = setup
    opt = cls(groups, **hyper)
    twin_params = [p.copy() for p in params]
    twin_groups = (twin_params if not isinstance(groups[0], dict) else
                   [{"params": twin_params[:1]}, {"params": twin_params[1:], "lr": 0.5}])
    twin = cls(twin_groups, **hyper)
    for _ in range(n_good):
        g = _good_grads(rng, params)
        opt.step(g)
        twin.step(g)
    before = snapshot(opt, params)
    g = _good_grads(rng, params)
    i = pick % len(params)
    group = opt.param_groups[pick % len(opt.param_groups)]
    saved_group = dict(group)
    kw = {"grads": g}
    if kind == "count_less":
        kw["grads"] = g[:-1]
    elif kind == "count_more":
        kw["grads"] = g + [g[0]]
    elif kind == "dtype":
        g[i] = g[i].astype(np.float64 if g[i].dtype == np.float32 else np.float32)
    elif kind == "int":
        g[i] = g[i].astype(np.int64)
    elif kind == "complex":
        g[i] = g[i].astype(np.complex128)
    elif kind == "shape":
        g[i] = np.zeros(g[i].shape + (2,), g[i].dtype)
    elif kind == "list":
        g[i] = g[i].tolist()
    elif kind == "none":
        g[i] = None
    elif kind == "param_alias":
        if params[i].size == 0:
            return
        g[i] = params[i]
    elif kind == "state_alias":
        st_ = [a for a in opt.state[i].values()]
        if not st_ or params[i].size == 0:
            return
        g[i] = st_[pick % len(st_)]
    elif kind == "param_view":
        j = (i + 1) % len(params)
        if params[j].size == 0 or params[j].dtype != params[i].dtype \
                or params[i].size > params[j].size or params[i].size == 0:
            return
        g[i] = params[j].reshape(-1)[:params[i].size].reshape(params[i].shape)
    elif kind == "container":
        kw["grads"] = [{0: g[0]}, "abc", 3.0, iter(g)][pick % 4]
    elif kind == "both":
        kw["closure"] = lambda: g
    elif kind == "neither":
        kw = {}
    elif kind == "bad_lr":
        # (Booleans are left out here: see test_bool_hyperparameter_after_equal_number.)
        bad = [v for v in BAD_REAL if not isinstance(v, bool)]
        group["lr"] = bad[pick % len(bad)]
    elif kind == "bad_schedule":
        k = opt.state_dict()["param_groups"][0]["step"]
        group["lr"] = lambda s, k=k: 0.1 if s < k else float("nan")
    elif kind == "unknown_group_key":
        group["bogus"] = 1
    elif kind == "single_array":
        if len(params) == 1:
            return
        kw["grads"] = g[0]
    with pytest.raises((TypeError, ValueError)):
        opt.step(**kw)
    group.clear()
    group.update(saved_group)
    assert snapshot(opt, params) == before
    # The refused call left no trace: the next good step equals the twin's.
    g = _good_grads(rng, params)
    opt.step(g)
    twin.step(g)
    assert [p.tobytes() for p in params] == [p.tobytes() for p in twin_params]
    EXAMPLES_RUN["bad_step"] += 1


# State dicts: replace, delete or add one entry anywhere in a valid state_dict.

BAD_LEAVES = [None, -1, float("nan"), float("inf"), "x", [], {}, 1.5, True, 10**30,
              np.zeros(3), np.zeros((2, 2), np.float32), [0.9], {"schedule": 5},
              {"schedule": {"type": "nope"}}, {"schedule": {"type": "linear"}},
              {"schedule": {"type": "constant", "value": "x"}},
              {"schedule": {"type": "constant", "value": float("nan")}},
              {"schedule": {"type": "constant", "value": -1.0}},
              {"schedule": {"type": "exponential", "init_value": 1.0, "decay_rate": 0.5,
                            "transition_steps": 0}}]


def _paths(obj, prefix=()):
    """Every position (key path) in a nested dict/list structure."""
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for k, v in enumerate(obj):
            out += _paths(v, prefix + (k,))
    return out


def _mutate(sd, path, op, leaf):
    if not path:
        return leaf
    parent = sd
    for k in path[:-1]:
        parent = parent[k]
    k = path[-1]
    if op == "replace":
        parent[k] = leaf
    elif op == "delete":
        del parent[k]
    elif isinstance(parent, dict):
        parent["added"] = leaf
    else:
        parent.append(leaf)
    return sd


@fuzz(400)
@given(setup=working_optimizers(), pick=st.integers(0, 10**6),
       op=st.sampled_from(["replace", "replace", "delete", "add"]),
       leaf=st.sampled_from(range(len(BAD_LEAVES))))
def test_bad_state_dict_raises_and_changes_nothing(setup, pick, op, leaf):
    name, cls, hyper, groups, params, rng, n_good = setup
    opt = cls(groups, **hyper)
    for _ in range(n_good + 1):
        opt.step(_good_grads(rng, params))
    sd = opt.state_dict()
    for _ in range(2):
        opt.step(_good_grads(rng, params))
    before = snapshot(opt, params)
    paths = _paths(sd)
    path = paths[pick % len(paths)]
    bad = _mutate(sd, path, op, copy.deepcopy(BAD_LEAVES[leaf]))
    if (isinstance(bad, dict) and isinstance(bad.get("param_groups"), list)
            and not all(isinstance(g, dict) for g in bad["param_groups"])):
        # A param group that is not a dict raises AttributeError today: see
        # test_param_group_entry_that_is_not_a_dict.
        return
    try:
        opt.load_state_dict(bad)
    except (TypeError, ValueError):
        assert snapshot(opt, params) == before
    else:
        # The mutation happened to be valid (e.g. lr 1.5): the optimizer still works or
        # refuses cleanly.
        try:
            with np.errstate(all="ignore"):
                opt.step(_good_grads(rng, params))
        except (TypeError, ValueError):
            pass
    EXAMPLES_RUN["bad_state_dict"] += 1


def test_bool_hyperparameter_after_equal_number():
    w = np.zeros(3)
    opt = ch8fast.SGD([w], lr=1.0)
    opt.step(np.ones(3))
    opt.param_groups[0]["lr"] = True            # refused when the optimizer is made
    with pytest.raises(TypeError, match="lr must be a real number, got bool"):
        opt.step(np.ones(3))


@pytest.mark.parametrize("entry", [None, 3, "x", [1, 2]])
def test_param_group_entry_that_is_not_a_dict(entry):
    w = np.zeros(3)
    opt = ch8fast.SGD([w], lr=0.1)
    sd = opt.state_dict()
    sd["param_groups"][0] = entry
    with pytest.raises((TypeError, ValueError), match=r"param_groups'\]\[0\]"):
        opt.load_state_dict(sd)


@pytest.mark.parametrize("cls", [ch8fast.SGD, ch8fast.RMSProp])
def test_load_momentum_into_group_without_velocity_is_refused(cls):
    w = np.zeros(3)
    opt = cls([w], lr=0.1)
    sd = opt.state_dict()
    sd["param_groups"][0]["momentum"] = 0.9
    with pytest.raises(ValueError, match="momentum"):
        opt.load_state_dict(sd)
    opt.step(np.ones(3))


def test_zz_report_counts():
    """Runs last in this file: how many examples each property test ran."""
    print(f"\nfuzz profile {PROFILE}: examples run {EXAMPLES_RUN}")
