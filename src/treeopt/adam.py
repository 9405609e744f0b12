"""Adam optimizer."""

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from treeopt import base


def _per_step(
    step: ArrayLike, wd: jax.Array, b1: jax.Array, b2: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``1 - wd``, ``1 / (1 - b1**t)`` and ``1 / (1 - b2**t)``, ``t = step + 1``
    (reciprocals: each element then costs a multiply instead of a divide)."""
    t = base.step_count(step, b1.dtype)
    return 1 - wd, 1 / (1 - b1**t), 1 / (1 - b2**t)


class Adam(base.Optimizer):
    """Adam with decoupled multiplicative weight decay (Trax's variant).

    Per leaf, with ``t = step + 1``::

        m <- (1 - b1) * g + b1 * m
        v <- (1 - b2) * g**2 + b2 * v
        mhat = m / (1 - b1**t);  vhat = v / (1 - b2**t)
        w <- (1 - weight_decay_rate) * w - lr * mhat / (sqrt(vhat) + eps)

    Slots: ``(m, v)``, both zeros like ``w``.
    Kingma & Ba, "Adam: A Method for Stochastic Optimization" (2014),
    https://arxiv.org/abs/1412.6980.
    """

    elementwise = True

    def __init__(
        self,
        learning_rate: ArrayLike = 1e-4,
        weight_decay_rate: ArrayLike = 1e-5,
        b1: ArrayLike = 0.9,
        b2: ArrayLike = 0.999,
        eps: ArrayLike = 1e-5,
        clip_grad_norm: float | None = None,
    ) -> None:
        """Creates an Adam optimizer.

        Args:
          learning_rate: step size ``lr``, >= 0.
          weight_decay_rate: fraction of ``w`` removed each step, in [0, 1].
          b1: decay of the first moment, in [0, 1).
          b2: decay of the second moment, in [0, 1).
          eps: added to ``sqrt(vhat)``, >= 0.
          clip_grad_norm: global gradient-norm threshold (> 0), or None.
        """
        base.check_range("weight_decay_rate", weight_decay_rate, 0.0, 1.0)
        base.check_unit_interval("b1", b1)
        base.check_unit_interval("b2", b2)
        base.check_nonnegative("eps", eps)
        super().__init__(
            learning_rate,
            clip_grad_norm,
            weight_decay_rate=weight_decay_rate,
            b1=b1,
            b2=b2,
            eps=eps,
        )

    def init(self, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
        return jnp.zeros_like(weights), jnp.zeros_like(weights)

    def update(
        self,
        step: ArrayLike,
        grads: jax.Array,
        weights: jax.Array,
        slots: tuple[jax.Array, jax.Array],
        opt_params: base.OptParams,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        g, w, (m, v) = grads, weights, slots
        names = ("learning_rate", "weight_decay_rate", "b1", "b2", "eps")
        lr, wd, b1, b2, eps = (opt_params[k] for k in names)
        keep, inv_c1, inv_c2 = base.once_per_step(_per_step, step, wd, b1, b2)
        m = (1 - b1) * g + b1 * m
        v = (1 - b2) * g**2 + b2 * v
        mhat = m * inv_c1
        vhat = v * inv_c2
        w = keep * w - lr * mhat / (jnp.sqrt(vhat) + eps)
        return w, (m, v)

    def slot_axes(self, ndim: int) -> list[base.Axes]:
        return [base.all_axes(ndim)] * 2
