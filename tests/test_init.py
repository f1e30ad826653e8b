"""Tests of ch8fast.init (parameter initialization, Deep Learning section 8.4).

Statistical tests use fixed seeds and bounds derived from the sample size: for n i.i.d.
draws of a zero-mean variable with moments m2 = E[x^2] and m4 = E[x^4], the sample mean has
standard deviation sqrt(m2 / n) and mean(x^2) has standard deviation sqrt((m4 - m2^2) / n).
Every bound is SIGMAS = 6 of those standard deviations (a false failure has probability
below 1e-8 per check), so a wrong scale factor of a few percent still fails.
"""
import math

import numpy as np
import pytest

from ch8fast import init as ci

SIGMAS = 6.0
DTYPES = [np.float32, np.float64]


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def uniform_moments(a):
    return a * a / 3.0, a ** 4 / 5.0


def normal_moments(s):
    return s * s, 3.0 * s ** 4


def truncated_normal_moments(s_under, cut=2.0):
    """Moments of N(0, s_under^2) truncated to +-cut * s_under.

    For the standard normal truncated to [-a, a] with mass Z and density phi, integration by
    parts gives E[z^n] = (n - 1) E[z^(n-2)] - 2 a^(n-1) phi(a) / Z.
    """
    phi = math.exp(-0.5 * cut * cut) / math.sqrt(2 * math.pi)
    z = math.erf(cut / math.sqrt(2))
    e2 = 1.0 - 2 * cut * phi / z
    e4 = 3.0 * e2 - 2 * cut ** 3 * phi / z
    return e2 * s_under ** 2, e4 * s_under ** 4


def check_moments(values, m2, m4):
    """Mean 0 and E[x^2] = m2 within SIGMAS standard errors."""
    v = np.asarray(values, dtype=np.float64).ravel()
    n = v.size
    mean_bound = SIGMAS * math.sqrt(m2 / n)
    assert abs(v.mean()) < mean_bound, (v.mean(), mean_bound)
    sq_bound = SIGMAS * math.sqrt((m4 - m2 * m2) / n)
    assert abs(np.mean(v * v) - m2) < sq_bound, (np.mean(v * v), m2, sq_bound)


def check_uniform_support(arr, a):
    """All |x| <= a (in arr's dtype) and the extremes reach a: with n draws,
    P(max |x| < a (1 - d)) = (1 - d)^n, negligible for d = 1e-3 and n >= 1e5."""
    v = np.abs(arr.ravel())
    assert v.max() <= np.asarray(a, dtype=arr.dtype)
    assert v.size >= 100_000
    assert v.max() > a * (1 - 1e-3)


def empty(shape, dtype=np.float64, fill=np.nan):
    return np.full(shape, fill, dtype=dtype)


# every random initializer, with arguments valid for a (64, 48) or conv-shaped array
RANDOM_INITS = {
    "fan_in_uniform": lambda a, r: ci.fan_in_uniform(a, r),
    "glorot_uniform": lambda a, r: ci.glorot_uniform(a, r, gain=2.0),
    "glorot_normal": lambda a, r: ci.glorot_normal(a, r),
    "he_uniform": lambda a, r: ci.he_uniform(a, r, negative_slope=0.2),
    "he_normal": lambda a, r: ci.he_normal(a, r, mode="fan_out"),
    "variance_scaling_tn": lambda a, r: ci.variance_scaling(a, r, scale=0.5),
    "variance_scaling_u": lambda a, r: ci.variance_scaling(a, r, distribution="uniform"),
    "orthogonal": lambda a, r: ci.orthogonal(a, r, gain=1.5),
    "random_walk": lambda a, r: ci.random_walk(a, r, nonlinearity="relu"),
    "sparse": lambda a, r: ci.sparse(a, r, k=5),
}
SHAPES = [(64, 48), (48, 64), (16, 8, 3, 3)]


# ------------------------------------------------------------------------------------------
# fans and gains
# ------------------------------------------------------------------------------------------


def test_fans_dense_and_conv():
    assert ci.fans((784, 256)) == (784, 256)
    assert ci.fans((32, 16, 3, 3)) == (16 * 9, 32 * 9)
    assert ci.fans((8, 4, 5)) == (20, 40)
    assert ci.fans((6, 2, 3, 3, 3)) == (54, 162)
    assert ci.fans(np.zeros((3, 4)).shape) == (3, 4)


@pytest.mark.parametrize("shape, exc", [((5,), ValueError), ((), ValueError),
                                        ((3, -1), ValueError), ((2.5, 3), ValueError),
                                        (5, TypeError), (np.zeros((2, 2)), TypeError)])
def test_fans_rejects(shape, exc):
    with pytest.raises(exc, match="shape"):
        ci.fans(shape)


def test_gain_table():
    assert ci.gain("linear") == 1.0
    assert ci.gain("sigmoid") == 1.0
    assert ci.gain("tanh") == pytest.approx(5 / 3, rel=1e-15)
    assert ci.gain("relu") == pytest.approx(math.sqrt(2), rel=1e-15)
    assert ci.gain("leaky_relu") == pytest.approx(math.sqrt(2 / (1 + 0.01 ** 2)), rel=1e-15)
    assert ci.gain("leaky_relu", 0.2) == pytest.approx(math.sqrt(2 / 1.04), rel=1e-15)
    assert ci.gain("leaky_relu", 0.0) == pytest.approx(ci.gain("relu"), rel=1e-15)
    assert ci.gain("selu") == 0.75


