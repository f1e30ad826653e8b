"""Schedules, the Robbins–Monro report, batch-size schedules and the minibatch sampler."""
import json
import math

import numpy as np
import pytest

from ch8fast.schedules import (
    BatchSizeSchedule,
    Constant,
    Linear,
    MinibatchSampler,
    Schedule,
    ademamix_alpha,
    ademamix_beta3,
    batch_size_schedule,
    constant,
    cosine_decay,
    exponential_decay,
    inverse_time,
    linear,
    linear_decay,
    minibatches,
    momentum_ramp,
    piecewise,
    robbins_monro,
    step_decay,
    warmup,
)


# --------------------------------------------------------------------------- values
def test_constant():
    s = constant(0.25)
    assert [s(k) for k in (0, 1, 10**9)] == [0.25, 0.25, 0.25]


@pytest.mark.parametrize("k", [0, 1, 7, 50, 99, 100, 101, 10**6])
def test_linear_decay_is_equation_8_14(k):
    eps0, tau, eps_tau = 0.5, 100, 0.02
    s = linear_decay(eps0, tau, eps_tau)
    if k <= tau:
        alpha = k / tau
        expected = (1 - alpha) * eps0 + alpha * eps_tau
    else:
        expected = eps_tau
    assert s(k) == pytest.approx(expected, rel=1e-15, abs=0)


def test_linear_decay_endpoints_and_default_end_value():
    s = linear_decay(0.3, 40)
    assert s(0) == 0.3
    assert s.end_value == pytest.approx(0.003)
    assert s(40) == s.end_value
    assert s(20) == pytest.approx(0.5 * 0.3 + 0.5 * 0.003)
    assert s(41) == s(10**8) == s.end_value


def test_linear_increasing_and_momentum_ramp():
    s = linear(0.1, 0.9, 8)
    assert s(0) == 0.1 and s(4) == pytest.approx(0.5) and s(8) == 0.9 and s(100) == 0.9
    m = momentum_ramp(0.5, 0.99, 10)
    assert isinstance(m, Linear)
    assert m(0) == 0.5 and m(5) == pytest.approx(0.745) and m(10) == 0.99 and m(11) == 0.99
    assert all(m(k) <= m(k + 1) for k in range(20))


@pytest.mark.parametrize("k", [0, 1, 3, 10, 1000])
def test_inverse_time(k):
    assert inverse_time(0.2, 10)(k) == pytest.approx(0.2 / (1 + k / 10), rel=1e-15)
    assert inverse_time(0.2, 10)(10) == pytest.approx(0.1)


def test_step_decay():
    s = step_decay(1.0, 0.1, 30)
    assert s(0) == 1.0 and s(29) == 1.0
    assert s(30) == pytest.approx(0.1) and s(59) == pytest.approx(0.1)
    assert s(60) == pytest.approx(0.01) and s(95) == pytest.approx(0.001)


def test_exponential_decay():
    s = exponential_decay(2.0, 0.5, transition_steps=10)
    assert s(0) == 2.0
    assert s(10) == pytest.approx(1.0) and s(20) == pytest.approx(0.5)
    assert s(5) == pytest.approx(2.0 * 0.5**0.5)
    assert exponential_decay(1.0, 0.9)(3) == pytest.approx(0.729)


def test_cosine_decay():
    s = cosine_decay(1.0, 100, end_value=0.1)
    assert s(0) == 1.0
    assert s(50) == pytest.approx(0.55)
    assert s(25) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert s(100) == 0.1 and s(10**6) == 0.1
    assert cosine_decay(1.0, 10)(10) == 0.0


def test_warmup_then_schedule_from_its_step_zero():
    inner = linear_decay(0.1, 100, 0.001)
    s = warmup(inner, 10, init_value=0.0)
    assert s(0) == 0.0
    assert s(5) == pytest.approx(0.05)
    assert s(9) == pytest.approx(0.09)
    for k in (10, 11, 60, 110, 5000):
        assert s(k) == inner(k - 10)
    assert warmup(0.3, 4)(2) == pytest.approx(0.15)  # a number is a constant schedule


