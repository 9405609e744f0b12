"""Adafactor: golden step, layout, dtypes, Trax bug fixes, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import treeopt

import reference
from cases import BF16_MOMENTUM
from helpers import needs_float16, random_grads, random_leaves, run_treeopt


def test_golden_unfactored_step():
    opt = treeopt.Adafactor(
        learning_rate=0.1,
        multiply_by_parameter_scale=False,
        do_clipping=False,
        weight_decay_rate=0.0,
        epsilon1=0.0,
    )
    w0 = [jnp.array([1.0, 1.0])]
    slots, p = opt.tree_init(w0)
    (w,), ([v],) = opt.tree_update(0, [jnp.array([2.0, -0.5])], w0, slots, p)
    # t = 1: rho = 1 - 1**-0.8 = 0, so v = g^2 and y = g / |g| = sign(g).
    np.testing.assert_allclose(v, [4.0, 0.25])
    np.testing.assert_allclose(w, [0.9, 1.1], rtol=1e-6)


def test_golden_factored_step():
    opt = treeopt.Adafactor(
        learning_rate=1.0,
        multiply_by_parameter_scale=False,
        do_clipping=False,
        weight_decay_rate=0.0,
        epsilon1=0.0,
    )
    w0 = [jnp.zeros((2, 2))]
    g = jnp.array([[1.0, 1.0], [2.0, 2.0]])
    slots, p = opt.tree_init(w0)
    (w,), ([v_row, v_col],) = opt.tree_update(0, [g], w0, slots, p)
    # v_row = mean(g^2, -1) = [1, 4]; v_col = mean(g^2, -2) = [2.5, 2.5];
    # y_ij = g_ij * sqrt(mean(v_row) / v_row_i) / sqrt(v_col_j), mean(v_row) = 2.5:
    # row 0: 1 * sqrt(2.5 / 1) / sqrt(2.5) = 1;
    # row 1: 2 * sqrt(2.5 / 4) / sqrt(2.5) = 1.
    np.testing.assert_allclose(v_row, [1.0, 4.0])
    np.testing.assert_allclose(v_col, [2.5, 2.5])
    np.testing.assert_allclose(w, -np.ones((2, 2)), rtol=1e-6)


def test_slot_layout():
    w = jnp.zeros((2, 3, 4), jnp.bfloat16)
    v_row, v_col = treeopt.Adafactor().init(w)
    assert (v_row.shape, v_col.shape) == ((2, 3), (2, 4))
    assert v_row.dtype == v_col.dtype == jnp.float32
    slots = treeopt.Adafactor(do_momentum=True, momentum_in_bfloat16=True).init(w)
    assert isinstance(slots, list) and len(slots) == 3
    assert slots[2].dtype == jnp.bfloat16 and slots[2].shape == w.shape
    (v,) = treeopt.Adafactor(factored=False).init(w)
    assert v.shape == w.shape and v.dtype == jnp.float32
    (v,) = treeopt.Adafactor().init(jnp.zeros(5, jnp.bfloat16))
    assert v.shape == (5,) and v.dtype == jnp.float32


def test_defaults_are_trax_defaults():
    opt = treeopt.Adafactor()
    expected = dict(
        learning_rate=0.05,
        beta1=0.0,
        decay_rate=0.8,
        clipping_threshold=1.0,
        weight_decay_rate=1e-5,
        weight_decay_n_steps=0.0,
        epsilon1=1e-16,
        epsilon2=1e-3,
    )
    assert {k: pytest.approx(float(v)) for k, v in opt.opt_params.items()} == expected
    assert (opt.factored, opt.multiply_by_parameter_scale, opt.do_clipping) == (
        True,
        True,
        True,
    )
    assert (opt.do_momentum, opt.momentum_in_bfloat16) == (False, False)


def test_none_options_fixed_from_trax():
    # Trax raised in the constructor for these documented values.
    opt = treeopt.Adafactor(clipping_threshold=None, weight_decay_n_steps=None)
    assert not opt.do_clipping
    assert float(opt.opt_params["weight_decay_n_steps"]) == 0.0


def test_bfloat16_momentum_matches_reference_at_bfloat16_tolerance():
    cls, kwargs, _ = BF16_MOMENTUM
    weights, grads = random_leaves(21), random_grads(22, steps=4)
    w, slots = run_treeopt(cls(**kwargs), weights, grads)
    w_ref, slots_ref = reference.run("Adafactor", kwargs, weights, grads)
    for a, b in zip(w, w_ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-2)
    for s, s_ref in zip(slots, slots_ref, strict=True):
        assert s[-1].dtype == jnp.bfloat16
        np.testing.assert_allclose(np.float32(s[-1]), s_ref[-1], rtol=2e-2, atol=1e-2)


@needs_float16
def test_bfloat16_weights_keep_float32_statistics_across_updates():
    w = [jnp.ones((3, 4), jnp.bfloat16), jnp.ones(3, jnp.float16)]
    g = [jnp.full((3, 4), 0.1, jnp.bfloat16), jnp.full(3, 0.1, jnp.float16)]
    opt = treeopt.Adafactor(do_momentum=True)
    slots, p = opt.tree_init(w)
    for k in range(3):
        w, slots = opt.tree_update(k, g, w, slots, p)
    assert [x.dtype for x in w] == [jnp.bfloat16, jnp.float16]
    assert [x.dtype for x in jax.tree.leaves(slots)] == [
        jnp.float32,
        jnp.float32,
        jnp.bfloat16,
        jnp.float32,
        jnp.float16,
    ]


def test_weight_decay_n_steps_schedule():
    # With zero learning rate only weight decay acts: w_T = prod (1 - wd_k) w_0,
    # wd_k = 0.1 * max(4 - k, 0) / 4 -> 0.1, 0.075, 0.05, 0.025, 0, 0.
    opt = treeopt.Adafactor(
        learning_rate=0.0, weight_decay_rate=0.1, weight_decay_n_steps=4
    )
    w, _ = run_treeopt(opt, [np.ones(2, np.float32)], [[np.ones(2, np.float32)]] * 6)
    np.testing.assert_allclose(w[0], [0.9 * 0.925 * 0.95 * 0.975] * 2, rtol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"beta1": 1.0}, r"beta1 must be in \[0, 1\)"),
        ({"decay_rate": -0.8}, "decay_rate must be"),
        ({"decay_rate": 1.5}, "decay_rate must be"),
        ({"clipping_threshold": 0.0}, "clipping_threshold must be"),
        ({"weight_decay_rate": -1.0}, "weight_decay_rate must be"),
        ({"weight_decay_n_steps": -3}, "weight_decay_n_steps must be"),
        ({"epsilon1": -1e-30}, "epsilon1 must be"),
        ({"epsilon2": -1.0}, "epsilon2 must be"),
        ({"learning_rate": -0.05}, "learning_rate must be"),
        ({"factored": 1}, "factored must be a bool"),
    ],
)
def test_invalid_hyperparameters(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        treeopt.Adafactor(**kwargs)
