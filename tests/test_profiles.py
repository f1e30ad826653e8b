"""The formula profiles (``convention=``) of ch8fast's own optimizers against the libraries
they reproduce: float64, 1,000 steps of random gradients, <= 1e-12 relative (torch's fused
kernels: bit for bit, float32 too). Each library's tests skip, with the reason, when it is
not installed."""

import os

import numpy as np
import pytest

import ch8fast
from conftest import assert_close, optax_modules, optax_run

N, T = 257, 1000


def _problem(seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    theta = rng.standard_normal(N).astype(dtype)
    grads = (rng.standard_normal((T, N)) * rng.choice([0.1, 1.0, 3.0], size=(T, 1)))
    return theta, grads.astype(dtype)


def _ours(cls, kw, theta, grads):
    p = theta.copy()
    opt = cls([p], **kw)
    for g in grads:
        opt.step([g])
    return p


# ---- torch -----------------------------------------------------------------------------

TORCH = [
    (ch8fast.SGD, dict(lr=0.01, momentum=0.9, dampening=0.2, weight_decay=0.01), "SGD",
     dict(lr=0.01, momentum=0.9, dampening=0.2, weight_decay=0.01)),
    (ch8fast.SGD, dict(lr=0.01, momentum=0.9, nesterov=True, maximize=True), "SGD",
     dict(lr=0.01, momentum=0.9, nesterov=True, maximize=True)),
    (ch8fast.Adam, dict(lr=0.01, weight_decay=0.1, amsgrad=True), "Adam",
     dict(lr=0.01, weight_decay=0.1, amsgrad=True)),
    (ch8fast.AdamW, dict(lr=0.01, weight_decay=0.1), "AdamW", dict(lr=0.01, weight_decay=0.1)),
    (ch8fast.RMSProp, dict(lr=0.01, rho=0.99, eps=1e-8, momentum=0.9, centered=True,
                           weight_decay=0.01), "RMSprop",
     dict(lr=0.01, alpha=0.99, eps=1e-8, momentum=0.9, centered=True, weight_decay=0.01)),
    (ch8fast.RMSProp, dict(lr=0.01, rho=0.99, eps=1e-8), "RMSprop", dict(lr=0.01)),
    (ch8fast.AdaGrad, dict(lr=0.1, eps=1e-10, lr_decay=0.01, weight_decay=0.01,
                           initial_accumulator_value=0.1), "Adagrad",
     dict(lr=0.1, lr_decay=0.01, weight_decay=0.01, initial_accumulator_value=0.1)),
    (ch8fast.AdaDelta, dict(lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.01), "Adadelta",
     dict(lr=1.0, weight_decay=0.01)),
]


def _torch_run(torch, name, kw, theta, grads):
    p = torch.nn.Parameter(torch.from_numpy(theta.copy()))
    opt = getattr(torch.optim, name)([p], **kw)
    for g in grads:
        p.grad = torch.from_numpy(g.copy())
        opt.step()
    return p.detach().numpy()


@pytest.mark.parametrize("cls,kw,name,tkw", TORCH, ids=[f"{c[2]}{i}" for i, c in
                                                         enumerate(TORCH)])
def test_torch_convention(cls, kw, name, tkw):
    torch = pytest.importorskip("torch")
    theta, grads = _problem()
    ours = _ours(cls, dict(kw, convention="torch"), theta, grads)
    assert_close(ours, _torch_run(torch, name, tkw, theta, grads), np.float64, name)
    # and it is not the book's formula (the test can tell them apart; torch's Nesterov SGD
    # at a constant lr moves the book's interim point, so equals it)
    if "dampening" in kw or name == "RMSprop":
        book = _ours(cls, {k: v for k, v in kw.items() if k != "dampening"}, theta, grads)
        assert not np.allclose(book, ours, rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cls,kw,name,tkw", [c for c in TORCH if c[2] in
                                              ("SGD", "Adam", "AdamW", "Adagrad")],
                         ids=lambda c: None)
