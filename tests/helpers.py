"""Small utilities shared by the tests (data, comparisons)."""

import jax
import jax.numpy as jnp
import numpy as np

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
    slots, opt_params = opt.tree_init(weights, store_slots=False)

    def step_fn(step, g, w, s, p):
        return opt.tree_update(step, g, w, s, p, store_slots=False)

    if jit:
        step_fn = jax.jit(step_fn)
    w = list(weights)
    for k, grads in enumerate(grads_per_step):
        w, slots = step_fn(jnp.asarray(start_step + k), grads, w, slots, opt_params)
    return w, slots


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
