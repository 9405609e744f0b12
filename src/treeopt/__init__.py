"""treeopt: the Trax optimizers, maintained for current JAX, on any pytree.

The names below are imported on first use (PEP 562), so that ``import
treeopt.cli`` does not import JAX: the command line answers ``--version`` at
once and a Ctrl-C while JAX loads ends it without a traceback.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> the module that defines it.
_EXPORTS = {
    "SGD": "base",
    "SM3": "sm3",
    "Adafactor": "adafactor",
    "Adam": "adam",
    "Momentum": "momentum",
    "MomentumType": "sm3",
    "Optimizer": "base",
    "RMSProp": "rms_prop",
    "SkipNonFinite": "guard",
    "Trainer": "trainer",
    "clip_grads": "base",
    "l2_norm": "base",
}
# Submodules that ``import treeopt`` used to import (it imported everything), so
# ``treeopt.base.X`` after a plain ``import treeopt`` keeps working.
_SUBMODULES = frozenset(
    {
        "adafactor",
        "adam",
        "base",
        "checks",
        "fusion",
        "guard",
        "momentum",
        "rms_prop",
        "sharding",
        "sm3",
        "trainer",
        "trax_checkpoint",
        "wrapper",
    }
)

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Imports an exported name or submodule on first use."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"treeopt.{_EXPORTS[name]}"), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"treeopt.{name}")
    else:
        raise AttributeError(f"module 'treeopt' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The names of the module, imported or not yet."""
    return sorted({*globals(), *_EXPORTS, *_SUBMODULES})


if TYPE_CHECKING:
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
