"""torch.optim-compatible optimizers that run ch8fast's fused kernels.

``ch8fast.torch.SGD``, ``Adam``, ``AdamW``, ``RMSprop``, ``Adagrad`` and ``Adadelta`` are
subclasses of :class:`torch.optim.Optimizer` with torch's constructor signatures, defaults,
``param_groups``, ``state`` and ``state_dict`` format, so they work with torch's learning
rate schedulers and checkpoints; a ``torch.optim.Adam`` state dict loads into
``ch8fast.torch.Adam`` and back. A step reads ``p.grad`` and updates every CPU
float32/float64 parameter in place through a zero-copy NumPy view, with ch8fast's kernels
in the torch formula profile (``convention="torch"``, or ``"torch_fused"`` with
``fused=True``): one fused pass per parameter group, and the same bits as
``torch.optim``'s fused CPU kernels (see the docs page "Using ch8fast from PyTorch").

>>> import torch, ch8fast.torch as ct
>>> w = torch.nn.Parameter(torch.ones(3))
>>> opt = ct.Adam([w], lr=0.1)
>>> w.grad = torch.ones(3); opt.step()
>>> w.detach()
tensor([0.9000, 0.9000, 0.9000])

This module imports torch; ``import ch8fast`` does not.
"""

try:
    import torch
except ImportError as exc:  # pragma: no cover - exercised without torch
    raise ImportError("ch8fast.torch needs PyTorch (pip install torch); the rest of "
                      "ch8fast works without it") from exc

import math
from operator import is_ as _is

from . import rules
from ._isa import K
from ._points import average_weight, warmup_factor

__all__ = ["SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Adadelta", "Lion", "ADOPT",
           "AdEMAMix", "SGDScheduleFree", "AdamWScheduleFree", "adopt_clip"]

_FLOAT = (torch.float32, torch.float64)
_STRIDED = torch.strided
_IDENTITY = K.GradPlan()


def _scalar_dtype():
    """The dtype torch gives the ``step`` tensors of its optimizers: float64 when that is
    torch's default dtype, float32 otherwise."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _plain(value):
    """A hyperparameter as a Python number (a one-element tensor, as torch allows for
    ``lr``, is read with ``float``)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"a tensor hyperparameter must have one element, got shape "
                             f"{tuple(value.shape)}")
        return float(value)
    if isinstance(value, (tuple, list)):
        return tuple(_plain(v) for v in value)
    return value


def _check_tensor(p, name):
    """A parameter ch8fast can update in place: a dense, contiguous CPU float32/float64
    tensor."""
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(p).__name__}")
    if p.layout != torch.strided:
        raise ValueError(f"{name}: {p.layout} tensors are not supported (a dense tensor "
                         f"is updated in place)")
    if p.device.type != "cpu":
        raise ValueError(f"{name}: is on {p.device}; ch8fast.torch steps CPU tensors (use "
                         f"torch.optim's fused kernels on {p.device.type})")
    if p.is_complex():
        raise TypeError(f"{name}: complex tensors are not supported (dtype {p.dtype}); "
                        f"optimize torch.view_as_real(p) instead")
    if p.dtype not in _FLOAT:
        raise TypeError(f"{name}: dtype must be torch.float32 or torch.float64, got "
                        f"{p.dtype}")
    if not p.is_contiguous():
        raise ValueError(f"{name}: is not contiguous (shape {tuple(p.shape)}, strides "
                         f"{p.stride()}); it is updated in place through a flat view, so "
                         f"make it contiguous first, e.g. p.data = p.data.contiguous()")


def _view(t):
    """The NumPy view of a tensor's memory (same shape)."""
    t = t.detach()
    try:
        return t.numpy()
    except RuntimeError:              # a lazily negated or conjugated view: resolve it
        return t.resolve_neg().resolve_conj().numpy()


def _grad_view(g, name):
    """A gradient as the kernels read it (a NumPy view; the kernels read a non-contiguous
    one through a contiguous copy)."""
    try:
        return g.numpy()              # the common case: a dense CPU tensor
    except (RuntimeError, TypeError):
        pass
    if g.layout != torch.strided:
        raise ValueError(f"{name}.grad: sparse gradients are not supported (use "
                         f"torch.optim.SparseAdam, or a dense gradient)")
    if g.device.type != "cpu":
        raise ValueError(f"{name}.grad: is on {g.device}, its parameter on the CPU")
    return _view(g)


