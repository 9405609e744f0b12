"""Base optimizer class, SGD, and the tree plumbing shared by every optimizer."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from treeopt import fusion

PyTree = Any
Slots = Any
OptParams = dict[str, jax.Array]

_STORE_UNDER_JIT = (
    "{fn}(..., store_slots=True) was called while tracing (inside jax.jit, vmap, "
    "scan, ...): storing traced slots on the optimizer object would leak tracers. "
    "Pass store_slots=False and keep the returned slots yourself."
)


# ---------------------------------------------------------------- validation


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


# ------------------------------------------------------------- leaf helpers


def compute_dtype(x: jax.Array) -> jnp.dtype:
    """float32 for bfloat16/float16/float32 leaves, float64 for float64 leaves.

    Spelled out rather than ``promote_types`` so that it also holds under
    ``jax_numpy_dtype_promotion='strict'``.
    """
    dtype = jnp.dtype(x.dtype)
    return dtype if dtype.itemsize >= 4 else jnp.dtype(jnp.float32)


def as_dtype(x: ArrayLike, dtype: Any) -> jax.Array:
    """``x`` as a strongly typed array of ``dtype``, returned as it is if it
    already is one (which saves the Python dispatch of a no-op cast per leaf)."""
    x = jnp.asarray(x)
    if x.dtype == dtype and not x.weak_type:
        return x
    return x.astype(dtype)


def upcast(weights: jax.Array, *xs: jax.Array) -> tuple[jax.Array, ...]:
    """``weights`` and ``xs`` cast to ``compute_dtype(weights)``."""
    dt = compute_dtype(weights)
    return tuple(as_dtype(x, dt) for x in (weights, *xs))


def hyperparams(opt_params: OptParams, dtype: Any, *names: str) -> tuple:
    """Reads ``opt_params[name]`` for each name, cast to ``dtype``.

    The explicit cast keeps weakly typed (or float64, restored) scalars from
    changing the dtype of the result.
    """
    try:
        return tuple(jnp.asarray(opt_params[k]).astype(dtype) for k in names)
    except KeyError as e:
        raise ValueError(
            f"opt_params lacks {e.args[0]!r}; it has {sorted(opt_params)}"
        ) from None


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


def check_opt_params(opt_params: OptParams, known: Any) -> None:
    """Raises ``ValueError`` for a key of ``opt_params`` that is not in ``known``
    (a typo such as ``'lr'`` would otherwise be ignored without a word)."""
    unknown = sorted(set(opt_params) - set(known))
    if unknown:
        raise ValueError(
            f"opt_params has unknown key(s) {unknown}; the optimizer knows "
            f"{sorted(known)}"
        )


def step_count(step: ArrayLike, dtype: Any) -> jax.Array:
    """``t = step + 1`` as a float of ``dtype`` (steps count from 0)."""
    return jnp.asarray(step).astype(dtype) + 1


def cast_like(new: Any, old: Any) -> Any:
    """Casts each array in ``new`` to the dtype of its counterpart in ``old``."""
    return jax.tree.map(lambda n, o: as_dtype(n, o.dtype), new, old)


def safe_mean(x: jax.Array, axis: Any = None, keepdims: bool = False) -> jax.Array:
    """``mean`` that returns 0 instead of NaN over zero-size axes."""
    n = x.size if axis is None else int(np.prod(np.take(x.shape, axis)))
    return jnp.sum(x, axis=axis, keepdims=keepdims) / max(n, 1)


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


def _flatten_weights(weight_tree: PyTree) -> tuple[list, list, Any]:
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


def is_elementwise(optimizer: Any) -> bool:
    """Whether ``optimizer``'s class declares ``_elementwise = True`` in its own
    body (not inherited: a subclass may change the math): its per-leaf step is
    elementwise, so leaves may be concatenated (``treeopt.packed``) and, with
    XLA:CPU's multi-output fusion, compiled to one loop (``treeopt.fusion``)."""
    return bool(type(optimizer).__dict__.get("_elementwise", False))