def test_piecewise_restarts_each_piece():
    a, b, c = constant(1.0), linear(0.5, 0.0, 10), inverse_time(0.2, 5)
    s = piecewise([a, b, c], [20, 50])
    assert s(0) == 1.0 and s(19) == 1.0
    assert s(20) == 0.5 and s(25) == pytest.approx(0.25) and s(49) == 0.0
    assert s(50) == pytest.approx(0.2) and s(55) == pytest.approx(0.1)
    assert piecewise([0.1], [])(123) == 0.1


def test_schedules_return_python_floats():
    for s in [constant(1), linear_decay(1, 10), inverse_time(1, 2), step_decay(1, 0.5, 2),
              exponential_decay(1, 0.5), cosine_decay(1, 10), warmup(constant(1), 3)]:
        assert type(s(3)) is float


def test_negative_step_raises():
    for s in [constant(1), linear_decay(1, 10), inverse_time(1, 2), piecewise([1, 2], [3]),
              batch_size_schedule(4)]:
        with pytest.raises(ValueError, match="step"):
            s(-1)


# --------------------------------------------------------------------------- bad arguments
BAD = [
    (lambda: constant(-0.1), ValueError, "value"),
    (lambda: constant(float("nan")), ValueError, "value"),
    (lambda: constant(float("inf")), ValueError, "value"),
    (lambda: constant("0.1"), TypeError, "value"),
    (lambda: constant(True), TypeError, "value"),
    (lambda: linear_decay(-1.0, 10), ValueError, "init_value"),
    (lambda: linear_decay(0.1, 0), ValueError, "transition_steps"),
    (lambda: linear_decay(0.1, -5), ValueError, "transition_steps"),
    (lambda: linear_decay(0.1, 2.5), TypeError, "transition_steps"),
    (lambda: linear_decay(0.1, 10, -0.01), ValueError, "end_value"),
    (lambda: linear_decay(0.1, 10, 0.2), ValueError, "end_value"),
    (lambda: momentum_ramp(0.5, 1.0, 10), ValueError, "end_value"),
    (lambda: momentum_ramp(-0.1, 0.9, 10), ValueError, "init_value"),
    (lambda: momentum_ramp(0.9, 0.5, 10), ValueError, "end_value"),
    (lambda: inverse_time(0.1, 0), ValueError, "kappa"),
    (lambda: inverse_time(0.1, -3), ValueError, "kappa"),
    (lambda: step_decay(0.1, 0.0, 10), ValueError, "factor"),
    (lambda: step_decay(0.1, 1.5, 10), ValueError, "factor"),
    (lambda: step_decay(0.1, 0.5, 0), ValueError, "every"),
    (lambda: exponential_decay(0.1, 0.0), ValueError, "decay_rate"),
    (lambda: exponential_decay(0.1, 1.01), ValueError, "decay_rate"),
    (lambda: exponential_decay(0.1, 0.9, 0), ValueError, "transition_steps"),
    (lambda: cosine_decay(0.1, 0), ValueError, "decay_steps"),
    (lambda: cosine_decay(0.1, 10, -1.0), ValueError, "end_value"),
    (lambda: warmup(constant(0.1), 0), ValueError, "warmup_steps"),
    (lambda: warmup(constant(0.1), 5, init_value=-1), ValueError, "init_value"),
    (lambda: warmup(lambda k: 0.1, 5), TypeError, "schedule"),
    (lambda: piecewise([constant(1), constant(2)], []), ValueError, "boundaries"),
    (lambda: piecewise([constant(1), constant(2)], [0]), ValueError, r"boundaries\[0\]"),
    (lambda: piecewise([1, 2, 3], [10, 10]), ValueError, "boundaries"),
    (lambda: piecewise([], []), ValueError, "schedules"),
    (lambda: piecewise(constant(1), []), TypeError, "schedules"),
    (lambda: batch_size_schedule(0), ValueError, "init_size"),
    (lambda: batch_size_schedule(8, factor=0.5), ValueError, "factor"),
    (lambda: batch_size_schedule(8, every=0), ValueError, "every"),
    (lambda: batch_size_schedule(8, max_size=4), ValueError, "max_size"),
    (lambda: batch_size_schedule(8.0), TypeError, "init_size"),
    (lambda: ademamix_alpha(-1.0, 10), ValueError, "alpha"),
    (lambda: ademamix_alpha(5.0, 0), ValueError, "warmup"),
    (lambda: ademamix_beta3(1.0, 0.9, 10), ValueError, "beta3"),
    (lambda: ademamix_beta3(0.999, 0.0, 10), ValueError, "beta1"),
]


