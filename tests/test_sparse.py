"""Row-sparse gradients (ch8fast.SparseRows): lazy updates against a NumPy reference of
their definition (the rule applied to the touched rows, the others left alone), against
the dense rule where the two coincide, the catch-up variant against dense training,
row-wise AdaGrad, duplicates, bad input, and the rest of the library."""

import zlib

import numpy as np
import pytest

import ch8fast
from ch8fast import SparseRows
from conftest import CONFIGS, reference_hyper
import reference as R

N, D = 60, 12

# the dense suite's configurations (conftest.CONFIGS), but Nesterov's: a lazy row of the
# shifted form is checked against the dense step in tests/test_product.py
# (LAMB and LARS refuse row-sparse gradients: tests/test_trust_ratio.py)
LAZY = [c for c in CONFIGS if not c[3].get("nesterov") and not c[1].rule.trust_ratio]


def _batches(rng, steps, dtype=np.float64, k=15, dup=True):
    out = []
    for _ in range(steps):
        idx = rng.integers(0, N, k)
        if dup:
            idx[:3] = idx[3]                  # duplicates
        out.append(SparseRows(idx, (rng.standard_normal((k, D)) * 0.5).astype(dtype)))
    return out


@pytest.mark.parametrize("name,cls,ref_name,hyper", LAZY, ids=[c[0] for c in LAZY])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_lazy_update_is_the_rule_on_the_touched_rows(name, cls, ref_name, hyper, dtype,
                                                     threads):
    rng = np.random.default_rng(0)
    E = rng.standard_normal((N, D)).astype(dtype)
    b = rng.standard_normal(5).astype(dtype)
    opt = cls([E, b], **hyper)
    ref_E, ref_b = E.copy(), b.copy()
    h = reference_hyper(cls, hyper)
    ref_state = {}                            # the reference's state of each row
    ref_b_opt = getattr(R, ref_name)([ref_b], **h)
    t_row = np.zeros(N, int)
    for sp in _batches(rng, 8, dtype):
        gb = rng.standard_normal(5).astype(dtype)
        opt.step([sp, gb])
        # (schedule-free: the average's weights are the group's, counted every step)
        counters = vars(ref_b_opt).get("weight_sum"), vars(ref_b_opt).get("lr_max")
        ref_b_opt.step([gb])
        rows, summed = ch8fast.sparse.sum_duplicates(sp.indices, sp.values, N)
        for r, g in zip(rows, summed):
            # a row's own reference optimizer, stepped only when the row is touched
            if r not in ref_state:
                ref_state[r] = getattr(R, ref_name)([ref_E[r]], **h)
            ro = ref_state[r]
            if ref_name in ("Adam", "ADOPT", "AdEMAMix") or ref_name.startswith(
                    "ScheduleFree"):
                ro.t = opt.steps[0] - 1       # their t counts every step of the group
            if ref_name.startswith("ScheduleFree"):
                ro.weight_sum, ro.lr_max = counters
            ro.step([g])
            ref_E[r] = ro.params[0]
            t_row[r] += 1
    from conftest import assert_close
    assert_close(E, ref_E, dtype, name)
    assert_close(b, ref_b_opt.params[0], dtype, name)
    untouched = t_row == 0
    assert untouched.any()


@pytest.mark.parametrize("cls,hyper", [(ch8fast.SGD, dict(lr=0.1)),
                                       (ch8fast.AdaGrad, dict(lr=0.1))],
                         ids=["sgd", "adagrad"])
def test_lazy_equals_dense_where_untouched_rows_do_not_move(cls, hyper):
    """Plain SGD and AdaGrad (no weight decay) leave a zero-gradient row as it is, so the
    lazy update is the dense update of the same gradient, bit for bit."""
    rng = np.random.default_rng(1)
    E1 = rng.standard_normal((N, D))
    E2 = E1.copy()
    o1, o2 = cls([E1], **hyper), cls([E2], **hyper)
    for sp in _batches(rng, 10):
        o1.step([sp])
        o2.step([sp.to_dense(N)])
    assert E1.tobytes() == E2.tobytes()
    assert o1.state[0].get("sum", np.zeros(1)).tobytes() == \
        o2.state[0].get("sum", np.zeros(1)).tobytes()


