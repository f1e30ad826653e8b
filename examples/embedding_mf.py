"""Matrix factorization with embedding tables: dense, lazy, catch-up and row-wise updates.

    python examples/embedding_mf.py [--steps 3000] [--out mf_curves.png]

Synthetic ratings: users and items have rank-8 latent factors, the rating of a (user,
item) pair is their dot product plus noise, and user and item popularity follow a Zipf law
(so most rows are rarely seen). The model is two embedding tables, users x 16 and items x
16; a minibatch of 256 ratings touches at most 256 rows of each. Its gradient is handed to
the optimizer as ``ch8fast.SparseRows`` (lazy and catch-up) or as the dense table-sized
array (dense). Prints the held-out RMSE and the time in ``opt.step`` of each variant and
draws their curves.
"""

import argparse
import time

import numpy as np

import ch8fast


def make_data(n_users=20_000, n_items=5_000, n_ratings=300_000, rank=8, seed=0):
    rng = np.random.default_rng(seed)
    U = rng.standard_normal((n_users, rank)) / np.sqrt(rank)
    V = rng.standard_normal((n_items, rank))
    pu = 1.0 / np.arange(1, n_users + 1) ** 0.8
    pi = 1.0 / np.arange(1, n_items + 1) ** 0.8
    users = rng.choice(n_users, n_ratings, p=pu / pu.sum())
    items = rng.choice(n_items, n_ratings, p=pi / pi.sum())
    r = np.einsum("ij,ij->i", U[users], V[items]) + 0.1 * rng.standard_normal(n_ratings)
    cut = int(0.9 * n_ratings)
    return (users[:cut], items[:cut], r[:cut].astype(np.float32),
            users[cut:], items[cut:], r[cut:].astype(np.float32), n_users, n_items)


def rmse(P, Q, u, i, r):
    return float(np.sqrt(np.mean((np.einsum("ij,ij->i", P[u], Q[i]) - r) ** 2)))


def train(variant, data, steps, dim=16, batch=256, seed=1, evals=20):
    tu, ti, tr, vu, vi, vr, n_users, n_items = data
    rng = np.random.default_rng(seed)
    P = (rng.standard_normal((n_users, dim)) * 0.1).astype(np.float32)
    Q = (rng.standard_normal((n_items, dim)) * 0.1).astype(np.float32)
    if variant == "rowwise adagrad (lazy)":
        opt = ch8fast.AdaGrad([P, Q], lr=0.1, rowwise=True)
    else:
        opt = ch8fast.Adam([P, Q], lr=3e-3,
                           sparse="catch_up" if variant == "catch-up adam" else "lazy")
    dense = variant == "dense adam"
    gP = np.zeros_like(P) if dense else None
    gQ = np.zeros_like(Q) if dense else None
    curve, step_time = [], 0.0
    for step in range(1, steps + 1):
        b = rng.integers(0, len(tu), batch)
        u, i, r = tu[b], ti[b], tr[b]
        err = np.einsum("ij,ij->i", P[u], Q[i]) - r          # d(mean sq err)/d pred / 2
        du = (2.0 / batch) * err[:, None] * Q[i]
        di = (2.0 / batch) * err[:, None] * P[u]
        t0 = time.perf_counter()
        if dense:
            gP[...] = 0
            gQ[...] = 0
            np.add.at(gP, u, du)
            np.add.at(gQ, i, di)
            opt.step([gP, gQ])
        else:
            opt.step([ch8fast.SparseRows(u, du.astype(np.float32)),
                      ch8fast.SparseRows(i, di.astype(np.float32))])
        step_time += time.perf_counter() - t0
        if step % max(1, steps // evals) == 0:
            curve.append((step, rmse(P, Q, vu, vi, vr)))
    return np.array(curve), step_time


VARIANTS = ("dense adam", "lazy adam", "catch-up adam", "rowwise adagrad (lazy)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--out", default="mf_curves.png")
    a = ap.parse_args(argv)
    data = make_data()
    results = {}
    for v in VARIANTS:
        curve, secs = train(v, data, a.steps)
        results[v] = (curve, secs)
        print(f"{v:24s} held-out RMSE {curve[-1, 1]:.4f}   time in opt.step {secs:.2f} s")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return results
    fig, ax = plt.subplots(figsize=(6, 4))
    for v, (curve, secs) in results.items():
        ax.plot(curve[:, 0], curve[:, 1], label=f"{v} ({secs:.1f} s in step)")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out RMSE")
    ax.set_title("matrix factorization, embedding tables 20000x16 and 5000x16")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")
    return results


if __name__ == "__main__":
    main()
