"""Every bad input raises a TypeError or ValueError that names the argument, before any
array is touched: afterwards the parameters and the optimizer's state are as they were."""

import numpy as np
import pytest

import ch8fast


def _snapshot(arrays, opt=None):
    snap = [a.tobytes() for a in arrays]
    if opt is not None:
        sd = opt.state_dict()
        snap.append(repr(sd["param_groups"]))
        snap.append(sd["skipped_steps"])
        snap += [a.tobytes() for st in sd["state"] for a in st.values()]
        snap += [a.tobytes() for st in opt.state for a in st.values()]
    return snap


def _readonly():
    a = np.ones(4)
    a.flags.writeable = False
    return a


# (id, callable(w) that makes an optimizer over w, exception, message pattern)
CONSTRUCTION = [
    ("int_param", lambda w: ch8fast.SGD([np.ones(3, np.int64)]), TypeError, "float32, float64, float16 or bfloat16"),
    ("complex_param", lambda w: ch8fast.Adam([np.ones(3, np.complex64)]), TypeError, r"params\[0\].*complex64"),
    ("non_contiguous", lambda w: ch8fast.Adam([np.ones((4, 4))[:, 1]]), ValueError, "C-contiguous"),
    ("read_only", lambda w: ch8fast.Adam([_readonly()]), ValueError, "read-only"),
    ("list_param", lambda w: ch8fast.Adam([[1.0, 2.0]]), TypeError, "numpy.ndarray"),
    ("single_array", lambda w: ch8fast.Adam(w), TypeError, "wrap it in a list"),
    ("empty", lambda w: ch8fast.Adam([]), ValueError, "empty"),
    ("empty_group", lambda w: ch8fast.Adam([{"params": []}]), ValueError, "empty"),
    ("same_array_twice", lambda w: ch8fast.Adam([w, w]), ValueError, "share memory"),
    ("overlapping_views", lambda w: ch8fast.Adam([w[:6], w[4:]]), ValueError, "share memory"),
    ("negative_lr", lambda w: ch8fast.SGD([w], lr=-0.1), ValueError, "lr"),
    ("nan_lr", lambda w: ch8fast.SGD([w], lr=float("nan")), ValueError, "lr"),
    ("inf_lr", lambda w: ch8fast.SGD([w], lr=float("inf")), ValueError, "lr"),
    ("string_lr", lambda w: ch8fast.SGD([w], lr="0.1"), TypeError, "lr"),
    ("beta1_one", lambda w: ch8fast.Adam([w], betas=(1.0, 0.999)), ValueError, r"betas\[0\]"),
    ("beta2_negative", lambda w: ch8fast.Adam([w], betas=(0.9, -0.1)), ValueError, r"betas\[1\]"),
    ("betas_not_pair", lambda w: ch8fast.Adam([w], betas=0.9), TypeError, "betas"),
    ("rho_one", lambda w: ch8fast.RMSProp([w], rho=1.0), ValueError, "rho"),
    ("adadelta_rho", lambda w: ch8fast.AdaDelta([w], rho=-0.5), ValueError, "rho"),
    ("momentum_big", lambda w: ch8fast.SGD([w], momentum=1.5), ValueError, "momentum"),
    ("momentum_one", lambda w: ch8fast.RMSProp([w], momentum=1.0), ValueError, "momentum"),
    ("eps_zero", lambda w: ch8fast.Adam([w], eps=0.0), ValueError, "eps"),
    ("eps_negative", lambda w: ch8fast.AdaGrad([w], eps=-1e-8), ValueError, "eps"),
    ("negative_wd", lambda w: ch8fast.AdamW([w], weight_decay=-1.0), ValueError, "weight_decay"),
    ("nesterov_no_momentum", lambda w: ch8fast.SGD([w], nesterov=True), ValueError, "nesterov"),
    ("rmsprop_nesterov_no_momentum", lambda w: ch8fast.RMSProp([w], nesterov=True), ValueError, "nesterov"),
    ("nesterov_not_bool", lambda w: ch8fast.SGD([w], momentum=0.9, nesterov=1), TypeError, "nesterov"),
    ("unknown_kwarg", lambda w: ch8fast.Adam([w], beta1=0.9), TypeError, "beta1"),
    ("unknown_group_key", lambda w: ch8fast.Adam([{"params": [w], "momentum": 0.9}]), TypeError, "momentum"),
    ("group_bad_lr", lambda w: ch8fast.Adam([{"params": [w[:5]]}, {"params": [w[5:]], "lr": -1}]), ValueError, r"param_groups\[1\]\['lr'\]"),
    ("group_without_params", lambda w: ch8fast.Adam([{"lr": 0.1}]), ValueError, "params"),
    ("mixed_arrays_and_groups", lambda w: ch8fast.Adam([w[:5], {"params": [w[5:]]}]), TypeError, "mixes"),
    ("schedule_negative_at_0", lambda w: ch8fast.SGD([w], lr=lambda k: -1.0), ValueError, "lr"),
]


