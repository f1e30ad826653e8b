"""The contract between the user's arrays and the kernels: the optimizer owns what the
kernels write, every edit a user can make to the live objects takes effect or raises, and
no input reaches a kernel unchecked. Each test names the defect it guards against."""

import copy
import gc
import os
import pickle
import threading
import time
import _thread

import numpy as np
import pytest

import ch8fast
import ch8fast.functional as F
from ch8fast import rules
from conftest import CONFIGS


def _adam(n=8, dtype=np.float64, **kw):
    rng = np.random.default_rng(0)
    w = rng.standard_normal(n).astype(dtype)
    return w, ch8fast.Adam([w], lr=0.01, **kw)


def _steps(opt):
    """The step count of each group (read through the state dict, as any version has)."""
    return [g["step"] for g in opt.state_dict()["param_groups"]]


def _bits(*arrays):
    return [a.tobytes() for a in arrays]


# ---- owned state ----------------------------------------------------------------------

@pytest.mark.parametrize("edit", [
    lambda st: st.__setitem__("exp_avg", np.zeros(8)),
    lambda st: st.__delitem__("exp_avg"),
    lambda st: st.clear(),
    lambda st: st.pop("exp_avg"),
    lambda st: st.update(exp_avg=np.zeros(8)),
], ids=["replace", "delete", "clear", "pop", "update"])
def test_state_entries_cannot_be_replaced_or_removed(edit):
    """Defect: replacing or clearing an entry of opt.state and stepping wrote into freed
    memory (an unrelated array changed; a segfault on a large one)."""
    w, opt = _adam()
    opt.step(np.ones(8))
    before = _bits(w, *opt.state[0].values())
    with pytest.raises(TypeError, match="cannot be replaced"):
        edit(opt.state[0])
    gc.collect()
    bystander = np.full(8, 7.0)              # where freed state memory could be reused
    opt.step(np.ones(8))
    assert bystander.tobytes() == np.full(8, 7.0).tobytes()
    ref_w, ref = _adam()
    ref.step(np.ones(8))
    assert _bits(w, *opt.state[0].values()) != before
    ref.step(np.ones(8))
    assert _bits(w, *opt.state[0].values()) == _bits(ref_w, *ref.state[0].values())


def test_the_state_list_and_attribute_cannot_be_replaced():
    w, opt = _adam()
    with pytest.raises(TypeError, match="cannot be changed"):
        opt.state[0] = {}
    with pytest.raises(AttributeError, match="cannot be replaced"):
        opt.state = []


def test_state_is_edited_in_place_through_its_views():
    """An in-place edit of a state array takes effect (the views share the optimizer's
    memory); a view's metadata changes cannot move the optimizer's array."""
    w, opt = _adam()
    opt.state[0]["exp_avg"][...] = 5.0
    view = opt.state[0]["exp_avg"]
    with pytest.raises(ValueError):
        view.resize(100)                 # a view does not own its data
    view.shape = (2, 4)                  # changes only the view
    opt.step(np.zeros(8))
    # s <- 0.9 s + 0.1 * 0 = 4.5 everywhere, so the edit reached the kernel
    np.testing.assert_array_equal(opt.state[0]["exp_avg"], np.full(8, 4.5))


def test_a_reallocated_parameter_is_refused():
    """A parameter resized with refcheck=False moves its data: the kernel would write into
    freed memory. The next step refuses it, naming the parameter."""
    w = np.ones(1000)
    opt = ch8fast.SGD([w], lr=0.1)
    opt.step(np.ones(1000))
    w.resize(50_000, refcheck=False)
    with pytest.raises(ValueError, match=r"params\[0\]: the array's data moved"):
        opt.step(np.ones(50_000))


def test_a_parameter_made_read_only_later_is_refused():
    w = np.ones(4)
    opt = ch8fast.SGD([w], lr=0.1)
    w.flags.writeable = False
    with pytest.raises(ValueError, match=r"params\[0\]: array is read-only"):
        opt.step(np.ones(4))
    np.testing.assert_array_equal(w, 1.0)


