"""Where a step's time goes: its full-size kernels, read from the optimized HLO,
and the bytes per parameter they move against the ideal."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from treeopt import registry
from treeopt.bench import steps

# name = shape op(operands): the shape is one array or, for a multi-output
# fusion, a tuple of arrays; a layout in braces may follow each array.
_INSTR = re.compile(
    r"^\s*(?:ROOT )?%(\S+) = (\([^()]*\)|\S+?)(?:\{[^}]*\})? (\w[\w-]*)\((.*?)\)"
)


def hlo_passes(compiled_text: str, shape: tuple[int, ...]) -> list[tuple[str, int]]:
    """The kernels of a compiled step that touch full-size (``shape``) arrays.

    Reads the optimized HLO's entry computation; returns ``(name, n)`` per kernel
    (fusion, copy, ...) whose outputs or operands have ``shape``, ``n`` being how
    many full-size arrays it reads plus writes (a multi-output fusion writes
    several; reading one of its outputs reads one array).
    """
    full = "[" + ",".join(map(str, shape)) + "]"

    def is_full(array_shape: str) -> bool:
        return re.sub(r"\{[^}]*\}", "", array_shape).endswith(full)

    entry = compiled_text[compiled_text.index("\nENTRY") :]
    shapes: dict[str, list[str]] = {}
    passes = []
    for line in entry.splitlines():
        m = _INSTR.match(line)
        if m is None:
            continue
        name, out_shape, op, operands = m.groups()
        outs = [x.strip() for x in out_shape.strip("()").split(", ")]
        if op == "get-tuple-element":
            index = int(re.search(r"index=(\d+)", line).group(1))
            source = shapes.get(operands.strip().lstrip("%"), [""])
            shapes[name] = [source[index] if index < len(source) else ""]
            continue
        shapes[name] = outs
        if op in ("parameter", "tuple", "bitcast", "constant"):
            continue
        names = [
            x.strip().lstrip("%") for x in re.sub(r"/\*.*?\*/", "", operands).split(",")
        ]
        n_in = sum(len(shapes.get(x, [])) == 1 and is_full(shapes[x][0]) for x in names)
        n_out = sum(is_full(x) for x in outs)
        if n_in or n_out:
            passes.append((name, n_in + n_out))
    return passes


def profile_leaf(
    shape: tuple[int, ...] = (4096, 4096),
    names: Sequence[str] = registry.NAMES,
    sibling_outputs: bool = False,
) -> list[dict]:
    """Per optimizer of ``names``, on one float32 leaf of ``shape``: the
    full-size kernels of the benchmark's compiled treeopt and optax steps
    (compiled for abstract arrays) and the bytes per parameter they move,
    against the ideal (each array read once, each output written once)."""
    params = {"w": jax.ShapeDtypeStruct(shape, jnp.float32)}
    rows = []
    for name in names:
        pair = {
            "treeopt": steps.treeopt_step(
                steps.matched_optimizer(name, sibling_outputs)
            ),
            "optax": steps.optax_step(steps.optax_optimizer(name)),
        }
        row: dict[str, Any] = {"optimizer": name}
        for lib, step in pair.items():
            carry, const = jax.eval_shape(step.init, params, params)
            compiled, _ = steps.compile_fn(step.fn, carry, const)
            passes = hlo_passes(compiled.as_text(), shape)
            row[lib] = {"kernels": len(passes), "bytes": 4 * sum(n for _, n in passes)}
            if lib == "treeopt":
                full_slots = sum(x.shape == shape for x in jax.tree.leaves(carry[1]))
                row["ideal_bytes"] = 4 * (3 + 2 * full_slots)
        rows.append(row)
    return rows


def profile_markdown(rows: list[dict], shape: tuple[int, ...]) -> str:
    """``profile_leaf``'s rows as a markdown table."""
    lines = [
        f"Full-size kernels and bytes moved per parameter, one {shape} float32 leaf "
        "(from the compiled HLO):",
        "",
        "| optimizer | ideal B/param | treeopt kernels | treeopt B/param | optax "
        "kernels | optax B/param |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        t, o = r["treeopt"], r["optax"]
        lines.append(
            f"| {r['optimizer']} | {r['ideal_bytes']} | {t['kernels']} | {t['bytes']} "
            f"| {o['kernels']} | {o['bytes']} |"
        )
    return "\n".join(lines)
