"""Schedules of hyperparameters, minibatch sampling, and the Robbins–Monro analysis.

* :mod:`ch8fast.schedules.schedule`: pure ``step -> value`` schedules for the learning
  rate, the momentum coefficient and the minibatch size (8.3.1-8.3.2);
* :mod:`ch8fast.schedules.sampling`: :func:`minibatches`, index arrays of scheduled size,
  reshuffled every epoch;
* :mod:`ch8fast.schedules.convergence`: :func:`robbins_monro`, whether a schedule
  satisfies the conditions (8.12) and (8.13).

Every name is importable from ``ch8fast.schedules``.
"""
from .convergence import RobbinsMonroReport, robbins_monro
from .sampling import MinibatchSampler, minibatches
from .schedule import (AdemamixAlpha, AdemamixBeta3, BatchSizeSchedule, Constant,
                       CosineDecay, ExponentialDecay, InverseTime, Linear, Piecewise,
                       Schedule, StepDecay, Warmup, ademamix_alpha, ademamix_beta3,
                       batch_size_schedule, constant, cosine_decay, exponential_decay,
                       inverse_time, linear, linear_decay, momentum_ramp, piecewise,
                       step_decay, warmup)

__all__ = [
    "Schedule", "Constant", "Linear", "InverseTime", "StepDecay", "ExponentialDecay",
    "CosineDecay", "Warmup", "Piecewise", "BatchSizeSchedule", "AdemamixAlpha",
    "AdemamixBeta3", "ademamix_alpha", "ademamix_beta3",
    "constant", "linear", "linear_decay", "momentum_ramp", "inverse_time", "step_decay",
    "exponential_decay", "cosine_decay", "warmup", "piecewise", "batch_size_schedule",
    "RobbinsMonroReport", "robbins_monro", "MinibatchSampler", "minibatches",
]
