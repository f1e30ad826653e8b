"""Where two features meet: one regression test per defect found at the intersections of
storage, row-sparse updates, Nesterov momentum, clipping, schedules and catch-up. Each
test failed on the code before its fix. (The product of the axes is walked by
tests/test_product.py.)"""

import math
import pickle

import numpy as np
import pytest

import ch8fast
from ch8fast import SparseRows, storage
import reference as R

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16, F16 = ml_dtypes.bfloat16, np.float16


def _dense(sp, n_rows):
    return sp.to_dense(n_rows)


# ---- 16-bit tables and compressed state with long rows ---------------------------------

@pytest.mark.parametrize("d", [255, 256, 257, 1024, 4096])
@pytest.mark.parametrize("dtype,keep,fmt", [
    (BF16, "master", None), (BF16, "stochastic", None), (F16, "kahan", None),
    (BF16, "stochastic", "bfloat16"), (np.float32, None, "bfloat16"),
])
def test_row_sparse_step_on_long_rows_equals_the_dense_step(d, dtype, keep, fmt, threads):
    """Rows longer than the codec's 256-element block ran past its stack buffers (SIGSEGV
    with bfloat16 rows of 4096, SIGBUS with bfloat16 state, silently wrong stochastic
    rounding). AdaGrad and plain SGD leave zero-gradient rows alone, so the row-sparse
    step is the dense step, bit for bit."""
    rng = np.random.default_rng(d)
    n = 12
    w1 = rng.standard_normal((n, d)).astype(np.float32).astype(dtype)
    w2 = w1.copy()
    kw = dict(param_mode=keep, state_format=fmt, seed=7)
    kw = {k: v for k, v in kw.items() if v is not None}
    cls, hyper = ((ch8fast.AdaGrad, dict(lr=0.1)) if fmt is not None
                  else (ch8fast.SGD, dict(lr=0.1)))
    o1, o2 = cls([w1], **hyper, **kw), cls([w2], **hyper, **kw)
    for _ in range(3):
        idx = np.array([1, 5, 5, n - 1])
        sp = SparseRows(idx, rng.standard_normal((4, d)).astype(np.float32))
        o1.step([sp])
        o2.step([_dense(sp, n)])
        assert w1.tobytes() == w2.tobytes()
        for k in o2.state[0]:
            assert o1.state[0][k].tobytes() == o2.state[0][k].tobytes(), k


# ---- the gradient/parameter overlap check ------------------------------------------------

def test_overlap_check_sees_a_wider_gradient_at_a_known_address():
    """The check was cached by start address: a float32 gradient where a bfloat16 one was
    covers twice the bytes, overlapping the parameter, and was accepted."""
    n = 64
    buf = np.zeros(2 * n, np.uint16)
    g16 = buf[:n].view(BF16)
    w = buf[n:].view(BF16)
    w[...] = 1
    opt = ch8fast.SGD([w], lr=0.1)
    opt.step([g16])
    g32 = buf.view(np.float32)               # n float32 values: the bytes of g16 and w
    before = w.copy()
    with pytest.raises(ValueError, match="shares memory"):
        opt.step([g32])
    assert w.tobytes() == before.tobytes()


# ---- 8-bit state of a block of tiny values -------------------------------------------------

@pytest.mark.parametrize("storage_name", ["q8_signed", "q8_unsigned"])
@pytest.mark.parametrize("top", [1e-39, 3e-40, 1.4e-45, 2e-38, 5e-39])
def test_q8_block_of_tiny_values_keeps_its_zeros(storage_name, top):
    """A block whose largest magnitude is below ~2.8e-39 overflowed the scale's reciprocal:
    0 * inf = NaN, and zeros decoded to -absmax (E4M3) or +absmax (E5M3)."""
    x = np.zeros(300, np.float32)
    x[3] = top
    x[10] = top / 2
    if storage_name == "q8_signed":
        x[20] = -top
    data, scales = ch8fast._isa.K.encode_block_state(storage_name, x, 5, 0)
    signed = storage_name == "q8_signed"
    ref_codes, ref_scales = R.q8_encode(x, signed, R.words(5, 0, x.size))
    assert data.tobytes() == ref_codes.tobytes()
    assert scales.tobytes() == ref_scales.tobytes()
    back = storage.decode(storage_name, data, scales)
    assert np.isfinite(back).all()
    assert (back[x == 0] == 0).all()
    assert back[3] > 0