@pytest.mark.parametrize("make,exc,pattern", [c[1:] for c in CONSTRUCTION],
                         ids=[c[0] for c in CONSTRUCTION])
def test_bad_construction(make, exc, pattern):
    w = np.arange(10.0)
    before = _snapshot([w])
    with pytest.raises(exc, match=pattern):
        make(w)
    assert _snapshot([w]) == before


def _set(opt, key, value, group=0):
    opt.param_groups[group][key] = value


# (id, optimizer factory over (w, u), step call, exception, pattern)
def _adam(w, u):
    return ch8fast.Adam([w, u], lr=0.1)


def _two_groups(w, u):
    return ch8fast.SGD([{"params": [w]}, {"params": [u], "lr": 0.01}], lr=0.1, momentum=0.9)


STEP = [
    ("too_few_grads", _adam, lambda o, w, u: o.step([np.ones(10)]), ValueError, "expected 2"),
    ("too_many_grads", _adam, lambda o, w, u: o.step([np.ones(10), np.ones(3), np.ones(3)]), ValueError, "expected 2"),
    ("single_array_for_two", _adam, lambda o, w, u: o.step(np.ones(10)), ValueError, "single array"),
    ("grads_not_sequence", _adam, lambda o, w, u: o.step(3.0), TypeError, "list or tuple"),
    ("grad_list", _adam, lambda o, w, u: o.step([np.ones(10), [1.0, 2.0, 3.0]]), TypeError, r"grads\[1\].*ndarray"),
    ("grad_dtype", _adam, lambda o, w, u: o.step([np.ones(10), np.ones(3, np.float32)]), TypeError, r"grads\[1\].*dtype"),
    ("grad_int", _adam, lambda o, w, u: o.step([np.ones(10, np.int64), np.ones(3)]), TypeError, r"grads\[0\].*dtype"),
    ("grad_shape", _adam, lambda o, w, u: o.step([np.ones(10), np.ones((3, 1))]), ValueError, r"grads\[1\].*shape"),
    ("grad_is_param", _adam, lambda o, w, u: o.step([w, np.ones(3)]), ValueError, r"grads\[0\].*shares memory"),
    ("grad_view_of_param", _adam, lambda o, w, u: o.step([np.ones(10), w[2:5]]), ValueError, r"grads\[1\].*shares memory"),
    ("grad_is_state", _adam, lambda o, w, u: o.step([o.state[0]["exp_avg"], np.ones(3)]), ValueError, r"grads\[0\].*shares memory"),
    ("both_grads_and_closure", _adam, lambda o, w, u: o.step([np.ones(10), np.ones(3)], closure=lambda: None), TypeError, "exactly one"),
    ("neither", _adam, lambda o, w, u: o.step(), TypeError, "exactly one"),
    ("lr_made_negative", _adam, lambda o, w, u: (_set(o, "lr", -1.0), o.step([np.ones(10), np.ones(3)])), ValueError, "lr"),
    ("betas_made_bad", _adam, lambda o, w, u: (_set(o, "betas", (0.9, 1.0)), o.step([np.ones(10), np.ones(3)])), ValueError, r"betas\[1\]"),
    ("eps_made_zero", _adam, lambda o, w, u: (_set(o, "eps", 0.0), o.step([np.ones(10), np.ones(3)])), ValueError, "eps"),
    ("unknown_key_added", _adam, lambda o, w, u: (_set(o, "foo", 1), o.step([np.ones(10), np.ones(3)])), TypeError, "foo"),
    ("flag_made_non_bool", _adam, lambda o, w, u: (_set(o, "amsgrad", "no"), o.step([np.ones(10), np.ones(3)])), TypeError, "amsgrad"),
    ("schedule_goes_negative", _adam, lambda o, w, u: (_set(o, "lr", lambda k: 0.1 - k), o.step([np.ones(10), np.ones(3)])), ValueError, "lr"),
    ("second_group_bad_grad", _two_groups, lambda o, w, u: o.step([np.ones(10), np.ones(4)]), ValueError, r"grads\[1\]"),
    ("second_group_bad_lr", _two_groups, lambda o, w, u: (_set(o, "lr", -5.0, group=1), o.step([np.ones(10), np.ones(3)])), ValueError, r"param_groups\[1\]\['lr'\]"),
    ("momentum_made_bad", _two_groups, lambda o, w, u: (_set(o, "momentum", 1.0, group=1), o.step([np.ones(10), np.ones(3)])), ValueError, "momentum"),
    ("amsgrad_flipped", _adam, lambda o, w, u: (_set(o, "amsgrad", True), o.step([np.ones(10), np.ones(3)])), ValueError, "amsgrad"),
    ("decoupled_flipped", _adam, lambda o, w, u: (_set(o, "decoupled_weight_decay", True), o.step([np.ones(10), np.ones(3)])), ValueError, "decoupled"),
    ("nesterov_flipped", _two_groups, lambda o, w, u: (_set(o, "nesterov", True, group=1), o.step([np.ones(10), np.ones(3)])), ValueError, "nesterov"),
    ("closure_bad_grads", _adam, lambda o, w, u: o.step(closure=lambda: (1.0, [np.ones(10)])), ValueError, "expected 2"),
]


