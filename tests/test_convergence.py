"""Each optimizer reaches the minimum of a quadratic and of the Rosenbrock function."""

import numpy as np
import pytest

import ch8fast
from ch8fast.schedules import inverse_time, linear_decay


def _quadratic(n=10, seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    A = q @ np.diag(np.linspace(1.0, 10.0, n)) @ q.T       # condition number 10
    x_star = rng.standard_normal(n)
    return A, x_star


def _rosenbrock_grad(x):
    a, b = x
    return np.array([-2 * (1 - a) - 400 * a * (b - a * a), 200 * (b - a * a)])


# (id, class, hyperparameters, steps, tolerance on the distance to the minimizer)
QUADRATIC = [
    ("sgd", ch8fast.SGD, dict(lr=0.1), 500, 1e-8),
    ("momentum", ch8fast.SGD, dict(lr=0.05, momentum=0.7), 500, 1e-8),
    ("nesterov", ch8fast.SGD, dict(lr=0.05, momentum=0.7, nesterov=True), 500, 1e-8),
    ("adagrad", ch8fast.AdaGrad, dict(lr=1.0), 3000, 1e-6),
    ("rmsprop", ch8fast.RMSProp, dict(lr=linear_decay(0.01, 3000, 1e-6)), 4000, 1e-4),
    ("rmsprop_nesterov", ch8fast.RMSProp,
     dict(lr=linear_decay(3e-3, 3000, 1e-6), momentum=0.9, nesterov=True), 4000, 1e-4),
    ("adam", ch8fast.Adam, dict(lr=linear_decay(0.05, 3000, 1e-5)), 4000, 1e-4),
    ("adamw", ch8fast.AdamW, dict(lr=linear_decay(0.05, 3000, 1e-5), weight_decay=0.0),
     4000, 1e-4),
    ("amsgrad", ch8fast.Adam, dict(lr=0.05, amsgrad=True), 4000, 1e-4),
    ("adadelta", ch8fast.AdaDelta, dict(lr=inverse_time(1.0, 500)), 6000, 1e-4),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("cls,kw,steps,tol", [c[1:] for c in QUADRATIC],
                         ids=[c[0] for c in QUADRATIC])
def test_quadratic(cls, kw, steps, tol, dtype):
    A, x_star = _quadratic()
    A32, xs32 = A.astype(dtype), x_star.astype(dtype)
    x = np.zeros(10, dtype)
    g = np.empty_like(x)
    opt = cls([x], **kw)
    for _ in range(steps):
        np.matmul(A32, x - xs32, out=g)
        opt.step(g)
    err = np.linalg.norm(opt.theta()[0] - x_star) / np.linalg.norm(x_star)
    assert err < max(tol, 1e-5 if dtype == np.float32 else 0)


ROSENBROCK = [
    ("sgd", ch8fast.SGD, dict(lr=1e-3), 30000, 1e-4),
    ("momentum", ch8fast.SGD, dict(lr=1e-4, momentum=0.9), 30000, 1e-4),
    ("nesterov", ch8fast.SGD, dict(lr=1e-4, momentum=0.9, nesterov=True), 30000, 1e-4),
    ("adagrad", ch8fast.AdaGrad, dict(lr=0.5), 30000, 1e-4),
    ("rmsprop", ch8fast.RMSProp, dict(lr=linear_decay(3e-3, 20000, 1e-5)), 30000, 1e-3),
    ("rmsprop_nesterov", ch8fast.RMSProp, dict(lr=1e-4, momentum=0.9, nesterov=True),
     30000, 1e-3),
    ("adam", ch8fast.Adam, dict(lr=0.02), 30000, 1e-4),
    ("adamw", ch8fast.AdamW, dict(lr=0.02, weight_decay=0.0), 30000, 1e-4),
    ("amsgrad", ch8fast.Adam, dict(lr=0.02, amsgrad=True), 30000, 1e-4),
    # AdaDelta crawls along the valley; a decaying lr lets it settle.
    ("adadelta", ch8fast.AdaDelta, dict(lr=inverse_time(1.0, 3000)), 40000, 1e-2),
]


@pytest.mark.parametrize("cls,kw,steps,tol", [c[1:] for c in ROSENBROCK],
                         ids=[c[0] for c in ROSENBROCK])
def test_rosenbrock(cls, kw, steps, tol):
    x = np.array([-1.5, 2.0])
    opt = cls([x], **kw)
    for _ in range(steps):
        opt.step(_rosenbrock_grad(x))
    assert np.linalg.norm(opt.theta()[0] - 1.0) < tol
