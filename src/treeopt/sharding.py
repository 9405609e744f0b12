"""Shardings for optimizer slots that follow their weights' shardings.

A slot leaf keeps some axes of its weight: an elementwise slot (Adam's ``m``
and ``v``) keeps all of them, Adafactor's ``v_row`` keeps ``w.shape[:-1]``, its
``v_col`` keeps ``w.shape[:-2] + w.shape[-1:]``, SM3's ``v1s[i]`` keeps axis
``i``. Each slot leaf is sharded like its weight along the axes it keeps and
replicated along the others, so a jitted ``tree_update`` whose in and out
shardings come from here moves no weight or slot between devices: only the
reductions (global norms, Adafactor's means, SM3's maxima) communicate.

Which axes a slot keeps is declared by the optimizer: ``slot_axes(ndim)``
lists them for each slot array of a rank-``ndim`` weight (the tests check each
declaration against the shapes ``init`` creates).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, Sharding, SingleDeviceSharding

from treeopt import base

PyTree = Any


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


def _leaf_slot_shardings(optimizer: base.Optimizer, path: Any, x: Any) -> Any:
    """The slot shardings of one weight leaf, laid out like ``init``'s output."""
    shape, ndim, dtype, sharding = _weight_info(path, x)
    # Without a shape (a NamedSharding alone) the layout is that of the rank.
    like = jax.ShapeDtypeStruct(shape if shape is not None else (1,) * ndim, dtype)
    slots = jax.eval_shape(optimizer.init, like)
    axes = optimizer.slot_axes(ndim)
    declared = [tuple(like.shape[a] for a in kept) for kept in axes]
    made = [s.shape for s in jax.tree.leaves(slots)]
    if declared != made:
        raise ValueError(
            f"{type(optimizer).__name__}.slot_axes({ndim}) declares slots of "
            f"shapes {declared} for the weight at {_where(path)} (shape "
            f"{like.shape}), but its init makes {made}: a layout that depends on "
            "more than the rank cannot be sharded by its declaration"
        )
    return jax.tree.unflatten(
        jax.tree.structure(slots),
        [_slot_sharding(sharding, ndim, list(kept)) for kept in axes],
    )


def _slot_sharding(sharding: Sharding, ndim: int, axes: list[int | None]) -> Sharding:
    if isinstance(sharding, NamedSharding):
        spec = _padded(sharding.spec, ndim)
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
    size of mesh axis ``axis`` (replicate leaves with none), as in FSDP/ZeRO-3;
    the spec has one entry per axis of the leaf."""
    n = mesh.shape[axis]

    def rule(path: Any, x: Any) -> PartitionSpec:
        del path
        sizes = [(d, i) for i, d in enumerate(jnp.shape(x)) if d % n == 0 and d >= n]
        i = max(sizes)[1] if sizes else None
        return PartitionSpec(*[axis if j == i else None for j in range(np.ndim(x))])

    return rule


def bytes_per_device(tree: PyTree) -> dict[Any, int]:
    """Bytes of ``tree``'s arrays held by each addressable device."""
    held: dict[Any, int] = defaultdict(int)
    for x in jax.tree.leaves(tree):
        for shard in x.addressable_shards:
            held[shard.device] += shard.data.nbytes
    return dict(held)


def put_global(tree: PyTree, shardings: PyTree) -> PyTree:
    """Copies ``tree``, a value every process holds whole (the same on each),
    into global arrays laid out by ``shardings`` (a matching tree)."""

    def put(x: Any, s: Sharding) -> jax.Array:
        if jax.process_count() == 1:
            return jax.device_put(x, s, may_alias=False)
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, s, lambda index: x[index])

    return jax.tree.map(put, tree, shardings)