class _Entry:
    """One parameter as the kernels see it: its NumPy view, the address and layout it had
    when the view was made, and its state tensors (``pending``: created for this step,
    put into ``optimizer.state`` once it succeeds)."""

    __slots__ = ("ptr", "shape", "dtype", "flat", "layout", "tensors", "arrays",
                 "pending", "step_t", "step_block", "step_slot", "state", "p")

    def matches(self, p, layout):
        if (p.data_ptr() != self.ptr or p.shape != self.shape or p.dtype != self.dtype
                or layout != self.layout):
            return False
        state = self.state
        for name, t in zip(layout, self.tensors):
            if name not in self.pending and state.get(name) is not t:
                return False
        return (self.step_t is None or "step" in self.pending
                or state.get("step") is self.step_t)


class _Group:
    """A param group's checked values (ch8fast's names), its state layout, and the
    kernel's Scalars."""

    __slots__ = ("key", "raw", "values", "layout", "scalars")


_PLAIN = (float, int, bool, str, type(None))


def _raw(group):
    """A param group's settings as a tuple that ``==`` compares exactly (each value with
    its type), or None when one is not a plain number, string or tuple of them (a tensor
    ``lr`` may change in place, so it is read again at every step)."""
    out = []
    for k, v in group.items():
        if k == "params":
            continue
        t = type(v)
        if t is tuple:
            if not all(type(x) in _PLAIN for x in v):
                return None
            t = tuple(map(type, v))
        elif t not in _PLAIN:
            return None
        out.append((k, t, v))
    return tuple(out)


class _Plan:
    """What a step bound, kept for the next steps while it holds: the same groups with
    the same parameters, each with its entry, the same state tensors and step counts, and
    the same parameters with a gradient. Such a step checks each gradient with a few
    attribute reads and passes the kernels its address (``Engine.step_addresses``)
    instead of going through NumPy views and the tables' cache."""

    __slots__ = ("ids", "scalars", "layouts", "order", "absent", "engine", "slots",
                 "counts")

    def addresses(self, opt):
        """The gradients' addresses in the engine's order, or None when the plan no
        longer holds (the step then takes the general path)."""
        groups = opt.param_groups
        if len(groups) != len(self.ids):
            return None
        for gi, group in enumerate(groups):
            g = opt._prepare(gi, group)
            if g.scalars is not self.scalars[gi] or g.layout != self.layouts[gi]:
                return None
            if list(map(id, group["params"])) != self.ids[gi]:
                return None
        if _counts(opt) != self.counts:       # a step count was edited
            return None
        for p in self.absent:
            if p.grad is not None:
                return None
        out = []
        state = opt.state
        for p, e, dt, n, names, tensors in self.order:
            g = p.grad
            if (g is None or g.dtype is not dt or g.layout is not _STRIDED or not g.is_cpu
                    or g.is_neg() or not g.is_contiguous() or g.numel() != n
                    or p.data_ptr() != e.ptr or p.dtype is not dt or not p.is_contiguous()
                    or names and state.get(p) is not e.state
                    or not all(map(_is, map(e.state.get, names), tensors))):
                return None
            out.append(g.data_ptr())
        return out


def _counts(opt):
    """The bytes of every step count (they live in shared blocks, see ``_new_step``)."""
    return b"".join(b[1].tobytes() for b in opt._step_blocks)


