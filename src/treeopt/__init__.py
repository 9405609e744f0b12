"""treeopt: the Trax optimizers, maintained for current JAX, on any pytree."""

from treeopt.adafactor import Adafactor as Adafactor
from treeopt.adam import Adam as Adam
from treeopt.base import SGD as SGD
from treeopt.base import Optimizer as Optimizer
from treeopt.base import clip_grads as clip_grads
from treeopt.base import l2_norm as l2_norm
from treeopt.guard import SkipNonFinite as SkipNonFinite
from treeopt.momentum import Momentum as Momentum
from treeopt.rms_prop import RMSProp as RMSProp
from treeopt.sm3 import SM3 as SM3
from treeopt.sm3 import MomentumType as MomentumType
from treeopt.trainer import Trainer as Trainer

__version__ = "0.1.0"

__all__ = [
    "SGD",
    "SM3",
    "Adafactor",
    "Adam",
    "Momentum",
    "MomentumType",
    "Optimizer",
    "RMSProp",
    "SkipNonFinite",
    "Trainer",
    "clip_grads",
    "l2_norm",
]
