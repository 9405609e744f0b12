"""treeopt.optax.to_optax: the class API's math, inside optax and Flax loops."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

import treeopt
from treeopt.optax import TreeoptState, to_optax

from cases import BF16_MOMENTUM, CASES
from helpers import (
    assert_reordered_close,
    assert_trees_equal,
    needs_float16,
    size,
)

ALL_CASES = [*CASES, BF16_MOMENTUM]
STEPS = 8


def _tree(seed, dtypes=None):
    """A dict of leaves of rank 1 and 2, one of them bfloat16 (the per-leaf math
    of every rank is tested with the core; here the tree plumbing is)."""
    rng = np.random.default_rng(seed)
    shapes = {"v": (5,), "m": (3, 4), "h": (2, 3)}
    dtypes = dtypes or {"h": jnp.bfloat16}
    return {
        k: jnp.asarray(rng.standard_normal(s), dtypes.get(k, jnp.float32))
        for k, s in shapes.items()
    }


def _grads(seed, steps=STEPS):
    """Gradients stacked along a leading step axis, in the weights' dtypes."""
    per_step = [_tree(seed + 100 * k) for k in range(steps)]
    return jax.tree.map(lambda *g: jnp.stack(g), *per_step)


def _path(start, stacked):
    """``[start, x_1, ..., x_T]`` from a scan's stacked outputs."""
    steps = jax.tree.leaves(stacked)[0].shape[0]
    return [start] + [jax.tree.map(lambda x, k=k: x[k], stacked) for k in range(steps)]


def _class_loop(opt, weights, grads, lrs=None):
    """Reference: ``tree_update`` once per gradient, the step traced (as in
    ``to_optax``), optionally with a new learning rate each step. Returns the
    final ``(w, slots)`` and the weights after every step (``_path``)."""
    slots, opt_params = opt.tree_init(weights, store_slots=False)
    steps = jax.tree.leaves(grads)[0].shape[0]
    lrs = jnp.full(steps, opt_params["learning_rate"]) if lrs is None else lrs

    def body(carry, xs):
        w, slots = carry
        k, g, lr = xs
        params = {**opt_params, "learning_rate": lr}
        w, slots = opt.tree_update(k, g, w, slots, params, store_slots=False)
        return (w, slots), (w, slots)

    xs = (jnp.arange(steps), grads, jnp.asarray(lrs, jnp.float32))
    start = (weights, slots)
    (w, slots), ys = jax.lax.scan(body, start, xs)
    w_path, s_path = zip(*_path(start, ys), strict=True)
    return w, slots, list(w_path), list(s_path)


def _optax_loop(tx, weights, grads):
    state = tx.init(weights)

    def body(carry, g):
        w, state = carry
        updates, state = tx.update(g, state, w)
        w = optax.apply_updates(w, updates)
        return (w, state), w

    (w, state), ws = jax.lax.scan(body, (weights, state), grads)
    return w, state, _path(weights, ws)


def _assert_lands(applied, new, old, what):
    """``applied == new`` bit for bit where ``new`` is within a factor 2 of
    ``old`` (there ``new - old`` is exact: Sterbenz), else within the one
    rounding of the update that optax's ``params + updates`` form may cost."""
    for a, n, o in zip(*map(jax.tree.leaves, (applied, new, old)), strict=True):
        assert a.dtype == n.dtype, what
        a, n, o = (np.asarray(x, np.float64) for x in (a, n, o))
        near = (n / o >= 0.5) & (n / o <= 2)
        np.testing.assert_array_equal(a[near], n[near], what)
        ulp = np.spacing(np.maximum(np.abs(n), np.abs(o)).astype(np.float32))
        assert np.all(np.abs(a - n)[~near] <= ulp[~near]), what


@pytest.mark.parametrize(
    ("cls", "kwargs", "case_id"), ALL_CASES, ids=[c[2] for c in ALL_CASES]
)
def test_each_step_equals_class_api(cls, kwargs, case_id):
    # Teacher forcing: at each step both APIs start from the class API's state,
    # so every step is compared exactly, with no drift between the two.
    opt = cls(**kwargs)
    tx = to_optax(opt)
    w, grads = _tree(0), _grads(1)
    slots, opt_params = opt.tree_init(w, store_slots=False)
    for k in range(STEPS):
        g = jax.tree.map(lambda x, k=k: x[k], grads)
        state = TreeoptState(jnp.int32(k), slots, opt_params, jnp.int32(0))
        updates, state = tx.update(g, state, w)
        w_new, slots = opt.tree_update(k, g, w, slots, opt_params, store_slots=False)
        _assert_lands(optax.apply_updates(w, updates), w_new, w, f"{case_id} {k}")
        assert_trees_equal(state.slots, slots, f"{case_id} slots {k}")
        assert int(state.count) == k + 1 and int(state.skipped) == 0
        w = w_new