def test_ademamix_warmups_are_the_papers():
    """The authors' schedulers, at update k = step + 1: alpha linear from 0, beta3 linear
    in the half-life ln(1/2) / ln(beta + 1e-8) - 1 from beta1; held after the warm-up."""
    T, a, b1, b3 = 50, 8.0, 0.9, 0.9999
    sa, sb = ademamix_alpha(a, T), ademamix_beta3(b3, b1, T)

    def f(b):
        return math.log(0.5) / math.log(b + 1e-8) - 1

    for step in range(0, 120):
        k = step + 1
        if k < T:
            w = k / T
            assert sa(step) == w * a
            assert sb(step) == math.pow(0.5, 1 / ((1 - w) * f(b1) + w * f(b3) + 1))
        else:
            assert sa(step) == a and sb(step) == b3
    # the half-life grows steadily: each step's beta3 is above the last
    assert all(sb(s + 1) > sb(s) for s in range(T - 2))
    assert b1 < sb(0) < sb(T - 2) < b3


@pytest.mark.parametrize("make, exc, name", BAD)
def test_bad_arguments_raise_at_construction(make, exc, name):
    with pytest.raises(exc, match=name):
        make()


# --------------------------------------------------------------------------- repr / dict
ALL = [
    constant(0.1),
    linear_decay(0.1, 100),
    momentum_ramp(0.5, 0.9, 50),
    inverse_time(0.1, 20),
    step_decay(0.1, 0.5, 30),
    exponential_decay(0.1, 0.95, 10),
    cosine_decay(0.1, 100, 0.001),
    warmup(linear_decay(0.1, 100), 10, 0.01),
    piecewise([constant(0.1), warmup(inverse_time(0.05, 10), 5)], [100]),
    batch_size_schedule(16, 2, 100, 256),
    ademamix_alpha(5.0, 100),
    ademamix_beta3(0.9999, 0.9, 100),
]


@pytest.mark.parametrize("s", ALL, ids=lambda s: type(s).__name__)
def test_to_dict_round_trip_through_json(s):
    data = json.loads(json.dumps(s.to_dict()))
    t = Schedule.from_dict(data)
    assert type(t) is type(s)
    assert t == s
    assert repr(t) == repr(s)
    assert [t(k) for k in range(0, 400, 7)] == [s(k) for k in range(0, 400, 7)]


def test_repr_is_readable():
    assert repr(inverse_time(0.1, 20)) == "InverseTime(init_value=0.1, kappa=20.0)"
    assert repr(linear_decay(0.5, 10, 0.005)) == (
        "Linear(init_value=0.5, end_value=0.005, transition_steps=10)"
    )
    assert "Piecewise(schedules=[Constant(value=0.1)" in repr(ALL[8])


def test_from_dict_validates():
    with pytest.raises(ValueError, match="kappa"):
        Schedule.from_dict({"type": "inverse_time", "init_value": 0.1, "kappa": -1})
    with pytest.raises(ValueError, match="unknown schedule type"):
        Schedule.from_dict({"type": "nope"})
    with pytest.raises(ValueError, match="type"):
        Schedule.from_dict({"init_value": 0.1})


