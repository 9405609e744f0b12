"""Small utilities shared by the tests (data, comparisons)."""

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest


def _float16_compiles() -> bool:
    """Whether XLA:CPU can convert float16 here. Under
    ``--xla_cpu_max_isa=SSE4_2`` (no F16C) it cannot: LLVM finds no
    ``__extendhfsf2`` and every float16 conversion fails with "Failed to
    materialize symbols" (jax 0.10.2), in any program, not only treeopt's."""
    try:
        jnp.ones(1, jnp.float16).astype(jnp.float32).block_until_ready()
    except jax.errors.JaxRuntimeError:
        return False
    return True


FLOAT16_COMPILES = _float16_compiles()
needs_float16 = pytest.mark.skipif(
    not FLOAT16_COMPILES,
    reason="XLA:CPU cannot compile float16 conversions on this instruction set "
    "(no F16C); float16 is tested under every other one",
)
FLOAT_DTYPES = [jnp.float32, jnp.bfloat16] + ([jnp.float16] * FLOAT16_COMPILES)

RTOL_F32 = 1e-6  # SPEC section 4: float32 results agree to about 1e-6 relative.
ATOL_F32 = 1e-6  # for entries near zero, weights are O(1).
RTOL_SLOTS = 1e-5  # statistics pass through squares, rsqrt and reductions.
RTOL_DELTA = 2e-5  # total displacement w_T - w_0, about 1 ulp of w over |delta|.

SHAPES = [(), (5,), (3, 4), (2, 3, 4), (2, 1, 3, 2), (1, 6)]


def random_leaves(seed, shapes=SHAPES, dtype=np.float32, scale=1.0):
    rng = np.random.default_rng(seed)
    return [(scale * rng.standard_normal(s)).astype(dtype) for s in shapes]


def random_grads(seed, shapes=SHAPES, steps=5, dtype=np.float32):
    return [random_leaves(seed + 1000 * (k + 1), shapes, dtype) for k in range(steps)]


def run_treeopt(opt, weights, grads_per_step, start_step=0, jit=True):
    """Runs ``opt.tree_update`` over a list of leaves; returns (weights, slots)."""
    w_path, s_path = run_treeopt_path(opt, weights, grads_per_step, start_step, jit)
    return w_path[-1], s_path[-1]


def run_treeopt_path(opt, weights, grads_per_step, start_step=0, jit=True):
    """``run_treeopt`` keeping every state: ([w_0, ..., w_T], [s_0, ..., s_T])."""
    slots, opt_params = opt.tree_init(weights, store_slots=False)

    def step_fn(step, g, w, s, p):
        return opt.tree_update(step, g, w, s, p, store_slots=False)

    if jit:
        step_fn = jax.jit(step_fn)
    w = list(weights)
    w_path, s_path = [w], [slots]
    for k, grads in enumerate(grads_per_step):
        w, slots = step_fn(jnp.asarray(start_step + k), grads, w, slots, opt_params)
        w_path.append(w)
        s_path.append(slots)
    return w_path, s_path


def run_optax(tx, weights, grads_per_step):
    """Runs an optax transformation over a list of leaves; returns the weights."""
    import optax

    params, state = list(weights), tx.init(list(weights))
    for grads in grads_per_step:
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params


def assert_tree_close(actual, expected, rtol, atol=0.0, what=""):
    """Compares two trees leaf by leaf, requiring the same structure."""
    a_leaves, a_def = jax.tree.flatten(actual)
    e_leaves, e_def = jax.tree.flatten(expected)
    assert a_def == e_def, f"{what}: structure {a_def} != {e_def}"
    for i, (a, e) in enumerate(zip(a_leaves, e_leaves, strict=True)):
        np.testing.assert_allclose(
            np.asarray(a, np.float64),
            np.asarray(e, np.float64),
            rtol=rtol,
            atol=atol,
            err_msg=f"{what} leaf {i}",
        )


# ------------------------------------------------------- comparing two programs
#
# The one tolerance policy of the suite. Two programs that compute the same
# float32 math in another order (packed vs per-leaf, jit vs eager, treeopt vs
# optax, guarded vs clean, sharded vs one device) may differ in the last bits,
# and by how much depends on the CPU: XLA:CPU vectorizes a sum according to the
# host's instruction set. Such pairs are compared with ``assert_reordered_close``,
# whose bound follows from float32 rounding along the path the values took;
# pairs that must be bit-identical use ``assert_trees_equal``.

EPS = {
    np.dtype(np.float64): 2.0**-52,
    np.dtype(np.float32): 2.0**-23,
    np.dtype(jnp.bfloat16): 2.0**-7,
    np.dtype(np.float16): 2.0**-10,
}
EPS32 = EPS[np.dtype(np.float32)]
# Roundings along one leaf's increment in one step, counted on the longest path
# (Adafactor with momentum and clipping: g**2, + eps1, row mean, column mean,
# their ratio, rsqrt, u = g * rsqrt, rms(u), clip divide, parameter scale rms,
# max, * lr, momentum mix, decay, w - delta): 15, rounded up to 16.
OPS_PER_STEP = 16


