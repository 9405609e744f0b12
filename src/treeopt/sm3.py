"""SM3 optimizer."""

import enum

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from treeopt import base


class MomentumType(enum.IntEnum):
    """How SM3 applies momentum: EMA (default), heavy ball or Nesterov."""

    EMA = 1
    HEAVY_BALL = 2
    NESTEROV = 3


def _precondition(acc: jax.Array, g: jax.Array) -> jax.Array:
    """``P(acc) * g`` with ``P(a) = 1 / (sqrt(a) + 1e-16)`` where ``a > 0``, else 0."""
    inv = 1 / (jnp.sqrt(acc) + 1e-16)
    return jax.lax.select(acc > 0, inv, jnp.zeros_like(inv)) * g


def _cover(accs: list[jax.Array], shape: tuple) -> jax.Array:
    """``min_i`` of ``accs[i]`` broadcast along axis ``i`` of ``shape``."""
    if len(shape) <= 1:
        return accs[0]
    views = [
        a.reshape([d if j == i else 1 for j, d in enumerate(shape)])
        for i, (a, d) in enumerate(zip(accs, shape, strict=True))
    ]
    acc = views[0]
    for view in views[1:]:
        acc = jnp.minimum(acc, view)
    return acc


def _norm(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.sum(x * x))


_SEPARATE_PASSES_MIN_SIZE = 1 << 16


def _accumulate(
    vs: list[jax.Array], g: jax.Array, k: jax.Array, c: jax.Array
) -> tuple[jax.Array, list[jax.Array]]:
    """``acc = b2 * cover(vs) + c * g**2`` and, per axis ``i``, the max of ``acc``
    over every other axis (``acc >= 0``), given ``k = b2 / c`` and ``c > 0``.

    Written as ``c * (cover(k * vs) + g**2)``, so that no full-size term carries
    a scalar. On leaves of ``_SEPARATE_PASSES_MIN_SIZE`` elements or more each
    max gets its own copy of ``g`` and ``vs`` (an optimization barrier, which XLA
    cannot merge): each max is then one fused pass over ``g``, and the full-size
    ``acc`` is never stored. Smaller leaves skip the copies (less to compile).
    """
    vs = [k * v for v in vs]
    x = _cover(vs, g.shape) + g * g
    acc = c * x
    if g.ndim <= 1:
        return acc, [acc]
    axes = [tuple(j for j in range(g.ndim) if j != i) for i in range(g.ndim)]
    if g.size < _SEPARATE_PASSES_MIN_SIZE:  # small: not worth the extra code
        return acc, [c * jnp.max(x, axis=a, initial=0.0) for a in axes]
    maxes = []
    copies = jax.lax.optimization_barrier(((g, *vs),) * g.ndim)
    for a, (g_i, *vs_i) in zip(axes, copies, strict=True):
        x_i = _cover(vs_i, g.shape) + g_i * g_i
        maxes.append(c * jnp.max(x_i, axis=a, initial=0.0))
    return acc, maxes


