"""Adam: golden step, optax cross-checks, dtypes, errors."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import treeopt

import reference
from helpers import (
    assert_reordered_close,
    random_grads,
    random_leaves,
    run_optax,
    run_treeopt,
    run_treeopt_path,
)


def test_golden_step():
    opt = treeopt.Adam(learning_rate=0.1, weight_decay_rate=0.0, eps=0.0)
    w0 = [jnp.array([1.0, 2.0])]
    slots, p = opt.tree_init(w0)
    (w,), ((m, v),) = opt.tree_update(0, [jnp.array([0.5, -2.0])], w0, slots, p)
    # m = 0.1 g, v = 0.001 g^2; mhat = g, vhat = g^2; step = lr * sign(g).
    np.testing.assert_allclose(m, [0.05, -0.2], rtol=1e-6)
    # 1 - 0.999 in float32 is 9.99987e-4: a 1.3e-5 relative offset.
    np.testing.assert_allclose(v, [0.00025, 0.004], rtol=2e-5)
    np.testing.assert_allclose(w, [0.9, 2.1], rtol=1e-6)


def test_defaults_are_trax_defaults():
    p = treeopt.Adam().opt_params
    expected = dict(
        learning_rate=1e-4, weight_decay_rate=1e-5, b1=0.9, b2=0.999, eps=1e-5
    )
    assert {k: pytest.approx(float(v)) for k, v in p.items()} == expected
    assert treeopt.Adam().clip_grad_norm is None


@pytest.mark.parametrize("weight_decay_rate", [0.0, 0.01])
def test_matches_optax_adam_and_adamw(weight_decay_rate):
    lr, b1, b2, eps = 0.05, 0.8, 0.99, 1e-6
    weights, grads = random_leaves(7), random_grads(8, steps=6)
    opt = treeopt.Adam(lr, weight_decay_rate, b1, b2, eps)
    path, _ = run_treeopt_path(opt, weights, grads)
    # treeopt decays (1 - wd) w; optax.adamw subtracts lr * wd' * w: wd' = wd / lr.
    tx = optax.adamw(lr, b1, b2, eps, weight_decay=weight_decay_rate / lr)
    params = run_optax(tx, weights, grads)
    assert_reordered_close(params, path[-1], path)


def test_bfloat16_weights_compute_in_float32():
    # In bfloat16, b2 = 0.999 rounds to 1.0, so v would stay 0 and steps blow up.
    w0 = np.array([1.0, -1.0, 0.5], np.float32)
    g = np.array([0.3, -0.2, 0.1], np.float32)
    opt = treeopt.Adam(learning_rate=0.01)
    w, slots = run_treeopt(opt, [jnp.asarray(w0, jnp.bfloat16)], [[g]] * 3)
    assert w[0].dtype == jnp.bfloat16
    assert slots[0][0].dtype == jnp.bfloat16 and slots[0][1].dtype == jnp.bfloat16
    w_ref, _ = reference.run(
        "Adam",
        {"learning_rate": 0.01},
        [np.float32(jnp.asarray(w0, jnp.bfloat16))],
        [[np.float32(jnp.asarray(g, jnp.bfloat16))]] * 3,
    )
    np.testing.assert_allclose(np.float32(w[0]), w_ref[0], rtol=1e-2)


def test_float64_under_x64_matches_reference_tightly(x64):
    weights = random_leaves(9, dtype=np.float64)
    grads = random_grads(10, steps=3, dtype=np.float64)
    kwargs = {"learning_rate": 0.05}
    w, _ = run_treeopt(treeopt.Adam(**kwargs), weights, grads)
    assert all(x.dtype == jnp.float64 for x in w)
    # opt_params are float32 arrays: the reference gets the same rounded values.
    params = {k: float(v) for k, v in treeopt.Adam(**kwargs).opt_params.items()}
    w_ref, _ = reference.run("Adam", params, weights, grads)
    for a, b in zip(w, w_ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"b1": 1.0}, r"b1 must be in \[0, 1\), got 1.0"),
        ({"b1": -0.1}, "b1 must be"),
        ({"b2": 1.5}, "b2 must be"),
        ({"eps": -1e-8}, "eps must be"),
        ({"weight_decay_rate": 2.0}, "weight_decay_rate must be"),
        ({"learning_rate": -1.0}, "learning_rate must be"),
        ({"clip_grad_norm": 0}, "clip_grad_norm must be"),
    ],
)
def test_invalid_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        treeopt.Adam(**kwargs)
