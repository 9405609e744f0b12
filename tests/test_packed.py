"""The packed path equals the per-leaf path and round-trips the Trax slot layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import treeopt
from treeopt import base, packed

from cases import BF16_MOMENTUM, CASES
from helpers import (
    RTOL_F32,
    assert_reordered_close,
    assert_sum_close,
    assert_tree_close,
    assert_trees_equal,
    size,
)
from reference import run as reference_run

ALL = [*CASES, BF16_MOMENTUM]
ALL_IDS = [c[2] for c in ALL]
# One case per class (its first), plus bfloat16 momentum: the packed-weights loop.
ONE_PER_CLASS = [c for i, c in enumerate(ALL) if c[0] not in [d[0] for d in ALL[:i]]]
ONE_PER_CLASS.append(BF16_MOMENTUM)
FLAT = [c for c in CASES if base.is_elementwise(c[0](**c[1]))]
FLAT_IDS = [c[2] for c in FLAT]


def mixed_tree(seed, scale=1.0):
    """A dict/list/tuple tree with float32 and bfloat16 leaves, a scalar included."""
    rng = np.random.default_rng(seed)

    def r(shape, dtype=np.float32):
        return jnp.asarray(scale * rng.standard_normal(shape), dtype)

    return {
        "dense": [r((3, 4)), r((4,))],
        "scalar": r(()),
        "emb": r((5, 2, 3), jnp.bfloat16),
        "norm": (r((6,), jnp.bfloat16), r((2, 2))),
        # Repeated shapes, which the stacked layout groups together.
        "layers": [r((3, 4)), r((4,)), r((3, 4)), r(()), r((5, 2, 3), jnp.bfloat16)],
    }


def run_both(opt, weights, grads_per_step):
    """Jitted per-leaf and packed runs; returns both (weights, Trax slots)."""
    pk = packed.Packed(opt, weights)
    slots, opt_params = opt.tree_init(weights, store_slots=False)
    pslots, _ = pk.tree_init(weights)

    @jax.jit
    def leaf_step(step, g, w, s, p):
        return opt.tree_update(step, g, w, s, p, store_slots=False)

    @jax.jit
    def packed_step(step, g, w, s, p):
        return pk.tree_update(step, g, w, s, p)

    w_leaf = w_pack = weights
    path = [(weights, slots)]
    for k, g in enumerate(grads_per_step):
        step = jnp.asarray(k)
        w_leaf, slots = leaf_step(step, g, w_leaf, slots, opt_params)
        w_pack, pslots = packed_step(step, g, w_pack, pslots, opt_params)
        path.append((w_leaf, slots))
    return (w_leaf, slots), (w_pack, pk.unpack_slots(pslots)), path


@pytest.mark.parametrize("cls, kwargs, _id", ALL, ids=ALL_IDS)
def test_packed_equals_per_leaf(cls, kwargs, _id):
    opt = cls(**kwargs)
    weights = mixed_tree(0)
    grads = [mixed_tree(10 + k, scale=0.5) for k in range(3)]
    (w_leaf, s_leaf), (w_pack, s_pack), path = run_both(opt, weights, grads)
    if base.is_elementwise(opt) and opt.clip_grad_norm is None:
        # Elementwise math on the same numbers: equal to the last bit.
        assert_trees_equal(w_pack, w_leaf)
        assert_trees_equal(s_pack, s_leaf)
    else:
        # Global norms and vmapped reductions may sum in another order.
        w_path, s_path = zip(*path, strict=True)
        n = size(weights)
        assert_reordered_close(w_pack, w_leaf, w_path, n, what="weights")
        assert_reordered_close(s_pack, s_leaf, s_path, n, what="slots")


@pytest.mark.parametrize(
    "cls, kwargs, _id", ONE_PER_CLASS, ids=[c[2] for c in ONE_PER_CLASS]
)
def test_update_on_packed_weights_equals_per_leaf(cls, kwargs, _id):
    opt = cls(**kwargs)
    weights = mixed_tree(6)
    grads = [mixed_tree(20 + k, scale=0.5) for k in range(2)]
    (w_leaf, s_leaf), _, path = run_both(opt, weights, grads)
    pk = packed.Packed(opt, weights)
    w = pk.pack(weights)
    slots, opt_params = pk.init(w)
    step_fn = jax.jit(pk.update)
    for k, g in enumerate(grads):
        w, slots = step_fn(jnp.asarray(k), pk.pack(g), w, slots, opt_params)
    w_path, s_path = zip(*path, strict=True)
    n = size(weights)
    assert_reordered_close(pk.unpack(w), w_leaf, w_path, n, what="weights")
    assert_reordered_close(pk.unpack_slots(slots), s_leaf, s_path, n, what="slots")


@pytest.mark.parametrize("cls, kwargs, _id", FLAT, ids=FLAT_IDS)
def test_packed_matches_float64_reference(cls, kwargs, _id):
    rng = np.random.default_rng(1)
    shapes = [(3, 4), (), (7,), (2, 3, 2)]
    weights = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [
        [rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(4)
    ]
    opt = cls(**kwargs)
    pk = packed.Packed(opt, weights)
    slots, opt_params = pk.tree_init(weights)
    step_fn = jax.jit(pk.tree_update)
    w = weights
    for k, g in enumerate(grads):
        w, slots = step_fn(jnp.asarray(k), g, w, slots, opt_params)
    w_ref, s_ref = reference_run(cls.__name__, kwargs, weights, grads)
    assert_tree_close(w, w_ref, rtol=RTOL_F32, atol=1e-6, what="weights")
    s_ref = tuple(jax.tree.map(np.asarray, s) for s in s_ref)
    assert_tree_close(pk.unpack_slots(slots), s_ref, rtol=1e-5, atol=1e-6, what="slots")


@pytest.mark.parametrize("cls, kwargs, _id", ALL, ids=ALL_IDS)
def test_slot_layout_round_trips_exactly(cls, kwargs, _id):
    opt = cls(**kwargs)
    weights = mixed_tree(2)
    pk = packed.Packed(opt, weights)
    slots, _ = opt.tree_init(weights, store_slots=False)
    # Non-trivial slot values, so that misplaced elements would show.
    slots = jax.tree.map(lambda x: x + jnp.arange(x.size).reshape(x.shape), slots)
    back = pk.unpack_slots(pk.pack_slots(slots))
    assert_trees_equal(back, slots)
    pslots = pk.pack_slots(slots)
    assert_trees_equal(pk.pack_slots(pk.unpack_slots(pslots)), pslots)
    # Flat: one group per dtype. Stacked: one per (shape, dtype), here 6.
    assert len(pslots) == (2 if pk.layout == "flat" else 6)


def test_flat_layout_groups_by_dtype():
    weights = mixed_tree(3)
    pk = packed.Packed(treeopt.Adam(), weights)
    assert pk.layout == "flat"
    flats = pk.pack(weights)
    assert [f.dtype for f in flats] == [jnp.float32, jnp.bfloat16]
    assert [f.shape for f in flats] == [
        (12 + 4 + 1 + 4 + 12 + 4 + 12 + 1,),
        (30 + 6 + 30,),
    ]
    assert_trees_equal(pk.unpack(flats), weights)


@pytest.mark.parametrize("cls", [treeopt.Adam, treeopt.Momentum, treeopt.RMSProp])
def test_flat_leaf_alone_in_its_dtype_is_kept_and_equals_per_leaf(cls):
    # Raveled inside the step, the lone leaf's loop compiled differently from
    # the per-leaf one: XLA:CPU contracted the other product of Adam's
    # b1 * m + (1 - b1) * g into an FMA, and m differed in its last bit.
    def tree(seed, scale=1.0):
        rng = np.random.default_rng(seed)

        def r(shape, dtype=np.float32):
            return jnp.asarray(scale * rng.standard_normal(shape), dtype)

        return {"w": r((33, 17)), "b": r((17,)), "emb": r((40, 8), jnp.bfloat16)}

    weights = tree(0)
    pk = packed.Packed(cls(0.05), weights)
    assert [f.shape for f in pk.pack(weights)] == [(33 * 17 + 17,), (40, 8)]
    grads = [tree(1 + k) for k in range(3)]
    (w_leaf, s_leaf), (w_pack, s_pack), _ = run_both(cls(0.05), weights, grads)
    assert_trees_equal(w_pack, w_leaf)
    assert_trees_equal(s_pack, s_leaf)


@pytest.mark.parametrize("cls", [treeopt.Adam, treeopt.Adafactor])
def test_layout_from_shapes_alone_is_the_same(cls):
    weights = mixed_tree(3)
    shapes = jax.eval_shape(lambda: weights)  # jax.ShapeDtypeStruct leaves
    from_arrays, from_shapes = (packed.Packed(cls(), t) for t in (weights, shapes))
    assert_trees_equal(from_shapes.pack(weights), from_arrays.pack(weights))
    with pytest.raises(TypeError, match="not float"):
        packed.Packed(cls(), {"a": jax.ShapeDtypeStruct((2,), jnp.int32)})


@pytest.mark.parametrize("cls", [treeopt.Adam, treeopt.Adafactor])
def test_a_lone_leaf_is_copied_so_donation_keeps_the_callers_array(cls):
    weights = {"w": jnp.ones((4, 3)), "e": jnp.ones((3, 2), jnp.bfloat16)}
    pk = packed.Packed(cls(0.1), weights)
    flat = pk.pack(weights)
    assert all(x is not weights["e"] for x in flat)
    slots, p = pk.init(flat)
    step = jax.jit(lambda w, s, g: pk.update(0, g, w, s, p), donate_argnums=(0, 1))
    new, _ = step(flat, slots, pk.pack(weights))
    leaves = jax.tree.leaves(pk.unpack(new))
    assert all(leaf is not buf for leaf in leaves for buf in new)
    np.testing.assert_array_equal(np.asarray(weights["e"], np.float32), 1.0)


def test_stacked_layout_groups_by_shape_and_dtype():
    weights = mixed_tree(3)
    pk = packed.Packed(treeopt.Adafactor(), weights)
    assert pk.layout == "stacked"
    stacks = pk.pack(weights)
    shapes = sorted((s.shape, str(s.dtype)) for s in stacks)
    assert shapes == sorted(
        [
            ((3, 3, 4), "float32"),
            ((2, 4), "float32"),
            ((2,), "float32"),
            ((2, 5, 2, 3), "bfloat16"),
            ((6,), "bfloat16"),  # alone in its group: kept as it is
            ((2, 2), "float32"),
        ]
    )
    assert_trees_equal(pk.unpack(stacks), weights)


def test_metrics_match_per_leaf():
    opt = treeopt.Adam(0.1, clip_grad_norm=0.5)
    weights, grads = mixed_tree(4), mixed_tree(5)
    slots, p = opt.tree_init(weights, store_slots=False)
    pk = packed.Packed(opt, weights)
    pslots, _ = pk.tree_init(weights)
    leaf = jax.jit(lambda g, w, s: opt.tree_update(0, g, w, s, p, False, True))
    pack = jax.jit(lambda g, w, s: pk.tree_update(0, g, w, s, p, with_metrics=True))
    m_leaf = leaf(grads, weights, slots)[2]
    m_pack = pack(grads, weights, pslots)[2]
    assert set(m_pack) == {"gradients_l2", "weights_l2"}
    for k in m_leaf:
        assert_sum_close(m_pack[k], m_leaf[k], size(weights), what=k)


@settings(max_examples=8)
@given(
    shapes=st.lists(
        st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple),
        min_size=1,
        max_size=6,
    ),
    nesterov=st.booleans(),
)
def test_packed_equals_per_leaf_on_random_trees(shapes, nesterov):
    rng = np.random.default_rng(len(shapes))
    weights = {
        f"p{i}": rng.standard_normal(s).astype(np.float32) for i, s in enumerate(shapes)
    }
    grads = [
        {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in weights.items()}
        for _ in range(2)
    ]
    opt = treeopt.Momentum(0.1, weight_decay_rate=0.01, nesterov=nesterov)
    (w_leaf, s_leaf), (w_pack, s_pack), _ = run_both(opt, weights, grads)
    assert_trees_equal(w_pack, w_leaf)
    assert_trees_equal(s_pack, s_leaf)


def test_mismatched_inputs_raise_clear_errors():
    weights = {"a": jnp.ones((2, 3)), "b": jnp.ones((4,))}
    pk = packed.Packed(treeopt.Adam(), weights)
    slots, p = pk.tree_init(weights)
    with pytest.raises(ValueError, match="shape"):
        pk.tree_update(
            0, {"a": jnp.ones((3, 2)), "b": jnp.ones((4,))}, weights, slots, p
        )
    with pytest.raises(ValueError, match="structure"):
        pk.tree_update(0, {"a": jnp.ones((2, 3))}, weights, slots, p)
    with pytest.raises(ValueError, match="one entry per group"):
        pk.tree_update(0, weights, weights, slots + slots, p)
    with pytest.raises(ValueError, match="entries"):
        pk.pack_slots(slots[:1])
    with pytest.raises(TypeError, match="float"):
        packed.Packed(treeopt.SGD(), {"i": jnp.ones((2,), jnp.int32)})


@pytest.mark.parametrize(
    ("cls", "kwargs", "_id"), ONE_PER_CLASS, ids=[c[2] for c in ONE_PER_CLASS]
)
def test_guarded_packed_step_skips_the_whole_step_like_tree_update(cls, kwargs, _id):
    opt = treeopt.SkipNonFinite(cls(**kwargs))
    w = mixed_tree(30)
    p = packed.Packed(opt, w)
    assert p.layout == packed.Packed(cls(**kwargs), w).layout
    slots_tree, params = opt.tree_init(w, store_slots=False)
    slots = p.pack_slots(slots_tree)
    for bad in (False, True):
        g = mixed_tree(31)
        if bad:  # one NaN in one leaf: no leaf may move
            g["dense"][1] = g["dense"][1].at[2].set(jnp.nan)
        w_ref, s_ref, m_ref = opt.tree_update(
            3, g, w, slots_tree, params, store_slots=False, with_metrics=True
        )
        w_new, s_new, m = p.update(
            3, p.pack(g), p.pack(w), slots, params, with_metrics=True
        )
        assert int(m["skipped_nonfinite"]) == int(m_ref["skipped_nonfinite"]) == bad
        n = size(w)
        assert_reordered_close(p.unpack(w_new), w_ref, [w, w_ref], n, what="weights")
        s_path = [slots_tree, s_ref]
        assert_reordered_close(p.unpack_slots(s_new), s_ref, s_path, n, what="slots")
        if bad:
            assert_trees_equal(p.unpack(w_new), w, what="unchanged")