@pytest.mark.parametrize("make,call,exc,pattern", [c[1:] for c in STEP], ids=[c[0] for c in STEP])
def test_bad_step(make, call, exc, pattern):
    rng = np.random.default_rng(0)
    w, u = rng.standard_normal(10), rng.standard_normal(3)
    opt = make(w, u)
    opt.step([rng.standard_normal(10), rng.standard_normal(3)])   # some state to keep
    before = _snapshot([w, u], opt)
    groups_before = [dict(g) for g in opt.param_groups]
    with pytest.raises(exc, match=pattern):
        call(opt, w, u)
    for g, gb in zip(opt.param_groups, groups_before):      # undo the user's edit
        g.clear()
        g.update(gb)
    assert _snapshot([w, u], opt) == before


def test_sgd_without_velocity_refuses_momentum_later():
    w = np.ones(3)
    opt = ch8fast.SGD([w], lr=0.1)
    opt.param_groups[0]["momentum"] = 0.9
    with pytest.raises(ValueError, match="without momentum"):
        opt.step(np.ones(3))
    assert w.tobytes() == np.ones(3).tobytes()


def test_nested_nesterov_closure_grad_aliasing_restores_theta():
    w = np.arange(5.0)
    opt = ch8fast.SGD([w], lr=0.1, momentum=0.9, nesterov=True)
    opt.step(closure=lambda: np.ones(5))
    before = w.copy(), opt.state[0]["velocity"].copy()
    with pytest.raises(ValueError, match="shares memory"):
        opt.step(closure=lambda: w)              # the closure hands back the parameter
    assert w.tobytes() == before[0].tobytes()
    assert opt.state[0]["velocity"].tobytes() == before[1].tobytes()


