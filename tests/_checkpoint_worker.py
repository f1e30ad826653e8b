"""Scenarios for the checkpoint tests, importable and runnable as a separate process.

``python _checkpoint_worker.py resume DIR``: for every scenario of ``scenarios()``, make a
fresh optimizer over fresh (zero) parameters and a sampler with another seed, load
``DIR/<id>.npz``, train N more steps, and print one JSON line per scenario with the sha256
of every parameter and state byte.

``python _checkpoint_worker.py saveloop PATH``: save a ~30 MB checkpoint to PATH over and
over (each one self-consistent: every element equals the iteration number), printing
``ready`` once and ``saved <k>`` after each save; the test kills it at random moments.
"""

import hashlib
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ch8fast  # noqa: E402
from ch8fast import schedules as S  # noqa: E402
from ch8fast.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402

N_STEPS = 6
N_SAMPLES = 40
# The big parameter is large enough (> 128 KiB in float32) to run on 2 threads.
SHAPES = [(48, 800), (7,), (0,), (1,), (2, 3)]


def _lr():
    return S.warmup(S.linear_decay(0.05, 10), warmup_steps=3, init_value=0.01)


OPTIMIZERS = {
    "sgd": lambda p: ch8fast.SGD(p, lr=_lr(), weight_decay=0.01),
    "momentum": lambda p: ch8fast.SGD(p, lr=_lr(), momentum=S.momentum_ramp(0.5, 0.9, 8)),
    "nesterov": lambda p: ch8fast.SGD(p, lr=_lr(), momentum=S.momentum_ramp(0.5, 0.9, 8),
                                      nesterov=True),
    "adagrad": lambda p: ch8fast.AdaGrad(p, lr=_lr(), initial_accumulator_value=0.1),
    "rmsprop": lambda p: ch8fast.RMSProp(p, lr=_lr(), momentum=S.momentum_ramp(0.5, 0.9, 8),
                                         nesterov=True, weight_decay=0.01),
    "adam": lambda p: ch8fast.Adam(p, lr=_lr(), amsgrad=True),
    "adamw": lambda p: ch8fast.AdamW(p, lr=_lr()),
    "adadelta": lambda p: ch8fast.AdaDelta(p, lr=S.exponential_decay(1.0, 0.9)),
    "groups": lambda p: ch8fast.Adam([{"params": p[:2], "lr": _lr()},
                                      {"params": p[2:], "lr": 0.02, "betas": (0.5, 0.9)}]),
}


def scenarios():
    """(id, optimizer name, dtype name, threads)."""
    return [(f"{name}-{dt}-{nt}t", name, dt, nt)
            for name in OPTIMIZERS for dt in ("float32", "float64") for nt in (1, 2)]


def problem(dtype, seed=0):
    """Initial parameters and the data that the gradients are drawn from."""
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    data = [rng.standard_normal((N_SAMPLES,) + s).astype(dtype) for s in SHAPES]
    return params, data


def sampler(seed):
    return S.minibatches(N_SAMPLES, S.batch_size_schedule(3, factor=2, every=2, max_size=16),
                         rng=seed)


def gradients(params, data, idx):
    """A gradient that depends on the parameters and on the minibatch: theta - mean(x)."""
    return [(p - d[idx].mean(axis=0).astype(p.dtype)) if p.size else np.zeros_like(p)
            for p, d in zip(params, data)]


def train(opt, params, data, smp, n):
    for _ in range(n):
        opt.step(gradients(params, data, next(smp)))


def digest(opt, params):
    h = hashlib.sha256()
    for p in params:
        h.update(p.tobytes())
    for st in opt.state:
        for k in sorted(st):
            h.update(st[k].tobytes())
    h.update(json.dumps([g["step"] for g in opt.state_dict()["param_groups"]]).encode())
    return h.hexdigest()


def resume(folder):
    for sid, name, dt, nt in scenarios():
        ch8fast.set_num_threads(nt)
        _, data = problem(dt)
        params = [np.zeros(s, dtype=dt) for s in SHAPES]
        opt = OPTIMIZERS[name](params)
        smp = sampler(seed=12345)                  # its state comes from the checkpoint
        extra = load_checkpoint(os.path.join(folder, sid + ".npz"), opt, params)
        smp.load_state_dict(extra["sampler"])
        train(opt, params, data, smp, N_STEPS)
        print(json.dumps({"id": sid, "digest": digest(opt, params)}), flush=True)


SAVELOOP_SIZE = 2_500_000          # float32: 10 MB per array, 3 arrays


def saveloop_optimizer():
    params = [np.zeros(SAVELOOP_SIZE, dtype=np.float32), np.zeros(5)]
    return ch8fast.SGD(params, lr=0.1, momentum=0.9), params


def saveloop(path):
    opt, params = saveloop_optimizer()
    print("ready", flush=True)
    k = 0
    while True:
        k += 1
        for p, st in zip(params, opt.state):
            p.fill(k)
            st["velocity"].fill(-k)
        save_checkpoint(path, opt, params, extra={"iteration": k})
        print(f"saved {k}", flush=True)


if __name__ == "__main__":
    mode, arg = sys.argv[1], sys.argv[2]
    {"resume": resume, "saveloop": saveloop}[mode](arg)
