"""``ch8fast demo``: train one small MLP with every optimizer of the chapter and compare.

Each optimizer starts from the same initial parameters and sees the same minibatches in
the same order. The demo prints a table (final training and validation loss and accuracy,
epochs to a target training loss, training time and the share of it spent in
``opt.step``), and writes learning curves (PNG), the table (CSV) and everything measured
(JSON) to an output folder.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from ch8fast import init as _init
from ch8fast.flat import FlatParams
from ch8fast.apps.mlp import INITIALIZERS, MLP
from ch8fast.schedules import batch_size_schedule, linear_decay, minibatches

__all__ = ["OPTIMIZERS", "DataError", "load_dataset", "run_demo", "add_arguments", "main"]

MIN_SAMPLES = 10
VAL_FRACTION = 0.2
DATA_DIR = os.path.join(os.path.dirname(__file__), "data")


class DataError(ValueError):
    """A dataset file that cannot be used, with a message that says why."""


# ---------------------------------------------------------------------------------------
# The optimizers compared
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Contender:
    name: str
    label: str
    lr: float              # default initial learning rate
    decay: bool            # the book's linear decay (8.14) over the run
    cls_name: str
    kwargs: tuple          # extra constructor arguments, as (name, value) pairs

    def make(self, params, lr, total_steps):
        import ch8fast
        cls = getattr(ch8fast, self.cls_name)
        rate = linear_decay(lr, max(1, total_steps)) if self.decay else lr
        return cls(params, lr=rate, **dict(self.kwargs))

    def make_distributed(self, dist, lr, total_steps):
        """The same optimizer, data-parallel over ``dist.comm`` (ch8fast.distributed)."""
        from ch8fast.distributed import DataParallel
        rate = linear_decay(lr, max(1, total_steps)) if self.decay else lr
        return DataParallel(dist.arena, self.cls_name, dist.comm,
                            shard_state=dist.shard_state, lr=rate, **dict(self.kwargs))

    def describe_rate(self, lr):
        """The learning rate as a legend shows it: ``0.1 -> 0.001`` when decayed."""
        return f"{lr:.3g} \u2192 {lr / 100:.3g}" if self.decay else f"{lr:.3g}"

    def describe(self, lr):
        extra = ", ".join(f"{k}={v}" for k, v in self.kwargs)
        rate = f"linear_decay({lr:g} -> {lr / 100:g})" if self.decay else f"{lr:g}"
        return f"{self.cls_name}(lr={rate}{', ' + extra if extra else ''})"


OPTIMIZERS = {c.name: c for c in [
    Contender("sgd", "SGD + linear decay", 0.1, True, "SGD", ()),
    Contender("momentum", "momentum 0.9", 0.01, True, "SGD", (("momentum", 0.9),)),
    Contender("nesterov", "Nesterov 0.9", 0.01, True, "SGD",
              (("momentum", 0.9), ("nesterov", True))),
    Contender("adagrad", "AdaGrad", 0.01, False, "AdaGrad", ()),
    Contender("rmsprop", "RMSProp", 1e-3, False, "RMSProp", ()),
    Contender("rmsprop_nesterov", "RMSProp + Nesterov", 1e-4, False, "RMSProp",
              (("momentum", 0.9), ("nesterov", True))),
    Contender("adam", "Adam", 1e-3, False, "Adam", ()),
    Contender("adamw", "AdamW", 1e-3, False, "AdamW", ()),
    Contender("adadelta", "AdaDelta", 1.0, False, "AdaDelta", ()),
    Contender("lion", "Lion", 3e-4, False, "Lion", ()),
    Contender("adopt", "ADOPT", 1e-3, False, "ADOPT", ()),
    Contender("ademamix", "AdEMAMix", 1e-3, False, "AdEMAMix",
              (("alpha", 2.0), ("beta3", 0.99))),     # a short run: a shorter memory
    Contender("schedule_free_sgd", "schedule-free SGD", 0.1, False, "ScheduleFreeSGD",
              (("warmup_steps", 50),)),
    Contender("schedule_free_adamw", "schedule-free AdamW", 2.5e-3, False,
              "ScheduleFreeAdamW", (("warmup_steps", 50),)),
    Contender("lamb", "LAMB", 2e-3, False, "LAMB", (("exclude_1d", True),)),
    Contender("lars", "LARS", 1.0, False, "LARS", (("exclude_1d", True),)),
]}

# One colour per optimizer, by name: the same in every figure and every run.
# (matplotlib's ten cycle colours, then colours outside that cycle)
_PALETTE = [f"C{i}" for i in range(10)] + ["k", "#b8860b", "#000080", "#ff00ff", "#8b0000",
                                             "#2e8b57"]
COLORS = {name: _PALETTE[i] for i, name in enumerate(OPTIMIZERS)}


# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------

def _default_dataset():
    with np.load(os.path.join(DATA_DIR, "digits.npz")) as f:
        X, y = f["X"], f["y"]
    return X, y, ("UCI optical recognition of handwritten digits (8x8, 1797 samples; "
                  "Alpaydin & Kaynak 1998, CC BY 4.0)")


def _read_npz(path):
    try:
        f = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise DataError(f"{path}: cannot be read as a .npz archive ({exc})") from None
    if not hasattr(f, "files"):
        raise DataError(f"{path}: is a single .npy array, not a .npz archive with arrays "
                        f"'X' and 'y'")
    with f:
        missing = [k for k in ("X", "y") if k not in f.files]
        if missing:
            names = ", ".join(repr(m) for m in missing)
            raise DataError(f"{path}: missing array(s) {names}; "
                            f"found {f.files or 'none'} (expected 'X' of shape "
                            f"(n_samples, n_features) and 'y' of shape (n_samples,))")
        try:
            return np.asarray(f["X"]), np.asarray(f["y"])
        except ValueError as exc:        # object arrays need pickle
            raise DataError(f"{path}: arrays must be numeric ({exc})") from None


def _read_csv(path):
    try:
        with open(path, newline="") as fh:
            text = fh.read()
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a text file") from None
    lines = text.splitlines()
    first = next((ln for ln in lines if ln.strip()), "")
    if not first:
        raise DataError(f"{path}: the file is empty")
    delim = next((d for d in (",", ";", "\t") if d in first), None)
    rows, width = [], None
    reader = csv.reader(lines, delimiter=delim) if delim else (ln.split() for ln in lines)
    for lineno, row in enumerate(reader, 1):
        cells = [c.strip() for c in row]
        if not any(cells):
            continue
        try:
            values = [float(c) for c in cells]
        except ValueError:
            if not rows and width is None:      # a header line
                width = len(cells)
                continue
            bad = next(c for c in cells if not _is_number(c))
            raise DataError(f"{path}, line {lineno}: non-numeric value {bad!r} (every "
                            f"value must be a number; the last column is the label)") \
                from None
        if width is None:
            width = len(values)
        if len(values) != width:
            raise DataError(f"{path}, line {lineno}: {len(values)} columns, expected "
                            f"{width}")
        rows.append(values)
    if not rows:
        raise DataError(f"{path}: no data rows")
    if width < 2:
        raise DataError(f"{path}: need at least 2 columns (features, then the label), "
                        f"got {width}")
    a = np.array(rows)
    return a[:, :-1], a[:, -1]


def _is_number(s):
    try:
        float(s)
        return True
    except ValueError:
        return False


def _check_xy(X, y, where):
    if X.dtype == object or y.dtype == object or not (
            np.issubdtype(X.dtype, np.number) and np.issubdtype(y.dtype, np.number)) \
            or np.iscomplexobj(X) or np.iscomplexobj(y):
        raise DataError(f"{where}: X and y must be real numeric arrays, got dtypes "
                        f"{X.dtype} and {y.dtype}")
    if X.ndim != 2:
        raise DataError(f"{where}: X must be 2-D (n_samples, n_features), got shape "
                        f"{X.shape}")
    if y.ndim != 1:
        raise DataError(f"{where}: y must be 1-D (n_samples,), got shape {y.shape}")
    if X.shape[0] != y.shape[0]:
        raise DataError(f"{where}: X has {X.shape[0]} samples but y has {y.shape[0]} "
                        f"labels")
    if X.shape[1] < 1:
        raise DataError(f"{where}: X has no features")
    if X.shape[0] < MIN_SAMPLES:
        raise DataError(f"{where}: too few samples ({X.shape[0]}); need at least "
                        f"{MIN_SAMPLES} to split off a validation set")
    if not np.all(np.isfinite(X)):
        raise DataError(f"{where}: X contains NaN or infinite values")
    if np.issubdtype(y.dtype, np.floating):
        if not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
            bad = y[~np.isfinite(y) | (y != np.round(y))][0]
            raise DataError(f"{where}: labels must be integers (class numbers), found "
                            f"{bad!r}")
    classes, y_idx = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise DataError(f"{where}: need at least 2 classes, all labels are {classes[0]!r}")
    return X.astype(np.float32), y_idx.astype(np.int64), classes


def load_dataset(path: Optional[str] = None
                 ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(X float32, y int64 class indices 0..C-1, classes, description) from ``path``
    (.npz with arrays ``X``, ``y``, or .csv with the label in the last column), or the
    embedded digits when ``path`` is None. Raises :class:`DataError` with a clear
    message."""
    if path is None:
        X, y, desc = _default_dataset()
        where = "digits.npz"
    else:
        if not os.path.isfile(path):
            raise DataError(f"{path}: no such file")
        ext = os.path.splitext(path)[1].lower()
        if ext == ".npz":
            X, y = _read_npz(path)
        elif ext in (".csv", ".txt", ".tsv"):
            X, y = _read_csv(path)
        else:
            raise DataError(f"{path}: unknown format {ext or '(no extension)'!r}; use .npz "
                            f"(arrays X and y) or .csv (last column the label)")
        desc = os.path.basename(path)
        where = path
    X, y, classes = _check_xy(np.asarray(X), np.asarray(y), where)
    return X, y, classes, f"{desc}: {X.shape[0]} samples, {X.shape[1]} features, " \
                          f"{len(classes)} classes"