@pytest.mark.parametrize("cls,hyper,exact", [
    (ch8fast.SGD, dict(lr=0.05, momentum=0.9), True),
    (ch8fast.RMSProp, dict(lr=0.01), True),
    (ch8fast.RMSProp, dict(lr=0.01, momentum=0.5), True),
    (ch8fast.AdaDelta, dict(), True),
    (ch8fast.AdaGrad, dict(lr=0.1), True),
    (ch8fast.Adam, dict(lr=0.01), False),
], ids=["momentum", "rmsprop", "rmsprop_momentum", "adadelta", "adagrad", "adam"])
def test_catch_up_equals_dense_training(cls, hyper, exact):
    """The catch-up variant equals dense training with zero rows, to rounding, where the
    missed steps have a closed form; for Adam the moments do (theta's missed movement is
    not applied)."""
    rng = np.random.default_rng(2)
    E1 = rng.standard_normal((N, D))
    E2 = E1.copy()
    lazy = cls([E1], **hyper, sparse="catch_up")
    dense = cls([E2], **hyper)
    for step, sp in enumerate(_batches(rng, 25, k=6)):
        lazy.step([sp])
        dense.step([sp.to_dense(N)])
    # one dense step brings every row up to date
    g = rng.standard_normal((N, D)) * 0.1
    lazy.step([g])
    dense.step([g.copy()])
    for k in lazy.state[0]:
        if k in dense.state[0]:
            np.testing.assert_allclose(lazy.state[0][k], dense.state[0][k], rtol=1e-10,
                                       atol=1e-14, err_msg=k)
    if exact:
        np.testing.assert_allclose(E1, E2, rtol=1e-10, atol=1e-13)
    else:
        assert not np.allclose(E1, E2, rtol=1e-6)     # Adam: theta differs, documented
    assert (lazy.state[0]["last_step"] <= 26).all()


def test_catch_up_moves_rarely_seen_rows_as_dense_training_does():
    """The users' complaint: under lazy Adam a rarely seen row keeps its moments. With
    catch-up its first moment decays as in dense training."""
    E1, E2 = np.zeros((4, 3)), np.zeros((4, 3))
    lazy = ch8fast.Adam([E1], lr=0.01)
    catch = ch8fast.Adam([E2], lr=0.01, sparse="catch_up")
    g = SparseRows(np.array([0]), np.ones((1, 3)))
    for o in (lazy, catch):
        o.step([g])
        for _ in range(20):
            o.step([SparseRows(np.array([1]), np.ones((1, 3)))])
        o.step([SparseRows(np.array([0]), np.zeros((1, 3)))])
    assert lazy.state[0]["exp_avg"][0, 0] == pytest.approx(0.1 * 0.9)
    assert catch.state[0]["exp_avg"][0, 0] == pytest.approx(0.1 * 0.9 ** 21)


def test_duplicates_are_summed_the_same_for_any_order_and_thread_count(threads):
    rng = np.random.default_rng(3)
    idx = np.array([5, 9, 5, 5, 2, 9, 5, 7] * 50)
    vals = (rng.standard_normal((idx.size, D)) * 10.0 ** rng.uniform(-8, 8, (idx.size, 1)))
    results = []
    for nt in (1, threads):
        for perm in (np.arange(idx.size), rng.permutation(idx.size), rng.permutation(idx.size)):
            ch8fast.set_num_threads(nt)
            E = np.ones((N, D))
            ch8fast.Adam([E], lr=0.1).step([SparseRows(idx[perm], vals[perm])])
            results.append(E.tobytes())
    ch8fast.set_num_threads(0)
    assert len(set(results)) == 1
    rows, summed = ch8fast.sparse.sum_duplicates(idx, vals, N)
    assert sorted(rows) == [2, 5, 7, 9]
    exact = [np.sort(vals[idx == r], axis=0).sum(0) for r in rows]
    np.testing.assert_allclose(summed, exact, rtol=1e-12)


@pytest.mark.parametrize("grad,exc,pattern", [
    (lambda: SparseRows(np.array([0, N]), np.ones((2, D))), ValueError, "index 60 .* out of range"),
    (lambda: SparseRows(np.array([-1]), np.ones((1, D))), ValueError, "index -1 .* out of range"),
    (lambda: SparseRows(np.array([0]), np.ones((1, D + 1))), ValueError, r"shape \(1, 12\)"),
    (lambda: SparseRows(np.array([0]), np.ones((1, D), np.float32)), TypeError, "dtype float32"),
    (lambda: SparseRows(np.array([0]), np.ones((1, D), np.int64)), TypeError, "dtype must be"),
], ids=["beyond", "negative", "width", "dtype", "int_values"])
def test_bad_row_sparse_gradients_change_nothing(grad, exc, pattern):
    E = np.ones((N, D))
    w = np.ones(3)
    opt = ch8fast.Adam([E, w], lr=0.1)
    opt.step([np.ones((N, D)), np.ones(3)])
    before = [E.tobytes(), w.tobytes()] + [a.tobytes() for st in opt.state
                                           for a in st.values()]
    with pytest.raises(exc, match=pattern):
        opt.step([grad(), np.ones(3)])
    assert [E.tobytes(), w.tobytes()] + [a.tobytes() for st in opt.state
                                         for a in st.values()] == before
    opt.step([SparseRows(np.array([1]), np.ones((1, D))), np.ones(3)])   # not locked


