"""SM3: golden step, layout, Trax bug fixes, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import treeopt
from treeopt import MomentumType

import cases
import helpers
import reference


def test_momentum_type_enum_values():
    assert [(m.name, int(m)) for m in MomentumType] == [
        ("EMA", 1),
        ("HEAVY_BALL", 2),
        ("NESTEROV", 3),
    ]
    assert treeopt.sm3.MomentumType is MomentumType


def test_golden_sketched_step():
    opt = treeopt.SM3(learning_rate=1.0, momentum=0.0)
    w0 = [jnp.zeros((2, 2))]
    g = jnp.array([[3.0, 0.0], [0.0, 4.0]])
    slots, p = opt.tree_init(w0)
    (w,), ((m, v1s, v2s),) = opt.tree_update(0, [g], w0, slots, p)
    # acc = 0 + g^2 = [[9, 0], [0, 16]]; pg = g / sqrt(acc) where acc > 0 else 0
    # = [[1, 0], [0, 1]]; v1s[0] = row max = [9, 16], v1s[1] = column max = [9, 16].
    assert m == [] and v2s == []
    np.testing.assert_allclose(v1s[0], [9.0, 16.0])
    np.testing.assert_allclose(v1s[1], [9.0, 16.0])
    np.testing.assert_allclose(w, [[-1.0, 0.0], [0.0, -1.0]], rtol=1e-6)


def test_slot_layout():
    w = jnp.zeros((2, 3, 4))
    m, v1s, v2s = treeopt.SM3().init(w)
    assert m.shape == w.shape
    assert [v.shape for v in v1s] == [(2,), (3,), (4,)] and v2s == []
    m, v1s, v2s = treeopt.SM3(momentum=0.0, second_moment_averaging=0.5).init(w)
    assert m == [] and [v.shape for v in v2s] == [(2,), (3,), (4,)]


def test_rank_zero_weight_works():
    # Trax raised IndexError here.
    opt = treeopt.SM3(learning_rate=0.1)
    w0 = [jnp.asarray(2.0)]
    slots, p = opt.tree_init(w0)
    assert [v.shape for v in slots[0][1]] == [()]
    (w,), _ = opt.tree_update(0, [jnp.asarray(0.5)], w0, slots, p)
    # acc = 0.25, pg = 0.5 / 0.5 = 1, EMA m = 0.1 * 1, w = 2 - 0.1 * 0.1.
    np.testing.assert_allclose(w, 1.99, rtol=1e-6)


def test_update_does_not_mutate_its_slot_lists():
    opt = treeopt.SM3(second_moment_averaging=0.9)
    w = jnp.ones((2, 3))
    slots = opt.init(w)
    v1s, v2s = slots[1], slots[2]
    before = ([np.asarray(v) for v in v1s], [np.asarray(v) for v in v2s])
    ids = [id(v) for v in v1s + v2s]
    opt.update(0, jnp.ones((2, 3)), w, slots, opt.opt_params)
    assert [id(v) for v in v1s + v2s] == ids
    for old, new in zip(before[0] + before[1], v1s + v2s, strict=True):
        np.testing.assert_array_equal(old, new)


def test_bfloat16_weights_compute_in_float32_and_keep_slot_dtypes():
    w = [jnp.ones((3, 2), jnp.bfloat16)]
    opt = treeopt.SM3(second_moment_averaging=0.9)
    slots, p = opt.tree_init(w)
    g = [jnp.full((3, 2), 0.5, jnp.bfloat16)]
    for k in range(2):
        w, slots = opt.tree_update(k, g, w, slots, p)
    assert w[0].dtype == jnp.bfloat16
    m, v1s, v2s = slots[0]
    assert {x.dtype for x in [m, *v1s, *v2s]} == {jnp.dtype(jnp.bfloat16)}
    w_ref, _ = reference.run(
        "SM3",
        {"second_moment_averaging": 0.9},
        [np.ones((3, 2))],
        [[np.full((3, 2), 0.5)]] * 2,
    )
    np.testing.assert_allclose(np.float32(w[0]), w_ref[0], rtol=1e-2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"momentum": 1.0}, r"momentum must be in \[0, 1\)"),
        ({"momentum": -0.1}, "momentum must be"),
        (
            {"second_moment_averaging": 0.0},
            r"second_moment_averaging must be in \(0, 1\]",
        ),
        ({"second_moment_averaging": 1.1}, "second_moment_averaging must be"),
        ({"weight_decay": -1e-4}, "weight_decay must be"),
        ({"momentum_type": 4}, r"momentum_type must be one of \['EMA'"),
        ({"momentum_type": "nesterov"}, "momentum_type must be"),
        ({"learning_rate": -1.0}, "learning_rate must be"),
    ],
)
def test_invalid_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        treeopt.SM3(**kwargs)


def test_momentum_type_accepts_trax_ints():
    assert treeopt.SM3(momentum_type=3).momentum_type is MomentumType.NESTEROV


SM3_CASES = [c for c in cases.CASES if c[0] is treeopt.SM3]


@pytest.mark.parametrize(
    "cls, kwargs, case_id", SM3_CASES, ids=[c[2] for c in SM3_CASES]
)
def test_one_pass_per_axis_equals_the_shared_accumulator(
    monkeypatch, cls, kwargs, case_id
):
    # Large leaves take one fused pass over g per axis maximum, small ones share
    # one accumulator; both must give the same bits.
    weights = helpers.random_leaves(0)
    grads = helpers.random_grads(1)
    results = []
    for min_size in (0, 1 << 62):
        monkeypatch.setattr(treeopt.sm3, "_SEPARATE_PASSES_MIN_SIZE", min_size)
        results.append(helpers.run_treeopt(cls(**kwargs), weights, grads))
    (w_sep, s_sep), (w_shared, s_shared) = results
    for a, b in zip(
        jax.tree.leaves((w_sep, s_sep)),
        jax.tree.leaves((w_shared, s_shared)),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