def test_torch_fused_convention_is_bit_exact(cls, kw, name, tkw, dtype):
    torch = pytest.importorskip("torch")
    theta, grads = _problem(dtype=dtype)
    if name == "Adagrad" and dtype == np.float64:
        kw, tkw = dict(kw, lr_decay=0.0), dict(tkw, lr_decay=0.0)   # see test_torch_module
    ours = _ours(cls, dict(kw, convention="torch_fused"), theta[:203], grads[:300, :203])
    theirs = _torch_run(torch, name, dict(tkw, fused=True), theta[:203], grads[:300, :203])
    assert np.array_equal(ours, theirs), np.abs(ours - theirs).max()


# ---- optax -----------------------------------------------------------------------------

def _optax():
    return optax_modules()


def _optax_run(tx, theta, grads):
    """theta after optax transformation ``tx`` applied to ``grads`` in turn."""
    return optax_run(tx, theta, grads)[0]


OPTAX = [
    (ch8fast.SGD, dict(lr=0.01, momentum=0.9), "sgd", dict(learning_rate=0.01, momentum=0.9)),
    (ch8fast.SGD, dict(lr=0.01, momentum=0.9, nesterov=True), "sgd",
     dict(learning_rate=0.01, momentum=0.9, nesterov=True)),
    (ch8fast.Adam, dict(lr=0.01), "adam", dict(learning_rate=0.01)),
    (ch8fast.AdamW, dict(lr=0.01, weight_decay=0.1), "adamw",
     dict(learning_rate=0.01, weight_decay=0.1)),
    (ch8fast.RMSProp, dict(lr=0.01, rho=0.9, eps=1e-8, momentum=0.9, centered=True), "rmsprop",
     dict(learning_rate=0.01, decay=0.9, eps=1e-8, momentum=0.9, centered=True)),
    (ch8fast.RMSProp, dict(lr=0.01, rho=0.9, eps=1e-8, momentum=0.9, nesterov=True),
     "rmsprop", dict(learning_rate=0.01, decay=0.9, eps=1e-8, momentum=0.9, nesterov=True)),
    (ch8fast.AdaGrad, dict(lr=0.1, eps=1e-7, initial_accumulator_value=0.1), "adagrad",
     dict(learning_rate=0.1)),
    (ch8fast.AdaDelta, dict(lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.01), "adadelta",
     dict(learning_rate=1.0, weight_decay=0.01)),
]


@pytest.mark.parametrize("cls,kw,name,okw", OPTAX, ids=[f"{c[2]}{i}" for i, c in
                                                         enumerate(OPTAX)])
def test_optax_convention(cls, kw, name, okw):
    _, optax = _optax()
    theta, grads = _problem()
    th = _optax_run(getattr(optax, name)(**okw), theta, grads)
    ours = _ours(cls, dict(kw, convention="optax"), theta, grads)
    assert_close(ours, th, np.float64, name)


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_lion_is_optax_lion(wd):
    """Lion (Chen et al. 2023) against optax.lion: float64, 1,000 steps. The directions are
    the same bits (the same operations on the same moments); theta differs only by where
    the decoupled decay is rounded, so 1e-12 relative."""
    _, optax = _optax()
    theta, grads = _problem()
    th = _optax_run(optax.lion(learning_rate=3e-3, b1=0.9, b2=0.99, weight_decay=wd),
                    theta, grads)
    for convention in ("book", "optax"):
        ours = _ours(ch8fast.Lion, dict(lr=3e-3, betas=(0.9, 0.99), weight_decay=wd,
                                        convention=convention), theta, grads)
        assert_close(ours, th, np.float64, "lion")


ADOPT_CASES = [
    (dict(), dict()),
    (dict(betas=(0.8, 0.99), eps=1e-4), dict(b1=0.8, b2=0.99, eps=1e-4)),
    (dict(nesterov=True), dict(nesterov=True)),
    (dict(use_clipping=False), dict(use_clipping=False)),
    (dict(clip_exponent=0.5), dict(clip_value_fn=lambda c: c ** 0.5)),
]