def test_q8_adam_with_tiny_gradients_stays_finite():
    w = np.ones(512, np.float32)
    opt = ch8fast.Adam([w], lr=1e-3, state_format="q8")
    g = np.zeros(512, np.float32)
    g[::7] = 1e-22                       # squares ~1e-44: a block of subnormal v
    for _ in range(3):
        opt.step([g])
    dec = opt.decoded_state(0)
    assert np.isfinite(w).all()
    for k in ("exp_avg", "exp_avg_sq"):
        assert np.isfinite(dec[k]).all()
        assert (dec[k][g == 0] == 0).all(), k


# ---- 16-bit parameters with Nesterov momentum ----------------------------------------------

@pytest.mark.parametrize("dtype", [BF16, F16])
def test_master_mode_nesterov_sees_an_edit_of_the_16bit_array(dtype):
    """theta() and at_theta() read the master copy, ignoring an edit of the 16-bit array;
    setting the momentum afterwards discarded the edit."""
    w = np.full(8, 1.0, dtype)
    opt = ch8fast.SGD([w], lr=0.1, momentum=0.9, nesterov=True)
    opt.step([np.ones(8, dtype)])
    w[...] = 5.0                                     # the user's edit of phi
    v = opt.state[0]["velocity"].astype(np.float32)
    theta = opt.theta()[0].astype(np.float32)
    np.testing.assert_allclose(theta, 5.0 - 0.9 * v, rtol=1e-2)
    with opt.at_theta() as ps:
        np.testing.assert_allclose(ps[0].astype(np.float32), 5.0 - 0.9 * v, rtol=1e-2)
    assert (w.astype(np.float32) == 5.0).all()
    opt.param_groups[0]["momentum"] = 0.5           # moves phi to theta + 0.5 v
    np.testing.assert_allclose(w.astype(np.float32), 5.0 - 0.9 * v + 0.5 * v, rtol=1e-2)


# ---- float16 with a compensation, past 65504 ------------------------------------------------

def test_float16_kahan_past_the_largest_float16_stays_finite():
    """A step that took theta past 65504 made the float16 part inf and the compensation
    -inf: NaN for good. The float16 part now saturates at 65504 and the compensation holds
    the rest, so theta is right (as with a master copy)."""
    out = {}
    for keep in ("kahan", "master"):
        w = np.array([65400.0, -65400.0, 1.0], F16)
        opt = ch8fast.SGD([w], lr=1.0, param_mode=keep)
        opt.step([np.array([-150.0, 150.0, 0.0], F16)])   # theta 65550: past 65504
        assert np.isfinite(opt.decoded_state(0)["theta"]).all(), keep
        opt.step([np.array([66.0, -66.0, 0.0], F16)])     # back below 65504
        out[keep] = opt.decoded_state(0)["theta"]
        assert np.isfinite(w.astype(np.float32)).all(), keep
    np.testing.assert_array_equal(out["kahan"], out["master"])
    top = float(np.float16(65400.0)) + 150.0 - 66.0          # 65492
    np.testing.assert_array_equal(out["master"], [top, -top, 1.0])


# ---- row-sparse gradients with clipping and skip_nonfinite ---------------------------------

def test_row_sparse_clipping_on_overflow_sums_duplicates_first():
    """The norm recomputed after an overflowing sum of squares took the raw rows, without
    summing duplicates: [1e200] and [1e200] at one index clipped to 1 stepped by -1.414."""
    E1, E2 = np.zeros((3, 1)), np.zeros((3, 1))
    o1 = ch8fast.SGD([E1], lr=1.0, clip_norm=1.0)
    o2 = ch8fast.SGD([E2], lr=1.0, clip_norm=1.0)
    sp = SparseRows(np.array([1, 1]), np.array([[1e200], [1e200]]))
    o1.step([sp])
    o2.step([_dense(sp, 3)])
    np.testing.assert_allclose(E1, E2, rtol=1e-15)
    assert E1[1, 0] == pytest.approx(-1.0)
    assert o1.last_grad_norm == pytest.approx(2e200)


def test_skip_nonfinite_skips_duplicates_whose_sum_overflows():
    E1 = np.ones((3, 2), np.float32)
    opt = ch8fast.SGD([E1], lr=0.1, skip_nonfinite=True)
    sp = SparseRows(np.array([2, 2]), np.full((2, 2), 3e38, np.float32))
    opt.step([sp])
    assert opt.skipped_steps == 1
    assert (E1 == 1).all()


