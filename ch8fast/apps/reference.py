"""Plain NumPy implementations of every update rule, written from the book's equations.

The oracle of the tests, which check every kernel against it, and a contender of the
benchmark (``ch8fast bench``: the formulas as written, with NumPy temporaries). Nothing
in the library imports it. Each rule is written as the book writes it (temporaries and
all), in the parameters' dtype: hyperparameters are Python floats, which NumPy applies to
float32 arrays in float32. A reference optimizer takes every hyperparameter of its rule
(complete them with ``rule.defaults()`` of :mod:`ch8fast.rules`: it has no defaults of its
own) and works on copies of the parameters.
"""

import numpy as np

__all__ = ["Reference", "SGD", "AdaGrad", "RMSProp", "Adam", "AdaDelta", "Lion", "ADOPT",
           "AdEMAMix", "ScheduleFreeSGD", "ScheduleFreeAdamW", "LAMB", "LARS", "for_rule",
           "nesterov_literal"]


class Reference:
    """A reference optimizer over copies of the parameters: ``step(grads)``."""

    def __init__(self, params, **hyper):
        self.params = [p.copy() for p in params]
        self.h = hyper
        self.state = [self.init_state(p) for p in self.params]
        self.t = 0

    def init_state(self, p):
        return {}

    def step(self, grads):
        self.t += 1
        for i, (p, g) in enumerate(zip(self.params, grads)):
            self.params[i] = self.update(p, g.copy(), self.state[i])

    def l2(self, p, g):
        wd = self.h.get("weight_decay", 0.0)
        return g + wd * p if wd else g


class SGD(Reference):
    """theta <- theta - eps g (Alg 8.1); with momentum: v <- alpha v - eps g (8.15),
    theta <- theta + v (8.16). Nesterov in the shifted form of spec section 3:
    phi' = phi - alpha v + (1 + alpha) v'."""

    def init_state(self, p):
        return {"velocity": np.zeros_like(p)} if self.h.get("momentum", 0) else {}

    def update(self, p, g, st):
        g = self.l2(p, g)
        lr, alpha = self.h["lr"], self.h.get("momentum", 0.0)
        if not alpha:
            return p - lr * g
        v = st["velocity"]
        v_new = alpha * v - lr * g
        st["velocity"] = v_new
        if self.h.get("nesterov"):
            return p - alpha * v + (1 + alpha) * v_new
        return p + v_new


class AdaGrad(Reference):
    """r <- r + g*g; dtheta = -eps / (delta + sqrt(r)) * g (Alg 8.4)."""

    def init_state(self, p):
        return {"sum": np.full_like(p, self.h.get("initial_accumulator_value", 0.0))}

    def update(self, p, g, st):
        g = self.l2(p, g)
        st["sum"] = st["sum"] + g * g
        return p + (-self.h["lr"] / (self.h["eps"] + np.sqrt(st["sum"]))) * g


class RMSProp(Reference):
    """r <- rho r + (1 - rho) g*g; dtheta = -eps / sqrt(delta + r) * g (Alg 8.5).
    With momentum: v <- alpha v - eps / sqrt(delta + r) * g; theta <- theta + v (Alg 8.6,
    Nesterov in the shifted form). Centered (Graves 2013): gbar <- rho gbar + (1 - rho) g,
    and r - gbar^2 in place of r."""

    def init_state(self, p):
        st = {"square_avg": np.zeros_like(p)}
        if self.h.get("momentum", 0):
            st["velocity"] = np.zeros_like(p)
        if self.h.get("centered"):
            st["grad_avg"] = np.zeros_like(p)
        return st

    def update(self, p, g, st):
        g = self.l2(p, g)
        lr, rho, eps = self.h["lr"], self.h["rho"], self.h["eps"]
        st["square_avg"] = rho * st["square_avg"] + (1 - rho) * (g * g)
        var = st["square_avg"]
        if self.h.get("centered"):
            st["grad_avg"] = rho * st["grad_avg"] + (1 - rho) * g
            var = var - st["grad_avg"] * st["grad_avg"]
        step = -lr / np.sqrt(eps + var) * g
        alpha = self.h.get("momentum", 0.0)
        if not alpha:
            return p + step
        v = st["velocity"]
        v_new = alpha * v + step
        st["velocity"] = v_new
        if self.h.get("nesterov"):
            return p - alpha * v + (1 + alpha) * v_new
        return p + v_new


