"""``ch8fast tour``: the claims of chapter 8.3-8.5, and of the papers of six later
rules, measured with ch8fast's optimizers.

Eleven experiments, each a function that returns its numbers (and the data of its figure):

1. :func:`canyon`: momentum crosses an ill-conditioned quadratic; gradient descent zig-zags.
2. :func:`rates`: excess error against k, with fitted log-log slopes: SGD on a convex and
   on a strongly convex problem; gradient descent against Nesterov on a smooth convex one.
3. :func:`terminal_speed` and :func:`drag`: the step size of momentum under a constant
   gradient, and the physical argument for viscous drag.
4. :func:`adagrad_vs_rmsprop`: AdaGrad's effective rate decays too early on a
   non-convex problem; RMSProp's does not.
5. :func:`init_scales`: activation scale per layer of a deep ReLU network under each
   initializer, and after calibration on one minibatch.
6. :func:`lr_choice`: the learning-rate chooser's trials and its pick.
7. :func:`lion_vs_adam`: Lion moves every coordinate by exactly lr, more than Adam does,
   so it needs a rate a few times smaller (Chen et al. 2023).
8. :func:`adopt_counterexample`: on the online problem of Reddi et al. (2018) Adam with a
   small beta2 goes to the wrong end; ADOPT converges for every beta2 (Taniguchi et al.
   2024).
9. :func:`ademamix_memory`: how long Adam and AdEMAMix remember a batch seen once
   (Pagliardini et al. 2024).
10. :func:`schedule_free`: schedule-free SGD, one run with one learning rate, against SGD
    with a linear decay tuned for each run length (Defazio et al. 2024).
11. :func:`trust_ratio`: LARS and LAMB against momentum SGD and Adam in full-batch
    training, and the spread of norm(W) / norm(grad W) over the layers (You et al. 2017,
    2020).

:func:`run_tour` runs them all and writes ``tour.md``, ``tour.json`` and the figures.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

import numpy as np

__all__ = ["canyon", "rates", "terminal_speed", "drag", "adagrad_vs_rmsprop",
           "init_scales", "lr_choice", "lion_vs_adam", "adopt_counterexample",
           "ademamix_memory", "schedule_free", "trust_ratio", "fit_slope", "run_tour",
           "add_arguments", "main"]


def fit_slope(k, err, lo, hi):
    """Least-squares slope of log(err) against log(k) over lo <= k <= hi."""
    k, err = np.asarray(k, float), np.asarray(err, float)
    m = (k >= lo) & (k <= hi) & (err > 0)
    if m.sum() < 3:
        raise ValueError(f"need at least 3 points in [{lo}, {hi}] to fit a slope")
    return float(np.polyfit(np.log(k[m]), np.log(err[m]), 1)[0])


def _checkpoints(kmax, n=60):
    return np.unique(np.geomspace(1, kmax, n).astype(int))


# ---------------------------------------------------------------------------------------
# 1. The canyon (8.3.2, Figure 8.5)
# ---------------------------------------------------------------------------------------

def canyon(kappa=100.0, angle_deg=30.0, tol=1e-6, max_steps=2000):
    r"""Gradient descent, momentum and Nesterov momentum on the quadratic
    :math:`J(\theta) = \frac12 \theta^\top H \theta`, whose Hessian has eigenvalues 1 (along
    the canyon) and ``kappa`` (across it), rotated by ``angle_deg``.

    Gradient descent uses the rate 1.9/kappa, just below its stability limit 2/kappa (near
    its best for this problem); momentum and Nesterov use the book's alpha = 0.9 with
    lr = 1/kappa. Reports the steps each needs to bring J below ``tol`` times its initial
    value, and how often the cross-canyon coordinate changes sign in the first 50 steps.
    """
    import ch8fast
    a = math.radians(angle_deg)
    R = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    H = R @ np.diag([1.0, kappa]) @ R.T
    start = R @ np.array([-10.0, 1.0])            # far along the canyon, off its floor
    J = lambda th: 0.5 * th @ H @ th              # noqa: E731
    runs = {
        "gradient descent": dict(cls=ch8fast.SGD, lr=1.9 / kappa),
        "momentum": dict(cls=ch8fast.SGD, lr=1.0 / kappa, momentum=0.9),
        "Nesterov": dict(cls=ch8fast.SGD, lr=1.0 / kappa, momentum=0.9, nesterov=True),
    }
    out = {"kappa": kappa, "tol": tol, "runs": {}}
    j0 = J(start)
    for name, kw in runs.items():
        cls = kw.pop("cls")
        th = start.copy()
        g = np.empty(2)
        opt = cls([th], **kw)
        path, steps = [start.copy()], None
        for k in range(1, max_steps + 1):
            np.matmul(H, th, out=g)
            opt.step([g])
            theta = opt.theta()[0]
            path.append(theta)
            if steps is None and J(theta) <= tol * j0:
                steps = k
                if k >= 80:
                    break
        path = np.array(path)
        across = (path @ R)[:, 1]                 # coordinate across the canyon
        flips = int(np.sum(np.sign(across[1:51]) != np.sign(across[:50])))
        out["runs"][name] = {"lr": kw["lr"], "momentum": kw.get("momentum", 0.0),
                             "steps_to_tol": steps, "sign_changes_50": flips,
                             "path": path}
    out["H"] = H
    gd, mom = out["runs"]["gradient descent"], out["runs"]["momentum"]
    out["speedup"] = (gd["steps_to_tol"] / mom["steps_to_tol"]
                      if gd["steps_to_tol"] and mom["steps_to_tol"] else None)
    return out


# ---------------------------------------------------------------------------------------
# 2. Rates of convergence (8.3.1, 8.3.3)
# ---------------------------------------------------------------------------------------

def _sgd_abs(rng, n_runs, kmax, c=0.1):
    r"""SGD on the convex, not strongly convex J(theta) = |theta| with subgradient noise
    N(0, 1), eps_k = c / sqrt(k); ``n_runs`` independent runs side by side in one array."""
    import ch8fast
    th = np.ones(n_runs)
    g = np.empty(n_runs)
    opt = ch8fast.SGD([th], lr=lambda s: c / math.sqrt(s + 1.0))
    ks = _checkpoints(kmax)
    err, j = [], 0
    for k in range(1, kmax + 1):
        np.sign(th, out=g)
        g += rng.standard_normal(n_runs)
        opt.step([g])
        if k == ks[j]:
            err.append(float(np.abs(th).mean()))
            j += 1
    return ks, np.array(err)


def _sgd_strong(rng, n_runs, kmax, lam=1.0):
    r"""SGD on the strongly convex J(theta) = lam theta^2 / 2 with gradient noise N(0, 1),
    eps_k = 1 / (lam (k + 1)) (ch8fast.schedules.inverse_time)."""
    import ch8fast
    from ch8fast.schedules import inverse_time
    th = np.ones(n_runs)
    g = np.empty(n_runs)
    opt = ch8fast.SGD([th], lr=inverse_time(0.5 / lam, 2.0))    # 1 / (lam (2 + step))
    ks = _checkpoints(kmax)
    err, j = [], 0
    for k in range(1, kmax + 1):
        np.multiply(th, lam, out=g)
        g += rng.standard_normal(n_runs)
        opt.step([g])
        if k == ks[j]:
            err.append(float(0.5 * lam * np.mean(th * th)))
            j += 1
    return ks, np.array(err)


def _batch_quadratic(kmax, nesterov, n=2000, lam_min=1e-9):
    r"""Batch gradient descent (lr = 1/L) or Nesterov momentum with the convex-case schedule
    alpha_k = (k - 1)/(k + 2) on J(x) = sum_i lam_i x_i^2 / 2, lam_i log-uniform in
    [lam_min, 1], x_0 = 1: every scale of curvature carries the same share of the initial
    error, so the slowest modes keep the error from falling faster than the worst-case
    rates over the horizon."""
    import ch8fast
    lam = np.geomspace(lam_min, 1.0, n)
    x = np.ones(n)
    g = np.empty(n)
    if nesterov:
        opt = ch8fast.SGD([x], lr=1.0, momentum=lambda s: s / (s + 3.0), nesterov=True)
    else:
        opt = ch8fast.SGD([x], lr=1.0)
    ks = _checkpoints(kmax)
    err, j = [], 0
    for k in range(1, kmax + 1):
        np.multiply(lam, x, out=g)
        opt.step([g])
        if k == ks[j]:
            th = opt.theta()[0]                # Nesterov: theta, not the interim point
            err.append(float(0.5 * np.sum(lam * th * th) / n))
            j += 1
    return ks, np.array(err)


def rates(seed=0, quick=False):
    """Excess error against k for the four cases, and the fitted log-log slopes."""
    rng = np.random.default_rng(seed)
    n_runs, k_sgd, k_batch = (1000, 2000, 1000) if quick else (4000, 10000, 2000)
    cases = {}
    ks, e = _sgd_abs(rng, n_runs, k_sgd)
    cases["sgd_convex"] = dict(k=ks, err=e, fit=(100, k_sgd), book=-0.5,
                               label="SGD, convex |θ|, ε_k = 0.1/√k",
                               book_text="O(1/√k)")
    ks, e = _sgd_strong(rng, n_runs, k_sgd)
    cases["sgd_strongly_convex"] = dict(k=ks, err=e, fit=(100, k_sgd), book=-1.0,
                                        label="SGD, strongly convex θ²/2, ε_k = 1/(k+1)",
                                        book_text="O(1/k)")
    ks, e = _batch_quadratic(k_batch, nesterov=False)
    cases["gd_smooth_convex"] = dict(k=ks, err=e, fit=(50, k_batch), book=-1.0,
                                     label="batch GD, smooth convex quadratic",
                                     book_text="O(1/k)")
    ks, e = _batch_quadratic(k_batch, nesterov=True)
    cases["nesterov_smooth_convex"] = dict(k=ks, err=e, fit=(50, k_batch), book=-2.0,
                                           label="Nesterov, same quadratic",
                                           book_text="O(1/k²)")
    for c in cases.values():
        c["slope"] = fit_slope(c["k"], c["err"], *c["fit"])
    return {"n_runs": n_runs, "cases": cases}


# ---------------------------------------------------------------------------------------
# 3. Momentum as a particle (8.3.2)
# ---------------------------------------------------------------------------------------

def terminal_speed(alphas=(0.5, 0.9, 0.99), lr=0.01, steps=3000):
    """Momentum under a constant gradient g (norm 1): the step length approaches the
    terminal size lr * |g| / (1 - alpha) (the book: alpha = 0.9 multiplies the speed by
    10)."""
    import ch8fast
    g = np.array([0.6, 0.8])                  # |g| = 1
    out = {}
    for a in alphas:
        th = np.zeros(2)
        opt = ch8fast.SGD([th], lr=lr, momentum=a)
        speeds = []
        prev = th.copy()
        for _ in range(steps):
            opt.step([g])
            speeds.append(float(np.linalg.norm(th - prev)))
            prev[...] = th
        predicted = lr * 1.0 / (1.0 - a)
        out[str(a)] = {"alpha": a, "predicted": predicted, "measured": speeds[-1],
                       "ratio": speeds[-1] / predicted, "speeds": np.array(speeds)}
    return out


def drag(dt=0.1, t_end=60.0, x0=1.0, viscous=0.5, turbulent=0.5, dry=0.3):
    r"""A unit-mass particle in the bowl J(x) = x^2/2 from rest at ``x0``, with drag.

    One of three drag forces, integrated by semi-implicit Euler (v += dt F; x += dt v):

    * viscous ``-c v``: the book's choice, and exactly momentum SGD with
      alpha = 1 - c dt and lr = dt^2, which is checked by running ch8fast.SGD alongside;
    * turbulent ``-c v |v|``: proportional to the square of the speed, too weak near rest;
    * dry friction ``-mu sign(v)``: constant, holds the particle wherever |J'(x)| <= mu.

    Returns each trajectory and its final position and speed.
    """
    import ch8fast
    n = int(round(t_end / dt))
    forces = {
        "viscous": lambda x, v: -x - viscous * v,
        "turbulent": lambda x, v: -x - turbulent * v * abs(v),
    }
    out = {}
    for name, force in forces.items():
        x, v = x0, 0.0
        xs = [x]
        for _ in range(n):
            v += dt * force(x, v)
            x += dt * v
            xs.append(x)
        out[name] = {"x": np.array(xs), "final_x": x, "final_v": v}
    # dry (Coulomb) friction: kinetic friction opposes motion; when the velocity would
    # reverse within a step the particle stops, and static friction holds it if it can.
    x, v = x0, 0.0
    xs = [x]
    for _ in range(n):
        if v == 0.0 and abs(x) <= dry:
            xs.append(x)                          # held by static friction
            continue
        direction = math.copysign(1.0, v) if v != 0.0 else -math.copysign(1.0, x)
        v_new = v + dt * (-x - dry * direction)
        if v != 0.0 and v_new * v < 0.0:
            v_new = 0.0                           # comes to rest within the step
        v = v_new
        x += dt * v
        xs.append(x)
    out["dry"] = {"x": np.array(xs), "final_x": x, "final_v": v}

    # the viscous particle is momentum SGD: v_sgd = dt * v, alpha = 1 - c dt, lr = dt^2
    th = np.array([x0])
    g = np.empty(1)
    opt = ch8fast.SGD([th], lr=dt * dt, momentum=1.0 - viscous * dt)
    sgd = [x0]
    for _ in range(n):
        g[0] = th[0]
        opt.step([g])
        sgd.append(float(th[0]))
    out["viscous"]["sgd_x"] = np.array(sgd)
    out["viscous"]["max_diff_vs_sgd"] = float(
        np.max(np.abs(np.array(sgd) - out["viscous"]["x"])))
    tail = max(1, int(round(10.0 / dt)))          # the last 10 time units
    for d in out.values():
        d["amplitude_last"] = float(np.max(np.abs(d["x"][-tail:])))
    out["params"] = {"dt": dt, "t_end": t_end, "x0": x0, "viscous": viscous,
                     "turbulent": turbulent, "dry": dry}
    return out


# ---------------------------------------------------------------------------------------
# 4. AdaGrad against RMSProp (8.5.1, 8.5.2)
# ---------------------------------------------------------------------------------------

def _rosenbrock(x, g):
    a, b = x[0::2], x[1::2]
    r = b - a * a
    g[0::2] = -2.0 * (1.0 - a) - 400.0 * a * r
    g[1::2] = 200.0 * r
    return float(np.sum((1.0 - a) ** 2 + 100.0 * r * r))


def adagrad_vs_rmsprop(steps=3000, start=(-1.5, 2.5)):
    """Both optimizers on the non-convex Rosenbrock valley, each at the best of five
    rates: the steep walls give large gradients at first, which AdaGrad accumulates for
    good, so its effective rate eps / (delta + sqrt(r)) is small by the time it reaches the
    long flat valley floor; RMSProp's moving average forgets them."""
    import ch8fast
    grids = {"AdaGrad": (ch8fast.AdaGrad, [0.01, 0.03, 0.1, 0.3, 1.0]),
             "RMSProp": (ch8fast.RMSProp, [3e-4, 1e-3, 3e-3, 1e-2, 3e-2])}
    out = {}
    for name, (cls, lrs) in grids.items():
        best = None
        for lr in lrs:
            x = np.array(start, dtype=np.float64)
            g = np.empty_like(x)
            opt = cls([x], lr=lr)
            loss, eff = [], []
            for _ in range(steps):
                loss.append(_rosenbrock(x, g))
                opt.step([g])
                st = opt.state[0]
                if name == "AdaGrad":
                    e = lr / (1e-7 + np.sqrt(st["sum"]))
                else:
                    e = lr / np.sqrt(1e-6 + st["square_avg"])
                eff.append(float(np.exp(np.mean(np.log(e)))))    # geometric mean
            loss.append(_rosenbrock(x, g))
            run = {"lr": lr, "final_loss": loss[-1], "loss": np.array(loss),
                   "effective_lr": np.array(eff)}
            if best is None or run["final_loss"] < best["final_loss"]:
                best = run
            out.setdefault("grid", {}).setdefault(name, {})[lr] = loss[-1]
        best["eff_lr_at_100"] = float(best["effective_lr"][99])
        best["eff_lr_final"] = float(best["effective_lr"][-1])
        out[name] = best
    out["steps"] = steps
    out["start"] = list(start)
    return out