# ---- row-sparse gradients with Nesterov momentum --------------------------------------------

def test_row_sparse_nesterov_closure_form_leaves_untouched_rows_alone():
    """The literal form moved every row to theta + alpha v for the closure and moved back
    only the touched rows: the others drifted by alpha v each step."""
    rng = np.random.default_rng(0)
    E = rng.standard_normal((10, 3))
    opt = ch8fast.SGD([E], lr=0.1, momentum=0.9, nesterov=True)
    for idx in ([0, 1], [1, 2], [0, 2], [3, 4], [0, 1]):
        idx = np.array(idx)
        vals = rng.standard_normal((2, 3))
        before = E.copy()
        opt.step(closure=lambda idx=idx, vals=vals: [SparseRows(idx, vals)])
        untouched = np.setdiff1d(np.arange(10), idx)
        np.testing.assert_array_equal(E[untouched], before[untouched])
        assert not np.array_equal(E[idx], before[idx])


def test_row_sparse_nesterov_shifted_form_with_a_momentum_schedule():
    """With a momentum schedule the untouched rows kept the interim point of an earlier
    momentum, so theta of a row never touched drifted (0.9 -> 0.92)."""
    E = np.full((6, 2), 0.9)
    opt = ch8fast.SGD([E], lr=0.1, momentum=lambda k: 0.5 + 0.1 * min(k, 4),
                      nesterov=True)
    # every row touched once, then only rows 0 and 1
    opt.step([SparseRows(np.arange(6), np.ones((6, 2)))])
    theta_after_first = opt.theta()[0].copy()
    for _ in range(5):
        opt.step([SparseRows(np.array([0, 1]), np.ones((2, 2)))])
    theta = opt.theta()[0]
    # untouched rows: theta unchanged (lazy), to rounding
    np.testing.assert_allclose(theta[2:], theta_after_first[2:], rtol=1e-14)


# ---- catch-up of a table added later -----------------------------------------------------

def test_catch_up_of_a_table_added_after_k_steps_starts_at_that_step():
    """A table appended to a group's params after k steps was caught up as if present from
    step 0 (AdamW: k extra steps of decoupled decay at its first update)."""
    rng = np.random.default_rng(3)
    b1, b2 = np.ones(3), np.ones(3)
    lazy = ch8fast.AdamW([b1], lr=0.1, weight_decay=0.5, sparse="catch_up")
    dense = ch8fast.AdamW([b2], lr=0.1, weight_decay=0.5)
    for _ in range(4):
        g = rng.standard_normal(3)
        lazy.step([g])
        dense.step([g.copy()])
    E1, E2 = np.ones((5, 2)), np.ones((5, 2))
    lazy.param_groups[0]["params"].append(E1)
    dense.param_groups[0]["params"].append(E2)
    for _ in range(3):
        g = rng.standard_normal(3)
        sp = SparseRows(np.array([1, 3]), rng.standard_normal((2, 2)))
        lazy.step([g, sp])
        dense.step([g.copy(), _dense(sp, 5)])
    # rows touched at every step since the table came: the same as dense training
    np.testing.assert_allclose(E1[[1, 3]], E2[[1, 3]], rtol=1e-12)
    # an untouched row, caught up by a dense step: decayed only since the table came
    g = rng.standard_normal(3)
    lazy.step([g, np.zeros((5, 2))])
    dense.step([g.copy(), np.zeros((5, 2))])
    np.testing.assert_allclose(E1, E2, rtol=1e-12)


# ---- row-wise AdaGrad is AdaGrad ----------------------------------------------------------