@pytest.mark.parametrize(
    ("cls", "kwargs", "case_id"),
    [BF16_MOMENTUM],
    ids=[BF16_MOMENTUM[2]],
)
def test_jitted_loop_matches_class_api(cls, kwargs, case_id):
    weights, grads = _tree(0), _grads(1)
    w_ref, slots_ref, w_path, s_path = jax.jit(
        lambda w, g: _class_loop(cls(**kwargs), w, g)
    )(weights, grads)
    w, state, _ = jax.jit(lambda w, g: _optax_loop(to_optax(cls(**kwargs)), w, g))(
        weights, grads
    )
    n = size(weights)
    assert_reordered_close(w, w_ref, w_path, n, f"{case_id} weights")
    assert_reordered_close(state.slots, slots_ref, s_path, n, f"{case_id} slots")
    assert int(state.count) == STEPS


def _neighbours(u, n=8):
    """``u`` and its ``n`` nearest floats on each side."""
    out, up, down = [u], u, u
    for _ in range(n):
        up = jnp.nextafter(up, jnp.asarray(jnp.inf, u.dtype))
        down = jnp.nextafter(down, jnp.asarray(-jnp.inf, u.dtype))
        out += [up, down]
    return out


class _Jump(treeopt.Optimizer):
    """Its new weights are its "gradient": lets a test pick the new weights."""

    def init(self, weights):
        return None

    def update(self, step, grads, weights, slots, opt_params):
        return grads, None


def _old_new_pairs(dtype, n=5000):
    # From tiny relative steps to sign changes and jumps of orders of magnitude.
    rng = np.random.default_rng(0)
    old = rng.standard_normal(n) * 10.0 ** rng.integers(-3, 3, n)
    rel = rng.standard_normal(n) * 10.0 ** rng.integers(-9, 2, n)
    return jnp.asarray(old, dtype), jnp.asarray(old * (1 + rel), dtype)


def _applied(old, new):
    tx = to_optax(_Jump())
    updates, _ = tx.update(new, tx.init(old), old)
    return optax.apply_updates(old, updates)


def test_float32_updates_land_on_new_weights_whenever_a_float_can():
    old, new = _old_new_pairs(jnp.float32)
    possible = jnp.zeros(old.shape, bool)
    for u in _neighbours(new - old, 4):
        possible |= optax.apply_updates(old, u) == new
    got = _applied(old, new) == new
    assert bool(jnp.all(got == possible)), int(jnp.sum(got != possible))
    # Sterbenz: within a factor 2 the plain difference is exact.
    near = (new / old >= 0.5) & (new / old <= 2)
    assert bool(jnp.all(got[near]))
    assert int(jnp.sum(got)) > 0.9 * old.size


@pytest.mark.parametrize(
    "dtype", [jnp.bfloat16, pytest.param(jnp.float16, marks=needs_float16)]
)
def test_low_precision_updates_land_exactly(dtype):
    old, new = _old_new_pairs(dtype)
    applied = _applied(old, new)
    assert applied.dtype == dtype
    assert_trees_equal(applied, new, str(dtype))


def test_update_without_params_raises():
    tx = to_optax(treeopt.Adam())
    w = _tree(0)
    with pytest.raises(ValueError, match="needs params"):
        tx.update(w, tx.init(w))


def test_rejects_a_non_treeopt_optimizer():
    with pytest.raises(TypeError, match=r"expects a treeopt\.Optimizer"):
        to_optax(optax.adam(1e-3))


def test_state_layout():
    opt = treeopt.Adafactor(do_momentum=True)
    w = _tree(0)
    state = to_optax(opt).init(w)
    slots, opt_params = opt.tree_init(w, store_slots=False)
    assert isinstance(state, TreeoptState)
    assert state._fields == ("count", "slots", "opt_params", "skipped")
    assert state.count.dtype == jnp.int32 and state.skipped.dtype == jnp.int32
    assert jax.tree.structure(state.slots) == jax.tree.structure(slots)
    assert state.opt_params.keys() == opt_params.keys()