def test_bad_constructions():
    with pytest.raises(TypeError, match="integers"):
        SparseRows(np.array([0.5]), np.ones((1, D)))
    with pytest.raises(TypeError, match="integers"):
        SparseRows(np.array([True]), np.ones((1, D)))
    with pytest.raises(ValueError, match="shape"):
        SparseRows(np.array([0, 1]), np.ones((1, D)))
    w = np.ones(5)
    with pytest.raises(TypeError, match="for a 2-D parameter"):
        ch8fast.SGD([w]).step([SparseRows(np.array([0]), np.ones((1, 5)))])
    E = np.ones((4, 4), np.float32)
    with pytest.raises(ValueError, match="state_format 'float32' or 'bfloat16'"):
        ch8fast.Adam([E], state_format="q8").step([SparseRows(np.array([0]),
                                                              np.ones((1, 4), np.float32))])
    with pytest.raises(ValueError, match="catch_up.*Nesterov"):
        ch8fast.SGD([E], momentum=0.9, nesterov=True, sparse="catch_up")
    with pytest.raises(ValueError, match="sparse must be one of"):
        ch8fast.SGD([E], sparse="eager")
    with pytest.raises(ValueError, match="share memory with a parameter"):
        opt = ch8fast.SGD([E], lr=0.1)
        opt.step([SparseRows(np.array([0]), E[:1])])


def test_rowwise_adagrad_against_its_reference():
    """One accumulator per row: r <- r + mean(g^2 over the row); theta <- theta -
    lr g / (eps + sqrt(r)); 1-D parameters keep one per element."""
    rng = np.random.default_rng(4)
    E = rng.standard_normal((N, D))
    b = rng.standard_normal(D)
    opt = ch8fast.AdaGrad([E, b], lr=0.1, eps=1e-7, rowwise=True,
                          initial_accumulator_value=0.1)
    assert opt.state[0]["sum"].shape == (N,) and opt.state[1]["sum"].shape == (D,)
    rE, rb = E.copy(), b.copy()
    acc, accb = np.full(N, 0.1), np.full(D, 0.1)
    for k, sp in enumerate(_batches(rng, 6)):
        gb = rng.standard_normal(D)
        g = sp if k % 2 else sp.to_dense(N)           # sparse and dense steps
        opt.step([g, gb])
        dense = sp.to_dense(N)
        touched = np.zeros(N, bool)
        touched[sp.indices] = True
        if k % 2 == 0:
            touched[:] = True
        acc[touched] += np.mean(dense[touched] ** 2, axis=1)
        rE[touched] -= 0.1 * dense[touched] / (1e-7 + np.sqrt(acc[touched]))[:, None]
        accb += gb * gb
        rb -= 0.1 * gb / (1e-7 + np.sqrt(accb))
    np.testing.assert_allclose(opt.state[0]["sum"], acc, rtol=1e-12)
    np.testing.assert_allclose(E, rE, rtol=1e-12)
    np.testing.assert_allclose(b, rb, rtol=1e-12)
    nbytes = opt.state[0]["sum"].nbytes
    assert nbytes / N == 8 and ch8fast.AdaGrad([np.ones((N, D))]).state[0]["sum"].nbytes \
        / N == 8 * D


def test_clipping_and_skipping_count_the_sparse_rows():
    rng = np.random.default_rng(5)
    sp = _batches(rng, 1)[0]
    dense = sp.to_dense(N)
    E1, E2 = np.zeros((N, D)), np.zeros((N, D))
    w1, w2 = np.zeros(3), np.zeros(3)
    o1 = ch8fast.SGD([E1, w1], lr=0.1, clip_norm=0.5, skip_nonfinite=True)
    o2 = ch8fast.SGD([E2, w2], lr=0.1, clip_norm=0.5, skip_nonfinite=True)
    g = np.full(3, 2.0)
    o1.step([sp, g])
    o2.step([dense, g.copy()])
    assert o1.last_grad_norm == pytest.approx(o2.last_grad_norm, rel=1e-12)
    np.testing.assert_allclose(E1, E2, rtol=1e-12, atol=1e-15)
    bad = SparseRows(np.array([1]), np.full((1, D), np.nan))
    o1.step([bad, g])
    assert o1.skipped_steps == 1