# ---------------------------------------------------------------------------------------
# 5. Initialization scale (8.4)
# ---------------------------------------------------------------------------------------

def init_scales(depth=20, width=128, batch=256, seed=0):
    """Std of the pre-activations of each layer of a deep ReLU network (no biases) at
    initialization, on a batch of standard normal inputs, under each initializer; and
    after ``ch8fast.init.calibrate`` on one minibatch (from fan_in_uniform), measured on
    that minibatch and on a fresh one."""
    from ch8fast import init
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, width))
    x_fresh = rng.standard_normal((batch, width))
    relu = init.gain("relu")
    makers = {
        "fan_in_uniform": lambda w, r: init.fan_in_uniform(w, r),
        "glorot_uniform": lambda w, r: init.glorot_uniform(w, r),
        "he_normal": lambda w, r: init.he_normal(w, r),
        "orthogonal (gain √2)": lambda w, r: init.orthogonal(w, r, gain=relu),
        "random_walk": lambda w, r: init.random_walk(w, r, nonlinearity="relu"),
        "sparse (k=15)": lambda w, r: init.sparse(w, r, k=15),
    }

    def forward(weights, xb):
        outs, h = [], xb
        for w in weights:
            z = h @ w
            outs.append(z)
            h = np.maximum(z, 0.0)
        return outs

    out = {}
    for name, make in makers.items():
        r = np.random.default_rng(seed + 1)
        ws = [make(np.empty((width, width)), r) for _ in range(depth)]
        with np.errstate(over="ignore", invalid="ignore"):
            out[name] = np.array([float(np.std(z)) for z in forward(ws, x)])
    r = np.random.default_rng(seed + 1)
    ws = [init.fan_in_uniform(np.empty((width, width)), r) for _ in range(depth)]
    report = init.calibrate(ws, lambda xb: forward(ws, xb), x, target_std=1.0)
    out["calibrated"] = report.std_after
    fresh = np.array([float(np.std(z)) for z in forward(ws, x_fresh)])
    return {"depth": depth, "width": width, "batch": batch, "stds": out,
            "calibrated_fresh": fresh, "calibration": report}


# ---------------------------------------------------------------------------------------
# 6. Choosing the learning rate (8.3.1)
# ---------------------------------------------------------------------------------------

def lr_choice(seed=0, quick=False):
    """``ch8fast.choose_lr`` for SGD on the demo's MLP and digits: the short trials and the
    pick, checked by a longer run at the recommended and at the best short-trial rate."""
    from ch8fast.apps.demo import load_dataset, split_standardize
    from ch8fast.lr_finder import choose_lr, default_lr_grid
    from ch8fast.apps.mlp import MLP
    from ch8fast.schedules import minibatches
    import ch8fast
    X, y, classes, _ = load_dataset(None)
    Xt, yt, Xv, yv = split_standardize(X, y, seed)
    model = MLP([X.shape[1], 64, 64, len(classes)], rng=seed)
    theta0 = [p.copy() for p in model.params]
    iters = 50 if quick else 100
    sampler = minibatches(len(Xt), 32, rng=seed + 2)

    def loss_and_grad(params):
        idx = next(sampler)
        return model.loss_and_grad(Xt[idx], yt[idx]), model.grads

    res = choose_lr(model.params, loss_and_grad, lrs=default_lr_grid(1e-4, 3.0, 3),
                    iters=iters)
    longer = {}
    n_long = 5 * iters
    for which, lr in (("recommended", res.recommended), ("best short trial",
                                                          res.best_short_trial)):
        for p, p0 in zip(model.params, theta0):
            np.copyto(p, p0)
        opt = ch8fast.SGD(model.params, lr=lr)
        s = minibatches(len(Xt), 32, rng=seed + 5)
        for _ in range(n_long):
            idx = next(s)
            model.loss_and_grad(Xt[idx], yt[idx])
            opt.step(model.grads)
        longer[which] = {"lr": lr, "train_loss": model.evaluate(Xt, yt)[0]}
    for p, p0 in zip(model.params, theta0):
        np.copyto(p, p0)
    return {"result": res, "iters": iters, "long_iters": n_long, "longer": longer}


# ---------------------------------------------------------------------------------------
# 7. Lion's sign update is larger than Adam's (Chen et al. 2023)
# ---------------------------------------------------------------------------------------

