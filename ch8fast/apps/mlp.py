"""A small multilayer perceptron in plain NumPy, trained by the ch8fast optimizers.

This is the worked example of embedding ch8fast in a NumPy framework. The model owns its
parameter arrays and one gradient array per parameter, all allocated once; the forward and
backward passes write into preallocated buffers (``out=``), and the optimizer updates the
parameter arrays in place::

    model = MLP([64, 64, 64, 10], rng=0)            # float32 by default
    opt = ch8fast.Adam(model.params, lr=1e-3)       # the model's own arrays
    for idx in ch8fast.minibatches(len(X), 32, rng=0, epochs=10):
        loss = model.loss_and_grad(X[idx], y[idx])  # fills model.grads
        opt.step(model.grads)

Layout: ``params = [W0, b0, W1, b1, ...]`` with ``W`` of shape ``(fan_in, fan_out)``, used
as ``h = x @ W + b`` (the convention of :mod:`ch8fast.init`); ReLU hidden units and a
softmax output trained with the mean cross-entropy.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np

from ch8fast import init as _init

__all__ = ["MLP", "softmax_cross_entropy", "INITIALIZERS"]

# Initializers of ch8fast.init that fill a dense weight, with the arguments that suit
# ReLU hidden layers.
INITIALIZERS = {
    "fan_in_uniform": lambda w, rng: _init.fan_in_uniform(w, rng),
    "glorot_uniform": lambda w, rng: _init.glorot_uniform(w, rng),
    "glorot_normal": lambda w, rng: _init.glorot_normal(w, rng),
    "he_uniform": lambda w, rng: _init.he_uniform(w, rng),
    "he_normal": lambda w, rng: _init.he_normal(w, rng),
    "variance_scaling": lambda w, rng: _init.variance_scaling(w, rng, scale=1.0),
    "orthogonal": lambda w, rng: _init.orthogonal(w, rng, gain=_init.gain("relu")),
    "random_walk": lambda w, rng: _init.random_walk(w, rng, nonlinearity="relu"),
    "sparse": lambda w, rng: _init.sparse(w, rng, k=min(15, w.shape[0])),
}


def softmax_cross_entropy(logits: np.ndarray, y: np.ndarray,
                          dlogits: Optional[np.ndarray] = None) -> float:
    """Mean cross-entropy of integer labels ``y`` under ``softmax(logits)``.

    ``logits`` (batch, classes) is overwritten with the log-probabilities. When ``dlogits``
    is given, the gradient of the mean loss with respect to the logits,
    ``(softmax(logits) - onehot(y)) / batch``, is written into it. Returns the loss as a
    float.
    """
    n = logits.shape[0]
    rows = np.arange(n)
    logits -= logits.max(axis=1, keepdims=True)
    lse = np.log(np.exp(logits).sum(axis=1, keepdims=True))
    logits -= lse                                            # log softmax
    loss = -float(logits[rows, y].mean(dtype=np.float64))
    if dlogits is not None:
        np.exp(logits, out=dlogits)
        dlogits[rows, y] -= 1.0
        dlogits *= 1.0 / n
    return loss


class _Buffers:
    """Activation and gradient buffers for one batch size."""

    def __init__(self, n, sizes, dtype):
        self.pre = [np.empty((n, s), dtype) for s in sizes[1:]]       # x @ W + b
        self.act = [np.empty((n, s), dtype) for s in sizes[1:-1]]     # relu(pre)
        self.delta = [np.empty((n, s), dtype) for s in sizes[1:]]     # dloss/dpre


class MLP:
    """Fully connected ReLU network with a softmax output, in plain NumPy.

    Args:
        sizes: layer widths, input first and number of classes last, e.g. ``[64, 64, 10]``.
        dtype: float32 (default) or float64, for parameters, gradients and buffers.
        init: a key of :data:`INITIALIZERS` (weights); biases start at zero.
        rng: seed or Generator for the initializer.

    Attributes:
        params: ``[W0, b0, W1, b1, ...]``, the arrays an optimizer updates in place.
        grads: one preallocated array per parameter, filled by :meth:`loss_and_grad`.
        weights, biases: the same arrays as ``params``, split by kind.
    """

    def __init__(self, sizes: Sequence[int], *, dtype=np.float32, init: str = "he_normal",
                 rng=None):
        sizes = [int(s) for s in sizes]
        if len(sizes) < 2 or min(sizes) < 1:
            raise ValueError(f"sizes must list at least 2 positive widths, got {sizes}")
        dtype = np.dtype(dtype)
        if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        if init not in INITIALIZERS:
            raise ValueError(f"unknown initializer {init!r}; choose one of "
                             f"{sorted(INITIALIZERS)}")
        self.sizes = sizes
        self.dtype = dtype
        rng = np.random.default_rng(rng)
        self.weights = [INITIALIZERS[init](np.empty((m, n), dtype), rng)
                        for m, n in zip(sizes[:-1], sizes[1:])]
        self.biases = [np.zeros(n, dtype) for n in sizes[1:]]
        self.params = [a for wb in zip(self.weights, self.biases) for a in wb]
        self.grads = [np.zeros_like(p) for p in self.params]
        self._buffers = {}

    @property
    def n_layers(self):
        return len(self.weights)

    def n_params(self) -> int:
        return sum(p.size for p in self.params)

    def _buf(self, n):
        b = self._buffers.get(n)
        if b is None:
            if len(self._buffers) >= 8:          # a growing batch: keep the newest few
                self._buffers.pop(next(iter(self._buffers)))
            b = self._buffers[n] = _Buffers(n, self.sizes, self.dtype)
        return b

    def _as_input(self, x):
        x = np.asarray(x)
        if x.dtype != self.dtype:
            x = x.astype(self.dtype)
        if x.ndim != 2 or x.shape[1] != self.sizes[0]:
            raise ValueError(f"input must have shape (batch, {self.sizes[0]}), got "
                             f"{x.shape}")
        return x

    def forward(self, x: np.ndarray) -> List[np.ndarray]:
        """Pre-activations of every layer, as a list of buffers (valid until the next call
        with the same batch size); the last entry holds the logits."""
        x = self._as_input(x)
        b = self._buf(x.shape[0])
        h = x
        last = self.n_layers - 1
        for i, (w, bias) in enumerate(zip(self.weights, self.biases)):
            np.matmul(h, w, out=b.pre[i])
            b.pre[i] += bias
            if i < last:
                np.maximum(b.pre[i], 0, out=b.act[i])
                h = b.act[i]
        return b.pre

    def loss(self, x: np.ndarray, y: np.ndarray) -> float:
        """Mean cross-entropy on ``(x, y)``, without gradients."""
        pre = self.forward(x)
        return softmax_cross_entropy(pre[-1], y)

    def evaluate(self, x: np.ndarray, y: np.ndarray,
                 batch_size: int = 1024) -> Tuple[float, float]:
        """(mean cross-entropy, accuracy) on ``(x, y)``."""
        total, correct = 0.0, 0
        for s in range(0, len(x), batch_size):
            xb, yb = x[s:s + batch_size], y[s:s + batch_size]
            logits = self.forward(xb)[-1]
            correct += int((logits.argmax(axis=1) == yb).sum())
            total += softmax_cross_entropy(logits, yb) * len(xb)
        return total / len(x), correct / len(x)

    def loss_and_grad(self, x: np.ndarray, y: np.ndarray) -> float:
        """Mean cross-entropy on the minibatch; the gradient of every parameter is written
        into ``self.grads`` (no allocation of parameter-sized arrays)."""
        x = self._as_input(x)
        pre = self.forward(x)
        b = self._buf(x.shape[0])
        loss = softmax_cross_entropy(pre[-1], y, dlogits=b.delta[-1])
        for i in range(self.n_layers - 1, -1, -1):
            d = b.delta[i]
            h = x if i == 0 else b.act[i - 1]
            np.matmul(h.T, d, out=self.grads[2 * i])             # dW = h^T delta
            np.sum(d, axis=0, out=self.grads[2 * i + 1])          # db
            if i > 0:
                dprev = b.delta[i - 1]
                np.matmul(d, self.weights[i].T, out=dprev)       # dloss/dh
                dprev *= pre[i - 1] > 0                           # through the ReLU
        return loss

    def grad_fn(self, x, y):
        """``loss_and_grad`` in the form ``ch8fast.choose_lr`` expects:
        ``params -> (loss, grads)`` on the batch ``(x, y)``."""
        def fn(params):
            return self.loss_and_grad(x, y), self.grads
        return fn
