"""treeopt.SkipNonFinite: steps with NaN/Inf gradients change nothing."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import treeopt
from treeopt import schedules
from treeopt.guard import SKIPPED, all_finite
from treeopt.optax import to_optax

from cases import BF16_MOMENTUM, CASES
from helpers import assert_reordered_close, assert_trees_equal, size

STEPS = 10
BAD_STEPS = (1, 4, 5, 8)  # steps whose gradients get a NaN or an Inf
GUARD_CASES = [
    c
    for c in [*CASES, BF16_MOMENTUM]
    if c[2]
    in {
        "sgd-clip",
        "adam",
        "momentum-nesterov",
        "rmsprop",
        "adafactor-momentum",
        "adafactor-bf16-momentum",
        "sm3-no-momentum",
        "sm3-graft-nesterov",
    }
]


def _weights():
    rng = np.random.default_rng(0)
    return {
        "m": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32),
        "v": jnp.asarray(rng.standard_normal(5), jnp.float32),
        "h": jnp.asarray(rng.standard_normal((2, 3)), jnp.bfloat16),
    }


def _grads():
    """Per-step gradients; at each step of ``BAD_STEPS`` one element of one leaf
    (chosen by a seeded generator) is NaN, +Inf or -Inf."""
    rng = np.random.default_rng(1)
    w = _weights()
    grads = [
        {k: np.asarray(rng.standard_normal(x.shape), x.dtype) for k, x in w.items()}
        for _ in range(STEPS)
    ]
    for i, step in enumerate(BAD_STEPS):
        leaf = list(w)[rng.integers(len(w))]
        flat = grads[step][leaf].reshape(-1)
        flat[rng.integers(flat.size)] = (np.nan, np.inf, -np.inf)[i % 3]
        grads[step][leaf] = flat.reshape(w[leaf].shape)
    return [jax.tree.map(jnp.asarray, g) for g in grads]


@pytest.mark.parametrize(
    ("cls", "kwargs", "case_id"), GUARD_CASES, ids=[c[2] for c in GUARD_CASES]
)
def test_skipped_steps_change_nothing_and_equal_omitting_them(cls, kwargs, case_id):
    opt = treeopt.SkipNonFinite(cls(**kwargs))
    step_fn = jax.jit(
        lambda k, g, w, s, p: opt.tree_update(
            k, g, w, s, p, store_slots=False, with_metrics=True
        )
    )
    w = _weights()
    slots, opt_params = opt.tree_init(w, store_slots=False)
    step, skipped = jnp.int32(0), jnp.int32(0)
    for k, g in enumerate(_grads()):
        w_new, slots_new, metrics = step_fn(step, g, w, slots, opt_params)
        assert int(metrics[SKIPPED]) == (k in BAD_STEPS)
        if k in BAD_STEPS:
            assert_trees_equal(w_new, w, f"{case_id} weights at {k}")
            assert_trees_equal(slots_new, slots, f"{case_id} slots at {k}")
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(w_new))
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(slots_new))
        # The caller's step counter counts applied steps only.
        step = step + 1 - metrics[SKIPPED]
        skipped = skipped + metrics[SKIPPED]
        w, slots = w_new, slots_new
    assert int(skipped) == len(BAD_STEPS)

    # A run that simply omits the bad steps (the same compiled step, so bit for
    # bit), and the unguarded optimizer on the clean steps (XLA may fuse the two
    # programs differently: float32 tolerance).
    w_ref = _weights()
    slots_ref, _ = opt.tree_init(w_ref, store_slots=False)
    clean = [g for k, g in enumerate(_grads()) if k not in BAD_STEPS]
    for k, g in enumerate(clean):
        w_ref, slots_ref, _ = step_fn(jnp.int32(k), g, w_ref, slots_ref, opt_params)
    assert_trees_equal(w, w_ref, f"{case_id} weights")
    assert_trees_equal(slots, slots_ref, f"{case_id} slots")
    plain = cls(**kwargs)
    w_plain = _weights()
    slots_plain, _ = plain.tree_init(w_plain, store_slots=False)
    path = [w_plain]
    for k, g in enumerate(clean):
        w_plain, slots_plain = plain.tree_update(
            k, g, w_plain, slots_plain, opt_params, store_slots=False
        )
        path.append(w_plain)
    assert_reordered_close(w, w_plain, path, size(w), f"{case_id} unguarded")


def test_without_the_guard_a_nan_reaches_the_weights():
    # Trax's behaviour is kept for unguarded optimizers.
    opt = treeopt.Adam()
    w = _weights()
    slots, opt_params = opt.tree_init(w, store_slots=False)
    g = _grads()[BAD_STEPS[0]]
    w, _ = opt.tree_update(0, g, w, slots, opt_params, store_slots=False)
    assert not bool(all_finite(w))


def test_finiteness_is_checked_per_element_not_through_an_overflowing_norm():
    # Every element is finite, but the squared norm overflows float32 to Inf:
    # the step must be taken.
    opt = treeopt.SkipNonFinite(treeopt.SGD(learning_rate=1e-30))
    w = {"a": jnp.ones(4, jnp.float32)}
    g = {"a": jnp.full(4, 3e38, jnp.float32)}
    slots, opt_params = opt.tree_init(w, store_slots=False)
    w_new, _, metrics = opt.tree_update(
        0, g, w, slots, opt_params, store_slots=False, with_metrics=True
    )
    assert not bool(jnp.isfinite(metrics["gradients_l2"]))
    assert int(metrics[SKIPPED]) == 0
    np.testing.assert_allclose(w_new["a"], 1 - 3e8, rtol=1e-6)


def test_all_finite():
    assert bool(all_finite({}))
    assert bool(all_finite([jnp.ones(3), jnp.zeros((2, 2), jnp.bfloat16)]))
    assert not bool(all_finite([jnp.ones(3), jnp.asarray([1.0, jnp.nan])]))
    assert not bool(all_finite(jnp.asarray([-jnp.inf])))


def test_no_host_round_trip_under_jit():
    opt = treeopt.SkipNonFinite(treeopt.Adafactor())
    w = _weights()
    slots, opt_params = opt.tree_init(w, store_slots=False)

    def step(k, g, w, s, p):
        return opt.tree_update(k, g, w, s, p, store_slots=False, with_metrics=True)

    g = _grads()[BAD_STEPS[0]]
    args = jax.device_put((jnp.int32(0), g, w, slots, opt_params))
    jaxpr = str(jax.make_jaxpr(step)(*args))
    assert "callback" not in jaxpr
    compiled = jax.jit(step)
    compiled(*args)  # compile outside the guard
    with jax.transfer_guard("disallow"):
        w_new, _, metrics = compiled(*args)
    assert int(metrics[SKIPPED]) == 1
    assert_trees_equal(w_new, w, "skipped")


def test_to_optax_counts_skips_in_its_state():
    opt = treeopt.SkipNonFinite(treeopt.Adam(0.05))
    tx = optax.chain(optax.identity(), to_optax(opt))
    step = jax.jit(
        lambda w, s, g: (lambda u, s: (optax.apply_updates(w, u), s))(
            *tx.update(g, s, w)
        )
    )
    w, state = _weights(), tx.init(_weights())
    for g in _grads():
        w, state = step(w, state, g)
    inner = state[1]
    assert int(inner.skipped) == len(BAD_STEPS)
    assert int(inner.count) == STEPS - len(BAD_STEPS)
    assert bool(all_finite(w)) and bool(all_finite(inner.slots))

    # The same compiled step fed only the clean gradients.
    w_ref, s_ref = _weights(), tx.init(_weights())
    for k, g in enumerate(_grads()):
        if k not in BAD_STEPS:
            w_ref, s_ref = step(w_ref, s_ref, g)
    assert_trees_equal(w, w_ref, "to_optax guarded")
    assert int(s_ref[1].skipped) == 0


def test_class_api_store_slots_and_errors():
    opt = treeopt.SkipNonFinite(treeopt.Momentum())
    w = _weights()
    slots, opt_params = opt.tree_init(w)
    assert opt.slots is slots and opt.opt_params.keys() == opt_params.keys()
    w_new, slots_new = opt.tree_update(0, _grads()[BAD_STEPS[0]], w, slots, opt_params)
    assert opt.slots is slots_new
    assert_trees_equal(w_new, w, "stored")
    assert opt.clip_grad_norm is None and isinstance(opt.inner, treeopt.Momentum)
    assert "Momentum" in repr(opt)

    with pytest.raises(RuntimeError, match="store_slots=False"):
        jax.jit(lambda w: opt.tree_update(0, w, w, slots, opt_params))(w)
    with pytest.raises(TypeError, match=r"wraps a treeopt\.Optimizer"):
        treeopt.SkipNonFinite(optax.sgd(0.1))
    with pytest.raises(ValueError, match="different tree structures"):
        opt.tree_update(0, {"m": w["m"]}, w, slots, opt_params)


def test_per_leaf_update_skips_that_leaf():
    opt = treeopt.SkipNonFinite(treeopt.RMSProp(0.1))
    w = jnp.ones(3)
    a = opt.init(w)
    bad = jnp.asarray([1.0, jnp.inf, 0.0])
    w_new, a_new = opt.update(0, bad, w, a, opt.opt_params)
    assert_trees_equal((w_new, a_new), (w, a), "per leaf")
    w_new, _ = opt.update(0, jnp.ones(3), w, a, opt.opt_params)
    assert bool(jnp.all(w_new < w))


def test_trainer_reports_the_skip():
    def loss_fn(w, batch, rng):
        del rng
        return jnp.sum(w["w"] * batch)

    trainer = treeopt.Trainer(
        loss_fn, treeopt.SkipNonFinite(treeopt.Adam(0.1)), {"w": jnp.ones(3)}
    )
    _, metrics = trainer.one_step(jnp.asarray([1.0, 2.0, 3.0]), jax.random.key(0))
    assert int(metrics[SKIPPED]) == 0
    before = jax.tree.map(np.asarray, trainer.weights)
    _, metrics = trainer.one_step(jnp.asarray([jnp.nan, 1.0, 1.0]), jax.random.key(0))
    assert int(metrics[SKIPPED]) == 1
    assert_trees_equal(trainer.weights, before, "trainer")


def test_trainer_with_guard_equals_a_trainer_that_never_saw_the_bad_batches():
    def loss_fn(w, batch, rng):
        del rng
        return jnp.sum((w["w"] - batch) ** 2)

    batches = [jnp.asarray([1.0, 2.0, 3.0]) * (k + 1) for k in range(6)]
    bad = {1: jnp.nan, 4: jnp.inf}
    opt = treeopt.Adafactor(learning_rate=0.1, do_momentum=True, beta1=0.5)
    sched = schedules.linear_warmup(0.1, warmup_steps=3)
    guarded = treeopt.Trainer(
        loss_fn, treeopt.SkipNonFinite(opt), {"w": jnp.ones(3)}, sched
    )
    clean = treeopt.Trainer(loss_fn, opt, {"w": jnp.ones(3)}, sched)

    def snapshot():  # the Trainer donates its arrays to the next step
        return jax.tree.map(np.asarray, (clean.weights, clean.slots))

    path = [snapshot()]
    for k, batch in enumerate(batches):
        if k in bad:
            _, m = guarded.one_step(batch.at[0].set(bad[k]), jax.random.key(0))
            assert int(m[SKIPPED]) == 1
        else:
            guarded.one_step(batch, jax.random.key(0))
            clean.one_step(batch, jax.random.key(0))
            path.append(snapshot())
    assert int(guarded.skipped_nonfinite) == 2
    assert guarded.step == 6 and clean.step == 4
    w_path, s_path = zip(*path, strict=True)
    assert_reordered_close(guarded.weights, clean.weights, w_path, 3, "weights")
    assert_reordered_close(guarded.slots, clean.slots, s_path, 3, "slots")
    # An explicit step is used as given, skipped steps or not.
    _, m = guarded.one_step(batches[0], jax.random.key(0), step=1)
    np.testing.assert_allclose(m["learning_rate"], sched(1), rtol=1e-7)