def test_gain_rejects():
    with pytest.raises(ValueError, match="nonlinearity"):
        ci.gain("elu")
    with pytest.raises(ValueError, match="param"):
        ci.gain("tanh", 0.1)
    with pytest.raises(ValueError, match="param"):
        ci.gain("leaky_relu", float("nan"))


def test_random_walk_gain_formulas():
    assert ci.random_walk_gain(10) == pytest.approx(math.exp(1 / 20), rel=1e-15)
    assert ci.random_walk_gain(100, "relu") == pytest.approx(
        math.sqrt(2) * math.exp(1.2 / 97.6), rel=1e-15)
    # below N = 6 the ReLU formula uses max(N, 6)
    assert ci.random_walk_gain(3, "relu") == ci.random_walk_gain(6, "relu")
    assert ci.random_walk_gain(7, "relu") < ci.random_walk_gain(6, "relu")
    for bad in (0, -3):
        with pytest.raises(ValueError, match="n must be an integer >= 1"):
            ci.random_walk_gain(bad)
    for bad in (2.0, True):
        with pytest.raises(TypeError, match="n must be an integer"):
            ci.random_walk_gain(bad)
    with pytest.raises(ValueError, match="nonlinearity"):
        ci.random_walk_gain(10, "tanh")


# ------------------------------------------------------------------------------------------
# distributions: variance, mean, support
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["fan_in", "fan_out", "fan_avg"])
@pytest.mark.parametrize("distribution", ["uniform", "normal", "truncated_normal"])
def test_variance_scaling_moments_and_support(dtype, mode, distribution):
    m, n = 300, 500  # 150,000 draws
    arr = empty((m, n), dtype)
    out = ci.variance_scaling(arr, 1234, scale=2.0, mode=mode, distribution=distribution)
    assert out is arr and arr.dtype == dtype
    fan = {"fan_in": m, "fan_out": n, "fan_avg": (m + n) / 2}[mode]
    var = 2.0 / fan
    if distribution == "uniform":
        a = math.sqrt(3 * var)
        check_moments(arr, *uniform_moments(a))
        check_uniform_support(arr, a)
    elif distribution == "normal":
        check_moments(arr, *normal_moments(math.sqrt(var)))
        # untruncated: beyond 3 sigma lie 0.27% of the draws (about 400 here)
        assert np.sum(np.abs(arr) > 3 * math.sqrt(var)) > 200
    else:
        # the standard deviation of a standard normal cut at +-2: sqrt(1 - 2 a phi(a) / mass)
        a = 2.0
        std_cut = math.sqrt(1 - 2 * a * math.exp(-a * a / 2) / math.sqrt(2 * math.pi)
                            / math.erf(a / math.sqrt(2)))
        s_under = math.sqrt(var) / std_cut
        m2, m4 = truncated_normal_moments(s_under)
        assert m2 == pytest.approx(var, rel=1e-12)  # widened so the truncated variance is var
        check_moments(arr, m2, m4)
        # cut at 2 s_under, and reached: expected count in [2 s (1 - 1e-3), 2 s] is about 34
        v = np.abs(arr.astype(np.float64))
        assert v.max() <= 2 * s_under * (1 + 1e-7)
        assert v.max() > 2 * s_under * (1 - 1e-3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fan_in_uniform_dense_and_conv(dtype):
    arr = empty((400, 300), dtype)
    ci.fan_in_uniform(arr, 1)
    check_moments(arr, *uniform_moments(1 / math.sqrt(400)))
    check_uniform_support(arr, 1 / math.sqrt(400))
    conv = empty((64, 32, 3, 3), dtype)  # fan_in 288, 18,432 draws per 64 channels
    ci.fan_in_uniform(conv, 2)
    a = 1 / math.sqrt(32 * 9)
    check_moments(conv, *uniform_moments(a))
    assert np.abs(conv).max() <= np.asarray(a, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("g", [1.0, 5 / 3])
def test_glorot_uniform_is_eq_8_23(dtype, g):
    m, n = 400, 300
    arr = empty((m, n), dtype)
    ci.glorot_uniform(arr, 7, gain=g)
    a = g * math.sqrt(6 / (m + n))
    check_moments(arr, *uniform_moments(a))
    check_uniform_support(arr, a)


@pytest.mark.parametrize("dtype", DTYPES)
def test_glorot_normal_variance(dtype):
    m, n = 400, 300
    arr = empty((m, n), dtype)
    ci.glorot_normal(arr, 8, gain=2.0)
    check_moments(arr, *normal_moments(2.0 * math.sqrt(2 / (m + n))))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("slope", [0.0, 0.3])
def test_he_uniform_and_normal(dtype, slope):
    shape = (128, 64, 3, 3)  # conv: fan_in 576, fan_out 1152, 73,728 draws
    fan_in, fan_out = 64 * 9, 128 * 9
    arr = empty(shape, dtype)
    ci.he_uniform(arr, 9, negative_slope=slope)
    a = math.sqrt(3 * 2 / ((1 + slope ** 2) * fan_in))
    check_moments(arr, *uniform_moments(a))
    assert np.abs(arr).max() <= np.asarray(a, dtype)
    ci.he_normal(arr, 10, negative_slope=slope, mode="fan_out")
    check_moments(arr, *normal_moments(math.sqrt(2 / ((1 + slope ** 2) * fan_out))))


def test_random_walk_variance():
    arr = empty((300, 400))
    ci.random_walk(arr, 11)
    check_moments(arr, *normal_moments(ci.random_walk_gain(300) / math.sqrt(300)))
    ci.random_walk(arr, 12, nonlinearity="relu")
    check_moments(arr, *normal_moments(ci.random_walk_gain(300, "relu") / math.sqrt(300)))


# ------------------------------------------------------------------------------------------
# random walk: the back-propagated log-norm does not drift with depth
# ------------------------------------------------------------------------------------------


def backprop_log_norm_slope(width, depth, trials, nonlinearity, gain_factor, seed):
    """Mean per-layer increment of ln |delta|^2, back-propagated through ``trials``
    independent chains of ``depth`` square layers initialized by ``ci.random_walk`` and
    multiplied by ``gain_factor``; plus its standard error.

    The mean increment is the slope of E[ln |delta_d|^2] against depth d. With Gaussian
    weights the increments of one chain are independent (rotation invariance), so the
    standard error is sd(increments) / sqrt(depth * trials).
    """
    rng = np.random.default_rng(seed)
    increments = np.empty((trials, depth))
    for t in range(trials):
        h = rng.standard_normal(width)
        layers = []
        for _ in range(depth):  # forward, y = x @ W, to get the ReLU masks
            w = ci.random_walk(np.empty((width, width)), rng, nonlinearity=nonlinearity)
            w *= gain_factor
            a = h @ w
            mask = a > 0 if nonlinearity == "relu" else np.ones(width, dtype=bool)
            h = np.where(mask, a, 0.0)
            layers.append((w, mask))
        delta = rng.standard_normal(width)
        log_norm = math.log(delta @ delta)
        for d, (w, mask) in enumerate(reversed(layers)):  # backward: dL/dx = (dL/dy * f') W^T
            delta = (delta * mask) @ w.T
            new = math.log(delta @ delta)
            increments[t, d] = new - log_norm
            log_norm = new
    return increments.mean(), increments.std() / math.sqrt(increments.size)


def test_random_walk_linear_chain_is_flat_and_misscaled_gain_drifts():
    n = 10  # narrow layers: the 1/N correction of the gain matters most
    # exact drift per layer for a linear chain with N(0, g^2/N) weights:
    # E[ln(g^2 chi2_N / N)] = 2 ln g + digamma(N/2) + ln(2/N); digamma(5) = -gamma + H_4
    digamma5 = -0.5772156649015329 + 1 + 1 / 2 + 1 / 3 + 1 / 4
    exact = 2 * math.log(ci.random_walk_gain(n)) + digamma5 + math.log(2 / n)
    assert abs(exact) < 0.004  # the paper's gain leaves an O(1/N^2) drift only

    slope, se = backprop_log_norm_slope(n, 100, 100, "linear", 1.0, seed=0)
    assert abs(slope - exact) < SIGMAS * se
    assert abs(slope) < 0.004 + SIGMAS * se  # flat: over 100 layers |drift| < ~3

    # gain 1 (variance 1/N, no correction): drifts down by about 1/N per layer
    slope1, se1 = backprop_log_norm_slope(n, 100, 100, "linear", 1 / ci.random_walk_gain(n), 1)
    assert abs(slope1 - (digamma5 + math.log(2 / n))) < SIGMAS * se1
    assert slope1 < -0.05
    # 10% too large a gain: drifts up by about 2 ln 1.1 = 0.19 per layer
    slope2, _ = backprop_log_norm_slope(n, 100, 100, "linear", 1.1, seed=2)
    assert slope2 > 0.1


def test_random_walk_relu_chain_is_flat_and_he_gain_drifts():
    n = 20
    slope, se = backprop_log_norm_slope(n, 100, 100, "relu", 1.0, seed=3)
    # the ReLU gain is the paper's empirical fit, not exact: allow 0.01 per layer of bias
    assert abs(slope) < 0.01 + SIGMAS * se
    # plain He gain sqrt(2) (no random-walk correction) drifts down at this width
    he = math.sqrt(2) / ci.random_walk_gain(n, "relu")
    slope_he, se_he = backprop_log_norm_slope(n, 100, 100, "relu", he, seed=4)
    assert slope_he < -0.08
    assert slope_he < slope - 2 * SIGMAS * math.hypot(se, se_he)


# ------------------------------------------------------------------------------------------
# orthogonal
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(50, 20), (20, 50), (30, 30), (16, 8, 3, 3), (64, 2, 2, 2),
                                   (5, 7, 1)])
