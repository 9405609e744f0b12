"""Input checks at the boundary: hyperparameters, steps, opt_params and weight
trees, each raising an error that names the argument or the key path."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

PyTree = Any

_STORE_UNDER_JIT = (
    "{fn}(..., store_slots=True) was called while tracing (inside jax.jit, vmap, "
    "scan, ...): storing traced slots on the optimizer object would leak tracers. "
    "Pass store_slots=False and keep the returned slots yourself."
)


def is_concrete_number(value: Any) -> bool:
    """Whether ``value`` is a concrete scalar (not a tracer, callable or array
    with elements)."""
    if isinstance(value, jax.core.Tracer | str | bytes) or callable(value):
        return False
    return np.ndim(value) == 0


def check_range(
    name: str,
    value: Any,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raises ``ValueError`` naming ``name`` unless ``low <= value <= high``.

    ``low_open``/``high_open`` exclude the bound. Non-numbers (tracers,
    callables) are left to the caller: ``Optimizer`` rejects them with a
    ``TypeError``.
    """
    if not is_concrete_number(value):
        return
    v = float(value)
    ok = not math.isnan(v)
    ok = ok and (v > low if low_open else v >= low)
    ok = ok and (v < high if high_open else v <= high)
    if not ok:
        lb = "(" if low_open else "["
        hb = ")" if high_open else "]"
        raise ValueError(f"{name} must be in {lb}{low:g}, {high:g}{hb}, got {value!r}")


def check_nonnegative(name: str, value: Any) -> None:
    """``value >= 0``."""
    check_range(name, value, 0.0)


def check_positive(name: str, value: Any) -> None:
    """``value > 0``."""
    check_range(name, value, 0.0, low_open=True)


def check_unit_interval(name: str, value: Any) -> None:
    """``0 <= value < 1``: decay factors such as ``b1``, ``gamma``, ``mass``."""
    check_range(name, value, 0.0, 1.0, high_open=True)


# ------------------------------------------------------ steps and opt_params


def check_step(step: ArrayLike) -> None:
    """Raises ``ValueError`` for a concrete step below 0 (steps count from 0; a
    negative one would give Adam a bias correction of ``1 / (1 - b**0)``).
    Traced steps are not checked."""
    if isinstance(step, jax.core.Tracer):
        return
    if np.ndim(step) != 0:
        raise ValueError(f"step must be a scalar, got shape {np.shape(step)}")
    if np.asarray(step) < 0:
        raise ValueError(f"step must be >= 0 (steps count from 0), got {step!r}")


def check_opt_params(opt_params: Mapping[str, Any], known: Any) -> None:
    """Raises ``ValueError`` unless ``opt_params`` has exactly the keys in
    ``known``: a missing one is named, and so is an unknown one (a typo such as
    ``'lr'`` would otherwise be ignored without a word)."""
    if not isinstance(opt_params, Mapping):
        raise TypeError(
            f"opt_params must be a dict of hyperparameters, got "
            f"{type(opt_params).__name__}"
        )
    missing = sorted(set(known) - set(opt_params))
    if missing:
        raise ValueError(f"opt_params lacks {missing}; it has {sorted(opt_params)}")
    unknown = sorted(set(opt_params) - set(known))
    if unknown:
        raise ValueError(
            f"opt_params has unknown key(s) {unknown}; the optimizer knows "
            f"{sorted(known)}"
        )


# ------------------------------------------------------------ tree helpers


def check_not_tracing(fn: str, *trees: Any) -> None:
    """Raises if any leaf of ``trees`` is a tracer: ``fn(..., store_slots=True)``
    must not store traced slots on the optimizer object."""
    if any(isinstance(x, jax.core.Tracer) for t in trees for x in jax.tree.leaves(t)):
        raise RuntimeError(_STORE_UNDER_JIT.format(fn=fn))


