"""Parameter groups that note their changes, and read-only views of the state: what an
optimizer lends out (``param_groups``, ``state``)."""

import numpy as np

# ---------------------------------------------------------------------------------------
# Param groups that note their changes, and read-only views of the state
# ---------------------------------------------------------------------------------------

class Edits:
    """Shared by an optimizer's groups: ``dirty`` when any group changed since the last
    check; ``hook(group, keys)`` is told of every change as it happens."""

    __slots__ = ("dirty", "hook")

    def __init__(self, hook):
        self.dirty = True
        self.hook = hook


class ParamList(list):
    """The ``"params"`` list of a param group: editing it (append, remove, slice
    assignment, ...) takes effect at the next step, which checks the new arrays, creates
    their state and rebuilds the kernel tables."""

    __slots__ = ("_group",)

    def __init__(self, items=(), group=None):
        super().__init__(items)
        self._group = group

    def _touch(self):
        if self._group is not None:
            self._group._touch(("params",))

    def __reduce__(self):
        return (list, (list(self),))

    # arrays compare element-wise: find them by identity
    def index(self, value, start=0, stop=None):
        for i in range(len(self))[start:stop]:
            if self[i] is value:
                return i
        raise ValueError("array is not in this params list")

    def __contains__(self, value):
        return any(x is value for x in self)

    def count(self, value):
        return sum(x is value for x in self)

    def remove(self, value):
        del self[self.index(value)]


def _mutator(name):
    base = getattr(list, name)

    def method(self, *args):
        out = base(self, *args)
        self._touch()
        return self if name in ("__iadd__", "__imul__") else out
    method.__name__ = name
    return method


for _name in ("append", "extend", "insert", "pop", "clear", "sort", "reverse",
              "__setitem__", "__delitem__", "__iadd__", "__imul__"):
    setattr(ParamList, _name, _mutator(_name))


def as_param_list(value):
    if isinstance(value, np.ndarray):
        return [value]
    if isinstance(value, (str, bytes, dict)):
        raise TypeError(f"'params' must be a sequence of arrays, got "
                        f"{type(value).__name__}")
    try:
        return list(value)
    except TypeError:
        raise TypeError(f"'params' must be a sequence of arrays, got "
                        f"{type(value).__name__}") from None


def own(value):
    """A hyperparameter as a group keeps it: a list (``betas=[0.9, 0.99]``) as a tuple of
    its items, so that the caller's list, edited later, changes nothing here."""
    return tuple(value) if type(value) is list else value


class ParamGroup(dict):
    """A parameter group: a dict of ``"params"`` and hyperparameters that notes when it is
    changed (``group["lr"] = 0.01``, ``update``, ``del``, ...), so that the optimizer
    checks it again at the next step, and only then. A copy (``copy.copy``, pickling) is a
    plain dict."""

    __slots__ = ("changed", "_edits")

    def __init__(self, data, edits=None):
        super().__init__(data)
        self.changed = True
        self._edits = edits
        if "params" in self:
            dict.__setitem__(self, "params",
                             ParamList(as_param_list(self["params"]), self))

    def _touch(self, keys):
        self.changed = True
        edits = self._edits
        if edits is not None:
            edits.dirty = True
            edits.hook(self, keys)

    def _wrap(self, key, value):
        if key == "params":
            return ParamList(as_param_list(value), self)
        return own(value)

    def __reduce__(self):
        return (dict, (dict(self),))

    def __setitem__(self, key, value):
        super().__setitem__(key, self._wrap(key, value))
        self._touch((key,))

    def __delitem__(self, key):
        super().__delitem__(key)
        self._touch((key,))

    def update(self, *args, **kwargs):
        new = dict(*args, **kwargs)
        super().update({k: self._wrap(k, v) for k, v in new.items()})
        self._touch(tuple(new))

    def __ior__(self, other):
        self.update(other)
        return self

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = default
        return self[key]

    def pop(self, *args):
        out = super().pop(*args)
        self._touch(args[:1])
        return out

    def popitem(self):
        out = super().popitem()
        self._touch((out[0],))
        return out

    def clear(self):
        keys = tuple(self)
        super().clear()
        self._touch(keys)


class GroupList(list):
    """``optimizer.param_groups``: the groups can be edited in place; the list itself
    cannot be replaced or resized (``add_param_group`` adds one)."""

    __slots__ = ()

    def __reduce__(self):
        return (list, (list(self),))


def _refuse_group_list_change(self, *args, **kwargs):
    raise TypeError("param_groups cannot be resized or its groups replaced: edit a group "
                    "in place (optimizer.param_groups[0]['lr'] = 0.1), or call "
                    "add_param_group()")


for _name in ("append", "extend", "insert", "remove", "pop", "clear", "sort", "reverse",
              "__setitem__", "__delitem__", "__iadd__", "__imul__"):
    setattr(GroupList, _name, _refuse_group_list_change)


class StateView:
    """The state arrays of one parameter, read-only as a mapping: ``view["exp_avg"]`` is a
    new view of the optimizer's own array at each access (write into it in place to change
    the state; reshaping it changes only that view); replacing or removing an entry is
    refused."""

    __slots__ = ("_arrays",)

    def __init__(self, arrays):
        self._arrays = arrays

    def __getitem__(self, key):
        return self._arrays[key].view()

    def __iter__(self):
        return iter(self._arrays)

    def __len__(self):
        return len(self._arrays)

    def __contains__(self, key):
        return key in self._arrays

    def keys(self):
        return self._arrays.keys()

    def values(self):
        return [a.view() for a in self._arrays.values()]

    def items(self):
        return [(k, a.view()) for k, a in self._arrays.items()]

    def get(self, key, default=None):
        return self[key] if key in self._arrays else default

    def _refuse(self, *args, **kwargs):
        raise TypeError("an optimizer's state arrays cannot be replaced or removed: write "
                        "into them in place (opt.state[0]['exp_avg'][...] = x), or use "
                        "load_state_dict()")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = _refuse

    def __repr__(self):
        return f"StateView({dict(self.items())!r})"


class StateList(tuple):
    """``optimizer.state``: one :class:`StateView` per parameter, in parameter order."""

    __slots__ = ()

    def __setitem__(self, key, value):
        raise TypeError("optimizer.state cannot be changed: write into the state arrays in "
                        "place (opt.state[0]['exp_avg'][...] = x), or use "
                        "load_state_dict()")

    __delitem__ = __setitem__
