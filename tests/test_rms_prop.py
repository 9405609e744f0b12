"""RMSProp: golden step, optax cross-check, errors."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import treeopt

from helpers import (
    assert_reordered_close,
    random_grads,
    random_leaves,
    run_optax,
    run_treeopt_path,
)


def test_golden_step():
    opt = treeopt.RMSProp(learning_rate=0.1, gamma=0.5, eps=0.0)
    w0 = [jnp.array([2.0])]
    slots, p = opt.tree_init(w0)
    np.testing.assert_array_equal(slots[0], [1.0])  # ones, not zeros (Trax)
    (w,), (a,) = opt.tree_update(0, [jnp.array([3.0])], w0, slots, p)
    # a = 0.5*1 + 0.5*9 = 5; w = 2 - 0.1 * 3 / sqrt(5)
    np.testing.assert_allclose(a, [5.0])
    np.testing.assert_allclose(w, [2.0 - 0.3 / np.sqrt(5.0)], rtol=1e-6)


def test_defaults_are_trax_defaults():
    p = {k: pytest.approx(float(v)) for k, v in treeopt.RMSProp().opt_params.items()}
    assert p == {"learning_rate": 1e-3, "gamma": 0.9, "eps": 1e-8}


def test_matches_optax_rmsprop_with_initial_scale_one():
    weights, grads = random_leaves(13), random_grads(14, steps=6)
    opt = treeopt.RMSProp(0.05, gamma=0.8, eps=1e-6)
    path, _ = run_treeopt_path(opt, weights, grads)
    tx = optax.rmsprop(0.05, decay=0.8, eps=1e-6, initial_scale=1.0, eps_in_sqrt=False)
    params = run_optax(tx, weights, grads)
    assert_reordered_close(params, path[-1], path)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"gamma": 1.0}, r"gamma must be in \[0, 1\)"),
        ({"gamma": -0.1}, "gamma must be"),
        ({"eps": -1.0}, "eps must be"),
        ({"clip_grad_norm": -2.0}, "clip_grad_norm must be"),
    ],
)
def test_invalid_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        treeopt.RMSProp(**kwargs)
