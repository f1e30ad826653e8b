import numpy as np
import pytest

import ch8fast

# Each optimizer configuration: (id, ch8fast class, reference class name, hyperparameters
# that differ from the rule's defaults). The reference gets them completed with the
# defaults of the rule's specification (``reference_hyper``), so it has none of its own.
CONFIGS = [
    ("sgd", ch8fast.SGD, "SGD", dict(lr=0.05)),
    ("sgd_wd", ch8fast.SGD, "SGD", dict(lr=0.05, weight_decay=0.01)),
    ("momentum", ch8fast.SGD, "SGD", dict(lr=0.05, momentum=0.9)),
    ("nesterov", ch8fast.SGD, "SGD", dict(lr=0.05, momentum=0.9, nesterov=True,
                                          weight_decay=0.001)),
    ("adagrad", ch8fast.AdaGrad, "AdaGrad", dict(lr=0.1, eps=1e-7)),
    ("adagrad_wd", ch8fast.AdaGrad, "AdaGrad", dict(lr=0.1, eps=1e-7, weight_decay=0.01,
                                                    initial_accumulator_value=0.1)),
    ("rmsprop", ch8fast.RMSProp, "RMSProp", dict(lr=0.01, rho=0.9, eps=1e-6)),
    ("rmsprop_momentum", ch8fast.RMSProp, "RMSProp",
     dict(lr=0.01, rho=0.9, eps=1e-6, momentum=0.5, weight_decay=0.01)),
    ("rmsprop_nesterov", ch8fast.RMSProp, "RMSProp",
     dict(lr=0.01, rho=0.9, eps=1e-6, momentum=0.9, nesterov=True)),
    ("rmsprop_centered", ch8fast.RMSProp, "RMSProp",
     dict(lr=0.01, rho=0.9, eps=1e-6, centered=True)),
    ("rmsprop_centered_nesterov", ch8fast.RMSProp, "RMSProp",
     dict(lr=0.01, rho=0.9, eps=1e-6, momentum=0.5, nesterov=True, centered=True,
          weight_decay=0.01)),
    ("adam", ch8fast.Adam, "Adam", dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8)),
    ("adam_l2_amsgrad", ch8fast.Adam, "Adam",
     dict(lr=0.01, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.1, amsgrad=True)),
    ("adamw", ch8fast.AdamW, "Adam",
     dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)),
    ("adadelta", ch8fast.AdaDelta, "AdaDelta", dict(lr=1.0, rho=0.95, eps=1e-6)),
    ("adadelta_wd", ch8fast.AdaDelta, "AdaDelta",
     dict(lr=0.5, rho=0.9, eps=1e-6, weight_decay=0.01)),
    ("lion", ch8fast.Lion, "Lion", dict(lr=1e-3, betas=(0.9, 0.99))),
    ("lion_wd", ch8fast.Lion, "Lion", dict(lr=1e-3, betas=(0.8, 0.95), weight_decay=0.5)),
    ("adopt", ch8fast.ADOPT, "ADOPT", dict(lr=1e-2)),
    ("adopt_l2_nesterov", ch8fast.ADOPT, "ADOPT",
     dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1, nesterov=True, clip_exponent=0.5)),
    ("adopt_decoupled_unclipped", ch8fast.ADOPT, "ADOPT",
     dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True, use_clipping=False)),
    ("ademamix", ch8fast.AdEMAMix, "AdEMAMix", dict(lr=1e-2, alpha=2.0, beta3=0.99)),
    ("ademamix_wd_warmup", ch8fast.AdEMAMix, "AdEMAMix",
     dict(lr=1e-2, weight_decay=0.1, alpha=ch8fast.schedules.ademamix_alpha(5.0, 7),
          beta3=ch8fast.schedules.ademamix_beta3(0.999, 0.9, 7))),
    ("schedule_free_sgd", ch8fast.ScheduleFreeSGD, "ScheduleFreeSGD",
     dict(lr=0.05, weight_decay=0.01, warmup_steps=3)),
    ("schedule_free_sgd_optax", ch8fast.ScheduleFreeSGD, "ScheduleFreeSGD",
     dict(lr=0.05, momentum=0.8, warmup_steps=4, r=1.0, convention="optax")),
    ("schedule_free_adamw", ch8fast.ScheduleFreeAdamW, "ScheduleFreeAdamW",
     dict(lr=1e-2, weight_decay=0.1, warmup_steps=3)),
    ("schedule_free_adamw_optax", ch8fast.ScheduleFreeAdamW, "ScheduleFreeAdamW",
     dict(lr=1e-2, betas=(0.95, 0.99), weight_lr_power=1.0, convention="optax")),
    ("lamb", ch8fast.LAMB, "LAMB", dict(lr=1e-2, weight_decay=0.01)),
    ("lamb_exclude_1d", ch8fast.LAMB, "LAMB",
     dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1, exclude_1d=True)),
    ("lamb_keras", ch8fast.LAMB, "LAMB", dict(lr=1e-2, weight_decay=0.1, convention="keras")),
    ("lars", ch8fast.LARS, "LARS", dict(lr=0.5, weight_decay=0.01, trust_coefficient=0.02)),
    ("lars_nesterov_exclude_1d", ch8fast.LARS, "LARS",
     dict(lr=0.5, momentum=0.8, nesterov=True, weight_decay=0.01, eps=1e-3,
          exclude_1d=True)),
]


