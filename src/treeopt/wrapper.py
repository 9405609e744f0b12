"""``Wrapper``: an optimizer made of another, the way to add behaviour around a
step (``treeopt.SkipNonFinite``, ``treeopt.fusion.SiblingOutputs``) without
touching the optimizers or special cases elsewhere."""

from __future__ import annotations

from typing import ClassVar

import jax
from jax.typing import ArrayLike

from treeopt.base import Axes, Optimizer, OptParams, Slots


class Wrapper(Optimizer):
    """An optimizer that wraps another: the same slots, slot axes, structural
    options and clipping, and a copy of its hyperparameters. A subclass changes
    ``update`` (one leaf) or ``apply`` (a whole step), and calls the wrapped
    optimizer's for the math."""

    structural: ClassVar[tuple[str, ...]] = ("inner",)

    def __init__(self, optimizer: Optimizer) -> None:
        """Args:
        optimizer: the treeopt optimizer to wrap.
        """
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"{type(self).__name__} wraps a treeopt.Optimizer, got "
                f"{type(optimizer).__name__}"
            )
        self._inner = optimizer
        super().__init__(
            clip_grad_norm=optimizer.clip_grad_norm, **optimizer.opt_params
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._inner!r})"

    @property
    def inner(self) -> Optimizer:
        """The wrapped optimizer."""
        return self._inner

    def init(self, weights: jax.Array) -> Slots:
        return self._inner.init(weights)

    def update(
        self,
        step: ArrayLike,
        grads: jax.Array,
        weights: jax.Array,
        slots: Slots,
        opt_params: OptParams,
    ) -> tuple[jax.Array, Slots]:
        return self._inner.update(step, grads, weights, slots, opt_params)

    def slot_axes(self, ndim: int) -> list[Axes]:
        return self._inner.slot_axes(ndim)
