"""Parameter initialization (Goodfellow, Bengio & Courville, *Deep Learning*, section 8.4).

* :mod:`ch8fast.init.initializers`: fans and gains, random weights (fan-in uniform,
  Glorot, He, variance scaling, orthogonal, random walk, sparse), biases and precisions;
* :mod:`ch8fast.init.transfer`: :func:`load_matching`, initialization from another model;
* :mod:`ch8fast.init.calibration`: :func:`calibrate`, the scale of every layer set from
  one minibatch.

Every name is importable from ``ch8fast.init``.

**In place.** Every initializer fills a NumPy array in place and returns that same array.
Random values are drawn in float64 and written with ``arr[...] = values``, so the array
keeps its dtype, its memory and every view onto it, and a float32 array receives exactly
the float64 values rounded to float32. Arrays must be float32 or float64 (``TypeError``
otherwise) and writeable (``ValueError`` otherwise); a strided view is filled through the
view. All checks happen before anything is written.

**Random sources.** Each random initializer takes ``rng``: ``None`` (fresh OS entropy), an
``int`` seed, a :class:`numpy.random.SeedSequence`, a bit generator or a
:class:`numpy.random.Generator`; the same seed gives the same values. A ``Generator`` is
advanced by the call, as with any other use of it.

**Shapes** (all of ch8fast follows them). A dense weight has shape
``(m, n) = (fan_in, fan_out)`` and is used as ``y = x @ W``: rows are inputs, columns are
outputs, so a *unit* is a column. A convolution kernel has shape
``(out_channels, in_channels, *kernel_size)``, so ``fan_in = in_channels *
prod(kernel_size)`` and ``fan_out = out_channels * prod(kernel_size)``; a unit is an
output channel, whose ``fan_in`` weights are ``arr[c].ravel()``. See :func:`fans`.
"""
from .calibration import CalibrationReport, LayerCalibration, calibrate
from .initializers import (fan_in_uniform, fans, gain, glorot_normal, glorot_uniform,
                           he_normal, he_uniform, linear_bias, lstm_forget_bias,
                           orthogonal, precision_init, random_walk, random_walk_gain,
                           relu_bias, sigmoid_bias, softmax_bias, sparse, variance_scaling)
from .transfer import LoadReport, load_matching

__all__ = [
    # shapes and gains
    "fans", "gain", "random_walk_gain",
    # random weights
    "fan_in_uniform", "glorot_uniform", "glorot_normal", "he_uniform", "he_normal",
    "variance_scaling", "orthogonal", "random_walk", "sparse",
    # biases and precisions
    "softmax_bias", "sigmoid_bias", "linear_bias", "relu_bias", "lstm_forget_bias",
    "precision_init",
    # initialization from another model
    "load_matching", "LoadReport",
    # data-driven scale
    "calibrate", "CalibrationReport", "LayerCalibration",
]
