"""Momentum optimizer, with or without the Nesterov correction."""

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from treeopt import base


class Momentum(base.Optimizer):
    """SGD with heavy-ball or Nesterov momentum and multiplicative weight decay.

    Per leaf::

        v <- mass * v + g
        u = mass * v + g   if nesterov else   v
        w <- (1 - weight_decay_rate) * w - lr * u

    Slots: ``v``, zeros like ``w``.
    Sutskever et al., "On the importance of initialization and momentum in deep
    learning" (ICML 2013); Bengio et al. (2012), https://arxiv.org/abs/1212.0901.

    Differences from Trax: accepts ``clip_grad_norm`` (Trax's Momentum had none);
    the learning rate is called ``lr`` in the math, not ``epsilon``.
    """

    elementwise = True

    def __init__(
        self,
        learning_rate: ArrayLike = 0.01,
        mass: ArrayLike = 0.9,
        weight_decay_rate: ArrayLike = 1e-5,
        nesterov: bool = True,
        clip_grad_norm: float | None = None,
    ) -> None:
        """Creates a momentum optimizer.

        Args:
          learning_rate: step size ``lr``, >= 0.
          mass: momentum coefficient, in [0, 1).
          weight_decay_rate: fraction of ``w`` removed each step, in [0, 1].
          nesterov: use the Nesterov correction (fixed at construction).
          clip_grad_norm: global gradient-norm threshold (> 0), or None.
        """
        base.check_unit_interval("mass", mass)
        base.check_range("weight_decay_rate", weight_decay_rate, 0.0, 1.0)
        if not isinstance(nesterov, bool):
            raise TypeError(f"nesterov must be a bool, got {nesterov!r}")
        self._nesterov = nesterov
        super().__init__(
            learning_rate,
            clip_grad_norm,
            mass=mass,
            weight_decay_rate=weight_decay_rate,
        )

    @property
    def nesterov(self) -> bool:
        return self._nesterov

    def init(self, weights: jax.Array) -> jax.Array:
        return jnp.zeros_like(weights)

    def update(
        self,
        step: ArrayLike,
        grads: jax.Array,
        weights: jax.Array,
        slots: jax.Array,
        opt_params: base.OptParams,
    ) -> tuple[jax.Array, jax.Array]:
        del step
        g, w, v = grads, weights, slots
        lr, mass, wd = (
            opt_params[k] for k in ("learning_rate", "mass", "weight_decay_rate")
        )
        v = mass * v + g
        u = mass * v + g if self._nesterov else v
        keep = base.once_per_step(jnp.subtract, 1, wd)  # 1 - wd, once per step
        return keep * w - lr * u, v

    def slot_axes(self, ndim: int) -> list[base.Axes]:
        return [base.all_axes(ndim)]