class _Optimizer(torch.optim.Optimizer):
    """The machinery of the ch8fast.torch optimizers (see the module docstring)."""

    _rule = None           # the ch8fast rule specification
    _names = {}            # ch8fast hyperparameter -> torch param_group key
    _counts_steps = True   # torch keeps a 'step' tensor in the state

    def __init__(self, params, defaults):
        self._reset_caches()
        if defaults.get("foreach") and defaults.get("fused"):
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        super().__init__(params, defaults)

    def _reset_caches(self):
        self._entries = {}            # id(param) -> _Entry
        self._tables = {}
        self._groups = {}
        self._step_blocks = []        # [tensor, its NumPy view, slots used]
        self._state_seen = None
        self._plan = None             # the last step's bindings (_Plan)

    def _new_step(self, value=0.0):
        """A 0-d step tensor, a view of one slot of a shared block, so that one NumPy
        operation counts the steps of many parameters: (tensor, block, slot)."""
        blocks = self._step_blocks
        if not blocks or blocks[-1][2] == len(blocks[-1][1]):
            t = torch.zeros(256, dtype=_scalar_dtype())
            blocks.append([t, t.numpy(), 0])
        b = blocks[-1]
        slot = b[2]
        b[2] += 1
        view = b[0][slot]
        view.fill_(value)
        return view, b[1], slot

    _missing = {}

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            for k, v in self._missing.items():
                group.setdefault(k, v)
        self._reset_caches()

    # ---- groups ---------------------------------------------------------------------

    def add_param_group(self, param_group):
        """torch's ``add_param_group``, then ch8fast's checks of the new parameters and
        hyperparameters."""
        super().add_param_group(param_group)
        self._plan = None
        gi = len(self.param_groups) - 1
        group = self.param_groups[gi]
        try:
            for k, p in enumerate(group["params"]):
                _check_tensor(p, f"param_groups[{gi}]['params'][{k}]")
            self._prepare(gi, group)
        except Exception:
            self.param_groups.pop()
            self._groups.pop(gi, None)
            raise

    def _options(self, gi, group):
        """Refuse the torch options ch8fast does not implement; returns the
        convention."""
        for key, what in (("capturable", "CUDA graph capture"),
                          ("differentiable", "autograd through the step")):
            if group.get(key):
                raise ValueError(f"param_groups[{gi}]['{key}']: {key}=True ({what}) is "
                                 f"not supported by ch8fast.torch; use torch.optim for it")
        if group.get("fused") and group.get("foreach"):
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        return "torch_fused" if group.get("fused") else "torch"

    def _raw(self, gi, group):
        """What the cached checks of group ``gi`` depend on (see :func:`_raw`)."""
        return _raw(group)

    def _values(self, group, convention):
        """The group's hyperparameters under ch8fast's names (overridden where torch's
        differ); those torch has no counterpart of keep the rule's defaults."""
        out = self._rule.defaults()
        out.update({k: _plain(group[t]) for k, t in self._names.items()})
        out["convention"] = convention
        return out

    def _prepare(self, gi, group):
        """The checked values, layout and Scalars of group ``gi`` (cached while its
        hyperparameters stay the same)."""
        g = self._groups.get(gi)
        raw = self._raw(gi, group)
        if g is not None and raw is not None and g.raw == raw:
            return g
        convention = self._options(gi, group)
        values = self._values(group, convention)
        try:
            key = tuple(values.items())
            hash(key)
        except TypeError:
            key = None
        if g is not None and key is not None and g.key == key:
            g.raw = raw
            return g
        rule = self._rule

        def where(k):
            return f"param_groups[{gi}]['{self._names.get(k, k)}']"

        dtypes = tuple(sorted({_NP[p.dtype] for p in group["params"] if p.dtype in _NP},
                              key=str))
        checked = rule.check_all(values, where, dtypes)
        layout = rule.state(checked)
        new = _Group()
        new.key, new.raw, new.values, new.layout = key, raw, checked, layout
        if g is not None and g.layout == layout:
            new.scalars = g.scalars
            rule.scalars(new.scalars, checked, checked)
        else:
            new.scalars = rule.scalars_for(checked)
        self._groups[gi] = new
        return new

    # ---- state --------------------------------------------------------------------------

    def _new_state(self, p, values, layout):
        """The state torch's optimizer makes for ``p`` at its first step."""
        st = {}
        if self._counts_steps:
            st["step"] = self._new_step()[0]
        for name in layout:
            fill = self._rule.initial.get(name)
            contiguous = torch.contiguous_format
            if fill == rules.PARAM:
                st[name] = p.detach().clone(memory_format=contiguous)
                continue
            st[name] = (torch.zeros_like(p, memory_format=contiguous) if fill is None else
                        torch.full_like(p, fill(values), memory_format=contiguous))
        return st

    def _entry(self, p, name, g):
        """Bind ``p`` and its state tensors (creating what is missing), checked."""
        _check_tensor(p, name)
        # (torch's SGD without momentum keeps no state at all: leave it so)
        state = self.state[p] if (g.layout or self._counts_steps) else {}
        e = _Entry()
        e.ptr, e.shape, e.dtype, e.layout = p.data_ptr(), p.shape, p.dtype, g.layout
        e.flat = _view(p)
        e.pending = {}
        fresh = self._new_state(p, g.values, g.layout) if not state else None
        if fresh is not None:
            if self._pending_state():
                e.pending = fresh
            else:
                state.update(fresh)
        tensors = []
        for sname in g.layout:
            t = e.pending.get(sname, state.get(sname))
            if t is None:
                t = self._new_state(p, g.values, (sname,))[sname]
                if self._pending_state():
                    e.pending[sname] = t
                else:
                    state[sname] = t
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"state of {name}: {sname!r} must be a tensor, got "
                                f"{type(t).__name__}")
            if (t.shape != p.shape or t.dtype != p.dtype or t.device != p.device
                    or t.layout != torch.strided):
                raise ValueError(f"state of {name}: {sname!r} has shape {tuple(t.shape)}, "
                                 f"dtype {t.dtype} on {t.device}; expected those of the "
                                 f"parameter ({tuple(p.shape)}, {p.dtype}, {p.device})")
            if not t.is_contiguous():
                t = t.contiguous()
                state[sname] = t
            tensors.append(t)
        e.tensors = tuple(tensors)
        e.arrays = tuple(_view(t) for t in tensors)
        e.step_t = e.step_block = None
        e.step_slot = 0
        if self._counts_steps:
            st = e.pending.get("step", state.get("step"))
            value = float(0 if st is None else st)
            # the step count lives in a slot of a shared block (see _new_step)
            view, block, slot = self._new_step(value)
            if "step" in e.pending:
                e.pending["step"] = view
            else:
                state["step"] = view
            e.step_t, e.step_block, e.step_slot = view, block, slot
        e.state = state
        e.p = p
        self._entries[id(p)] = e
        self._tables.clear()
        return e

    def _pending_state(self):
        """Whether new state waits for the step to succeed (SGD: torch makes the momentum
        buffer at the first step, and its absence marks that step)."""
        return not self._counts_steps

    def _step_of(self, e):
        if e.step_block is None:
            return 0 if e.pending else 1
        return int(e.step_block[e.step_slot])

    def load_state_dict(self, state_dict):
        """torch's ``load_state_dict`` (a torch.optim state dict of the same class loads
        too); the kernels bind the loaded state at the next step."""
        super().load_state_dict(state_dict)
        self._reset_caches()

    # ---- stepping ---------------------------------------------------------------------

    def step(self, closure=None):
        """One update of every parameter whose ``.grad`` is not None (others are skipped,
        as torch.optim does). ``closure`` re-evaluates the model and returns the loss.

        (No autograd runs here: the kernels write the tensors' memory directly, and the
        state tensors are made without gradients, so the step needs no ``no_grad``.)"""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.state is not self._state_seen:    # replaced as a whole (load_state_dict)
            self._entries.clear()
            self._tables.clear()
            self._plan = None
            self._state_seen = self.state
        plan = self._plan
        if plan is not None:
            addresses = plan.addresses(self)
            if addresses is not None:
                plan.engine.step_addresses(addresses, _IDENTITY, 0)
                for block, idx in plan.slots:
                    block[idx] += 1
                plan.counts = _counts(self)
                return loss
            self._plan = None
        with torch.no_grad():
            self._step_bound()
        return loss

    def _step_bound(self):
        """A step that binds every parameter and gradient afresh (checked), and keeps
        what it bound as the plan of the next steps."""
        buckets = {}
        absent = []
        entries = self._entries
        for gi, group in enumerate(self.param_groups):
            g = self._prepare(gi, group)
            for k, p in enumerate(group["params"]):
                grad = p.grad
                if grad is None:
                    absent.append(p)
                    continue
                try:
                    garr = grad.numpy()       # the common case: a dense CPU tensor
                except (RuntimeError, TypeError):
                    garr = _grad_view(grad, f"param_groups[{gi}]['params'][{k}]")
                e = entries.get(id(p))
                if (e is None or e.p is not p or not e.matches(p, g.layout)
                        or e.state is not self.state.get(p, e.state)):
                    e = self._entry(p, f"param_groups[{gi}]['params'][{k}]", g)
                key = (gi, self._step_of(e), e.dtype)
                b = buckets.get(key)
                if b is None:
                    b = buckets[key] = ([], [], [])
                b[0].append(p)
                b[1].append(e)
                b[2].append(garr)
        if not buckets:
            return
        keys = list(buckets)
        grads = [a for k in keys for a in buckets[k][2]]
        # the tables depend on which entries go together, not on the step counts
        plan = tuple((k[0], k[2], tuple(id(e) for e in buckets[k][1])) for k in keys)
        cached = self._tables.get(plan)
        if cached is None:
            cached = self._tables[plan] = (self._build(keys, buckets),
                                           self._step_slots(keys, buckets))
        tables, slots = cached
        engine = K.Engine(tables, list(range(len(keys))),
                          [self._groups[k[0]].scalars for k in keys],
                          [k[1] for k in keys], [0.0] * len(keys), 0)
        engine.step(grads, _IDENTITY, 0)
        # counted: torch's state after the step
        for block, idx in slots:
            block[idx] += 1
        for k in keys:
            for p, e in zip(buckets[k][0], buckets[k][1]):
                if e.pending:
                    self.state[p].update(e.pending)
                    e.pending = {}
        self._plan = self._new_plan(keys, buckets, engine, slots, absent)

    def _new_plan(self, keys, buckets, engine, slots, absent):
        """The plan of the step just taken (see _Plan), or None where its gradients were
        not all dense float tensors."""
        plan = _Plan()
        plan.order = []
        for k in keys:
            for p, e in zip(buckets[k][0], buckets[k][1]):
                g = p.grad
                if g.layout is not _STRIDED or not g.is_contiguous() or g.is_neg():
                    return None
                names, tensors = e.layout, e.tensors
                if e.step_t is not None:
                    names, tensors = names + ("step",), tensors + (e.step_t,)
                plan.order.append((p, e, e.dtype, p.numel(), names, tensors))
        groups = self.param_groups
        plan.ids = [list(map(id, group["params"])) for group in groups]
        plan.scalars = [self._groups[gi].scalars for gi in range(len(groups))]
        plan.layouts = [self._groups[gi].layout for gi in range(len(groups))]
        plan.absent = absent
        plan.engine, plan.slots = engine, slots
        plan.counts = _counts(self)
        return plan

    @staticmethod
    def _step_slots(keys, buckets):
        """(block, slot indices) of the step counts of a plan's entries."""
        by_block = {}
        for k in keys:
            for e in buckets[k][1]:
                if e.step_block is not None:
                    by_block.setdefault(id(e.step_block), (e.step_block, []))[1].append(
                        e.step_slot)
        return [(b, _np.array(ix, dtype=_np.intp)) for b, ix in by_block.values()]

    def _build(self, keys, buckets):
        """One kernel table per (group, step count, dtype), over one guard of every array
        the step writes."""
        if len(self._tables) > 32:
            self._tables.clear()
        arrays, names, tables, start = [], [], [], 0
        for k in keys:
            for j, e in enumerate(buckets[k][1]):
                arrays.append(e.flat)
                names.append(f"a parameter of param_groups[{k[0]}]")
                arrays.extend(e.arrays)
                names.extend(f"its state {n!r}" for n in e.layout)
        guard = K.Guard(arrays, names)
        for k in keys:
            es = buckets[k][1]
            cols = [[e.arrays[c] for e in es] for c in range(len(es[0].layout))]
            tables.append(K.Table([e.flat for e in es], cols,
                                  list(range(start, start + len(es))), guard))
            start += len(es)
        return tables