def test_user_subclass_registers_and_round_trips():
    class Halving(Schedule):
        kind = "test_halving"
        _fields = ("init_value",)

        def __init__(self, init_value):
            self.init_value = float(init_value)

        def __call__(self, step):
            return self.init_value * 0.5**step

    s = Halving(1.0)
    assert Schedule.from_dict(s.to_dict()) == s
    r = robbins_monro(s)
    assert r.method == "numeric" and not r.sum_diverges


# --------------------------------------------------------------------------- Robbins–Monro
def test_robbins_monro_linear_decay_then_constant_fails_8_13():
    r = robbins_monro(linear_decay(0.1, 1000))
    assert r.method == "analytic"
    assert r.sum_diverges and not r.sum_sq_converges and not r.satisfies
    assert "8.13" in r.explanation


def test_robbins_monro_linear_decay_to_zero_fails_8_12():
    r = robbins_monro(linear_decay(0.1, 1000, 0.0))
    assert not r.sum_diverges and r.sum_sq_converges and not r.satisfies
    assert "8.12" in r.explanation


def test_robbins_monro_inverse_time_satisfies():
    r = robbins_monro(inverse_time(0.1, 100))
    assert r.method == "analytic"
    assert r.sum_diverges and r.sum_sq_converges and r.satisfies


@pytest.mark.parametrize("s", [exponential_decay(0.1, 0.99), step_decay(0.1, 0.5, 100)])
def test_robbins_monro_geometric_decays_fail_8_12(s):
    r = robbins_monro(s)
    assert r.method == "analytic"
    assert not r.sum_diverges and r.sum_sq_converges and not r.satisfies
    assert "8.12" in r.explanation


@pytest.mark.parametrize(
    "s, sat",
    [
        (constant(0.1), False),
        (cosine_decay(0.1, 100, 0.001), False),
        (step_decay(0.1, 1.0, 10), False),
        (warmup(inverse_time(0.1, 10), 50), True),
        (piecewise([inverse_time(0.1, 10), constant(0.01)], [1000]), False),
        (piecewise([constant(0.01), inverse_time(0.1, 10)], [1000]), True),
    ],
)
def test_robbins_monro_other_analytic_cases(s, sat):
    r = robbins_monro(s)
    assert r.method == "analytic" and r.satisfies is sat


def test_constant_schedule_fails_8_13():
    r = robbins_monro(constant(0.1))
    assert r.sum_diverges and not r.sum_sq_converges


@pytest.mark.parametrize(
    "f, div, conv",
    [
        (lambda k: 0.5 / (k + 1), True, True),
        (lambda k: 0.5 / math.sqrt(k + 1), True, False),
        (lambda k: 0.1, True, False),
        (lambda k: 0.5 * 0.999**k, False, True),
        (lambda k: 1.0 / (k + 1) ** 2, False, True),
    ],
)
def test_robbins_monro_numeric_for_plain_callables(f, div, conv):
    r = robbins_monro(f)
    assert r.method == "numeric"
    assert (r.sum_diverges, r.sum_sq_converges, r.satisfies) == (div, conv, div and conv)
    assert "estimate" in r.explanation


def test_robbins_monro_rejects_negative_terms():
    with pytest.raises(ValueError, match=r"schedule\(0\) must be a finite step size >= 0"):
        robbins_monro(lambda k: -1.0)


# --------------------------------------------------------------------------- batch sizes
def test_batch_size_schedule_values():
    s = batch_size_schedule(32, factor=2, every=100, max_size=200)
    assert isinstance(s, BatchSizeSchedule)
    assert [s(k) for k in (0, 99, 100, 199, 200, 300, 10**9)] == [32, 32, 64, 64, 128, 200, 200]
    assert all(type(s(k)) is int for k in range(0, 1000, 50))
    t = batch_size_schedule(10, factor=1.5, every=1)
    assert [t(k) for k in range(4)] == [10, 15, 22, 34]  # round(10 * 1.5**k)