@pytest.mark.parametrize("g", [1.0, 2.0])
def test_orthogonal(dtype, shape, g):
    arr = empty(shape, dtype)
    assert ci.orthogonal(arr, 3, gain=g) is arr
    # dense (m, n) as is; conv flattened to (out_channels, fan_in)
    a = arr.reshape(shape[0], -1).astype(np.float64)
    rows, cols = a.shape
    atol = g * g * (1e-5 if dtype == np.float32 else 1e-12)
    if rows >= cols:
        np.testing.assert_allclose(a.T @ a, g * g * np.eye(cols), rtol=0, atol=atol)
    else:
        np.testing.assert_allclose(a @ a.T, g * g * np.eye(rows), rtol=0, atol=atol)


def test_orthogonal_conv_filters_are_orthonormal_rows():
    arr = empty((16, 8, 3, 3))
    ci.orthogonal(arr, 4)
    filters = arr.reshape(16, -1)  # each output channel's fan_in = 72 weights
    np.testing.assert_allclose(filters @ filters.T, np.eye(16), rtol=0, atol=1e-12)
    # the other product is a projection of rank 16, not the identity
    assert abs(np.trace(filters.T @ filters) - 16) < 1e-10


def test_orthogonal_is_haar_sign_symmetric():
    # a Haar-distributed orthogonal matrix has W[0, 0] symmetric about 0; a raw QR factor
    # without the diag(R) sign correction does not. Count positives over 400 seeds:
    # Binomial(400, 1/2) has sd 10.
    positive = sum(ci.orthogonal(np.empty((4, 4)), s)[0, 0] > 0 for s in range(400))
    assert abs(positive - 200) < SIGMAS * 10