import numpy as _np  # noqa: E402

_NP = {torch.float32: _np.dtype(_np.float32), torch.float64: _np.dtype(_np.float64)}


# ---------------------------------------------------------------------------------------
# The optimizers: torch's signatures and defaults (torch 2.13), ch8fast's rules
# ---------------------------------------------------------------------------------------

class SGD(_Optimizer):
    """torch.optim.SGD on ch8fast's kernels (rule :data:`ch8fast.rules.SGD`,
    ``convention="torch"``; ``fused=True``: ``"torch_fused"``)."""

    _rule = rules.SGD
    _names = {"lr": "lr", "momentum": "momentum", "dampening": "dampening",
              "weight_decay": "weight_decay", "nesterov": "nesterov",
              "maximize": "maximize"}
    _counts_steps = False

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0,
                 nesterov=False, *, maximize=False, foreach=None, differentiable=False,
                 fused=None):
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov,
                                      maximize=maximize, foreach=foreach,
                                      differentiable=differentiable, fused=fused))

    # keys an older state dict may lack, and the values torch gives them
    _missing = {"nesterov": False, "maximize": False, "foreach": None,
                "differentiable": False, "fused": False}


class Adam(_Optimizer):
    """torch.optim.Adam on ch8fast's kernels (rule :data:`ch8fast.rules.ADAM`)."""

    _rule = rules.ADAM
    _names = {"lr": "lr", "betas": "betas", "eps": "eps", "weight_decay": "weight_decay",
              "amsgrad": "amsgrad", "maximize": "maximize",
              "decoupled_weight_decay": "decoupled_weight_decay"}

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 amsgrad=False, *, foreach=None, maximize=False, capturable=False,
                 differentiable=False, fused=None, decoupled_weight_decay=False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps,
                                      weight_decay=weight_decay, amsgrad=amsgrad,
                                      maximize=maximize, foreach=foreach,
                                      capturable=capturable, differentiable=differentiable,
                                      fused=fused,
                                      decoupled_weight_decay=decoupled_weight_decay))

    # keys an older state dict may lack, and the values torch gives them
    _missing = {"amsgrad": False, "maximize": False, "foreach": None, "capturable": False,
                "differentiable": False, "fused": None, "decoupled_weight_decay": False}


