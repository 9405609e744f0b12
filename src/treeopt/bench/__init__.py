"""Step time and memory of treeopt against optax: the engine of ``treeopt bench``.

Needs ``optax`` (the ``optax`` extra). One process, one thing at a time: for
each tree, for each optimizer, the row's steps (treeopt per leaf, treeopt
``Packed``, optax, and the axpy bandwidth probe) are compiled on fresh copies
of the tree's arrays, timed interleaved, one step each per round for
``rounds`` rounds, and their medians kept; then the row's arrays are dropped.

The bound of a row is the time the bytes of an ideal step (read ``w``, ``g``
and the state once, write ``w`` and the state once) take at the rate of the
jitted ``y <- x / 2 + y`` over as many elements as the tree has parameters
(the same memory regime: caches or DRAM; at most ``bandwidth_elements``),
timed in the same rounds as the row. It is the axpy's rate, not the memory's
peak: a step can beat it.

Modules: ``trees`` (shapes and arrays), ``steps`` (the jitted steps),
``timing`` (rounds and medians), ``report`` (markdown, JSON) and ``hlo`` (the
kernels of a compiled step).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax

from treeopt import registry
from treeopt.bench import steps, timing
from treeopt.bench.hlo import hlo_passes, profile_leaf, profile_markdown
from treeopt.bench.report import machine_info, row_line, to_json, to_markdown
from treeopt.bench.trees import (
    Shapes,
    make_tree,
    many_small_shapes,
    nbytes,
    one_big_shapes,
    transformer_shapes,
)
from treeopt.errors import Interrupted

__all__ = [
    "PRESETS",
    "Config",
    "config",
    "hlo_passes",
    "make_tree",
    "many_small_shapes",
    "measure_row",
    "one_big_shapes",
    "profile_leaf",
    "profile_markdown",
    "run",
    "to_json",
    "to_markdown",
    "transformer_shapes",
]

PRESETS = ("full", "quick", "tiny")


@dataclasses.dataclass(frozen=True)
class Config:
    """What to run: trees by name, optimizers (registry names), rounds."""

    trees: dict[str, Shapes]
    optimizers: Sequence[str] = registry.NAMES
    rounds: int = 25
    # The bandwidth probe uses as many elements as the tree, at most this many.
    bandwidth_elements: int = 1 << 26
    packed: bool = True
    # Time treeopt's elementwise optimizers wrapped in fusion.SiblingOutputs.
    sibling_outputs: bool = False
    # One leaf of this shape is profiled (kernels, bytes per parameter); None: no.
    profile_shape: tuple[int, ...] | None = (4096, 4096)
    # (tree, optimizer) pairs in the order to run; None: every tree x optimizer.
    rows: Sequence[tuple[str, str]] | None = None
    # No row starts after this many seconds (for a lent accelerator).
    budget_s: float = math.inf

    def row_order(self) -> list[tuple[str, str]]:
        """The (tree, optimizer) pairs in the order they run."""
        if self.rows is not None:
            return list(self.rows)
        return [(t, o) for t in self.trees for o in self.optimizers]


def config(name: str) -> Config:
    """``'full'``, ``'quick'`` (smaller trees: about a minute) or ``'tiny'`` (checks
    that it runs)."""
    if name == "full":
        trees = {
            "transformer": transformer_shapes(),
            "many_small": many_small_shapes(),
            "one_big": one_big_shapes(),
        }
        return Config(trees)
    if name == "quick":
        # Smaller trees: compiling the steps of 2000 leaves takes minutes.
        trees = {
            "transformer": transformer_shapes(256, 2, 1024, 256, 4),
            "many_small": many_small_shapes(64),
            "one_big": one_big_shapes(2048),
        }
        return Config(trees, rounds=9)
    if name == "tiny":
        trees = {
            "transformer": transformer_shapes(32, 2, 64, 16, 4),
            "many_small": many_small_shapes(12),
            "one_big": one_big_shapes(64),
        }
        return Config(
            trees, rounds=3, bandwidth_elements=1 << 16, profile_shape=(32, 64)
        )
    raise ValueError(f"config must be one of {', '.join(PRESETS)}, got {name!r}")


def measure_row(
    tree_name: str, params: Any, grads: Any, opt_name: str, cfg: Config
) -> dict:
    """Compiles and times one (tree, optimizer) row on ``params`` and ``grads``
    (not donated: each step gets a copy); returns its record."""
    opt = steps.matched_optimizer(opt_name, cfg.sibling_outputs)
    row_steps = {
        "treeopt": steps.treeopt_step(opt),
        "optax": steps.optax_step(steps.optax_optimizer(opt_name)),
    }
    if cfg.packed:
        # Packed picks its layout from the optimizer's class: the plain one.
        plain = steps.matched_optimizer(opt_name)
        row_steps["packed"] = steps.packed_step(plain, params)
    runners = {
        name: steps.runner(step, params, grads) for name, step in row_steps.items()
    }
    state_bytes = {name: nbytes(r.carry[1]) for name, r in runners.items()}
    leaves = jax.tree.leaves(params)
    size = sum(x.size for x in leaves)
    n_probe = max(1 << 10, min(size, cfg.bandwidth_elements))
    runners["axpy"] = steps.axpy_runner(n_probe)
    seconds = timing.interleaved(runners, cfg.rounds)
    ms = {name: timing.median_ms(s) for name, s in seconds.items()}
    bandwidth = steps.AXPY_BYTES_PER_ELEMENT * n_probe / (ms["axpy"] / 1e3)
    param_bytes = nbytes(params)
    record: dict[str, Any] = {
        "tree": tree_name,
        "optimizer": opt_name,
        "n_leaves": len(leaves),
        "n_params": size,
        "param_bytes": param_bytes,
        "axpy": {
            "elements": n_probe,
            "samples": len(seconds["axpy"]),
            "ms": ms["axpy"],
            "gbs": bandwidth / 1e9,
        },
    }
    for name in row_steps:
        bound_ms = 1e3 * (3 * param_bytes + 2 * state_bytes[name]) / bandwidth
        record[name] = {
            "ms": ms[name],
            "samples": len(seconds[name]),
            "compile_s": runners[name].compile_s,
            "state_bytes": state_bytes[name],
            "bound_ms": bound_ms,
            "pct_of_bound": 100 * bound_ms / ms[name],
        }
    record["ratio"] = ms["treeopt"] / ms["optax"]
    if "packed" in record:
        record["packed_ratio"] = ms["packed"] / ms["optax"]
    return record


def run(cfg: Config, log: Callable[[str], None] | None = None) -> dict:
    """Runs every row of ``cfg`` in order; a failing row is recorded, not
    raised. On Ctrl-C, raises ``errors.Interrupted`` whose ``result`` holds the
    rows finished so far (and ``"interrupted": True``)."""
    start = time.perf_counter()
    result: dict[str, Any] = {
        "machine": machine_info(),
        "config": {
            "rounds": cfg.rounds,
            "bandwidth_elements": cfg.bandwidth_elements,
            "learning_rate": steps.LEARNING_RATE,
            "sibling_outputs": cfg.sibling_outputs,
        },
        "rows": [],
    }
    order = cfg.row_order()
    try:
        # A tree's arrays are made once for its consecutive rows.
        for tree_name, group in itertools.groupby(order, key=lambda row: row[0]):
            arrays = None
            for _, opt_name in group:
                t0 = time.perf_counter()
                if t0 - start > cfg.budget_s:
                    record = _failed(tree_name, opt_name, "skipped: budget")
                else:
                    try:
                        if arrays is None:
                            shapes = cfg.trees[tree_name]
                            # The weights, and gradients of the same shapes.
                            arrays = make_tree(shapes, 0), make_tree(shapes, 1)
                        record = measure_row(tree_name, *arrays, opt_name, cfg)
                    except Exception as e:  # e.g. out of memory; keep the rest
                        record = _failed(tree_name, opt_name, repr(e))
                record["wall_s"] = time.perf_counter() - t0
                result["rows"].append(record)
                if log is not None:
                    log(row_line(record))
            del arrays
        if cfg.profile_shape is not None:
            result["profile"] = _profile(cfg)
    except KeyboardInterrupt:
        result["interrupted"] = True
        result["wall_s"] = time.perf_counter() - start
        done = len(result["rows"])
        raise Interrupted(f"after {done} of {len(order)} rows", result) from None
    result["wall_s"] = time.perf_counter() - start
    return result


def _failed(tree_name: str, opt_name: str, why: str) -> dict:
    return {"tree": tree_name, "optimizer": opt_name, "error": why}


def _profile(cfg: Config) -> dict:
    """``result["profile"]``: ``profile_leaf``'s rows, or why it failed."""
    shape = cfg.profile_shape
    try:
        rows = profile_leaf(shape, cfg.optimizers, cfg.sibling_outputs)
    except Exception as e:  # keep the timed rows
        return {"shape": list(shape), "error": repr(e)}
    return {"shape": list(shape), "rows": rows}