@pytest.mark.parametrize("change,exc", [
    (lambda g: g.__setitem__("lr", -1.0), ValueError),
    (lambda g: g.update(lr=float("nan")), ValueError),
    (lambda g: g.update({"betas": (0.9, 1.0)}), ValueError),
    (lambda g: g.__ior__({"eps": 0.0}), ValueError),
    (lambda g: g.setdefault("foo", 1), TypeError),
    (lambda g: g.pop("eps"), TypeError),
    (lambda g: g.popitem(), TypeError),
    (lambda g: g.__delitem__("lr"), TypeError),
    (lambda g: g.clear(), TypeError),
    (lambda g: g.__setitem__("weight_decay", False), TypeError),   # equal to 0.0, a bool
])
def test_every_change_to_a_group_is_checked_at_the_next_step(change, exc):
    """Hyperparameters are checked once and cached; any change to the group, by any dict
    method, is seen at the next step, which refuses a bad value and changes nothing."""
    w = np.linspace(-1, 1, 7)
    opt = ch8fast.Adam([w], lr=0.1)
    opt.step(np.ones(7))
    before, state = w.copy(), {k: a.copy() for k, a in opt.state[0].items()}
    change(opt.param_groups[0])
    with pytest.raises(exc):
        opt.step(np.ones(7))
    assert w.tobytes() == before.tobytes()
    assert all(opt.state[0][k].tobytes() == a.tobytes() for k, a in state.items())


def test_param_groups_cannot_be_replaced_or_resized():
    """The list of groups is the optimizer's: a group is edited in place, a new one comes
    through add_param_group(); replacing or resizing the list is refused, not ignored."""
    w = np.zeros(5)
    opt = ch8fast.SGD([w], lr=0.1)
    opt.step(np.ones(5))
    plain = dict(opt.param_groups[0])
    for change in (lambda: opt.param_groups.__setitem__(0, plain),
                   lambda: opt.param_groups.append(plain),
                   lambda: opt.param_groups.pop(),
                   lambda: opt.param_groups.clear(),
                   lambda: opt.param_groups.__delitem__(0)):
        with pytest.raises(TypeError, match="add_param_group"):
            change()
    assert len(opt.param_groups) == 1
    opt.param_groups[0]["lr"] = 0.5
    opt.step(np.ones(5))
    np.testing.assert_array_equal(w, -0.6)


def test_aliasing_gradient_is_refused_after_clean_steps():
    """Gradient addresses found clear of the parameters and state are remembered per row;
    a gradient at another address is checked again."""
    w, b = np.zeros(6), np.zeros(3)
    opt = ch8fast.Adam([w, b], lr=0.1)
    gw, gb = np.ones(6), np.ones(3)
    opt.step([gw, gb])
    opt.step([gw, gb])
    before = (w.copy(), b.copy(), [a.copy() for st in opt.state for a in st.values()])
    for bad in (opt.state[0]["exp_avg"], w, opt.state[1]["exp_avg_sq"][:3]):
        with pytest.raises(ValueError, match="shares memory"):
            opt.step([bad if bad.size == 6 else gw, bad if bad.size == 3 else gb])
    assert w.tobytes() == before[0].tobytes() and b.tobytes() == before[1].tobytes()
    assert all(a.tobytes() == c.tobytes() for a, c in
               zip([a for st in opt.state for a in st.values()], before[2]))
    opt.step([gw, gb])


def test_an_engine_of_wrong_types_is_refused():
    """The kernels cast the engine's tables and scalars unchecked: an Engine built from
    other objects used to crash the process at its first step."""
    from ch8fast._isa import K
    w = np.zeros(4)
    table = K.Table([w], [], [0], K.Guard([w]))
    scalars = K.Scalars("sgd")
    with pytest.raises(TypeError, match=r"tables\[0\] must be a Table"):
        K.Engine([object()], [0], [scalars], [0], [0.0])
    with pytest.raises(TypeError, match=r"scalars\[0\] must be a Scalars"):
        K.Engine([table], [0], [{"lr": 0.1}], [0], [0.0])
    engine = K.Engine([table], [0], [scalars], [0], [0.0])
    with pytest.raises((TypeError, AttributeError)):
        engine.tables.append(object())            # the tuple the kernels trust is fixed
