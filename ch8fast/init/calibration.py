"""Data-driven scale: rescale each layer's weights on one minibatch (Deep Learning, 8.4).

The book suggests looking at the standard deviation of the activations on a single
minibatch and rescaling the weights, and notes that this "can in principle be automated":
:func:`calibrate` does it, layer after layer, and reports what it did.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence, Tuple

import numpy as np

from .._validation import Callable as _CallableCheck
from .._validation import Integer, fillable_array, positive

__all__ = ["LayerCalibration", "CalibrationReport", "calibrate"]

_forward = _CallableCheck("a callable x -> list of per-layer outputs")
_passes = Integer(1)


@dataclass(frozen=True)
class LayerCalibration:
    """One layer of a :class:`CalibrationReport`: total ``scale`` applied to its weights,
    output standard deviation before and after calibration."""

    layer: int
    scale: float
    std_before: float
    std_after: float


@dataclass(frozen=True)
class CalibrationReport:
    """Result of :func:`calibrate`; ``str(report)`` is a table."""

    layers: Tuple[LayerCalibration, ...]
    target_std: float
    tol: float
    passes: int
    converged: bool

    @property
    def scales(self) -> np.ndarray:
        return np.array([layer.scale for layer in self.layers])

    @property
    def std_after(self) -> np.ndarray:
        return np.array([layer.std_after for layer in self.layers])

    @property
    def std_before(self) -> np.ndarray:
        return np.array([layer.std_before for layer in self.layers])

    def __str__(self) -> str:
        state = "converged" if self.converged else "NOT converged"
        head = (f"calibrate: target std {self.target_std:g}, tol {self.tol:g}, "
                f"{state} after {self.passes} pass{'es' if self.passes != 1 else ''}")
        rows = [head, f"{'layer':>5}  {'scale':>11}  {'std before':>11}  {'std after':>11}"]
        for r in self.layers:
            off = "" if abs(r.std_after / self.target_std - 1.0) <= self.tol else "  (off)"
            rows.append(f"{r.layer:>5}  {_fmt(r.scale)}  {_fmt(r.std_before)}  "
                        f"{_fmt(r.std_after)}{off}")
        return "\n".join(rows)


def _fmt(v: float) -> str:
    """Fixed-point where readable, scientific otherwise; always 11 characters wide."""
    return f"{v:>11.6f}" if 1e-3 <= abs(v) < 1e4 else f"{v:>11.4e}"


def _layer_stds(outputs, n_layers: int) -> np.ndarray:
    if isinstance(outputs, (str, bytes)) or not isinstance(outputs, Sequence):
        raise ValueError(
            f"forward(x) must return a list of {n_layers} per-layer outputs, "
            f"got {type(outputs).__name__}")
    if len(outputs) != n_layers:
        raise ValueError(
            f"forward(x) returned {len(outputs)} outputs for {n_layers} weight arrays; "
            "it must return one output per layer")
    stds = np.empty(n_layers)
    for i, out in enumerate(outputs):
        o = np.asarray(out)
        if not (np.issubdtype(o.dtype, np.floating) or np.issubdtype(o.dtype, np.integer)):
            raise ValueError(f"output of layer {i} has non-numeric dtype {o.dtype}")
        if o.size < 2:
            raise ValueError(f"output of layer {i} has {o.size} values; need at least 2")
        if not np.all(np.isfinite(o)):
            raise ValueError(f"output of layer {i} has non-finite values (inf or nan)")
        s = float(np.std(o, dtype=np.float64))
        if not (math.isfinite(s) and s > 0.0):
            raise ValueError(
                f"output of layer {i} is constant (std {s}); no scale of its weights can "
                "reach the target")
        stds[i] = s
    return stds


def calibrate(weights: Sequence[np.ndarray], forward: Callable, x, target_std: float = 1.0,
              *, tol: float = 0.02, max_passes: int = 10) -> CalibrationReport:
    r"""Rescale each layer's weights so its output on one minibatch has a target std.

    Section 8.4 of Deep Learning: look at the standard deviation of activations on a
    single minibatch and rescale the weights; "this procedure can in principle be
    automated". ``forward(x)`` must return a list with one array per entry of
    ``weights`` (each layer's pre-activations, or activations), computed from the arrays
    in ``weights`` themselves, which are rescaled in place. Layers are processed in
    order, layer 0 first, since each output depends on all earlier layers:

    .. math::

        W_l \leftarrow W_l \cdot \frac{\sigma^*}{\operatorname{std}(h_l(x))}
        \quad\text{for } l = 0, 1, \ldots, L - 1

    one forward pass per layer. A pass that rescales no layer (every
    ``|std / target_std - 1| <= tol``) ends the loop; otherwise another pass follows, up to
    ``max_passes``. Passes are needed when outputs are not linear in the weights (biases,
    saturating activations). The result reports ``converged=False`` if the budget ran out.
    This is layer-sequential unit-variance initialization (Mishkin & Matas, 2016) with
    ``target_std = 1``.

    A constant output (std 0), non-finite outputs, a wrong number of outputs, an output
    that ignores its weights, non-writeable weights or an exception in ``forward`` raise
    (``ValueError`` for bad values) and leave the weights exactly as they were.
    """
    if isinstance(weights, np.ndarray) or not isinstance(weights, Sequence) or not weights:
        got = ("an empty sequence" if isinstance(weights, Sequence)
               else type(weights).__name__)
        raise TypeError(f"weights must be a non-empty list of weight arrays, got {got}")
    ws = [fillable_array(w, f"weights[{i}]") for i, w in enumerate(weights)]
    _forward(forward, "forward")
    target = positive(target_std, "target_std")
    tol = positive(tol, "tol")
    max_passes = _passes(max_passes, "max_passes")

    if len({id(w) for w in ws}) != len(ws):
        raise ValueError("weights must hold distinct arrays, got one array more than once")

    saved = [w.copy() for w in ws]
    n = len(ws)
    scales = np.ones(n)

    def within(s: np.ndarray) -> bool:
        return bool(np.all(np.abs(s / target - 1.0) <= tol))

    try:
        stds = _layer_stds(forward(x), n)
        before = stds.copy()
        passes, converged = 0, within(stds)
        while not converged and passes < max_passes:
            passes += 1
            for i in range(n):
                if abs(stds[i] / target - 1.0) <= tol:
                    continue
                factor = target / stds[i]
                if not (math.isfinite(factor) and factor > 0.0):
                    raise ValueError(f"layer {i} would need a scale of {factor}, out of "
                                     f"range")
                ws[i] *= factor
                scales[i] *= factor
                if not np.all(np.isfinite(ws[i])):
                    raise ValueError(f"rescaling weights[{i}] by {factor:g} overflowed")
                old = stds[i]
                stds = _layer_stds(forward(x), n)
                if stds[i] == old:
                    raise ValueError(
                        f"output of layer {i} did not change when weights[{i}] was "
                        "rescaled: forward must compute it from the arrays in weights, and "
                        "it must depend on their scale")
            converged = within(stds)
    except BaseException:
        for w, s in zip(ws, saved):
            w[...] = s
        raise
    layers = tuple(LayerCalibration(i, float(scales[i]), float(before[i]), float(stds[i]))
                   for i in range(n))
    return CalibrationReport(layers, target, tol, passes, converged)