@pytest.mark.parametrize("kw,okw", ADOPT_CASES, ids=["default", "betas_eps", "nesterov",
                                                      "no_clipping", "clip_0.5"])
def test_adopt_is_optax_adopt(kw, okw):
    """ADOPT (Taniguchi et al. 2024) against optax.contrib.adopt: float64, 1,000 steps,
    1e-12 relative. The same operations on the same moments; the clipping bound
    (t - 1)^p comes from C's pow here and XLA's power there, which may differ in the last
    bit, and a clipped element then differs by that ulp."""
    _, optax = _optax()
    theta, grads = _problem()
    th = _optax_run(optax.contrib.adopt(learning_rate=3e-3, **okw), theta, grads)
    for convention in ("book", "optax"):
        ours = _ours(ch8fast.ADOPT, dict(lr=3e-3, convention=convention, **kw), theta, grads)
        assert_close(ours, th, np.float64, "adopt")


@pytest.mark.parametrize("warmup", [False, True])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_ademamix_is_optax_ademamix(wd, warmup):
    """AdEMAMix (Pagliardini et al. 2024) against optax.contrib.ademamix: float64, 1,000
    steps, 1e-12 relative (the bias corrections are folded into two scalars here, divided
    there; the warm-up schedules written in jax.numpy for optax, whose count starts at 0
    as ch8fast's step does)."""
    jax, optax = _optax()
    jnp = jax.numpy
    theta, grads = _problem()
    a, b1, b3, T = 5.0, 0.9, 0.999, 300
    if warmup:
        ours_alpha = ch8fast.schedules.ademamix_alpha(a, T)
        ours_b3 = ch8fast.schedules.ademamix_beta3(b3, b1, T)

        def half_life(b):
            return jnp.log(0.5) / jnp.log(b + 1e-8) - 1

        def their_alpha(c):
            k = (c + 1).astype(jnp.float64)
            return jnp.where(k >= T, a, (k / T) * a)

        def their_b3(c):
            k = (c + 1).astype(jnp.float64)
            h = (1.0 - k / T) * half_life(b1) + (k / T) * half_life(b3)
            return jnp.where(k >= T, b3, jnp.power(0.5, 1 / (h + 1)))
    else:
        ours_alpha = their_alpha = a
        ours_b3 = their_b3 = b3
    th = _optax_run(optax.contrib.ademamix(learning_rate=3e-3, b1=b1, b2=0.999, b3=their_b3,
                                           alpha=their_alpha, eps=1e-8, weight_decay=wd),
                    theta, grads)
    for convention in ("book", "optax"):
        ours = _ours(ch8fast.AdEMAMix, dict(lr=3e-3, betas=(b1, 0.999), beta3=ours_b3,
                                            alpha=ours_alpha, weight_decay=wd,
                                            convention=convention), theta, grads)
        assert_close(ours, th, np.float64, "ademamix")


def test_lion_is_keras_lion():
    keras = _keras()
    import jax.numpy as jnp
    theta, grads = _problem()
    v = keras.Variable(theta.copy(), dtype="float64")
    opt = keras.optimizers.Lion(learning_rate=3e-3, beta_1=0.9, beta_2=0.99)
    opt.build([v])
    for g in grads:
        opt.apply([jnp.asarray(g)], [v])
    ours = _ours(ch8fast.Lion, dict(lr=3e-3, betas=(0.9, 0.99), convention="keras"),
                 theta, grads)
    assert_close(ours, np.asarray(v.numpy()), np.float64, "Lion")
    book = _ours(ch8fast.Lion, dict(lr=3e-3, betas=(0.9, 0.99)), theta, grads)
    assert not np.allclose(book, ours, rtol=1e-12)     # Keras's float32 lr tells them apart


# ---- Keras -----------------------------------------------------------------------------