# ------------------------------------------------------------------------------------------
# sparse
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_exactly_k_per_unit_dense(dtype):
    m, n, k = 60, 2000, 15
    arr = empty((m, n), dtype)
    ci.sparse(arr, 5, k=k, std=0.5)
    per_unit = np.count_nonzero(arr, axis=0)  # a unit is a column of (fan_in, fan_out)
    assert np.all(per_unit == k)
    values = arr[arr != 0]
    assert values.size == n * k
    check_moments(values, *normal_moments(0.5))
    # the k inputs are uniform without replacement: each input row is chosen by
    # Binomial(n, k/m) units (mean 500, sd 19.4)
    per_input = np.count_nonzero(arr, axis=1)
    p = k / m
    assert np.all(np.abs(per_input - n * p) < SIGMAS * math.sqrt(n * p * (1 - p)))


def test_sparse_exactly_k_per_output_channel_conv():
    arr = empty((32, 4, 3, 3))  # fan_in 36
    ci.sparse(arr, 6, k=7)
    assert np.all(np.count_nonzero(arr.reshape(32, -1), axis=1) == 7)
    supports = {tuple(np.flatnonzero(arr[c])) for c in range(32)}
    assert len(supports) > 1  # patterns differ between units


def test_sparse_k_equals_fan_in_is_dense():
    arr = empty((12, 40))
    ci.sparse(arr, 7, k=12)
    assert np.count_nonzero(arr) == arr.size


# ------------------------------------------------------------------------------------------
# determinism, dtype, in place
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(RANDOM_INITS))
@pytest.mark.parametrize("shape", SHAPES)
def test_same_seed_same_bits_and_dtype_consistency(name, shape):
    init = RANDOM_INITS[name]
    a = init(empty(shape), 42)
    b = init(empty(shape), 42)
    assert a.tobytes() == b.tobytes()
    c = init(empty(shape), np.random.default_rng(42))  # a Generator of the same seed
    assert c.tobytes() == a.tobytes()
    d = init(empty(shape), np.random.SeedSequence(42))
    assert d.tobytes() == a.tobytes()
    assert not np.array_equal(init(empty(shape), 43), a)
    gen = np.random.default_rng(0)  # a Generator advances: two calls differ
    assert not np.array_equal(init(empty(shape), gen), init(empty(shape), gen))
    # float32 receives the float64 values rounded once
    f32 = init(empty(shape, np.float32), 42)
    assert f32.dtype == np.float32
    assert f32.tobytes() == a.astype(np.float32).tobytes()


@pytest.mark.parametrize("name", sorted(RANDOM_INITS))
def test_fills_views_and_fortran_arrays_in_place(name):
    init = RANDOM_INITS[name]
    ref = init(empty((64, 48)), 5)
    base = np.zeros((128, 48))
    view = base[::2]  # not contiguous
    assert init(view, 5) is view
    np.testing.assert_array_equal(base[::2], ref)
    assert np.all(base[1::2] == 0)
    fortran = np.asfortranarray(empty((64, 48)))
    assert init(fortran, 5) is fortran
    np.testing.assert_array_equal(fortran, ref)


@pytest.mark.parametrize("name", sorted(RANDOM_INITS))
def test_empty_arrays_are_left_alone(name):
    arr = np.empty((0, 5))
    assert RANDOM_INITS[name](arr, 0) is arr


# ------------------------------------------------------------------------------------------
# bad inputs: clear errors naming the argument, arrays unchanged
# ------------------------------------------------------------------------------------------


def readonly(shape=(64, 48)):
    a = np.full(shape, 7.0)
    a.flags.writeable = False
    return a


@pytest.mark.parametrize("name", sorted(RANDOM_INITS))
@pytest.mark.parametrize("bad, exc, match", [
    (lambda: [[0.0] * 4] * 4, TypeError, "arr must be a numpy.ndarray"),
    (lambda: np.zeros((8, 8), dtype=np.int64), TypeError, "arr must have dtype float32 or"),
    (lambda: np.zeros((8, 8), dtype=np.complex128), TypeError, "arr must have dtype float32"),
    (lambda: np.zeros((8, 8), dtype=np.float16), TypeError, "arr must have dtype float32"),
    (readonly, ValueError, "arr must be writeable"),
    (lambda: np.full(8, 7.0), ValueError, "shape"),
])
def test_bad_arrays_rejected(name, bad, exc, match):
    arr = bad()
    before = np.array(arr, copy=True)
    with pytest.raises(exc, match=match):
        RANDOM_INITS[name](arr, 0)
    np.testing.assert_array_equal(np.asarray(arr), before)


