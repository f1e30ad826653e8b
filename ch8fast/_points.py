"""Where a rule keeps the parameter arrays between steps: the rule hook ``Rule.point``.

Most rules keep theta in the arrays, the point the user evaluates and saves
(:class:`Point`). Nesterov momentum in its shifted form keeps the interim point
phi = theta + alpha v there instead (:class:`InterimPoint`): the gradient the model computes
"at the parameters" is then the gradient at the interim point, and ``theta()`` and
``at_theta()`` give theta back. A rule that keeps its arrays elsewhere (e.g. the two
sequences of schedule-free methods) declares its own subclass; ``Optimizer`` only calls
the hooks below.
"""

import contextlib

import numpy as np

from . import storage
from ._isa import K
from ._statedict import FORMS, LITERAL, SHIFTED
from ._validation import unit_interval
from .sparse import SparseRows


def _untouched(p, g):
    """The rows of ``p`` a row-sparse gradient ``g`` leaves alone (a mask), else None."""
    if type(g) is not SparseRows:
        return None
    rest = np.ones(p.shape[0], bool)
    rest[g.indices] = False
    return rest


class Point:
    """The arrays hold theta. One per optimizer, made with it (``opt._point``)."""

    #: the per-group numbers this point keeps between steps (saved in ``state_dict()``'s
    #: param groups by these names)
    COUNTERS = ()

    def __init__(self, opt):
        self.opt = opt
        self.depth = 0          # inside at_theta(): its nesting
        self.between = None     # inside at_theta(): {param index: the arrays between steps}

    # ---- the arrays' values, whatever their storage -------------------------------------

    def state_values(self, i, name):
        """State ``name`` of parameter ``i`` as computed numbers: the array itself if it is
        stored so, else a decoded float32 copy."""
        core = self.opt._core
        how = core.how[i][1][name]
        st = core.state[i]
        if how == "float32":
            return st[name]
        return storage.decode(how, st[name], st.get(name + ".absmax"))

    def phi_values(self, i):
        """What parameter ``i`` is, precisely, between steps (float32 for a 16-bit one:
        its master copy, or the array plus its compensation)."""
        core = self.opt._core
        keep, p, st = core.how[i][0], core.params[i], core.state[i]
        if keep == "none":
            return p
        if keep == "master":
            return storage.sync_master(p, st["master"])
        phi = storage.to_float32(p)
        if keep == "kahan":
            phi = phi + storage.decode("bfloat16", st["compensation"])
        return phi

    def set_phi(self, i, values, rows=None):
        """Make parameter ``i`` (or its ``rows``) hold ``values`` (float32 for a 16-bit
        one), keeping its master copy or compensation consistent."""
        core = self.opt._core
        keep, p, st = core.how[i][0], core.params[i], core.state[i]
        sel = slice(None) if rows is None else rows
        if keep == "none":
            p[sel] = values
            return
        if keep == "master":
            st["master"][sel] = values
        part = p[sel] if rows is not None else p         # (a copy for rows)
        storage.round_to(part, values, saturate=keep == "kahan")
        if rows is not None:
            p[rows] = part
        if keep == "kahan":
            st["compensation"][sel] = K.encode_block_state(
                "bfloat16", np.ascontiguousarray(values - storage.to_float32(part),
                                                 np.float32).reshape(-1))[0].reshape(
                np.shape(part))

    # ---- hooks of a step ----------------------------------------------------------------

    def hooked(self, metas):
        """The groups (indices) whose arrays this point keeps elsewhere than theta: the
        step hooks below run for an optimizer with any."""
        return ()

    def counters(self, gi):
        """``{name: value}`` of group ``gi``'s :attr:`COUNTERS`."""
        return {}

    def set_counters(self, values):
        """Restore every group's counters (a list of dicts, checked)."""

    def group_changed(self, group, keys):
        """A group was edited (``keys`` changed)."""

    def before_step(self, core):
        """Before a ``step(grads)``: returns what ``after_step`` needs."""
        return None

    def after_step(self, core, grads, token):
        """After the kernels of a ``step(grads)`` ran (or skipped the step)."""

    def closure_step(self, core, closure, grad_norm):
        """A step whose gradients come from ``closure``, evaluated at the arrays."""
        return self.run_closure(core, closure, grad_norm, 0)[0]

    def run_closure(self, core, closure, grad_norm, form):
        """Call ``closure``, bind the gradients it returns and run the kernels in Nesterov
        form ``form`` (or skip the step): ``(loss, grads, applied)``."""
        opt = self.opt
        out = closure()
        loss, grads = None, out
        if (isinstance(out, tuple) and len(out) == 2
                and not isinstance(out[0], (np.ndarray, list, tuple))):
            loss, grads = out
        grads = opt._as_grads(grads, len(core.params))
        core.engine.bind(grads)
        plan = opt._clip_plan(core, grads, grad_norm)
        if plan is None:
            opt.skipped_steps += 1
            return loss, grads, False
        core.engine.run(plan, form)
        return loss, grads, True

    # ---- theta -----------------------------------------------------------------------

    def theta_rows(self):
        """(group index, parameter index) of every array that does not hold theta now."""
        return []

    def theta_into(self, gi, i, out):
        """theta of parameter ``i`` (group ``gi``) into ``out``."""
        np.copyto(out, self.opt._core.params[i])
        return out

    def after_theta(self):
        """At the end of the outermost ``at_theta()`` block."""

    def rebuilt(self):
        """The optimizer's arrays were rebuilt (a parameter added or removed)."""

    def theta(self):
        """The parameters theta, as new arrays."""
        opt = self.opt
        with opt._lock:
            out = [p.copy() for p in opt._core.params]
            for gi, i in self.theta_rows():
                self.theta_into(gi, i, out[i])
            return out

    @contextlib.contextmanager
    def at_theta(self):
        """The arrays hold theta within the block, and exactly their bits afterwards."""
        opt = self.opt
        with opt._lock:
            if opt._busy:
                opt._refuse_reentry("at_theta()")
            if self.depth:
                self.depth += 1
                try:
                    yield opt._core.params
                finally:
                    self.depth -= 1
                return
            rows = self.theta_rows()
            params = opt._core.params
            saved = {i: params[i].copy() for _, i in rows}
            for gi, i in rows:
                self.theta_into(gi, i, params[i])
            self.between = saved
            self.depth = 1
            try:
                yield params
            finally:
                for i, a in saved.items():
                    np.copyto(params[i], a)
                self.depth = 0
                self.between = None
                self.after_theta()