# ---- params lists and add_param_group ----------------------------------------------------

def test_editing_a_groups_params_takes_effect():
    """Defect: editing param_groups[i]["params"] was silently ignored."""
    a, b, c = np.ones(3), np.ones(4), np.ones(5)
    opt = ch8fast.SGD([a, b], lr=0.1, momentum=0.5)
    opt.step([np.ones(3), np.ones(4)])
    vel_a = opt.state[0]["velocity"].copy()
    opt.param_groups[0]["params"].append(c)          # in place
    opt.step([np.ones(3), np.ones(4), np.ones(5)])
    np.testing.assert_array_equal(c, 0.9)            # new state: v = -0.1
    np.testing.assert_array_equal(opt.state[2]["velocity"], -0.1)
    # a kept its velocity: v = 0.5 * -0.1 - 0.1
    np.testing.assert_allclose(opt.state[0]["velocity"], 0.5 * vel_a - 0.1)
    opt.param_groups[0]["params"].remove(b)
    before_b = b.copy()
    opt.step([np.ones(3), np.ones(5)])
    np.testing.assert_array_equal(b, before_b)
    assert len(opt.state) == 2
    opt.param_groups[0]["params"] = [c]              # replaced
    opt.step([np.ones(5)])
    assert len(opt.params) == 1 and opt.params[0] is c


def test_a_bad_params_edit_raises_and_changes_nothing():
    a = np.ones(3)
    opt = ch8fast.Adam([a], lr=0.1)
    opt.step(np.ones(3))
    before = _bits(a, *opt.state[0].values())
    opt.param_groups[0]["params"].append(a[:2])      # overlaps a
    with pytest.raises(ValueError, match="share memory"):
        opt.step([np.ones(3), np.ones(2)])
    opt.param_groups[0]["params"][1] = np.ones(2, np.int32)
    with pytest.raises(TypeError, match=r"params\[1\]"):
        opt.step([np.ones(3), np.ones(2)])
    assert _bits(a, *opt.state[0].values()) == before
    del opt.param_groups[0]["params"][1]
    opt.step(np.ones(3))
    assert _steps(opt) == [2]


def test_add_param_group_has_torchs_semantics():
    a, b = np.ones(3), np.ones(2, np.float32)
    opt = ch8fast.SGD([a], lr=0.1, momentum=0.9)
    opt.step(np.ones(3))
    opt.add_param_group({"params": b, "lr": 0.5})
    g = opt.param_groups[1]
    assert g["momentum"] == 0.9 and g["lr"] == 0.5 and g["params"][0] is b
    assert _steps(opt) == [1, 0]
    opt.step([np.ones(3), np.ones(2, np.float32)])
    np.testing.assert_array_equal(b, np.float32(0.5))
    with pytest.raises(ValueError, match="again"):
        opt.add_param_group({"params": [a]})
    with pytest.raises(TypeError, match="unknown hyperparameter 'betas'"):
        opt.add_param_group({"params": [np.ones(1)], "betas": (0.9, 0.9)})
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [np.ones(1)], "lr": -1.0})
    assert len(opt.param_groups) == 2


# ---- gradients that must not reach a kernel -------------------------------------------------

@pytest.mark.parametrize("order", [">f4", ">f8"])
def test_non_native_byte_order_is_refused_everywhere(order):
    """Defect: a '>f4'/'>f8' gradient was read byte-swapped, through the classes, the
    functional layer and the clipping norm."""
    dt = np.dtype(order).newbyteorder("=")
    w = np.ones(4, dt)
    g = np.ones(4, dt).astype(order)
    opt = ch8fast.SGD([w], lr=0.1)
    with pytest.raises(TypeError, match="byte order"):
        opt.step(g)
    with pytest.raises(TypeError, match="byte order"):
        F.sgd(w, g, lr=0.1)
    with pytest.raises(TypeError, match="byte order"):
        ch8fast.global_norm([g])
    with pytest.raises(TypeError, match="byte order"):
        ch8fast.SGD([w.astype(order)])
    np.testing.assert_array_equal(w, 1.0)