@pytest.mark.parametrize("name", sorted(RANDOM_INITS))
@pytest.mark.parametrize("rng, exc", [(1.5, TypeError), (True, TypeError),
                                      (np.random.RandomState(0), TypeError),
                                      ("seed", TypeError), (-1, ValueError)])
def test_bad_rng_rejected(name, rng, exc):
    arr = np.full((8, 8), 7.0)
    with pytest.raises(exc, match="rng"):
        RANDOM_INITS[name](arr, rng)
    assert np.all(arr == 7.0)


@pytest.mark.parametrize("call, exc, match", [
    (lambda a: ci.variance_scaling(a, 0, scale=0.0), ValueError, "scale"),
    (lambda a: ci.variance_scaling(a, 0, scale=float("inf")), ValueError, "scale"),
    (lambda a: ci.variance_scaling(a, 0, mode="fan"), ValueError, "mode"),
    (lambda a: ci.variance_scaling(a, 0, distribution="gauss"), ValueError, "distribution"),
    (lambda a: ci.glorot_uniform(a, 0, gain=-1.0), ValueError, "gain"),
    (lambda a: ci.glorot_normal(a, 0, gain=float("nan")), ValueError, "gain"),
    (lambda a: ci.he_uniform(a, 0, mode="fan_avg"), ValueError, "mode"),
    (lambda a: ci.he_normal(a, 0, negative_slope=float("inf")), ValueError, "negative_slope"),
    (lambda a: ci.orthogonal(a, 0, gain=0.0), ValueError, "gain"),
    (lambda a: ci.orthogonal(a, 0, gain="1"), TypeError, "gain"),
    (lambda a: ci.random_walk(a, 0, nonlinearity="tanh"), ValueError, "nonlinearity"),
    (lambda a: ci.sparse(a, 0, k=0), ValueError, "k"),
    (lambda a: ci.sparse(a, 0, k=9), ValueError, r"k must be an integer in \[1, fan_in\] = \[1, 8\], got 9"),
    (lambda a: ci.sparse(a, 0, k=2.0), TypeError, "k"),
    (lambda a: ci.sparse(a, 0, k=2, std=-1.0), ValueError, "std"),
])
def test_bad_hyperparameters_rejected(call, exc, match):
    arr = np.full((8, 8), 7.0)  # fan_in 8
    with pytest.raises(exc, match=match):
        call(arr)
    assert np.all(arr == 7.0)


# ------------------------------------------------------------------------------------------
# biases and precisions
# ------------------------------------------------------------------------------------------


def softmax(b):
    e = np.exp(b - b.max())
    return e / e.sum()


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-13), (np.float32, 2e-6)])
def test_softmax_bias_reproduces_class_frequencies(dtype, rtol):
    c = np.random.default_rng(0).dirichlet(np.ones(10))
    b = empty(10, dtype)
    assert ci.softmax_bias(b, c) is b
    np.testing.assert_allclose(softmax(b.astype(np.float64)), c, rtol=rtol)
    assert abs(b.astype(np.float64).mean()) < 10 * np.finfo(dtype).eps * np.abs(b).max()


def test_softmax_bias_accepts_float32_frequencies_and_lists():
    c32 = (np.arange(1, 101) / 5050).astype(np.float32)
    b = ci.softmax_bias(empty(100), c32)
    np.testing.assert_allclose(softmax(b), c32 / c32.astype(np.float64).sum(), rtol=1e-12)
    b = ci.softmax_bias(empty(3), [0.5, 0.25, 0.25])
    np.testing.assert_allclose(b, np.log([0.5, 0.25, 0.25]) - np.log([0.5, 0.25, 0.25]).mean())


@pytest.mark.parametrize("b, c, match", [
    (np.full(3, 7.0), [0.5, 0.3, 0.3], "sum to 1"),
    (np.full(3, 7.0), [0.5, 0.5, 0.0], "positive"),
    (np.full(3, 7.0), [1.5, -0.25, -0.25], "positive"),
    (np.full(3, 7.0), [0.5, 0.5], "shape"),
    (np.full(3, 7.0), [0.5, np.nan, 0.5], "finite"),
    (np.full((2, 2), 7.0), np.full((2, 2), 0.25), "1-D"),
])
def test_softmax_bias_rejects(b, c, match):
    with pytest.raises(ValueError, match=match):
        ci.softmax_bias(b, c)
    assert np.all(b == 7.0)


def test_sigmoid_bias():
    p = np.array([0.01, 0.2, 0.5, 0.9])
    b = ci.sigmoid_bias(empty(4), p)
    np.testing.assert_allclose(1 / (1 + np.exp(-b)), p, rtol=1e-14)
    b = ci.sigmoid_bias(empty((2, 3), np.float32), 0.25)  # broadcast
    np.testing.assert_allclose(b, np.log(1 / 3), rtol=1e-6)
    for bad, match in [(0.0, r"\(0, 1\)"), (1.0, r"\(0, 1\)"), ([0.5, 0.5, 0.5], "broadcast")]:
        target = np.full((2, 2), 7.0)
        with pytest.raises(ValueError, match=match):
            ci.sigmoid_bias(target, bad)
        assert np.all(target == 7.0)