class AdamW(Adam):
    """torch.optim.AdamW on ch8fast's kernels (Adam with decoupled weight decay)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, foreach=None, capturable=False,
                 differentiable=False, fused=None):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach,
                         maximize=maximize, capturable=capturable,
                         differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True


class RMSprop(_Optimizer):
    """torch.optim.RMSprop on ch8fast's kernels (rule :data:`ch8fast.rules.RMSPROP`;
    torch's ``alpha`` is the rule's ``rho``)."""

    _rule = rules.RMSPROP
    _names = {"lr": "lr", "rho": "alpha", "eps": "eps", "weight_decay": "weight_decay",
              "momentum": "momentum", "centered": "centered", "maximize": "maximize"}

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0,
                 centered=False, capturable=False, foreach=None, maximize=False,
                 differentiable=False):
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps,
                                      weight_decay=weight_decay, momentum=momentum,
                                      centered=centered, capturable=capturable,
                                      foreach=foreach, maximize=maximize,
                                      differentiable=differentiable))

    def _values(self, group, convention):
        out = super()._values(group, convention)
        out["nesterov"] = False
        return out

    # keys an older state dict may lack, and the values torch gives them
    _missing = {"momentum": 0, "centered": False, "foreach": None, "maximize": False,
                "differentiable": False, "capturable": False}


class Adagrad(_Optimizer):
    """torch.optim.Adagrad on ch8fast's kernels (rule :data:`ch8fast.rules.ADAGRAD`)."""

    _rule = rules.ADAGRAD
    _names = {"lr": "lr", "lr_decay": "lr_decay", "weight_decay": "weight_decay",
              "initial_accumulator_value": "initial_accumulator_value", "eps": "eps",
              "maximize": "maximize"}

    def __init__(self, params, lr=1e-2, lr_decay=0, weight_decay=0,
                 initial_accumulator_value=0, eps=1e-10, foreach=None, *, maximize=False,
                 differentiable=False, fused=None):
        super().__init__(params, dict(lr=lr, lr_decay=lr_decay, eps=eps,
                                      weight_decay=weight_decay,
                                      initial_accumulator_value=initial_accumulator_value,
                                      foreach=foreach, maximize=maximize,
                                      differentiable=differentiable, fused=fused))
        # torch makes Adagrad's state when the optimizer is made
        for gi, group in enumerate(self.param_groups):
            g = self._prepare(gi, group)
            for p in group["params"]:
                if not self.state[p]:
                    self.state[p].update(self._new_state(p, g.values, g.layout))

    # keys an older state dict may lack, and the values torch gives them
    _missing = {"foreach": None, "maximize": False, "differentiable": False, "fused": None}


