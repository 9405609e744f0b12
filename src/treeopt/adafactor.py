"""Adafactor optimizer."""

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from treeopt import base


def _rms(x: jax.Array) -> jax.Array:
    return jnp.sqrt(base.safe_mean(x * x))


def _unshared(*xs: jax.Array) -> tuple[jax.Array, ...]:
    """``xs`` unchanged, as values that XLA cannot merge with other uses of ``xs``.

    Each reduction over ``g * g`` then re-reads ``g`` in a fused pass of its own
    instead of sharing a materialized full-size ``g * g`` or ``y``: a fresh
    full-size temporary costs a write and a read more than it saves.
    """
    return jax.lax.optimization_barrier(xs)


def _schedules(
    step: ArrayLike, decay_rate: jax.Array, wd: jax.Array, n: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``rho = 1 - t**-decay_rate`` and ``1 - wd_t``, where ``wd_t`` decays
    linearly to 0 over ``n`` steps (``n < 1``: constant), ``t = step + 1``."""
    t = base.step_count(step, decay_rate.dtype)
    wd = jnp.where(n < 1, wd, wd * jnp.maximum(n - (t - 1), 0) / jnp.maximum(n, 1))
    return 1 - t ** (-decay_rate), 1 - wd


class Adafactor(base.Optimizer):
    """Adafactor: Adam-like steps with a factored second moment and relative size.

    Per leaf, with ``t = step + 1`` and ``rho = 1 - t**(-decay_rate)``::

        v_row <- rho * v_row + (1 - rho) * mean(g**2, -1)     (factored, ndim >= 2)
        v_col <- rho * v_col + (1 - rho) * mean(g**2, -2)
        y = g * sqrt(mean(v_row) / (v_row + eps1)) * (v_col + eps1)**-0.5
        y <- y / max(1, rms(y) / clipping_threshold);  u = y * lr * max(rms(w), eps2)
        m <- beta1 * m + (1 - beta1) * u;  u = m       (do_momentum only)
        w <- (1 - wd) * w - u

    Unfactored leaves keep ``v <- rho * v + (1 - rho) * g**2``, ``y = g *
    (v + eps1)**-0.5``. ``wd`` is ``weight_decay_rate``, scaled by
    ``max(n - step, 0) / n`` when ``weight_decay_n_steps = n >= 1``.

    Slots: a list ``[v_row, v_col]`` (float32, float64 for float64 leaves; shapes
    ``w.shape[:-1]`` and ``w.shape[:-2] + w.shape[-1:]``) or ``[v]``, then ``m`` if
    ``do_momentum``.
    Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory
    Cost" (2018), https://arxiv.org/abs/1804.04235.

    Differences from Trax: ``clipping_threshold=None`` and
    ``weight_decay_n_steps=None`` work as documented; the unfactored ``v`` is
    float32 from the start; ``epsilon1`` is added where the formula above shows,
    not to ``g**2`` before averaging (the same up to ``epsilon1`` in ``mean``);
    accepts ``clip_grad_norm``.
    """

    structural = ("factored", "do_momentum", "momentum_in_bfloat16")

    def __init__(
        self,
        learning_rate: ArrayLike = 0.05,
        factored: bool = True,
        multiply_by_parameter_scale: bool = True,
        do_clipping: bool = True,
        do_momentum: bool = False,
        momentum_in_bfloat16: bool = False,
        beta1: ArrayLike = 0.0,
        decay_rate: ArrayLike = 0.8,
        clipping_threshold: ArrayLike | None = 1.0,
        weight_decay_rate: ArrayLike = 1e-5,
        weight_decay_n_steps: ArrayLike | None = 0,
        epsilon1: ArrayLike = 1e-16,
        epsilon2: ArrayLike = 1e-3,
        clip_grad_norm: float | None = None,
    ) -> None:
        """Creates an Adafactor optimizer.

        Args:
          learning_rate: step size, >= 0 (relative to ``rms(w)`` if
            ``multiply_by_parameter_scale``).
          factored: factor the second moment of leaves with ndim >= 2.
          multiply_by_parameter_scale: scale steps by ``max(rms(w), epsilon2)``.
          do_clipping: clip the update's RMS at ``clipping_threshold``.
          do_momentum: keep a first moment ``m`` with decay ``beta1``.
          momentum_in_bfloat16: store ``m`` in bfloat16 to save memory.
          beta1: momentum decay, in [0, 1).
          decay_rate: exponent of the second-moment decay schedule, in [0, 1].
          clipping_threshold: update-clipping threshold (> 0); None: no clipping.
          weight_decay_rate: fraction of ``w`` removed each step, in [0, 1].
          weight_decay_n_steps: decay linearly to 0 over this many steps (>= 1);
            0 or None: the same decay at every step.
          epsilon1: regularizes the squared-gradient statistics, >= 0.
          epsilon2: lower bound of the parameter scale, >= 0.
          clip_grad_norm: global gradient-norm threshold (> 0) applied before
            the step, or None (Adafactor's own clipping is ``do_clipping``).
        """
        flags = dict(
            factored=factored,
            multiply_by_parameter_scale=multiply_by_parameter_scale,
            do_clipping=do_clipping,
            do_momentum=do_momentum,
            momentum_in_bfloat16=momentum_in_bfloat16,
        )
        for name, value in flags.items():
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {value!r}")
        base.check_unit_interval("beta1", beta1)
        base.check_range("decay_rate", decay_rate, 0.0, 1.0)
        if clipping_threshold is not None:
            base.check_positive("clipping_threshold", clipping_threshold)
        base.check_range("weight_decay_rate", weight_decay_rate, 0.0, 1.0)
        if weight_decay_n_steps is not None:
            base.check_nonnegative("weight_decay_n_steps", weight_decay_n_steps)
        base.check_nonnegative("epsilon1", epsilon1)
        base.check_nonnegative("epsilon2", epsilon2)
        self._factored = factored
        self._multiply_by_parameter_scale = multiply_by_parameter_scale
        self._do_clipping = do_clipping and clipping_threshold is not None
        self._do_momentum = do_momentum
        self._momentum_in_bfloat16 = momentum_in_bfloat16
        super().__init__(
            learning_rate,
            clip_grad_norm,
            beta1=beta1,
            decay_rate=decay_rate,
            # None means "off": keep the key (Trax state has it) with a neutral value.
            clipping_threshold=jnp.inf
            if clipping_threshold is None
            else clipping_threshold,
            weight_decay_rate=weight_decay_rate,
            weight_decay_n_steps=weight_decay_n_steps or 0,
            epsilon1=epsilon1,
            epsilon2=epsilon2,
        )

    @property
    def factored(self) -> bool:
        return self._factored

    @property
    def multiply_by_parameter_scale(self) -> bool:
        return self._multiply_by_parameter_scale

    @property
    def do_clipping(self) -> bool:
        return self._do_clipping

    @property
    def do_momentum(self) -> bool:
        return self._do_momentum

    @property
    def momentum_in_bfloat16(self) -> bool:
        return self._momentum_in_bfloat16

    def _is_factored(self, w: jax.Array) -> bool:
        return self._factored and w.ndim >= 2

    def _split(self, slots: list) -> tuple[list, jax.Array | None]:
        """``slots`` as (second-moment statistics, momentum or None)."""
        return (slots[:-1], slots[-1]) if self._do_momentum else (slots, None)

    def init(self, weights: jax.Array) -> list[jax.Array]:
        w = weights
        dt = base.compute_dtype(w)
        if self._is_factored(w):
            stats = [
                jnp.zeros(w.shape[:-1], dt),
                jnp.zeros(w.shape[:-2] + w.shape[-1:], dt),
            ]
        else:
            stats = [jnp.zeros(w.shape, dt)]
        m = [jnp.zeros_like(w, jnp.bfloat16 if self._momentum_in_bfloat16 else None)]
        return stats + m if self._do_momentum else stats

    def update(
        self,
        step: ArrayLike,
        grads: jax.Array,
        weights: jax.Array,
        slots: list[jax.Array],
        opt_params: base.OptParams,
    ) -> tuple[jax.Array, list[jax.Array]]:
        g, w = grads, weights
        stats, m_old = self._split(slots)
        names = ("learning_rate", "beta1", "decay_rate", "clipping_threshold")
        lr, beta1, decay_rate, threshold = (opt_params[k] for k in names)
        names = ("weight_decay_rate", "weight_decay_n_steps", "epsilon1", "epsilon2")
        wd, n, eps1, eps2 = (opt_params[k] for k in names)
        rho, keep = base.once_per_step(_schedules, step, decay_rate, wd, n)
        # One fused pass per reduction (rows and columns of g**2, sum(y**2), w**2)
        # and one that writes w: neither g**2 nor y is ever stored.
        if self._is_factored(w):
            v_row, v_col = stats
            (g_col,) = _unshared(g)
            v_row = rho * v_row + (1 - rho) * base.safe_mean(g * g, axis=-1)
            v_col = rho * v_col + (1 - rho) * base.safe_mean(g_col * g_col, axis=-2)
            row2 = base.safe_mean(v_row, -1, keepdims=True) / (v_row + eps1)
            col = jax.lax.rsqrt(v_col + eps1)
            y = g * jnp.sqrt(row2)[..., None] * col[..., None, :]
            # sum(y**2) = sum over rows of row2 * sum(g**2 / (v_col + eps1)).
            g_y, col2 = _unshared(g, 1 / (v_col + eps1))
            sum_y2 = jnp.sum(row2 * jnp.sum(g_y * g_y * col2[..., None, :], axis=-1))
            new_stats = [v_row, v_col]
        else:
            (v,) = stats
            v = rho * v + (1 - rho) * g * g
            y = g * jax.lax.rsqrt(v + eps1)
            (g_y,) = _unshared(g)
            sum_y2 = jnp.sum(g_y * g_y / (v + eps1))
            new_stats = [v]
        scale = lr  # clipping and the parameter scale fold into one scalar
        if self._do_clipping:
            rms_y = jnp.sqrt(sum_y2 / max(g.size, 1))
            scale = scale / jnp.maximum(1, rms_y / threshold)
        if self._multiply_by_parameter_scale:
            scale = scale * jnp.maximum(_rms(w), eps2)
        u = scale * y
        new_m = []
        if self._do_momentum:
            u = beta1 * m_old + (1 - beta1) * u
            new_m = [u]  # stored in m's dtype (bfloat16 if asked) by tree_update
        w = keep * w - u
        return w, new_stats + new_m

    def slot_axes(self, ndim: int) -> list[base.Axes]:
        axes = base.all_axes(ndim)
        factored = self._factored and ndim >= 2
        stats = [axes[:-1], axes[:-2] + axes[-1:]] if factored else [axes]
        return [*stats, axes] if self._do_momentum else stats