class Adam(Reference):
    """Alg 8.7 with bias correction; AMSGrad uses max(r) so far; decoupled decay scales
    theta by 1 - lr * wd first (AdamW)."""

    def init_state(self, p):
        st = {"exp_avg": np.zeros_like(p), "exp_avg_sq": np.zeros_like(p)}
        if self.h.get("amsgrad"):
            st["max_exp_avg_sq"] = np.zeros_like(p)
        return st

    def update(self, p, g, st):
        lr, (b1, b2), eps = self.h["lr"], self.h["betas"], self.h["eps"]
        wd, t = self.h.get("weight_decay", 0.0), self.t
        if self.h.get("decoupled_weight_decay"):
            p = p * (1 - lr * wd)
        elif wd:
            g = g + wd * p
        st["exp_avg"] = b1 * st["exp_avg"] + (1 - b1) * g
        st["exp_avg_sq"] = b2 * st["exp_avg_sq"] + (1 - b2) * (g * g)
        r = st["exp_avg_sq"]
        if self.h.get("amsgrad"):
            st["max_exp_avg_sq"] = np.maximum(st["max_exp_avg_sq"], r)
            r = st["max_exp_avg_sq"]
        s_hat = st["exp_avg"] / (1 - b1 ** t)
        r_hat = r / (1 - b2 ** t)
        return p - lr * s_hat / (np.sqrt(r_hat) + eps)


class AdaDelta(Reference):
    """Zeiler 2012: E[g^2], the step -sqrt(E[dx^2] + eps) / sqrt(E[g^2] + eps) * g, then
    E[dx^2]; theta moves by lr times the step."""

    def init_state(self, p):
        return {"square_avg": np.zeros_like(p), "acc_delta": np.zeros_like(p)}

    def update(self, p, g, st):
        g = self.l2(p, g)
        lr, rho, eps = self.h["lr"], self.h["rho"], self.h["eps"]
        st["square_avg"] = rho * st["square_avg"] + (1 - rho) * (g * g)
        d = np.sqrt(st["acc_delta"] + eps) / np.sqrt(st["square_avg"] + eps) * g
        st["acc_delta"] = rho * st["acc_delta"] + (1 - rho) * (d * d)
        return p - lr * d


class Lion(Reference):
    """Chen et al. 2023, Algorithm 2: c = b1 m + (1 - b1) g; theta <- theta - lr (sign(c)
    + lambda theta); m <- b2 m + (1 - b2) g."""

    def init_state(self, p):
        return {"exp_avg": np.zeros_like(p)}

    def update(self, p, g, st):
        lr, wd = self.h["lr"], self.h["weight_decay"]
        b1, b2 = self.h["betas"]
        if self.h.get("maximize"):
            g = -g
        m = st["exp_avg"]
        c = b1 * m + (1 - b1) * g
        st["exp_avg"] = b2 * m + (1 - b2) * g
        return p - lr * (np.sign(c) + wd * p)


class ADOPT(Reference):
    """Taniguchi et al. 2024, Algorithm 2, with the clipping of their code and optax's:
    at step t = 1, v <- g^2 and nothing else; then u = clip(g / max(sqrt(v), eps),
    (t - 1)^p), m <- b1 m + (1 - b1) u, theta <- theta - lr m (optax's Nesterov: lr (b1 m
    + (1 - b1) u)), v <- b2 v + (1 - b2) g^2."""

    def init_state(self, p):
        return {"exp_avg": np.zeros_like(p), "exp_avg_sq": np.zeros_like(p)}

    def update(self, p, g, st):
        lr, (b1, b2), eps = self.h["lr"], self.h["betas"], self.h["eps"]
        wd, t = self.h.get("weight_decay", 0.0), self.t
        if self.h.get("maximize"):
            g = -g
        if self.h.get("decoupled_weight_decay"):
            p = p * (1 - lr * wd)
        elif wd:
            g = g + wd * p
        m, v = st["exp_avg"], st["exp_avg_sq"]
        if t == 1:
            st["exp_avg_sq"] = g * g
            return p - lr * m
        u = g / np.maximum(np.sqrt(v), eps)
        if self.h.get("use_clipping", True):
            c = float(t - 1) ** self.h["clip_exponent"]
            u = np.clip(u, -c, c)
        m = b1 * m + (1 - b1) * u
        st["exp_avg"] = m
        st["exp_avg_sq"] = b2 * v + (1 - b2) * (g * g)
        step = b1 * m + (1 - b1) * u if self.h.get("nesterov") else m
        return p - lr * step