def _as_weight(path: Any, x: Any) -> jax.Array:
    """Checks one weight leaf: a float array, numpy array or Python float."""
    if isinstance(x, bool) or not (
        isinstance(x, jax.Array | np.ndarray | np.generic | float | int)
    ):
        raise TypeError(
            f"weight at {jax.tree_util.keystr(path) or '<root>'} is a "
            f"{type(x).__name__}, not an array; weights must be float arrays"
        )
    dtype = x.dtype if hasattr(x, "dtype") else np.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"weight at {jax.tree_util.keystr(path) or '<root>'} has dtype "
            f"{dtype}; treeopt optimizes floating-point weights only"
        )
    return jnp.asarray(x)


def flatten_weights(weight_tree: PyTree) -> tuple[list, list, Any]:
    """``(key paths, leaves as arrays, treedef)`` of a weight tree, each leaf
    checked to be a float array, NumPy array or Python float."""
    leaves_with_path, treedef = jax.tree.flatten_with_path(weight_tree)
    paths = [p for p, _ in leaves_with_path]
    leaves = [_as_weight(p, x) for p, x in leaves_with_path]
    return paths, leaves, treedef


def _first_difference(a: PyTree, b: PyTree) -> str:
    """The first key path at which the structures of ``a`` and ``b`` differ."""
    pa = [jax.tree_util.keystr(p) for p, _ in jax.tree.flatten_with_path(a)[0]]
    pb = [jax.tree_util.keystr(p) for p, _ in jax.tree.flatten_with_path(b)[0]]
    for x, y in zip(pa, pb, strict=False):
        if x != y:
            return f"{x} vs {y}"
    if len(pa) != len(pb):
        longer, extra = ("first", pa) if len(pa) > len(pb) else ("second", pb)
        return f"{extra[min(len(pa), len(pb))]} exists only in the {longer}"
    return "same leaves, different containers"


def check_same_structure(name_a: str, a: PyTree, name_b: str, b: PyTree) -> None:
    """Raises ``ValueError`` naming the first differing path of two trees."""
    da, db = jax.tree.structure(a), jax.tree.structure(b)
    if da != db:
        raise ValueError(
            f"{name_a} and {name_b} have different tree structures "
            f"(first difference: {_first_difference(a, b)}):\n  {da}\n  {db}"
        )


def check_grads(paths: list, grads: list, weights: list) -> None:
    """Raises ``ValueError`` naming the first gradient whose shape is not its
    weight's."""
    for path, g, w in zip(paths, grads, weights, strict=True):
        if g.shape != w.shape:
            raise ValueError(
                f"grads at {jax.tree_util.keystr(path) or '<root>'} have shape "
                f"{g.shape} but the weights have shape {w.shape}"
            )


def check_slots(
    paths: list, slots: Any, weights: list, owner: str, spec_of: Callable
) -> list:
    """``slots`` as arrays, after checking that each weight's entry has the
    structure and shapes ``spec_of(weight)`` gives (``owner``'s ``init``)."""
    if not isinstance(slots, tuple | list):
        raise TypeError(
            f"slots must be the tuple returned by tree_init, got {type(slots).__name__}"
        )
    if len(slots) != len(weights):
        raise ValueError(
            f"slots has {len(slots)} entries but weight_tree has "
            f"{len(weights)} leaves: slots from another tree?"
        )
    for path, s, w in zip(paths, slots, weights, strict=True):
        struct, shapes = spec_of(w)
        got = [jnp.shape(x) for x in jax.tree.leaves(s)]
        if jax.tree.structure(s) != struct or got != shapes:
            raise ValueError(
                f"slots for weight {jax.tree_util.keystr(path) or '<root>'} "
                f"(shape {w.shape}) do not fit {owner}: expected {struct} with "
                f"shapes {shapes}, got {jax.tree.structure(s)} with shapes {got}; "
                "slots from another tree or optimizer?"
            )
    return [jax.tree.map(jnp.asarray, s) for s in slots]
