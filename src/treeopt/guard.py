"""An opt-in guard that skips optimizer steps whose gradients are not finite."""

from __future__ import annotations

from collections.abc import Sequence
from functools import reduce

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from treeopt import base
from treeopt.wrapper import Wrapper

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


class SkipNonFinite(Wrapper):
    """Wraps an optimizer so that a step with any NaN/Inf gradient changes nothing.

    Per step::

        ok = all(isfinite(g)) over every element of every gradient leaf
        (w, slots) <- optimizer step if ok else (w, slots), bit for bit

    The choice is a ``jnp.where`` on device, so it works under ``jax.jit`` and
    ``vmap`` without a host round trip. It wraps the whole step (``apply``),
    wherever the step runs: ``tree_update``, ``treeopt.packed``, ``to_optax``
    and the Trainer need nothing special. With ``with_metrics=True`` the
    metrics gain ``'skipped_nonfinite'`` (int32, 1 if skipped). The caller owns
    the step counter: advance it by ``1 - metrics['skipped_nonfinite']`` to
    make a skipped step count as if it never happened (``to_optax`` and the
    Trainer do).

    Slots, opt_params and ``clip_grad_norm``: those of the wrapped optimizer.
    """

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
        new = self.inner.update(step, grads, weights, slots, opt_params)
        return keep_if(all_finite(grads), new, (weights, slots))

    def apply(
        self,
        step: ArrayLike,
        grads: Sequence[jax.Array],
        weights: Sequence[jax.Array],
        slots: Sequence[base.Slots],
        opt_params: base.OptParams,
        with_metrics: bool = False,
        stacked: Sequence[bool] | None = None,
    ) -> tuple[list, list, dict[str, jax.Array]]:
        """The wrapped optimizer's step, or the inputs unchanged if any gradient
        element is NaN or Inf; see the class docstring."""
        new_weights, new_slots, metrics = self.inner.apply(
            step, grads, weights, slots, opt_params, with_metrics, stacked
        )
        ok = all_finite(grads)
        new_weights = keep_if(ok, new_weights, list(weights))
        new_slots = keep_if(ok, new_slots, list(slots))
        if with_metrics:
            metrics = {**metrics, SKIPPED: (~ok).astype(jnp.int32)}
        return new_weights, new_slots, metrics