def _logistic(w, X, y, g=None):
    """Mean logistic loss of the labels y in {0, 1}; fills ``g`` with its gradient."""
    z = X @ w
    if g is not None:
        np.matmul(X.T, 1.0 / (1.0 + np.exp(-z)) - y, out=g)
        g /= len(y)
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def _logistic_minimum(X, y, iters=30):
    """The smallest mean logistic loss, by Newton's method from zero."""
    w = np.zeros(X.shape[1])
    g = np.empty_like(w)
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(X @ w)))
        _logistic(w, X, y, g)
        w -= np.linalg.solve((X.T * (p * (1.0 - p))) @ X / len(y), g)
    return _logistic(w, X, y)


def lion_vs_adam(seed=0, quick=False, lr=0.01, factors=(1, 3, 10, 30), n=1000, d=50,
                 batch=32):
    r"""Adam at ``lr``, and Lion at lr / f for each f of ``factors``, on logistic regression
    (``n`` samples of ``d`` standard-normal features, labels drawn from a logistic model),
    from zero, on the same minibatches of ``batch`` samples.

    Per step: the RMS over the coordinates of the update Δθ; for Lion also the largest
    relative deviation of \|Δθ_i\| from its learning rate over the coordinates that moved,
    and the share of the coordinates that moved; and the loss on all n samples above its
    minimum (found by Newton's method). The factor by which Lion's rate must be smaller to
    behave like Adam is read twice: as lr over Adam's mean RMS update (Lion then moves each
    coordinate as far as Adam does on average), and as the f whose excess-loss curve is
    nearest Adam's (the mean of \|ln(excess_Lion / excess_Adam)\| over the steps).
    """
    import ch8fast
    steps = 400 if quick else 1500
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    w_true = rng.standard_normal(d) * 3.0 / math.sqrt(d)      # logits of std 3
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-(X @ w_true)))).astype(float)
    batches = rng.integers(0, n, (steps, batch))
    best = _logistic_minimum(X, y)
    runs = {"Adam": (ch8fast.Adam, lr, None)}
    runs.update({f"Lion, lr/{f:g}": (ch8fast.Lion, lr / f, f) for f in factors})
    out = {"lr": lr, "factors": list(factors), "steps": steps, "n": n, "d": d,
           "batch": batch, "min_loss": best, "runs": {}}
    for name, (cls, rate, f) in runs.items():
        w = np.zeros(d)
        g = np.empty(d)
        prev = w.copy()
        opt = cls([w], lr=rate)
        rms, excess = np.empty(steps), np.empty(steps)
        worst, moved = 0.0, 1.0
        for k in range(steps):
            idx = batches[k]
            _logistic(w, X[idx], y[idx], g)
            opt.step([g])
            dw = w - prev
            rms[k] = math.sqrt(float(np.mean(dw * dw)))
            if f is not None:
                nz = dw != 0.0
                moved = min(moved, float(nz.mean()))
                if nz.any():
                    worst = max(worst, float(np.max(np.abs(np.abs(dw[nz]) / rate - 1.0))))
            prev[...] = w
            excess[k] = _logistic(w, X, y) - best
        tail = max(1, steps // 10)
        out["runs"][name] = {"lr": rate, "factor": f, "rms_update_over_lr": float(
            rms.mean() / lr), "final_excess": float(excess[-tail:].mean()),
            "rms": rms, "excess": excess}
        if f is not None:
            out["runs"][name].update(max_rel_deviation=worst, min_share_moved=moved)
    adam = out["runs"]["Adam"]
    for name, r in out["runs"].items():
        if r["factor"] is not None:
            r["distance_from_adam"] = float(np.mean(np.abs(
                np.log(r["excess"]) - np.log(adam["excess"]))))
    lions = [r for r in out["runs"].values() if r["factor"] is not None]
    out["adam_rms_over_lr"] = adam["rms_update_over_lr"]
    out["rms_matching_factor"] = 1.0 / adam["rms_update_over_lr"]
    out["nearest_factor"] = min(lions, key=lambda r: r["distance_from_adam"])["factor"]
    out["max_rel_deviation"] = max(r["max_rel_deviation"] for r in lions)
    out["min_share_moved"] = min(r["min_share_moved"] for r in lions)
    return out


# ---------------------------------------------------------------------------------------
# 8. ADOPT converges for any beta2 where Adam does not (Taniguchi et al. 2024)
# ---------------------------------------------------------------------------------------

def adopt_counterexample(quick=False, k=10, C=10.0, lr=0.01, beta1s=(0.0, 0.9),
                         beta2s=(0.1, 0.5, 0.9, 0.999)):
    r"""Adam and ADOPT on the online problem of Reddi et al. (2018): at step t the loss is
    :math:`f_t(\theta) = C\theta` when t mod k = 1 and :math:`-\theta` otherwise, with θ
    projected back into [-1, 1] after each step (from θ = 0). Over a period of k steps the
    gradients sum to C - (k - 1) = 1 > 0 with the defaults, so the optimum is θ = -1.

    For each (beta1, beta2): Adam; ADOPT without clipping (``use_clipping=False``, the
    algorithm of the paper's theorem); and ADOPT with its defaults, which clamp the
    normalized gradient to (t - 1)^(1/4). Every run uses the constant rate ``lr`` and the
    default eps (Adam 1e-8, ADOPT 1e-6): v is an average of g² in {1, C²}, so with C >= 1,
    √v >= 1 and eps plays no part. Reports the mean of θ over the last 10 periods and the
    first step at which the mean of θ over a period is at most -0.9.
    """
    import ch8fast
    steps = 5000 if quick else 10000
    grads = np.where(np.arange(1, steps + 1) % k == 1, C, -1.0)
    makers = {"Adam": (ch8fast.Adam, {}),
              "ADOPT": (ch8fast.ADOPT, {"use_clipping": False}),
              "ADOPT, clipped": (ch8fast.ADOPT, {})}
    out = {"k": k, "C": C, "lr": lr, "steps": steps, "runs": {}}
    for b1 in beta1s:
        for b2 in beta2s:
            cell = out["runs"].setdefault(f"{b1:g}", {}).setdefault(f"{b2:g}", {})
            for name, (cls, kw) in makers.items():
                th = np.zeros(1)
                g = np.empty(1)
                opt = cls([th], lr=lr, betas=(b1, b2), **kw)
                path = np.empty(steps + 1)
                path[0] = 0.0
                for t in range(steps):
                    g[0] = grads[t]
                    opt.step([g])
                    np.clip(th, -1.0, 1.0, out=th)
                    path[t + 1] = th[0]
                period = np.convolve(path[1:], np.ones(k) / k, "valid")   # steps i+1..i+k
                hit = np.nonzero(period <= -0.9)[0]
                cell[name] = {"final": float(path[-10 * k:].mean()),
                              "steps_to_minus_0.9": int(hit[0] + k) if hit.size else None,
                              "period_mean": period}
    return out


# ---------------------------------------------------------------------------------------
# 9. How long Adam and AdEMAMix remember a batch (Pagliardini et al. 2024)
# ---------------------------------------------------------------------------------------

def ademamix_memory(seed=0, quick=False, d=100, batch=32, lr=1e-3, alpha=5.0, beta3=0.999,
                    seen_at=1000, noise=1.0):
    r"""How long Adam and AdEMAMix remember one batch B seen once.

    Online linear regression: every step draws a fresh batch of ``batch`` samples,
    :math:`y = x^\top w^* + \text{noise}`, x standard normal in ``d`` dimensions, w* of norm
    about 1; loss (xᵀw - y)²/2. Each optimizer (lr ``lr``, betas (0.9, 0.999); AdEMAMix with
    ``alpha`` and ``beta3`` warmed up over the first ``seen_at`` steps by
    :func:`ch8fast.schedules.ademamix_alpha` and :func:`ch8fast.schedules.ademamix_beta3`)
    runs twice on the same stream: once with the batch of step ``seen_at`` replaced by B,
    once without B. The memory of B, j steps after it was seen, is the loss on B of the run
    without B minus that of the run with it. Reports its peak, the steps to the peak and
    to half of it, its value 500 steps on and its lowest value (as shares of the peak), and
    the excess loss ‖w - w*‖²/2 of the run without B over the last tenth of the steps.
    """
    import ch8fast
    from ch8fast.schedules import ademamix_alpha, ademamix_beta3
    steps = seen_at + (1000 if quick else 2000)
    makers = {
        "Adam": lambda: dict(cls=ch8fast.Adam),
        "AdEMAMix": lambda: dict(cls=ch8fast.AdEMAMix,
                                 alpha=ademamix_alpha(alpha, seen_at),
                                 beta3=ademamix_beta3(beta3, 0.9, seen_at)),
    }
    out = {"d": d, "batch": batch, "lr": lr, "alpha": alpha, "beta3": beta3,
           "seen_at": seen_at, "steps": steps, "runs": {}}
    for name, make in makers.items():
        loss_B = {}
        for with_B in (True, False):
            rng = np.random.default_rng(seed)
            w_star = rng.standard_normal(d) / math.sqrt(d)
            XB = rng.standard_normal((batch, d))
            yB = XB @ w_star + noise * rng.standard_normal(batch)
            kw = make()
            w = np.zeros(d)
            g = np.empty(d)
            opt = kw.pop("cls")([w], lr=lr, **kw)
            LB, excess = np.empty(steps), np.empty(steps)
            for k in range(steps):
                X = rng.standard_normal((batch, d))
                y = X @ w_star + noise * rng.standard_normal(batch)
                if with_B and k == seen_at:
                    X, y = XB, yB
                np.matmul(X.T, X @ w - y, out=g)
                g /= batch
                opt.step([g])
                r = XB @ w - yB
                LB[k] = 0.5 * float(r @ r) / batch
                excess[k] = 0.5 * float(np.sum((w - w_star) ** 2))
            loss_B[with_B] = LB
        memory = (loss_B[False] - loss_B[True])[seen_at:]
        peak_at = int(np.argmax(memory))
        peak = float(memory[peak_at])
        below = np.nonzero(memory[peak_at:] < 0.5 * peak)[0]
        j500 = min(500, len(memory) - 1)
        tail = max(1, steps // 10)
        negative = np.nonzero(memory[peak_at:] < 0.0)[0]
        out["runs"][name] = {
            "peak": peak, "peak_at": peak_at,
            "half_at": int(peak_at + below[0]) if below.size else None,
            "below_zero_at": int(peak_at + negative[0]) if negative.size else None,
            "at_500": float(memory[j500] / peak),
            "lowest": float(memory[peak_at:].min() / peak),
            "final_excess": float(excess[-tail:].mean()),
            "memory": memory, "excess": excess}
    a, m = out["runs"]["Adam"], out["runs"]["AdEMAMix"]
    out["half_ratio"] = (m["half_at"] / a["half_at"]
                         if a["half_at"] and m["half_at"] else None)
    return out


def schedule_free(seed=0, quick=False):
    """Schedule-free SGD against SGD with a linear decay to 0, on a noisy least-squares
    problem (Defazio et al. 2024): the decay must know the run's length T and be tuned
    for it; one schedule-free run per learning rate is read at every T.

    Returns the horizons; the decay's best excess loss (mean over seeds) and rate per T;
    per beta, schedule-free's best per T and the losses of the one rate best at the
    longest T; their ratios to the decay's; and the curves of the figure."""
    import ch8fast
    from ch8fast import schedules
    rng = np.random.default_rng(seed)
    n, d, batch = 4000, 40, 8
    A = rng.standard_normal((n, d)) / np.sqrt(np.arange(1, d + 1))
    y = A @ rng.standard_normal(d) + 0.5 * rng.standard_normal(n)
    w_star = np.linalg.lstsq(A, y, rcond=None)[0]

    def loss(w):
        r = A @ w - y
        return 0.5 * float(np.mean(r * r))

    f_star = loss(w_star)
    horizons = (250, 1000) if quick else (250, 1000, 4000)
    seeds = (1,) if quick else (1, 2, 3)
    lrs = [0.02 * 2 ** (i / 2) for i in range(0, 12, 2 if quick else 1)]
    t_max = horizons[-1]
    draws = {s: np.random.default_rng([seed, s]).integers(0, n, (t_max, batch))
             for s in seeds}

    def run(make, T, s, at=()):
        """Excess loss at the end (and at the steps ``at``) of T steps from 0."""
        w = np.zeros(d)
        opt = make([w])
        out = {}
        for k in range(T):
            idx = draws[s][k]
            Ai = A[idx]
            opt.step([Ai.T @ (Ai @ w - y[idx]) / batch])
            if k + 1 in at:
                out[k + 1] = loss(opt.theta()[0]) - f_star
        out[T] = loss(opt.theta()[0]) - f_star
        return out

    res = {"horizons": list(horizons), "seeds": len(seeds), "lrs": lrs, "linear": {},
           "schedule_free": {}}
    for T in horizons:
        best = min((np.mean([run(lambda p: ch8fast.SGD(
            p, lr=schedules.linear_decay(lr, T, 0.0)), T, s)[T] for s in seeds]), lr)
            for lr in lrs)
        res["linear"][T] = {"loss": best[0], "lr": best[1]}
    for beta in (0.5, 0.9):
        # one run per learning rate, read at every horizon: the best rate at each, and
        # the losses at every horizon of the one rate best at the longest
        by_lr = {lr: [run(lambda p: ch8fast.ScheduleFreeSGD(p, lr=lr, momentum=beta),
                          t_max, s, at=horizons) for s in seeds] for lr in lrs}
        mean = {lr: {T: float(np.mean([o[T] for o in runs])) for T in horizons}
                for lr, runs in by_lr.items()}
        tuned = {T: min((mean[lr][T], lr) for lr in lrs) for T in horizons}
        one = tuned[t_max][1]
        res["schedule_free"][beta] = {
            "tuned": {T: {"loss": v, "lr": lr} for T, (v, lr) in tuned.items()},
            "lr": one, "loss": mean[one]}
    # each schedule-free figure over the decay's tuned for that length
    res["ratio"] = {b: {T: d["loss"][T] / res["linear"][T]["loss"] for T in horizons}
                    for b, d in res["schedule_free"].items()}
    res["ratio_tuned"] = {b: {T: d["tuned"][T]["loss"] / res["linear"][T]["loss"]
                              for T in horizons}
                          for b, d in res["schedule_free"].items()}
    # the figure: excess loss along one seed's runs
    every = max(1, t_max // 200)
    marks = tuple(range(every, t_max + 1, every))
    s0 = seeds[0]
    b_best = min(res["schedule_free"],
                 key=lambda b: res["schedule_free"][b]["tuned"][t_max]["loss"])
    sf = res["schedule_free"][b_best]
    res["curves"] = {
        "steps": list(marks),
        "schedule_free": [run(lambda p: ch8fast.ScheduleFreeSGD(p, lr=sf["lr"],
                                                                  momentum=b_best),
                              t_max, s0, at=marks)[k] for k in marks],
        "linear": {T: (lambda o: [o[k] for k in marks if k <= T])(run(
            lambda p: ch8fast.SGD(p, lr=schedules.linear_decay(res["linear"][T]["lr"],
                                                               T, 0.0)),
            T, s0, at=marks)) for T in horizons}}
    res["beta_figure"] = b_best
    return res


def trust_ratio(seed=0, quick=False, hidden=(64, 64), steps=None):
    """LARS and LAMB against momentum SGD and Adam in large-batch training (You et al.
    2017, 2020): the demo's digits, every step on the whole training set, an MLP; the
    ratio norm(W) / norm(grad W) of each weight matrix at the start, and each method's
    lowest training loss after ``steps`` full-batch steps over a grid of learning rates
    (LARS and LAMB leave the biases out, ``exclude_1d``).

    Returns the ratios, each method's best loss and rate, every rate's loss, and the best
    run's curve of each method."""
    import ch8fast
    from ch8fast.apps.demo import load_dataset, split_standardize
    from ch8fast.apps.mlp import MLP
    X, y, classes, _ = load_dataset(None)
    Xt, yt, _, _ = split_standardize(X, y, seed)
    sizes = [X.shape[1], *hidden, len(classes)]
    model = MLP(sizes, rng=seed)
    theta0 = [p.copy() for p in model.params]
    model.loss_and_grad(Xt, yt)
    ratios = [float(np.linalg.norm(p) / np.linalg.norm(g))
              for p, g in zip(model.params, model.grads) if p.ndim == 2]
    # (the same with --quick: fewer steps or rates change which method wins, measured)
    steps = steps or 150
    # rates 10^(k/2); LARS's a hundred times larger (its step is lr * 0.001 * the ratio)
    grid = [10 ** (e / 2) for e in range(-6, 3)]
    methods = {
        "momentum SGD": (ch8fast.SGD, dict(momentum=0.9), 1.0),
        "LARS": (ch8fast.LARS, dict(momentum=0.9, exclude_1d=True), 100.0),
        "Adam": (ch8fast.Adam, {}, 1.0),
        "LAMB": (ch8fast.LAMB, dict(exclude_1d=True), 1.0),
    }

    def run(cls, kw, lr):
        for p, p0 in zip(model.params, theta0):
            np.copyto(p, p0)
        opt = cls(model.params, lr=lr, **kw)
        curve = []
        with np.errstate(all="ignore"):
            for _ in range(steps):
                curve.append(model.loss_and_grad(Xt, yt))
                if not math.isfinite(curve[-1]):
                    return math.inf, curve
                opt.step(model.grads)
            loss = model.evaluate(Xt, yt)[0]
        return (loss if math.isfinite(loss) else math.inf), curve

    out = {"sizes": sizes, "batch": len(Xt), "steps": steps, "grid": grid,
           "ratios": ratios, "runs": {}}
    for name, (cls, kw, scale) in methods.items():
        rates = [lr * scale for lr in grid]
        losses = {lr: run(cls, kw, lr) for lr in rates}
        lr = min(rates, key=lambda r: losses[r][0])
        out["runs"][name] = {"lr": lr, "loss": losses[lr][0], "curve": losses[lr][1],
                             "by_lr": {r: v[0] for r, v in losses.items()}}
    for p, p0 in zip(model.params, theta0):
        np.copyto(p, p0)
    r = out["runs"]
    out["lars_over_momentum"] = r["LARS"]["loss"] / r["momentum SGD"]["loss"]
    out["lamb_over_adam"] = r["LAMB"]["loss"] / r["Adam"]["loss"]
    # the step from which each trust-ratio method stays below its plain counterpart
    for a, b in (("LARS", "momentum SGD"), ("LAMB", "Adam")):
        ca, cb = r[a]["curve"], r[b]["curve"]
        behind = [k for k in range(min(len(ca), len(cb))) if not ca[k] < cb[k]]
        r[a]["ahead_from"] = behind[-1] + 2 if behind else 1
    return out


# ---------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------

def _figure(*size):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure(figsize=size)


def _plot_canyon(c, path):
    fig = _figure(10, 4.8)
    if fig is None:
        return False
    ax = fig.subplots()
    pts = np.concatenate([r["path"] for r in c["runs"].values()])
    lo, hi = pts.min(axis=0) - 0.6, pts.max(axis=0) + 0.6
    gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], 300), np.linspace(lo[1], hi[1], 300))
    H = c["H"]
    Z = 0.5 * (H[0, 0] * gx * gx + 2 * H[0, 1] * gx * gy + H[1, 1] * gy * gy)
    ax.contour(gx, gy, Z, levels=np.geomspace(Z.min() + 1e-3, Z.max(), 18), colors="0.75",
               linewidths=0.7)
    styles = {"gradient descent": ("C3", "-"), "momentum": ("C0", "-"),
              "Nesterov": ("C2", "--")}
    for name, r in c["runs"].items():
        p = r["path"][:80]
        color, ls = styles[name]
        ax.plot(p[:, 0], p[:, 1], ls, color=color, marker=".", ms=3, lw=1,
                label=f"{name} (lr {r['lr']:.3g}, α {r['momentum']:g}): "
                      f"{r['steps_to_tol']} steps to tol")
    ax.plot(0, 0, "k*", ms=10, label="the minimum")
    ax.set_aspect("equal")
    ax.set_xlabel("θ₁")
    ax.set_ylabel("θ₂")
    ax.set_title(f"The first 80 steps on a canyon (condition number {c['kappa']:g})")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def _plot_rates(r, path):
    fig = _figure(12, 4.6)
    if fig is None:
        return False
    ax1, ax2 = fig.subplots(1, 2)
    for ax, keys in ((ax1, ("sgd_convex", "sgd_strongly_convex")),
                     (ax2, ("gd_smooth_convex", "nesterov_smooth_convex"))):
        for key in keys:
            c = r["cases"][key]
            line, = ax.loglog(c["k"], c["err"], lw=1.5,
                              label=f"{c['label']}: slope {c['slope']:.2f} "
                                    f"(book {c['book_text']})")
            lo, hi = c["fit"]
            m = (c["k"] >= lo) & (c["k"] <= hi)
            k = c["k"][m]
            ref = c["err"][m][0] * (k / k[0]) ** c["book"]
            ax.loglog(k, ref, ":", color=line.get_color(), lw=1)
        ax.set_xlabel("iteration k")
        ax.set_ylabel("excess error J(θ_k) − J*")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    ax1.set_title("SGD (dotted: the book's rate)")
    ax2.set_title("batch methods (dotted: the book's rate)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def _plot_momentum(ts, dr, path):
    fig = _figure(12, 4.4)
    if fig is None:
        return False
    ax1, ax2 = fig.subplots(1, 2)
    for d in ts.values():
        line, = ax1.semilogx(np.arange(1, len(d["speeds"]) + 1), d["speeds"],
                             label=f"α = {d['alpha']:g}")
        ax1.axhline(d["predicted"], color=line.get_color(), ls=":", lw=1)
    ax1.set_xlabel("step")
    ax1.set_ylabel("step length |Δθ|")
    ax1.set_title("constant gradient: terminal step ε|g|/(1−α) (dotted)")
    ax1.legend(fontsize=8)
    p = dr["params"]
    t = np.arange(len(dr["viscous"]["x"])) * p["dt"]
    for name in ("viscous", "turbulent", "dry"):
        ax2.plot(t, dr[name]["x"], lw=1.2,
                 label=f"{name}: ends at x = {dr[name]['final_x']:.3g}")
    ax2.plot(t, dr["viscous"]["sgd_x"], "k:", lw=1, label="momentum SGD (= viscous)")
    ax2.axhline(0, color="0.6", lw=0.8)
    ax2.set_xlabel("time")
    ax2.set_ylabel("position x (minimum at 0)")
    ax2.set_title("a particle in the bowl x²/2 under three kinds of drag")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def _plot_adagrad(a, path):
    fig = _figure(12, 4.4)
    if fig is None:
        return False
    ax1, ax2 = fig.subplots(1, 2)
    for name in ("AdaGrad", "RMSProp"):
        d = a[name]
        ax1.semilogy(d["loss"],
                     label=f"{name} (lr {d['lr']:g}): final {d['final_loss']:.3g}")
        ax2.semilogy(d["effective_lr"], label=name)
    ax1.set_xlabel("step")
    ax1.set_ylabel("Rosenbrock loss")
    ax1.set_title("each at the best of five rates")
    ax1.legend(fontsize=8)
    ax2.set_xlabel("step")
    ax2.set_ylabel("effective rate (geometric mean over θ)")
    ax2.set_title("AdaGrad ε/(δ+√r) against RMSProp ε/√(δ+r)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def _plot_init(s, path):
    fig = _figure(8, 4.8)
    if fig is None:
        return False
    ax = fig.subplots()
    layers = np.arange(1, s["depth"] + 1)
    for name, stds in s["stds"].items():
        style = "k-o" if name == "calibrated" else "-"
        ax.semilogy(layers, np.where(np.isfinite(stds), stds, np.nan), style, ms=3,
                    label=name)
    ax.set_xlabel("layer")
    ax.set_ylabel("std of pre-activations")
    ax.set_title(f"{s['depth']}-layer ReLU network, width {s['width']}, at initialization")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def _plot_lion(s, path):
    fig = _figure(12, 4.4)
    if fig is None:
        return False
    ax1, ax2 = fig.subplots(1, 2)
    steps = np.arange(1, s["steps"] + 1)
    for i, (name, r) in enumerate(s["runs"].items()):
        style = dict(color="k", lw=1.5) if r["factor"] is None else dict(color=f"C{i}",
                                                                          lw=1)
        ax1.semilogy(steps, r["rms"] / s["lr"], label=f"{name} "
                     f"(mean {r['rms_update_over_lr']:.3g})", **style)
        ax2.loglog(steps, r["excess"], label=f"{name}: final {r['final_excess']:.3g}",
                   **style)
    ax1.set_xlabel("step")
    ax1.set_ylabel(f"RMS update per coordinate / lr (lr = {s['lr']:g})")
    ax1.set_ylim(top=8.0 * max(float(r["rms"].max()) for r in s["runs"].values()) / s["lr"])
    ax1.set_title("Lion moves every coordinate by its rate; Adam by less")
    ax1.legend(fontsize=8, loc="upper right", ncol=2)
    ax2.set_xlabel("step")
    ax2.set_ylabel("loss − its minimum")
    ax2.set_title(f"logistic regression, minibatches of {s['batch']}")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def _plot_adopt(a, path):
    fig = _figure(15, 4.4)
    if fig is None:
        return False
    axes = fig.subplots(1, 3, sharey=True)
    names = ("Adam", "ADOPT", "ADOPT, clipped")
    titles = ("Adam", "ADOPT (use_clipping=False)", "ADOPT (defaults: clipped)")
    for ax, name, title in zip(axes, names, titles):
        for b1, ls in zip(a["runs"], ("-", "--")):
            for i, (b2, cell) in enumerate(a["runs"][b1].items()):
                pm = cell[name]["period_mean"]
                ax.plot(np.arange(a["k"], a["k"] + len(pm)), pm, ls, color=f"C{i}", lw=1,
                        label=f"β1 = {b1}, β2 = {b2}")
        ax.axhline(-1.0, color="0.5", lw=0.8, ls=":")
        ax.set_xlabel("step t")
        ax.set_title(title)
    axes[0].set_ylabel(f"θ, mean over each period of {a['k']} steps (optimum −1)")
    axes[1].legend(fontsize=7, loc="upper right")
    fig.suptitle(f"f_t(θ) = {a['C']:g}θ once every {a['k']} steps, −θ otherwise, "
                 f"θ in [−1, 1], lr {a['lr']:g}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def _plot_ademamix(m, path):
    fig = _figure(12, 4.4)
    if fig is None:
        return False
    ax1, ax2 = fig.subplots(1, 2)
    for name, color in (("Adam", "C0"), ("AdEMAMix", "C3")):
        r = m["runs"][name]
        half = "—" if r["half_at"] is None else r["half_at"]
        ax1.plot(r["memory"], color=color, lw=1.2,
                 label=f"{name}: peak {r['peak']:.3g} at +{r['peak_at']}, half at +{half}")
        if r["half_at"] is not None:
            ax1.plot(r["half_at"], r["memory"][r["half_at"]], "o", color=color, ms=5)
        ax2.semilogy(np.arange(1, m["steps"] + 1), r["excess"], color=color, lw=1,
                     label=f"{name}: final {r['final_excess']:.3g}")
    ax1.axhline(0, color="0.6", lw=0.8)
    ax1.set_xlabel("steps since B was seen")
    ax1.set_ylabel("loss on B without it − loss on B with it")
    ax1.set_title("memory of one batch B seen once (dots: half the peak)")
    ax1.legend(fontsize=8)
    ax2.axvline(m["seen_at"], color="0.6", lw=0.8, ls=":")
    ax2.set_xlabel("step")
    ax2.set_ylabel("excess loss ‖w − w*‖²/2")
    ax2.set_title(f"online linear regression, lr {m['lr']:g} (dotted: B seen)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def _plot_trust_ratio(t, path):
    fig = _figure(12, 4.4)
    if fig is None:
        return False
    ax1, ax2 = fig.subplots(1, 2)
    ax1.bar(range(1, len(t["ratios"]) + 1), t["ratios"], color="C0")
    ax1.set_xlabel("weight matrix (layer)")
    ax1.set_ylabel("‖W‖ / ‖∇W‖ at the start")
    ax1.set_title("the ratio LARS and LAMB scale each layer's step by")
    for j, (name, r) in enumerate(t["runs"].items()):
        ax2.semilogy(np.arange(1, len(r["curve"]) + 1), r["curve"], color=f"C{j + 1}",
                     lw=1.2, label=f"{name} (lr {r['lr']:.3g}): {r['loss']:.2g}")
    ax2.set_xlabel("full-batch step")
    ax2.set_ylabel("training loss")
    ax2.set_title(f"each at its best rate, batch = {t['batch']} (all)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def _plot_schedule_free(r, path):
    fig = _figure(7.5, 4.6)
    if fig is None:
        return False
    ax = fig.subplots()
    c = r["curves"]
    steps = np.array(c["steps"])
    for j, (T, ys) in enumerate(c["linear"].items()):
        ax.loglog(steps[:len(ys)], ys, color=f"C{j}", lw=1,
                  label=f"SGD, linear decay to 0 over T = {T} "
                        f"(lr {r['linear'][T]['lr']:.3g}, tuned for T)")
        ax.plot(steps[len(ys) - 1], ys[-1], "o", color=f"C{j}", ms=5)
    b = r["beta_figure"]
    sf = r["schedule_free"][b]
    ax.loglog(steps, c["schedule_free"], color="k", lw=1.4,
              label=f"schedule-free SGD, β = {b:g}, lr {sf['lr']:.3g} (one run)")
    ax.set_xlabel("step")
    ax.set_ylabel("excess loss at the evaluated point (x for schedule-free)")
    ax.set_title("noisy least squares, minibatches of 8 (one seed)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


# ---------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------

def _md_cell(text):
    """Text for a Markdown table cell: a literal | must be escaped."""
    return text.replace("|", "\\|")


def _g(v, digits=3):
    return "—" if v is None else f"{v:.{digits}g}"


def _report(res, figs):
    c, r, ts, dr = res["canyon"], res["rates"], res["terminal"], res["drag"]
    ad, ini, lrc = res["adagrad"], res["init"], res["lr"]
    L = ["# ch8fast tour: the claims of Deep Learning 8.3–8.5 and of six later "
         "optimizers, measured", ""]
    L.append(f"Every number below was measured by this run (seed {res['seed']}"
             f"{', --quick' if res['quick'] else ''}), with ch8fast's optimizers.")
    L.append("")

    def fig(key):
        return [f"![{key}]({os.path.basename(figs[key])})", ""] if key in figs else []

    runs = c["runs"]
    gd, mo = runs["gradient descent"], runs["momentum"]
    L += ["## 1. Momentum crosses the canyon (8.3.2)", "",
          "> Book: momentum accelerates learning where curvature is high and gradients are "
          "consistent; plain gradient steps waste time moving back and forth across a "
          "narrow canyon.", "",
          f"Quadratic with condition number {c['kappa']:g}, tolerance J ≤ {c['tol']:g}·J₀.",
          "", "| method | lr | α | steps to tolerance | cross-canyon sign changes in the "
          "first 50 steps |", "|---|---:|---:|---:|---:|"]
    for name, d in runs.items():
        L.append(f"| {name} | {d['lr']:.3g} | {d['momentum']:g} | "
                 f"{_g(d['steps_to_tol'])} | {d['sign_changes_50']} |")
    L += ["", f"Measured: momentum needs {mo['steps_to_tol']} steps against "
          f"{gd['steps_to_tol']} for gradient descent at its best rate "
          f"({_g(c['speedup'], 3)}× fewer); gradient descent's cross-canyon coordinate "
          f"changed sign {gd['sign_changes_50']} times in 50 steps (zig-zag), momentum's "
          f"{mo['sign_changes_50']}.", ""] + fig("canyon")

    L += ["## 2. Rates of convergence (8.3.1, 8.3.3)", "",
          "> Book: the excess error of SGD after k steps is O(1/√k) on a convex problem "
          "and O(1/k) on a strongly convex one; in the convex batch case Nesterov momentum "
          "improves O(1/k) to O(1/k²).", "",
          "| problem | book | fitted slope of log error vs log k | fit range |",
          "|---|---|---:|---|"]
    for key, d in r["cases"].items():
        L.append(f"| {_md_cell(d['label'])} | {d['book_text']} "
                 f"(slope {d['book']:g}) | "
                 f"**{d['slope']:.3f}** | k = {d['fit'][0]}…{d['fit'][1]} |")
    L += ["", f"SGD errors are means over {r['n_runs']} independent runs, updated together "
          "as one array. The batch problems are a quadratic whose Hessian eigenvalues are "
          "spread log-uniformly over [1e-9, 1], lr = 1/L; Nesterov uses α_k = (k−1)/(k+2) "
          "and is evaluated at θ, not at the interim point.", ""] + fig("rates")

    L += ["## 3. Momentum as a moving particle (8.3.2)", "",
          "> Book: if every gradient is g, the step reaches the terminal size ε‖g‖/(1−α): "
          "α = 0.9 multiplies the maximum speed by 10. Viscous drag (−v) is the right "
          "force: turbulent drag (∝ v²) is too weak near rest, and dry friction is so "
          "strong that the particle stops before reaching the minimum.", "",
          "| α | predicted ε‖g‖/(1−α) | measured step | ratio |", "|---:|---:|---:|---:|"]
    for d in ts.values():
        L.append(f"| {d['alpha']:g} | {d['predicted']:.6g} | {d['measured']:.6g} | "
                 f"{d['ratio']:.4f} |")
    p = dr["params"]
    L += ["", f"Particle in J(x) = x²/2 from rest at x = {p['x0']:g}, t = 0…{p['t_end']:g} "
          f"(dt = {p['dt']:g}):", "",
          "| drag | final position | final speed | max \\|x\\| over the last 10 time "
          "units |",
          "|---|---:|---:|---:|"]
    for name, what in (("viscous", f"viscous −{p['viscous']:g}v"),
                       ("turbulent", f"turbulent −{p['turbulent']:g}v\\|v\\|"),
                       ("dry", f"dry friction {p['dry']:g}")):
        d = dr[name]
        L.append(f"| {what} | {d['final_x']:.3g} | {abs(d['final_v']):.3g} | "
                 f"{d['amplitude_last']:.3g} |")
    L += ["", f"Viscous drag comes to rest at the minimum; turbulent drag is still "
          f"oscillating with amplitude {dr['turbulent']['amplitude_last']:.3g}; dry "
          f"friction stopped the particle at x = {dr['dry']['final_x']:.3g}, short of the "
          f"minimum. The viscous particle is momentum SGD with α = 1 − c·dt and ε = dt²: "
          f"ch8fast.SGD reproduces its path to {dr['viscous']['max_diff_vs_sgd']:.1e}.",
          ""] \
        + fig("momentum")

    A, R = ad["AdaGrad"], ad["RMSProp"]
    L += ["## 4. AdaGrad's rate decays too early; RMSProp's does not (8.5.1, 8.5.2)", "",
          "> Book: for deep networks, accumulating squared gradients from the start of "
          "training can shrink AdaGrad's effective learning rate prematurely and "
          "excessively; RMSProp's moving average discards the distant past.", "",
          f"Rosenbrock valley from {tuple(ad['start'])}, {ad['steps']} steps, each at the "
          "best of five learning rates:", "",
          "| optimizer | best lr | final loss | effective rate at step 100 | at the end |",
          "|---|---:|---:|---:|---:|"]
    for name, d in (("AdaGrad", A), ("RMSProp", R)):
        L.append(f"| {name} | {d['lr']:g} | {d['final_loss']:.3g} | "
                 f"{d['eff_lr_at_100']:.3g} | {d['eff_lr_final']:.3g} |")
    ratio = A["final_loss"] / R["final_loss"]
    L += ["", f"AdaGrad's final loss is {ratio:.3g}× RMSProp's. "
          "Final loss at every rate tried: " + "; ".join(
              f"{n}: " + ", ".join(f"{lr:g} → {v:.3g}" for lr, v in g.items())
              for n, g in ad["grid"].items()) + ".", ""] + fig("adagrad")

    L += ["## 5. Initialization scale (8.4)", "",
          "> Book: the scale of the initial weights matters a great deal; it can be set "
          "from one minibatch by looking at the standard deviation of the activations and "
          "rescaling, which \"can in principle be automated\".", "",
          f"{ini['depth']}-layer ReLU network, width {ini['width']}, {ini['batch']} "
          "standard-normal inputs; std of the pre-activations:", "",
          "| initializer | layer 1 | layer 10 | last layer |", "|---|---:|---:|---:|"]
    for name, s in ini["stds"].items():
        L.append(f"| {name} | {s[0]:.3g} | {s[min(9, len(s) - 1)]:.3g} | {s[-1]:.3g} |")
    cal = ini["calibration"]
    fr = ini["calibrated_fresh"]
    L += ["", f"`ch8fast.init.calibrate` (from fan_in_uniform) reached target std 1 in "
          f"{cal.passes} pass(es) (converged: {cal.converged}); every layer's std is "
          f"within {np.max(np.abs(cal.std_after - 1)):.2g} of 1 on the calibration "
          f"minibatch and within {np.max(np.abs(fr - 1)):.2g} on a fresh one.",
          ""] + fig("init")

    res_lr = lrc["result"]
    L += ["## 6. Choosing the initial learning rate (8.3.1)", "",
          "> Book: monitor the first ~100 iterations of several rates and pick one higher "
          "than the rate that performs best there.", "",
          f"`ch8fast.choose_lr`, SGD on the demo's MLP and digits, {lrc['iters']} "
          f"iterations per rate: best short trial **{_g(res_lr.best_short_trial)}**, "
          f"recommended **{_g(res_lr.recommended)}**. After {lrc['long_iters']} "
          "iterations the training loss is " + ", ".join(
              f"{v['train_loss']:.4f} at the {k} rate ({_g(v['lr'])})"
              for k, v in lrc["longer"].items()) + ".", "", "```",
          res_lr.reasoning, "```", ""] + fig("lr")

    li = res["lion"]
    adam_l, lion1 = li["runs"]["Adam"], li["runs"].get("Lion, lr/1")
    L += ["## 7. Lion's sign update is larger than Adam's (Chen et al. 2023)", "",
          "> Paper: Lion's update, the sign of an interpolation of the momentum and the "
          "gradient, has a larger norm than those of other optimizers (every coordinate "
          "moves by exactly lr), so its learning rate is typically 3–10× smaller than "
          "AdamW's, and its weight decay 3–10× larger so that lr·λ stays the same.", "",
          f"Logistic regression, {li['n']} samples of {li['d']} features, minibatches of "
          f"{li['batch']}, {li['steps']} steps from zero on the same minibatches; Adam at "
          f"lr = {li['lr']:g}, Lion at lr/f:", "",
          "| optimizer | lr | mean RMS update per coordinate / Adam's lr | final excess "
          "loss | distance from Adam's curve |", "|---|---:|---:|---:|---:|"]
    for name, r in li["runs"].items():
        dist = "—" if r["factor"] is None else f"{r['distance_from_adam']:.3g}"
        L.append(f"| {name} | {r['lr']:.3g} | {r['rms_update_over_lr']:.3g} | "
                 f"{r['final_excess']:.3g} | {dist} |")
    same = ("" if lion1 is None else
            " At Adam's rate, Lion ends "
            f"{lion1['final_excess'] / adam_l['final_excess']:.3g}× as far above the "
            "minimum as Adam.")
    moved = ("every coordinate moved at every step" if li["min_share_moved"] == 1.0 else
             f"at least {li['min_share_moved']:.0%} of the coordinates moved at each step")
    L += ["", "Measured: in every Lion run, each coordinate that moved did so by its "
          f"learning rate, to within a relative {li['max_rel_deviation']:.1e} (rounding), "
          f"and {moved}. Adam's RMS update is {li['adam_rms_over_lr']:.3g}·lr, so at "
          f"the same rate Lion moves each coordinate {li['rms_matching_factor']:.3g}× as "
          f"far: Lion takes Adam's steps at lr/{li['rms_matching_factor']:.2g}. The Lion "
          f"run whose loss curve is nearest Adam's is at lr/{li['nearest_factor']:g}."
          + same + " Excess loss: the loss on all samples minus its minimum, the final one "
          "averaged over the last tenth of the steps; distance: the mean over the steps of "
          "the absolute log ratio of the two excess losses. Weight decay is off in these "
          "runs.", ""] + fig("lion")

    ao = res["adopt"]
    k, C = ao["k"], ao["C"]

    def steps_text(v):
        return "—" if v is None else str(v)

    L += ["## 8. ADOPT converges for any β2; Adam does not (Taniguchi et al. 2024)", "",
          "> Paper: Adam can fail to converge unless β2 suits the problem (Reddi et al. "
          "2018 built an online problem on which it goes to the worst point); ADOPT, which "
          "divides the gradient by the second-moment estimate of the previous steps before "
          "it enters the momentum, converges for any β2.", "",
          f"f_t(θ) = {C:g}θ when t mod {k} = 1, −θ otherwise, θ projected back into "
          f"[−1, 1] after every step, from θ = 0: the gradients of a period sum to "
          f"{C - (k - 1):g} > 0, so the optimum is θ = −1. lr = {ao['lr']:g} (constant), "
          f"{ao['steps']} steps. Mean θ over the last 10 periods, and in brackets the "
          "first step at which the mean of θ over a period is ≤ −0.9 (—: not within the "
          "run):", "",
          "| β1 | β2 | Adam | ADOPT (use_clipping=False) | ADOPT, defaults (clipped) |",
          "|---:|---:|---:|---:|---:|"]
    names = ("Adam", "ADOPT", "ADOPT, clipped")
    for b1, row in ao["runs"].items():
        for b2, cell in row.items():
            L.append(f"| {b1} | {b2} | " + " | ".join(
                f"{cell[n]['final']:+.3f} ({steps_text(cell[n]['steps_to_minus_0.9'])})"
                for n in names) + " |")
    wrong = [f"β1 = {b1} with β2 = " + ", ".join(b2 for b2, c in row.items()
                                                  if c["Adam"]["final"] > 0)
             for b1, row in ao["runs"].items()
             if any(c["Adam"]["final"] > 0 for c in row.values())]
    ends = [c["ADOPT"]["final"] for row in ao["runs"].values() for c in row.values()]
    b1_0 = next(iter(ao["runs"]))
    b2_0 = next(iter(ao["runs"][b1_0]))
    clipped = ao["runs"][b1_0][b2_0]["ADOPT, clipped"]["steps_to_minus_0.9"]
    unclipped = ao["runs"][b1_0][b2_0]["ADOPT"]["steps_to_minus_0.9"]
    clipped = (f"has not reached −0.9 after {ao['steps']} steps" if clipped is None else
               f"reaches −0.9 at step {clipped}")
    L += ["", "Measured: Adam ends on the wrong side (θ > 0) for " +
          (" and ".join(wrong) if wrong else "none of these settings") +
          f". ADOPT without clipping ends between {min(ends):+.3f} and {max(ends):+.3f} "
          "for every (β1, β2). ADOPT's defaults clamp the normalized gradient to "
          f"(t − 1)^(1/4): with a small β2, v ≈ 1 when the rare gradient C = {C:g} comes, "
          f"so its normalized value ≈ {C:g} is cut until t ≈ {C:g}⁴ and the rare steps "
          f"are too short; with β1 = {b1_0}, β2 = {b2_0} the clipped ADOPT {clipped} "
          f"(without clipping: step {steps_text(unclipped)}). So the settings here are "
          "`use_clipping=False` (the algorithm of the paper's theorem) beside the "
          "defaults; eps (Adam 1e-8, ADOPT 1e-6) plays no part, since v averages g² ∈ "
          f"{{1, {C * C:g}}} and √v ≥ 1.", ""] + fig("adopt")

    am = res["ademamix"]
    a, m = am["runs"]["Adam"], am["runs"]["AdEMAMix"]
    L += ["## 9. How long Adam and AdEMAMix remember a batch (Pagliardini et al. 2024)",
          "",
          "> Paper: one EMA of the gradients cannot both weigh the latest gradient heavily "
          "and keep a non-negligible weight on old ones; AdEMAMix adds a slow EMA (β3 near "
          "1) with weight α, so gradients stay relevant for thousands of steps, and models "
          "trained with it forget their training data more slowly than with AdamW.", "",
          f"Online linear regression in {am['d']} dimensions: every step a fresh batch of "
          f"{am['batch']} noisy samples; one batch B replaces the stream's batch at step "
          f"{am['seen_at']}, and the same run without B gives the loss B would have had. "
          f"Adam and AdEMAMix at lr = {am['lr']:g}, betas (0.9, 0.999); AdEMAMix with "
          f"α = {am['alpha']:g} and β3 = {am['beta3']:g}, both warmed up over the first "
          f"{am['seen_at']} steps (`ademamix_alpha`, `ademamix_beta3`). The memory of "
          "B is the loss on B without it minus the loss on B with it:", "",
          "| optimizer | peak memory | steps to the peak | steps to half the peak | "
          "memory 500 steps on (share of the peak) | lowest memory (share of the peak) | "
          "final excess loss |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in am["runs"].items():
        L.append(f"| {name} | {r['peak']:.3g} | {r['peak_at']} | "
                 f"{steps_text(r['half_at'])} | {r['at_500']:+.3f} | {r['lowest']:+.3f} | "
                 f"{r['final_excess']:.3g} |")
    text = (f"Measured: AdEMAMix's memory of B peaks {m['peak'] / a['peak']:.3g}× as high "
            f"as Adam's, {m['peak_at']} steps after B against {a['peak_at']}")
    if am["half_ratio"] is not None:
        text += f", and falls to half its peak {am['half_ratio']:.3g}× as late"
    if m["below_zero_at"] is not None:
        text += (f"; then its slow moment swings past: from step +{m['below_zero_at']} the "
                 "loss on B is higher than if B had never been seen (lowest "
                 f"{m['lowest']:+.2f} of the peak)")
    if a["below_zero_at"] is None:
        text += ", while Adam's memory stays above zero"
    text += (". At the same rate AdEMAMix ends "
             f"{m['final_excess'] / a['final_excess']:.3g}× as far above the best loss as "
             "Adam (excess loss ‖w − w*‖²/2, mean over the last tenth of the steps). ")
    slower = am["half_ratio"] is not None and am["half_ratio"] > 1
    if slower and m["below_zero_at"] is not None:
        text += ("On this small problem AdEMAMix forgets B more slowly for its first few "
                 "hundred steps only, then overshoots")
    elif slower:
        text += "On this small problem AdEMAMix forgets B more slowly"
    else:
        text += "On this small problem AdEMAMix does not forget B more slowly"
    text += (", and the mixture does not reach a lower loss than Adam at the same rate."
             if m["final_excess"] > a["final_excess"] else
             ", and the mixture reaches a lower loss than Adam at the same rate.")
    L += ["", text, ""] + fig("ademamix")

    sf = res["schedule_free"]
    Ts = sf["horizons"]
    L += ["## 10. Schedule-free SGD against a tuned linear decay (Defazio et al. 2024)", "",
          "> Paper: averaging the iterates replaces the learning-rate schedule; schedule-"
          "free methods match or beat a tuned linear decay without being told when the run "
          "ends (the decay must know its length T and be tuned for it).", "",
          "Noisy least squares (4,000 samples, 40 features with decaying scales, noise "
          "0.5, minibatches of 8), from 0. SGD with a linear decay to 0 over T steps: its "
          f"learning rate tuned for each T over {len(sf['lrs'])} rates from "
          f"{sf['lrs'][0]:g} to {sf['lrs'][-1]:.3g}, a new run per T. Schedule-free SGD: "
          f"one run of {Ts[-1]} steps per rate and β, read at every T (at x, "
          "`opt.theta()`): its best rate at each T, and the one rate best at the longest "
          "T read at all. "
          f"Excess loss, mean of {sf['seeds']} minibatch order(s):", "",
          "| T | linear decay (its lr) | "
          + " | ".join(f"schedule-free β = {b:g}, tuned per T (lr) | β = {b:g}, lr "
                       f"{d['lr']:.3g} throughout" for b, d in sf["schedule_free"].items())
          + " |", "|---:|---:|" + "---:|---:|" * len(sf["schedule_free"])]
    for T in Ts:
        lin = sf["linear"][T]
        L.append(f"| {T} | {lin['loss']:.3g} ({lin['lr']:.3g}) | " + " | ".join(
            f"{d['tuned'][T]['loss']:.3g} ({d['tuned'][T]['lr']:.3g}) | {d['loss'][T]:.3g}"
            for d in sf["schedule_free"].values()) + " |")
    b = sf["beta_figure"]
    tuned, one = sf["ratio_tuned"][b], sf["ratio"][b]
    lin_lrs = [sf["linear"][T]["lr"] for T in Ts]
    sf_lrs = [sf["schedule_free"][b]["tuned"][T]["lr"] for T in Ts]
    L += ["", f"Measured (β = {b:g}): tuned for each length as the decay is, schedule-free "
          f"SGD ends at {min(tuned.values()):.2f}–{max(tuned.values()):.2f}× the decay's "
          f"excess loss, from one run per rate; its best rate moved from {max(sf_lrs):.3g} "
          f"to {min(sf_lrs):.3g} over the lengths, the decay's from {max(lin_lrs):.3g} to "
          f"{min(lin_lrs):.3g}. At the one rate best for T = {Ts[-1]}, read at every T: "
          + ", ".join(f"{r:.2f}× at T = {T}" for T, r in one.items())
          + " (the rate best for the long run is small for the short ones). β "
          "matters: " + ", ".join(f"β = {bb:g} gives {r[Ts[-1]]:.2f}×"
                                  for bb, r in sf["ratio_tuned"].items())
          + f" at T = {Ts[-1]} (the paper's default for SGD is 0.9, and it tunes β per "
          "problem). So here schedule-free SGD "
          + ("reaches a lower loss than the decay tuned for each length"
             if max(tuned.values()) < 1 else
             "does not beat the tuned decay at every length")
          + (", but its best rate still depends on the length: what it saves is the run "
             "per length, not the tuning." if max(sf_lrs) > 2 * min(sf_lrs) else
             ", and one rate serves every length."), ""] + fig("schedule_free")
    tr = res["trust_ratio"]
    L += ["", "## 11. LARS and LAMB: a learning rate per layer for large batches "
          "(You et al. 2017, 2020)", "",
          "> Papers: the ratio ‖w‖ / ‖∇L(w)‖ differs widely between layers, so one global "
          "rate is too large for some and too small for others when the batch is large; "
          "LARS scales each layer's step by it (SGD with momentum), LAMB does so for Adam.",
          "", f"The demo's digits, MLP {'-'.join(map(str, tr['sizes']))}, every step on "
          f"the whole training set ({tr['batch']} samples), {tr['steps']} steps, from the "
          f"same start; each method's lowest training loss over {len(tr['grid'])} rates "
          f"from {tr['grid'][0]:.3g} to {tr['grid'][-1]:.3g} (LARS: a hundred times "
          "those, since its trust coefficient is 0.001; LARS and LAMB leave the biases "
          "out). ‖W‖ / ‖∇W‖ of the weight "
          "matrices at the start: " + ", ".join(f"{x:.3g}" for x in tr["ratios"])
          + f" ({max(tr['ratios']) / min(tr['ratios']):.2g}× apart).", "",
          "| method | best rate | training loss after the steps |", "|---|---:|---:|"]
    for name, r in tr["runs"].items():
        L.append(f"| {name} | {r['lr']:.3g} | {r['loss']:.3g} |")
    L += ["", f"Measured: at their best rates LARS ends at {tr['lars_over_momentum']:.2g}× "
          f"momentum SGD's loss and LAMB at {tr['lamb_over_adam']:.2g}× Adam's "
          + ("(both lower: the per-layer rate trains the large batch further in the same "
             "steps)" if tr["lars_over_momentum"] < 1 and tr["lamb_over_adam"] < 1 else
             "(not lower for both on this small network)")
          + f"; but LARS is ahead of momentum SGD only from step "
          f"{tr['runs']['LARS']['ahead_from']} and LAMB of Adam from step "
          f"{tr['runs']['LAMB']['ahead_from']}: in shorter runs the plain methods end "
          "lower.", ""]
    L += fig("trust_ratio")
    return "\n".join(L)


def _numbers(res):
    """The tour's measured numbers, as plain JSON-able data."""
    c, r, ts, dr = res["canyon"], res["rates"], res["terminal"], res["drag"]
    ad, ini, lrc = res["adagrad"], res["init"], res["lr"]
    li, ao, am = res["lion"], res["adopt"], res["ademamix"]
    return {
        "seed": res["seed"], "quick": res["quick"],
        "canyon": {n: {k: v for k, v in d.items() if k != "path"}
                   for n, d in c["runs"].items()} | {"speedup": c["speedup"]},
        "rates": {k: {"slope": d["slope"], "book": d["book"], "fit": list(d["fit"])}
                  for k, d in r["cases"].items()},
        "terminal_speed": {k: {kk: vv for kk, vv in d.items() if kk != "speeds"}
                           for k, d in ts.items()},
        "drag": {n: {"final_x": dr[n]["final_x"], "final_v": dr[n]["final_v"],
                     "amplitude_last": dr[n]["amplitude_last"]}
                 for n in ("viscous", "turbulent", "dry")}
        | {"viscous_max_diff_vs_sgd": dr["viscous"]["max_diff_vs_sgd"]},
        "adagrad_vs_rmsprop": {n: {k: ad[n][k] for k in ("lr", "final_loss",
                                                          "eff_lr_at_100", "eff_lr_final")}
                               for n in ("AdaGrad", "RMSProp")},
        "init": {"stds": {k: [float(x) for x in v] for k, v in ini["stds"].items()},
                 "calibrated_fresh": [float(x) for x in ini["calibrated_fresh"]],
                 "calibration_converged": ini["calibration"].converged},
        "lr": {"recommended": lrc["result"].recommended,
               "best_short_trial": lrc["result"].best_short_trial,
               "longer": lrc["longer"]},
        "lion": {k: v for k, v in li.items() if k != "runs"}
        | {"runs": {n: {k: v for k, v in r.items() if k not in ("rms", "excess")}
                    for n, r in li["runs"].items()}},
        "adopt": {k: v for k, v in ao.items() if k != "runs"}
        | {"runs": {b1: {b2: {n: {k: v for k, v in r.items() if k != "period_mean"}
                              for n, r in cell.items()}
                         for b2, cell in row.items()}
                    for b1, row in ao["runs"].items()}},
        "ademamix": {k: v for k, v in am.items() if k != "runs"}
        | {"runs": {n: {k: v for k, v in r.items() if k not in ("memory", "excess")}
                    for n, r in am["runs"].items()}},
        "schedule_free": {k: v for k, v in res["schedule_free"].items() if k != "curves"},
        "trust_ratio": {k: v for k, v in res["trust_ratio"].items() if k != "runs"}
        | {"runs": {n: {k: v for k, v in r.items() if k != "curve"}
                    for n, r in res["trust_ratio"]["runs"].items()}},
    }


def run_tour(out="ch8fast_out", seed=0, quick=False, plot=True, stream=None):
    """Run every experiment, write ``tour.md``, ``tour.json`` and the figures into
    ``out``; returns the measured numbers (the content of ``tour.json``)."""
    stream = stream or sys.stdout
    say = lambda s="": print(s, file=stream, flush=True)    # noqa: E731
    os.makedirs(out, exist_ok=True)
    res = {"seed": seed, "quick": quick}
    steps = [("canyon", "momentum in a canyon", lambda: canyon()),
             ("rates", "rates of convergence", lambda: rates(seed, quick)),
             ("terminal", "terminal speed", lambda: terminal_speed()),
             ("drag", "drag", lambda: drag()),
             ("adagrad", "AdaGrad against RMSProp",
              lambda: adagrad_vs_rmsprop(1500 if quick else 3000)),
             ("init", "initialization scale",
              lambda: init_scales(depth=10 if quick else 20, width=64 if quick else 128,
                                  seed=seed)),
             ("lr", "learning-rate chooser", lambda: lr_choice(seed, quick)),
             ("lion", "Lion against Adam", lambda: lion_vs_adam(seed, quick)),
             ("adopt", "ADOPT on Reddi's problem", lambda: adopt_counterexample(quick)),
             ("ademamix", "AdEMAMix's memory", lambda: ademamix_memory(seed, quick)),
             ("schedule_free", "schedule-free SGD", lambda: schedule_free(seed, quick)),
             ("trust_ratio", "LARS and LAMB", lambda: trust_ratio(seed, quick))]
    for key, title, fn in steps:
        t = time.perf_counter()
        res[key] = fn()
        say(f"  {title:<28} {time.perf_counter() - t:6.2f} s")

    figs, missing = {}, False
    if plot:
        plan = {"canyon": (_plot_canyon, (res["canyon"],)),
                "rates": (_plot_rates, (res["rates"],)),
                "momentum": (_plot_momentum, (res["terminal"], res["drag"])),
                "adagrad": (_plot_adagrad, (res["adagrad"],)),
                "init": (_plot_init, (res["init"],)),
                "lion": (_plot_lion, (res["lion"],)),
                "adopt": (_plot_adopt, (res["adopt"],)),
                "ademamix": (_plot_ademamix, (res["ademamix"],)),
                "schedule_free": (_plot_schedule_free, (res["schedule_free"],)),
                "trust_ratio": (_plot_trust_ratio, (res["trust_ratio"],))}
        for key, (fn, args) in plan.items():
            path = os.path.join(out, f"tour_{key}.png")
            if fn(*args, path):
                figs[key] = path
            else:
                missing = True
        path = os.path.join(out, "tour_lr.png")
        try:
            res["lr"]["result"].plot(path)
            figs["lr"] = path
        except ImportError:
            missing = True
    numbers = _numbers(res)
    md = os.path.join(out, "tour.md")
    with open(md, "w", encoding="utf-8") as fh:
        fh.write(_report(res, figs))
    with open(os.path.join(out, "tour.json"), "w") as fh:
        json.dump(numbers, fh, indent=1, default=_json_default)

    say()
    say("Measured against the book:")
    for key, d in res["rates"]["cases"].items():
        say(f"  {d['label']:<44} slope {d['slope']:6.3f}   book {d['book_text']}")
    gd = res["canyon"]["runs"]["gradient descent"]["steps_to_tol"]
    mo = res["canyon"]["runs"]["momentum"]["steps_to_tol"]
    say(f"  canyon: steps to tolerance, gradient descent {gd}, momentum {mo}")
    say("  terminal step / (ε‖g‖/(1−α)): " + ", ".join(
        f"α={d['alpha']:g}: {d['ratio']:.4f}" for d in res["terminal"].values()))
    say("  drag, final position: " + ", ".join(
        f"{n} {res['drag'][n]['final_x']:.3g}" for n in ("viscous", "turbulent", "dry")))
    say(f"  Rosenbrock final loss: AdaGrad {res['adagrad']['AdaGrad']['final_loss']:.3g}, "
        f"RMSProp {res['adagrad']['RMSProp']['final_loss']:.3g}")
    say(f"  lr chooser: recommended {_g(res['lr']['result'].recommended)}")
    say()
    say("Measured against the papers:")
    li = res["lion"]
    say(f"  Lion: RMS update / lr: Lion 1, Adam {li['adam_rms_over_lr']:.3f} (Lion takes "
        f"Adam's steps at lr/{li['rms_matching_factor']:.2g}); loss curve nearest Adam's: "
        f"Lion at lr/{li['nearest_factor']:g}")
    for b1, row in res["adopt"]["runs"].items():
        say(f"  Reddi's problem (optimum −1), final θ Adam/ADOPT, β1={b1}: " + ", ".join(
            f"β2={b2} {c['Adam']['final']:+.2f}/{c['ADOPT']['final']:+.2f}"
            for b2, c in row.items()))
    a, m = res["ademamix"]["runs"]["Adam"], res["ademamix"]["runs"]["AdEMAMix"]
    say(f"  AdEMAMix: memory of a batch seen once, steps to half its peak: Adam "
        f"{a['half_at']}, AdEMAMix {m['half_at']}; final excess loss: Adam "
        f"{a['final_excess']:.3g}, AdEMAMix {m['final_excess']:.3g}")
    sf = res["schedule_free"]
    say("  schedule-free SGD (one run) / linear decay (tuned per T), excess loss: "
        + ", ".join(f"T={T} {r:.2f}"
                    for T, r in sf["ratio_tuned"][sf["beta_figure"]].items())
        + f" (β = {sf['beta_figure']:g}, its rate tuned per T from one run per rate)")
    tr = res["trust_ratio"]
    say(f"  full-batch training, best loss: LARS/momentum SGD "
        f"{tr['lars_over_momentum']:.2g}, LAMB/Adam {tr['lamb_over_adam']:.2g}; "
        f"‖W‖/‖∇W‖ over the layers " + ", ".join(f"{x:.3g}" for x in tr["ratios"]))
    if not plot:
        say("figures skipped (--no-plot)")
    elif missing:
        say(f"matplotlib is not installed: the figures would have gone to "
            f"{os.path.abspath(out)}/tour_*.png (pip install matplotlib)")
    names = ["tour.md", "tour.json"] + [os.path.basename(p) for p in figs.values()]
    say(f"Wrote to {os.path.abspath(out)}/: {', '.join(names)}")
    return numbers


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def add_arguments(p):
    """Add the options of ``ch8fast tour`` to the argparse parser ``p``; returns it."""
    p.add_argument("--out", default="ch8fast_out", help="output folder (default "
                   "ch8fast_out)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random experiments")
    p.add_argument("--quick", action="store_true", help="shorter runs (a few seconds)")
    p.add_argument("--no-plot", action="store_true", help="do not write the figures")
    return p


def main(args, parser=None):
    """Run ``ch8fast tour`` from parsed arguments; returns 0."""
    run_tour(out=args.out, seed=args.seed, quick=args.quick, plot=not args.no_plot)
    return 0