def test_catch_up_state_resumes_exactly_from_a_checkpoint(tmp_path):
    rng = np.random.default_rng(6)
    batches = _batches(rng, 12)
    E = rng.standard_normal((N, D))
    opt = ch8fast.RMSProp([E], lr=0.01, momentum=0.5, sparse="catch_up")
    for sp in batches[:6]:
        opt.step([sp])
    ch8fast.save_checkpoint(tmp_path / "c.npz", opt, params=[E])
    E2 = np.zeros((N, D))
    opt2 = ch8fast.RMSProp([E2], lr=0.01, momentum=0.5, sparse="catch_up")
    ch8fast.load_checkpoint(tmp_path / "c.npz", opt2, params=[E2])
    for sp in batches[6:]:
        opt.step([sp])
        opt2.step([sp])
    assert E.tobytes() == E2.tobytes()
    assert opt.state[0]["last_step"].tobytes() == opt2.state[0]["last_step"].tobytes()


def test_sparse_rows_with_16bit_parameters_and_bfloat16_state():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf = np.dtype(ml_dtypes.bfloat16)
    rng = np.random.default_rng(7)
    E = rng.standard_normal((N, D)).astype(bf)
    ref = E.copy()
    o = ch8fast.Adam([E], lr=0.01, param_mode="stochastic", state_format="bfloat16", seed=1)
    o2 = ch8fast.Adam([ref], lr=0.01, param_mode="stochastic", state_format="bfloat16",
                      seed=1)
    for sp in _batches(rng, 4, dup=False):
        vb = sp.values.astype(bf)
        o.step([SparseRows(sp.indices, vb)])
        o2.step([SparseRows(sp.indices, vb.astype(np.float32))])
    assert E.tobytes() == ref.tobytes()


def _sorted_sum_reference(indices, values, n_rows):
    """Duplicates summed as documented: each element's contributions sorted ascending,
    added in float64 from the smallest, rounded once to the values' dtype (a row that
    appears once is itself)."""
    out = {}
    for r in dict.fromkeys(indices.tolist()):
        rows = values[indices == r]
        out[r] = rows[0] if len(rows) == 1 else np.array(
            [sum(sorted(col.tolist()), 0.0) for col in rows.astype(np.float64).T],
            values.dtype)
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["normal", "wide", "tiny", "specials", "one_row"])
def test_duplicates_sum_is_the_sorted_sum(dtype, kind):
    """The fast one-pass sum of duplicates (exact in double where the contributions'
    exponents allow it) gives the sorted sum's bits, and falls back to sorting elsewhere."""
    rng = np.random.default_rng(zlib.crc32(kind.encode()))
    d, n_rows = 37, 50
    k = 3000 if kind == "one_row" else 600
    idx = (np.zeros(k, np.int64) if kind == "one_row"
           else rng.zipf(1.3, k).astype(np.int64) % n_rows)
    vals = rng.standard_normal((k, d))
    if kind == "wide":
        vals *= 10.0 ** rng.integers(-20, 20, (k, d))
    elif kind == "tiny":
        vals *= 1e-40 if dtype == np.float32 else 1e-310
        vals[::7] = 0.0
        vals[::11] = -0.0
    elif kind == "specials":
        vals[5, 3] = np.inf
        vals[9, 4] = np.nan
        vals[idx == idx[12], 6] = -0.0
    vals = vals.astype(dtype)
    rows, summed = ch8fast.sparse.sum_duplicates(idx, vals, n_rows)
    ref = _sorted_sum_reference(idx, vals, n_rows)
    assert list(rows) == list(ref)
    for r, got in zip(rows, summed):
        np.testing.assert_array_equal(got, ref[r])
        assert got.tobytes() == ref[r].tobytes() or np.isnan(got).any(), r
    perm = rng.permutation(k)
    rows2, summed2 = ch8fast.sparse.sum_duplicates(idx[perm], vals[perm], n_rows)
    order = {r: i for i, r in enumerate(rows2)}
    for r, got in zip(rows, summed):
        assert got.tobytes() == summed2[order[r]].tobytes()
