"""SGD: golden step, optax cross-check, errors."""

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
    size,
)


def test_golden_step():
    opt = treeopt.SGD(learning_rate=0.5)
    slots, p = opt.tree_init([jnp.array([1.0, -2.0])])
    assert slots == (None,)
    (w,), _ = opt.tree_update(
        0, [jnp.array([0.2, 4.0])], [jnp.array([1.0, -2.0])], slots, p
    )
    # w - lr*g = [1 - 0.1, -2 - 2] = [0.9, -4.0]
    np.testing.assert_allclose(w, [0.9, -4.0], rtol=1e-7)


def test_default_learning_rate_is_trax_default():
    assert float(treeopt.SGD().opt_params["learning_rate"]) == pytest.approx(0.01)


@pytest.mark.parametrize("clip", [None, 0.7])
def test_matches_optax_sgd(clip):
    weights, grads = random_leaves(5), random_grads(6, steps=4)
    path, _ = run_treeopt_path(treeopt.SGD(0.1, clip_grad_norm=clip), weights, grads)
    tx = optax.sgd(0.1)
    if clip is not None:
        tx = optax.chain(optax.clip_by_global_norm(clip), tx)
    params = run_optax(tx, weights, grads)
    assert_reordered_close(params, path[-1], path, size(weights))


def test_sgd_accepts_extra_opt_params_like_trax():
    opt = treeopt.SGD(learning_rate=0.1, my_param=3.0)
    assert float(opt.opt_params["my_param"]) == 3.0
