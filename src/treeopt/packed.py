"""Opt-in packed path: elementwise optimizers over one flat buffer per dtype.

A tree of many small leaves costs one kernel per leaf and per operation; packed,
the same step is one kernel per dtype. ``Packed`` fixes a weight tree's layout
(leaves grouped by dtype, in flatten order, each raveled and concatenated), keeps
the optimizer's slots packed between steps, and converts them to and from the
Trax per-leaf layout exactly (``pack_slots``/``unpack_slots``).

Only elementwise optimizers are packed (SGD, Adam, Momentum, RMSProp): on them the
packed step computes the same numbers as ``tree_update``, element for element (up
to the summation order of the global gradient norm when ``clip_grad_norm`` is set).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from treeopt import base
from treeopt.adam import Adam
from treeopt.momentum import Momentum
from treeopt.rms_prop import RMSProp

_ELEMENTWISE = (base.SGD, Adam, Momentum, RMSProp)


def supports(optimizer: base.Optimizer) -> bool:
    """Whether ``optimizer`` is elementwise, so that packing cannot change it."""
    return type(optimizer) in _ELEMENTWISE


class Packed:
    """An elementwise optimizer run over flat per-dtype buffers of a fixed tree.

    ``tree_init``/``tree_update`` mirror the optimizer's pure
    (``store_slots=False``) methods, with packed slots: a tuple with one entry
    per dtype group, each ``optimizer.init`` of that group's flat buffer.
    """

    def __init__(self, optimizer: base.Optimizer, weight_tree: base.PyTree) -> None:
        """Fixes the layout of ``weight_tree`` (shapes and dtypes; not values).

        Args:
          optimizer: an SGD, Adam, Momentum or RMSProp instance.
          weight_tree: any pytree of float arrays; only its layout is kept.
        """
        if not supports(optimizer):
            names = ", ".join(c.__name__ for c in _ELEMENTWISE)
            raise TypeError(
                f"Packed supports the elementwise optimizers ({names}), got "
                f"{type(optimizer).__name__}: its per-leaf statistics would mix "
                f"leaves in one buffer"
            )
        self._opt = optimizer
        leaves, self._treedef = jax.tree.flatten(weight_tree)
        leaves = [jnp.asarray(x) for x in leaves]
        for path, x in zip(_paths(weight_tree), leaves, strict=True):
            if not jnp.issubdtype(x.dtype, jnp.floating):
                raise TypeError(f"weight at {path} has dtype {x.dtype}, not float")
        self._shapes = [x.shape for x in leaves]
        self._dtypes = [jnp.dtype(x.dtype) for x in leaves]
        groups: dict[Any, list[int]] = {}
        for i, dt in enumerate(self._dtypes):
            groups.setdefault(dt, []).append(i)
        self._groups = list(groups.values())
        self._offsets = []
        for members in self._groups:
            sizes = [int(np.prod(self._shapes[i])) for i in members]
            self._offsets.append(np.concatenate([[0], np.cumsum(sizes)]).tolist())

    @property
    def optimizer(self) -> base.Optimizer:
        return self._opt

    # ------------------------------------------------------------- layout

    def pack(self, tree: base.PyTree) -> tuple[jax.Array, ...]:
        """One flat buffer per dtype group of the weight tree's leaves."""
        leaves = self._leaves(tree, "tree")
        return tuple(
            jnp.concatenate([jnp.ravel(leaves[i]) for i in members])
            for members in self._groups
        )

    def unpack(self, flats: tuple[jax.Array, ...]) -> base.PyTree:
        """The tree that ``pack`` flattened (inverse of ``pack``)."""
        leaves: list = [None] * len(self._shapes)
        for members, offsets, flat in zip(
            self._groups, self._offsets, flats, strict=True
        ):
            for i, lo, hi in zip(members, offsets[:-1], offsets[1:], strict=True):
                leaves[i] = flat[lo:hi].reshape(self._shapes[i])
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
            per_leaf = []
            for i in members:
                if jax.tree.structure(slots[i]) != struct:
                    raise ValueError(
                        f"slots of leaf {i} have structure "
                        f"{jax.tree.structure(slots[i])}, expected {struct}"
                    )
                per_leaf.append(jax.tree.leaves(slots[i]))
            columns = [
                jnp.concatenate([jnp.ravel(col[k]) for col in per_leaf])
                for k in range(struct.num_leaves)
            ]
            packed.append(jax.tree.unflatten(struct, columns))
        return tuple(packed)

    def unpack_slots(self, packed_slots: tuple) -> tuple:
        """Packed slots -> the Trax per-leaf layout of ``tree_init``."""
        slots: list = [None] * len(self._shapes)
        groups = zip(self._groups, self._offsets, packed_slots, strict=True)
        for members, offsets, group_slots in groups:
            columns, struct = jax.tree.flatten(group_slots)
            for i, lo, hi in zip(members, offsets[:-1], offsets[1:], strict=True):
                parts = [c[lo:hi].reshape(self._shapes[i]) for c in columns]
                slots[i] = jax.tree.unflatten(struct, parts)
        return tuple(slots)

    # -------------------------------------------------------------- steps

    def tree_init(self, weight_tree: base.PyTree) -> tuple[tuple, base.OptParams]:
        """``(packed_slots, opt_params)`` for ``weight_tree``."""
        slots = tuple(self._opt.init(w) for w in self.pack(weight_tree))
        return slots, dict(self._opt.opt_params)

    def packed_update(
        self,
        step: Any,
        flat_grads: tuple[jax.Array, ...],
        flat_weights: tuple[jax.Array, ...],
        slots: tuple,
        opt_params: base.OptParams,
    ) -> tuple[tuple[jax.Array, ...], tuple, jax.Array]:
        """One step on packed buffers; returns ``(weights, slots, grad_norm)``."""
        grad_norm = base.l2_norm(flat_grads)
        if self._opt.clip_grad_norm is not None:
            clip = self._opt.clip_grad_norm
            flat_grads = base._clip_by_norm(flat_grads, clip, grad_norm)
        new_w, new_s = [], []
        for g, w, s in zip(flat_grads, flat_weights, slots, strict=True):
            w_new, s_new = self._opt.update(step, g, w, s, opt_params)
            new_w.append(w_new.astype(w.dtype))
            new_s.append(base.cast_like(s_new, s))
        return tuple(new_w), tuple(new_s), grad_norm

    def tree_update(
        self,
        step: Any,
        grad_tree: base.PyTree,
        weight_tree: base.PyTree,
        slots: tuple,
        opt_params: base.OptParams,
        with_metrics: bool = False,
    ) -> tuple:
        """Like ``optimizer.tree_update(..., store_slots=False)`` with packed slots.

        Returns ``(new_weight_tree, new_packed_slots)``, plus the metrics dict
        (``gradients_l2``, ``weights_l2``) with ``with_metrics=True``.
        """
        base.check_same_structure("grad_tree", grad_tree, "weight_tree", weight_tree)
        flat_w = self.pack(weight_tree)
        flat_g = self.pack(grad_tree)
        if len(slots) != len(self._groups):
            raise ValueError(
                f"packed slots have {len(slots)} groups, expected "
                f"{len(self._groups)}: slots from another tree or layout?"
            )
        new_w, new_slots, grad_norm = self.packed_update(
            step, flat_g, flat_w, slots, opt_params
        )
        new_tree = self.unpack(new_w)
        if not with_metrics:
            return new_tree, new_slots
        metrics = {"gradients_l2": grad_norm, "weights_l2": base.l2_norm(flat_w)}
        return new_tree, new_slots, metrics

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
