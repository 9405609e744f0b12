"""Opt-in packed path: one buffer per group of leaves instead of one per leaf.

A tree of many small leaves costs one kernel per leaf and per operation (and as
much compile time); packed, a step costs a few kernels per group. ``Packed``
fixes a weight tree's layout and keeps weights, gradients and slots in it:

- elementwise optimizers (SGD, Adam, Momentum, RMSProp): one flat buffer per
  dtype, every leaf raveled and concatenated in flatten order (a leaf alone in
  its dtype stays as it is);
- the others (Adafactor, SM3, any subclass): one stacked buffer per (shape,
  dtype), updated with ``jax.vmap`` of the per-leaf ``update``, so per-leaf
  statistics (factored moments, sketches, parameter RMS) stay per leaf; a leaf
  whose shape and dtype no other leaf has stays as it is.

Either way the step is the optimizer's own ``apply`` (clipping, casts, metrics,
a ``SkipNonFinite`` guard), with each group in place of a leaf: it computes what
``tree_update`` computes, leaf by leaf;
``pack_slots``/``unpack_slots`` convert slots to and from the Trax per-leaf layout
exactly. Keep weights packed between steps (``pack`` once, ``unpack`` inside the
model: slices fuse into their consumers, and the gradient with respect to the
packed weights arrives packed) and call ``update``. ``tree_update`` takes and
returns trees, for convenience: it concatenates and slices every leaf at every
step, which on thousands of leaves costs more than it saves.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from treeopt import base

PackedBuffers = tuple[jax.Array, ...]


class Packed:
    """An optimizer over the packed layout of a fixed weight tree.

    Packed weights, gradients and slots are tuples with one entry per group (see
    the module docstring); ``layout`` is ``'flat'`` or ``'stacked'``.
    """

    def __init__(self, optimizer: base.Optimizer, weight_tree: base.PyTree) -> None:
        """Fixes the layout of ``weight_tree`` (shapes and dtypes; not values).

        Args:
          optimizer: any treeopt optimizer.
          weight_tree: any pytree of float arrays (or ``jax.ShapeDtypeStruct``);
            only its layout is kept.
        """
        self._opt = optimizer
        self._flat = base.is_elementwise(optimizer)
        leaves, self._treedef = jax.tree.flatten(weight_tree)
        # Arrays or anything with a shape and dtype (jax.ShapeDtypeStruct).
        leaves = [
            x if hasattr(x, "shape") and hasattr(x, "dtype") else jnp.asarray(x)
            for x in leaves
        ]
        for path, x in zip(_paths(weight_tree), leaves, strict=True):
            if not jnp.issubdtype(x.dtype, jnp.floating):
                raise TypeError(f"weight at {path} has dtype {x.dtype}, not float")
        self._shapes = [x.shape for x in leaves]
        groups: dict[Any, list[int]] = {}
        for i, x in enumerate(leaves):
            key = jnp.dtype(x.dtype) if self._flat else (x.shape, jnp.dtype(x.dtype))
            groups.setdefault(key, []).append(i)
        self._groups = list(groups.values())
        self._offsets = []
        for members in self._groups:
            sizes = [int(np.prod(self._shapes[i])) for i in members]
            self._offsets.append(np.concatenate([[0], np.cumsum(sizes)]).tolist())

    @property
    def optimizer(self) -> base.Optimizer:
        return self._opt

    @property
    def layout(self) -> str:
        return "flat" if self._flat else "stacked"

    # ------------------------------------------------------------- layout

    def _join(self, parts: list[jax.Array]) -> jax.Array:
        # A leaf alone in its group keeps its shape, so its step compiles to the
        # per-leaf loop (raveled, XLA:CPU may contract another product into an
        # FMA and round differently); copied, as concatenate would, so that a
        # donated update never deletes the caller's array.
        if len(parts) == 1:
            return jnp.array(parts[0], copy=True)
        if self._flat:
            return jnp.concatenate([jnp.ravel(x) for x in parts])
        return jnp.stack(parts)

    def _pieces(self, k: int, buf: jax.Array) -> list[jax.Array]:
        members, offsets = self._groups[k], self._offsets[k]
        if len(members) == 1:
            return [jnp.array(buf, copy=True)]
        if not self._flat:
            return [buf[j] for j in range(len(members))]
        bounds = zip(members, offsets[:-1], offsets[1:], strict=True)
        return [buf[lo:hi].reshape(self._shapes[i]) for i, lo, hi in bounds]

    def pack(self, tree: base.PyTree) -> PackedBuffers:
        """The packed buffers of a tree with the weight tree's layout."""
        leaves = self._leaves(tree, "tree")
        return tuple(self._join([leaves[i] for i in m]) for m in self._groups)

    def unpack(self, packed: PackedBuffers) -> base.PyTree:
        """The tree that ``pack`` packed (inverse of ``pack``)."""
        self._check_groups(packed, "packed buffers")
        leaves: list = [None] * len(self._shapes)
        for k, buf in enumerate(packed):
            for i, x in zip(self._groups[k], self._pieces(k, buf), strict=True):
                leaves[i] = x
        return jax.tree.unflatten(self._treedef, leaves)

    def pack_slots(self, slots: tuple) -> tuple:
        """Trax per-leaf slots (as from ``tree_init``) -> packed slots."""
        if len(slots) != len(self._shapes):
            raise ValueError(
                f"slots has {len(slots)} entries but the packed tree has "
                f"{len(self._shapes)} leaves"
            )
        packed = []
        for members in self._groups:
            struct = jax.tree.structure(slots[members[0]])
            for i in members:
                if jax.tree.structure(slots[i]) != struct:
                    raise ValueError(
                        f"slots of leaf {i} have structure "
                        f"{jax.tree.structure(slots[i])}, expected {struct}"
                    )
            per_leaf = [jax.tree.leaves(slots[i]) for i in members]
            columns = [
                self._join([leaf_slots[c] for leaf_slots in per_leaf])
                for c in range(struct.num_leaves)
            ]
            packed.append(jax.tree.unflatten(struct, columns))
        return tuple(packed)

    def unpack_slots(self, packed_slots: tuple) -> tuple:
        """Packed slots -> the Trax per-leaf layout of ``tree_init``."""
        self._check_groups(packed_slots, "packed slots")
        slots: list = [None] * len(self._shapes)
        for k, group_slots in enumerate(packed_slots):
            columns, struct = jax.tree.flatten(group_slots)
            # Flat: a slot column holds one entry per element of the weights.
            # Stacked: one slot leaf per weight leaf, along the stack axis.
            split = [self._pieces(k, c) for c in columns]
            for j, i in enumerate(self._groups[k]):
                slots[i] = jax.tree.unflatten(struct, [parts[j] for parts in split])
        return tuple(slots)

    # -------------------------------------------------------------- steps

    def _stacked(self) -> list[bool]:
        """Per group: whether it stacks several leaves along its first axis."""
        return [not self._flat and len(m) > 1 for m in self._groups]

    def init(self, packed_weights: PackedBuffers) -> tuple[tuple, base.OptParams]:
        """``(packed_slots, opt_params)`` for packed weights."""
        self._check_groups(packed_weights, "packed weights")
        slots = tuple(
            jax.vmap(self._opt.init)(w) if stacked else self._opt.init(w)
            for w, stacked in zip(packed_weights, self._stacked(), strict=True)
        )
        return slots, dict(self._opt.opt_params)

    def tree_init(self, weight_tree: base.PyTree) -> tuple[tuple, base.OptParams]:
        """``(packed_slots, opt_params)`` for a weight tree."""
        return self.init(self.pack(weight_tree))

    def update(
        self,
        step: Any,
        packed_grads: PackedBuffers,
        packed_weights: PackedBuffers,
        slots: tuple,
        opt_params: base.OptParams,
        with_metrics: bool = False,
    ) -> tuple:
        """One step on packed buffers, as ``tree_update(..., store_slots=False)``:
        the optimizer's own ``apply``, each group one leaf (a stacked group's
        ``update`` mapped over its leaves).

        Returns ``(packed_weights, packed_slots)``, plus the metrics dict
        (``gradients_l2`` before clipping, ``weights_l2`` before the step) with
        ``with_metrics=True``.
        """
        base.check_step(step)
        base.check_opt_params(opt_params, self._opt.opt_params)
        for name, x in (("grads", packed_grads), ("weights", packed_weights)):
            self._check_groups(x, f"packed {name}")
        self._check_groups(slots, "packed slots")
        new_w, new_s, metrics = self._opt.apply(
            step,
            [jnp.asarray(g) for g in packed_grads],
            [jnp.asarray(w) for w in packed_weights],
            list(slots),
            opt_params,
            with_metrics,
            self._stacked(),
        )
        if not with_metrics:
            return tuple(new_w), tuple(new_s)
        return tuple(new_w), tuple(new_s), metrics

    def tree_update(
        self,
        step: Any,
        grad_tree: base.PyTree,
        weight_tree: base.PyTree,
        slots: tuple,
        opt_params: base.OptParams,
        with_metrics: bool = False,
    ) -> tuple:
        """``update`` taking and returning trees (packs and unpacks every step)."""
        base.check_same_structure("grad_tree", grad_tree, "weight_tree", weight_tree)
        out = self.update(
            step,
            self.pack(grad_tree),
            self.pack(weight_tree),
            slots,
            opt_params,
            with_metrics,
        )
        return (self.unpack(out[0]), *out[1:])

    # -------------------------------------------------------------- checks

    def _check_groups(self, packed: Any, name: str) -> None:
        if not isinstance(packed, tuple | list) or len(packed) != len(self._groups):
            got = len(packed) if isinstance(packed, tuple | list) else type(packed)
            raise ValueError(
                f"{name} must have one entry per group ({len(self._groups)}), got "
                f"{got}: from another tree, layout or optimizer?"
            )

    def _leaves(self, tree: base.PyTree, name: str) -> list[jax.Array]:
        leaves, treedef = jax.tree.flatten(tree)
        if treedef != self._treedef:
            raise ValueError(
                f"{name} does not have the packed layout's structure:\n  "
                f"{treedef}\n  {self._treedef}"
            )
        leaves = [jnp.asarray(x) for x in leaves]
        for i, (x, shape) in enumerate(zip(leaves, self._shapes, strict=True)):
            if x.shape != shape:
                raise ValueError(
                    f"{name} leaf {i} has shape {x.shape}, the layout has {shape}"
                )
        return leaves


def _paths(tree: base.PyTree) -> list[str]:
    return [jax.tree_util.keystr(p) for p, _ in jax.tree.flatten_with_path(tree)[0]]
