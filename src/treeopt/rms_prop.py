"""RMSProp optimizer."""

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from treeopt import base


class RMSProp(base.Optimizer):
    """Scales each step by a running root-mean-square of the gradient.

    Per leaf::

        a <- gamma * a + (1 - gamma) * g**2
        w <- w - lr * g / (sqrt(a) + eps)

    Slots: ``a``, ones like ``w`` (Trax starts from ones, not zeros).
    Tieleman & Hinton, COURSERA Neural Networks for Machine Learning,
    lecture 6.5 (2012).
    """

    elementwise = True

    def __init__(
        self,
        learning_rate: ArrayLike = 1e-3,
        gamma: ArrayLike = 0.9,
        eps: ArrayLike = 1e-8,
        clip_grad_norm: float | None = None,
    ) -> None:
        """Creates an RMSProp optimizer.

        Args:
          learning_rate: step size ``lr``, >= 0.
          gamma: decay of the squared-gradient average, in [0, 1).
          eps: added to ``sqrt(a)``, >= 0.
          clip_grad_norm: global gradient-norm threshold (> 0), or None.
        """
        base.check_unit_interval("gamma", gamma)
        base.check_nonnegative("eps", eps)
        super().__init__(learning_rate, clip_grad_norm, gamma=gamma, eps=eps)

    def init(self, weights: jax.Array) -> jax.Array:
        # Ones, not zeros: Trax's choice, kept so that Trax slots load and match.
        return jnp.ones_like(weights)

    def update(
        self,
        step: ArrayLike,
        grads: jax.Array,
        weights: jax.Array,
        slots: jax.Array,
        opt_params: base.OptParams,
    ) -> tuple[jax.Array, jax.Array]:
        del step
        g, w, a = grads, weights, slots
        lr, gamma, eps = (opt_params[k] for k in ("learning_rate", "gamma", "eps"))
        a = gamma * a + (1 - gamma) * g**2
        return w - lr * g / (jnp.sqrt(a) + eps), a

    def slot_axes(self, ndim: int) -> list[base.Axes]:
        return [base.all_axes(ndim)]
