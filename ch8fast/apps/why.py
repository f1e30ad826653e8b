"""Why ch8fast: what one optimizer update costs, and what that cost does to training.

Two measurements, printed by ``ch8fast demo`` after its table (``--no-why`` skips them):

1. **The demo's own model.** One Adam update of its arrays, timed with ch8fast, with the
   same formulas in in-place NumPy (``out=`` and two preallocated temporaries, the
   benchmark's NumPy peer) and, when torch is installed, with ``torch.optim.Adam``
   (fused and foreach) over tensors that share the arrays' memory. Every contender is
   timed round-robin in the same rounds; the share of a training iteration each would
   take uses the demo's measured forward and backward time. Then the optimizer state
   each storage keeps, in bytes per parameter, measured on the optimizer's arrays.
2. **Where the update dominates.** A wide network trained with small minibatches: the
   forward and backward passes cost about 6 x batch floating-point operations per
   parameter, which BLAS runs fast, while an update streams every parameter and its
   state through memory whatever the batch; with 8 examples a step, the update is most of
   an iteration for a NumPy optimizer. Each contender trains the same network from the
   same start on the same minibatches (the same formulas, so the same losses to
   rounding); the time to a target training loss shows what the update's cost does to
   training.
"""

import time

import numpy as np

from .bench.peers import NumpyOptimizer, import_torch
from .bench.timing import measure
from .mlp import MLP

LR = 1e-3                     # Adam's default; NumpyOptimizer("adam") uses the same
WIDE = (1024, 1024)           # the update-dominated network's hidden layers
WIDE_BATCH = 8
WIDE_STEPS = 240
WIDE_TARGET = 0.5             # training loss (mean cross-entropy on a fixed subset)
EVAL_EVERY = 20
RUNS = 2                      # training runs of each contender (the faster one is kept)
SETTLE = 0.3                  # seconds of rest before each run: the thread pools of the
                              # run before (BLAS's, torch's, ours) stop spinning


def _steppers(params, grads, threads, which):
    """name -> (zero-argument Adam step over ``params`` reading ``grads``, label)."""
    import ch8fast
    out = {}
    if "ch8fast" in which:
        opt = ch8fast.Adam(params, lr=LR)
        out["ch8fast"] = (lambda: opt.step(grads), "ch8fast.Adam")
    if "numpy" in which:
        npopt = NumpyOptimizer("adam", params)
        out["numpy"] = (lambda: npopt.step(grads), "NumPy, in place")
    torch = import_torch() if {"torch fused", "torch foreach"} & set(which) else None
    if torch is not None:
        torch.set_num_threads(threads)
        for impl in ("fused", "foreach"):
            if f"torch {impl}" not in which:
                continue
            ts = [torch.from_numpy(p) for p in params]
            for t, g in zip(ts, grads):
                t.grad = torch.from_numpy(g)
            topt = torch.optim.Adam(ts, lr=LR, **{impl: True})
            out[f"torch {impl}"] = (topt.step, f"torch.optim.Adam({impl}=True)")
    return out


CONTENDERS = ("ch8fast", "numpy", "torch fused", "torch foreach")


def update_cost(shapes, threads, rounds=15, seed=0):
    """Seconds per Adam update over arrays of ``shapes`` (float32), by contender, timed
    round-robin: ``{name: (seconds, label)}``."""
    rng = np.random.default_rng(seed)
    sets = {}
    for name in CONTENDERS:
        params = [rng.standard_normal(s).astype(np.float32) * 0.1 for s in shapes]
        grads = [rng.standard_normal(s).astype(np.float32) * 0.01 for s in shapes]
        sets.update({n: v for n, v in _steppers(params, grads, threads, (name,)).items()})
    for fn, _ in sets.values():
        fn()                                       # state allocated and written
    samples, _ = measure({n: fn for n, (fn, _) in sets.items()}, rounds, 2e-3)
    return {n: (float(np.median(samples[n])), sets[n][1]) for n in sets}