def path_bound(trajectory: list, reduction: int = 1) -> list:
    """Elementwise bound on ``|a - b|`` for the last element of ``trajectory``
    computed by two programs that differ only in the order of float32 operations.

    ``trajectory`` is ``[x_0, x_1, ..., x_T]`` (trees with the same structure:
    the start, then the value after each step) as either program computed it;
    ``reduction`` is the largest number of terms any sum in a step adds (the
    element count of the tree under global-norm clipping, of a leaf for
    Adafactor's means). Per leaf::

        bound = eps(dtype) * T * max_t |x_t|
              + eps32 * T * (OPS_PER_STEP + reduction) * sum_t |x_t - x_{t-1}|

    Why: each step ends by rounding ``x_t`` to its dtype, and two programs whose
    unrounded values differ by a hair may round to neighbours: one ulp per step
    (first term). An increment takes at most ``OPS_PER_STEP`` roundings of
    relative error ``eps32`` each, and a sum of ``n`` terms taken in another
    order differs by at most ``(n - 1) * eps32`` relative (Higham, "Accuracy and
    Stability of Numerical Algorithms", 2002, section 4.2, for terms of one sign,
    as norms and second moments are); a difference carried in a slot perturbs
    every later increment by as much again, so by step ``T`` an increment is off
    by at most ``T * (OPS_PER_STEP + reduction) * eps32`` of itself (second
    term). Relative to the update path, not to ``x``: a change of a
    hyperparameter by 0.1% moves the result by about 1e-3 of the path, far above
    this bound on the trees the tests use.
    """
    if len(trajectory) < 2:
        raise ValueError("a trajectory holds the start and at least one step")
    steps = len(trajectory) - 1
    k = steps * (OPS_PER_STEP + reduction)

    def leaf_bound(*xs: Any) -> np.ndarray:
        xs64 = [np.asarray(x, np.float64) for x in xs]
        eps = EPS[np.dtype(np.asarray(xs[-1]).dtype)]
        size = np.max(np.abs(xs64), axis=0)
        path = np.sum(np.abs(np.diff(xs64, axis=0)), axis=0)
        return eps * steps * size + EPS32 * k * path

    return jax.tree.map(leaf_bound, *trajectory)


def assert_reordered_close(
    actual: Any, expected: Any, trajectory: list, reduction: int = 1, what: str = ""
) -> None:
    """``|actual - expected| <= path_bound(trajectory, reduction)`` elementwise,
    with the same tree structure and dtypes: the comparison of two float32
    programs that differ in operation order (see ``path_bound``)."""
    a_leaves, a_def = jax.tree.flatten(actual)
    e_leaves, e_def = jax.tree.flatten(expected)
    assert a_def == e_def, f"{what}: structure {a_def} != {e_def}"
    bounds = jax.tree.leaves(path_bound(trajectory, reduction))
    assert len(bounds) == len(a_leaves), f"{what}: trajectory of another tree"
    for i, (a, e, b) in enumerate(zip(a_leaves, e_leaves, bounds, strict=True)):
        a, e = np.asarray(a), np.asarray(e)
        assert a.dtype == e.dtype, f"{what} leaf {i}: dtype {a.dtype} != {e.dtype}"
        assert a.shape == e.shape, f"{what} leaf {i}: shape {a.shape} != {e.shape}"
        err = np.abs(a.astype(np.float64) - e.astype(np.float64))
        bad = ~(err <= b)  # NaN anywhere fails
        if bad.any():
            j = np.unravel_index(
                np.argmax(np.where(bad, err / np.maximum(b, 1e-300), 0)), err.shape
            )
            raise AssertionError(
                f"{what} leaf {i}: {int(bad.sum())} of {err.size} elements beyond "
                f"the float32 path bound; worst at {tuple(int(x) for x in j)}: "
                f"actual {a[j]!r}, expected {e[j]!r}, |diff| {err[j]:.3g} > "
                f"bound {b[j]:.3g}"
            )


def assert_trees_equal(actual: Any, expected: Any, what: str = "") -> None:
    """Bit-identical trees: same structure, dtypes, shapes and bits (so -0.0 is
    not 0.0): for two programs that must compute the very same numbers."""
    a_leaves, a_def = jax.tree.flatten(actual)
    e_leaves, e_def = jax.tree.flatten(expected)
    assert a_def == e_def, f"{what}: structure {a_def} != {e_def}"
    for i, (a, e) in enumerate(zip(a_leaves, e_leaves, strict=True)):
        a, e = np.asarray(a), np.asarray(e)
        assert a.dtype == e.dtype, f"{what} leaf {i}: dtype {a.dtype} != {e.dtype}"
        assert a.shape == e.shape, f"{what} leaf {i}: shape {a.shape} != {e.shape}"
        if not np.array_equal(
            np.atleast_1d(a).view(np.uint8), np.atleast_1d(e).view(np.uint8)
        ):
            np.testing.assert_array_equal(a, e, err_msg=f"{what} leaf {i}")
            raise AssertionError(
                f"{what} leaf {i}: equal values, other bits: {a} vs {e}"
            )


def assert_sum_close(actual: Any, expected: Any, terms: int, what: str = "") -> None:
    """Two float32 sums (or norms) of ``terms`` non-negative terms taken in
    different orders: equal within ``terms * eps32`` relative (Higham's bound
    for recursive summation, which also covers pairwise and vectorized orders;
    a square root halves it)."""
    np.testing.assert_allclose(
        np.asarray(actual, np.float64),
        np.asarray(expected, np.float64),
        rtol=max(terms, 1) * EPS32,
        atol=0.0,
        err_msg=what,
    )


def size(tree: Any) -> int:
    """Elements in a tree: the longest sum a step over it may take (global norm)."""
    return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


def isa_flags() -> str:
    """The ``--xla_cpu_max_isa`` flag of this process's ``$XLA_FLAGS``, if any:
    worker processes take it so that they compile for the same instruction set
    as the process that compares their results."""
    flags = os.environ.get("XLA_FLAGS", "").split()
    return " ".join(f for f in flags if f.startswith("--xla_cpu_max_isa"))