class Optimizer:
    """Base class: subclasses define ``init`` and ``update`` for ONE leaf.

    ``tree_init``/``tree_update`` apply them to every leaf of a weight tree, in
    ``jax.tree_util`` flatten order, with optional global-norm gradient clipping.
    Structural options are fixed at construction; every number that may change
    during training lives in ``opt_params`` as a 0-d array.

    Instead of ``update`` a subclass may define the pair ``_prepare(step,
    opt_params, dtype)`` (the per-step scalars: hyperparameters cast to the
    compute dtype, bias corrections, ...) and ``_apply(prepared, grads, weights,
    slots)`` (the per-leaf math); ``update`` is then their composition, and
    ``tree_update`` calls ``_prepare`` once per compute dtype instead of once per
    leaf, which keeps the traced program (and its compile time) small on trees
    with many leaves. The built-in optimizers do this.

    A class that sets ``_elementwise = True`` in its own body declares that its
    per-leaf step has no reductions over a leaf (see ``is_elementwise``).
    """

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

    def init(self, weights: jax.Array) -> Slots:
        """Creates the slots for one leaf of weights."""
        raise NotImplementedError

    def update(
        self,
        step: ArrayLike,
        grads: jax.Array,
        weights: jax.Array,
        slots: Slots,
        opt_params: OptParams,
    ) -> tuple[jax.Array, Slots]:
        """Returns ``(new_weights, new_slots)`` for one leaf."""
        if type(self)._apply is Optimizer._apply:
            raise NotImplementedError(
                f"{type(self).__name__} must define update (or _prepare and _apply)"
            )
        prepared = self._prepare(step, opt_params, compute_dtype(weights))
        return self._apply(prepared, grads, weights, slots)

    def _prepare(self, step: ArrayLike, opt_params: OptParams, dtype: Any) -> Any:
        """The per-step scalars ``_apply`` needs, in ``dtype``; once per step."""
        raise NotImplementedError(
            f"{type(self).__name__} defines _apply but not _prepare"
        )

    def _apply(
        self, prepared: Any, grads: jax.Array, weights: jax.Array, slots: Slots
    ) -> tuple[jax.Array, Slots]:
        """``update`` for one leaf, given what ``_prepare`` returned."""
        raise NotImplementedError

    def _is_split(self) -> bool:
        """Whether ``update`` is ``_prepare`` then ``_apply``: not overridden in a
        subclass nor replaced on the instance."""
        update = getattr(self.update, "__func__", None)
        return update is Optimizer.update and type(self)._apply is not Optimizer._apply

    def _leaf_fn(
        self, step: ArrayLike, opt_params: OptParams, dtype: Any, cache: dict
    ) -> Any:
        """The step of one leaf of compute dtype ``dtype`` as ``fn(g, w, s)``:
        ``_apply`` after ``_prepare``, which runs once per dtype (kept in
        ``cache``), or ``update`` when the optimizer does not split it.

        An elementwise optimizer's step goes through
        ``fusion.sibling_outputs`` when XLA:CPU's multi-output fusion is on, so
        each leaf compiles to one loop (see ``treeopt.fusion``)."""
        if not self._is_split():
            return lambda g, w, s: self.update(step, g, w, s, opt_params)
        if dtype not in cache:
            cache[dtype] = self._prepare(step, opt_params, dtype)
        fn = functools.partial(self._apply, cache[dtype])
        if is_elementwise(self) and fusion.sibling_outputs_enabled():
            return fusion.sibling_outputs(fn)
        return fn

    def tree_init(
        self, weight_tree: PyTree, store_slots: bool = True
    ) -> tuple[tuple, OptParams]:
        """Returns ``(slots, opt_params)``: one slot entry per leaf of
        ``weight_tree`` in flatten order, and a copy of the initial opt_params.

        Stores the slots on the object unless ``store_slots=False`` (required
        when called under ``jax.jit``).
        """
        _, leaves, _ = _flatten_weights(weight_tree)
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
        paths, weights, treedef = _flatten_weights(weight_tree)
        check_same_structure("grad_tree", grad_tree, "weight_tree", weight_tree)
        grads = [jnp.asarray(g) for g in jax.tree.leaves(grad_tree)]
        self._check_grads(paths, grads, weights)
        slots = self._check_slots(paths, slots, weights)

        grad_norm = None
        if with_metrics or self._clip_grad_norm is not None:
            grad_norm = l2_norm(grads)
        if self._clip_grad_norm is not None:
            grads = clip_to_norm(grads, self._clip_grad_norm, grad_norm)
        prepared: dict = {}  # per-step scalars once per compute dtype
        new_weights, new_slots = [], []
        for g, w, s in zip(grads, weights, slots, strict=True):
            leaf_fn = self._leaf_fn(step, opt_params, compute_dtype(w), prepared)
            w_new, s_new = leaf_fn(g, w, s)
            new_weights.append(as_dtype(w_new, w.dtype))
            new_slots.append(cast_like(s_new, s))
        new_weight_tree = jax.tree.unflatten(treedef, new_weights)
        new_slots = tuple(new_slots)
        if store_slots:
            self._slots = new_slots
        if not with_metrics:
            return new_weight_tree, new_slots
        metrics = {"gradients_l2": grad_norm, "weights_l2": l2_norm(weights)}
        return new_weight_tree, new_slots, metrics

    # ---------------------------------------------------------- input checks

    @staticmethod
    def _check_grads(paths: list, grads: list, weights: list) -> None:
        for path, g, w in zip(paths, grads, weights, strict=True):
            if g.shape != w.shape:
                raise ValueError(
                    f"grads at {jax.tree_util.keystr(path) or '<root>'} have shape "
                    f"{g.shape} but the weights have shape {w.shape}"
                )

    def _slot_spec(self, w: jax.Array) -> tuple:
        """Structure and leaf shapes of ``init(w)``, cached per (shape, dtype)."""
        key = (w.shape, jnp.dtype(w.dtype))
        if key not in self._slot_specs:
            spec = jax.eval_shape(self.init, jax.ShapeDtypeStruct(w.shape, w.dtype))
            leaves, struct = jax.tree.flatten(spec)
            self._slot_specs[key] = (struct, [x.shape for x in leaves])
        return self._slot_specs[key]

    def _check_slots(self, paths: list, slots: Any, weights: list) -> list:
        if not isinstance(slots, tuple | list):
            raise TypeError(
                f"slots must be the tuple returned by tree_init, got "
                f"{type(slots).__name__}"
            )
        if len(slots) != len(weights):
            raise ValueError(
                f"slots has {len(slots)} entries but weight_tree has "
                f"{len(weights)} leaves: slots from another tree?"
            )
        for path, s, w in zip(paths, slots, weights, strict=True):
            struct, shapes = self._slot_spec(w)
            leaves = jax.tree.leaves(s)
            got = [jnp.shape(x) for x in leaves]
            if jax.tree.structure(s) != struct or got != shapes:
                raise ValueError(
                    f"slots for weight {jax.tree_util.keystr(path) or '<root>'} "
                    f"(shape {w.shape}) do not fit {type(self).__name__}: expected "
                    f"{struct} with shapes {shapes}, got {jax.tree.structure(s)} "
                    f"with shapes {got}; slots from another tree or optimizer?"
                )
        return [jax.tree.map(jnp.asarray, s) for s in slots]


class SGD(Optimizer):
    """Stochastic gradient descent.

    Per leaf::

        w <- w - lr * g

    Slots: ``None``.
    Robbins & Monro, "A Stochastic Approximation Method" (1951).
    """

    _elementwise = True

    def init(self, weights: jax.Array) -> None:
        del weights
        return None

    def _prepare(self, step: ArrayLike, opt_params: OptParams, dtype: Any) -> tuple:
        del step
        return hyperparams(opt_params, dtype, "learning_rate")

    def _apply(
        self, prepared: tuple, grads: jax.Array, weights: jax.Array, slots: None
    ) -> tuple[jax.Array, None]:
        del slots
        (lr,) = prepared
        w, g = upcast(weights, grads)
        return as_dtype(w - lr * g, weights.dtype), None