class Adadelta(_Optimizer):
    """torch.optim.Adadelta on ch8fast's kernels (rule :data:`ch8fast.rules.ADADELTA`)."""

    _rule = rules.ADADELTA
    _names = {"lr": "lr", "rho": "rho", "eps": "eps", "weight_decay": "weight_decay",
              "maximize": "maximize"}

    def __init__(self, params, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0, foreach=None, *,
                 capturable=False, maximize=False, differentiable=False):
        super().__init__(params, dict(lr=lr, rho=rho, eps=eps, weight_decay=weight_decay,
                                      foreach=foreach, capturable=capturable,
                                      maximize=maximize, differentiable=differentiable))

    # keys an older state dict may lack, and the values torch gives them
    _missing = {"foreach": None, "maximize": False, "capturable": False,
                "differentiable": False}


# ---------------------------------------------------------------------------------------
# Rules torch.optim lacks: the signatures of their authors' PyTorch code, the papers'
# formulas (convention "book")
# ---------------------------------------------------------------------------------------

class _Paper(_Optimizer):
    """An optimizer torch.optim does not have: the signature of the PyTorch code its
    authors published, the paper's formulas (the rule's ``"book"`` convention)."""

    def _options(self, gi, group):
        super()._options(gi, group)
        return "book"


class Lion(_Paper):
    """Lion (Chen et al. 2023) on ch8fast's kernels (rule :data:`ch8fast.rules.LION`),
    with the signature and state of the ``lion-pytorch`` package: ``exp_avg`` per
    parameter, decoupled weight decay, no step count."""

    _rule = rules.LION
    _names = {"lr": "lr", "betas": "betas", "weight_decay": "weight_decay"}
    _counts_steps = False

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))


def adopt_clip(step):
    """ADOPT's clipping bound at update ``step + 1``: step ** 0.25 (``step`` counts the
    completed updates, as optax's count). The default ``clip_lambda`` of
    :class:`ADOPT`; the kernels compute it themselves, so it is the only function
    accepted."""
    return step ** 0.25


