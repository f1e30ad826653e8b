"""Accuracy of every storage mode: the demo's training and a harder one, a few seeds each.

    python benchmarks/storage_accuracy.py [--seeds 3]
        [--out benchmarks/results/storage_accuracy]

Both runs train an MLP on the embedded UCI digits (standardized, 80/20 split) with Adam:

* "demo": the ``ch8fast demo`` network, 64-64-64-10 ReLU, lr 1e-3, batch 32, 30 epochs;
* "deep": 64-256-256-256-256-10, lr 1e-3, batch 32, 100 epochs (longer, so that the
  rounding of small updates and the decay of the state matter).

The model computes in float32; with 16-bit parameters it reads them converted to float32
(as a framework's mixed precision does) and its float32 gradients go to the optimizer,
which keeps the 16-bit arrays. Every mode starts from the same initial values (rounded to
its dtype) and sees the same minibatches. Prints the final training and validation loss
(mean +- standard deviation over seeds) and writes a table (.md) and the curves (.png).
"""

import argparse
import os
import time

import numpy as np

import ch8fast
from ch8fast.apps.demo import load_dataset
from ch8fast import storage

try:
    import ml_dtypes
    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:
    BF16 = None

MODES = [
    ("float32", np.float32, None, None),
    ("bf16 state", np.float32, None, "bfloat16"),
    ("q8 state", np.float32, None, "q8"),
    ("bf16 params, master", "bf16", "master", None),
    ("bf16 params, stochastic", "bf16", "stochastic", None),
    ("bf16 params, kahan", "bf16", "kahan", None),
    ("bf16 params stochastic, q8 state", "bf16", "stochastic", "q8"),
    ("f16 params, stochastic", np.float16, "stochastic", None),
]
RUNS = {"demo": dict(hidden=(64, 64), epochs=30), "deep": dict(hidden=(256,) * 4,
                                                                epochs=100)}


def load_digits():
    X, y, _, _ = load_dataset()            # the digits embedded in ch8fast.apps
    X, y = X.astype(np.float32), y.astype(np.int64)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(X))
    X, y = X[order], y[order]
    cut = int(0.8 * len(X))
    mu, sd = X[:cut].mean(0), X[:cut].std(0) + 1e-6
    X = (X - mu) / sd
    return X[:cut], y[:cut], X[cut:], y[cut:]


def init(sizes, seed):
    rng = np.random.default_rng(seed)
    ps = []
    for m, n in zip(sizes[:-1], sizes[1:]):
        ps.append((rng.standard_normal((m, n)) * np.sqrt(2.0 / m)).astype(np.float32))
        ps.append(np.zeros(n, np.float32))
    return ps


def loss_and_grads(ps, X, y, want_grads=True):
    hs, h = [X], X
    nl = len(ps) // 2
    for k in range(nl):
        z = h @ ps[2 * k] + ps[2 * k + 1]
        h = np.maximum(z, 0) if k < nl - 1 else z
        hs.append(h)
    z = h - h.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    loss = float(-logp[np.arange(len(y)), y].mean())
    if not want_grads:
        return loss, None
    d = np.exp(logp)
    d[np.arange(len(y)), y] -= 1
    d /= len(y)
    grads = [None] * len(ps)
    for k in range(nl - 1, -1, -1):
        grads[2 * k] = hs[k].T @ d
        grads[2 * k + 1] = d.sum(0)
        if k:
            d = (d @ ps[2 * k].T) * (hs[k] > 0)
    return loss, [g.astype(np.float32) for g in grads]


def train(mode, run, seed, data):
    name, dtype, keep, fmt = mode
    dtype = BF16 if dtype == "bf16" else np.dtype(dtype)
    Xt, yt, Xv, yv = data
    sizes = (Xt.shape[1],) + RUNS[run]["hidden"] + (10,)
    params = [p.astype(dtype) for p in init(sizes, seed)]
    opt = ch8fast.Adam(params, lr=1e-3, state_format=fmt, param_mode=keep, seed=seed)
    curve = []
    for epoch in range(RUNS[run]["epochs"]):
        for idx in _batches(len(Xt), 32, seed, epoch):
            view = [storage.to_float32(p) for p in params]
            _, grads = loss_and_grads(view, Xt[idx], yt[idx])
            opt.step(grads)
        view = [storage.to_float32(p) for p in params]
        curve.append((loss_and_grads(view, Xt, yt, False)[0],
                      loss_and_grads(view, Xv, yv, False)[0]))
    return np.array(curve)


def _batches(n, bs, seed, epoch):
    """The minibatches of one epoch: the same for every mode of a seed."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return [order[i:i + bs] for i in range(0, n, bs)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--runs", default="demo,deep")
    ap.add_argument("--out",
                    default=os.path.join("benchmarks", "results", "storage_accuracy"))
    a = ap.parse_args(argv)
    data = load_digits()
    modes = [m for m in MODES if m[1] != "bf16" or BF16 is not None]
    results = {}
    lines = []
    for run in a.runs.split(","):
        lines += [f"### {run}: MLP "
                  f"{'-'.join(map(str, (64,) + RUNS[run]['hidden'] + (10,)))},"
                  f" Adam lr 1e-3, batch 32, {RUNS[run]['epochs']} epochs, {a.seeds} seeds",
                  "", "| mode | final train loss | final val loss | best val loss | s |",
                  "|---|---:|---:|---:|---:|"]
        for mode in modes:
            t0 = time.perf_counter()
            curves = np.stack([train(mode, run, s, data) for s in range(a.seeds)])
            secs = time.perf_counter() - t0
            results[(run, mode[0])] = curves
            ft, fv = curves[:, -1, 0], curves[:, -1, 1]
            bv = curves[:, :, 1].min(1)
            row = (f"| {mode[0]} | {ft.mean():.2e} ± {ft.std():.1e} | {fv.mean():.4f} ± "
                   f"{fv.std():.4f} | {bv.mean():.4f} ± {bv.std():.4f} | {secs:.0f} |")
            print(f"{run}: {row}", flush=True)
            lines.append(row)
        lines.append("")
    text = "\n".join(lines)
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out + ".md", "w") as f:
        f.write(text)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no figure")
        return
    runs = a.runs.split(",")
    fig, axes = plt.subplots(2, len(runs), figsize=(6 * len(runs), 8), squeeze=False)
    for j, run in enumerate(runs):
        for mode in modes:
            c = results[(run, mode[0])]
            x = np.arange(1, c.shape[1] + 1)
            for row, k, what in ((0, 0, "training"), (1, 1, "validation")):
                m = c[:, :, k].mean(0)
                ax = axes[row][j]
                ax.plot(x, m, label=mode[0], lw=1.2)
                ax.set_yscale("log")
                ax.set_xlabel("epoch")
                ax.set_ylabel(f"{what} loss (mean of {c.shape[0]} seeds)")
                ax.set_title(f"{run}: {what} loss")
        axes[0][j].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(a.out + ".png", dpi=110)
    print(f"wrote {a.out}.md and {a.out}.png")


if __name__ == "__main__":
    main()
