"""Nesterov momentum (Algorithm 8.3, 8.6): the literal form (gradient taken at the interim
point through a closure) and the fused shifted form give the same theta."""

import numpy as np
import pytest

import ch8fast
import reference as R


def _quadratic(n=12, seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    A = q @ np.diag(np.linspace(0.1, 5.0, n)) @ q.T
    return A, rng.standard_normal(n)


@pytest.mark.parametrize("cls,kw", [
    (ch8fast.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    (ch8fast.SGD, dict(lr=0.05, momentum=lambda k: min(0.95, 0.5 + 0.01 * k),
                       nesterov=True)),
    # eps = 0.1 bounds RMSProp's sensitivity to g near r = 0 (lr / sqrt(eps)): with the
    # default 1e-6 the dynamics near the minimum amplify any rounding difference, and the
    # two forms, equal to rounding for 30 steps, then drift apart by up to 1e-6.
    (ch8fast.RMSProp, dict(lr=0.01, momentum=0.9, nesterov=True, eps=0.1)),
    (ch8fast.RMSProp, dict(lr=0.01, momentum=lambda k: 0.5 if k < 50 else 0.9,
                           nesterov=True, weight_decay=0.01, eps=0.1)),
], ids=["sgd", "sgd_momentum_schedule", "rmsprop", "rmsprop_momentum_schedule"])
def test_literal_and_shifted_forms_agree(cls, kw):
    A, x0 = _quadratic()
    lit, sh = x0.copy(), x0.copy()
    opt_lit = cls([lit], **kw)
    opt_sh = cls([sh], **kw)
    seen = []
    for _ in range(300):
        # the closure is evaluated at whatever the array holds: the interim point
        opt_lit.step(closure=lambda: (seen.append(lit.copy()), A @ lit)[1])
        opt_sh.step(A @ sh)                   # the array holds the interim point already
    theta_sh = opt_sh.theta()[0]
    # to rounding: the two forms do the same arithmetic in a different order
    np.testing.assert_allclose(theta_sh, lit, rtol=1e-10, atol=1e-13 * np.abs(x0).max())
    # the literal form leaves theta in the array; the shifted one the interim point
    np.testing.assert_array_equal(opt_lit.theta()[0], lit)
    assert not np.allclose(sh, theta_sh, rtol=0, atol=1e-14) or np.allclose(theta_sh, 0)
    # the closure did see points other than theta (the interim points)
    assert not np.array_equal(seen[5], lit)


def test_literal_form_is_the_book_algorithm():
    A, x0 = _quadratic(seed=1)
    w = x0.copy()
    opt = ch8fast.SGD([w], lr=0.02, momentum=0.8, nesterov=True)
    for _ in range(50):
        opt.step(closure=lambda: A @ w)
    expected = R.nesterov_literal(x0, lambda t: A @ t, 0.02, 0.8, 50)
    np.testing.assert_allclose(w, expected, rtol=1e-12, atol=1e-14)


def test_at_theta_swaps_and_restores_bits():
    A, x0 = _quadratic(seed=2)
    w = x0.copy()
    opt = ch8fast.SGD([w], lr=0.05, momentum=0.9, nesterov=True)
    for _ in range(10):
        opt.step(A @ w)
    phi = w.copy()
    theta = opt.theta()[0]
    with opt.at_theta() as arrays:
        assert arrays[0] is w
        np.testing.assert_array_equal(w, theta)
    assert w.tobytes() == phi.tobytes()


def test_theta_equals_arrays_without_nesterov():
    w = np.ones(3)
    opt = ch8fast.SGD([w], lr=0.1, momentum=0.9)
    opt.step(np.ones(3))
    np.testing.assert_array_equal(opt.theta()[0], w)


def test_mixing_forms_is_refused_and_changes_nothing():
    A, x0 = _quadratic(seed=3)
    w = x0.copy()
    opt = ch8fast.SGD([w], lr=0.05, momentum=0.9, nesterov=True)
    opt.step(A @ w)
    before = w.copy(), opt.state[0]["velocity"].copy()
    with pytest.raises(ValueError, match="shifted form"):
        opt.step(closure=lambda: A @ w)
    assert w.tobytes() == before[0].tobytes()
    assert opt.state[0]["velocity"].tobytes() == before[1].tobytes()


def test_closure_error_restores_theta():
    w = np.arange(4.0)
    opt = ch8fast.SGD([w], lr=0.1, momentum=0.9, nesterov=True)
    opt.step(closure=lambda: np.ones(4))
    before = w.copy()

    def failing():
        raise RuntimeError("model failed")

    with pytest.raises(RuntimeError):
        opt.step(closure=failing)
    assert w.tobytes() == before.tobytes()


def test_nesterov_state_dict_resume():
    A, x0 = _quadratic(seed=4)
    a, b = x0.copy(), x0.copy()
    opt_a = ch8fast.SGD([a], lr=0.05, momentum=0.9, nesterov=True)
    opt_b = ch8fast.SGD([b], lr=0.05, momentum=0.9, nesterov=True)
    for _ in range(20):
        opt_a.step(A @ a)
    for _ in range(10):
        opt_b.step(A @ b)
    c = b.copy()
    opt_c = ch8fast.SGD([c], lr=0.05, momentum=0.9, nesterov=True)
    opt_c.load_state_dict(opt_b.state_dict())
    for _ in range(10):
        opt_c.step(A @ c)
    assert a.tobytes() == c.tobytes()
    np.testing.assert_array_equal(opt_a.theta()[0], opt_c.theta()[0])
