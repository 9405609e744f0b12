"""Base optimizer class, SGD, and the tree plumbing shared by every optimizer."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from treeopt.checks import check_grads, check_slots, flatten_weights, is_concrete_number

# Re-exported: optimizer modules validate through ``base`` alone.
from treeopt.checks import check_nonnegative as check_nonnegative
from treeopt.checks import check_not_tracing as check_not_tracing
from treeopt.checks import check_opt_params as check_opt_params
from treeopt.checks import check_positive as check_positive
from treeopt.checks import check_range as check_range
from treeopt.checks import check_same_structure as check_same_structure
from treeopt.checks import check_step as check_step
from treeopt.checks import check_unit_interval as check_unit_interval

PyTree = Any
Slots = Any
OptParams = dict[str, jax.Array]

# ------------------------------------------------------------- leaf helpers


def compute_dtype(x: jax.Array) -> jnp.dtype:
    """float32 for 16- and 32-bit float leaves, float64 for float64 ones (spelled
    out, not ``promote_types``: it holds under strict dtype promotion too)."""
    dtype = jnp.dtype(x.dtype)
    return dtype if dtype.itemsize >= 4 else jnp.dtype(jnp.float32)


def as_dtype(x: ArrayLike, dtype: Any) -> jax.Array:
    """``x`` as a strongly typed array of ``dtype``, returned as it is if it
    already is one (which saves the Python dispatch of a no-op cast per leaf)."""
    x = jnp.asarray(x)
    if x.dtype == dtype and not x.weak_type:
        return x
    return x.astype(dtype)


def step_count(step: ArrayLike, dtype: Any) -> jax.Array:
    """``t = step + 1`` as a float of ``dtype`` (steps count from 0)."""
    return jnp.asarray(step).astype(dtype) + 1


_memos = threading.local()  # the per-step memo of the ``apply`` running now


def once_per_step(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, traced once per step for the same function and the same
    argument objects: ``apply`` hands every leaf of a compute dtype the same
    ``step`` and hyperparameter arrays, so per-step scalars (bias corrections,
    decay schedules) cost one computation per step and dtype, not one per leaf.
    Outside ``apply`` (``update`` called directly, or mapped over a stacked
    group) it simply calls ``fn``."""
    memo = getattr(_memos, "stack", None)
    if not memo or memo[-1] is None:
        return fn(*args)
    key = (fn, *map(id, args))
    if key not in memo[-1]:
        memo[-1][key] = (fn(*args), args)  # args kept alive: their ids stay theirs
    return memo[-1][key][0]


def cast_like(new: Any, old: Any) -> Any:
    """Casts each array in ``new`` to the dtype of its counterpart in ``old``."""
    return jax.tree.map(lambda n, o: as_dtype(n, o.dtype), new, old)


def safe_mean(x: jax.Array, axis: Any = None, keepdims: bool = False) -> jax.Array:
    """``mean`` that returns 0 instead of NaN over zero-size axes."""
    n = x.size if axis is None else int(np.prod(np.take(x.shape, axis)))
    return jnp.sum(x, axis=axis, keepdims=keepdims) / max(n, 1)


def l2_norm(tree: PyTree) -> jax.Array:
    """L2 norm of all leaves of ``tree`` taken as one vector.

    Accumulates in float32 at least, whatever the leaves' dtype; 0 for no leaves.
    """
    leaves = [jnp.asarray(x) for x in jax.tree.leaves(tree)]
    if not leaves:
        return jnp.zeros((), jnp.float32)
    dtype = max((compute_dtype(x) for x in leaves), key=lambda d: d.itemsize)
    sums = [jnp.sum(jnp.square(x.astype(dtype))) for x in leaves]
    return jnp.sqrt(sum(sums[1:], sums[0]))


