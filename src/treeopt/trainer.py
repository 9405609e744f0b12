"""Trainer: one jitted forward/backward/update step over any weight tree."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from treeopt import base, sharding
from treeopt.guard import SKIPPED

LossFn = Callable[[base.PyTree, Any, jax.Array], Any]


def _loss_and_aux(loss_fn: LossFn) -> Callable:
    """``loss_fn`` as ``(weights, batch, rng) -> (loss, aux)``; aux is None
    when ``loss_fn`` returns the loss alone."""

    def wrapped(weights: base.PyTree, batch: Any, rng: jax.Array) -> tuple:
        out = loss_fn(weights, batch, rng)
        if isinstance(out, tuple):
            if len(out) != 2:
                raise TypeError(
                    "loss_fn must return a scalar loss or a pair (loss, aux), "
                    f"got a tuple of {len(out)}"
                )
            return out
        return out, None

    return wrapped


class Trainer:
    """Holds ``weights``, ``slots``, ``opt_params`` and ``step``, and updates them
    with one jitted call per batch (the counterpart of Trax's ``Trainer``).

    ``one_step(batch, rng)`` computes ``loss_fn(weights, batch, rng)`` and its
    gradient, sets ``opt_params['learning_rate'] = schedule(step)`` (when a
    schedule is given) and applies ``optimizer.tree_update``, all inside one
    ``jax.jit`` that donates the old weights and slots. ``step`` and
    ``opt_params`` are traced arguments, so new step numbers and learning rates
    never recompile.

    With ``treeopt.SkipNonFinite``, a step whose gradients hold NaN or Inf
    changes nothing and does not advance the optimizer's step (nor the
    schedule): the run equals one that omitted that batch. The total is kept in
    ``skipped_nonfinite`` (a device int, no host round trip) and reported as
    ``metrics['skipped_nonfinite_total']``.

    Steps count from 0 (the first update gets step 0), as in ``tree_update``.
    Trax's training loop gave step 1 to the first update, which shifts Adam's
    bias correction, Adafactor's decay and the schedule by one step; pass
    ``first_step=1`` for Trax's numbers.
    """

    def __init__(
        self,
        loss_fn: LossFn,
        optimizer: base.Optimizer,
        weights: base.PyTree,
        schedule: Callable[[ArrayLike], jax.Array] | None = None,
        *,
        first_step: int = 0,
        mesh: jax.sharding.Mesh | None = None,
        data_axis: str | tuple[str, ...] = "data",
        sharding_rule: Callable[[Any, Any], jax.sharding.PartitionSpec] | None = None,
    ) -> None:
        """Creates the slots and compiles nothing yet.

        Args:
          loss_fn: ``(weights, batch, rng) -> loss`` or ``-> (loss, aux)``, with
            a scalar loss; differentiated with respect to ``weights``.
          optimizer: any treeopt optimizer (its ``tree_update`` is used in its
            pure form, ``store_slots=False``).
          weights: the initial weight tree (dicts, Flax parameters, ...); copied,
            so the donated buffers are the Trainer's own.
          schedule: ``step -> learning rate``; None keeps
            ``optimizer.opt_params['learning_rate']``.
          first_step: the step number of the first update, an integer >= 0
            (1 reproduces Trax's training loop).
          mesh: train data-parallel on this ``jax.sharding.Mesh``: each batch
            leaf is split along its leading axis over ``data_axis`` (in several
            processes, each passes its own rows); None: one device.
          data_axis: the mesh axis (or axes) the batch is split over.
          sharding_rule: ``(path, leaf) -> PartitionSpec`` laying out each
            weight on ``mesh`` (e.g. ``treeopt.sharding.fsdp(mesh, "data")``);
            None replicates the weights. Slots follow their weights.
        """
        if isinstance(first_step, bool) or not isinstance(first_step, int):
            raise TypeError(f"first_step must be an int, got {first_step!r}")
        base.check_nonnegative("first_step", first_step)
        self.optimizer = optimizer
        self.schedule = schedule
        self._layout = None
        if mesh is None:
            self.weights = jax.tree.map(jnp.array, weights)
            self.slots, self.opt_params = optimizer.tree_init(
                self.weights, store_slots=False
            )
        else:
            self._layout = sharding.DataParallel(
                mesh, optimizer, weights, data_axis, sharding_rule
            )
            self.weights, self.slots, self.opt_params = self._layout.init(
                optimizer, weights
            )
            loss_fn = self._layout.gathered(loss_fn)
        self.step = first_step
        self.skipped_nonfinite = jnp.zeros((), jnp.int32)
        self._loss_and_aux = _loss_and_aux(loss_fn)
        self._jit_step = jax.jit(self._train_step, donate_argnums=(0, 1))

    def _train_step(
        self,
        weights: base.PyTree,
        slots: tuple,
        opt_params: base.OptParams,
        step: jax.Array,
        skipped: jax.Array,
        batch: Any,
        rng: jax.Array,
        learning_rate: jax.Array | None,
    ) -> tuple:
        """The pure step: loss, gradients, learning rate, ``tree_update`` (at
        optimizer step ``step``; ``skipped`` counts the steps skipped so far)."""
        grad_fn = jax.value_and_grad(self._loss_and_aux, has_aux=True)
        (loss, aux), grads = grad_fn(weights, batch, rng)
        opt_params = dict(opt_params)
        lr_dtype = opt_params["learning_rate"].dtype
        if learning_rate is not None:
            opt_params["learning_rate"] = learning_rate.astype(lr_dtype)
        elif self.schedule is not None:
            opt_params["learning_rate"] = jnp.asarray(self.schedule(step), lr_dtype)
        weights, slots, metrics = self.optimizer.tree_update(
            step,
            grads,
            weights,
            slots,
            opt_params,
            store_slots=False,
            with_metrics=True,
        )
        if self._layout is not None:
            weights, slots = self._layout.constrain(weights, slots)
        metrics = {
            "loss": loss,
            **metrics,
            "learning_rate": opt_params["learning_rate"],
        }
        if SKIPPED in metrics:
            metrics["skipped_nonfinite_total"] = skipped + metrics[SKIPPED]
        if aux is not None:
            metrics["aux"] = aux
        return weights, slots, opt_params, metrics

    def one_step(
        self,
        batch: Any,
        rng: jax.Array,
        step: int | None = None,
        learning_rate: ArrayLike | None = None,
    ) -> tuple[jax.Array, dict[str, Any]]:
        """Runs one update and returns ``(loss, metrics)``.

        ``metrics`` holds ``loss``, ``gradients_l2`` (before clipping),
        ``weights_l2`` (before the update), ``learning_rate`` (used for this
        update), any further metrics the optimizer reports, and ``aux`` when
        ``loss_fn`` returns one. ``step`` overrides the step number (afterwards
        ``self.step`` is the used step plus one) and ``learning_rate`` the
        schedule's value for this update; without a schedule it stays in
        ``opt_params``, as in Trax's ``one_step``.
        """
        explicit = step is not None
        step = step if explicit else self.step
        # Skipped steps never happened for the optimizer: its step is the count
        # of applied ones (on device: no host round trip); an explicit step is
        # used as given.
        opt_step = jnp.asarray(step, jnp.int32)
        if not explicit:
            opt_step = opt_step - self.skipped_nonfinite
        lr = None if learning_rate is None else jnp.asarray(learning_rate, jnp.float32)
        if self._layout is not None:
            batch = self._layout.put_batch(batch)
        self.weights, self.slots, self.opt_params, metrics = self._jit_step(
            self.weights,
            self.slots,
            self.opt_params,
            opt_step,
            self.skipped_nonfinite,
            batch,
            rng,
            lr,
        )
        self.step = step + 1
        if SKIPPED in metrics:
            self.skipped_nonfinite = metrics["skipped_nonfinite_total"]
        return metrics["loss"], metrics
