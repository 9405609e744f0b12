"""Every case of the table against the float64 reference, over leaves of rank 0-4."""

import jax
import numpy as np
import pytest

import reference
from cases import CASES
from helpers import (
    ATOL_F32,
    RTOL_DELTA,
    RTOL_F32,
    RTOL_SLOTS,
    SHAPES,
    assert_reordered_close,
    assert_tree_close,
    random_grads,
    random_leaves,
    run_treeopt,
    run_treeopt_path,
    size,
)


def _to_layout(slots):
    """Reference slots (lists/tuples of float64) with numpy leaves, Trax layout."""
    return jax.tree.map(np.asarray, slots)


@pytest.mark.parametrize("start_step", [0, 7])
@pytest.mark.parametrize(("cls", "kwargs", "case_id"), CASES, ids=[c[2] for c in CASES])
def test_matches_float64_reference(cls, kwargs, case_id, start_step):
    weights = random_leaves(0)
    grads = random_grads(1)
    w, slots = run_treeopt(cls(**kwargs), weights, grads, start_step=start_step)
    w_ref, slots_ref = reference.run(cls.__name__, kwargs, weights, grads, start_step)

    assert_tree_close(w, w_ref, RTOL_F32, ATOL_F32, what=f"{case_id} weights")
    delta = [np.asarray(a, np.float64) - b for a, b in zip(w, weights, strict=True)]
    delta_ref = [a - b for a, b in zip(w_ref, weights, strict=True)]
    assert_tree_close(delta, delta_ref, RTOL_DELTA, 1e-6, what=f"{case_id} update")
    # Same layout (the treedef of a tuple of per-leaf slots) and values.
    assert_tree_close(
        tuple(slots),
        tuple(_to_layout(slots_ref)),
        RTOL_SLOTS,
        1e-7,
        what=f"{case_id} slots",
    )
    for leaf, s in zip(weights, slots, strict=True):
        assert jax.tree.structure(s) == jax.tree.structure(cls(**kwargs).init(leaf))


@pytest.mark.parametrize(("cls", "kwargs", "case_id"), CASES, ids=[c[2] for c in CASES])
def test_eager_equals_jit(cls, kwargs, case_id):
    weights = random_leaves(2)
    grads = random_grads(3, steps=3)
    w_path, s_path = run_treeopt_path(cls(**kwargs), weights, grads, jit=True)
    w_eager, s_eager = run_treeopt(cls(**kwargs), weights, grads, jit=False)
    # Eager runs each operation alone; jit fuses them (and may contract a
    # product and a sum into an FMA): the same math in another order.
    n = size(weights)
    assert_reordered_close(w_eager, w_path[-1], w_path, n, what="weights")
    assert_reordered_close(s_eager, s_path[-1], s_path, n, what="slots")


def test_shapes_cover_ranks_zero_to_four():
    assert {len(s) for s in SHAPES} == {0, 1, 2, 3, 4}


@pytest.mark.parametrize(("cls", "kwargs", "case_id"), CASES, ids=[c[2] for c in CASES])
@pytest.mark.parametrize("shape", [(), (5,), (3, 3), (4, 3), (2, 2, 2), (2, 3, 4, 5)])
def test_declared_slot_axes_match_the_slots_init_creates(cls, kwargs, case_id, shape):
    opt = cls(**kwargs)
    slots = jax.eval_shape(opt.init, jax.ShapeDtypeStruct(shape, np.float32))
    declared = [tuple(shape[a] for a in axes) for axes in opt.slot_axes(len(shape))]
    assert declared == [x.shape for x in jax.tree.leaves(slots)], case_id
    for axes in opt.slot_axes(len(shape)):
        assert list(axes) == sorted(set(axes)), "axes in order, each once"