def test_an_unaligned_gradient_is_read_through_a_copy():
    """An unaligned gradient (a view at an odd byte offset) is read correctly, through an
    aligned copy; the result is that of the same values aligned."""
    raw = np.zeros(8 * 100 + 1, np.uint8)
    g = raw[1:].view(np.float64)
    assert not g.flags.aligned
    g[...] = np.linspace(-1, 1, 100)
    w1, w2 = np.ones(100), np.ones(100)
    o1, o2 = ch8fast.Adam([w1], lr=0.1), ch8fast.Adam([w2], lr=0.1)
    o1.step(g)
    o2.step(np.array(g))
    assert w1.tobytes() == w2.tobytes()
    np.testing.assert_array_equal(g, np.linspace(-1, 1, 100))


@pytest.mark.parametrize("where", ["param", "grad"])
def test_masked_arrays_are_refused(where):
    """Defect: the mask of a masked parameter or gradient was silently ignored (a masked
    NaN was applied)."""
    m = np.ma.masked_array([1.0, np.nan, 3.0], mask=[False, True, False])
    w = np.ones(3)
    if where == "param":
        with pytest.raises(TypeError, match="masked"):
            ch8fast.SGD([m], lr=0.1)
        with pytest.raises(TypeError, match="masked"):
            F.sgd(m, np.ones(3), lr=0.1)
    else:
        with pytest.raises(TypeError, match="masked"):
            ch8fast.SGD([w], lr=0.1).step(m)
        with pytest.raises(TypeError, match="masked"):
            F.sgd(w, m, lr=0.1)
        with pytest.raises(TypeError, match="masked"):
            ch8fast.clip_by_value([m], 1.0)
    np.testing.assert_array_equal(w, 1.0)


# ---- hyperparameters that must not reach a kernel -------------------------------------------

@pytest.mark.parametrize("make,pattern", [
    (lambda w: ch8fast.SGD([w], lr=1e39), "lr"),
    (lambda w: ch8fast.SGD([w], lr=0.1, weight_decay=1e39), "weight_decay"),
    (lambda w: ch8fast.Adam([w], eps=1e39), "eps"),
    (lambda w: ch8fast.AdaGrad([w], initial_accumulator_value=1e39),
     "initial_accumulator_value"),
], ids=["lr", "weight_decay", "eps", "initial_accumulator_value"])
def test_values_that_overflow_float32_are_refused(make, pattern):
    """Defect: lr or weight_decay finite as a double but overflowing float32 (lr=1e39 on
    a float32 group) turned the parameters into NaN."""
    w = np.ones(3, np.float32)
    with pytest.raises(ValueError, match=f"{pattern} is 1e\\+39, which overflows float32"):
        make(w)
    np.testing.assert_array_equal(w, 1.0)
    make(np.ones(3))                      # float64 takes it


def test_a_step_scalar_that_overflows_float32_is_refused_before_any_write():
    """lr = 3e38 is a float32 number, but Adam's first step size lr / (1 - 0.9) is not."""
    w = np.ones(3, np.float32)
    opt = ch8fast.Adam([w], lr=3e38)
    with pytest.raises(ValueError, match="per-step scalar lr = .* overflows float32"):
        opt.step(np.ones(3, np.float32))
    np.testing.assert_array_equal(w, 1.0)
    assert _steps(opt) == [0] and not opt.state[0]["exp_avg"].any()


def test_a_float32_lr_set_later_is_refused_at_the_next_step():
    w = np.ones(3, np.float32)
    opt = ch8fast.SGD([w], lr=0.1)
    opt.param_groups[0]["lr"] = 1e39
    with pytest.raises(ValueError, match="overflows float32"):
        opt.step(np.ones(3, np.float32))
    np.testing.assert_array_equal(w, 1.0)


def test_adamw_decay_factor_below_zero_is_the_formula():
    """With lr * weight_decay > 1, AdamW's factor 1 - lr * wd is negative (documented):
    theta changes sign, as the formula says."""
    w = np.full(3, 2.0)
    ch8fast.AdamW([w], lr=2.0, weight_decay=1.0).step(np.zeros(3))
    np.testing.assert_array_equal(w, -2.0)       # 2 * (1 - 2), zero Adam step


