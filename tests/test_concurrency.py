"""Python threads stepping different optimizers at once (the kernels release the GIL) give
exactly the sequential results; long runs do not grow memory."""

import gc
import threading
import time
import tracemalloc

import numpy as np
import pytest

import ch8fast
from ch8fast import schedules as S
from ch8fast.checkpoint import load_checkpoint, save_checkpoint

N = 1_500_000            # elements per parameter: several ms per kernel call


def _jobs(seed=0):
    """Four independent problems: (optimizer factory, parameters, gradients)."""
    rng = np.random.default_rng(seed)
    makers = [
        lambda p: ch8fast.Adam(p, lr=S.linear_decay(0.01, 20), amsgrad=True),
        lambda p: ch8fast.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
        lambda p: ch8fast.RMSProp(p, lr=0.01, momentum=0.5),
        lambda p: ch8fast.AdaDelta(p, weight_decay=0.01),
    ]
    jobs = []
    for k, make in enumerate(makers):
        dtype = np.float32 if k % 2 else np.float64
        params = [rng.standard_normal(N).astype(dtype), rng.standard_normal(7).astype(dtype)]
        grads = [[rng.standard_normal(p.shape).astype(dtype) for p in params]
                 for _ in range(2)]
        jobs.append((make, params, grads))
    return jobs


def _result(opt, params):
    return [p.tobytes() for p in params] + [a.tobytes() for st in opt.state
                                            for a in st.values()]


N_STEPS = 8


@pytest.mark.parametrize("kernel_threads", [1, 2])
def test_threads_stepping_different_optimizers_match_sequential(kernel_threads):
    before = ch8fast.get_num_threads()
    ch8fast.set_num_threads(kernel_threads)
    try:
        jobs = _jobs()
        sequential = []
        for make, params, grads in jobs:
            ps = [p.copy() for p in params]
            opt = make(ps)
            for k in range(N_STEPS):
                opt.step(grads[k % 2])
            sequential.append(_result(opt, ps))

        copies = [[p.copy() for p in params] for _, params, _ in jobs]
        opts = [make(ps) for (make, _, _), ps in zip(jobs, copies)]
        barrier = threading.Barrier(len(jobs))
        spans = [[] for _ in jobs]
        errors = []

        def work(i):
            try:
                grads = jobs[i][2]
                barrier.wait()
                for k in range(N_STEPS):
                    t0 = time.perf_counter()
                    opts[i].step(grads[k % 2])
                    spans[i].append((t0, time.perf_counter()))
            except BaseException as e:     # reported in the main thread
                errors.append(e)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        for i, (opt, ps) in enumerate(zip(opts, copies)):
            assert _result(opt, ps) == sequential[i], f"job {i} differs"
        # The steps of different threads did run at the same time.
        overlaps = sum(a0 < b1 and b0 < a1
                       for i in range(len(jobs)) for j in range(i + 1, len(jobs))
                       for a0, a1 in spans[i] for b0, b1 in spans[j])
        assert overlaps > 0
    finally:
        ch8fast.set_num_threads(0)
    assert ch8fast.get_num_threads() == before


def test_one_optimizer_per_thread_with_shared_gradients_read_only():
    """Gradients are only read: two threads may step two optimizers with the same
    (read-only) gradient arrays."""
    rng = np.random.default_rng(5)
    g = rng.standard_normal(N)
    g.flags.writeable = False
    a, b = np.zeros(N), np.zeros(N)
    oa, ob = ch8fast.Adam([a], lr=0.1), ch8fast.Adam([b], lr=0.1)
    ts = [threading.Thread(target=lambda o=o: [o.step(g) for _ in range(5)]) for o in (oa, ob)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert a.tobytes() == b.tobytes()
    ref = np.zeros(N)
    oref = ch8fast.Adam([ref], lr=0.1)
    for _ in range(5):
        oref.step(g)
    assert a.tobytes() == ref.tobytes()


def _rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


def test_long_run_does_not_grow_memory():
    """100,000 small steps (three optimizers, schedules, two dtypes, param groups): the
    Python heap (tracemalloc) and the resident set (VmRSS) stay flat."""
    rng = np.random.default_rng(0)
    ps32 = [rng.standard_normal(s).astype(np.float32) for s in ((8,), (3, 2), (0,))]
    ps64 = [rng.standard_normal(s) for s in ((5,), (1,))]
    opts = [
        (ch8fast.Adam([{"params": ps32}, {"params": ps64, "lr": 1e-4}],
                      lr=S.cosine_decay(1e-3, 50_000)), ps32 + ps64),
        (ch8fast.SGD(ps64, lr=S.inverse_time(0.01, 100), momentum=S.momentum_ramp(),
                     nesterov=True), ps64),
        (ch8fast.AdaGrad(ps32, lr=0.01), ps32),
    ]
    grads = [[np.full_like(p, 0.01) for p in params] for _, params in opts]
    for _ in range(2000):                      # warm up caches and allocator pools
        for (opt, _), g in zip(opts, grads):
            opt.step(g)
    gc.collect()
    tracemalloc.start()
    try:
        heap0 = tracemalloc.get_traced_memory()[0]
        rss0 = _rss_kib()
        steps = 0
        while steps < 100_000:
            for (opt, _), g in zip(opts, grads):
                opt.step(g)
                steps += 1
        gc.collect()
        heap1 = tracemalloc.get_traced_memory()[0]
        rss1 = _rss_kib()
    finally:
        tracemalloc.stop()
    print(f"\n{steps} steps: Python heap {heap1 - heap0:+d} B, RSS {rss1 - rss0:+d} KiB")
    assert heap1 - heap0 < 64 * 1024
    if rss0 is not None:
        assert rss1 - rss0 < 4 * 1024


def test_repeated_checkpoints_do_not_grow_memory(tmp_path):
    rng = np.random.default_rng(1)
    params = [rng.standard_normal(20_000), rng.standard_normal(7).astype(np.float32)]
    opt = ch8fast.Adam(params, lr=S.linear_decay(0.01, 100))
    g = [np.ones_like(p) for p in params]
    path = tmp_path / "c.npz"

    def cycle():
        opt.step(g)
        save_checkpoint(path, opt, params, extra={"k": 1})
        load_checkpoint(path, opt, params)
        opt.load_state_dict(opt.state_dict())

    for _ in range(30):
        cycle()
    gc.collect()
    tracemalloc.start()
    try:
        heap0 = tracemalloc.get_traced_memory()[0]
        rss0 = _rss_kib()
        for _ in range(100):
            cycle()
        gc.collect()
        heap1 = tracemalloc.get_traced_memory()[0]
        rss1 = _rss_kib()
    finally:
        tracemalloc.stop()
    print(f"\n100 save/load cycles: Python heap {heap1 - heap0:+d} B, "
          f"RSS {rss1 - rss0:+d} KiB")
    assert heap1 - heap0 < 64 * 1024
    if rss0 is not None:
        assert rss1 - rss0 < 8 * 1024