class DataParallel:
    """Where a data-parallel training step keeps its arrays on ``mesh``.

    The batch is split along its leading axis over the mesh axis ``data_axis``
    (each process passes its own rows), the weights are laid out by ``rule``
    (replicated when None; ``fsdp(mesh, data_axis)`` shards them too), the
    slots follow the weights (``slot_shardings``) and the hyperparameters are
    replicated. The same code runs in one process and in several started with
    ``jax.distributed.initialize``.
    """

    def __init__(
        self,
        mesh: jax.sharding.Mesh,
        optimizer: base.Optimizer,
        weights: PyTree,
        data_axis: str | tuple[str, ...] = "data",
        rule: Callable[[Any, Any], PartitionSpec] | None = None,
    ) -> None:
        """Derives every sharding from the mesh, the weights and the rule.

        Args:
          mesh: a ``jax.sharding.Mesh`` (explicit or auto axes).
          optimizer: the optimizer whose slots are laid out.
          weights: the weight tree (only shapes and dtypes are read).
          data_axis: the mesh axis (or axes) the batch is split over.
          rule: ``(path, leaf) -> PartitionSpec`` for each weight; None
            replicates every weight.
        """
        names = (data_axis,) if isinstance(data_axis, str) else tuple(data_axis)
        missing = [a for a in names if a not in mesh.axis_names]
        if missing:
            raise ValueError(
                f"data_axis {data_axis!r} is not an axis of the mesh, whose axes "
                f"are {mesh.axis_names}"
            )
        self.mesh = mesh
        self.data_axis = data_axis
        self.data_size = int(np.prod([mesh.shape[a] for a in names]))
        self.replicated = NamedSharding(mesh, PartitionSpec())
        self.batch = NamedSharding(mesh, PartitionSpec(data_axis))
        # Specs padded to one entry per axis: jit returns them in that form,
        # and an unpadded input would look like a new layout and recompile.
        self.weights = jax.tree.map_with_path(
            lambda p, x: NamedSharding(
                mesh, _padded(rule(p, x) if rule else PartitionSpec(), np.ndim(x))
            ),
            weights,
        )
        shapes = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(
                np.shape(x), np.result_type(x), sharding=s
            ),
            weights,
            self.weights,
        )
        self.slots = slot_shardings(optimizer, shapes)

    def init(
        self, optimizer: base.Optimizer, weights: PyTree
    ) -> tuple[PyTree, tuple, base.OptParams]:
        """``(weights, slots, opt_params)`` as global arrays in this layout;
        the weights are copied."""
        weights = put_global(weights, self.weights)
        slots, opt_params = tree_init(optimizer, weights)
        rep = {k: self.replicated for k in opt_params}
        return weights, slots, put_global(opt_params, rep)

    def put_batch(self, batch: PyTree) -> PyTree:
        """This process's rows of the batch as global arrays split over the data
        axis (a leaf that already is a global array is kept as it is)."""

        def put(path: Any, x: Any) -> jax.Array:
            if isinstance(x, jax.Array) and not x.is_fully_addressable:
                return x
            if np.ndim(x) == 0:
                return put_global(x, self.replicated)
            rows = np.shape(x)[0] * jax.process_count()
            if rows % self.data_size:
                raise ValueError(
                    f"batch leaf at {_where(path)} has {rows} rows in all, not "
                    f"divisible by the {self.data_size} devices of data axis "
                    f"{self.data_axis!r}"
                )
            if jax.process_count() == 1:
                return jax.device_put(x, self.batch)
            return jax.make_array_from_process_local_data(self.batch, np.asarray(x))

        return jax.tree.map_with_path(put, batch)

    def gathered(self, loss_fn: Callable) -> Callable:
        """``loss_fn`` called with each weight gathered over the data axis (kept
        sharded over any other mesh axis), as FSDP computes; its gradient
        arrives back in the weights' own layout. Meshes with explicit axes need
        this (a matmul of two operands sharded on the same axis is an error);
        on auto axes it fixes what XLA would otherwise choose."""
        names = (
            {self.data_axis} if isinstance(self.data_axis, str) else set(self.data_axis)
        )

        def without_data(e: Any) -> Any:
            kept = tuple(
                a for a in (e if isinstance(e, tuple) else (e,)) if a not in names
            )
            return kept if len(kept) > 1 else (kept[0] if kept else None)

        compute = jax.tree.map(
            lambda s: NamedSharding(
                self.mesh, PartitionSpec(*map(without_data, s.spec))
            ),
            self.weights,
        )

        def fn(weights: PyTree, *args: Any) -> Any:
            return loss_fn(jax.tree.map(_pin, weights, compute), *args)

        return fn

    def constrain(self, weights: PyTree, slots: tuple) -> tuple[PyTree, tuple]:
        """Pins updated weights and slots to this layout (inside ``jax.jit``)."""
        return jax.tree.map(_pin, (weights, slots), (self.weights, self.slots))


def _padded(spec: PartitionSpec, ndim: int) -> PartitionSpec:
    return PartitionSpec(*spec, *([None] * (ndim - len(spec))))


def _pin(x: jax.Array, s: NamedSharding) -> jax.Array:
    """``x`` laid out as ``s`` inside ``jax.jit``: ``reshard`` on explicit mesh
    axes, ``with_sharding_constraint`` on auto ones."""
    types = dict(zip(s.mesh.axis_names, s.mesh.axis_types, strict=True))
    named = [
        a
        for e in s.spec
        if e is not None
        for a in (e if isinstance(e, tuple) else (e,))
    ]
    auto = jax.sharding.AxisType.Auto
    if any(types[a] == auto for a in named) or all(t == auto for t in types.values()):
        return jax.lax.with_sharding_constraint(x, s)
    return jax.sharding.reshard(x, s)