def clip_to_norm(grad_tree: PyTree, max_norm: ArrayLike, norm: jax.Array) -> PyTree:
    """``clip_grads`` given the tree's precomputed global ``norm``: scales by
    ``max_norm / norm`` when ``norm >= max_norm``, in float32 at least, and keeps
    each leaf's dtype."""
    scale = jnp.where(norm < max_norm, 1.0, max_norm / norm).astype(norm.dtype)

    def clip(g: jax.Array) -> jax.Array:
        g = jnp.asarray(g)
        return (g.astype(scale.dtype) * scale).astype(g.dtype)

    return jax.tree.map(clip, grad_tree)


def clip_grads(grad_tree: PyTree, max_norm: ArrayLike) -> PyTree:
    """Scales ``grad_tree`` by ``max_norm / l2_norm(grad_tree)`` if that norm is
    at least ``max_norm``; otherwise returns it unchanged.

    Unlike Trax 1.4.1 (whose ``clip_grads`` always raised), this works.
    """
    check_positive("max_norm", max_norm)
    return clip_to_norm(grad_tree, max_norm, l2_norm(grad_tree))


# ---------------------------------------------------------------- Optimizer

Axes = tuple[int, ...]


def all_axes(ndim: int) -> Axes:
    """Every axis of a rank-``ndim`` weight: the axes an elementwise slot keeps."""
    return tuple(range(ndim))


def is_elementwise(optimizer: Any) -> bool:
    """Whether ``optimizer``'s class declares ``elementwise = True`` in its own
    body (not inherited: a subclass may change the math), or wraps such an
    optimizer: its per-leaf step has no reduction over a leaf, so leaves may be
    concatenated (``treeopt.packed``) or fused (``treeopt.fusion``)."""
    inner = getattr(optimizer, "inner", None)  # a wrapper (``treeopt.wrapper``)
    if isinstance(inner, Optimizer):
        return is_elementwise(inner)
    return bool(type(optimizer).__dict__.get("elementwise", False))


