"""Shardings for optimizer slots that follow their weights' shardings.

A slot leaf keeps some axes of its weight: an elementwise slot (Adam's ``m``
and ``v``) keeps all of them, Adafactor's ``v_row`` keeps ``w.shape[:-1]``, its
``v_col`` keeps ``w.shape[:-2] + w.shape[-1:]``, SM3's ``v1s[i]`` keeps axis
``i``. Each slot leaf is sharded like its weight along the axes it keeps and
replicated along the others, so a jitted ``tree_update`` whose in and out
shardings come from here moves no weight or slot between devices: only the
reductions (global norms, Adafactor's means, SM3's maxima) communicate.

Which axes a slot keeps is read from ``jax.eval_shape(optimizer.init, ...)``
(no memory is allocated): each slot dimension is matched with the weight axis
of the same size, on a probe weight with distinct sizes when the real one has
repeated sizes (a square matrix). Any optimizer whose ``init`` builds slots
from the weight's axes works without further code.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec, Sharding, SingleDeviceSharding

from treeopt import base

PyTree = Any

# Distinct sizes for a probe weight of any rank (a prime past 1000 per axis).
_PROBE_SIZES = (1009, 1013, 1019, 1021, 1031, 1033, 1039, 1049, 1051, 1061, 1063)


def _where(path: Any) -> str:
    return jax.tree_util.keystr(path) or "<root>"


def _weight_info(path: Any, x: Any) -> tuple[tuple | None, int, Any, Sharding]:
    """``(shape or None, ndim, dtype, sharding)`` of one leaf."""
    if isinstance(x, Sharding):
        if not isinstance(x, NamedSharding):
            raise TypeError(
                f"sharding at {_where(path)} is a {type(x).__name__}; pass the "
                "weights themselves (arrays or ShapeDtypeStructs) for shardings "
                "other than NamedSharding"
            )
        return None, len(x.spec), jnp.float32, x
    sharding = getattr(x, "sharding", None)
    if sharding is None or not hasattr(x, "shape"):
        raise TypeError(
            f"leaf at {_where(path)} is a {type(x).__name__} without a sharding; "
            "pass jax.Arrays, ShapeDtypeStructs with sharding=..., or NamedShardings"
        )
    return tuple(x.shape), len(x.shape), x.dtype, sharding


def _kept_axes(shape: tuple, slot_shape: tuple) -> list[int | None]:
    """For each dimension of a slot, the weight axis of the same size (or None)."""
    return [shape.index(d) if d in shape else None for d in slot_shape]


def _check_probe(
    optimizer: base.Optimizer, path: Any, shape: tuple, dtype: Any, probe: Any
) -> None:
    """Raises unless ``init`` lays out slots for ``shape`` as for the probe."""
    real = jax.eval_shape(optimizer.init, jax.ShapeDtypeStruct(shape, dtype))
    probe_shape, probe_slots = probe

    def expected(p: jax.ShapeDtypeStruct) -> tuple:
        kept = _kept_axes(probe_shape, p.shape)
        return tuple(
            d if i is None else shape[i] for i, d in zip(kept, p.shape, strict=True)
        )

    same = jax.tree.structure(real) == jax.tree.structure(probe_slots) and all(
        r.shape == expected(p)
        for r, p in zip(
            jax.tree.leaves(real), jax.tree.leaves(probe_slots), strict=True
        )
    )
    if not same:
        raise ValueError(
            f"{type(optimizer).__name__}.init lays out the slots of the weight at "
            f"{_where(path)} (shape {shape}) unlike those of a weight of the same "
            "rank with distinct sizes; cannot tell which weight axes they keep"
        )


def _leaf_slot_shardings(optimizer: base.Optimizer, path: Any, x: Any) -> Any:
    """The slot shardings of one weight leaf, laid out like ``init``'s output."""
    shape, ndim, dtype, sharding = _weight_info(path, x)
    distinct = shape is not None and len(set(shape)) == ndim
    if not distinct and ndim > len(_PROBE_SIZES):
        raise ValueError(f"weight at {_where(path)} has rank {ndim} > 11")
    probe_shape = shape if distinct else _PROBE_SIZES[:ndim]
    probe = jax.eval_shape(optimizer.init, jax.ShapeDtypeStruct(probe_shape, dtype))
    if shape is not None and not distinct:
        _check_probe(optimizer, path, shape, dtype, (probe_shape, probe))
    return jax.tree.map(
        lambda s: _slot_sharding(sharding, ndim, _kept_axes(probe_shape, s.shape)),
        probe,
    )


def _slot_sharding(sharding: Sharding, ndim: int, axes: list[int | None]) -> Sharding:
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
        entries = [spec[i] if i is not None else None for i in axes]
        return NamedSharding(
            sharding.mesh, PartitionSpec(*entries), memory_kind=sharding.memory_kind
        )
    if isinstance(sharding, SingleDeviceSharding) or sharding.is_fully_replicated:
        return sharding
    raise TypeError(
        f"cannot derive slot shardings from a {type(sharding).__name__}; use "
        "NamedSharding for sharded weights"
    )


def slot_shardings(optimizer: base.Optimizer, weights_or_shardings: PyTree) -> tuple:
    """Shardings for ``optimizer``'s slots, one entry per weight leaf.

    Args:
      optimizer: any ``treeopt`` optimizer.
      weights_or_shardings: the weight tree as ``jax.Array`` leaves or
        ``jax.ShapeDtypeStruct(shape, dtype, sharding=...)`` leaves, or a tree
        of ``NamedSharding`` (then each spec must have one entry per weight
        axis, ``None`` for unsharded ones: the rank decides the slot layout).

    Returns:
      A tuple laid out like ``optimizer.tree_init(weights)[0]`` (``None`` and
      ``[]`` placeholders kept) holding a ``NamedSharding`` per slot leaf: the
      weight's spec entries for the axes the slot keeps, ``None`` for the rest.
    """
    leaves, _ = jax.tree.flatten_with_path(weights_or_shardings)
    return tuple(_leaf_slot_shardings(optimizer, p, x) for p, x in leaves)


def tree_init(optimizer: base.Optimizer, weights: PyTree) -> tuple[tuple, dict]:
    """``optimizer.tree_init(weights, store_slots=False)`` with every slot created
    directly in its ``slot_shardings`` layout (never whole on one device)."""
    out = slot_shardings(optimizer, weights)
    init = jax.jit(
        lambda w: optimizer.tree_init(w, store_slots=False)[0], out_shardings=out
    )
    return init(weights), dict(optimizer.opt_params)


def fsdp(mesh: jax.sharding.Mesh, axis: str) -> Callable[[Any, Any], PartitionSpec]:
    """A sharding rule: shard each leaf along its largest axis divisible by the
    size of mesh axis ``axis`` (replicate leaves with none), as in FSDP/ZeRO-3."""
    n = mesh.shape[axis]

    def rule(path: Any, x: Any) -> PartitionSpec:
        del path
        sizes = [(d, i) for i, d in enumerate(jnp.shape(x)) if d % n == 0 and d >= n]
        if not sizes:
            return PartitionSpec()
        _, i = max(sizes)
        return PartitionSpec(*[axis if j == i else None for j in range(i + 1)])

    return rule


def bytes_per_device(tree: PyTree) -> dict[Any, int]:
    """Bytes of ``tree``'s arrays held by each addressable device."""
    held: dict[Any, int] = defaultdict(int)
    for x in jax.tree.leaves(tree):
        for shard in x.addressable_shards:
            held[shard.device] += shard.data.nbytes
    return dict(held)
