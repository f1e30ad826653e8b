"""Pickling and deep-copying an optimizer whose hyperparameter is a plain callable: what
pickle can save (a module-level function, a partial of one, a picklable callable object)
round-trips and steps on bit for bit; a lambda or a nested function is refused with a
TypeError that says why; state dicts and checkpoints keep requiring a schedule."""

import copy
import functools
import pickle

import numpy as np
import pytest

import ch8fast
from ch8fast.checkpoint import save_checkpoint
from ch8fast.schedules import linear_decay


def decaying_lr(step):
    return 0.05 / (1.0 + 0.1 * step)


def scaled_decay(lr0, half_life, step):
    return lr0 * 0.5 ** (step / half_life)


class Warmup:
    """A callable object: a picklable class with ``__call__``."""

    def __init__(self, peak, steps):
        self.peak, self.steps = peak, steps

    def __call__(self, step):
        return self.peak * min(1.0, (step + 1) / self.steps)


def eps_by_step(step):
    return 1e-8 * (1.0 + step)


CALLABLES = [
    ("function", ch8fast.Adam, dict(lr=decaying_lr)),
    ("function_eps", ch8fast.Adam, dict(lr=0.01, eps=eps_by_step)),
    ("partial", ch8fast.Adam, dict(lr=functools.partial(scaled_decay, 0.05, 3.0))),
    ("callable_object", ch8fast.SGD, dict(lr=Warmup(0.1, 4), momentum=0.9)),
]
COPIES = {"pickle": lambda x: pickle.loads(pickle.dumps(x)), "deepcopy": copy.deepcopy}


def _grads(dtype, n, seed):
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal((5, 3)).astype(dtype), rng.standard_normal(7).astype(dtype)]
            for _ in range(n)]


def _bits(opt):
    return ([p.tobytes() for p in opt.params],
            [{k: a.tobytes() for k, a in st.items()} for st in opt.state])


@pytest.mark.parametrize("how", sorted(COPIES))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name,cls,hyper", CALLABLES, ids=[c[0] for c in CALLABLES])
def test_round_trip_steps_on_bit_for_bit(name, cls, hyper, dtype, how):
    rng = np.random.default_rng(0)
    params = [rng.standard_normal((5, 3)).astype(dtype), rng.standard_normal(7).astype(dtype)]
    opt = cls(params, **hyper)
    for g in _grads(dtype, 3, seed=1):
        opt.step(g)
    twin = COPIES[how](opt)
    assert twin.steps == opt.steps
    assert _bits(twin) == _bits(opt)
    assert twin.params[0] is not opt.params[0]
    for g in _grads(dtype, 6, seed=2):       # the same gradients for both
        opt.step(g)
        twin.step([a.copy() for a in g])
    assert _bits(twin) == _bits(opt)


@pytest.mark.parametrize("how", sorted(COPIES))
def test_the_callable_comes_back_as_pickle_makes_it(how):
    opt = ch8fast.Adam([np.ones(3)], lr=decaying_lr,
                       eps=functools.partial(scaled_decay, 1e-8, 10.0))
    twin = COPIES[how](opt)
    lr, eps = twin.param_groups[0]["lr"], twin.param_groups[0]["eps"]
    assert lr is decaying_lr                  # a function by reference, as pickle stores it
    assert isinstance(eps, functools.partial)
    assert (eps.func, eps.args) == (scaled_decay, (1e-8, 10.0))


@pytest.mark.parametrize("how", sorted(COPIES))
def test_a_schedule_still_round_trips(how):
    s = linear_decay(0.1, 10)
    opt = ch8fast.Adam([np.ones(3)], lr=s)
    opt.step(np.ones(3))
    twin = COPIES[how](opt)
    assert twin.param_groups[0]["lr"] == s
    opt.step(np.full(3, 0.5))
    twin.step(np.full(3, 0.5))
    assert _bits(twin) == _bits(opt)


def _nested():
    def inner(step):
        return 0.01
    return inner


@pytest.mark.parametrize("how", sorted(COPIES))
@pytest.mark.parametrize("what", ["lambda", "nested_function", "partial_of_lambda"])
def test_what_pickle_cannot_save_is_refused_with_the_reason(what, how):
    value = {"lambda": lambda step: 0.01, "nested_function": _nested(),
             "partial_of_lambda": functools.partial(lambda a, step: a, 0.01)}[what]
    w = np.ones(3)
    opt = ch8fast.Adam([w], lr=value)
    opt.step(np.ones(3))
    before = _bits(opt)
    with pytest.raises(TypeError) as info:
        COPIES[how](opt)
    msg = str(info.value)
    assert msg.startswith("cannot pickle or deep-copy the hyperparameter")
    for words in ("pickle stores a function by its importable name",
                  "a lambda or a function defined inside another function has none",
                  "use a ch8fast.schedules schedule, or a function defined at module level"):
        assert words in msg
    assert _bits(opt) == before


def test_state_dict_and_checkpoints_still_need_a_schedule(tmp_path):
    """Plain data cannot hold code: a state dict (and so a checkpoint) takes a schedule
    with to_dict(), and refuses even a module-level function."""
    w = np.ones(3)
    opt = ch8fast.Adam([w], lr=decaying_lr)
    with pytest.raises(TypeError, match=r"a callable needs a to_dict\(\) method"):
        opt.state_dict()
    with pytest.raises(TypeError, match=r"a callable needs a to_dict\(\) method"):
        save_checkpoint(str(tmp_path / "ckpt.npz"), opt, [w])
    assert not (tmp_path / "ckpt.npz").exists()
    scheduled = ch8fast.Adam([w], lr=linear_decay(0.1, 10))
    lr = scheduled.state_dict()["param_groups"][0]["lr"]
    assert lr == {"schedule": linear_decay(0.1, 10).to_dict()}
