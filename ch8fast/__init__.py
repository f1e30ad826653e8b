"""ch8fast: fused, in-place optimizers for NumPy.

The optimization chapter of Goodfellow, Bengio & Courville, *Deep Learning* (8.3-8.5):
SGD with schedules, momentum, Nesterov momentum, AdaGrad, RMSProp (with Nesterov
momentum), Adam, AdamW and AdaDelta, as one fused C loop per rule over the caller's arrays.
"""

from ._isa import get_num_threads, isa, set_num_threads
from . import distributed, functional, init, schedules
from .checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from .clip import all_finite, clip_by_global_norm, clip_by_norm, clip_by_value, global_norm
from .flat import FlatParams
from .sparse import SparseRows
from .lr_finder import LRFinderResult, choose_lr
from .optim import SGD, AdaDelta, AdaGrad, Adam, AdamW, Optimizer, RMSProp
from .schedules import minibatches, robbins_monro

__version__ = "0.1.0"

__all__ = [
    "SGD", "AdaGrad", "RMSProp", "Adam", "AdamW", "AdaDelta", "Optimizer",
    "functional", "init", "schedules", "get_num_threads", "set_num_threads", "isa",
    "choose_lr", "LRFinderResult", "minibatches", "robbins_monro",
    "clip_by_global_norm", "clip_by_norm", "clip_by_value", "global_norm", "all_finite",
    "FlatParams", "SparseRows", "save_checkpoint", "load_checkpoint", "read_checkpoint", "distributed",
]
