"""Choosing the initial learning rate from short trials (Deep Learning, 8.3.1).

The book's advice: too large a rate makes the learning curve oscillate violently and the
cost often rises; too small a rate learns slowly or stalls. Monitor the first iterations
of several candidate rates from the same starting point, and choose an initial rate
*higher* than the one that performs best after the first ~100 iterations, because the
best performer of a short trial is usually too cautious for the whole run.
:func:`choose_lr` does exactly that and explains its choice.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np

from ._validation import Callable as _CallableCheck
from ._validation import Integer, Real, count, positive

__all__ = ["LRFinderResult", "choose_lr", "default_lr_grid"]

_factor = Real(1.0, lo_open=True)                  # a threshold ratio: > 1
_iters = Integer(1)
_loss_and_grad = _CallableCheck("a callable params -> (loss, grads)")
_optimizer = _CallableCheck("a class built as optimizer(params, lr=..., ...)")


def default_lr_grid(low: float = 1e-5, high: float = 1.0,
                    per_decade: int = 4) -> np.ndarray:
    """Log-spaced candidate rates from ``low`` to ``high``, ``per_decade`` a decade.

    The default gives 21 rates: 1e-5, 1.78e-5, 3.16e-5, 5.62e-5, 1e-4, ..., 1.
    """
    low = positive(low, "low")
    high = positive(high, "high")
    if not low < high:
        raise ValueError(f"high must be > low ({low}), got {high}")
    per_decade = _iters(per_decade, "per_decade")
    n = int(round(math.log10(high / low) * per_decade)) + 1
    return np.logspace(math.log10(low), math.log10(high), max(n, 2))


@dataclass
class LRFinderResult:
    """The outcome of :func:`choose_lr`.

    ``lrs``: the candidate rates, ascending. ``curves[i]``: the cost at the start and after
    each update of the trial of ``lrs[i]`` (``iters + 1`` values, fewer when the trial was
    stopped because the cost blew up). ``diverged[i]``: whether that trial diverged.
    ``final_costs[i]``: mean cost over the last tenth of the trial (``inf`` if diverged).
    ``best_short_trial``: the rate with the lowest ``final_costs``. ``recommended``: the
    suggested initial rate (``None`` only when every candidate diverged). ``reasoning``:
    how the choice was made, in words.
    """

    lrs: np.ndarray
    curves: List[np.ndarray]
    diverged: np.ndarray
    final_costs: np.ndarray
    best_short_trial: Optional[float]
    recommended: Optional[float]
    reasoning: str
    iters: int
    initial_cost: float = field(default=float("nan"))

    def __str__(self):
        return self.reasoning

    def plot(self, path) -> None:
        """Write the learning curves and the final cost against the rate to a PNG file.

        Diverged trials are drawn red and dashed, and marked with a red cross on the right
        panel. Needs matplotlib (``pip install matplotlib``); raises ImportError without it.
        """
        try:
            from matplotlib.figure import Figure
        except ImportError as exc:
            raise ImportError(
                "LRFinderResult.plot needs matplotlib; install it with "
                "`pip install matplotlib`"
            ) from exc
        fig = Figure(figsize=(11, 4.5))
        ax1, ax2 = fig.subplots(1, 2)
        positive = all(np.all(c[np.isfinite(c)] > 0) for c in self.curves)
        logs = np.log10(self.lrs)
        span = (logs.max() - logs.min()) or 1.0
        cmap = __import__("matplotlib").colormaps["viridis"]
        for lr, curve, div in zip(self.lrs, self.curves, self.diverged):
            rec = self.recommended is not None and lr == self.recommended
            if div:      # diverged: red and dashed, whatever the rate
                ax1.plot(np.arange(len(curve)), curve, "--", color="red", lw=1.3,
                         label=f"{lr:.3g} (diverged)")
            else:
                color = cmap((math.log10(lr) - logs.min()) / span)
                ax1.plot(np.arange(len(curve)), curve, "-", color=color,
                         lw=2.5 if rec else 1.0,
                         label=f"{lr:.3g}" + (" (recommended)" if rec else ""))
        if positive:
            ax1.set_yscale("log")
        top = self.initial_cost * 10 if math.isfinite(self.initial_cost) else None
        if top is not None and top > 0:
            ax1.set_ylim(top=top)
        ax1.set_xlabel("iteration")
        ax1.set_ylabel("cost")
        ax1.set_title("learning curves (red, dashed: diverged)")
        ax1.legend(fontsize=6, ncol=2, title="lr", title_fontsize=7)
        ok = ~self.diverged
        ax2.plot(self.lrs[ok], self.final_costs[ok], "o-", label="final cost")
        if self.diverged.any():
            finite = self.final_costs[ok]
            y = float(finite.max()) * 1.5 if finite.size else 1.0
            ax2.plot(self.lrs[self.diverged], np.full(int(self.diverged.sum()), y), "x",
                     color="red", ms=10, mew=2.5, label="diverged (no final cost)")
            for lr in self.lrs[self.diverged]:
                ax2.axvline(lr, color="red", alpha=0.5, lw=1, ls="--")
        if self.best_short_trial is not None:
            ax2.axvline(self.best_short_trial, color="gray", ls="--",
                        label="best short trial")
        if self.recommended is not None:
            ax2.axvline(self.recommended, color="green", lw=2, label="recommended")
        ax2.set_xscale("log")
        if positive:
            ax2.set_yscale("log")
        ax2.set_xlabel("learning rate")
        ax2.set_ylabel(f"mean cost over the last tenth of {self.iters} iterations")
        ax2.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=100)


def _check_params(params):
    if isinstance(params, np.ndarray) or not isinstance(params, (list, tuple)):
        raise TypeError(f"params must be a list of numpy arrays, got "
                        f"{type(params).__name__}")
    if len(params) == 0:
        raise ValueError("params must hold at least one array, got an empty list")
    for i, p in enumerate(params):
        if not isinstance(p, np.ndarray):
            raise TypeError(f"params[{i}] must be a numpy.ndarray, got {type(p).__name__}")
        if not np.issubdtype(p.dtype, np.floating):
            raise TypeError(f"params[{i}] must have a floating dtype, got {p.dtype}")
        if not p.flags.writeable:
            raise ValueError(f"params[{i}] must be writeable (it is updated in place), "
                             f"got a read-only array")
    return list(params)


def _check_lrs(lrs):
    lrs = np.asarray(lrs, dtype=np.float64)
    if lrs.ndim != 1 or lrs.size < 2:
        raise ValueError(f"lrs must be a 1-D sequence of at least 2 candidate rates, got "
                         f"shape {lrs.shape}")
    if not np.all(np.isfinite(lrs)) or np.any(lrs <= 0):
        raise ValueError(f"lrs must hold finite rates > 0, got {lrs}")
    lrs = np.unique(lrs)  # sorted, without duplicates
    if lrs.size < 2:
        raise ValueError(f"lrs must hold at least 2 distinct rates, got {lrs}")
    return lrs


def _above(value, ref, factor):
    """``value`` exceeds ``ref`` by the relative ``factor`` (works for ref <= 0 too)."""
    return value > ref + (factor - 1.0) * abs(ref)


def _trial(params, saved, loss_and_grad, optimizer, lr, iters, blowup, kwargs):
    for p, s in zip(params, saved):
        np.copyto(p, s)
    opt = optimizer(params, lr=float(lr), **kwargs)
    costs = []
    stopped = None
    for i in range(iters + 1):
        loss, grads = loss_and_grad(params)
        cost = float(loss)
        costs.append(cost)
        if not math.isfinite(cost):
            stopped = f"non-finite cost at iteration {i}"
            break
        if _above(cost, costs[0], blowup):
            stopped = f"cost above {blowup:g}x the initial cost at iteration {i}"
            break
        if i == iters:
            break
        opt.step(grads)
    return np.array(costs, dtype=np.float64), stopped


def choose_lr(params: Sequence[np.ndarray],
              loss_and_grad: Callable[[List[np.ndarray]],
                                      Tuple[float, Sequence[np.ndarray]]],
              optimizer: Optional[Callable[..., Any]] = None,
              lrs: Optional[Sequence[float]] = None, iters: int = 100, *,
              blowup: float = 10.0, rise: float = 2.0, refine: int = 4,
              **optimizer_kwargs: Any) -> "LRFinderResult":
    r"""Recommend an initial learning rate from short trials of several candidates (8.3.1).

    For every candidate rate the user's parameter arrays are reset to their initial
    values, a fresh ``optimizer(params, lr=lr, **optimizer_kwargs)`` is built, and
    ``iters`` updates are run, recording the cost :math:`J(\theta)` before the first and
    after every update (the learning curve). The arrays in ``params`` are always restored
    in place, bit for bit, before the function returns or raises. The cost is taken at
    whatever the arrays hold between updates (for ``ch8fast.SGD(..., nesterov=True)`` that
    is the look-ahead point).

    A trial **diverged** when the cost becomes non-finite, rises above ``blowup`` times
    the initial cost (the trial is then stopped), or ends above ``rise`` times its own
    minimum (the curve turned upward: the violent oscillation the book warns about). To
    resist minibatch noise, "ends" and "minimum" use the mean over a window of a tenth of
    the trial. The ratio tests assume a non-negative cost, as the book's costs are.

    The **best short-trial** rate is the non-diverged candidate with the lowest final
    cost. Following the book, which observes that the best initial rate is usually
    higher than the rate that does best over the first ~100 iterations, the
    **recommendation** is the next candidate above the best, provided it did not diverge,
    and capped at :math:`\sqrt{\epsilon_{\text{best}}\,\epsilon_{\text{div}}}`, the
    geometric mean of the best rate and the smallest rate above it that diverged (on a
    log grid the cap only matters when the candidates are unevenly spaced; it lies
    between two rates that did not diverge). The recommendation is therefore always
    strictly below every diverged rate above the best. When the next candidate diverged,
    or the best is the largest candidate, up to ``refine`` extra trials probe above the
    best (the geometric mean of the best and the diverged rate, or one grid step above
    the largest); a probe that does not diverge becomes the next candidate. If none
    succeeds, no higher rate has been shown to be safe, and the best short-trial rate
    itself is recommended; the reasoning then says which finer or wider grid to try.

    A candidate above the smallest rate that diverged counts as diverged too: stability is
    taken to be monotone in the rate, and a noisy short trial above the stability limit can
    end low by chance.

    Args:
        params: the parameter arrays, updated in place by the optimizer during the trials.
        loss_and_grad: ``loss_and_grad(params) -> (loss, grads)``, evaluated at the
            current parameters; ``grads`` is a list aligned with ``params``. It may use
            minibatches.
        optimizer: built as ``optimizer(params, lr=lr, **optimizer_kwargs)`` and driven
            with ``opt.step(grads)``; default :class:`ch8fast.SGD`.
        lrs: the candidates (sorted and de-duplicated); default :func:`default_lr_grid`
            (1e-5 to 1, four per decade).
        iters: updates per trial (the book speaks of the first ~100 iterations).
        blowup: a trial whose cost exceeds ``blowup`` times the initial cost is stopped
            and diverged (> 1).
        rise: a trial that ends above ``rise`` times its own minimum diverged (> 1).
        refine: the most extra trials spent probing above the best rate (0 to disable).
        **optimizer_kwargs: passed to every optimizer, e.g. ``momentum=0.9``.

    Returns:
        An :class:`LRFinderResult`; ``str()`` of it is the reasoning.
    """
    params = _check_params(params)
    _loss_and_grad(loss_and_grad, "loss_and_grad")
    if optimizer is None:
        from .optim import SGD as optimizer
    _optimizer(optimizer, "optimizer")
    if "lr" in optimizer_kwargs:
        raise TypeError("lr must not be given: choose_lr chooses it (pass the candidate "
                        "rates as lrs=[...])")
    lrs = default_lr_grid() if lrs is None else _check_lrs(lrs)
    iters = _iters(iters, "iters")
    blowup = _factor(blowup, "blowup")
    rise = _factor(rise, "rise")
    refine = count(refine, "refine")

    window = max(1, (iters + 1) // 10)

    def judge(curve, stopped):
        """(diverged, final cost, why) of one trial."""
        if stopped is not None:
            return True, math.inf, stopped
        smooth = np.convolve(curve, np.ones(window) / window, mode="valid")
        end, low = float(smooth[-1]), float(smooth.min())
        if _above(end, low, rise):
            return (True, math.inf,
                    f"ended at {end:.3g}, above {rise:g}x its minimum {low:.3g}")
        return False, end, None

    saved = [p.copy() for p in params]
    trials = {}                    # lr -> (curve, diverged, final, why)

    def mark_above_diverged():
        """Stability is taken to be monotone in the rate: a rate above one that diverged
        is not trusted, however its own trial ended (a noisy trial can end low by
        chance)."""
        first = min((lr for lr in trials if trials[lr][1]), default=None)
        for lr in trials:
            if first is not None and lr > first and not trials[lr][1]:
                trials[lr] = (trials[lr][0], True, math.inf,
                              f"above lr={first:.3g}, which diverged (a larger rate is not "
                              f"taken to be stable)")

    probes = []
    try:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            def run(lr):
                curve, stopped = _trial(params, saved, loss_and_grad, optimizer, lr, iters,
                                        blowup, optimizer_kwargs)
                trials[lr] = (curve,) + judge(curve, stopped)

            for lr in lrs:
                run(float(lr))
            mark_above_diverged()
            # No safe candidate above the best of the grid: probe between it and the first
            # rate above it that diverged (or above the largest candidate), so that the
            # recommendation can be higher than the best and still shown to be stable.
            ok = [lr for lr in trials if not trials[lr][1]]
            best = min(ok, key=lambda lr: trials[lr][2]) if ok else None
            step_up = lrs[-1] / lrs[-2] if len(lrs) > 1 else 2.0
            for _ in range(refine if ok else 0):
                above = [lr for lr in sorted(trials) if lr > best]
                if above and not trials[above[0]][1]:
                    break
                probe = math.sqrt(best * above[0]) if above else best * step_up
                probes.append(probe)
                run(probe)
    finally:
        for p, s in zip(params, saved):
            np.copyto(p, s)

    mark_above_diverged()
    lrs = np.array(sorted(trials))
    curves = [trials[lr][0] for lr in lrs]
    diverged = np.array([trials[lr][1] for lr in lrs], dtype=bool)
    final = np.array([trials[lr][2] for lr in lrs])
    why = {i: trials[lr][3] for i, lr in enumerate(lrs) if trials[lr][1]}

    initial = float(curves[0][0])
    head = (
        f"Tried {len(lrs)} learning rates from {lrs[0]:.3g} to {lrs[-1]:.3g}, {iters} "
        f"iterations each, from the same initial parameters (initial cost {initial:.4g})."
    )
    if probes:
        head += (" Probed " + ", ".join(f"{lr:.3g}" for lr in probes) + " after the grid, "
                 "to look for a stable rate above the best.")
    div_lines = [f"  lr={lrs[i]:.3g} diverged: {why[i]}" for i in np.flatnonzero(diverged)]
    if diverged.all():
        reasoning = "\n".join(
            [head, "Every candidate diverged:"] + div_lines
            + [f"No recommendation: try rates below {lrs[0]:.3g}."]
        )
        return LRFinderResult(lrs, curves, diverged, final, None, None, reasoning, iters,
                              initial)

    b = int(np.flatnonzero(lrs == best)[0])      # the grid's best; probes lie above it
    higher_div = [i for i in np.flatnonzero(diverged) if i > b]
    d = float(lrs[higher_div[0]]) if higher_div else None
    lines = [head]
    if div_lines:
        lines.append(f"{len(div_lines)} diverged (cost non-finite, above {blowup:g}x the "
                     f"initial cost, ending above {rise:g}x its minimum, or above a rate "
                     f"that diverged):")
        lines += div_lines
    else:
        lines.append("None diverged.")
    lines.append(
        f"Best of the grid after {iters} iterations: lr={best:.3g} (final cost "
        f"{final[b]:.4g})."
    )
    if b + 1 < len(lrs) and not diverged[b + 1]:
        nxt = float(lrs[b + 1])
        rec = nxt
        rule = f"the next candidate above it, lr={nxt:.3g}, which did not diverge"
        if d is not None:
            cap = math.sqrt(best * d)
            rule += (f"; the cap, the geometric mean of {best:.3g} and the smallest "
                     f"diverged rate above it ({d:.3g}), is {cap:.3g}")
            if cap < nxt:
                rec = cap
                rule += ", lower, so the cap is used"
        lines.append(
            "The book (8.3.1): the best initial rate is usually higher than the rate that "
            "does best over the first ~100 iterations. Recommended: " + rule + "."
        )
    elif b + 1 < len(lrs):
        rec = best
        lines.append(
            f"The next candidate above it, lr={lrs[b + 1]:.3g}, diverged, so no higher "
            f"rate was shown to be safe: recommended lr={best:.3g} itself. (The stability "
            f"limit lies between {best:.3g} and {lrs[b + 1]:.3g}; a finer grid there may "
            "find a higher safe rate.)"
        )
    else:
        rec = best
        lines.append(
            f"It is the largest candidate tried, so no higher rate was tested: recommended "
            f"lr={best:.3g} itself; extend the grid above {best:.3g} to look further."
        )
    lines.append(f"Recommended initial learning rate: {rec:.4g}.")
    return LRFinderResult(lrs, curves, diverged, final, best, float(rec), "\n".join(lines),
                          iters, initial)