class ADOPT(_Paper):
    """ADOPT (Taniguchi et al. 2024) on ch8fast's kernels (rule
    :data:`ch8fast.rules.ADOPT`), with the signature and state of the authors' PyTorch
    code: ``clip_lambda`` is :func:`adopt_clip` (the bound (t - 1)^(1/4) at update t) or
    None (no clipping); ``decouple=True`` decays the weights decoupled."""

    _rule = rules.ADOPT
    _names = {"lr": "lr", "betas": "betas", "eps": "eps", "weight_decay": "weight_decay",
              "decoupled_weight_decay": "decouple", "maximize": "maximize"}

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.9999), eps=1e-6,
                 clip_lambda=adopt_clip, weight_decay=0.0, decouple=False, *,
                 maximize=False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, clip_lambda=clip_lambda,
                                      weight_decay=weight_decay, decouple=decouple,
                                      maximize=maximize))

    def _values(self, group, convention):
        out = super()._values(group, convention)
        clip = group["clip_lambda"]
        if clip is not None and clip is not adopt_clip:
            raise ValueError("clip_lambda: ch8fast computes the clipping bound in its "
                             "kernels, (t - 1)^p at update t; pass "
                             "ch8fast.torch.adopt_clip (p = 1/4, the default) or None (no "
                             "clipping), or use ch8fast.ADOPT(clip_exponent=p)")
        out["use_clipping"] = clip is not None
        return out

    def _raw(self, gi, group):
        raw = _raw({k: v for k, v in group.items() if k != "clip_lambda"})
        return None if raw is None else raw + (("clip_lambda", id(group["clip_lambda"])),)


class AdEMAMix(_Paper):
    """AdEMAMix (Pagliardini et al. 2024) on ch8fast's kernels (rule
    :data:`ch8fast.rules.ADEMAMIX`), with the signature and state of the authors' PyTorch
    code: ``betas=(beta1, beta2, beta3)``; ``alpha_warmup`` and ``beta3_warmup`` (a number
    of updates, or None) warm alpha and beta3 up as the paper does
    (:func:`ch8fast.schedules.ademamix_alpha`, :func:`ch8fast.schedules.ademamix_beta3`),
    at the update the group's parameters take next (they must then share one step
    count)."""

    _rule = rules.ADEMAMIX
    _names = {"lr": "lr", "eps": "eps", "weight_decay": "weight_decay"}

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=2.0,
                 beta3_warmup=None, alpha_warmup=None, eps=1e-8, weight_decay=0):
        super().__init__(params, dict(lr=lr, betas=betas, alpha=alpha,
                                      beta3_warmup=beta3_warmup, alpha_warmup=alpha_warmup,
                                      eps=eps, weight_decay=weight_decay))

    def _next_update(self, group):
        """The number of the update the group's parameters with a gradient take next."""
        counts = {float(self.state[p]["step"]) if "step" in self.state.get(p, ()) else 0.0
                  for p in group["params"] if p.grad is not None}
        if len(counts) > 1:
            raise ValueError(f"a group with alpha_warmup or beta3_warmup steps its "
                             f"parameters together, but they have taken different numbers "
                             f"of steps ({sorted(counts)})")
        return int(counts.pop()) + 1 if counts else 1

    def _warming(self, group):
        return group["alpha_warmup"] is not None or group["beta3_warmup"] is not None

    def _values(self, group, convention):
        out = super()._values(group, convention)
        betas = _plain(group["betas"])
        if not (isinstance(betas, tuple) and len(betas) == 3):
            raise ValueError(f"betas must be (beta1, beta2, beta3), got {betas!r}")
        b1, b2, b3 = betas
        alpha = _plain(group["alpha"])
        if self._warming(group):
            from .schedules import ademamix_alpha, ademamix_beta3
            done = self._next_update(group) - 1
            if group["alpha_warmup"] is not None:
                alpha = ademamix_alpha(alpha, group["alpha_warmup"])(done)
            if group["beta3_warmup"] is not None:
                b3 = ademamix_beta3(b3, b1, group["beta3_warmup"])(done)
        out["betas"], out["beta3"], out["alpha"] = (b1, b2), b3, alpha
        return out

    def _raw(self, gi, group):
        raw = _raw(group)
        if raw is not None and self._warming(group):
            raw += (("update", self._next_update(group)),)
        return raw