def test_linear_bias_is_target_mean():
    y = np.random.default_rng(1).normal(3.0, 2.0, size=(50, 4))
    b = ci.linear_bias(empty(4), y)
    np.testing.assert_allclose(b, y.mean(axis=0), rtol=1e-14)
    target = np.full(3, 7.0)
    with pytest.raises(ValueError, match="y must have shape"):
        ci.linear_bias(target, y)
    assert np.all(target == 7.0)


def test_relu_bias_and_precision():
    assert np.all(ci.relu_bias(empty(5)) == 0.1)
    assert np.all(ci.relu_bias(empty(5, np.float32), 0.01) == np.float32(0.01))
    p = ci.precision_init(empty((3, 2), np.float32))
    assert p.dtype == np.float32 and np.all(p == 1.0)
    target = np.full(3, 7.0)
    with pytest.raises(ValueError, match="value"):
        ci.precision_init(target, 0.0)
    with pytest.raises(ValueError, match="value"):
        ci.relu_bias(target, float("nan"))
    assert np.all(target == 7.0)


@pytest.mark.parametrize("order, forget, index", [("ifgo", "f", 1), ("ifco", "f", 1),
                                                  ("igof", "f", 3), ("fiog", "f", 0)])
def test_lstm_forget_bias_slices(order, forget, index):
    h = 5
    b = np.full(4 * h, 7.0)
    ci.lstm_forget_bias(b, gate_order=order, forget_gate=forget)
    expected = np.full(4 * h, 7.0)
    expected[index * h:(index + 1) * h] = 1.0
    np.testing.assert_array_equal(b, expected)
    ci.lstm_forget_bias(b, gate_order=order, value=2.0)
    assert np.all(b[index * h:(index + 1) * h] == 2.0)


@pytest.mark.parametrize("b, kwargs, match", [
    (np.full(10, 7.0), {}, "divisible"),
    (np.full((4, 5), 7.0), {}, "1-D"),
    (np.full(8, 7.0), {"forget_gate": "x"}, "forget_gate"),
    (np.full(8, 7.0), {"gate_order": "iffo"}, "gate_order"),
    (np.full(8, 7.0), {"value": float("inf")}, "value"),
])
def test_lstm_forget_bias_rejects(b, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ci.lstm_forget_bias(b, **kwargs)
    assert np.all(b == 7.0)


# ------------------------------------------------------------------------------------------
# initialization from another model
# ------------------------------------------------------------------------------------------


def model():
    return {"W0": np.zeros((4, 3)), "b0": np.zeros(3), "W1": np.zeros((3, 2), np.float32),
            "b1": np.zeros(2, np.float32), "head": np.zeros((2, 5))}


def saved():
    rng = np.random.default_rng(0)
    return {"W0": rng.normal(size=(4, 3)), "b0": rng.normal(size=3),
            "W1": rng.normal(size=(3, 2)),                  # float64 for a float32 target
            "b1": rng.normal(size=4).astype(np.float32),    # wrong shape
            "decoder": rng.normal(size=(3, 4))}             # not in the model


def test_load_matching_reports_both_directions():
    target, source = model(), saved()
    arrays = dict(target)
    report = ci.load_matching(target, source)
    assert report.loaded == ("W0", "b0")
    assert set(report.skipped) == {"W1", "b1"}
    assert "dtype float64" in report.skipped["W1"] and "allow_cast" in report.skipped["W1"]
    assert "shape (4,)" in report.skipped["b1"]
    assert report.missing == ("head",)
    assert report.unused == ("decoder",)
    assert not report.complete
    for k in target:
        assert target[k] is arrays[k]  # never replaced
    np.testing.assert_array_equal(target["W0"], source["W0"])
    np.testing.assert_array_equal(target["b0"], source["b0"])
    assert np.all(target["W1"] == 0) and np.all(target["b1"] == 0)
    text = str(report)
    for word in ("W0", "W1", "b1", "head", "decoder"):
        assert word in text


def test_load_matching_cast_only_when_allowed():
    target, source = model(), saved()
    report = ci.load_matching(target, source, allow_cast=True)
    assert report.cast == ("W1",) and "W1" in report.loaded
    assert target["W1"].dtype == np.float32
    np.testing.assert_array_equal(target["W1"], source["W1"].astype(np.float32))
    # complex -> float is not a same-kind cast, even when casting is allowed
    t = {"W": np.zeros(3)}
    r = ci.load_matching(t, {"W": np.ones(3, np.complex128)}, allow_cast=True)
    assert "cannot be cast" in r.skipped["W"] and np.all(t["W"] == 0)


def test_load_matching_from_npz(tmp_path):
    path = tmp_path / "pretrained.npz"
    np.savez(path, **saved())
    target = model()
    report = ci.load_matching(target, path)
    assert report.loaded == ("W0", "b0") and report.unused == ("decoder",)
    np.testing.assert_array_equal(target["W0"], saved()["W0"])
    report = ci.load_matching(model(), str(path))  # str path too
    assert report.loaded == ("W0", "b0")


def test_load_matching_npz_object_arrays_not_unpickled(tmp_path):
    path = tmp_path / "obj.npz"
    np.savez(path, W0=np.array([{"a": 1}] * 12, dtype=object).reshape(4, 3),
             b0=np.ones(3))
    target = model()
    report = ci.load_matching(target, path)
    assert "W0" in report.skipped and report.loaded == ("b0",)
    assert np.all(target["W0"] == 0)


def test_load_matching_strict_raises_and_changes_nothing():
    target, source = model(), saved()
    with pytest.raises(ValueError, match="strict"):
        ci.load_matching(target, source, strict=True)
    for v in target.values():
        assert np.all(v == 0)
    # a complete match succeeds under strict
    t = {"W0": np.zeros((4, 3))}
    r = ci.load_matching(t, {"W0": source["W0"]}, strict=True)
    assert r.complete and np.array_equal(t["W0"], source["W0"])


def test_load_matching_rejects_bad_arguments(tmp_path):
    target = model()
    ro = np.zeros(3)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match=r"target\['b0'\] must be writeable"):
        ci.load_matching({"W0": target["W0"], "b0": ro}, saved())
    assert np.all(target["W0"] == 0)
    with pytest.raises(TypeError, match="target"):
        ci.load_matching({"W0": [[0.0]]}, saved())
    with pytest.raises(TypeError, match="source"):
        ci.load_matching(target, [("W0", np.ones((4, 3)))])
    np.save(tmp_path / "one.npy", np.ones(3))
    with pytest.raises(ValueError, match="single array"):
        ci.load_matching(target, tmp_path / "one.npy")
    for v in target.values():
        assert np.all(v == 0)