def _decay(b2: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``k = b2 / c`` and ``c`` (1 if ``b2 == 1``, else ``1 - b2``), and 1."""
    c = jnp.where(b2 == 1, 1, 1 - b2).astype(b2.dtype)
    return b2 / c, c, jnp.ones_like(c)


class SM3(base.Optimizer):
    """SM3: an AdaGrad-like method whose accumulators cost one vector per axis.

    Per leaf (``b2 = second_moment_averaging``, ``c = 1`` if ``b2 == 1`` else
    ``1 - b2``, ``P(a) = 1 / (sqrt(a) + 1e-16)`` where ``a > 0`` else 0)::

        acc = min_i v1s[i] (broadcast along axis i);  acc <- b2 * acc + c * g**2
        pg = P(acc) * g;  v1s[i] <- max of acc over all axes but i
        pg <- pg * |P(acc2) g| / (|pg| + 1e-16)   (grafting, b2 != 1: acc2 += g**2)
        pg <- pg + weight_decay * w
        m <- (1 - b) pg + b m (EMA) or pg + b m;  u = m, or pg + b m (NESTEROV)
        w <- w - lr * u

    Rank-1 and rank-0 leaves keep one accumulator of their own shape.
    Slots: a tuple ``(m, v1s, v2s)``: ``m`` zeros like ``w`` or ``[]`` without
    momentum, ``v1s`` one vector per axis, ``v2s`` the same when grafting or ``[]``.
    Anil et al., "Memory-Efficient Adaptive Optimization" (2019),
    https://arxiv.org/abs/1901.11150.

    Differences from Trax: a 0-d weight works (Trax raised ``IndexError``); the
    slot lists passed in are never mutated; accepts ``clip_grad_norm``.
    """

    structural = ("has_momentum", "graft", "momentum_type")

    def __init__(
        self,
        learning_rate: ArrayLike = 0.01,
        momentum: ArrayLike = 0.9,
        second_moment_averaging: ArrayLike = 1.0,
        weight_decay: ArrayLike = 0.0,
        momentum_type: MomentumType = MomentumType.EMA,
        clip_grad_norm: float | None = None,
    ) -> None:
        """Creates an SM3 optimizer.

        Args:
          learning_rate: step size, >= 0.
          momentum: momentum coefficient ``b``, in [0, 1); 0 disables momentum
            (no ``m`` slot).
          second_moment_averaging: ``b2``, in (0, 1]; 1 adds squared gradients
            like AdaGrad, less than 1 averages them and turns on grafting.
          weight_decay: coefficient of ``w`` added to the update, >= 0.
          momentum_type: a ``MomentumType`` (EMA, HEAVY_BALL or NESTEROV).
          clip_grad_norm: global gradient-norm threshold (> 0), or None.
        """
        base.check_unit_interval("momentum", momentum)
        base.check_range(
            "second_moment_averaging", second_moment_averaging, 0.0, 1.0, low_open=True
        )
        base.check_nonnegative("weight_decay", weight_decay)
        try:
            self._momentum_type = MomentumType(momentum_type)
        except ValueError:
            raise ValueError(
                f"momentum_type must be one of {[m.name for m in MomentumType]}, "
                f"got {momentum_type!r}"
            ) from None
        self._has_momentum = float(momentum) > 0
        self._graft = float(second_moment_averaging) != 1.0
        super().__init__(
            learning_rate,
            clip_grad_norm,
            momentum=momentum,
            second_moment_averaging=second_moment_averaging,
            weight_decay=weight_decay,
        )

    @property
    def momentum_type(self) -> MomentumType:
        return self._momentum_type

    @property
    def has_momentum(self) -> bool:
        return self._has_momentum

    @property
    def graft(self) -> bool:
        return self._graft

    def init(self, weights: jax.Array) -> tuple:
        w = weights
        m = jnp.zeros_like(w) if self._has_momentum else []
        shapes = [(d,) for d in w.shape] or [()]
        v1s = [jnp.zeros(s, w.dtype) for s in shapes]
        v2s = [jnp.zeros(s, w.dtype) for s in shapes] if self._graft else []
        return m, v1s, v2s

    def update(
        self,
        step: ArrayLike,
        grads: jax.Array,
        weights: jax.Array,
        slots: tuple,
        opt_params: base.OptParams,
    ) -> tuple[jax.Array, tuple]:
        del step
        g, w, (m, v1s, v2s) = grads, weights, slots
        names = ("learning_rate", "momentum", "second_moment_averaging", "weight_decay")
        lr, b, b2, weight_decay = (opt_params[k] for k in names)
        k, c, one = base.once_per_step(_decay, b2)
        acc, new_v1s = _accumulate(list(v1s), g, k, c)
        pg = _precondition(acc, g)
        new_v2s = []
        if self._graft:  # v2 adds g**2 undecayed: k = c = 1
            acc2, new_v2s = _accumulate(list(v2s), g, one, one)
            pg_graft = _precondition(acc2, g)
            pg = pg * _norm(pg_graft) / (_norm(pg) + 1e-16)
        pg = pg + weight_decay * w
        new_m, u = [], pg
        if self._has_momentum:
            if self._momentum_type == MomentumType.EMA:
                m = (1 - b) * pg + b * m
                u = m
            else:
                m = pg + b * m
                u = pg + b * m if self._momentum_type == MomentumType.NESTEROV else m
            new_m = m
        return w - u * lr, (new_m, new_v1s, new_v2s)

    def slot_axes(self, ndim: int) -> list[base.Axes]:
        m = [base.all_axes(ndim)] if self._has_momentum else []
        v = [(i,) for i in range(ndim)] or [()]
        return m + v * (2 if self._graft else 1)