def _keras():
    os.environ.setdefault("KERAS_BACKEND", "jax")
    _optax()                                   # jax in float64
    return pytest.importorskip("keras", reason="Keras cross-checks need keras (jax backend)")


KERAS = [
    (ch8fast.SGD, dict(lr=0.01, momentum=0.9, nesterov=True, weight_decay=0.01), "SGD",
     dict(learning_rate=0.01, momentum=0.9, nesterov=True, weight_decay=0.01)),
    (ch8fast.Adam, dict(lr=0.01, eps=1e-7, amsgrad=True), "Adam",
     dict(learning_rate=0.01, amsgrad=True)),
    (ch8fast.AdamW, dict(lr=0.01, eps=1e-7, weight_decay=0.004), "AdamW",
     dict(learning_rate=0.01)),
    (ch8fast.RMSProp, dict(lr=0.01, rho=0.9, eps=1e-7, momentum=0.9, centered=True),
     "RMSprop", dict(learning_rate=0.01, momentum=0.9, centered=True)),
    (ch8fast.AdaGrad, dict(lr=0.1, eps=1e-7, initial_accumulator_value=0.1), "Adagrad",
     dict(learning_rate=0.1)),
    (ch8fast.AdaDelta, dict(lr=1.0, rho=0.95, eps=1e-7), "Adadelta",
     dict(learning_rate=1.0)),
]


@pytest.mark.parametrize("cls,kw,name,kkw", KERAS, ids=[f"{c[2]}{i}" for i, c in
                                                         enumerate(KERAS)])
def test_keras_convention(cls, kw, name, kkw):
    keras = _keras()
    import jax.numpy as jnp
    theta, grads = _problem()
    v = keras.Variable(theta.copy(), dtype="float64")
    opt = getattr(keras.optimizers, name)(**kkw)
    opt.build([v])
    for g in grads:
        opt.apply([jnp.asarray(g)], [v])
    ours = _ours(cls, dict(kw, convention="keras"), theta, grads)
    assert_close(ours, np.asarray(v.numpy()), np.float64, name)


# ---- scikit-learn --------------------------------------------------------------------------

SKLEARN = [
    (ch8fast.SGD, dict(lr=0.01, momentum=0.9, nesterov=True), "SGDOptimizer",
     dict(learning_rate_init=0.01, momentum=0.9, nesterov=True)),
    (ch8fast.SGD, dict(lr=0.01, momentum=0.9), "SGDOptimizer",
     dict(learning_rate_init=0.01, momentum=0.9, nesterov=False)),
    (ch8fast.Adam, dict(lr=0.01, eps=1e-8), "AdamOptimizer", dict(learning_rate_init=0.01)),
]


@pytest.mark.parametrize("cls,kw,name,skw", SKLEARN, ids=[f"{c[2]}{i}" for i, c in
                                                           enumerate(SKLEARN)])
def test_sklearn_convention(cls, kw, name, skw):
    mod = pytest.importorskip("sklearn.neural_network._stochastic_optimizers",
                              reason="scikit-learn cross-checks need scikit-learn")
    theta, grads = _problem()
    th = theta.copy()
    opt = getattr(mod, name)([th], **skw)
    for g in grads:
        opt.update_params([th], [g])
    ours = _ours(cls, dict(kw, convention="sklearn"), theta, grads)
    assert_close(ours, th, np.float64, name)


def test_conventions_are_checked():
    p = np.zeros(3)
    with pytest.raises(ValueError, match="convention"):
        ch8fast.Adam([p], convention="tensorflow")
    with pytest.raises(ValueError, match="convention"):
        ch8fast.AdaDelta([p], convention="sklearn")      # scikit-learn has no AdaDelta
    with pytest.raises(ValueError, match="dampening"):
        ch8fast.SGD([p], momentum=0.9, dampening=0.1)    # the book keeps no buffer
    with pytest.raises(ValueError, match="decoupled"):
        ch8fast.Adam([p], weight_decay=0.1, convention="keras")