# ------------------------------------------------------------------------------------------
# data-driven calibration on one minibatch
# ------------------------------------------------------------------------------------------


def mlp_forward(weights, biases, act):
    """Plain NumPy MLP, y = x @ W + b: returns each layer's pre-activations."""
    def forward(x):
        outs, h = [], x
        for w, b in zip(weights, biases):
            a = h @ w + b
            outs.append(a)
            h = act(a)
        return outs
    return forward


def relu(a):
    return np.maximum(a, 0.0)


def make_mlp(depth, width, rng, limit, bias_std=0.0, dtype=np.float64):
    """Plain uniform init U(-limit, limit); limit None means 1/sqrt(width) (fan-in)."""
    ws = []
    for _ in range(depth):
        w = np.empty((width, width), dtype)
        if limit is None:
            ci.fan_in_uniform(w, rng)
        else:
            w[...] = rng.uniform(-limit, limit, size=w.shape)
        ws.append(w)
    bs = [(bias_std * rng.standard_normal(width)).astype(dtype) for _ in range(depth)]
    return ws, bs


def stds(outs):
    return np.array([np.std(o, dtype=np.float64) for o in outs])


def test_calibrate_deep_tanh_mlp_from_vanishing_init():
    rng = np.random.default_rng(0)
    ws, bs = make_mlp(12, 64, rng, limit=None)  # U(-1/sqrt(m), 1/sqrt(m)): variance 1/(3m)
    x = rng.standard_normal((512, 64))
    forward = mlp_forward(ws, bs, np.tanh)
    before = stds(forward(x))
    assert before[-1] < 0.01 * before[0]  # the signal vanishes with depth (about x0.58 a layer)
    report = ci.calibrate(ws, forward, x, tol=0.02)
    after = stds(forward(x))
    assert report.converged
    assert np.all(np.abs(after - 1.0) <= 0.02)
    np.testing.assert_allclose(report.std_after, after, rtol=1e-12)
    np.testing.assert_allclose(report.std_before, before, rtol=1e-12)
    assert np.all(report.scales > 1.5)


def test_calibrate_deep_relu_mlp_from_exploding_init():
    rng = np.random.default_rng(1)
    ws, bs = make_mlp(14, 64, rng, limit=1.0)  # U(-1, 1): variance x10.7 a layer with ReLU
    x = rng.standard_normal((512, 64))
    forward = mlp_forward(ws, bs, relu)
    before = stds(forward(x))
    assert before[-1] > 1e4 * before[0]  # the signal explodes with depth
    report = ci.calibrate(ws, forward, x, target_std=0.5, tol=0.01)
    after = stds(forward(x))
    assert report.converged
    assert np.all(np.abs(after / 0.5 - 1.0) <= 0.01)
    np.testing.assert_allclose(report.std_after, after, rtol=1e-12)
    assert np.all(report.scales < 0.5)


def test_calibrate_iterates_passes_with_biases_and_preserves_float32():
    rng = np.random.default_rng(2)
    ws, bs = make_mlp(10, 32, rng, limit=None, bias_std=0.5, dtype=np.float32)
    x = rng.standard_normal((256, 32)).astype(np.float32)
    forward = mlp_forward(ws, bs, np.tanh)
    ids = [id(w) for w in ws]
    report = ci.calibrate(ws, forward, x, tol=0.01, max_passes=20)
    assert report.converged and report.passes > 1  # biases make one pass insufficient
    assert all(w.dtype == np.float32 for w in ws) and [id(w) for w in ws] == ids
    assert np.all(np.abs(stds(forward(x)) - 1.0) <= 0.01)
    # a budget of one pass is reported as not converged, not hidden
    ws2, bs2 = make_mlp(10, 32, np.random.default_rng(2), limit=None, bias_std=0.5,
                        dtype=np.float32)
    r1 = ci.calibrate(ws2, mlp_forward(ws2, bs2, np.tanh), x, tol=0.01, max_passes=1)
    assert r1.passes == 1 and not r1.converged
    assert "NOT converged" in str(r1)


