"""Initializers: weights, biases and precisions filled in place (Deep Learning, 8.4).

Every initializer fills a NumPy array **in place** and returns that same array; see
:mod:`ch8fast.init` for the conventions (random sources, dtypes, shapes).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple, Union

import numpy as np

from .._validation import OneOf, at_least_one, fillable_array, finite, generator, positive

__all__ = [
    # shapes and gains
    "fans",
    "gain",
    "random_walk_gain",
    # random weights
    "fan_in_uniform",
    "glorot_uniform",
    "glorot_normal",
    "he_uniform",
    "he_normal",
    "variance_scaling",
    "orthogonal",
    "random_walk",
    "sparse",
    # biases and precisions
    "softmax_bias",
    "sigmoid_bias",
    "linear_bias",
    "relu_bias",
    "lstm_forget_bias",
    "precision_init",
]

RngLike = Union[None, int, np.integer, np.random.SeedSequence, np.random.BitGenerator,
                np.random.Generator]

# ---------------------------------------------------------------------------------------
# Argument checks (ch8fast._validation): run once, before any write.
# ---------------------------------------------------------------------------------------

_nonlinearity = OneOf("linear", "sigmoid", "tanh", "relu", "leaky_relu", "selu")
_walk_nonlinearity = OneOf("linear", "relu")
_mode = OneOf("fan_in", "fan_out", "fan_avg")
_he_mode = OneOf("fan_in", "fan_out")
_distribution = OneOf("uniform", "normal", "truncated_normal")


# ---------------------------------------------------------------------------------------
# Fans and gains
# ---------------------------------------------------------------------------------------


def fans(shape) -> Tuple[int, int]:
    """Return ``(fan_in, fan_out)`` of a weight of the given shape.

    * 2-D, dense ``(m, n)`` used as ``y = x @ W``: ``fan_in = m``, ``fan_out = n``.
    * 3-D or more, convolution kernel ``(out_channels, in_channels, *kernel_size)``:
      ``fan_in = in_channels * prod(kernel_size)``,
      ``fan_out = out_channels * prod(kernel_size)``.

    The dense convention is NumPy's (rows are inputs); it is the transpose of the
    ``(out_features, in_features)`` layout of ``torch.nn.Linear``. The convolution layout is
    torch's. Shapes with fewer than two dimensions have no fans and raise ``ValueError``.
    """
    if isinstance(shape, np.ndarray):
        raise TypeError("shape must be a tuple of ints; pass arr.shape, not the array")
    try:
        dims = tuple(shape)
    except TypeError:
        raise TypeError(f"shape must be a tuple of ints, got "
                        f"{type(shape).__name__}") from None
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 0:
            raise ValueError(f"shape must hold non-negative ints, got {dims}")
    if len(dims) < 2:
        raise ValueError(
            f"shape {dims} has no fan-in/fan-out: a weight needs at least 2 dimensions, "
            "(fan_in, fan_out) for dense or (out_channels, in_channels, *kernel) for conv")
    if len(dims) == 2:
        return int(dims[0]), int(dims[1])
    receptive = int(np.prod(dims[2:], dtype=np.int64))
    return int(dims[1]) * receptive, int(dims[0]) * receptive


def gain(nonlinearity: str, param: Optional[float] = None) -> float:
    """Recommended scale factor for weights feeding a nonlinearity.

    ============  ============================  =========================================
    nonlinearity  gain                          why
    ============  ============================  =========================================
    linear        1                             variance preserved as is
    sigmoid       1                             conventional value; sigmoid'(0) = 1/4
                                                would give 4, which some code uses
    tanh          5/3                           offsets tanh's contraction of variance
    relu          sqrt(2)                       relu zeroes half of a symmetric input
    leaky_relu    sqrt(2 / (1 + a^2))           ``param`` = negative slope a (0.01)
    selu          3/4                           conventional value; self-normalizing
                                                nets instead use gain 1 with fan-in
    ============  ============================  =========================================

    The values agree with ``torch.nn.init.calculate_gain``. Multiply a standard deviation
    or a uniform limit by the gain (variance by its square). ``param`` is accepted only
    by ``leaky_relu``.
    """
    _nonlinearity(nonlinearity, "nonlinearity")
    if param is not None and nonlinearity != "leaky_relu":
        raise ValueError(f"param must be None for {nonlinearity!r} (only leaky_relu "
                         f"takes a slope), got {param!r}")
    if nonlinearity in ("linear", "sigmoid"):
        return 1.0
    if nonlinearity == "tanh":
        return 5.0 / 3.0
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "selu":
        return 0.75
    slope = 0.01 if param is None else finite(param, "param")
    return math.sqrt(2.0 / (1.0 + slope * slope))


def random_walk_gain(n, nonlinearity: str = "linear") -> float:
    r"""Gain of random-walk initialization (Sussillo & Abbott, 2014) for width ``n``.

    With ``W`` of i.i.d. entries ``N(0, g^2 / N)``, the log of the squared norm of the
    back-propagated vector performs a random walk across layers: each layer adds
    ``ln z`` with ``z = (g^2 / N) * chi^2``. Choosing ``g`` so that ``E[ln z] = 0`` keeps
    the walk free of drift, so its norm neither vanishes nor explodes with depth
    (the spread still grows like ``sqrt(depth)``).

    .. math::

        g_{\text{linear}} = \exp\left(\frac{1}{2N}\right), \qquad
        g_{\text{ReLU}} = \sqrt{2}\,\exp\left(\frac{1.2}{\max(N, 6) - 2.4}\right)

    The linear gain follows from ``E[ln(chi^2_N / N)] = -1/N + O(1/N^2)``; the ReLU gain is
    the paper's fit, where half the units pass no gradient. ``N`` is the layer's fan-in.

    References: D. Sussillo and L. F. Abbott, "Random Walk Initialization for Training
    Very Deep Feedforward Networks", arXiv:1412.6558 (2014); Deep Learning, section 8.4.
    """
    n = at_least_one(n, "n")
    _walk_nonlinearity(nonlinearity, "nonlinearity")
    if nonlinearity == "linear":
        return math.exp(1.0 / (2.0 * n))
    return math.sqrt(2.0) * math.exp(1.2 / (max(n, 6) - 2.4))


# ---------------------------------------------------------------------------------------
# Random weights
# ---------------------------------------------------------------------------------------

_TRUNCATE = 2.0  # truncated normal: cut at +-2 standard deviations of the underlying normal


def _truncated_std_factor(a: float = _TRUNCATE) -> float:
    """Standard deviation of a standard normal truncated to [-a, a]."""
    pdf = math.exp(-0.5 * a * a) / math.sqrt(2.0 * math.pi)
    mass = math.erf(a / math.sqrt(2.0))
    return math.sqrt(1.0 - 2.0 * a * pdf / mass)


def _draw(rng: np.random.Generator, shape, distribution: str, std: float) -> np.ndarray:
    """float64 samples with mean 0 and standard deviation ``std``."""
    if distribution == "uniform":
        limit = math.sqrt(3.0) * std
        return rng.uniform(-limit, limit, size=shape)
    if distribution == "normal":
        return rng.normal(0.0, std, size=shape)
    z = rng.standard_normal(size=shape)
    out = z.reshape(-1)
    bad = np.flatnonzero(np.abs(out) > _TRUNCATE)
    while bad.size:  # rejection: redraw outside +-2 until none is left
        out[bad] = rng.standard_normal(size=bad.size)
        bad = bad[np.abs(out[bad]) > _TRUNCATE]
    return z * (std / _truncated_std_factor())


def _fill(arr: np.ndarray, values: np.ndarray) -> np.ndarray:
    arr[...] = values
    return arr


def variance_scaling(arr, rng: RngLike = None, *, scale: float = 1.0, mode: str = "fan_in",
                     distribution: str = "truncated_normal") -> np.ndarray:
    r"""Fill ``arr`` with zero-mean values of variance ``scale / n``.

    .. math::

        \operatorname{Var}[W_{ij}] = \frac{\text{scale}}{n},\qquad
        n = \begin{cases} \text{fan\_in} \\ \text{fan\_out} \\
        (\text{fan\_in} + \text{fan\_out}) / 2 \end{cases}

    for ``mode`` ``"fan_in"``, ``"fan_out"``, ``"fan_avg"``. ``distribution``:

    * ``"uniform"``: ``U(-sqrt(3 scale / n), sqrt(3 scale / n))``;
    * ``"normal"``: ``N(0, scale / n)``;
    * ``"truncated_normal"``: a normal cut at two of its standard deviations and widened
      so that the *truncated* variable has variance ``scale / n`` exactly.

    Every initializer of this module is a special case: fan-in uniform is
    ``scale=1/3, mode="fan_in", distribution="uniform"``; Glorot's normalized
    initialization (eq. 8.23) is ``scale=1, mode="fan_avg", distribution="uniform"``;
    He is ``scale=2, mode="fan_in"``. Fans follow :func:`fans`. Deep Learning, section 8.4.
    """
    arr = fillable_array(arr, "arr")
    scale = positive(scale, "scale")
    _mode(mode, "mode")
    _distribution(distribution, "distribution")
    gen = generator(rng, "rng")
    fan_in, fan_out = fans(arr.shape)
    if arr.size == 0:
        return arr
    n = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": 0.5 * (fan_in + fan_out)}[mode]
    return _fill(arr, _draw(gen, arr.shape, distribution, math.sqrt(scale / n)))


def fan_in_uniform(arr, rng: RngLike = None) -> np.ndarray:
    """Fill ``arr`` from ``U(-1/sqrt(m), 1/sqrt(m))``, ``m`` = fan-in (Deep Learning, 8.4).

    The heuristic of section 8.4 for a fully connected layer with ``m`` inputs; the
    variance is ``1 / (3 m)``. For a convolution kernel ``m = in_channels * prod(kernel)``.
    """
    arr = fillable_array(arr, "arr")
    gen = generator(rng, "rng")
    fan_in, _ = fans(arr.shape)
    if arr.size == 0:
        return arr
    limit = 1.0 / math.sqrt(fan_in)
    return _fill(arr, gen.uniform(-limit, limit, size=arr.shape))


def glorot_uniform(arr, rng: RngLike = None, *, gain: float = 1.0) -> np.ndarray:
    r"""Normalized initialization of Glorot & Bengio (2010), Deep Learning eq. 8.23.

    .. math::

        W_{ij} \sim U\left(-g\sqrt{\frac{6}{m + n}},\; g\sqrt{\frac{6}{m +
        n}}\right)

    with ``m, n`` = fan-in, fan-out and ``g = gain`` (1 in the book). The variance
    ``2 g^2 / (m + n)`` is a compromise between keeping the activation variance
    (``1/m``) and the gradient variance (``1/n``) equal across layers.
    Also known as Xavier uniform.
    """
    g = positive(gain, "gain")
    return variance_scaling(arr, rng, scale=g * g, mode="fan_avg", distribution="uniform")


def glorot_normal(arr, rng: RngLike = None, *, gain: float = 1.0) -> np.ndarray:
    """Normal variant of eq. 8.23: ``W_ij ~ N(0, 2 g^2 / (m + n))``.

    The variance equals that of :func:`glorot_uniform`. The normal is not truncated (as in
    torch); Keras' ``glorot_normal`` truncates. For a truncated variant use
    ``variance_scaling(arr, rng, scale=g**2, mode="fan_avg")``.
    """
    g = positive(gain, "gain")
    return variance_scaling(arr, rng, scale=g * g, mode="fan_avg", distribution="normal")


def _he_scale(negative_slope) -> float:
    a = finite(negative_slope, "negative_slope")
    return 2.0 / (1.0 + a * a)


def he_uniform(arr, rng: RngLike = None, *, negative_slope: float = 0.0,
               mode: str = "fan_in") -> np.ndarray:
    r"""He et al. (2015) initialization for ReLU-family units, uniform.

    .. math::

        W_{ij} \sim U\left(-\sqrt{\frac{3 \cdot 2}{(1 + a^2)\, n}},\;
        \sqrt{\frac{3 \cdot 2}{(1 + a^2)\, n}}\right)

    with ``a = negative_slope`` (0 for ReLU; the slope of leaky ReLU or PReLU otherwise)
    and ``n`` the fan-in (``mode="fan_in"``, keeps the forward variance) or the fan-out
    (``mode="fan_out"``, keeps the backward variance). Also known as Kaiming uniform.
    """
    _he_mode(mode, "mode")
    return variance_scaling(arr, rng, scale=_he_scale(negative_slope), mode=mode,
                            distribution="uniform")


def he_normal(arr, rng: RngLike = None, *, negative_slope: float = 0.0,
              mode: str = "fan_in") -> np.ndarray:
    """He et al. (2015) initialization, normal: ``W_ij ~ N(0, 2 / ((1 + a^2) n))``.

    Not truncated (as in torch; Keras' ``he_normal`` truncates). See :func:`he_uniform`.
    """
    _he_mode(mode, "mode")
    return variance_scaling(arr, rng, scale=_he_scale(negative_slope), mode=mode,
                            distribution="normal")


def _unit_matrix(arr: np.ndarray) -> Tuple[int, int]:
    """(fan_in, units): weights of one unit are a column of dense W, a row of conv W."""
    fan_in, _ = fans(arr.shape)
    units = arr.shape[1] if arr.ndim == 2 else arr.shape[0]
    return fan_in, units


def _write_units(arr: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Write a (fan_in, units) matrix into a dense or conv-shaped ``arr``."""
    if arr.ndim == 2:
        return _fill(arr, m)
    return _fill(arr, m.T.reshape(arr.shape))


def orthogonal(arr, rng: RngLike = None, *, gain: float = 1.0) -> np.ndarray:
    r"""Fill ``arr`` with a random (semi-)orthogonal matrix times ``gain`` (Saxe et al.).

    A dense ``(m, n)`` weight is treated as a matrix; a conv kernel
    ``(out_channels, in_channels, *kernel)`` is flattened to ``(out_channels, fan_in)``.
    For that matrix ``A`` with ``r`` rows and ``c`` columns:

    .. math::

        A^\\top A = g^2 I_c \\ \\text{if } r \\ge c, \\qquad A A^\\top = g^2 I_r
        \\ \\text{if } r < c.

    So a wide conv kernel (``out_channels <= fan_in``) has orthonormal output-channel
    filters, and a tall dense weight has orthonormal output columns. The matrix is
    Haar-distributed: the QR factor of a Gaussian matrix with the signs of ``diag(R)``
    folded in. Deep Learning, section 8.4.
    """
    arr = fillable_array(arr, "arr")
    g = positive(gain, "gain")
    gen = generator(rng, "rng")
    fan_in, _ = fans(arr.shape)
    if arr.size == 0:
        return arr
    rows, cols = (arr.shape[0], arr.shape[1]) if arr.ndim == 2 else (arr.shape[0], fan_in)
    big, small = max(rows, cols), min(rows, cols)
    q, r = np.linalg.qr(gen.standard_normal((big, small)))
    d = np.sign(np.diagonal(r))
    d[d == 0] = 1.0
    q *= d  # Haar measure: make diag(R) positive
    a = q if rows >= cols else q.T  # (rows, cols)
    a *= g
    return _fill(arr, a.reshape(arr.shape))


def random_walk(arr, rng: RngLike = None, *, nonlinearity: str = "linear") -> np.ndarray:
    """Random-walk initialization (Sussillo & Abbott, 2014): ``W_ij ~ N(0, g^2 / N)``.

    ``N`` is the fan-in and ``g = random_walk_gain(N, nonlinearity)`` (``"linear"`` or
    ``"relu"``), the gain that keeps the log-norm of the back-propagated gradient free of
    drift, so very deep feed-forward nets (hundreds of layers) start trainable.
    The paper uses square layers; with ``N`` = fan-in the rule keeps
    ``E[ln |delta_in|^2 - ln |delta_out|^2] = 0`` for any layer shape. With ReLU units
    use zero biases (the 0.1 of :func:`relu_bias` would add drift). Deep Learning, 8.4.
    """
    arr = fillable_array(arr, "arr")
    gen = generator(rng, "rng")
    fan_in, _ = fans(arr.shape)
    _walk_nonlinearity(nonlinearity, "nonlinearity")
    if arr.size == 0:
        return arr
    g = random_walk_gain(fan_in, nonlinearity)
    return _fill(arr, gen.normal(0.0, g / math.sqrt(fan_in), size=arr.shape))


def sparse(arr, rng: RngLike = None, *, k: int = 15, std: float = 1.0) -> np.ndarray:
    """Sparse initialization (Martens, 2010): each unit gets exactly ``k`` non-zero weights.

    For every unit (a column of a dense ``(fan_in, fan_out)`` weight, an output channel
    of a conv kernel) ``k`` of its ``fan_in`` input weights, chosen uniformly without
    replacement, are drawn from ``N(0, std^2)``; the others are zero. The total input of a
    unit then does not depend on ``fan_in``, while the individual weights do not shrink as
    ``fan_in`` grows (Deep Learning, section 8.4). Martens used ``k = 15``.

    This is not torch's ``sparse_`` (which zeroes a fraction of each column).
    Requires ``1 <= k <= fan_in``.
    """
    arr = fillable_array(arr, "arr")
    k = at_least_one(k, "k")
    std = positive(std, "std")
    gen = generator(rng, "rng")
    fan_in, units = _unit_matrix(arr)
    if k < 1 or (arr.size and k > fan_in):
        raise ValueError(f"k must be an integer in [1, fan_in] = [1, {fan_in}], got {k}")
    if arr.size == 0:
        return arr
    # k distinct inputs per unit: the positions of the k smallest of fan_in uniform keys.
    keys = gen.random((units, fan_in))
    rows = np.argpartition(keys, k - 1, axis=1)[:, :k]
    m = np.zeros((fan_in, units))
    m[rows.T, np.arange(units)] = gen.normal(0.0, std, size=(k, units))
    return _write_units(arr, m)


# ---------------------------------------------------------------------------------------
# Biases and precisions (section 8.4)
# ---------------------------------------------------------------------------------------


def _as_float_array(values, name: str) -> np.ndarray:
    try:
        v = np.asarray(values)
    except Exception as exc:  # noqa: BLE001 - report any conversion failure by name
        raise TypeError(f"{name} must be array-like, got {type(values).__name__} ({exc})") \
            from None
    if not (np.issubdtype(v.dtype, np.floating) or np.issubdtype(v.dtype, np.integer)):
        raise TypeError(f"{name} must hold real numbers, got dtype {v.dtype}")
    v = v.astype(np.float64)
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{name} must be finite, got a NaN or an infinity")
    return v


def softmax_bias(b, c) -> np.ndarray:
    r"""Set a softmax output bias so that ``softmax(b) = c`` (Deep Learning, 8.4).

    With zero weights the output distribution is then the marginal class distribution
    ``c``. The solution is ``log c`` up to an additive constant; the constant is chosen
    to make ``b`` sum to zero:

    .. math::

        b_i = \log c_i - \frac{1}{K} \sum_{j=1}^{K} \log c_j .

    ``b`` is 1-D of length ``K``; ``c`` has the same shape, positive entries, and sums to
    1 (to within ``max(1e-6, K * eps)``).
    """
    b = fillable_array(b, "b")
    cv = _as_float_array(c, "c")
    if b.ndim != 1:
        raise ValueError(f"b must be 1-D (one bias per class), got shape {b.shape}")
    if cv.shape != b.shape:
        raise ValueError(f"c must have b's shape {b.shape}, got shape {cv.shape}")
    if b.size == 0:
        raise ValueError("b must have at least one class, got an empty array")
    if not np.all(cv > 0):
        raise ValueError(f"c must be strictly positive (log 0 is -inf), got minimum "
                         f"{cv.min()!r}")
    c_dtype = np.asarray(c).dtype
    eps = float(np.finfo(c_dtype).eps) if np.issubdtype(c_dtype, np.floating) else 0.0
    tol = max(1e-6, cv.size * eps)
    total = math.fsum(cv.tolist())
    if abs(total - 1.0) > tol:
        raise ValueError(f"c must sum to 1 (class frequencies), got a sum of {total!r}")
    logc = np.log(cv)
    return _fill(b, logc - logc.mean())


def sigmoid_bias(b, p) -> np.ndarray:
    r"""Set sigmoid output biases so that ``sigmoid(b) = p`` for independent binary outputs.

    .. math::

        b_i = \log \frac{p_i}{1 - p_i}

    ``p`` (the marginal frequency of each output being 1) must lie in the open interval
    (0, 1) and broadcast to ``b``'s shape. Deep Learning, section 8.4.
    """
    b = fillable_array(b, "b")
    pv = _as_float_array(p, "p")
    try:
        pv = np.broadcast_to(pv, b.shape)
    except ValueError:
        raise ValueError(f"p must broadcast to b's shape {b.shape}, got shape {pv.shape}") \
            from None
    if not np.all((pv > 0.0) & (pv < 1.0)):
        raise ValueError(f"p must lie strictly within (0, 1), got values in "
                         f"[{pv.min()!r}, {pv.max()!r}]")
    return _fill(b, np.log(pv) - np.log1p(-pv))


def linear_bias(b, y) -> np.ndarray:
    """Set a linear output's bias to the mean target, ``b = mean(y, axis=0)``.

    ``y`` has shape ``(n_samples, *b.shape)``. With zero weights the model then predicts
    the marginal mean. Deep Learning, section 8.4.
    """
    b = fillable_array(b, "b")
    yv = _as_float_array(y, "y")
    if yv.ndim != b.ndim + 1 or yv.shape[1:] != b.shape or yv.shape[0] == 0:
        raise ValueError(
            f"y must have shape (n_samples >= 1, *{b.shape}), got {yv.shape}")
    return _fill(b, yv.mean(axis=0))


def relu_bias(b, value: float = 0.1) -> np.ndarray:
    """Set ReLU hidden-unit biases to a small positive constant (0.1 by default).

    Keeps most units active at initialization instead of saturating at zero (Deep
    Learning, section 8.4). Not for use with random-walk initialization, which assumes
    zero biases.
    """
    b = fillable_array(b, "b")
    return _fill(b, finite(value, "value"))


def lstm_forget_bias(b, *, gate_order: str = "ifgo", forget_gate: str = "f",
                     value: float = 1.0) -> np.ndarray:
    """Set the forget-gate slice of a packed LSTM bias to ``value`` (1 by default).

    A forget gate near 1 at initialization lets the cell state carry information and
    gradients (Deep Learning, section 8.4; Jozefowicz et al., 2015). ``b`` is 1-D of
    length ``len(gate_order) * hidden_size`` with the gates stored one after another in
    the order ``gate_order`` (torch: ``"ifgo"``; Keras: ``"ifco"``); the slice of the gate
    named ``forget_gate`` is set and the others are left as they are.

    Frameworks with two bias vectors (torch's ``bias_ih`` and ``bias_hh``) add them: set
    only one of them, or the effective forget bias is doubled.
    """
    b = fillable_array(b, "b")
    value = finite(value, "value")
    if not isinstance(gate_order, str) or not gate_order \
            or len(set(gate_order)) != len(gate_order):
        raise ValueError(f"gate_order must be a string of distinct one-letter gate names, "
                         f"got {gate_order!r}")
    if not isinstance(forget_gate, str) or len(forget_gate) != 1 \
            or forget_gate not in gate_order:
        raise ValueError(f"forget_gate must be one of the letters of gate_order "
                         f"({gate_order!r}), got {forget_gate!r}")
    if b.ndim != 1 or b.size % len(gate_order):
        raise ValueError(
            f"b must be 1-D with a length divisible by {len(gate_order)} "
            f"(gates {gate_order!r}), got shape {b.shape}")
    h = b.size // len(gate_order)
    i = gate_order.index(forget_gate)
    b[i * h:(i + 1) * h] = value
    return b


def precision_init(arr, value: float = 1.0) -> np.ndarray:
    """Initialize variance or precision parameters to 1 (Deep Learning, eq. 8.24).

    E.g. ``beta`` in ``p(y | x) = N(y | w^T x + b, 1 / beta)``. ``value`` must be > 0.
    """
    arr = fillable_array(arr, "arr")
    return _fill(arr, positive(value, "value"))
