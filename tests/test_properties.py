"""Hypothesis properties over random trees, shapes and dtypes, for every case."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import treeopt
from treeopt import base

from cases import CASES
from helpers import FLOAT_DTYPES, assert_reordered_close, assert_sum_close, size

Point = collections.namedtuple("Point", ["x", "y"])

shapes = st.lists(st.integers(0, 3), min_size=0, max_size=4).map(tuple)


@st.composite
def arrays(draw, dtype=None):
    shape = draw(shapes)
    dtype = dtype or draw(st.sampled_from(FLOAT_DTYPES))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    x = np.array(rng.standard_normal(shape)) * draw(st.sampled_from([1e-3, 1.0, 30.0]))
    x = np.where(rng.random(shape) < 0.2, 0.0, x)  # zero rows and zero gradients
    return np.asarray(x, np.float32).astype(dtype)


def trees(leaves):
    return st.recursive(
        leaves,
        lambda kids: st.one_of(
            st.lists(kids, max_size=3),
            st.lists(kids, max_size=3).map(tuple),
            st.dictionaries(st.sampled_from("abcde"), kids, max_size=3),
            st.tuples(kids, kids).map(lambda t: Point(*t)),
        ),
        max_leaves=6,
    )


cases = st.sampled_from(CASES)


def _grads_like(tree, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda w: np.asarray(rng.standard_normal(np.shape(w)), np.float32).astype(
            w.dtype
        ),
        tree,
    )


@given(case=cases, tree=trees(arrays()), seed=st.integers(0, 100))
def test_structure_dtypes_finiteness_and_jit_equals_eager(case, tree, seed):
    cls, kwargs, _ = case
    opt = cls(**kwargs)
    grads = _grads_like(tree, seed)
    tree_before = jax.tree.map(np.copy, tree)
    grads_before = jax.tree.map(np.copy, grads)
    slots, p = opt.tree_init(tree, store_slots=False)

    def step(w, g, s, p):
        out = w, s
        for k in range(2):
            out = opt.tree_update(k, g, out[0], out[1], p, store_slots=False)
        return out

    w_jit, s_jit = jax.jit(step)(tree, grads, slots, p)
    path = [(tree, slots)]
    for k in range(2):
        path.append(opt.tree_update(k, grads, *path[-1], p, store_slots=False))
    w_eager, s_eager = path[-1]

    assert jax.tree.structure(w_eager) == jax.tree.structure(tree)
    assert jax.tree.structure(s_eager) == jax.tree.structure(slots)
    for new, old in zip(jax.tree.leaves(w_eager), jax.tree.leaves(tree), strict=True):
        assert new.shape == old.shape and new.dtype == old.dtype
    for new, old in zip(jax.tree.leaves(s_jit), jax.tree.leaves(slots), strict=True):
        assert new.shape == old.shape and new.dtype == old.dtype
    for leaf in jax.tree.leaves((w_jit, s_jit, w_eager, s_eager)):
        assert np.all(np.isfinite(np.asarray(leaf, np.float32)))
    w_path, s_path = zip(*path, strict=True)
    n = size(tree)
    assert_reordered_close(w_jit, w_eager, w_path, n, "weights")
    assert_reordered_close(s_jit, s_eager, s_path, n, "slots")
    # Inputs untouched.
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(tree_before), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_before), strict=True):
        np.testing.assert_array_equal(a, b)


_NO_DECAY = {"weight_decay_rate": 0.0, "weight_decay": 0.0}


@given(case=cases, tree=trees(arrays()), seed=st.integers(0, 100))
def test_zero_learning_rate_without_weight_decay_keeps_weights(case, tree, seed):
    cls, kwargs, _ = case
    opt = cls(**kwargs)
    p = dict(opt.opt_params, learning_rate=jnp.zeros((), jnp.float32))
    p.update({k: jnp.zeros((), jnp.float32) for k in _NO_DECAY if k in p})
    slots, _ = opt.tree_init(tree, store_slots=False)
    new, _ = opt.tree_update(0, _grads_like(tree, seed), tree, slots, p, False)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(tree), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@given(
    case=cases,
    shape=shapes,
    batch=st.integers(1, 3),
    seed=st.integers(0, 100),
)
def test_vmap_over_a_batch_of_trees_equals_a_loop(case, shape, batch, seed):
    cls, kwargs, _ = case
    opt = cls(**kwargs)
    rng = np.random.default_rng(seed)
    w = {
        "a": rng.standard_normal((batch, *shape)).astype(np.float32),
        "b": [rng.standard_normal((batch, 2, 3)).astype(np.float32)],
    }
    g = _grads_like(w, seed + 1)
    p = opt.opt_params

    def one(w, g):
        slots, _ = opt.tree_init(w, store_slots=False)
        return opt.tree_update(3, g, w, slots, p, store_slots=False)

    batched = jax.vmap(one)(w, g)
    for i in range(batch):
        w_i, g_i = jax.tree.map(lambda x, i=i: x[i], (w, g))
        single = one(w_i, g_i)
        start = (w_i, opt.tree_init(w_i, store_slots=False)[0])
        mine = jax.tree.map(lambda x, i=i: x[i], batched)
        assert_reordered_close(mine, single, [start, single], size(w_i), f"tree {i}")


@given(tree=trees(arrays()))
def test_l2_norm_is_the_norm_of_the_concatenated_leaves(tree):
    leaves = [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)]
    expected = np.linalg.norm(np.concatenate(leaves)) if leaves else 0.0
    assert_sum_close(treeopt.l2_norm(tree), expected, size(tree))


@given(tree=trees(arrays(jnp.float32)), max_norm=st.floats(1e-3, 1e3))
def test_clip_grads_never_exceeds_max_norm_and_keeps_direction(tree, max_norm):
    clipped = treeopt.clip_grads(tree, max_norm)
    norm = float(base.l2_norm(tree))
    assert float(base.l2_norm(clipped)) <= max_norm * (1 + 1e-5) or norm < max_norm
    scale = min(1.0, max_norm / norm) if norm > 0 else 1.0
    for a, b in zip(jax.tree.leaves(clipped), jax.tree.leaves(tree), strict=True):
        np.testing.assert_allclose(
            a, np.asarray(b, np.float64) * scale, rtol=1e-5, atol=1e-30
        )