def test_calibrate_report_table():
    rng = np.random.default_rng(3)
    ws, bs = make_mlp(3, 16, rng, limit=None)
    x = rng.standard_normal((64, 16))
    report = ci.calibrate(ws, mlp_forward(ws, bs, np.tanh), x)
    lines = str(report).splitlines()
    assert lines[0].startswith("calibrate: target std 1") and "converged" in lines[0]
    assert lines[1].split() == ["layer", "scale", "std", "before", "std", "after"]
    assert len(lines) == 2 + 3
    assert [int(line.split()[0]) for line in lines[2:]] == [0, 1, 2]
    assert float(lines[2].split()[1]) == pytest.approx(report.layers[0].scale, rel=1e-5)


def test_calibrate_already_calibrated_changes_nothing():
    rng = np.random.default_rng(4)
    ws, bs = make_mlp(4, 16, rng, limit=None)
    x = rng.standard_normal((64, 16))
    forward = mlp_forward(ws, bs, np.tanh)
    ci.calibrate(ws, forward, x, tol=0.01)
    copies = [w.copy() for w in ws]
    report = ci.calibrate(ws, forward, x, tol=0.05)
    assert report.passes == 0 and report.converged and np.all(report.scales == 1.0)
    for w, c in zip(ws, copies):
        assert w.tobytes() == c.tobytes()


class FailingForward:
    """Wraps a forward and corrupts its output on one call, after calibration has begun."""

    def __init__(self, forward, on_call, corrupt):
        self.forward, self.on_call, self.corrupt, self.calls = forward, on_call, corrupt, 0

    def __call__(self, x):
        self.calls += 1
        outs = self.forward(x)
        if self.calls == self.on_call:
            return self.corrupt(outs)
        return outs


def _nan_layer(outs):
    outs[5] = outs[5] * np.nan
    return outs


def _constant_layer(outs):
    outs[6] = np.zeros_like(outs[6])
    return outs


def _inf_layer(outs):
    outs[2] = outs[2].copy()
    outs[2][0, 0] = np.inf
    return outs


def _raise(outs):
    raise RuntimeError("forward failed")


@pytest.mark.parametrize("corrupt, exc, match", [
    (_nan_layer, ValueError, "layer 5 has non-finite"),
    (_inf_layer, ValueError, "layer 2 has non-finite"),
    (_constant_layer, ValueError, "layer 6 is constant"),
    (lambda outs: outs[:-1], ValueError, "returned 7 outputs for 8"),
    (lambda outs: outs + [outs[0]], ValueError, "returned 9 outputs for 8"),
    (lambda outs: np.stack(outs)[0], ValueError, "must return a list of 8"),
    (lambda outs: None, ValueError, "must return a list"),
    (_raise, RuntimeError, "forward failed"),
])
@pytest.mark.parametrize("on_call", [1, 4])
def test_calibrate_bad_forward_restores_weights(corrupt, exc, match, on_call):
    rng = np.random.default_rng(5)
    ws, bs = make_mlp(8, 16, rng, limit=None)
    x = rng.standard_normal((512, 16))
    copies = [w.copy() for w in ws]
    forward = FailingForward(mlp_forward(ws, bs, np.tanh), on_call, corrupt)
    with pytest.raises(exc, match=match):
        ci.calibrate(ws, forward, x)
    assert forward.calls == on_call  # it failed where intended (after 3 rescales for 4)
    for w, c in zip(ws, copies):
        assert w.tobytes() == c.tobytes()


def test_calibrate_forward_that_ignores_weights_is_an_error():
    rng = np.random.default_rng(6)
    ws, bs = make_mlp(4, 16, rng, limit=None)
    frozen = [w.copy() for w in ws]
    x = rng.standard_normal((64, 16))
    with pytest.raises(ValueError, match="did not change"):
        ci.calibrate(ws, mlp_forward(frozen, bs, np.tanh), x)
    for w, c in zip(ws, frozen):
        assert w.tobytes() == c.tobytes()


def test_calibrate_rejects_bad_arguments():
    rng = np.random.default_rng(7)
    ws, bs = make_mlp(3, 8, rng, limit=None)
    x = rng.standard_normal((32, 8))
    forward = mlp_forward(ws, bs, np.tanh)
    copies = [w.copy() for w in ws]
    ro = ws[1].copy()
    ro.flags.writeable = False
    cases = [
        (lambda: ci.calibrate([ws[0], ro, ws[2]], forward, x), ValueError,
         r"weights\[1\] must be writeable"),
        (lambda: ci.calibrate([ws[0], ws[1].astype(int), ws[2]], forward, x), TypeError,
         r"weights\[1\]"),
        (lambda: ci.calibrate([ws[0], ws[0], ws[2]], forward, x), ValueError, "more than once"),
        (lambda: ci.calibrate([], forward, x), TypeError, "weights"),
        (lambda: ci.calibrate(ws[0], forward, x), TypeError, "weights"),
        (lambda: ci.calibrate(ws, "forward", x), TypeError, "forward"),
        (lambda: ci.calibrate(ws, forward, x, target_std=0.0), ValueError, "target_std"),
        (lambda: ci.calibrate(ws, forward, x, tol=-0.1), ValueError, "tol"),
        (lambda: ci.calibrate(ws, forward, x, max_passes=0), ValueError, "max_passes"),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()
    for w, c in zip(ws, copies):
        assert w.tobytes() == c.tobytes()