def test_batch_size_schedule_is_not_a_step_size():
    with pytest.raises(TypeError, match="step-size"):
        robbins_monro(batch_size_schedule(8))


# --------------------------------------------------------------------------- sampler
def _take(sampler, n):
    return [next(sampler).copy() for _ in range(n)]


def test_each_epoch_is_a_permutation_with_partial_last_batch():
    n = 103
    batches = _take(minibatches(n, 10, rng=1), 11 * 3)
    sizes = [len(b) for b in batches]
    assert sizes == ([10] * 10 + [3]) * 3
    for e in range(3):
        epoch = np.concatenate(batches[11 * e: 11 * (e + 1)])
        assert np.array_equal(np.sort(epoch), np.arange(n))
    assert not np.array_equal(np.concatenate(batches[:11]), np.concatenate(batches[11:22]))
    assert all(b.dtype == np.int64 for b in batches)


def test_drop_last_discards_the_remainder():
    batches = _take(minibatches(103, 10, rng=1, drop_last=True), 25)
    assert all(len(b) == 10 for b in batches)
    first = np.concatenate(batches[:10])
    assert len(np.unique(first)) == 100  # 3 samples of epoch 1 were dropped
    with pytest.raises(ValueError, match="batch_size"):
        minibatches(5, 10, rng=0, drop_last=True)


def test_sizes_follow_the_schedule():
    sched = batch_size_schedule(4, factor=2, every=3, max_size=32)
    sampler = minibatches(10_000, sched, rng=0)
    sizes = [len(next(sampler)) for _ in range(20)]
    assert sizes == [sched(k) for k in range(20)]
    assert sizes[:9] == [4, 4, 4, 8, 8, 8, 16, 16, 16] and sizes[-1] == 32


def test_schedule_crossing_epochs():
    sched = batch_size_schedule(3, factor=2, every=2)
    batches = _take(minibatches(10, sched, rng=5), 7)
    # scheduled 3,3,6,6,12,12,24: the epoch of 10 ends after 3+3+4 -> (3,3,4), (6,4), (10), (10)
    assert [len(b) for b in batches] == [3, 3, 4, 6, 4, 10, 10]
    assert np.array_equal(np.sort(np.concatenate(batches[:3])), np.arange(10))
    assert np.array_equal(np.sort(np.concatenate(batches[3:5])), np.arange(10))


def test_same_seed_same_batches_and_generator_argument():
    a = _take(minibatches(50, 7, rng=123), 20)
    b = _take(minibatches(50, 7, rng=np.random.default_rng(123)), 20)
    c = _take(minibatches(50, 7, rng=124), 20)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("cut", [0, 1, 5, 7, 8, 13])
@pytest.mark.parametrize("drop_last", [False, True])
def test_resume_mid_epoch_equals_uninterrupted(cut, drop_last):
    sched = batch_size_schedule(3, factor=2, every=4, max_size=8)
    full = _take(minibatches(23, sched, rng=7, drop_last=drop_last), 20)

    first = minibatches(23, sched, rng=7, drop_last=drop_last)
    head = _take(first, cut)
    state = json.loads(json.dumps(first.state_dict()))  # JSON-able
    resumed = minibatches(23, sched, rng=999, drop_last=drop_last)
    resumed.load_state_dict(state)
    tail = _take(resumed, 20 - cut)
    assert resumed.step == 20
    got = head + tail
    assert len(got) == len(full)
    for x, y in zip(got, full):
        assert np.array_equal(x, y)


def test_epochs_limit_and_read_only_batches():
    sampler = minibatches(10, 4, rng=0, epochs=2)
    batches = list(sampler)
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2]
    with pytest.raises(ValueError):
        batches[0][0] = 1
    assert isinstance(sampler, MinibatchSampler)