def reference_hyper(cls, hyper):
    """The reference's view of a configuration: every hyperparameter, the defaults from the
    class's rule specification (AdamW's include decoupled_weight_decay=True)."""
    return dict(cls.rule.defaults(), **hyper)


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    before = ch8fast.get_num_threads()
    ch8fast.set_num_threads(request.param)
    yield request.param
    ch8fast.set_num_threads(0)
    assert ch8fast.get_num_threads() == before


def random_problem(shapes, dtype, seed, n_steps):
    """Parameters and a sequence of gradients of mixed signs and magnitudes."""
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(dtype) for s in shapes]
    grads = [[(rng.standard_normal(s) * rng.choice([1e-3, 1.0, 10.0])).astype(dtype)
              for s in shapes] for _ in range(n_steps)]
    return params, grads


def assert_close(got, ref, dtype, what=""):
    """Relative tolerance justified by the dtype, with the absolute floor scaled by the
    array's magnitude so that entries that cancel to near zero are judged fairly."""
    rtol = 1e-12 if np.dtype(dtype) == np.float64 else 1e-6
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=rtol * scale, err_msg=what)


def optax_modules():
    """jax (in float64) and optax, or a skip with the reason."""
    jax = pytest.importorskip("jax", reason="optax cross-checks need jax and optax")
    optax = pytest.importorskip("optax", reason="optax cross-checks need optax")
    jax.config.update("jax_enable_x64", True)
    return jax, optax


def optax_run(tx, theta, grads):
    """(theta, state) after optax transformation ``tx`` applied to ``grads`` in turn;
    ``theta`` an array or a list of them, each gradient alike."""
    jax, optax = optax_modules()
    th = jax.tree.map(jax.numpy.asarray, theta)
    st = tx.init(th)
    update = jax.jit(tx.update)
    for g in grads:
        u, st = update(jax.tree.map(jax.numpy.asarray, g), st, th)
        th = optax.apply_updates(th, u)
    return jax.tree.map(np.asarray, th), st


def scripted_lr_trials(lrs=(0.01, 0.1, 1.0, 3.0), iters=20):
    """``ch8fast.choose_lr`` on scripted costs: lr 1 blows up, every other rate (3
    included, by chance) decreases like 1 / (1 + t min(lr, 0.5))."""
    current = {}

    class Scripted:
        def __init__(self, params, lr):
            current.update(lr=lr, t=0)

        def step(self, grads):
            current["t"] += 1

    def loss_and_grad(params):
        lr, t = current["lr"], current["t"]
        if lr == 1.0:                       # the cost blows up
            return 100.0 * (1 + t), [np.zeros(1)]
        return 1.0 / (1 + t * min(lr, 0.5)), [np.zeros(1)]   # 3.0: ends low by chance

    return ch8fast.choose_lr([np.zeros(1)], loss_and_grad, optimizer=Scripted,
                             lrs=list(lrs), iters=iters, refine=0)
