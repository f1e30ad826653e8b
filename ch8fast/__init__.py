"""ch8fast: fused, in-place optimizers for NumPy.

The optimization chapter of Goodfellow, Bengio & Courville, *Deep Learning* (8.3-8.5):
SGD with schedules, momentum, Nesterov momentum, AdaGrad, RMSProp (with Nesterov
momentum), Adam, AdamW and AdaDelta, as one fused C loop per rule over the caller's arrays.
"""

import importlib.machinery as _machinery
import os as _os

__version__ = "0.1.0"


def _without_kernels(exc):
    """The error for a source folder without its compiled kernels: typically the
    repository root after a plain ``pip install .``, whose ``ch8fast/`` folder Python
    imports instead of the installed copy."""
    here = _os.path.dirname(_os.path.abspath(__file__))
    suffixes = tuple(_machinery.EXTENSION_SUFFIXES)
    built = any(name.startswith(("_kernels", "_core")) and name.endswith(suffixes)
                for name in _os.listdir(here))
    if built:
        return exc
    return ImportError(
        f"ch8fast's compiled kernels are not in {here}: Python is importing the source "
        f"folder (the current directory shadows an installed ch8fast), which has not "
        f"been built. Either build it in place, `pip install -e .` from the repository "
        f"root (the README's set-up), or run Python from another folder to use the "
        f"installed copy.")


try:
    from ._isa import get_num_threads, isa, set_num_threads
except ImportError as _exc:
    raise _without_kernels(_exc) from _exc
from . import distributed, functional, init, schedules
from .checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from .clip import all_finite, clip_by_global_norm, clip_by_norm, clip_by_value, global_norm
from .flat import FlatParams
from .sparse import SparseRows
from .lr_finder import LRFinderResult, choose_lr
from .optim import (ADOPT, LAMB, LARS, SGD, AdaDelta, AdaGrad, Adam, AdamW, AdEMAMix, Lion,
                    Optimizer, RMSProp, ScheduleFreeAdamW, ScheduleFreeSGD)
from .schedules import minibatches, robbins_monro

__all__ = [
    "SGD", "AdaGrad", "RMSProp", "Adam", "AdamW", "AdaDelta", "Lion", "ADOPT", "AdEMAMix",
    "ScheduleFreeSGD", "ScheduleFreeAdamW", "LAMB", "LARS", "Optimizer",
    "functional", "init", "schedules", "get_num_threads", "set_num_threads", "isa",
    "choose_lr", "LRFinderResult", "minibatches", "robbins_monro",
    "clip_by_global_norm", "clip_by_norm", "clip_by_value", "global_norm", "all_finite",
    "FlatParams", "SparseRows", "save_checkpoint", "load_checkpoint", "read_checkpoint",
    "distributed",
]
