"""The suite's one tolerance policy (helpers.path_bound) keeps its power: it
accepts two orders of the same float32 math and fails a 0.1% change of a
hyperparameter or a swapped branch on one side of each kind of comparison."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import treeopt
from treeopt import packed

from cases import CASES
from helpers import (
    EPS32,
    OPS_PER_STEP,
    assert_reordered_close,
    assert_trees_equal,
    path_bound,
    random_grads,
    random_leaves,
    run_optax,
    run_treeopt_path,
    size,
)


def test_bound_is_the_documented_formula():
    path = [np.float32([1.0, -2.0]), np.float32([0.5, -2.0]), np.float32([0.75, -1.0])]
    (bound,) = jax.tree.leaves(path_bound([[x] for x in path], reduction=4))
    steps, k = 2, 2 * (OPS_PER_STEP + 4)
    expected = EPS32 * steps * np.array([1.0, 2.0]) + EPS32 * k * np.array(
        [0.5 + 0.25, 1.0]
    )
    np.testing.assert_allclose(bound, expected, rtol=1e-12)


def test_bfloat16_leaves_get_a_bfloat16_ulp_per_step():
    path = [[jnp.ones(2, jnp.bfloat16)], [jnp.ones(2, jnp.bfloat16)]]
    (bound,) = jax.tree.leaves(path_bound(path))
    np.testing.assert_allclose(bound, 2.0**-7)


def test_nan_and_dtype_differences_fail():
    path = [[np.float32([1.0])], [np.float32([2.0])]]
    with pytest.raises(AssertionError, match="beyond"):
        assert_reordered_close([np.float32([np.nan])], path[-1], path)
    with pytest.raises(AssertionError, match="dtype"):
        assert_reordered_close([np.float64([2.0])], path[-1], path)
    with pytest.raises(AssertionError, match="other bits"):
        assert_trees_equal([np.float32([-0.0])], [np.float32([0.0])])


def _adam_against_optax(**changes):
    kw = {"learning_rate": 0.05, "b1": 0.8, "b2": 0.99, "eps": 1e-6}
    w, g = random_leaves(7), random_grads(8, steps=6)
    path, _ = run_treeopt_path(treeopt.Adam(weight_decay_rate=0.0, **kw), w, g)
    kw.update(changes)
    tx = optax.adamw(
        kw["learning_rate"], kw["b1"], kw["b2"], kw["eps"], weight_decay=0.0
    )
    assert_reordered_close(run_optax(tx, w, g), path[-1], path)


def test_optax_comparison_fails_a_hyperparameter_off_by_a_thousandth():
    _adam_against_optax()
    for name, value in [("learning_rate", 0.05 * 1.001), ("b1", 0.8 * 1.001)]:
        with pytest.raises(AssertionError, match="beyond the float32 path bound"):
            _adam_against_optax(**{name: value})


def test_optax_comparison_fails_a_swapped_branch():
    w, g = random_leaves(11), random_grads(12, steps=6)
    opt = treeopt.Momentum(0.1, mass=0.8, weight_decay_rate=0.0, nesterov=True)
    path, _ = run_treeopt_path(opt, w, g)
    same = run_optax(optax.sgd(0.1, momentum=0.8, nesterov=True), w, g)
    assert_reordered_close(same, path[-1], path)
    swapped = run_optax(optax.sgd(0.1, momentum=0.8, nesterov=False), w, g)
    with pytest.raises(AssertionError, match="beyond the float32 path bound"):
        assert_reordered_close(swapped, path[-1], path)


@pytest.mark.parametrize(
    ("cls", "kwargs", "case_id"),
    [c for c in CASES if c[2] in {"sgd-clip", "adafactor", "sm3-graft-nesterov"}],
    ids=lambda c: c if isinstance(c, str) else "",
)
def test_packed_comparison_fails_a_learning_rate_off_by_a_thousandth(
    cls, kwargs, case_id
):
    opt = cls(**kwargs)
    rng = np.random.default_rng(0)
    weights = {k: rng.standard_normal((3, 4)).astype(np.float32) for k in "abc"}
    grads = [
        {k: rng.standard_normal((3, 4)).astype(np.float32) for k in "abc"}
        for _ in range(3)
    ]
    pk = packed.Packed(opt, weights)
    slots, params = opt.tree_init(weights, store_slots=False)
    pslots, _ = pk.tree_init(weights)
    off = dict(params, learning_rate=params["learning_rate"] * 1.001)
    leaf_step = jax.jit(lambda *a: opt.tree_update(*a, store_slots=False))
    w_leaf, w_pack, path = weights, weights, [weights]
    for k, g in enumerate(grads):
        w_leaf, slots = leaf_step(k, g, w_leaf, slots, params)
        w_pack, pslots = jax.jit(pk.tree_update)(k, g, w_pack, pslots, off)
        path.append(w_leaf)
    with pytest.raises(AssertionError, match="beyond the float32 path bound"):
        assert_reordered_close(w_pack, w_leaf, path, size(weights), case_id)
