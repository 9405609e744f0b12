"""The steps the benchmark times: one optimizer step of treeopt (per leaf, or
``Packed``) or of optax, and the axpy bandwidth probe, each jitted with its
carried arrays donated, as a training loop runs them."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from treeopt import base, fusion, registry
from treeopt import packed as packed_lib

LEARNING_RATE = 1e-3


@dataclasses.dataclass(frozen=True)
class Step:
    """``fn(carry, const) -> new carry``, jitted with ``carry`` donated.

    ``init(params, grads)`` gives the first ``(carry, const)``; for an optimizer
    step the carry is ``(weights, state)`` and ``const`` holds the gradients
    (never donated: every step reads the same ones).
    """

    fn: Callable[[Any, Any], Any]
    init: Callable[[Any, Any], tuple[Any, Any]]


def matched_optimizer(name: str, sibling_outputs: bool = False) -> base.Optimizer:
    """The registry's treeopt optimizer matched to its optax counterpart; with
    ``sibling_outputs`` an elementwise one is wrapped in ``fusion.SiblingOutputs``
    (one loop per leaf under XLA:CPU's multi-output fusion)."""
    opt = registry.ENTRIES[name].make_matched(LEARNING_RATE)
    if sibling_outputs and base.is_elementwise(opt):
        return fusion.SiblingOutputs(opt)
    return opt


def optax_optimizer(name: str) -> Any:
    """The registry's optax counterpart of ``name``."""
    return registry.ENTRIES[name].make_optax(LEARNING_RATE)


def _step_zero() -> jax.Array:
    # An array, not a Python int: a constant step would let XLA fold the bias
    # corrections, which a training loop cannot.
    return jnp.asarray(0, jnp.int32)


def treeopt_step(opt: base.Optimizer) -> Step:
    """``tree_update`` on the weight tree (treeopt's default path)."""

    def init(params: Any, grads: Any) -> tuple[Any, Any]:
        slots, opt_params = opt.tree_init(params, store_slots=False)
        return (params, slots), (grads, opt_params, _step_zero())

    def fn(carry: Any, const: Any) -> Any:
        (params, slots), (grads, opt_params, step) = carry, const
        return opt.tree_update(
            step, grads, params, slots, opt_params, store_slots=False
        )

    return Step(fn, init)


def packed_step(opt: base.Optimizer, params: Any) -> Step:
    """``Packed.update`` with weights and gradients held packed, as a model
    using ``Packed`` keeps them (the layout fixed by ``params``' shapes)."""
    pk = packed_lib.Packed(opt, params)

    def init(params: Any, grads: Any) -> tuple[Any, Any]:
        params, grads = pk.pack(params), pk.pack(grads)
        slots, opt_params = pk.init(params)
        return (params, slots), (grads, opt_params, _step_zero())

    def fn(carry: Any, const: Any) -> Any:
        (params, slots), (grads, opt_params, step) = carry, const
        return pk.update(step, grads, params, slots, opt_params)

    return Step(fn, init)


def optax_step(tx: Any) -> Step:
    """``tx.update`` and ``optax.apply_updates``."""
    import optax

    def init(params: Any, grads: Any) -> tuple[Any, Any]:
        return (params, tx.init(params)), grads

    def fn(carry: Any, grads: Any) -> Any:
        params, state = carry
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return Step(fn, init)


def compile_fn(fn: Callable, carry: Any, const: Any) -> tuple[Any, float]:
    """``fn`` jitted with ``carry`` donated, lowered and compiled for ``carry``
    and ``const`` (arrays or ``jax.ShapeDtypeStruct``); and the seconds that
    took, tracing included."""
    start = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=0).lower(carry, const).compile()
    return compiled, time.perf_counter() - start


class Runner:
    """A compiled step and the arrays it steps on. Each call runs one step on
    the carry that the last one returned and waits for it."""

    def __init__(self, fn: Callable, carry: Any, const: Any) -> None:
        self._compiled, self.compile_s = compile_fn(fn, carry, const)
        self.carry, self.const = carry, const

    def __call__(self) -> None:
        self.carry = self._compiled(self.carry, self.const)
        jax.block_until_ready(self.carry)


def runner(step: Step, params: Any, grads: Any) -> Runner:
    """``step`` compiled, stepping on a copy of ``params`` (donated) and on
    ``grads``."""
    carry, const = step.init(jax.tree.map(jnp.copy, params), grads)
    return Runner(step.fn, carry, const)


AXPY_BYTES_PER_ELEMENT = 12  # read x and y, write y


def _axpy(y: jax.Array, x: jax.Array) -> jax.Array:
    return 0.5 * x + y


def axpy_runner(n: int) -> Runner:
    """The bandwidth probe, ``y <- x / 2 + y`` over ``n`` float32 elements."""
    vectors = jnp.zeros((n,), jnp.float32), jnp.ones((n,), jnp.float32)
    return Runner(_axpy, *vectors)
