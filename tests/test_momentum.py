"""Momentum: golden steps, optax cross-checks, errors."""

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


@pytest.mark.parametrize(("nesterov", "expected"), [(True, 0.81), (False, 0.9)])
def test_golden_step(nesterov, expected):
    opt = treeopt.Momentum(0.1, mass=0.9, weight_decay_rate=0.0, nesterov=nesterov)
    w0 = [jnp.array([1.0])]
    slots, p = opt.tree_init(w0)
    (w,), (v,) = opt.tree_update(0, [jnp.array([1.0])], w0, slots, p)
    # v = 0.9*0 + 1 = 1; nesterov u = 0.9*1 + 1 = 1.9 -> w = 1 - 0.19 = 0.81;
    # heavy ball u = v = 1 -> w = 0.9.
    np.testing.assert_allclose(v, [1.0])
    np.testing.assert_allclose(w, [expected], rtol=1e-6)


def test_defaults_are_trax_defaults():
    opt = treeopt.Momentum()
    p = {k: pytest.approx(float(v)) for k, v in opt.opt_params.items()}
    assert p == {"learning_rate": 0.01, "mass": 0.9, "weight_decay_rate": 1e-5}
    assert opt.nesterov is True


@pytest.mark.parametrize("nesterov", [True, False])
def test_matches_optax_sgd_momentum(nesterov):
    weights, grads = random_leaves(11), random_grads(12, steps=6)
    opt = treeopt.Momentum(0.1, mass=0.8, weight_decay_rate=0.0, nesterov=nesterov)
    path, _ = run_treeopt_path(opt, weights, grads)
    tx = optax.sgd(0.1, momentum=0.8, nesterov=nesterov)
    params = run_optax(tx, weights, grads)
    assert_reordered_close(params, path[-1], path)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mass": 1.0}, r"mass must be in \[0, 1\)"),
        ({"mass": -0.5}, "mass must be"),
        ({"weight_decay_rate": -1e-3}, "weight_decay_rate must be"),
        ({"nesterov": "yes"}, "nesterov must be a bool"),
        ({"learning_rate": -0.01}, "learning_rate must be"),
    ],
)
def test_invalid_hyperparameters(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        treeopt.Momentum(**kwargs)