class _ScheduleFree(_Paper):
    """The schedule-free optimizers of the authors' ``schedulefree`` package (Defazio et
    al. 2024), on ch8fast's kernels: the parameters hold y in train mode (where the
    gradient is taken) and x, the average to evaluate and save, after ``eval()``;
    ``train()`` puts y back. Each group keeps the package's running numbers (``k``,
    ``weight_sum``, ``lr_max``, ``scheduled_lr``, ``train_mode``); a step computes the
    learning rate after the warm-up and the average's weight from them, as the package
    does, and the kernels apply the update in one pass."""

    _counts_steps = False
    _running = ("k", "weight_sum", "lr_max", "scheduled_lr", "train_mode")

    def __init__(self, params, defaults):
        defaults = dict(defaults, k=0, train_mode=False, weight_sum=0.0, lr_max=-1.0,
                        scheduled_lr=0.0)
        super().__init__(params, defaults)

    def _beta(self, group):
        raise NotImplementedError

    def _raw(self, gi, group):
        # (the running numbers change at every step; the kernels' scalars from them are
        # set by step() itself)
        return _raw({k: v for k, v in group.items() if k not in self._running})

    @torch.no_grad()
    def eval(self):
        """Put x = (y - (1 - beta) z) / beta in the parameters (to evaluate or save)."""
        for group in self.param_groups:
            if group["train_mode"]:
                beta = self._beta(group)
                for p in group["params"]:
                    z = self.state[p].get("z") if p in self.state else None
                    if z is not None:
                        p.lerp_(end=z, weight=1 - 1 / beta)
                group["train_mode"] = False

    @torch.no_grad()
    def train(self):
        """Put y = beta x + (1 - beta) z back in the parameters (to train)."""
        for group in self.param_groups:
            if not group["train_mode"]:
                beta = self._beta(group)
                for p in group["params"]:
                    z = self.state[p].get("z") if p in self.state else None
                    if z is not None:
                        p.lerp_(end=z, weight=1 - beta)
                group["train_mode"] = True

    def step(self, closure=None):
        """One update (the optimizer must be in train mode: call ``train()`` first, as the
        authors' optimizers require)."""
        for gi, group in enumerate(self.param_groups):
            if not group["train_mode"]:
                raise RuntimeError(f"param_groups[{gi}] is not in train mode: call "
                                   f"optimizer.train() before stepping and "
                                   f"optimizer.eval() before evaluating or saving")
        done = []
        for gi, group in enumerate(self.param_groups):
            g = self._prepare(gi, group)
            k = group["k"]
            lr = _plain(group["lr"]) * warmup_factor(k + 1, group["warmup_steps"])
            s = g.scalars
            s.ck, weight_sum, lr_max = average_weight(
                lr, k, group["r"], group["weight_lr_power"], group["weight_sum"],
                group["lr_max"])
            s.lr = lr
            if "exp_avg_sq" in g.layout:      # the bias correction of update k + 1
                s.bias_correction = False
                s.c2 = 1.0 / math.sqrt(1.0 - g.values["betas"][1] ** (k + 1))
            done.append((group, lr, lr_max, weight_sum))
        loss = super().step(closure)
        for group, lr, lr_max, weight_sum in done:
            group["scheduled_lr"], group["lr_max"] = lr, lr_max
            group["weight_sum"], group["k"] = weight_sum, group["k"] + 1
        return loss


class SGDScheduleFree(_ScheduleFree):
    """Schedule-free SGD (Defazio et al. 2024) on ch8fast's kernels (rule
    :data:`ch8fast.rules.SCHEDULE_FREE_SGD`), with the signature, state (``z``) and
    ``train()`` / ``eval()`` of the authors' ``schedulefree.SGDScheduleFree``."""

    _rule = rules.SCHEDULE_FREE_SGD
    _names = {"lr": "lr", "momentum": "momentum", "weight_decay": "weight_decay",
              "warmup_steps": "warmup_steps", "r": "r",
              "weight_lr_power": "weight_lr_power"}

    def __init__(self, params, lr=1.0, momentum=0.9, weight_decay=0, warmup_steps=0,
                 r=0.0, weight_lr_power=2, foreach=None):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      warmup_steps=warmup_steps, r=r,
                                      weight_lr_power=weight_lr_power, foreach=foreach))

    def _beta(self, group):
        return group["momentum"]


class AdamWScheduleFree(_ScheduleFree):
    """Schedule-free AdamW (Defazio et al. 2024) on ch8fast's kernels (rule
    :data:`ch8fast.rules.SCHEDULE_FREE_ADAMW`), with the signature, state (``z``,
    ``exp_avg_sq``) and ``train()`` / ``eval()`` of the authors'
    ``schedulefree.AdamWScheduleFree``."""

    _rule = rules.SCHEDULE_FREE_ADAMW
    _names = {"lr": "lr", "betas": "betas", "eps": "eps", "weight_decay": "weight_decay",
              "warmup_steps": "warmup_steps", "r": "r",
              "weight_lr_power": "weight_lr_power"}

    def __init__(self, params, lr=0.0025, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 warmup_steps=0, r=0.0, weight_lr_power=2.0, foreach=None):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps,
                                      weight_decay=weight_decay,
                                      warmup_steps=warmup_steps, r=r,
                                      weight_lr_power=weight_lr_power, foreach=foreach))

    def _beta(self, group):
        return group["betas"][0]