@pytest.mark.parametrize("make,name", [
    (lambda w: ch8fast.SGD([w], lr=10 ** 400), "lr"),
    (lambda w: ch8fast.SGD([w], momentum=10 ** 400), "momentum"),
    (lambda w: ch8fast.Adam([w], betas=(0.9, 10 ** 400)), r"betas\[1\]"),
    (lambda w: ch8fast.SGD([w], lr=0.1, clip_norm=10 ** 400), "clip_norm"),
    (lambda w: F.sgd(w, np.ones(3), lr=10 ** 400), "lr"),
], ids=["lr", "momentum", "betas", "clip_norm", "functional"])
def test_ints_too_large_for_a_float_are_a_value_error(make, name):
    """Defect: lr=10**400 raised OverflowError."""
    w = np.ones(3)
    with pytest.raises(ValueError, match=f"{name} must be .*too large for a float"):
        make(w)
    np.testing.assert_array_equal(w, 1.0)


def test_a_huge_step_count_in_a_state_dict_is_refused():
    w, opt = _adam()
    opt.step(np.ones(8))
    sd = opt.state_dict()
    sd["param_groups"][0]["step"] = 10 ** 400
    before = _bits(w, *opt.state[0].values())
    with pytest.raises(ValueError, match=r"\['step'\] must be an integer in"):
        opt.load_state_dict(sd)
    assert _bits(w, *opt.state[0].values()) == before
    opt.step(np.ones(8))                 # and it still steps
    assert _steps(opt) == [2]


def test_a_huge_step_count_in_a_checksummed_checkpoint_is_refused(tmp_path):
    """A checkpoint whose header says step = 10**400, with a valid checksum: ValueError,
    nothing changed."""
    from ch8fast.checkpoint import _header
    w, opt = _adam()
    opt.step(np.ones(8))
    sd = opt.state_dict()
    sd["param_groups"][0]["step"] = 10 ** 400
    arrays = _header(sd, None, None)
    path = tmp_path / "big.npz"
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    ch8fast.read_checkpoint(path)        # the file itself is intact
    fresh_w, fresh = _adam()
    with pytest.raises(ValueError, match="must be an integer in"):
        ch8fast.load_checkpoint(path, fresh)
    assert _steps(fresh) == [0]


@pytest.mark.parametrize("call", [
    lambda w, g, v: F.momentum(w, g, v, lr=0.1, momentum=0.9, nesterov="no"),
    lambda w, g, v: F.adam(w, g, v, v.copy(), step=1, decoupled_weight_decay="False"),
    lambda w, g, v: F.rmsprop(w, g, v, nesterov=0),
], ids=["nesterov", "decoupled", "nesterov_int"])
def test_functional_flags_are_checked_as_the_classes_check_them(call):
    """Defect: ch8fast.functional treated nesterov="no" as true."""
    w, g, v = np.ones(3), np.ones(3), np.zeros(3)
    with pytest.raises(TypeError, match="must be True or False"):
        call(w, g, v)
    np.testing.assert_array_equal(w, 1.0)


def test_functional_reads_the_specifications_defaults():
    for rule in rules.ALL:
        assert rule.defaults() == {k: h.default for k, h in rule.hyper.items()}
    w1, w2 = np.ones(4), np.ones(4)
    m1, v1, m2, v2 = (np.zeros(4) for _ in range(4))
    F.adam(w1, np.full(4, 0.5), m1, v1, step=1)
    opt = ch8fast.Adam([w2])
    opt.step(np.full(4, 0.5))
    assert w1.tobytes() == w2.tobytes()


# ---- Nesterov: hand changes and at_theta ----------------------------------------------------