class AdEMAMix(Reference):
    """Pagliardini et al. 2024, Algorithm 1: the fast moment s (beta1) bias-corrected, the
    slow one (beta3) not, r (beta2) bias-corrected; theta <- theta - lr ((s_hat + alpha
    s_slow) / (sqrt(r_hat) + eps) + wd theta). ``alpha`` and ``beta3`` may be schedules
    (called with the number of completed steps, ch8fast's convention)."""

    def init_state(self, p):
        return {"exp_avg_fast": np.zeros_like(p), "exp_avg_slow": np.zeros_like(p),
                "exp_avg_sq": np.zeros_like(p)}

    def update(self, p, g, st):
        lr, (b1, b2), eps = self.h["lr"], self.h["betas"], self.h["eps"]
        wd, t = self.h.get("weight_decay", 0.0), self.t
        b3, alpha = self.h["beta3"], self.h["alpha"]
        b3 = b3(t - 1) if callable(b3) else b3
        alpha = alpha(t - 1) if callable(alpha) else alpha
        if self.h.get("maximize"):
            g = -g
        st["exp_avg_fast"] = b1 * st["exp_avg_fast"] + (1 - b1) * g
        st["exp_avg_slow"] = b3 * st["exp_avg_slow"] + (1 - b3) * g
        st["exp_avg_sq"] = b2 * st["exp_avg_sq"] + (1 - b2) * (g * g)
        s_hat = st["exp_avg_fast"] / (1 - b1 ** t)
        r_hat = st["exp_avg_sq"] / (1 - b2 ** t)
        u = (s_hat + alpha * st["exp_avg_slow"]) / (np.sqrt(r_hat) + eps)
        return p - lr * (u + wd * p)


class ScheduleFreeSGD(Reference):
    """Defazio et al. 2024, Algorithm 1, the three sequences kept apart: the parameters are
    y = (1 - beta) z + beta x, where the gradient is taken; z <- z - lr_t u with
    u = g + wd y; x <- (1 - c) x + c z with c = w_t / (w_1 + ... + w_t),
    w_t = t^r (max_{j <= t} lr_j)^p; lr_t = lr min(1, t / warmup_steps). With
    ``convention="optax"`` the z step takes lr_{t-1} (optax.contrib.schedule_free's base
    optimizer counts from 0). ``lr`` may be a schedule (called with the number of completed
    steps, ch8fast's convention). ``x`` is theta."""

    def __init__(self, params, **hyper):
        super().__init__(params, **hyper)
        self.x = [p.copy() for p in self.params]
        self.weight_sum = 0.0
        self.lr_max = 0.0

    def init_state(self, p):
        return {"z": p.copy()}

    def beta(self):
        return self.h["momentum"]

    def direction(self, y, g, st):
        return self.l2(y, g)

    def lr_at(self, s, r):
        """The learning rate with its schedule at ``s`` completed steps and its warm-up
        at update ``r``."""
        lr, warm = self.h["lr"], self.h["warmup_steps"]
        return (lr(s) if callable(lr) else lr) * (min(r, warm) / warm if warm else 1.0)

    def step(self, grads):
        self.t += 1
        t, beta = self.t, self.beta()
        if self.h.get("convention") == "optax":
            lr_z, lr_w = self.lr_at(t - 1, t - 1), self.lr_at(t, t)
        else:
            lr_z = lr_w = self.lr_at(t - 1, t)
        self.lr_max = max(self.lr_max, lr_w)
        w = t ** self.h["r"] * self.lr_max ** self.h["weight_lr_power"]
        self.weight_sum += w
        c = w / self.weight_sum if self.weight_sum else 0.0
        for i, (y, g) in enumerate(zip(self.params, grads)):
            st = self.state[i]
            g = -g if self.h.get("maximize") else g.copy()
            u = self.direction(y, g, st)
            st["z"] = st["z"] - lr_z * u
            self.x[i] = (1 - c) * self.x[i] + c * st["z"]
            self.params[i] = beta * self.x[i] + (1 - beta) * st["z"]

    def theta(self):
        return [x.copy() for x in self.x]


class ScheduleFreeAdamW(ScheduleFreeSGD):
    """Defazio et al. 2024, Algorithm 2 (AdamW): as :class:`ScheduleFreeSGD` with
    r <- b2 r + (1 - b2) g*g, u = g / (sqrt(r / (1 - b2^t)) + eps) + wd y and
    beta = betas[0]."""

    def init_state(self, p):
        return {"z": p.copy(), "exp_avg_sq": np.zeros_like(p)}

    def beta(self):
        return self.h["betas"][0]

    def direction(self, y, g, st):
        b2 = self.h["betas"][1]
        st["exp_avg_sq"] = b2 * st["exp_avg_sq"] + (1 - b2) * (g * g)
        r_hat = st["exp_avg_sq"] / (1 - b2 ** self.t)
        return self.l2(y, g / (np.sqrt(r_hat) + self.h["eps"]))