class InterimPoint(Point):
    """Nesterov momentum's shifted form: between steps the arrays of a Nesterov group hold
    phi = theta + alpha v (before the first step phi = theta), and ``step(grads)`` applies
    phi' = phi - alpha v + (1 + alpha') v' in one pass, alpha' the next step's momentum. A
    step with a closure is the book's literal algorithm instead: the arrays hold theta,
    move to theta + alpha v for the closure, and the update leaves theta' in them."""

    def __init__(self, opt):
        super().__init__(opt)
        self.scratch = None     # theta during a literal step
        self.pending = set()    # groups whose momentum was set inside at_theta()

    # ---- a momentum set between steps ----------------------------------------------------

    def group_changed(self, group, keys):
        """Setting the momentum of a Nesterov group whose arrays hold an interim point
        moves them at once to the new one, theta + alpha v, so that the next gradient is
        taken at the right point."""
        opt = self.opt
        if "momentum" not in keys or opt._core is None:
            return
        with opt._lock:
            core = opt._core
            if opt._busy or core.engine.form != SHIFTED:
                return
            for gi in core.nesterov:
                if opt.param_groups[gi] is group:
                    break
            else:
                return
            if self.depth:                   # the arrays hold theta: move at the end
                self.pending.add(gi)
                return
            self.replace_interim(gi)

    def replace_interim(self, gi):
        """Move group ``gi``'s arrays to the interim point of its momentum now."""
        opt = self.opt
        core = opt._core
        engine, meta = core.engine, core.meta[gi]
        group, where = opt.param_groups[gi], opt._where(gi, len(core.meta))
        try:
            v = group["momentum"]
            alpha = unit_interval(v(engine.steps[gi]) if callable(v) else v,
                                  where("momentum"))
            for dt in meta.dtypes:
                unit_interval.fits(alpha, where("momentum"), dt)
        except (KeyError, TypeError, ValueError):
            return                           # the next step refuses the value
        delta = alpha - engine.interim[gi]
        if delta:
            for i in core.rows[gi]:
                phi = self.phi_values(i)
                self.set_phi(i, phi + self.state_values(i, "velocity")
                             * phi.dtype.type(delta))
        engine.interim[gi] = alpha

    def rebuilt(self):
        self.scratch = None

    def after_theta(self):
        pending, self.pending = self.pending, set()
        for gi in sorted(pending):
            self.replace_interim(gi)

    # ---- steps -----------------------------------------------------------------------

    def hooked(self, metas):
        rule = self.opt.rule
        return tuple(gi for gi, m in enumerate(metas) if rule.shifted(m.fixed))

    def check_form(self, form):
        """Refuse to switch between the two Nesterov forms once steps were taken."""
        engine = self.opt._core.engine
        if engine.form not in (0, form) and any(engine.steps):
            taken = FORMS[engine.form]
            raise ValueError(
                f"this optimizer has taken Nesterov steps in the {taken} form (the arrays "
                f"hold {'the interim point' if taken == 'shifted' else 'theta'}); use "
                f"step({'grads' if taken == 'shifted' else 'closure='}) throughout, or "
                f"make a new optimizer")

    def before_step(self, core):
        if not core.nesterov:
            return None
        if core.engine.form == LITERAL:
            self.check_form(SHIFTED)
        return list(core.engine.interim)

    def after_step(self, core, grads, before):
        """After a shifted-form step whose momentum differs from the last one's: the rows
        that a row-sparse gradient left alone still hold theta + alpha_prev v; move them to
        theta + alpha v, as the step moved the others (their theta does not change)."""
        if before is None or before == core.engine.interim:
            return
        engine = core.engine
        for gi in core.nesterov:
            delta = engine.interim[gi] - before[gi]
            for i in core.rows[gi]:
                rest = _untouched(core.params[i], grads[i]) if delta else None
                if rest is None:
                    continue
                phi = self.phi_values(i)
                v = self.state_values(i, "velocity")
                self.set_phi(i, phi[rest] + v[rest] * phi.dtype.type(delta), rest)

    def closure_step(self, core, closure, grad_norm):
        """The book's literal algorithm for the Nesterov groups: their arrays move to the
        interim point theta + alpha v for the closure, and the update, applied there by the
        shifted kernel with no next interim point (phi' = phi - alpha v + v'), leaves
        theta' in them."""
        if not core.nesterov:
            return super().closure_step(core, closure, grad_norm)
        engine = core.engine
        self.check_form(LITERAL)
        for gi in core.nesterov:
            for i in core.rows[gi]:
                if core.how[i][0] != "none":
                    raise ValueError(
                        f"params[{i}] is {core.params[i].dtype}: the literal Nesterov "
                        f"form (step(closure=...)) needs float32/float64 parameters; "
                        f"use step(grads), the shifted form, with 16-bit parameters")
        if self.scratch is None:
            self.scratch = {i: np.empty_like(core.params[i])
                            for gi in core.nesterov for i in core.rows[gi]}
        before = list(engine.steps)
        moved = []
        kept = [(s, s.alpha_prev, s.alpha_next)
                for s in (core.meta[gi].scalars for gi in core.nesterov)]
        try:
            for gi in core.nesterov:
                s = core.meta[gi].scalars
                alpha = s.alpha
                for i in core.rows[gi]:
                    p, th = core.params[i], self.scratch[i]
                    np.copyto(th, p)
                    moved.append(i)
                    np.multiply(self.state_values(i, "velocity"), alpha, out=p)
                    np.add(th, p, out=p)             # theta + alpha v
                s.alpha_prev, s.alpha_next = alpha, 0.0
            loss, grads, applied = self.run_closure(core, closure, grad_norm, LITERAL)
            if applied:
                for i in moved:          # rows a row-sparse gradient left: back to theta
                    rest = _untouched(core.params[i], grads[i])
                    if rest is not None:
                        core.params[i][rest] = self.scratch[i][rest]
            return loss
        finally:
            for s, prev, nxt in kept:         # the shifted form's scalars, as they were
                s.alpha_prev, s.alpha_next = prev, nxt
            if engine.steps == before:        # not applied: put theta back
                for i in moved:
                    np.copyto(core.params[i], self.scratch[i])

    # ---- theta -----------------------------------------------------------------------

    def theta_rows(self):
        core = self.opt._core
        if core.engine.form != SHIFTED or self.depth:
            return []
        return [(gi, i) for gi in core.nesterov for i in core.rows[gi]]

    def theta_into(self, gi, i, out):
        """theta = phi - alpha v for a shifted-form row, into ``out`` (rounded to nearest
        for a 16-bit parameter)."""
        core = self.opt._core
        phi = self.phi_values(i)
        theta = phi - self.state_values(i, "velocity") * phi.dtype.type(
            core.engine.interim[gi])
        storage.round_to(out, theta)
        return out


