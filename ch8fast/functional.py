"""Stateless update functions, for frameworks that keep their own optimizer state.

Each function applies one step of one rule, in place, to one parameter array and the state
arrays the caller owns (all C-contiguous, of the parameter's shape and dtype, and separate
buffers). It runs the same fused kernel as the optimizer classes, which build on the
``*_args`` helpers here: they turn hyperparameters into the per-step scalars of a rule,
in double precision, once per step.

>>> import numpy as np, ch8fast.functional as F
>>> w = np.zeros(3); g = np.ones(3); m = np.zeros(3); v = np.zeros(3)
>>> F.adam(w, g, m, v, step=1, lr=0.1)
>>> w
array([-0.1, -0.1, -0.1])
"""

import math

from ._isa import K
from ._validation import (betas_pair, check_disjoint, check_param, check_state,
                          nonnegative, positive, step_count, unit_interval)

__all__ = ["sgd", "momentum", "adagrad", "rmsprop", "adam", "adadelta"]

_R = K.RULES
_L2, _NESTEROV, _AMSGRAD = K.FLAGS["l2"], K.FLAGS["nesterov"], K.FLAGS["amsgrad"]


# ---------------------------------------------------------------------------------------
# Per-step scalars of each rule: the argument tuple of ``Table.run``
# (rule, lr, wd, decay, alpha, alpha_next, rho, beta1, beta2, c2, eps, flags).
# ---------------------------------------------------------------------------------------

def sgd_args(lr, weight_decay):
    return (_R["sgd"], lr, weight_decay, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0,
            _L2 if weight_decay else 0)


def momentum_args(lr, momentum, weight_decay, nesterov=False, momentum_next=None):
    """``momentum_next`` is the momentum of the next step, which places the interim point
    of the shifted Nesterov form; it defaults to ``momentum``."""
    a_next = momentum if momentum_next is None else momentum_next
    flags = (_L2 if weight_decay else 0) | (_NESTEROV if nesterov else 0)
    return (_R["momentum"], lr, weight_decay, 1.0, momentum, a_next, 0.0, 0.0, 0.0, 1.0,
            0.0, flags)


def adagrad_args(lr, eps, weight_decay):
    return (_R["adagrad"], lr, weight_decay, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, eps,
            _L2 if weight_decay else 0)


def rmsprop_args(lr, rho, eps, weight_decay, momentum=None, nesterov=False,
                 momentum_next=None):
    """``momentum=None``: plain RMSProp (Alg 8.5), no velocity. A number (even 0):
    RMSProp with momentum, which needs a velocity array (Alg 8.6 when ``nesterov``)."""
    l2 = _L2 if weight_decay else 0
    if momentum is None:
        return (_R["rmsprop"], lr, weight_decay, 1.0, 0.0, 0.0, rho, 0.0, 0.0, 1.0, eps, l2)
    a_next = momentum if momentum_next is None else momentum_next
    return (_R["rmsprop_momentum"], lr, weight_decay, 1.0, momentum, a_next, rho, 0.0, 0.0,
            1.0, eps, l2 | (_NESTEROV if nesterov else 0))


def adam_args(lr, beta1, beta2, eps, weight_decay, step, decoupled=False, amsgrad=False):
    """Bias corrections folded into two scalars (Alg 8.7): the step size
    lr / (1 - beta1^t) and c2 = 1 / sqrt(1 - beta2^t), so that
    theta <- theta - step_size * s / (sqrt(r) * c2 + delta)."""
    step_size = lr / (1.0 - beta1 ** step)
    c2 = 1.0 / math.sqrt(1.0 - beta2 ** step)
    if decoupled:
        decay, flags = 1.0 - lr * weight_decay, 0
    else:
        decay, flags = 1.0, (_L2 if weight_decay else 0)
    if amsgrad:
        flags |= _AMSGRAD
    return (_R["adam"], step_size, weight_decay, decay, 0.0, 0.0, 0.0, beta1, beta2, c2,
            eps, flags)


def adadelta_args(lr, rho, eps, weight_decay):
    return (_R["adadelta"], lr, weight_decay, 1.0, 0.0, 0.0, rho, 0.0, 0.0, 1.0, eps,
            _L2 if weight_decay else 0)


# ---------------------------------------------------------------------------------------
# The functions
# ---------------------------------------------------------------------------------------