class Optimizer:
    """Base class: a subclass defines ``init`` and ``update`` for ONE leaf.

    ``tree_init``/``tree_update`` apply them to every leaf of a weight tree, in
    ``jax.tree_util`` flatten order. Everything that is not one leaf's math
    happens here, once: input checks, global-norm clipping, metrics, and
    dtypes: ``update`` gets the gradient, the weight and the slots cast to the
    leaf's compute dtype (float32 for 16-bit leaves) and ``opt_params`` cast to
    it once per step and dtype, and its results are cast back to the dtypes of
    the weight and of each slot.

    A subclass also declares two facts: ``slot_axes(ndim)`` (which weight axes
    each slot keeps: sharding reads it) and ``structural`` (the names of the
    read-only options that fix the state's layout: a checkpoint compares
    them). ``elementwise = True`` in its body says that its ``update`` has no
    reduction over a leaf (see ``is_elementwise``).
    """

    structural: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        learning_rate: ArrayLike = 0.01,
        clip_grad_norm: float | None = None,
        **init_opt_params: ArrayLike,
    ) -> None:
        """Sets the initial hyperparameters.

        Args:
          learning_rate: step size, >= 0; may change during training through
            ``opt_params['learning_rate']`` (e.g. a schedule).
          clip_grad_norm: if set (> 0), gradients are scaled so that their global
            L2 norm does not exceed it. ``None``: no clipping.
          **init_opt_params: further hyperparameters, stored in ``opt_params``.
        """
        check_nonnegative("learning_rate", learning_rate)
        if clip_grad_norm is not None:
            check_positive("clip_grad_norm", clip_grad_norm)
        self._clip_grad_norm = clip_grad_norm
        params = {"learning_rate": learning_rate, **init_opt_params}
        for name, value in params.items():
            if value is None or not is_concrete_number(value):
                raise TypeError(
                    f"opt_params[{name!r}] must be a scalar number, got {value!r}"
                )
        self._init_opt_params = {
            k: jnp.asarray(v, dtype=jnp.float32) for k, v in params.items()
        }
        self._slots = None
        self._slot_specs: dict = {}

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={float(v):g}" for k, v in self.opt_params.items())
        return f"{type(self).__name__}({params})"

    @property
    def clip_grad_norm(self) -> float | None:
        """Global-norm clipping threshold fixed at construction (None: off)."""
        return self._clip_grad_norm

    # Trax compatibility: state kept on the object. The pure form
    # (store_slots=False) is the main path; these only serve Trax-style loops.
    @property
    def slots(self) -> Slots:
        """Slots stored by the last ``tree_init``/``tree_update``; None before."""
        return self._slots

    @slots.setter
    def slots(self, slots: Slots) -> None:
        self._slots = slots

    @property
    def opt_params(self) -> OptParams:
        """The hyperparameters given at construction, as 0-d float32 arrays."""
        return self._init_opt_params

    @opt_params.setter
    def opt_params(self, opt_params: OptParams) -> None:
        self._init_opt_params = opt_params

    # ------------------------------------------------- what a subclass defines

    def init(self, weights: jax.Array) -> Slots:
        """Creates the slots for one leaf of weights."""
        raise NotImplementedError(f"{type(self).__name__} must define init")

    def update(
        self,
        step: ArrayLike,
        grads: jax.Array,
        weights: jax.Array,
        slots: Slots,
        opt_params: OptParams,
    ) -> tuple[jax.Array, Slots]:
        """Returns ``(new_weights, new_slots)`` for one leaf: the math alone.

        ``tree_update`` calls it with every array and hyperparameter in the
        leaf's compute dtype and casts the results back; called directly, it
        computes in the dtypes it is given.
        """
        raise NotImplementedError(f"{type(self).__name__} must define update")

    def slot_axes(self, ndim: int) -> list[Axes]:
        """For each array of ``init(w)`` (in flatten order), the axes of a
        rank-``ndim`` weight ``w`` that it keeps, in order: its shape is
        ``tuple(w.shape[a] for a in axes)``."""
        raise NotImplementedError(f"{type(self).__name__} must define slot_axes")

    # ------------------------------------------------------------- the trees

    def tree_init(
        self, weight_tree: PyTree, store_slots: bool = True
    ) -> tuple[tuple, OptParams]:
        """Returns ``(slots, opt_params)``: one slot entry per leaf of
        ``weight_tree`` in flatten order, and a copy of the initial opt_params.

        Stores the slots on the object unless ``store_slots=False`` (required
        when called under ``jax.jit``).
        """
        _, leaves, _ = flatten_weights(weight_tree)
        if store_slots:
            check_not_tracing("tree_init", leaves)
        slots = tuple(self.init(w) for w in leaves)
        if store_slots:
            self._slots = slots
        return slots, dict(self._init_opt_params)

    def tree_update(
        self,
        step: ArrayLike,
        grad_tree: PyTree,
        weight_tree: PyTree,
        slots: Sequence[Slots],
        opt_params: OptParams,
        store_slots: bool = True,
        with_metrics: bool = False,
    ) -> tuple[PyTree, tuple] | tuple[PyTree, tuple, dict[str, jax.Array]]:
        """One optimizer step over a whole weight tree.

        Returns ``(new_weight_tree, new_slots)``, or ``(new_weight_tree,
        new_slots, metrics)`` with ``with_metrics=True``, where metrics holds
        ``gradients_l2`` (before clipping) and ``weights_l2`` (before the step).
        With ``store_slots=False`` this is a pure function, usable under
        ``jax.jit``, ``vmap`` and sharding.
        """
        if store_slots:
            check_not_tracing(
                "tree_update", grad_tree, weight_tree, slots, opt_params, step
            )
        check_step(step)
        check_opt_params(opt_params, self.opt_params)
        paths, weights, treedef = flatten_weights(weight_tree)
        check_same_structure("grad_tree", grad_tree, "weight_tree", weight_tree)
        grads = [jnp.asarray(g) for g in jax.tree.leaves(grad_tree)]
        check_grads(paths, grads, weights)
        slots = check_slots(paths, slots, weights, type(self).__name__, self._slot_spec)
        new_weights, new_slots, metrics = self.apply(
            step, grads, weights, slots, opt_params, with_metrics
        )
        new_weight_tree = jax.tree.unflatten(treedef, new_weights)
        new_slots = tuple(new_slots)
        if store_slots:
            self._slots = new_slots
        if not with_metrics:
            return new_weight_tree, new_slots
        return new_weight_tree, new_slots, metrics

    def apply(
        self,
        step: ArrayLike,
        grads: Sequence[jax.Array],
        weights: Sequence[jax.Array],
        slots: Sequence[Slots],
        opt_params: OptParams,
        with_metrics: bool = False,
        stacked: Sequence[bool] | None = None,
    ) -> tuple[list, list, dict[str, jax.Array]]:
        """One step over lists of leaves, unchecked: clipping, ``update`` for
        each leaf, and the metrics (empty unless ``with_metrics``).

        ``stacked[i]`` says that leaf ``i`` holds independent leaves stacked
        along its first axis: its ``update`` is mapped over that axis with
        ``jax.vmap`` (``treeopt.packed`` calls this with stacked groups).
        """
        metrics = {}
        if with_metrics or self._clip_grad_norm is not None:
            grad_norm = l2_norm(grads)
        if with_metrics:
            metrics = {"gradients_l2": grad_norm, "weights_l2": l2_norm(weights)}
        if self._clip_grad_norm is not None:
            grads = clip_to_norm(grads, self._clip_grad_norm, grad_norm)
        # The hyperparameters once per compute dtype and step, not once per leaf.
        params = {
            dt: {k: as_dtype(v, dt) for k, v in opt_params.items()}
            for dt in {compute_dtype(w) for w in weights}
        }
        new_weights, new_slots = [], []
        memo = _memos.__dict__.setdefault("stack", [])
        memo.append({})  # see once_per_step
        try:
            for i, (g, w, s) in enumerate(zip(grads, weights, slots, strict=True)):
                dt = compute_dtype(w)
                update, mapped = self.update, stacked is not None and stacked[i]
                if mapped:  # values traced under vmap must not outlive it
                    update = jax.vmap(self.update, in_axes=(None, 0, 0, 0, None))
                    memo.append(None)
                w_new, s_new = update(
                    step,
                    as_dtype(g, dt),
                    as_dtype(w, dt),
                    jax.tree.map(lambda x, dt=dt: as_dtype(x, dt), s),
                    params[dt],
                )
                if mapped:
                    memo.pop()
                new_weights.append(as_dtype(w_new, w.dtype))
                new_slots.append(cast_like(s_new, s))
        finally:
            memo.pop()
        return new_weights, new_slots, metrics

    def _slot_spec(self, w: jax.Array) -> tuple:
        """Structure and leaf shapes of ``init(w)``, cached per (shape, dtype)."""
        key = (w.shape, jnp.dtype(w.dtype))
        if key not in self._slot_specs:
            spec = jax.eval_shape(self.init, jax.ShapeDtypeStruct(w.shape, w.dtype))
            leaves, struct = jax.tree.flatten(spec)
            self._slot_specs[key] = (struct, [x.shape for x in leaves])
        return self._slot_specs[key]


class SGD(Optimizer):
    """Stochastic gradient descent.

    Per leaf::

        w <- w - lr * g

    Slots: ``None``.
    Robbins & Monro, "A Stochastic Approximation Method" (1951).
    """

    elementwise = True

    def init(self, weights: jax.Array) -> None:
        return None

    def update(
        self,
        step: ArrayLike,
        grads: jax.Array,
        weights: jax.Array,
        slots: None,
        opt_params: OptParams,
    ) -> tuple[jax.Array, None]:
        del step, slots
        return weights - opt_params["learning_rate"] * grads, None

    def slot_axes(self, ndim: int) -> list[Axes]:
        return []