def test_load_state_dict_checks_shape():
    s = minibatches(10, 2, rng=0)
    next(s)
    with pytest.raises(ValueError, match="n_samples"):
        minibatches(11, 2, rng=0).load_state_dict(s.state_dict())


SAMPLER_BAD = [
    (lambda: minibatches(0, 4), ValueError, "n_samples"),
    (lambda: minibatches(10, 0), ValueError, "batch_size"),
    (lambda: minibatches(10, 2.5), TypeError, "batch_size"),
    (lambda: minibatches(10, 2, rng="seed"), TypeError, "rng"),
    (lambda: minibatches(10, 2, epochs=0), ValueError, "epochs"),
]


@pytest.mark.parametrize("make, exc, name", SAMPLER_BAD)
def test_sampler_bad_arguments(make, exc, name):
    with pytest.raises(exc, match=name):
        make()


def test_sampler_rejects_bad_scheduled_size():
    s = minibatches(10, lambda k: 0, rng=0)
    with pytest.raises(ValueError, match="batch_size"):
        next(s)


def test_schedules_are_pure():
    s = warmup(piecewise([linear_decay(0.1, 50), inverse_time(0.001, 10)], [50]), 5)
    forward = [s(k) for k in range(200)]
    backward = [s(k) for k in reversed(range(200))][::-1]
    assert forward == backward
    assert isinstance(Constant(1.0), Schedule)


def test_a_for_loop_over_minibatches_is_one_epoch():
    """The default is one epoch per loop (it used to never end without epochs=)."""
    sampler = minibatches(10, 4, rng=0)
    first = [b.copy() for b in sampler]
    assert [len(b) for b in first] == [4, 4, 2]
    assert np.array_equal(np.sort(np.concatenate(first)), np.arange(10))
    second = [b.copy() for b in sampler]                 # the next epoch, reshuffled
    assert [len(b) for b in second] == [4, 4, 2]
    assert np.array_equal(np.sort(np.concatenate(second)), np.arange(10))
    assert not np.array_equal(np.concatenate(first), np.concatenate(second))
    assert sampler.epoch == 2 and sampler.step == 6
    # the same stream as next(): a loop is a view of the sampler's stream
    stream = _take(minibatches(10, 4, rng=0), 6)
    assert all(np.array_equal(x, y) for x, y in zip(first + second, stream))


def test_a_loop_after_a_break_finishes_the_epoch_and_epochs_none_never_ends():
    sampler = minibatches(10, 4, rng=0, drop_last=True)
    for idx in sampler:
        break
    assert [len(b) for b in sampler] == [4]          # the rest of the epoch (2 dropped)
    assert [len(b) for b in sampler] == [4, 4]       # a whole epoch
    endless = minibatches(10, 4, rng=0, epochs=None)
    n = 0
    for _ in endless:
        n += 1
        if n == 50:
            break
    assert endless.step == 50 and endless.epoch == 17
    three = minibatches(10, 4, rng=0, epochs=3)
    assert len(list(three)) == 9 and len(list(three)) == 9


def test_the_hyperparameters_in_force_are_one_call_away():
    """param_groups holds the schedule; hyperparameters() its value at the coming step."""
    import ch8fast
    from ch8fast.schedules import linear_decay
    w = np.zeros(3)
    sched = linear_decay(0.1, 4, 0.02)
    opt = ch8fast.SGD([{"params": [w]}, {"params": [np.zeros(2)], "lr": 0.5}], lr=sched,
                      momentum=0.9)
    for k in range(6):
        values = opt.hyperparameters()
        assert values[0]["lr"] == sched(k) and values[1]["lr"] == 0.5
        assert values[0]["momentum"] == 0.9 and not callable(values[0]["lr"])
        opt.step([np.ones(3), np.ones(2)])
    assert callable(opt.param_groups[0]["lr"])
