"""An opt-in guard that skips optimizer steps whose gradients are not finite."""

from __future__ import annotations

from collections.abc import Sequence
from functools import reduce

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from treeopt import base

SKIPPED = "skipped_nonfinite"
"""Metrics key: int32 1 if the step was skipped, else 0."""


def all_finite(tree: base.PyTree) -> jax.Array:
    """True iff every element of every leaf is finite (checked per element, so a
    sum or norm that overflows cannot hide or fake a NaN)."""
    flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return reduce(jnp.logical_and, flags, jnp.asarray(True))


def keep_if(ok: jax.Array, new: base.PyTree, old: base.PyTree) -> base.PyTree:
    """``new`` where ``ok``, else ``old`` (bit for bit, in ``new``'s dtypes)."""
    return jax.tree.map(
        lambda n, o: jnp.where(ok, n, jnp.asarray(o).astype(n.dtype)), new, old
    )


class SkipNonFinite(base.Optimizer):
    """Wraps an optimizer so that a step with any NaN/Inf gradient changes nothing.

    Per step::

        ok = all(isfinite(g)) over every element of every gradient leaf
        (w, slots) <- optimizer step if ok else (w, slots), bit for bit

    The choice is a ``jnp.where`` on device, so it works under ``jax.jit`` and
    ``vmap`` without a host round trip. With ``with_metrics=True`` the metrics
    gain ``'skipped_nonfinite'`` (int32, 1 if skipped). The caller owns the step
    counter: advance it by ``1 - metrics['skipped_nonfinite']`` to make a skipped
    step count as if it never happened (``to_optax`` does this in its state).

    Slots, opt_params and ``clip_grad_norm``: those of the wrapped optimizer.
    """

    def __init__(self, optimizer: base.Optimizer) -> None:
        """Args:
        optimizer: the treeopt optimizer to guard.
        """
        if not isinstance(optimizer, base.Optimizer):
            raise TypeError(
                f"SkipNonFinite wraps a treeopt.Optimizer, got "
                f"{type(optimizer).__name__}"
            )
        self._inner = optimizer
        self._clip_grad_norm = optimizer.clip_grad_norm
        self._slots = None
        self._slot_specs: dict = {}

    def __repr__(self) -> str:
        return f"SkipNonFinite({self._inner!r})"

    @property
    def inner(self) -> base.Optimizer:
        """The wrapped optimizer."""
        return self._inner

    @property
    def opt_params(self) -> base.OptParams:
        """The wrapped optimizer's initial hyperparameters."""
        return self._inner.opt_params

    @opt_params.setter
    def opt_params(self, opt_params: base.OptParams) -> None:
        self._inner.opt_params = opt_params

    def init(self, weights: jax.Array) -> base.Slots:
        return self._inner.init(weights)

    def update(
        self,
        step: ArrayLike,
        grads: jax.Array,
        weights: jax.Array,
        slots: base.Slots,
        opt_params: base.OptParams,
    ) -> tuple[jax.Array, base.Slots]:
        """One leaf: the wrapped update, skipped if this leaf's ``grads`` are not
        all finite."""
        new = self._inner.update(step, grads, weights, slots, opt_params)
        return keep_if(all_finite(grads), new, (weights, slots))

    def tree_init(
        self, weight_tree: base.PyTree, store_slots: bool = True
    ) -> tuple[tuple, base.OptParams]:
        slots, opt_params = self._inner.tree_init(weight_tree, store_slots=False)
        if store_slots:
            base.check_not_tracing("tree_init", slots)
            self._slots = slots
        return slots, opt_params

    def tree_update(
        self,
        step: ArrayLike,
        grad_tree: base.PyTree,
        weight_tree: base.PyTree,
        slots: Sequence[base.Slots],
        opt_params: base.OptParams,
        store_slots: bool = True,
        with_metrics: bool = False,
    ) -> tuple[base.PyTree, tuple] | tuple[base.PyTree, tuple, dict[str, jax.Array]]:
        """The wrapped ``tree_update``, or the inputs unchanged if any gradient
        element is NaN or Inf; see the class docstring."""
        if store_slots:
            base.check_not_tracing(
                "tree_update", grad_tree, weight_tree, slots, opt_params, step
            )
        new_weights, new_slots, metrics = self._inner.tree_update(
            step,
            grad_tree,
            weight_tree,
            slots,
            opt_params,
            store_slots=False,
            with_metrics=True,
        )
        ok = all_finite(grad_tree)
        new_weights = keep_if(ok, new_weights, weight_tree)
        new_slots = keep_if(ok, new_slots, tuple(slots))
        if store_slots:
            self._slots = new_slots
        if not with_metrics:
            return new_weights, new_slots
        return new_weights, new_slots, {**metrics, SKIPPED: (~ok).astype(jnp.int32)}
