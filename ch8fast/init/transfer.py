"""Initialization from another model: copy its parameters by name (Deep Learning, 8.4).

Section 8.4 ends with initialization by learning: take the parameters of a model trained
on the same inputs (e.g. unsupervised) or on a related task. :func:`load_matching` copies
them into a model's arrays, in place, and reports what it matched.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping, Tuple, Union

import numpy as np

from .._validation import fillable_array, flag

__all__ = ["LoadReport", "load_matching"]


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_matching` did, by array name.

    ``loaded``: names copied (``cast``: the subset copied with a dtype conversion);
    ``skipped``: name -> reason, present in both but not copied;
    ``missing``: in the model (target) but not in the source;
    ``unused``: in the source but not in the model.
    """

    loaded: Tuple[str, ...] = ()
    cast: Tuple[str, ...] = ()
    skipped: Mapping[str, str] = field(default_factory=dict)
    missing: Tuple[str, ...] = ()
    unused: Tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        """True when every array on both sides was matched and copied."""
        return not (self.skipped or self.missing or self.unused)

    def __str__(self) -> str:
        lines = [f"loaded  {len(self.loaded)}: {', '.join(self.loaded) or '-'}"]
        if self.cast:
            lines.append(f"cast    {len(self.cast)}: {', '.join(self.cast)}")
        lines.append(f"skipped {len(self.skipped)}:" + ("" if self.skipped else " -"))
        lines += [f"  {k}: {v}" for k, v in self.skipped.items()]
        lines.append(f"missing {len(self.missing)} (in model, not in source): "
                     f"{', '.join(self.missing) or '-'}")
        lines.append(f"unused  {len(self.unused)} (in source, not in model): "
                     f"{', '.join(self.unused) or '-'}")
        return "\n".join(lines)


def load_matching(target: Mapping[str, np.ndarray],
                  source: Union[Mapping[str, np.ndarray], str, os.PathLike], *,
                  allow_cast: bool = False, strict: bool = False) -> LoadReport:
    """Initialize a model from another model's parameters, by name, in place.

    Section 8.4 of Deep Learning ends with initialization by learning: take the
    parameters of a model trained on the same inputs (e.g. unsupervised) or on a related
    task. ``target`` maps names to the model's arrays, which are overwritten in place
    (``np.copyto``); ``source`` is a mapping of names to arrays or the path of an ``.npz``
    file (read with ``allow_pickle=False``).

    An array is copied when the name is on both sides, the shapes are equal and the dtypes
    are equal; with ``allow_cast=True`` a different dtype is converted when NumPy's
    ``same_kind`` casting allows it (e.g. float64 -> float32, not float -> int). Anything
    else is *skipped* with its reason. Names on one side only are *missing* (model only)
    or *unused* (source only).

    With ``strict=True`` any skipped, missing or unused name raises ``ValueError`` and no
    array is changed. All checks run before the first copy. Returns a :class:`LoadReport`.
    """
    if not isinstance(target, Mapping):
        raise TypeError(f"target must be a mapping name -> array, got "
                        f"{type(target).__name__}")
    allow_cast = flag(allow_cast, "allow_cast")
    strict = flag(strict, "strict")
    for name, arr in target.items():
        fillable_array(arr, f"target[{name!r}]")
    skipped = {}
    if isinstance(source, (str, os.PathLike)):
        npz = np.load(source, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise ValueError(f"source must be an .npz archive of named arrays, got "
                             f"{os.fspath(source)!r}, which holds a single array")
        with npz:
            names = list(npz.files)
            src = {}
            for k in names:
                if k in target:
                    try:
                        src[k] = npz[k]
                    except ValueError as exc:  # e.g. an object array (no pickle)
                        src[k] = None
                        skipped[k] = f"unreadable in source: {exc}"
    elif isinstance(source, Mapping):
        names = list(source.keys())
        src = {k: source[k] for k in names if k in target}
    else:
        raise TypeError(f"source must be a mapping name -> array or an .npz path, got "
                        f"{type(source).__name__}")

    plan, cast = [], []
    for name, dst in target.items():
        if name not in src or name in skipped:
            continue
        value = src[name]
        if not isinstance(value, np.ndarray):
            skipped[name] = f"source value is {type(value).__name__}, not an ndarray"
        elif value.shape != dst.shape:
            skipped[name] = f"shape {value.shape} in source, {dst.shape} in model"
        elif value.dtype != dst.dtype:
            if not allow_cast:
                skipped[name] = f"dtype {value.dtype} in source, {dst.dtype} in model " \
                                "(allow_cast=False)"
            elif not np.can_cast(value.dtype, dst.dtype, casting="same_kind"):
                skipped[name] = f"dtype {value.dtype} cannot be cast to {dst.dtype}"
            else:
                plan.append(name)
                cast.append(name)
        else:
            plan.append(name)
    report = LoadReport(
        loaded=tuple(plan), cast=tuple(cast), skipped=skipped,
        missing=tuple(k for k in target if k not in src),
        unused=tuple(k for k in names if k not in target))
    if strict and not report.complete:
        raise ValueError("load_matching(strict=True): nothing was copied\n" + str(report))
    for name in plan:
        np.copyto(target[name], src[name], casting="same_kind")
    return report