def _trust_ratio(p, u, coefficient=1.0, eps=0.0):
    """``coefficient norm(p) / (norm(u) + eps)``, 1 where either norm is 0."""
    pn, un = np.sqrt(np.sum(p.astype(np.float64) ** 2)), np.sqrt(
        np.sum(u.astype(np.float64) ** 2))
    return 1.0 if pn == 0 or un == 0 else coefficient * pn / (un + eps)


class LAMB(Reference):
    """You et al. 2020, Algorithm 2: Adam's bias-corrected direction u plus wd theta,
    scaled per array by the norm of theta over the norm of u; ``exclude_1d``: arrays of
    fewer than 2 dimensions take neither the ratio nor the decay."""

    def init_state(self, p):
        return {"exp_avg": np.zeros_like(p), "exp_avg_sq": np.zeros_like(p)}

    def update(self, p, g, st):
        (b1, b2), eps, t = self.h["betas"], self.h["eps"], self.t
        skip = self.h.get("exclude_1d") and p.ndim < 2
        wd = 0.0 if skip else self.h["weight_decay"]
        lr = self.h["lr"]
        if self.h.get("convention") == "keras":
            # keras.optimizers.Lamb: a float32 rate, the decoupled decay first, whose
            # theta the ratio then measures, and no decay in u
            lr = float(np.float32(lr))
            p = p * (1 - lr * wd)
            wd = 0.0
        if self.h.get("maximize"):
            g = -g
        st["exp_avg"] = b1 * st["exp_avg"] + (1 - b1) * g
        st["exp_avg_sq"] = b2 * st["exp_avg_sq"] + (1 - b2) * (g * g)
        s_hat = st["exp_avg"] / (1 - b1 ** t)
        r_hat = st["exp_avg_sq"] / (1 - b2 ** t)
        u = s_hat / (np.sqrt(r_hat) + eps) + wd * p
        ratio = 1.0 if skip else _trust_ratio(p, u)
        return p - lr * ratio * u


class LARS(Reference):
    """You et al. 2017 with momentum, as optax.lars: u = g + wd theta, the step
    lr c ``norm(theta) / (norm(u) + e)`` u per array into the velocity,
    v <- alpha v - step, theta <- theta + v (Nesterov: theta + alpha v' - step)."""

    def init_state(self, p):
        return {"velocity": np.zeros_like(p)}

    def update(self, p, g, st):
        skip = self.h.get("exclude_1d") and p.ndim < 2
        wd = 0.0 if skip else self.h["weight_decay"]
        alpha = self.h["momentum"]
        alpha = alpha(self.t - 1) if callable(alpha) else alpha
        lr = self.h["lr"]
        lr = lr(self.t - 1) if callable(lr) else lr
        if self.h.get("maximize"):
            g = -g
        u = g + wd * p
        ratio = 1.0 if skip else _trust_ratio(p, u, self.h["trust_coefficient"],
                                              self.h["eps"])
        step = lr * ratio * u
        st["velocity"] = alpha * st["velocity"] - step
        if self.h.get("nesterov"):
            return p + alpha * st["velocity"] - step
        return p + st["velocity"]


def nesterov_literal(theta, grad_at, lr, alpha, steps):
    """The book's Algorithm 8.3 verbatim: gradient at theta + alpha v."""
    theta = theta.copy()
    v = np.zeros_like(theta)
    for _ in range(steps):
        g = grad_at(theta + alpha * v)
        v = alpha * v - lr * g
        theta = theta + v
    return theta


def for_rule(rule):
    """The reference class of a :class:`ch8fast.rules.Rule` (AdamW's is :class:`Adam`,
    with ``decoupled_weight_decay=True`` among the rule's defaults)."""
    return {"SGD": SGD, "AdaGrad": AdaGrad, "RMSProp": RMSProp, "Adam": Adam,
            "AdamW": Adam, "AdaDelta": AdaDelta, "Lion": Lion, "ADOPT": ADOPT,
            "AdEMAMix": AdEMAMix, "ScheduleFreeSGD": ScheduleFreeSGD,
            "ScheduleFreeAdamW": ScheduleFreeAdamW, "LAMB": LAMB, "LARS": LARS}[rule.name]
