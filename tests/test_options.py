"""The options added for other libraries' sake, in the book convention: maximize, centered
RMSProp, AdaGrad's lr_decay; and the state names and checks of the conventions."""

import numpy as np
import pytest

import ch8fast
from conftest import CONFIGS, assert_close, random_problem


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name,cls,ref_name,hyper", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_maximize_is_descent_on_the_negated_gradient(name, cls, ref_name, hyper, dtype):
    params, grads = random_problem([(257,), (3, 5)], dtype, seed=3, n_steps=5)
    mine = [p.copy() for p in params]
    a = cls(params, maximize=True, **hyper)
    b = cls(mine, **hyper)
    for g in grads:
        a.step(g)
        b.step([-x for x in g])
    for x, y in zip(params, mine):
        assert np.array_equal(x, y)


def _centered_reference(p, grads, lr, rho, eps, momentum):
    p = p.copy()
    r, gbar, v = np.zeros_like(p), np.zeros_like(p), np.zeros_like(p)
    for g in grads:
        r = rho * r + (1 - rho) * (g * g)
        gbar = rho * gbar + (1 - rho) * g
        step = lr * (g / np.sqrt(eps + (r - gbar * gbar)))
        if momentum:
            v = momentum * v - step
            p = p + v
        else:
            p = p - step
    return p


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_centered_rmsprop(momentum, dtype):
    params, grads = random_problem([(1001,)], dtype, seed=4, n_steps=20)
    ref = _centered_reference(params[0], [g[0] for g in grads], 0.01, 0.9, 1e-6, momentum)
    opt = ch8fast.RMSProp(params, lr=0.01, rho=0.9, eps=1e-6, momentum=momentum,
                          centered=True)
    for g in grads:
        opt.step(g)
    assert "grad_avg" in opt.state[0]
    assert_close(params[0], ref, dtype)


def test_adagrad_lr_decay_is_inverse_time():
    params, grads = random_problem([(301,)], np.float64, seed=5, n_steps=12)
    mine = [p.copy() for p in params]
    a = ch8fast.AdaGrad(params, lr=0.1, lr_decay=0.5)
    b = ch8fast.AdaGrad(mine, lr=ch8fast.schedules.inverse_time(0.1, 2.0))
    for g in grads:
        a.step(g)
        b.step(g)
    assert_close(params[0], mine[0], np.float64)


def test_conventions_name_the_state_as_the_library():
    p = np.zeros(3)
    assert list(ch8fast.SGD([p], momentum=0.9, convention="torch").state[0]) == \
        ["momentum_buffer"]
    assert list(ch8fast.SGD([p], momentum=0.9).state[0]) == ["velocity"]
    assert list(ch8fast.RMSProp([p], momentum=0.9, centered=True,
                                convention="torch").state[0]) == \
        ["square_avg", "momentum_buffer", "grad_avg"]


def test_lookahead_conventions_keep_theta_in_the_arrays():
    """Keras's and torch's Nesterov momentum: the arrays hold the library's theta, so
    theta() returns them as they are."""
    for conv in ("keras", "torch", "optax", "sklearn"):
        p = np.ones(4)
        opt = ch8fast.SGD([p], lr=0.1, momentum=0.9, nesterov=True, convention=conv)
        opt.step([np.ones(4)])
        assert np.array_equal(opt.theta()[0], p), conv


def test_convention_is_fixed():
    p = np.zeros(3)
    opt = ch8fast.Adam([p])
    opt.param_groups[0]["convention"] = "torch"
    with pytest.raises(ValueError, match="convention"):
        opt.step([np.ones(3)])