@pytest.mark.parametrize("cls,kw", [
    (ch8fast.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    (ch8fast.RMSProp, dict(lr=0.01, momentum=0.9, nesterov=True, eps=0.1)),
], ids=["sgd", "rmsprop"])
def test_momentum_changed_by_hand_matches_the_closure_form(cls, kw):
    """Defect: in the shifted form, setting momentum by hand between steps moved theta by
    (alpha_old - alpha_new) v."""
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((10, 10)))
    A = q @ np.diag(np.linspace(0.1, 3.0, 10)) @ q.T
    x0 = rng.standard_normal(10)
    lit, sh = x0.copy(), x0.copy()
    o_lit, o_sh = cls([lit], **kw), cls([sh], **kw)
    for k in range(120):
        if k in (30, 60):
            for o in (o_lit, o_sh):
                o.param_groups[0]["momentum"] = 0.5 if k == 30 else 0.8
        if k == 90:
            for o in (o_lit, o_sh):
                o.param_groups[0].update(momentum=ch8fast.schedules.constant(0.7))
        o_lit.step(closure=lambda: A @ lit)
        o_sh.step(A @ sh)
    np.testing.assert_allclose(o_sh.theta()[0], lit, rtol=1e-10,
                               atol=1e-12 * np.abs(x0).max())