def split_standardize(X: np.ndarray, y: np.ndarray,
                      seed: int) -> Tuple[np.ndarray, ...]:
    """A shuffled train/validation split, features standardized with training statistics."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(X))
    n_val = max(1, int(round(VAL_FRACTION * len(X))))
    va, tr = perm[:n_val], perm[n_val:]
    Xt, Xv = X[tr], X[va]
    mu = Xt.mean(axis=0)
    sd = Xt.std(axis=0)
    sd[sd < 1e-6] = 1.0
    Xt = np.ascontiguousarray((Xt - mu) / sd, dtype=np.float32)
    Xv = np.ascontiguousarray((Xv - mu) / sd, dtype=np.float32)
    return Xt, y[tr], Xv, y[va]


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------

class _PlainBar:
    """A progress bar without tqdm: redrawn in place on a terminal, one line otherwise."""

    def __init__(self, total, desc, stream=None):
        self.total, self.desc, self.n, self.post = total, desc, 0, ""
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()

    def _line(self):
        w = 24
        fill = int(w * self.n / max(1, self.total))
        return (f"{self.desc:<18} [{'#' * fill}{'.' * (w - fill)}] {self.n}/{self.total} "
                f"epochs {time.perf_counter() - self.t0:5.1f}s {self.post}")

    def update(self, n=1):
        self.n += n
        if self.tty:
            self.stream.write("\r" + self._line())
            self.stream.flush()

    def set_postfix_str(self, s):
        self.post = s

    def close(self):
        self.stream.write(("\r" if self.tty else "") + self._line() + "\n")
        self.stream.flush()


def _progress(total, desc, quiet):
    if quiet:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _PlainBar(total, desc)
    return tqdm(total=total, desc=f"{desc:<18}", unit="epoch", leave=True, file=sys.stderr,
                dynamic_ncols=True)


def count_steps(n: int, batch_size, epochs: int) -> int:
    """The number of minibatches :func:`ch8fast.minibatches` yields over ``epochs``."""
    steps = 0
    for _ in range(epochs):
        pos = 0
        while pos < n:
            size = batch_size if isinstance(batch_size, int) else batch_size(steps)
            pos += min(size, n - pos)
            steps += 1
    return steps


@dataclass(frozen=True)
class _Dist:
    """Data-parallel training: the communicator and the arena the model lives in."""
    comm: object
    arena: object
    shard_state: bool

    @property
    def rank(self):
        return self.comm.Get_rank()

    @property
    def world(self):
        return self.comm.Get_size()


def model_on_arena(model: MLP) -> FlatParams:
    """Move ``model``'s parameters and gradients into a :class:`ch8fast.FlatParams`
    (values copied; the model's lists then hold views of ``arena.flat`` and
    ``arena.flat_grad``), as data-parallel training needs; returns the arena."""
    arena = FlatParams({f"p{i}": p.shape for i, p in enumerate(model.params)}, model.dtype)
    for view, p in zip(arena.params, model.params):
        np.copyto(view, p)
    model.params[:] = arena.params
    model.grads[:] = arena.grads
    model.weights[:] = arena.params[0::2]
    model.biases[:] = arena.params[1::2]
    return arena


def train_one(contender, model, data, *, lr, epochs, batch_size, seed, target_loss,
              quiet=False, dist=None):
    """Train ``model`` (already initialized) with one optimizer; returns the measurements.

    With ``dist`` (a ``_Dist``), every rank runs this with the same arguments: each takes
    its share of every minibatch, and the optimizer is a ``DataParallel`` one."""
    Xt, yt, Xv, yv = data
    n = len(Xt)
    total_steps = count_steps(n, batch_size, epochs)
    if dist is None:
        opt = contender.make(model.params, lr, total_steps)
    else:
        from ch8fast.distributed import split_batch
        opt = contender.make_distributed(dist, lr, total_steps)
    curve = {k: [] for k in ("epoch", "iteration", "seconds", "train_loss", "train_acc",
                             "val_loss", "val_acc")}

    def record(epoch, it, secs):
        with opt.at_theta():              # Nesterov: the arrays hold the interim point
            tl, ta = model.evaluate(Xt, yt)
            vl, va = model.evaluate(Xv, yv)
        for k, v in zip(curve, (epoch, it, secs, tl, ta, vl, va)):
            curve[k].append(v)
        return tl

    record(0, 0, 0.0)
    bar = _progress(epochs, contender.name, quiet)
    train_time = step_time = 0.0
    it, seen, diverged = 0, 0, False
    tic = time.perf_counter()
    for idx in minibatches(n, batch_size, rng=seed + 1, epochs=epochs):
        if dist is None:
            loss = model.loss_and_grad(Xt[idx], yt[idx])
        else:                              # this rank's share; the mean over all ranks
            mine = split_batch(idx, dist.rank, dist.world)
            part = model.loss_and_grad(Xt[mine], yt[mine]) * len(mine) if len(mine) else 0.0
            loss = dist.comm.allreduce(part) / len(idx)
        if not math.isfinite(loss):
            diverged = True
            train_time += time.perf_counter() - tic
            break
        t = time.perf_counter()
        if dist is None:
            opt.step(model.grads)
        else:
            opt.step(len(mine), len(idx))
        step_time += time.perf_counter() - t
        it += 1
        seen += len(idx)
        if seen % n == 0:                  # an epoch ends (batches never span two)
            train_time += time.perf_counter() - tic
            tl = record(seen // n, it, train_time)
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"loss {tl:.4f}")
            tic = time.perf_counter()
    if diverged:
        record(seen / n, it, train_time)
    if bar is not None:
        bar.close()

    reached = [e for e, loss in zip(curve["epoch"], curve["train_loss"])
               if loss <= target_loss]
    extra = {}
    if dist is not None:
        extra["distributed"] = {"ranks": dist.world, "shard_state": dist.shard_state,
                                "in_sync": opt.check_in_sync(raise_error=True),
                                "state_bytes_per_rank": opt.memory_report()["per_rank"]}
    return {**extra,
        "optimizer": contender.name,
        "label": contender.label,
        "update": contender.describe(lr),
        "lr": float(lr),
        "final_train_loss": curve["train_loss"][-1],
        "final_train_acc": curve["train_acc"][-1],
        "final_val_loss": curve["val_loss"][-1],
        "final_val_acc": curve["val_acc"][-1],
        "epochs_to_target": reached[0] if reached else None,
        "train_seconds": train_time,
        "step_seconds": step_time,
        "step_share": step_time / train_time if train_time > 0 else 0.0,
        "iterations": it,
        "diverged": diverged,
        "curve": curve,
    }


SELECTION_FRACTION = 0.2      # of the training set, held out to choose a rate (--lr auto)


def _auto_lr(contender, model, Xt, yt, *, batch_size, bs, epochs, seed, target_loss,
             iters=100):
    """Choose this optimizer's initial rate for ``--lr auto``; returns ``(rate, report)``.

    First ``ch8fast.choose_lr`` runs short trials (``iters`` updates of each rate of a log
    grid, from the model's current parameters) and recommends a rate as the book advises
    (8.3.1): above the best short trial, below every rate that diverged. A short trial
    cannot see overfitting, and on a small dataset the fastest start often generalizes
    worst; so the recommendation and the grid rates below it, down to a thirtieth of it,
    are then each trained for the whole run on 80 % of the training set, and the rate with
    the lowest loss on the other 20 % (the selection set; the mean over the last third of
    the epochs, which is less noisy than the last epoch's) is used. The validation set is
    never looked at. The model's parameters are restored before returning."""
    import ch8fast
    from ch8fast.lr_finder import choose_lr, default_lr_grid
    theta0 = [p.copy() for p in model.params]
    sampler = minibatches(len(Xt), batch_size, rng=seed + 2, epochs=None)

    def loss_and_grad(params):
        idx = next(sampler)
        return model.loss_and_grad(Xt[idx], yt[idx]), model.grads

    grid = default_lr_grid(1e-5, 1.0, per_decade=3)
    finder = choose_lr(model.params, loss_and_grad,
                       optimizer=getattr(ch8fast, contender.cls_name), lrs=grid,
                       iters=iters, **dict(contender.kwargs))
    report = {"recommended": finder.recommended,
              "best_short_trial": finder.best_short_trial,
              "reasoning": finder.reasoning, "selection": []}
    if finder.recommended is None:
        report["chosen"] = contender.lr
        report["why"] = (f"every candidate diverged; using the default rate "
                         f"{contender.lr:g}")
        return contender.lr, report
    rec = finder.recommended
    candidates = [rec] + [float(r) for r in grid[::-1] if rec / 30 <= r < rec / 1.01]
    rng = np.random.default_rng(seed + 4)
    perm = rng.permutation(len(Xt))
    n_sel = max(1, int(round(SELECTION_FRACTION * len(Xt))))
    sel, fit = perm[:n_sel], perm[n_sel:]
    data = (Xt[fit], yt[fit], Xt[sel], yt[sel])
    fit_bs = bs if not isinstance(bs, int) else min(bs, len(fit))
    for lr in candidates:
        for p, p0 in zip(model.params, theta0):
            np.copyto(p, p0)
        r = train_one(contender, model, data, lr=lr, epochs=epochs, batch_size=fit_bs,
                      seed=seed, target_loss=target_loss, quiet=True)
        tail = r["curve"]["val_loss"][-max(1, epochs // 3):]   # the last third: less noise
        loss = math.inf if r["diverged"] else float(np.mean(tail))
        report["selection"].append({"lr": lr, "selection_loss": loss})
    for p, p0 in zip(model.params, theta0):
        np.copyto(p, p0)
    best = min(report["selection"], key=lambda e: e["selection_loss"])
    report["chosen"] = best["lr"]
    tried = ", ".join(f"{e['lr']:.3g}: {e['selection_loss']:.4f}"
                      for e in report["selection"])
    report["why"] = (f"trained {epochs} epochs on {len(fit)} of the {len(Xt)} training "
                     f"samples at the recommendation and the grid rates below it; mean "
                     f"loss over the last third of the epochs on the other {len(sel)} (lr: "
                     f"loss): {tried}; lowest at lr="
                     f"{best['lr']:.3g}")
    return best["lr"], report


def _initial_model(sizes, init_name, seed, Xt, yt, batch_size):
    """The one initialization every optimizer starts from, and a note on how it was made."""
    base = "glorot_uniform" if init_name == "calibrated" else init_name
    model = MLP(sizes, init=base, rng=seed)
    counts = np.bincount(yt, minlength=sizes[-1]).astype(np.float64)
    _init.softmax_bias(model.biases[-1], (counts + 1.0) / (counts.sum() + len(counts)))
    note = f"{base} weights, output bias = log class frequencies (softmax_bias)"
    if init_name == "calibrated":
        rng = np.random.default_rng(seed + 3)
        xb = Xt[rng.choice(len(Xt), size=min(len(Xt), max(batch_size, 128)), replace=False)]
        report = _init.calibrate(model.weights, lambda x: model.forward(x), xb,
                                 target_std=1.0)
        note = (f"glorot_uniform, then calibrated on one minibatch of {len(xb)}: each "
                f"layer's pre-activation std set to 1 (scales "
                f"{', '.join(f'{s:.3g}' for s in report.scales)})")
    return model, note


def run_demo(*, data: Optional[str] = None, optimizers=None, epochs: int = 30,
             batch_size: int = 32, batch_growth=None, lr=None, init: str = "he_normal",
             hidden=(64, 64), seed: int = 0, threads: Optional[int] = None,
             target_loss: float = 0.05, out: str = "ch8fast_out", plot: bool = True,
             quiet: bool = False, stream=None, distributed: bool = False,
             shard_state: bool = False, why: bool = True) -> dict:
    """Run the comparison; returns the result dict that is also written as JSON.

    ``distributed=True``: data-parallel over MPI.COMM_WORLD (run under ``mpirun``); every
    rank trains, rank 0 alone prints and writes files. ``shard_state`` shards the
    optimizer state across the ranks (ch8fast.distributed)."""
    import ch8fast
    stream = stream or sys.stdout
    dist_comm, rank, world = None, 0, 1
    if distributed:
        from ch8fast.distributed import get_comm, ranks_on_this_host
        dist_comm = get_comm()
        rank, world = dist_comm.Get_rank(), dist_comm.Get_size()
        if threads is None:               # share the cores of this host among its ranks
            threads = max(1, (os.cpu_count() or 1) // ranks_on_this_host(dist_comm))
        if rank != 0:
            quiet, plot = True, False
    def say(s=""):
        if rank == 0:                     # data parallel: rank 0 alone prints
            print(s, file=stream, flush=True)
    if threads is not None:
        ch8fast.set_num_threads(threads)
    names = list(OPTIMIZERS) if optimizers is None else list(optimizers)
    skipped = []
    if distributed:
        # (DataParallel updates one flat buffer: no per-array trust ratio, LAMB and LARS)
        skipped = [n for n in names
                   if getattr(ch8fast, OPTIMIZERS[n].cls_name).rule.trust_ratio]
        names = [n for n in names if n not in skipped]
    X, y, classes, desc = load_dataset(data)
    Xt, yt, Xv, yv = split_standardize(X, y, seed)
    if batch_size > len(Xt):
        batch_size = len(Xt)
    bs = batch_size if batch_growth is None else batch_size_schedule(
        batch_size, factor=batch_growth[0],
        every=batch_growth[1] or 5 * math.ceil(len(Xt) / batch_size),
        max_size=min(len(Xt), batch_growth[2] or len(Xt)))
    sizes = [X.shape[1], *hidden, len(classes)]
    model, init_note = _initial_model(sizes, init, seed, Xt, yt, batch_size)
    dist = None
    if distributed:
        dist = _Dist(dist_comm, model_on_arena(model), bool(shard_state))
    theta0 = [p.copy() for p in model.params]

    say(f"ch8fast demo: {desc}")
    say(f"  split {len(Xt)} train / {len(Xv)} validation (seed {seed}), features "
        f"standardized; MLP {'-'.join(map(str, sizes))} (ReLU, softmax), "
        f"{model.n_params():,} float32 parameters")
    say(f"  init: {init_note}")
    say(f"  {epochs} epochs, minibatch {bs!r}, same minibatch order for every optimizer; "
        f"{ch8fast.get_num_threads()} ch8fast thread(s)")
    if skipped:
        say(f"  not data parallel: {', '.join(skipped)} (a trust ratio per array; "
            f"DataParallel updates one flat buffer)")
    if dist is not None:
        say(f"  data parallel over {world} MPI rank(s): each takes 1/{world} of every "
            f"minibatch, one Allreduce averages the gradients"
            + ("; optimizer state sharded across the ranks (ZeRO-1), one Allgatherv per "
               "step" if shard_state else ""))

    results = []
    for name in names:
        c = OPTIMIZERS[name]
        for p, p0 in zip(model.params, theta0):
            np.copyto(p, p0)
        rate, finder = (c.lr if lr is None else lr), None
        if lr == "auto":
            rate, finder = _auto_lr(c, model, Xt, yt, batch_size=batch_size, bs=bs,
                                    epochs=epochs, seed=seed, target_loss=target_loss)
            say(f"--lr auto, {name}: ch8fast.choose_lr says:")
            for line in finder["reasoning"].splitlines():
                say(f"    {line}")
            say(f"  then {finder['why']}: {name} uses lr={rate:.3g}")
        r = train_one(c, model, (Xt, yt, Xv, yv), lr=float(rate), epochs=epochs,
                      batch_size=bs, seed=seed, target_loss=target_loss, quiet=quiet,
                      dist=dist)
        if finder is not None:
            r["lr_finder"] = finder
        results.append(r)

    table = format_table(results, target_loss)
    say()
    say(table)
    say()
    if dist is not None:
        for r in results:
            d = r["distributed"]
            say(f"  {r['optimizer']}: parameters identical on all {d['ranks']} ranks; "
                f"optimizer state per rank (bytes): {d['state_bytes_per_rank']}")
        say()
        if rank != 0:
            return {"results": results, "table": table, "paths": {}}
    why_data = None
    if why and dist is None:
        from . import why as why_module
        adam = next((r for r in results if r["optimizer"] == "adam"), None)
        why_data = why_module.run(model, adam, Xt, yt, ch8fast.get_num_threads(), say)
    os.makedirs(out, exist_ok=True)
    paths = write_outputs(results, out)
    summary = {
        "dataset": desc,
        "n_train": int(len(Xt)), "n_val": int(len(Xv)),
        "layers": sizes, "init": init_note, "epochs": epochs, "batch_size": repr(bs),
        "seed": seed, "target_loss": target_loss, "threads": ch8fast.get_num_threads(),
        "mpi_ranks": world if distributed else None,
        "results": results,
        "why": why_data,
    }
    with open(paths["json"], "w") as fh:
        json.dump(summary, fh, indent=1, default=_json_default)
    png = os.path.join(out, "demo_curves.png")
    if not plot:
        say("plot skipped (--no-plot)")
    elif plot_curves(results, png, target_loss):
        paths["png"] = png
        if why_data is not None and why_module.plot(why_data, os.path.join(out, "why.png")):
            paths["why_png"] = os.path.join(out, "why.png")
    else:
        say(f"matplotlib is not installed: the learning curves would have gone to {png} "
            f"(pip install matplotlib)")
    say(f"Wrote to {os.path.abspath(out)}/: " +
        ", ".join(os.path.basename(p) for p in paths.values()))
    summary["table"] = table
    summary["paths"] = paths
    return summary


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


# ---------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------

COLUMNS = [  # (header, result key, format)
    ("optimizer", "optimizer", "{}"),
    ("lr", "lr", "{:.3g}"),
    ("train loss", "final_train_loss", "{:.4f}"),
    ("train acc", "final_train_acc", "{:.3f}"),
    ("val loss", "final_val_loss", "{:.4f}"),
    ("val acc", "final_val_acc", "{:.3f}"),
    ("epochs to target", "epochs_to_target", "{}"),
    ("time s", "train_seconds", "{:.2f}"),
    ("step %", "step_share", "{:.0%}"),
]


def _cell(r, key, fmt):
    v = r[key]
    if v is None:
        return "-"
    if key == "step_share":
        return f"{100 * v:.0f}%"
    return fmt.format(v)


def format_table(results, target_loss):
    head = [h for h, _, _ in COLUMNS]
    rows = [[_cell(r, k, f) + (" (diverged)" if k == "optimizer" and r["diverged"] else "")
             for _, k, f in COLUMNS] for r in results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    def line(cells):
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    sep = "|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":"
                         for i, w in enumerate(widths)) + "|"
    notes = (f"epochs to target: first epoch whose training loss is <= {target_loss:g}. "
             f"time: training (forward, backward, step), evaluation excluded; "
             f"step %: share of that time in opt.step.")
    return "\n".join([line(head), sep] + [line(r) for r in rows] + ["", notes])


def write_outputs(results, out):
    paths = {"csv": os.path.join(out, "demo_results.csv"),
             "curves_csv": os.path.join(out, "demo_curves.csv"),
             "json": os.path.join(out, "demo_results.json")}
    keys = ["optimizer", "lr", "final_train_loss", "final_train_acc", "final_val_loss",
            "final_val_acc", "epochs_to_target", "train_seconds", "step_seconds",
            "step_share", "iterations", "diverged"]
    with open(paths["csv"], "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(keys)
        for r in results:
            w.writerow(["" if r[k] is None else r[k] for k in keys])
    with open(paths["curves_csv"], "w", newline="") as fh:
        w = csv.writer(fh)
        cols = list(results[0]["curve"]) if results else []
        w.writerow(["optimizer"] + cols)
        for r in results:
            for row in zip(*(r["curve"][k] for k in cols)):
                w.writerow([r["optimizer"], *row])
    return paths


def plot_curves(results, path, target_loss):
    """Learning curves against iterations and seconds; False without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(15, 4.6))
    axes = fig.subplots(1, 3)
    for r in results:
        c = r["curve"]
        color = COLORS.get(r["optimizer"], "k")
        rate = OPTIMIZERS[r["optimizer"]].describe_rate(r["lr"]) \
            if r["optimizer"] in OPTIMIZERS else f"{r['lr']:.3g}"
        axes[0].plot(c["iteration"], c["train_loss"], color=color, lw=1.4,
                     label=f"{r['label']}, lr {rate}")
        axes[1].plot(c["seconds"], c["train_loss"], color=color, lw=1.4)
        axes[2].plot(c["epoch"], c["val_loss"], color=color, lw=1.4)
    for ax, xl, t in zip(axes, ["iteration", "training time (s)", "epoch"],
                         ["training loss", "training loss against time",
                          "validation loss"]):
        ax.set_yscale("log")
        ax.set_xlabel(xl)
        ax.set_title(t)
        ax.grid(alpha=0.3, which="both")
    for ax in axes[:2]:
        ax.axhline(target_loss, color="gray", ls=":", lw=1)
    axes[0].set_ylabel("mean cross-entropy")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    return True


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------

def _positive_int(s):
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") \
            from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def _hidden(s):
    if s.strip().lower() in ("", "0", "none"):
        return ()
    try:
        sizes = tuple(int(v) for v in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer widths such as 64,64, got {s!r}") from None
    if min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"layer widths must be positive, got {s!r}")
    return sizes


def _optimizer_list(s):
    names = [v.strip() for v in s.split(",") if v.strip()]
    bad = [v for v in names if v not in OPTIMIZERS]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown optimizer(s) {', '.join(bad) or '(none given)'}; choose from "
            f"{', '.join(OPTIMIZERS)}")
    return names


def _lr(s):
    if s == "auto":
        return s
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {s!r}") \
            from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"the learning rate must be > 0, got {s!r}")
    return v


def _growth(s):
    parts = s.split(":")
    try:
        factor = float(parts[0])
        rest = [int(p) for p in parts[1:]]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected FACTOR[:EVERY[:MAX]], e.g. 2:200:512, got {s!r}") from None
    if len(rest) > 2 or factor < 1 or any(v < 1 for v in rest):
        raise argparse.ArgumentTypeError(
            f"expected FACTOR[:EVERY[:MAX]] with FACTOR >= 1 and positive integers, got "
            f"{s!r}")
    rest += [None] * (2 - len(rest))
    return (factor, rest[0], rest[1])


def _init_name(s):
    if s != "calibrated" and s not in INITIALIZERS:
        raise argparse.ArgumentTypeError(
            f"unknown initializer {s!r}; choose from {', '.join(INITIALIZERS)}, calibrated")
    return s


def add_arguments(p):
    """Add the options of ``ch8fast demo`` to the argparse parser ``p``; returns it."""
    p.add_argument("--data", metavar="FILE",
                   help="train on FILE.npz (arrays X, y) or FILE.csv (last column the "
                        "label) instead of the embedded digits")
    p.add_argument("--optimizers", type=_optimizer_list, default=None,
                   help=f"comma-separated subset of {','.join(OPTIMIZERS)} (default: all)")
    p.add_argument("--epochs", type=_positive_int, default=30, help="passes over the "
                   "training set (default 30)")
    p.add_argument("--batch-size", type=_positive_int, default=32,
                   help="minibatch size (default 32)")
    p.add_argument("--batch-growth", type=_growth, default=None, metavar="F[:EVERY[:MAX]]",
                   help="grow the minibatch by factor F every EVERY iterations (default: "
                        "5 epochs at the initial size) up to MAX (default: the training "
                        "set), as ch8fast.schedules.batch_size_schedule")
    p.add_argument("--lr", type=_lr, default=None,
                   help="initial learning rate for every optimizer, or 'auto' to pick "
                        "one per optimizer: ch8fast.choose_lr's short trials recommend a "
                        "rate, then the recommendation and the rates below it are tried "
                        "for the whole run on a held-out part of the training set "
                        "(default: a rate per optimizer; the SGD family decays it "
                        "linearly to 1%% over the run)")
    p.add_argument("--init", type=_init_name, default="he_normal",
                   help=f"weight initializer: {', '.join(INITIALIZERS)}, or calibrated "
                        f"(rescale on one minibatch with ch8fast.init.calibrate); "
                        f"default he_normal")
    p.add_argument("--hidden", type=_hidden, default=(64, 64),
                   help="hidden layer widths, e.g. 64,64 (default); 0 for none")
    p.add_argument("--target-loss", type=float, default=0.05,
                   help="training loss counted in 'epochs to target' (default 0.05)")
    p.add_argument("--seed", type=int, default=0, help="seed for split, init and "
                   "minibatches (default 0)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="ch8fast kernel threads (ch8fast.set_num_threads)")
    p.add_argument("--out", default="ch8fast_out", help="output folder (default "
                   "ch8fast_out)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--no-why", action="store_true",
                   help="skip the update's cost against in-place NumPy and torch.optim, "
                        "and the update-dominated training that shows what it costs")
    p.add_argument("--distributed", action="store_true",
                   help="data-parallel training over MPI (needs mpi4py); run as "
                        "`mpirun -n 2 ch8fast demo --distributed`: each rank takes its "
                        "share of every minibatch, rank 0 prints and writes the files")
    p.add_argument("--shard-state", action="store_true",
                   help="with --distributed: shard the optimizer state across the ranks "
                        "(ZeRO stage 1)")
    return p


def main(args, parser=None):
    """Run from parsed arguments; a bad --data file exits with status 2 and a message."""
    distributed = getattr(args, "distributed", False)
    shard = getattr(args, "shard_state", False)
    if shard and not distributed:
        msg = "--shard-state needs --distributed"
        if parser is not None:
            parser.error(msg)
        print(f"ch8fast demo: error: {msg}", file=sys.stderr)
        raise SystemExit(2)
    guard = contextlib.nullcontext()
    if distributed:
        try:
            from ch8fast.distributed import abort_on_error, get_comm
            get_comm()                         # mpi4py and an MPI library, or one line
            guard = abort_on_error()
        except ImportError as exc:
            print(f"ch8fast demo: error: --distributed: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
    try:
        with guard:
            run_demo(data=args.data, optimizers=args.optimizers, epochs=args.epochs,
                     batch_size=args.batch_size, batch_growth=args.batch_growth, lr=args.lr,
                     init=args.init, hidden=args.hidden, seed=args.seed,
                     threads=args.threads, target_loss=args.target_loss, out=args.out,
                     plot=not args.no_plot, quiet=args.quiet, distributed=distributed,
                     shard_state=shard, why=not getattr(args, "no_why", False))
    except DataError as exc:
        if parser is not None:
            parser.error(f"--data {exc}")
        print(f"ch8fast demo: error: --data {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return 0