def state_bytes(shapes):
    """Bytes of Adam's state per parameter for each state format (measured on the arrays
    of an optimizer that has taken a step)."""
    import ch8fast
    n = sum(int(np.prod(s)) for s in shapes)
    out = {}
    for fmt in ("float32", "bfloat16", "q8"):
        params = [np.zeros(s, np.float32) for s in shapes]
        opt = ch8fast.Adam(params, lr=LR, state_format=fmt)
        opt.step([np.ones(s, np.float32) for s in shapes])
        out[fmt] = sum(np.asarray(a).nbytes for i in range(len(params))
                       for a in opt.state[i].values()) / n
    return out


def _one_blas_thread():
    """A context in which NumPy's BLAS runs on one thread (threadpoolctl), and whether it
    could be limited. With minibatches of 8 a threaded product gains nothing, and
    OpenBLAS's threads spin for a while after each product, taking the cores that the
    update's own threads need next (measured on 2 cores: ch8fast's update of the wide
    network 4.9 ms after a threaded product, 0.25 ms after a single-threaded one)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        import contextlib
        return contextlib.nullcontext(), False
    return threadpool_limits(1, user_api="blas"), True


def time_to_target(Xt, yt, threads, seed=0, steps=WIDE_STEPS, which=CONTENDERS):
    """Train the wide network with each contender from the same start on the same
    minibatches, NumPy's BLAS on one thread; returns ``{name: result}``, the network's
    description and whether BLAS could be limited to one thread."""
    limit, limited = _one_blas_thread()
    with limit:
        results, desc = _train_each(Xt, yt, threads, seed, steps, which)
    return results, desc, limited


def _train_each(Xt, yt, threads, seed, steps, which):
    rng = np.random.default_rng(seed + 7)
    batches = [rng.choice(len(Xt), WIDE_BATCH, replace=False) for _ in range(steps)]
    ev = rng.choice(len(Xt), min(len(Xt), 512), replace=False)
    sizes = [Xt.shape[1], *WIDE, int(yt.max()) + 1]
    model = MLP(sizes, init="he_normal", rng=seed)
    theta0 = [p.copy() for p in model.params]
    results = {}
    # Each contender trains twice, the contenders in turn, and keeps its faster run: a
    # shared machine disturbs a run now and then (a thread descheduled for a time slice),
    # and the two runs compute the same numbers.
    for _ in range(RUNS):
        for name in which:
            time.sleep(SETTLE)
            r = _train(model, theta0, Xt, yt, batches, ev, threads, name)
            if r is not None and (name not in results
                                  or r["seconds"] < results[name]["seconds"]):
                results[name] = r
    desc = (f"MLP {'-'.join(map(str, sizes))} ({model.n_params():,} float32 parameters), "
            f"minibatches of {WIDE_BATCH}, Adam lr {LR:g}, {steps} steps")
    return results, desc


def _train(model, theta0, Xt, yt, batches, ev, threads, name):
    """One training run of the wide network with contender ``name`` (None where it is
    not available)."""
    for p, p0 in zip(model.params, theta0):
        np.copyto(p, p0)
    steppers = _steppers(model.params, model.grads, threads, (name,))
    if name not in steppers:
        return None
    step, label = steppers[name]
    train = update = 0.0
    curve, reached = [], None
    for k, idx in enumerate(batches, 1):
        t0 = time.perf_counter()
        model.loss_and_grad(Xt[idx], yt[idx])
        t1 = time.perf_counter()
        step()
        t2 = time.perf_counter()
        train += t2 - t0
        update += t2 - t1
        if k % EVAL_EVERY == 0:
            loss = model.loss(Xt[ev], yt[ev])
            curve.append((k, train, loss))
            if reached is None and loss <= WIDE_TARGET:
                reached = (k, train)
    return {"label": label, "seconds": train, "update_seconds": update,
            "update_share": update / train, "steps": len(batches), "curve": curve,
            "steps_to_target": reached[0] if reached else None,
            "seconds_to_target": reached[1] if reached else None}


def run(model, adam_result, Xt, yt, threads, say, which=CONTENDERS):
    """Both measurements, printed through ``say``; returns them as a JSON-able dict."""
    shapes = [p.shape for p in model.params]
    n = model.n_params()
    cost = update_cost(shapes, threads)
    base = cost["ch8fast"][0]
    rest = None
    if adam_result is not None and adam_result["iterations"]:
        it = adam_result["iterations"]
        rest = (adam_result["train_seconds"] - adam_result["step_seconds"]) / it
    say(f"Why ch8fast: one Adam update of this model ({n:,} parameters in {len(shapes)} "
        f"arrays, {threads} thread(s)), median of interleaved rounds:")
    head = "| update | us / step | x ch8fast's time | share of a training iteration |"
    say(head)
    say("|---|---:|---:|---:|")
    rows = []
    for name, (sec, label) in cost.items():
        share = sec / (rest + sec) if rest is not None else None
        rows.append({"contender": name, "label": label, "seconds": sec,
                     "x_ch8fast": sec / base, "share_of_iteration": share})
        say(f"| {label} | {sec * 1e6:.1f} | {sec / base:.1f} | "
            f"{'-' if share is None else f'{share:.0%}'} |")
    if rest is not None:
        say(f"  (forward and backward: {rest * 1e6:.0f} us per iteration, measured in the "
            f"Adam run above)")
    if import_torch() is None:
        say("  (torch is not installed: pip install torch adds torch.optim's rows)")
    sb = state_bytes(shapes)
    say("Adam's optimizer state, bytes per parameter: " + ", ".join(
        f"{k} {v:.2f}" for k, v in sb.items()) + " (state_format=...)")
    say()
    train, desc, limited = time_to_target(Xt, yt, threads, which=which)
    say(f"Where the update dominates: {desc}, the same minibatches for each; time of the "
        f"forward, backward and update passes, the faster of {RUNS} runs each, in turn ("
        + ("NumPy's BLAS on one thread: with 8 examples its threads gain nothing, and "
           "spinning after each product they would take the cores the update needs"
           if limited else "pip install threadpoolctl to keep BLAS's threads from "
                           "competing with the update's") + "):")
    say("| update | s to train loss <= "
        f"{WIDE_TARGET:g} | steps | s for all steps | update share | x ch8fast's time |")
    say("|---|---:|---:|---:|---:|---:|")
    b = train["ch8fast"]["seconds"]
    for name, r in train.items():
        tt = r["seconds_to_target"]
        say(f"| {r['label']} | {'-' if tt is None else f'{tt:.2f}'} | "
            f"{r['steps_to_target'] or '-'} | {r['seconds']:.2f} | "
            f"{r['update_share']:.0%} | {r['seconds'] / b:.1f} |")
    say()
    return {"update_cost": rows, "forward_backward_seconds": rest,
            "state_bytes_per_parameter": sb,
            "update_dominated": {"model": desc, "target_loss": WIDE_TARGET,
                                 "blas_one_thread": limited, "results": train}}


def plot(why, path):
    """Three panels: the update's cost on the demo's model, the state's bytes per
    parameter of each storage, and the training of the update-dominated network against
    time; False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (a, c, b) = plt.subplots(1, 3, figsize=(15, 3.8),
                                  gridspec_kw={"width_ratios": [3, 1.4, 3]})
    rows = why["update_cost"]
    a.barh([r["label"] for r in rows], [r["seconds"] * 1e6 for r in rows], color="C0")
    a.set_xscale("log")
    a.set_xlabel("microseconds per Adam update (log)")
    a.set_title("one update of the demo's model")
    a.invert_yaxis()
    sb = why["state_bytes_per_parameter"]
    c.bar(list(sb), list(sb.values()), color="C2")
    for i, v in enumerate(sb.values()):
        c.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=9)
    c.set_ylabel("bytes per parameter")
    c.set_title("Adam's state, by state_format")
    res = why["update_dominated"]["results"]
    for i, r in enumerate(res.values()):
        ks, ts, ls = zip(*r["curve"]) if r["curve"] else ((), (), ())
        b.plot(ts, ls, label=r["label"], color=f"C{i}")
    b.axhline(why["update_dominated"]["target_loss"], color="k", ls=":", lw=1)
    b.set_xlabel("seconds of training (forward, backward, update)")
    b.set_ylabel("training loss")
    b.set_title(f"wide network, minibatches of {WIDE_BATCH}")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