@pytest.mark.parametrize("convention", ["book", "torch", "optax", "keras", "sklearn"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_rowwise_adagrad_is_adagrad_on_rows_of_equal_magnitude(convention, dtype):
    """Row-wise AdaGrad kept its own copy of the rule, with delta outside the root whatever
    the convention (optax puts it inside). On a gradient whose rows hold one magnitude,
    the row's mean square is each element's square, so row-wise AdaGrad is AdaGrad."""
    if convention not in ch8fast.AdaGrad.rule.profiles:
        pytest.skip(f"AdaGrad has no convention {convention!r}")
    rng = np.random.default_rng(4)
    E1 = rng.standard_normal((6, 4)).astype(dtype)
    E2 = E1.copy()
    kw = dict(lr=0.5, eps=0.1, convention=convention)
    o1 = ch8fast.AdaGrad([E1], rowwise=True, **kw)
    o2 = ch8fast.AdaGrad([E2], **kw)
    for _ in range(4):
        mag = rng.uniform(0.5, 2.0, (6, 1))
        signs = rng.choice([-1.0, 1.0], (6, 4))
        g = (mag * signs).astype(dtype)
        o1.step([g])
        o2.step([g.copy()])
    np.testing.assert_allclose(E1, E2, rtol=1e-12 if dtype == np.float64 else 1e-6)


# ---- centered RMSProp with catch-up -----------------------------------------------------

@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_centered_rmsprop_catch_up_equals_dense_training(momentum):
    """The catch-up never decayed ``grad_avg``: 9e-4 from dense training after 6 steps."""
    rng = np.random.default_rng(5)
    E1 = rng.standard_normal((8, 3))
    E2 = E1.copy()
    kw = dict(lr=0.01, centered=True, momentum=momentum)
    lazy = ch8fast.RMSProp([E1], sparse="catch_up", **kw)
    dense = ch8fast.RMSProp([E2], **kw)
    for _ in range(6):
        sp = SparseRows(rng.integers(0, 8, 3), rng.standard_normal((3, 3)))
        lazy.step([sp])
        dense.step([_dense(sp, 8)])
    g = rng.standard_normal((8, 3))
    lazy.step([g])
    dense.step([g.copy()])
    for k in dense.state[0]:
        np.testing.assert_allclose(lazy.state[0][k], dense.state[0][k], rtol=1e-12,
                                   atol=1e-15, err_msg=k)
    np.testing.assert_allclose(E1, E2, rtol=1e-12, atol=1e-15)


# ---- hyperparameters given as mutable containers -------------------------------------------

def test_a_betas_list_is_not_kept_by_reference():
    """A caller's list was kept: mutating it changed param_groups, state_dict and
    checkpoints, but not the steps."""
    betas = [0.9, 0.99]
    opt = ch8fast.Adam([np.zeros(3)], betas=betas)
    betas[0] = 0.0
    assert tuple(opt.param_groups[0]["betas"]) == (0.9, 0.99)
    assert tuple(opt.state_dict()["param_groups"][0]["betas"]) == (0.9, 0.99)
    assert tuple(pickle.loads(pickle.dumps(opt)).param_groups[0]["betas"]) == (0.9, 0.99)


# ---- schedules evaluated only where they are used --------------------------------------------

def test_a_lookup_table_schedule_runs_to_its_end():
    """Every step also evaluated each schedule at k + 1: a table of n values failed at step
    n - 1 with IndexError."""
    table = [0.1, 0.05, 0.02]
    w = np.ones(2)
    opt = ch8fast.Adam([w], lr=lambda k: table[k])
    for _ in range(len(table)):
        opt.step([np.ones(2)])
    assert opt.steps[0] == 3


def test_a_schedule_is_not_asked_for_a_step_that_never_comes():
    nan = math.nan
    opt = ch8fast.SGD([np.ones(2)], lr=lambda k: 0.1 if k == 0 else nan)
    opt.step([np.ones(2)])
    np.testing.assert_allclose(opt.params[0], 0.9)
    with pytest.raises(ValueError, match="lr"):
        opt.step([np.ones(2)])
    np.testing.assert_allclose(opt.params[0], 0.9)


def test_nesterov_still_places_the_interim_point_with_the_next_momentum():
    """(Nesterov's shifted form is the one rule that reads the next step's value.)"""
    w = np.zeros(2)
    seen = []

    def mom(k):
        seen.append(k)
        return 0.5

    opt = ch8fast.SGD([w], lr=0.1, momentum=mom, nesterov=True)
    opt.step([np.ones(2)])
    assert 1 in seen


# ---- a killed checkpoint writer that is a zombie -----------------------------------------

@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/stat"),
                    reason="needs /proc to tell a zombie")
def test_a_zombie_writer_counts_as_gone():
    """``os.kill(pid, 0)`` succeeds on a zombie, so the temporary file of a killed writer
    not yet reaped by its parent was kept as if the writer still ran."""
    import subprocess
    import sys
    import time
    from ch8fast import checkpoint
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        for _ in range(500):                  # until it has exited (unreaped: a zombie)
            with open(f"/proc/{child.pid}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    break
            time.sleep(0.01)
        assert not checkpoint._pid_alive(child.pid)
    finally:
        child.wait()
    assert checkpoint._pid_alive(__import__("os").getpid())