def test_learning_rate_set_in_the_state_without_retracing():
    # optax.tree_utils.tree_set reaches opt_params inside any optax state.
    opt, weights, grads = treeopt.Adam(0.1), _tree(0), _grads(1, steps=4)
    lrs = [0.1, 0.05, 0.02, 0.3]
    tx = optax.chain(optax.identity(), to_optax(opt))
    traces = []

    @jax.jit
    def step(w, state, g, lr):
        traces.append(1)
        state = optax.tree_utils.tree_set(state, learning_rate=lr)
        updates, state = tx.update(g, state, w)
        return optax.apply_updates(w, updates), state

    w, state = weights, tx.init(weights)
    for k, lr in enumerate(lrs):
        g = jax.tree.map(lambda x, k=k: x[k], grads)
        w, state = step(w, state, g, jnp.float32(lr))
    assert len(traces) == 1
    w_ref, _, path, _ = _class_loop(opt, weights, grads, lrs)
    assert_reordered_close(w, w_ref, path, what="lr through the state")
    assert float(state[1].opt_params["learning_rate"]) == pytest.approx(0.3)


def test_learning_rate_schedule():
    opt, weights, grads = treeopt.Momentum(0.1), _tree(0), _grads(1, steps=5)

    def schedule(count):
        return 0.1 / (1.0 + count)

    w, state, _ = jax.jit(lambda w, g: _optax_loop(to_optax(opt, schedule), w, g))(
        weights, grads
    )
    lrs = [np.float32(0.1) / np.float32(1 + k) for k in range(5)]
    w_ref, _, path, _ = _class_loop(opt, weights, grads, lrs)
    assert_reordered_close(w, w_ref, path, what="schedule")
    assert float(state.opt_params["learning_rate"]) == pytest.approx(0.1 / 5)


def test_chain_with_clip_by_global_norm():
    # optax clips first; treeopt then sees the clipped gradients.
    opt, weights = treeopt.Adam(0.05), _tree(0, dtypes={"h": jnp.float32})
    grads = jax.tree.map(lambda g: 10 * g.astype(jnp.float32), _grads(1))
    tx = optax.chain(optax.clip_by_global_norm(1.0), to_optax(opt))
    w, _, _ = jax.jit(lambda w, g: _optax_loop(tx, w, g))(weights, grads)

    def clip64(tree):
        leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]
        norm = np.sqrt(sum(np.sum(x * x) for x in leaves))
        scale = min(1.0, 1.0 / norm)
        return jax.tree.map(lambda x: np.asarray(x, np.float64) * scale, tree)

    clipped = jax.tree.map(
        lambda *xs: jnp.stack(xs),
        *[
            jax.tree.map(
                lambda c, g: jnp.asarray(c, g.dtype),
                clip64(jax.tree.map(lambda x, k=k: x[k], grads)),
                jax.tree.map(lambda x, k=k: x[k], grads),
            )
            for k in range(STEPS)
        ],
    )
    w_ref, _, path, _ = _class_loop(opt, weights, clipped)
    # optax's float32 norm against the float64 one: a sum over every element.
    assert_reordered_close(w, w_ref, path, size(weights), "clipped by optax")


def test_multi_steps_equals_steps_on_averaged_gradients():
    k_steps, outer = 3, 3
    opt = treeopt.Adam(0.05)
    weights = _tree(0, dtypes={"h": jnp.float32})
    grads = _grads(1, steps=k_steps * outer)
    grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
    tx = optax.MultiSteps(to_optax(opt), every_k_schedule=k_steps)

    @jax.jit
    def step(w, state, g):
        updates, state = tx.update(g, state, w)
        return optax.apply_updates(w, updates), state

    w, state = weights, tx.init(weights)
    for i in range(k_steps * outer):
        w_before = w
        w, state = step(w, state, jax.tree.map(lambda x, i=i: x[i], grads))
        if i % k_steps != k_steps - 1:
            assert_trees_equal(w, w_before, "MultiSteps between emits")
    mean = jax.tree.map(
        lambda g: jnp.asarray(
            np.asarray(g, np.float64).reshape(outer, k_steps, *g.shape[1:]).mean(1),
            jnp.float32,
        ),
        grads,
    )
    w_ref, _, path, _ = _class_loop(opt, weights, mean)
    # MultiSteps averages k float32 gradients: a sum of k terms in each step.
    assert_reordered_close(w, w_ref, path, k_steps, "MultiSteps")
    assert int(state.inner_opt_state.count) == outer


def test_masked_leaves_are_left_to_optax():
    opt, weights, grads = treeopt.SM3(0.1), _tree(0), _grads(1, steps=3)
    mask = {k: k != "v" for k in weights}
    tx = optax.chain(
        optax.masked(to_optax(opt), mask),
        optax.masked(optax.sgd(0.5), {k: not m for k, m in mask.items()}),
    )
    w, _, _ = jax.jit(lambda w, g: _optax_loop(tx, w, g))(weights, grads)
    inner = {k: v for k, v in weights.items() if mask[k]}
    inner_grads = {k: v for k, v in grads.items() if mask[k]}
    w_ref, _, path, _ = _class_loop(opt, inner, inner_grads)
    assert_reordered_close({k: w[k] for k in inner}, w_ref, path, what="masked-in")
    np.testing.assert_allclose(
        w["v"], weights["v"] - 0.5 * grads["v"].sum(0), rtol=1e-6, atol=1e-6
    )