def warmup_factor(j, warm):
    """The schedule-free warm-up's factor of the learning rate at update ``j`` (from 1;
    0 before the first), over ``warm`` updates (0: none)."""
    return j / warm if j < warm else 1.0


def average_weight(lr, k, r, power, weight_sum, lr_max):
    """Update ``k + 1`` of a schedule-free average at learning rate ``lr``: its weight is
    (k + 1)^r times the largest rate so far to ``power``; returns c, that weight over the
    sum of all (0 while the sum is 0), and the new ``weight_sum`` and ``lr_max``."""
    if lr > lr_max:
        lr_max = lr
    weight = (k + 1) ** r * lr_max ** power
    weight_sum += weight
    return (weight / weight_sum if weight_sum != 0.0 else 0.0), weight_sum, lr_max


class AveragePoint(Point):
    """Schedule-free methods (Defazio et al. 2024): the arrays hold
    y = beta x + (1 - beta) z, where the gradient is taken, the state holds z, and theta
    is the average x = (y - (1 - beta) z) / beta. The rule's scalars give beta as
    ``alpha``; before each update this point sets the step's learning rate (after the
    warm-up) and c, the weight of z in the new average, from the weights of the run so
    far, which it keeps per group (``weight_sum``, ``lr_max``) and commits once the update
    is applied."""

    COUNTERS = ("weight_sum", "lr_max")

    def __init__(self, opt):
        super().__init__(opt)
        self.kept = []           # per group: [weight sum, largest learning rate so far]
        self.ahead = []          # per group: the optax form (Profile.lr_ahead)

    def hooked(self, metas):
        return tuple(range(len(metas)))

    def rebuilt(self):
        metas = self.opt._core.meta
        n = len(metas)
        self.kept = self.kept[:n] + [[0.0, 0.0] for _ in range(n - len(self.kept))]
        # (the convention is fixed when a group is made)
        self.ahead = [self.opt.rule.profile(m.fixed).lr_ahead for m in metas]

    def counters(self, gi):
        return dict(zip(self.COUNTERS, self.kept[gi]))

    def set_counters(self, values):
        self.kept = [[d["weight_sum"], d["lr_max"]] for d in values]

    # ---- steps -----------------------------------------------------------------------

    def before_step(self, core):
        """This update's learning rate and average weight c into each group's scalars;
        returns what ``after_step`` commits."""
        token = []
        steps, kept, ahead = core.engine.steps, self.kept, self.ahead
        for gi, meta in enumerate(core.meta):
            h, k = meta.values, steps[gi]
            warm = h["warmup_steps"]
            if ahead[gi]:
                # optax: the weight's learning rate is the next update's, the step's this
                # one's (rules.Profile.lr_ahead)
                lr = meta.next_values["lr"] * warmup_factor(k + 1, warm)
                lr_step = h["lr"] * warmup_factor(k, warm)
            else:
                lr = lr_step = h["lr"] * warmup_factor(k + 1, warm)
            s = meta.scalars
            s.ck, weight_sum, lr_max = average_weight(lr, k, h["r"], h["weight_lr_power"],
                                                      *kept[gi])
            s.lr = lr_step
            token.append((k, weight_sum, lr_max))
        return token

    def after_step(self, core, grads, token):
        steps, kept = core.engine.steps, self.kept
        for gi, (k, weight_sum, lr_max) in enumerate(token):
            if steps[gi] == k + 1:                   # applied (not skipped)
                kept[gi] = [weight_sum, lr_max]

    def closure_step(self, core, closure, grad_norm):
        """The gradient is taken at y, what the arrays hold: a plain step with the hooks."""
        token = self.before_step(core)
        loss, grads, _ = self.run_closure(core, closure, grad_norm, 0)
        self.after_step(core, grads, token)
        return loss

    # ---- theta -----------------------------------------------------------------------

    def theta_rows(self):
        core = self.opt._core
        if self.depth:
            return []
        return [(gi, i) for gi in range(len(core.meta)) for i in core.rows[gi]]

    def theta_into(self, gi, i, out):
        """x = (y - (1 - beta) z) / beta into ``out`` (rounded to nearest for a 16-bit
        parameter)."""
        beta = self.opt._core.meta[gi].scalars.alpha
        y = self.phi_values(i)
        t = y.dtype.type
        storage.round_to(out, (y - t(1.0 - beta) * self.state_values(i, "z")) / t(beta))
        return out
