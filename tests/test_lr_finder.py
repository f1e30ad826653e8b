"""choose_lr on problems whose stable range of learning rates is known in closed form."""
import math
import sys

import numpy as np
import pytest

import ch8fast
from ch8fast.lr_finder import LRFinderResult, choose_lr, default_lr_grid
from ch8fast.schedules import minibatches
from conftest import scripted_lr_trials


class PlainSGD:
    """The optimizer interface choose_lr drives, written out in NumPy (Algorithm 8.1)."""

    def __init__(self, params, lr, momentum=0.0):
        self.params, self.lr, self.momentum = params, lr, momentum
        self.v = [np.zeros_like(p) for p in params]

    def step(self, grads):
        for p, v, g in zip(self.params, self.v, grads):
            v *= self.momentum
            v -= self.lr * g
            p += v


def quadratic(eigs, seed=0):
    """0.5 x^T A x with A = Q diag(eigs) Q^T; gradient descent is stable iff lr < 2 / max(eigs)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((len(eigs), len(eigs))))
    a = (q * np.asarray(eigs, dtype=float)) @ q.T
    a = 0.5 * (a + a.T)

    def loss_and_grad(params):
        x = params[0]
        ax = a @ x
        return 0.5 * float(x @ ax), [ax]

    x0 = rng.standard_normal(len(eigs))
    return a, loss_and_grad, x0


EIGS = np.linspace(0.5, 4.0, 8)  # L = 4, stable iff lr < 0.5
LIMIT = 2.0 / EIGS.max()


@pytest.fixture(params=["ch8fast.SGD", "PlainSGD"])
def optimizer(request):
    return ch8fast.SGD if request.param == "ch8fast.SGD" else PlainSGD


def test_default_grid():
    g = default_lr_grid()
    assert len(g) == 21 and g[0] == pytest.approx(1e-5) and g[-1] == pytest.approx(1.0)
    assert np.allclose(np.diff(np.log10(g)), 0.25)


def test_quadratic_default_grid(optimizer):
    _, lg, x0 = quadratic(EIGS)
    x = x0.copy()
    res = choose_lr([x], lg, optimizer=optimizer)
    assert isinstance(res, LRFinderResult)
    assert np.array_equal(x, x0)
    # every rate above 2/L diverges, every rate comfortably below does not
    assert np.all(res.diverged[res.lrs > LIMIT])
    assert not np.any(res.diverged[res.lrs < 0.9 * LIMIT])
    assert 0 < res.best_short_trial < LIMIT
    assert res.best_short_trial <= res.recommended < LIMIT
    assert res.recommended < res.lrs[res.diverged].min()
    higher_ok = res.lrs[(res.lrs > res.best_short_trial) & ~res.diverged]
    if higher_ok.size:
        assert res.recommended > res.best_short_trial
    assert len(res.curves) == len(res.lrs)
    assert all(len(c) == 101 for c, d in zip(res.curves, res.diverged) if not d)
    assert "Recommended initial learning rate" in res.reasoning


def test_recommendation_strictly_higher_than_best(optimizer):
    _, lg, x0 = quadratic(EIGS)
    lrs = [0.01, 0.05, 0.2, 0.3, 0.44, 0.48, 0.7, 1.0]
    x = x0.copy()
    res = choose_lr([x], lg, optimizer=optimizer, lrs=lrs, iters=100)
    assert np.array_equal(x, x0)
    assert list(res.diverged) == [False] * 6 + [True] * 2
    # 2/(L + mu) = 0.444 is the best fixed rate for this quadratic
    assert res.best_short_trial == pytest.approx(0.44)
    assert res.best_short_trial < res.recommended < LIMIT
    assert res.recommended == pytest.approx(0.48)  # next candidate; below sqrt(0.44 * 0.7)


def test_geometric_mean_cap_on_uneven_grid():
    _, lg, x0 = quadratic(EIGS)
    # best 0.44, next stable candidate 0.49, smallest diverged 0.52: cap sqrt(.44*.52) = 0.478
    res = choose_lr([x0.copy()], lg, optimizer=PlainSGD, lrs=[0.1, 0.44, 0.49, 0.52, 1.0])
    assert list(res.diverged) == [False, False, False, True, True]
    assert res.best_short_trial == pytest.approx(0.44)
    assert res.recommended == pytest.approx(np.sqrt(0.44 * 0.52))
    assert "cap" in res.reasoning


def test_next_candidate_diverged_recommends_best_without_refinement():
    _, lg, x0 = quadratic(EIGS)
    res = choose_lr([x0.copy()], lg, optimizer=PlainSGD, lrs=[0.01, 0.1, 0.4, 0.8],
                    refine=0)
    assert list(res.diverged) == [False, False, False, True]
    assert res.best_short_trial == res.recommended == pytest.approx(0.4)
    assert "finer grid" in res.reasoning


def test_next_candidate_diverged_probes_between():
    """0.8 diverges (2/L = 0.5): the probe sqrt(0.4 * 0.8) = 0.566 diverges too, the next,
    sqrt(0.4 * 0.566) = 0.476, does not, and it is recommended: higher than the best
    short-trial rate and inside the stable range."""
    _, lg, x0 = quadratic(EIGS)
    res = choose_lr([x0.copy()], lg, optimizer=PlainSGD, lrs=[0.01, 0.1, 0.4, 0.8], refine=2)
    assert len(res.lrs) == 6 and list(res.lrs) == sorted(res.lrs)
    probe1, probe2 = math.sqrt(0.4 * 0.8), math.sqrt(0.4 * math.sqrt(0.4 * 0.8))
    assert res.diverged[list(res.lrs).index(probe1)]
    assert not res.diverged[list(res.lrs).index(probe2)]
    assert res.best_short_trial < res.recommended < 2 / max(EIGS)
    assert "Probed" in res.reasoning


def test_largest_candidate_best():
    _, lg, x0 = quadratic(EIGS)
    res = choose_lr([x0.copy()], lg, optimizer=PlainSGD, lrs=[0.001, 0.01, 0.1], refine=0)
    assert not res.diverged.any()
    assert res.recommended == res.best_short_trial == pytest.approx(0.1)
    assert "extend the grid" in res.reasoning


def test_largest_candidate_best_probes_above():
    _, lg, x0 = quadratic(EIGS)
    res = choose_lr([x0.copy()], lg, optimizer=PlainSGD, lrs=[0.001, 0.01, 0.1])
    assert 1.0 in list(res.lrs) and res.diverged[list(res.lrs).index(1.0)]   # 10x: beyond 2/L
    assert res.best_short_trial < res.recommended < 2 / max(EIGS)


def test_all_diverged():
    _, lg, x0 = quadratic(EIGS)
    res = choose_lr([x0.copy()], lg, optimizer=PlainSGD, lrs=[2.0, 5.0, 50.0])
    assert res.diverged.all() and res.recommended is None and res.best_short_trial is None
    assert "Every candidate diverged" in res.reasoning


def test_momentum_kwargs_change_the_stable_range():
    # heavy ball on a quadratic is stable iff lr < 2 (1 + alpha) / L
    _, lg, x0 = quadratic(EIGS)
    limit = 2 * (1 + 0.5) / EIGS.max()  # 0.75
    lrs = [0.3, 0.6, 0.7, 0.9, 1.6]
    for opt in (PlainSGD, ch8fast.SGD):
        res = choose_lr([x0.copy()], lg, optimizer=opt, lrs=lrs, momentum=0.5)
        assert list(res.diverged) == [False, False, False, True, True]
        assert res.best_short_trial <= res.recommended < limit


def test_params_restored_bit_for_bit_several_arrays(optimizer):
    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, 3))
    b = rng.standard_normal(3).astype(np.float32)
    w0, b0 = w.copy(), b.copy()
    target = rng.standard_normal(3)

    def lg(params):
        w, b = params
        r = w.sum(axis=0) + b - target
        return 0.5 * float(r @ r), [np.broadcast_to(r, w.shape).copy(), r.astype(np.float32)]

    res = choose_lr([w, b], lg, optimizer=optimizer, lrs=[1e-3, 1e-2, 0.1, 10.0], iters=20)
    assert w.tobytes() == w0.tobytes() and b.tobytes() == b0.tobytes()
    assert res.diverged[-1]


def test_params_restored_when_loss_raises():
    _, lg, x0 = quadratic(EIGS)
    x = x0.copy()
    calls = []

    def failing(params):
        calls.append(1)
        if len(calls) == 150:  # in the second trial, after params have moved
            raise RuntimeError("boom")
        return lg(params)

    with pytest.raises(RuntimeError, match="boom"):
        choose_lr([x], failing, optimizer=PlainSGD, lrs=[0.1, 0.2])
    assert x.tobytes() == x0.tobytes()


def test_noisy_minibatch_regression_is_not_called_diverged():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((512, 5))
    y = X @ rng.standard_normal(5) + 0.3 * rng.standard_normal(512)
    w = np.zeros(5)
    batches = minibatches(512, 16, rng=1)
    # the Hessian of the full cost is X^T X / n ~ I: stable up to lr ~ 2 / lambda_max

    def lg(params):
        idx = next(batches)
        r = X[idx] @ params[0] - y[idx]
        return 0.5 * float(r @ r) / len(idx), [X[idx].T @ r / len(idx)]

    lam = np.linalg.eigvalsh(X.T @ X / 512).max()
    res = choose_lr([w], lg, optimizer=PlainSGD, lrs=[0.003, 0.01, 0.03, 0.1, 0.3, 3.0])
    assert not res.diverged[:4].any() and res.diverged[-1]
    assert res.recommended < 2 / lam
    assert np.array_equal(w, np.zeros(5))


BAD = [
    (dict(params=np.zeros(3)), TypeError, "list"),
    (dict(params=[]), ValueError, "empty"),
    (dict(params=[np.zeros(3, dtype=int)]), TypeError, "floating"),
    (dict(lrs=[0.1]), ValueError, "lrs"),
    (dict(lrs=[0.1, -0.1]), ValueError, "lrs"),
    (dict(lrs=[0.1, float("nan")]), ValueError, "lrs"),
    (dict(iters=0), ValueError, "iters"),
    (dict(blowup=1.0), ValueError, "blowup"),
    (dict(rise=0.5), ValueError, "rise"),
    (dict(lr=0.1), TypeError, "lr"),
]


@pytest.mark.parametrize("kwargs, exc, match", BAD)
def test_bad_arguments(kwargs, exc, match):
    _, lg, x0 = quadratic(EIGS)
    kwargs = dict(kwargs)
    params = kwargs.pop("params", [x0.copy()])
    with pytest.raises(exc, match=match):
        choose_lr(params, lg, optimizer=PlainSGD, **kwargs)


def test_plot_without_matplotlib_raises_import_error(monkeypatch):
    _, lg, x0 = quadratic(EIGS)
    res = choose_lr([x0.copy()], lg, optimizer=PlainSGD, lrs=[0.1, 0.4, 1.0], iters=10)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        res.plot("unused.png")


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    _, lg, x0 = quadratic(EIGS)
    res = choose_lr([x0.copy()], lg, optimizer=PlainSGD, lrs=[0.1, 0.4, 1.0], iters=10)
    path = tmp_path / "lr.png"
    res.plot(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_slow_rise_is_diverged_without_blowing_up():
    # lr = 0.51 > 2/L = 0.5: the stiff mode grows by 1.04 per step from a tiny start, so the
    # cost never exceeds its initial value, but the curve turns upward
    eigs = np.array([1.0, 4.0])

    def lg(params):
        x = params[0]
        return 0.5 * float(x @ (eigs * x)), [eigs * x]

    x = np.array([1.0, 1e-3])
    res = choose_lr([x], lg, optimizer=PlainSGD, lrs=[0.1, 0.3, 0.51], refine=0)
    assert max(res.curves[2]) <= res.curves[2][0]
    assert list(res.diverged) == [False, False, True]
    assert "its minimum" in res.reasoning
    assert res.recommended == pytest.approx(0.3)


def test_a_rate_above_a_diverged_one_counts_as_diverged():
    """A noisy trial above the stability limit can end low; it must not be shown as stable
    (the tour's figure once flagged 0.614 but not 1.36)."""
    res = scripted_lr_trials()
    assert res.best_short_trial == 0.1
    assert list(res.diverged) == [False, False, True, True]
    assert res.final_costs[3] == np.inf
    assert "lr=3 diverged: above lr=1, which diverged" in res.reasoning
    assert res.recommended < 1.0