def test_theta_and_nested_at_theta_do_not_subtract_twice():
    """Defect: theta() inside at_theta(), and nested at_theta(), subtracted alpha v
    twice."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal(6)
    opt = ch8fast.SGD([w], lr=0.1, momentum=0.9, nesterov=True)
    for _ in range(5):
        opt.step(rng.standard_normal(6))
    phi, theta = w.copy(), opt.theta()[0]
    with opt.at_theta():
        assert w.tobytes() == theta.tobytes()
        assert opt.theta()[0].tobytes() == theta.tobytes()
        with opt.at_theta():
            assert w.tobytes() == theta.tobytes()
        assert w.tobytes() == theta.tobytes()
        with pytest.raises(RuntimeError, match="inside at_theta"):
            opt.step(np.ones(6))
    assert w.tobytes() == phi.tobytes()


def test_a_checkpoint_saved_inside_at_theta_resumes_exactly(tmp_path):
    """Defect: a checkpoint saved inside at_theta() did not resume exactly (it held theta
    where the arrays hold phi)."""
    rng = np.random.default_rng(2)
    grads = [rng.standard_normal(6) for _ in range(20)]
    w = np.linspace(-1, 1, 6)
    opt = ch8fast.SGD([w], lr=0.1, momentum=0.9, nesterov=True)
    for g in grads[:10]:
        opt.step(g)
    with opt.at_theta():
        ch8fast.save_checkpoint(tmp_path / "c.npz", opt, params=[w])
    for g in grads[10:]:
        opt.step(g)
    w2 = np.zeros(6)
    opt2 = ch8fast.SGD([w2], lr=0.1, momentum=0.9, nesterov=True)
    ch8fast.load_checkpoint(tmp_path / "c.npz", opt2, params=[w2])
    for g in grads[10:]:
        opt2.step(g)
    assert w2.tobytes() == w.tobytes()


# ---- checkpoint paths and metadata ----------------------------------------------------------

@pytest.mark.parametrize("length", [240, 250, 255])
def test_long_checkpoint_names_work(tmp_path, length):
    """Defect: valid names of 240-255 characters failed (the temporary name was too
    long)."""
    w, opt = _adam()
    path = tmp_path / ("c" * (length - 4) + ".npz")
    ch8fast.save_checkpoint(path, opt, params=[w])
    ch8fast.save_checkpoint(path, opt, params=[w])       # over the old one
    ch8fast.load_checkpoint(path, opt, params=[w])
    assert os.listdir(tmp_path) == [path.name]


def test_a_bytes_path_works(tmp_path):
    """Defect: a bytes path failed with an internal TypeError."""
    w, opt = _adam()
    path = os.fsencode(tmp_path / "c.npz")
    ch8fast.save_checkpoint(path, opt)
    ch8fast.read_checkpoint(path)
    ch8fast.load_checkpoint(path, opt)
    with pytest.raises(TypeError, match="path must be"):
        ch8fast.save_checkpoint(3.5, opt)


def test_extra_with_mixed_key_types_round_trips(tmp_path):
    """Defect: extra with mixed key types that json.dumps accepts was refused with a sort
    error. Keys come back as strings, as JSON has them."""
    w, opt = _adam()
    extra = {1: "a", "b": 2, 2.5: [None, {True: 1}]}
    ch8fast.save_checkpoint(tmp_path / "c.npz", opt, extra=extra)
    got = ch8fast.load_checkpoint(tmp_path / "c.npz", opt)
    assert got == {"1": "a", "b": 2, "2.5": [None, {"true": 1}]}
    with pytest.raises(ValueError, match="both become the JSON key '1'"):
        ch8fast.save_checkpoint(tmp_path / "d.npz", opt, extra={1: "a", "1": "b"})
    assert not (tmp_path / "d.npz").exists()


# ---- threads and interrupts -----------------------------------------------------------------

def test_two_threads_stepping_one_optimizer_are_serialized():
    n, steps = 200_000, 60
    g = np.full(n, 1e-3)
    w = np.ones(n)
    opt = ch8fast.Adam([w], lr=1e-3)
    barrier = threading.Barrier(2)

    def work():
        barrier.wait()
        for _ in range(steps):
            opt.step(g)
    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ref_w = np.ones(n)
    ref = ch8fast.Adam([ref_w], lr=1e-3)
    for _ in range(2 * steps):
        ref.step(g)
    assert _steps(opt) == [2 * steps]
    assert w.tobytes() == ref_w.tobytes()


def test_state_dicts_and_checkpoints_taken_while_another_thread_steps(tmp_path):
    """Every snapshot is of a whole step: its exp_avg is that of its step count, and a
    checkpoint written meanwhile always verifies."""
    n = 300_000
    g = np.full(n, 0.5, np.float32)
    w = np.ones(n, np.float32)
    opt = ch8fast.Adam([w], lr=1e-3)
    expected = {0: np.float32(0)}            # exp_avg after t steps of a constant g
    m = np.float32(0)
    for t in range(1, 400):
        m = np.float32(0.9) * m + np.float32(0.1) * g[0]
        expected[t] = m
    stop = threading.Event()

    def stepper():
        for _ in range(390):
            if stop.is_set():
                break
            opt.step(g)
            time.sleep(0.0002)        # the lock is not fair: let the snapshots in
    th = threading.Thread(target=stepper)
    th.start()
    try:
        seen = set()
        for k in range(15):
            sd = opt.state_dict()
            t = sd["param_groups"][0]["step"]
            ea = sd["state"][0]["exp_avg"]
            assert ea[0] == expected[t] and ea[-1] == expected[t], t
            seen.add(t)
            path = tmp_path / f"c{k % 2}.npz"
            ch8fast.save_checkpoint(path, opt, params=[w])
            header, arrays = ch8fast.read_checkpoint(path)
            t = header["state_dict"]["param_groups"][0]["step"]
            assert arrays["state.0.exp_avg"][0] == expected[t]
    finally:
        stop.set()
        th.join()
    assert len(seen) > 1                     # the stepper did run meanwhile


def test_a_keyboard_interrupt_leaves_a_step_whole(tmp_path):
    """Defect: a KeyboardInterrupt during a long step could leave the update applied and
    the step not counted. Interrupt long steps at many moments; each time the parameters
    and state equal those of exactly the counted number of steps, and a checkpoint saved
    in the handler resumes exactly."""
    n = 4_000_000
    rng = np.random.default_rng(3)
    g = rng.standard_normal(n).astype(np.float32)
    w = np.ones(n, np.float32)
    opt = ch8fast.Adam([w], lr=1e-3)
    opt.step(g)
    t0 = time.perf_counter()
    opt.step(g)
    step_time = time.perf_counter() - t0
    interrupted = 0
    for k in range(12):
        delay = step_time * (0.1 + 0.8 * k / 11)
        timer = threading.Timer(delay, _thread.interrupt_main)
        try:
            timer.start()
            for _ in range(50):
                opt.step(g)
            timer.join()
        except KeyboardInterrupt:
            interrupted += 1
            ch8fast.save_checkpoint(tmp_path / "c.npz", opt, params=[w])
        finally:
            timer.cancel()
            timer.join()
    assert interrupted >= 6
    t = _steps(opt)[0]
    ref_w = np.ones(n, np.float32)
    ref = ch8fast.Adam([ref_w], lr=1e-3)
    for _ in range(t):
        ref.step(g)
    assert w.tobytes() == ref_w.tobytes()
    assert opt.state[0]["exp_avg_sq"].tobytes() == ref.state[0]["exp_avg_sq"].tobytes()
    # the last checkpoint, saved in a handler, resumes exactly
    w3 = np.zeros(n, np.float32)
    opt3 = ch8fast.Adam([w3], lr=1e-3)
    ch8fast.load_checkpoint(tmp_path / "c.npz", opt3, params=[w3])
    target = _steps(opt3)[0] + 2
    while _steps(opt3)[0] < target:
        opt3.step(g)
    while _steps(ref)[0] < target:
        ref.step(g)
    assert w3.tobytes() == ref_w.tobytes()


def test_a_closure_cannot_step_its_own_optimizer():
    w = np.ones(3)
    opt = ch8fast.SGD([w], lr=0.1)

    def closure():
        opt.step(np.ones(3))
        return np.ones(3)
    with pytest.raises(RuntimeError, match="while this optimizer is stepping"):
        opt.step(closure=closure)
    np.testing.assert_array_equal(w, 1.0)
    opt.step(np.ones(3))                  # not left locked


# ---- pickle and deepcopy --------------------------------------------------------------------

@pytest.mark.parametrize("name,cls,ref,hyper", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_pickle_and_deepcopy_round_trip_bit_exactly(name, cls, ref, hyper):
    rng = np.random.default_rng(4)
    ws = [rng.standard_normal(5), rng.standard_normal((2, 3)).astype(np.float32)]
    opt = cls([{"params": [ws[0]]}, {"params": [ws[1]], "lr": 0.02}], **hyper,
              clip_norm=3.0)
    grads = [[rng.standard_normal(5), rng.standard_normal((2, 3)).astype(np.float32)]
             for _ in range(8)]
    for g in grads[:4]:
        opt.step(g)
    for clone in (pickle.loads(pickle.dumps(opt)), copy.deepcopy(opt)):
        assert type(clone) is cls
        assert clone.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
        assert clone.clip_norm == 3.0
        cw = clone.params
        assert all(a.tobytes() == b.tobytes() and a is not b for a, b in zip(cw, ws))
        for g in grads[4:]:
            clone.step(g)
    for g in grads[4:]:
        opt.step(g)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(clone.params, ws))


def test_deepcopy_keeps_the_model_and_optimizer_sharing_arrays():
    """A model and its optimizer copied together (as joblib persists an estimator) still
    share the parameter arrays."""
    w = np.ones(4)
    model = {"w": w, "opt": ch8fast.Adam([w], lr=0.1)}
    clone = copy.deepcopy(model)
    assert clone["opt"].params[0] is clone["w"]
    clone["opt"].step(np.ones(4))
    assert not np.array_equal(clone["w"], 1.0)
    np.testing.assert_array_equal(w, 1.0)
    blob = pickle.loads(pickle.dumps(model))
    assert blob["opt"].params[0] is blob["w"]


# ---- scalars by name ------------------------------------------------------------------------

def test_scalars_are_set_and_read_by_name():
    s = rules.ADAM.scalars_for(rules.ADAM.check_all(rules.ADAM.defaults(), str))
    assert s.rule == "adam" and s.beta1 == 0.9 and s.beta2 == 0.999 and s.bias_correction
    kv = s.kernel_values(t=3)
    assert kv["lr"] == 1e-3 / (1 - 0.9 ** 3)
    assert kv["c2"] == 1 / (1 - 0.999 ** 3) ** 0.5
    with pytest.raises(AttributeError):
        s.learning_rate = 1.0
    with pytest.raises(ValueError, match="unknown rule"):
        s.rule = "adamax"
    assert ch8fast.rules.GradPlan(scale=0.5).clamp == float("inf")
