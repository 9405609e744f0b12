"""treeopt optimizers as optax gradient transformations (needs the optax extra)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from treeopt import base, guard

try:
    import optax
except ModuleNotFoundError as e:
    if e.name != "optax":  # optax is there but broken: its own error says why
        raise
    msg = "treeopt.optax needs optax: pip install 'treeopt[optax]'"
    raise ModuleNotFoundError(msg, name=e.name) from None


class TreeoptState(NamedTuple):
    """State of ``to_optax(optimizer)``.

    Attributes:
      count: int32, the ``step`` handed to the next treeopt update (from 0); it
        counts applied steps only, so a step skipped by ``SkipNonFinite`` does
        not advance it.
      slots: the tuple from ``optimizer.tree_init``, one entry per leaf.
      opt_params: ``name -> 0-d array``; replace a value (for instance with
        ``optax.tree_utils.tree_set(state, learning_rate=...)``) to change a
        hyperparameter between steps without recompiling.
      skipped: int32, how many steps ``SkipNonFinite`` skipped for non-finite
        gradients (always 0 for an unguarded optimizer).
    """

    count: jax.Array
    slots: tuple
    opt_params: base.OptParams
    skipped: jax.Array


def _delta(new: jax.Array, old: ArrayLike) -> jax.Array:
    """``u`` such that ``optax.apply_updates(old, u)`` is exactly ``new`` where a
    float ``u`` can do it.

    ``u`` is in ``compute_dtype(old)``: float32 for bfloat16/float16 weights, where
    the difference of two such numbers is exact (unless their magnitudes are more
    than about 2**13 apart) and ``apply_updates`` casts the sum back. For float32
    weights ``new - old`` is exact within a factor 2 (Sterbenz); beyond, ``old +
    u`` may miss by one ulp, and the neighbour of ``u`` one ulp toward the miss is
    taken if it lands.
    """
    old = jnp.asarray(old)
    dt = base.compute_dtype(old)
    target, start = new.astype(old.dtype), old.astype(dt)

    def lands(u: jax.Array) -> jax.Array:
        return (start + u).astype(old.dtype) == target

    u = target.astype(dt) - start
    toward = jnp.where(start + u < target, jnp.inf, -jnp.inf).astype(dt)
    u_next = jnp.nextafter(u, toward)
    return jnp.where(~lands(u) & lands(u_next), u_next, u)


def _constant(value: jax.Array, count: jax.Array) -> jax.Array:
    del count
    return value


def to_optax(
    optimizer: base.Optimizer,
    learning_rate: float | Callable[[jax.Array], ArrayLike] | None = None,
) -> optax.GradientTransformation:
    """Wraps a treeopt optimizer as an ``optax.GradientTransformation``.

    ``update(grads, state, params)`` runs ``optimizer.tree_update`` (treeopt's
    exact math, global-norm clipping included) and returns the updates
    ``new_weights - params``, chosen so that ``optax.apply_updates(params,
    updates)`` gives treeopt's new weights bit for bit wherever float arithmetic
    allows (updates of bfloat16/float16 weights are float32 for that reason;
    ``apply_updates`` casts the sum back). ``params`` is required. The state is
    a ``TreeoptState``.

    Args:
      optimizer: any ``treeopt.Optimizer``; wrap it in
        ``treeopt.SkipNonFinite`` to skip steps with NaN/Inf gradients.
      learning_rate: optional number or schedule ``count -> learning rate``
        (as optax's optimizers take); if given, it overwrites
        ``opt_params['learning_rate']`` in the state before each step.
    """
    if not isinstance(optimizer, base.Optimizer):
        raise TypeError(
            f"to_optax expects a treeopt.Optimizer, got {type(optimizer).__name__}"
        )
    if learning_rate is not None and not callable(learning_rate):
        # A number, as optax's own optimizers accept: a constant schedule.
        if not base.is_concrete_number(learning_rate):
            raise TypeError(
                f"learning_rate must be a number or a schedule count -> number, "
                f"got {type(learning_rate).__name__}"
            )
        base.check_nonnegative("learning_rate", learning_rate)
        learning_rate = functools.partial(_constant, jnp.float32(learning_rate))

    def init(params: optax.Params) -> TreeoptState:
        slots, opt_params = optimizer.tree_init(params, store_slots=False)
        zero = jnp.zeros((), jnp.int32)
        return TreeoptState(zero, slots, opt_params, zero)

    def update(
        updates: optax.Updates,
        state: TreeoptState,
        params: optax.Params | None = None,
    ) -> tuple[optax.Updates, TreeoptState]:
        if params is None:
            raise ValueError(
                "to_optax(...).update needs params: treeopt computes new weights "
                "from the current ones (weight decay, Adafactor's parameter scale); "
                "call update(grads, state, params)"
            )
        opt_params = state.opt_params
        if learning_rate is not None:
            lr = jnp.asarray(learning_rate(state.count), jnp.float32)
            opt_params = {**opt_params, "learning_rate": lr}
        # Metrics nobody reads are dropped by XLA; a guard reports its skip there.
        new_weights, slots, metrics = optimizer.tree_update(
            state.count,
            updates,
            params,
            state.slots,
            opt_params,
            store_slots=False,
            with_metrics=True,
        )
        skip = metrics.get(guard.SKIPPED, jnp.zeros((), jnp.int32))
        new_updates = jax.tree.map(_delta, new_weights, params)
        count = state.count + 1 - skip
        return new_updates, TreeoptState(count, slots, opt_params, state.skipped + skip)

    return optax.GradientTransformation(init, update)