def test_sgd_and_nesterov_momentum_equal_optax():
    # Where the conventions coincide: lr positive in both, treeopt returns weights
    # and to_optax the difference, optax returns updates to add.
    weights = _tree(0, dtypes={"h": jnp.float32})
    grads = jax.tree.map(lambda g: g.astype(jnp.float32), _grads(1))
    pairs = [
        (treeopt.SGD(0.1), optax.sgd(0.1)),
        (
            treeopt.Momentum(0.1, mass=0.9, weight_decay_rate=0.0, nesterov=True),
            optax.sgd(0.1, momentum=0.9, nesterov=True),
        ),
    ]
    for ours, theirs in pairs:
        w, _, _ = _optax_loop(to_optax(ours), weights, grads)
        w_optax, _, path = _optax_loop(theirs, weights, grads)
        assert_reordered_close(w, w_optax, path, what=type(ours).__name__)


def test_weight_decay_convention_against_adamw():
    # treeopt decays w by (1 - weight_decay_rate) per step, not scaled by lr;
    # optax.adamw subtracts lr * weight_decay * w. Equal when rate = lr * wd.
    lr, wd = 0.01, 0.5
    weights = _tree(0, dtypes={"h": jnp.float32})
    grads = jax.tree.map(lambda g: g.astype(jnp.float32), _grads(1))
    ours = to_optax(treeopt.Adam(lr, weight_decay_rate=lr * wd, eps=1e-8))
    theirs = optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=wd)
    w, _, _ = _optax_loop(ours, weights, grads)
    w_optax, _, path = _optax_loop(theirs, weights, grads)
    assert_reordered_close(w, w_optax, path, what="adamw convention")


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(1)(nn.tanh(nn.Dense(4)(x)))


def test_flax_train_state_loop():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((32, 3)), jnp.float32)
    y = jnp.sin(x.sum(1, keepdims=True))
    model = _MLP()
    params = model.init(jax.random.key(0), x)["params"]

    def loss_fn(p):
        return jnp.mean((model.apply({"params": p}, x) - y) ** 2)

    opt = treeopt.Adafactor(learning_rate=0.1)
    state = train_state.TrainState.create(
        apply_fn=model.apply, params=params, tx=to_optax(opt)
    )

    @jax.jit
    def train_step(state):
        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads), loss

    @jax.jit
    def class_step(step, w, slots, opt_params):
        grads = jax.grad(loss_fn)(w)
        return opt.tree_update(step, grads, w, slots, opt_params, store_slots=False)

    w, (slots, opt_params) = params, opt.tree_init(params, store_slots=False)
    losses, path = [], [w]
    for k in range(12):
        state, loss = train_step(state)
        losses.append(float(loss))
        w, slots = class_step(k, w, slots, opt_params)
        path.append(w)
    assert losses[-1] < 0.5 * losses[0]
    assert int(state.step) == 12 and int(state.opt_state.count) == 12
    # Gradients come from the model's backward pass: sums over the batch of 32.
    assert_reordered_close(state.params, w, path, 32, "TrainState params")


def test_learning_rate_may_be_a_number_as_in_optax():
    opt, weights, grads = treeopt.Adam(0.1), _tree(0), _grads(1, steps=3)
    w, state, _ = jax.jit(lambda w, g: _optax_loop(to_optax(opt, 0.02), w, g))(
        weights, grads
    )
    w_ref, _, path, _ = _class_loop(opt, weights, grads, [0.02] * 3)
    assert_reordered_close(w, w_ref, path, what="constant learning rate")
    assert float(state.opt_params["learning_rate"]) == pytest.approx(0.02)


@pytest.mark.parametrize(
    ("learning_rate", "error", "match"),
    [
        (-0.1, ValueError, r"learning_rate must be in \[0, inf\], got -0.1"),
        ("0.1", TypeError, "learning_rate must be a number or a schedule"),
        (jnp.ones(2), TypeError, "learning_rate must be a number or a schedule"),
    ],
)
def test_bad_learning_rate_raises_at_construction(learning_rate, error, match):
    with pytest.raises(error, match=match):
        to_optax(treeopt.Adam(), learning_rate)
