"""One loop per leaf on XLA:CPU, when its multi-output fusion is turned on: an
opt-in at the edge, which the core never imports.

XLA:CPU compiles each output of a step to a loop of its own: Adam's new ``m``,
``v`` and ``w`` are three passes over memory, 40 bytes per float32 parameter
where 28 would do. XLA has a multi-output fusion for CPU, off by default in
jax 0.10; it is turned on for the process, before JAX starts its CPU backend::

    XLA_FLAGS=--xla_backend_extra_options=xla_cpu_use_multi_output_fusion

(or ``enable_cpu_multi_output_fusion()`` from Python, before the first JAX
computation). It merges loops that read the same operands ("siblings") into one
loop with several outputs, but not a loop into the loop that reads its output,
and the weight update of Momentum, RMSProp and Adam reads the new slots.
``SiblingOutputs(optimizer)`` computes the new weights from the inputs instead,
so that XLA emits one loop per leaf that reads ``g``, ``w`` and the slots once
and writes ``w`` and the slots once: the memory-traffic bound. Without the
option that form is slower (XLA copies each donated slot first): wrap an
optimizer only where ``cpu_multi_output_fusion()`` is true.
"""

from __future__ import annotations

import functools
import os
import re

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from treeopt import base
from treeopt.wrapper import Wrapper

OPTION = "xla_cpu_use_multi_output_fusion"
XLA_FLAGS = f"--xla_backend_extra_options={OPTION}"


def cpu_multi_output_fusion() -> bool:
    """Whether the default backend is XLA:CPU with multi-output fusion on.

    ``False`` at no cost unless ``$XLA_FLAGS`` names the option; then JAX's
    default backend must be the CPU and a probe (two outputs of the same
    inputs, compiled once per process) must come back as one fused loop.
    """
    if OPTION not in os.environ.get("XLA_FLAGS", ""):
        return False
    return _probe()


def enable_cpu_multi_output_fusion() -> None:
    """Turns XLA:CPU's multi-output fusion on for this process.

    Adds the option to ``$XLA_FLAGS`` (``with_option``), which XLA reads once,
    when JAX starts its backend: call this before the first JAX computation.
    Then checks, as ``cpu_multi_output_fusion`` does, that the option works,
    which starts the backend. Raises ``RuntimeError``, with ``$XLA_FLAGS`` put
    back as it was, where the backend had started without the option or is not
    the CPU (a backend that this call started keeps the option, harmless off
    the CPU), or where ``$XLA_FLAGS`` names a flags file.
    """
    before = os.environ.get("XLA_FLAGS")
    try:
        os.environ["XLA_FLAGS"] = with_option(before or "")
    except ValueError as e:
        raise RuntimeError(str(e)) from None
    if cpu_multi_output_fusion():
        return
    if before is None:
        del os.environ["XLA_FLAGS"]
    else:
        os.environ["XLA_FLAGS"] = before
    backend = jax.default_backend()
    if backend != "cpu":
        raise RuntimeError(
            f"multi-output fusion is an XLA:CPU option; JAX's default backend is "
            f"{backend!r}"
        )
    raise RuntimeError(
        "JAX's CPU backend started before multi-output fusion was turned on: call "
        "enable_cpu_multi_output_fusion() before the first JAX computation, or "
        f"start the process with XLA_FLAGS={XLA_FLAGS}"
    )


def with_option(flags: str) -> str:
    """``flags`` (an ``$XLA_FLAGS`` value) with the option added as a flag of
    its own (XLA merges repeated ``--xla_backend_extra_options``), or unchanged
    if one of its extra-options lists already names it. Raises ``ValueError``
    for a flags file (a value not starting with ``-``), which XLA would read."""
    if flags.strip() and not flags.strip().startswith("-"):
        raise ValueError(
            f"XLA_FLAGS names a flags file ({flags.strip()!r}); add {XLA_FLAGS} "
            "to that file instead"
        )
    for value in re.findall(r"--xla_backend_extra_options=(\S*)", flags):
        names = [o.split("=", 1)[0] for o in value.strip("\"'").split(",")]
        if OPTION in names:
            return flags
    return f"{flags} {XLA_FLAGS}".strip()


@functools.cache
def _probe() -> bool:
    if jax.default_backend() != "cpu":
        return False
    x = jax.ShapeDtypeStruct((1024,), jnp.float32)
    text = jax.jit(lambda a, b: (a + b, a * b)).lower(x, x).compile().as_text()
    entry = text[text.index("\nENTRY") :]
    return any(" = (" in line and " fusion(" in line for line in entry.splitlines())


class SiblingOutputs(Wrapper):
    """An elementwise optimizer whose new weights and slots are computed side by
    side from the inputs, for XLA:CPU's multi-output fusion (module docstring).

    Per leaf: ``new_s`` is the wrapped ``update`` as it is; ``new_w`` comes from
    a second call on the same ``g, w, s`` passed through
    ``jax.lax.optimization_barrier``, which keeps XLA from sharing the two calls'
    work (and so reading the stored ``new_s``). Each unused half is dropped by
    XLA, but both are traced: the traced program doubles. The barrier also makes
    XLA write out a gradient computed just before it (a clipped gradient, or one
    from the backward pass in the same jit). The same operations on the same
    values: the tests find the same bits as the wrapped optimizer's. Without
    slots (SGD) there is one output and nothing to fuse: the wrapped ``update``
    is used as it is.
    """

    def __init__(self, optimizer: base.Optimizer) -> None:
        """Args:
        optimizer: an elementwise treeopt optimizer (``base.is_elementwise``).
        """
        super().__init__(optimizer)
        if not base.is_elementwise(optimizer):
            raise TypeError(
                f"SiblingOutputs needs an elementwise optimizer (SGD, Momentum, "
                f"RMSProp, Adam); {type(optimizer).__name__} reduces over a leaf"
            )

    def update(
        self,
        step: ArrayLike,
        grads: jax.Array,
        weights: jax.Array,
        slots: base.Slots,
        opt_params: base.OptParams,
    ) -> tuple[jax.Array, base.Slots]:
        if not jax.tree.leaves(slots):  # no slots (SGD): one output, nothing to fuse
            return self.inner.update(step, grads, weights, slots, opt_params)
        _, new_s = self.inner.update(step, grads, weights, slots, opt_params)
        g, w, s = jax.lax.optimization_barrier((grads, weights, slots))
        new_w, _ = self.inner.update(step, g, w, s, opt_params)
        return new_w, new_s
