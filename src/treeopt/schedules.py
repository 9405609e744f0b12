"""Learning-rate schedules: pure functions ``step -> learning rate``.

Each factory returns a function of a step (a Python int or an integer array,
traced under ``jax.jit``) that returns a 0-d float32 array, so a jitted training
step can set ``opt_params['learning_rate'] = schedule(step)`` without retracing.
Steps count from 0, as in ``tree_update``; Trax's training loop handed step 1 to
the first update (``Trainer(first_step=1)`` reproduces Trax's numbers exactly).

Differences from Trax's ``lr_schedules.multifactor``: ``linear_warmup`` with
``warmup_steps=0`` is 1 (Trax divides by zero), ``rsqrt_decay`` at step 0 uses
``max(step, warmup_steps, 1)`` (Trax returns inf), ``two_constants`` works on a
traced step, and bad arguments raise ``ValueError`` when the schedule is built.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from treeopt import base

Schedule = Callable[[ArrayLike], jax.Array]


def _linear_warmup(s: jax.Array, warmup_steps: int) -> jax.Array:
    if warmup_steps == 0:
        return jnp.ones_like(s)
    return jnp.minimum(1.0, s / warmup_steps)


def _rsqrt(s: jax.Array, warmup_steps: int) -> jax.Array:
    return jax.lax.rsqrt(jnp.maximum(s, max(warmup_steps, 1)))


def _cosine(s: jax.Array, warmup_steps: int, steps_per_cycle: int) -> jax.Array:
    progress = jnp.maximum(0.0, (s - warmup_steps) / steps_per_cycle)
    return 0.5 * (1.0 + jnp.cos(jnp.pi * (progress % 1.0)))


# name -> factor(s, kw), s the step as float32 and kw multifactor's arguments.
_FACTORS: dict[str, Callable[[jax.Array, dict], jax.Array]] = {
    "constant": lambda s, kw: jnp.full_like(s, kw["constant"]),
    "two_constants": lambda s, kw: jnp.where(
        s < kw["second_constant_step"], kw["constant"], kw["second_constant"]
    ),
    "linear_warmup": lambda s, kw: _linear_warmup(s, kw["warmup_steps"]),
    "rsqrt_decay": lambda s, kw: _rsqrt(s, kw["warmup_steps"]),
    "rsqrt_normalized_decay": lambda s, kw: (
        jnp.sqrt(jnp.float32(max(kw["warmup_steps"], 1)))
        * _rsqrt(s, kw["warmup_steps"])
    ),
    "decay_every": lambda s, kw: (
        kw["decay_factor"] ** jnp.floor(s / kw["steps_per_decay"])
    ),
    "cosine_decay": lambda s, kw: _cosine(s, kw["warmup_steps"], kw["steps_per_cycle"]),
}


def _check_int(name: str, value: int, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def multifactor(
    factors: str = "constant * linear_warmup * rsqrt_decay",
    constant: float = 0.1,
    warmup_steps: int = 400,
    decay_factor: float = 0.5,
    steps_per_decay: int = 20000,
    steps_per_cycle: int = 100000,
    second_constant: float = 0.01,
    second_constant_step: int = 10000,
    minimum: float = 0.0,
) -> Schedule:
    """Trax's product-of-factors schedule, e.g. ``'constant * linear_warmup'``.

    With ``s`` the step, the factors are::

        constant               constant
        two_constants          constant if s < second_constant_step else second_constant
        linear_warmup          min(1, s / warmup_steps)
        rsqrt_decay            1 / sqrt(max(s, warmup_steps, 1))
        rsqrt_normalized_decay sqrt(max(warmup_steps, 1) / max(s, warmup_steps, 1))
        decay_every            decay_factor ** floor(s / steps_per_decay)
        cosine_decay           (1 + cos(pi * frac(max(0, s - warmup_steps)
                                                  / steps_per_cycle))) / 2

    The result is ``max(product, minimum)``. Defaults are Trax's.

    Args:
      factors: factor names joined by ``*``.
      constant: the base value, used by ``constant`` and ``two_constants``.
      warmup_steps: length of the linear warmup, an integer >= 0.
      decay_factor: multiplier applied every ``steps_per_decay`` steps, > 0.
      steps_per_decay: period of ``decay_every``, an integer >= 1.
      steps_per_cycle: period of ``cosine_decay``, an integer >= 1.
      second_constant: value of ``two_constants`` from ``second_constant_step``.
      second_constant_step: step at which ``two_constants`` switches, >= 0.
      minimum: lower bound of the result.
    """
    names = [n.strip() for n in factors.split("*")]
    for name in names:
        if name not in _FACTORS:
            raise ValueError(
                f"unknown schedule factor {name!r} in {factors!r}; known factors: "
                f"{', '.join(_FACTORS)}"
            )
    _check_int("warmup_steps", warmup_steps, 0)
    _check_int("steps_per_decay", steps_per_decay, 1)
    _check_int("steps_per_cycle", steps_per_cycle, 1)
    _check_int("second_constant_step", second_constant_step, 0)
    base.check_positive("decay_factor", decay_factor)
    kw = dict(
        constant=constant,
        warmup_steps=warmup_steps,
        decay_factor=decay_factor,
        steps_per_decay=steps_per_decay,
        steps_per_cycle=steps_per_cycle,
        second_constant=second_constant,
        second_constant_step=second_constant_step,
    )

    def schedule(step: ArrayLike) -> jax.Array:
        s = jnp.asarray(step).astype(jnp.float32)
        lr = jnp.ones((), jnp.float32)
        for name in names:
            lr = lr * _FACTORS[name](s, kw)
        return jnp.maximum(lr, minimum).astype(jnp.float32)

    return schedule


def constant(value: float) -> Schedule:
    """``value`` at every step."""
    return multifactor("constant", constant=value)


def linear_warmup(value: float, warmup_steps: int) -> Schedule:
    """``value * min(1, step / warmup_steps)``: 0 at step 0, ``value`` from
    ``warmup_steps`` on (``value`` throughout when ``warmup_steps = 0``)."""
    return multifactor("constant * linear_warmup", value, warmup_steps)


def rsqrt_decay(value: float, warmup_steps: int) -> Schedule:
    """``value * sqrt(w / max(step, w))`` with ``w = max(warmup_steps, 1)``:
    ``value`` until ``warmup_steps``, then decaying as ``1 / sqrt(step)``."""
    return multifactor("constant * rsqrt_normalized_decay", value, warmup_steps)


def cosine_decay(value: float, steps_per_cycle: int, warmup_steps: int = 0) -> Schedule:
    """``value * (1 + cos(pi * p)) / 2`` with ``p = frac(max(0, step -
    warmup_steps) / steps_per_cycle)``: from ``value`` down to 0 over a cycle
    (then it restarts, as in Trax). No warmup by itself: combine it with one
    through ``multifactor('constant * linear_warmup * cosine_decay', ...)``."""
    return multifactor(
        "constant * cosine_decay",
        value,
        warmup_steps,
        steps_per_cycle=steps_per_cycle,
    )


def warmup(n_warmup_steps: int, max_value: float) -> Schedule:
    """Trax's ``warmup``: linear from 0 to ``max_value``, then constant."""
    return linear_warmup(max_value, n_warmup_steps)


def warmup_and_rsqrt_decay(n_warmup_steps: int, max_value: float) -> Schedule:
    """Trax's ``warmup_and_rsqrt_decay``: linear warmup to ``max_value`` over
    ``n_warmup_steps``, then ``max_value * sqrt(n_warmup_steps / step)``."""
    return multifactor(
        "constant * linear_warmup * rsqrt_normalized_decay", max_value, n_warmup_steps
    )