def _apply(args, param, grad, states, state_names):
    """Check the arrays, then run the kernel on them as a one-row table."""
    check_param(param, "param")
    for a, n in zip(states, state_names):
        check_state(a, param, n, "param")
    check_disjoint([param, *states], ["param", *state_names])
    guard = K.Guard([param, *states])
    table = K.Table([param], [[a] for a in states], [0], guard)
    try:
        table.bind([grad])
    except (TypeError, ValueError) as exc:
        raise type(exc)(str(exc).replace("grads[0]", "grad")) from None
    table.run(*args)


def sgd(param, grad, *, lr, weight_decay=0.0):
    """theta <- theta - lr * g (Algorithm 8.1), in place."""
    args = sgd_args(nonnegative(lr, "lr"), nonnegative(weight_decay, "weight_decay"))
    _apply(args, param, grad, [], [])


def momentum(param, grad, velocity, *, lr, momentum, nesterov=False, weight_decay=0.0,
             momentum_next=None):
    """v <- alpha v - lr g (8.15); theta <- theta + v (8.16), in place.

    With ``nesterov=True``, ``param`` holds the interim point phi = theta + alpha v of the
    shifted Nesterov form (see ``ch8fast.SGD``).
    """
    a = unit_interval(momentum, "momentum")
    a_next = a if momentum_next is None else unit_interval(momentum_next, "momentum_next")
    args = momentum_args(nonnegative(lr, "lr"), a,
                         nonnegative(weight_decay, "weight_decay"), bool(nesterov), a_next)
    _apply(args, param, grad, [velocity], ["velocity"])


def adagrad(param, grad, sum_sq, *, lr, eps=1e-7, weight_decay=0.0):
    """r <- r + g*g; theta <- theta - lr g / (eps + sqrt(r)) (Algorithm 8.4), in place."""
    args = adagrad_args(nonnegative(lr, "lr"), positive(eps, "eps"),
                        nonnegative(weight_decay, "weight_decay"))
    _apply(args, param, grad, [sum_sq], ["sum_sq"])


def rmsprop(param, grad, square_avg, velocity=None, *, lr, rho=0.9, eps=1e-6,
            momentum=0.0, nesterov=False, weight_decay=0.0, momentum_next=None):
    """r <- rho r + (1 - rho) g*g; theta <- theta - lr g / sqrt(eps + r) (Algorithm 8.5).

    With a ``velocity`` array: v <- alpha v - lr g / sqrt(eps + r); theta <- theta + v
    (Algorithm 8.6, in the shifted form when ``nesterov``).
    """
    lr, rho = nonnegative(lr, "lr"), unit_interval(rho, "rho")
    eps, wd = positive(eps, "eps"), nonnegative(weight_decay, "weight_decay")
    a = unit_interval(momentum, "momentum")
    if velocity is None:
        if a or nesterov:
            raise ValueError("momentum and nesterov need a velocity array")
        _apply(rmsprop_args(lr, rho, eps, wd), param, grad, [square_avg], ["square_avg"])
        return
    a_next = a if momentum_next is None else unit_interval(momentum_next, "momentum_next")
    args = rmsprop_args(lr, rho, eps, wd, a, bool(nesterov), a_next)
    _apply(args, param, grad, [square_avg, velocity], ["square_avg", "velocity"])


def adam(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq=None, *, step, lr=1e-3,
         betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False):
    """One Adam step (Algorithm 8.7), in place; ``step`` is t, counting from 1.

    Pass ``max_exp_avg_sq`` for AMSGrad, ``decoupled_weight_decay=True`` for AdamW.
    """
    b1, b2 = betas_pair(betas, "betas")
    args = adam_args(nonnegative(lr, "lr"), b1, b2, positive(eps, "eps"),
                     nonnegative(weight_decay, "weight_decay"), step_count(step, "step"),
                     bool(decoupled_weight_decay), max_exp_avg_sq is not None)
    states, names = [exp_avg, exp_avg_sq], ["exp_avg", "exp_avg_sq"]
    if max_exp_avg_sq is not None:
        states.append(max_exp_avg_sq)
        names.append("max_exp_avg_sq")
    _apply(args, param, grad, states, names)


def adadelta(param, grad, square_avg, acc_delta, *, lr=1.0, rho=0.95, eps=1e-6,
             weight_decay=0.0):
    """One AdaDelta step (Zeiler 2012), in place."""
    args = adadelta_args(nonnegative(lr, "lr"), unit_interval(rho, "rho"),
                         positive(eps, "eps"), nonnegative(weight_decay, "weight_decay"))
    _apply(args, param, grad, [square_avg, acc_delta], ["square_avg", "acc_delta"])
