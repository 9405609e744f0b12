"""Trainer: training works, compiles once, equals a hand-written tree_update loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import treeopt
from treeopt import schedules

from cases import CASES
from helpers import assert_reordered_close

RTOL = 1e-5  # jitted (fused) vs eager float32 arithmetic over a few steps


def least_squares():
    """A least-squares problem with a dict of a matrix and a bias, and weights
    started away from zero (Adafactor's step is relative to rms(w))."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 4)).astype(np.float32)
    w_true = rng.standard_normal((4, 3)).astype(np.float32)
    y = x @ w_true + 0.5
    weights = {
        "w": (0.3 * rng.standard_normal((4, 3))).astype(np.float32),
        "b": np.full((3,), 0.1, np.float32),
    }
    return weights, (x, y)


def mse(weights, batch, rng):
    del rng
    x, y = batch
    return jnp.mean((x @ weights["w"] + weights["b"][None, :] - y) ** 2)


# The first case of each optimizer class (the Trainer adds nothing per case; the
# per-leaf math of every case is checked against float64 references elsewhere).
_FIRST = {c: (c, k, i) for c, k, i in reversed(CASES)}.values()
ONE_PER_CLASS = [(c, k) for c, k, _ in _FIRST]
ONE_PER_CLASS_IDS = [i for _, _, i in _FIRST]


@pytest.mark.parametrize("cls, kwargs", ONE_PER_CLASS, ids=ONE_PER_CLASS_IDS)
def test_loss_decreases(cls, kwargs):
    weights, batch = least_squares()
    trainer = treeopt.Trainer(mse, cls(**kwargs), weights)
    key = jax.random.key(0)
    losses = [float(trainer.one_step(batch, key)[0]) for _ in range(60)]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses[::10]
    assert trainer.step == 60


def hand_loop(opt, weights, batch, n_steps, schedule, first_step=0):
    """The loop the Trainer replaces: eager value_and_grad plus tree_update."""
    slots, opt_params = opt.tree_init(weights, store_slots=False)
    losses, metrics, path = [], [], [(weights, slots)]
    for step in range(first_step, first_step + n_steps):
        loss, grads = jax.value_and_grad(mse)(weights, batch, None)
        opt_params = {**opt_params, "learning_rate": schedule(step)}
        weights, slots, m = opt.tree_update(
            step,
            grads,
            weights,
            slots,
            opt_params,
            store_slots=False,
            with_metrics=True,
        )
        losses.append(loss)
        metrics.append(m)
        path.append((weights, slots))
    return weights, slots, losses, metrics, path


@pytest.mark.parametrize("first_step", [0, 1])
@pytest.mark.parametrize("cls, kwargs", ONE_PER_CLASS, ids=ONE_PER_CLASS_IDS)
def test_equals_hand_written_loop(cls, kwargs, first_step):
    weights, batch = least_squares()
    schedule = schedules.multifactor(
        "constant * linear_warmup * cosine_decay",
        kwargs["learning_rate"],
        warmup_steps=2,
        steps_per_cycle=10,
    )
    w_ref, s_ref, losses, metrics, path = hand_loop(
        cls(**kwargs), weights, batch, 5, schedule, first_step
    )
    trainer = treeopt.Trainer(
        mse, cls(**kwargs), weights, schedule, first_step=first_step
    )
    for step, loss, m in zip(range(5), losses, metrics, strict=True):
        got_loss, got = trainer.one_step(batch, jax.random.key(step))
        np.testing.assert_allclose(got_loss, loss, rtol=RTOL)
        np.testing.assert_allclose(got["gradients_l2"], m["gradients_l2"], rtol=RTOL)
        np.testing.assert_allclose(got["weights_l2"], m["weights_l2"], rtol=RTOL)
        np.testing.assert_allclose(
            got["learning_rate"], schedule(first_step + step), rtol=RTOL
        )
    # Gradients sum over the batch of 32 rows: the longest reduction of a step.
    w_path, s_path = zip(*path, strict=True)
    assert_reordered_close(trainer.weights, w_ref, w_path, 32, "weights")
    assert_reordered_close(trainer.slots, s_ref, s_path, 32, "slots")
    assert trainer.step == first_step + 5


def test_compiles_once_across_steps_and_learning_rates():
    traces = []

    def counted_mse(weights, batch, rng):
        traces.append(1)
        return mse(weights, batch, rng)

    weights, batch = least_squares()
    trainer = treeopt.Trainer(
        counted_mse, treeopt.Adam(0.01), weights, schedules.warmup(5, 0.01)
    )
    lrs = []
    for step in range(30):
        _, metrics = trainer.one_step(batch, jax.random.key(step))
        lrs.append(float(metrics["learning_rate"]))
    assert len(traces) == 1
    assert lrs[0] == 0.0 and lrs[2] == pytest.approx(0.004, rel=1e-6)
    assert lrs[-1] == pytest.approx(0.01, rel=1e-6)
    # Explicit step numbers and learning rates (Trax's signature) are data too:
    # one more trace for the override path, then none.
    for step, lr in [(100, 0.5), (7, 1e-4), (10**6, 3.0)]:
        _, metrics = trainer.one_step(batch, jax.random.key(0), step, lr)
        assert float(metrics["learning_rate"]) == pytest.approx(lr)
    assert len(traces) == 2
    assert trainer.step == 10**6 + 1


def test_aux_and_rng_reach_the_metrics():
    def loss_with_aux(weights, batch, rng):
        loss = mse(weights, batch, rng)
        return loss, {"noise": jax.random.normal(rng), "twice": 2 * loss}

    weights, batch = least_squares()
    trainer = treeopt.Trainer(loss_with_aux, treeopt.SGD(0.01), weights)
    key = jax.random.key(3)
    loss, metrics = trainer.one_step(batch, key)
    np.testing.assert_allclose(metrics["aux"]["twice"], 2 * loss, rtol=1e-6)
    np.testing.assert_allclose(metrics["aux"]["noise"], jax.random.normal(key))
    assert set(metrics) == {
        "loss",
        "gradients_l2",
        "weights_l2",
        "learning_rate",
        "aux",
    }


class ReportingSGD(treeopt.SGD):
    """SGD whose tree_update adds a metric, as a wrapping optimizer may."""

    def tree_update(self, step, grad_tree, weight_tree, slots, opt_params, **kw):
        out = super().tree_update(step, grad_tree, weight_tree, slots, opt_params, **kw)
        if not kw.get("with_metrics"):
            return out
        new_weights, new_slots, metrics = out
        return new_weights, new_slots, {**metrics, "skipped": jnp.asarray(False)}


def test_extra_optimizer_metrics_pass_through():
    weights, batch = least_squares()
    _, metrics = treeopt.Trainer(mse, ReportingSGD(0.01), weights).one_step(
        batch, jax.random.key(0)
    )
    assert not bool(metrics["skipped"])


def test_caller_weights_survive_donation():
    weights, batch = least_squares()
    weights = jax.tree.map(jnp.asarray, weights)
    trainer = treeopt.Trainer(mse, treeopt.Adam(0.1), weights)
    for _ in range(3):
        trainer.one_step(batch, jax.random.key(0))
    np.testing.assert_array_equal(weights["b"], np.full((3,), 0.1, np.float32))
    assert not np.allclose(trainer.weights["b"], weights["b"])


def test_flax_parameters():
    nn = pytest.importorskip("flax.linen")
    model = nn.Sequential([nn.Dense(8), nn.tanh, nn.Dense(3)])
    _, (x, y) = least_squares()
    params = model.init(jax.random.key(0), x)

    def loss_fn(params, batch, rng):
        del rng
        x, y = batch
        return jnp.mean((model.apply(params, x) - y) ** 2)

    trainer = treeopt.Trainer(loss_fn, treeopt.Adafactor(0.1), params)
    losses = [float(trainer.one_step((x, y), jax.random.key(0))[0]) for _ in range(40)]
    assert losses[-1] < 0.5 * losses[0]
    assert jax.tree.structure(trainer.weights) == jax.tree.structure(params)


def test_loss_fn_returning_a_triple():
    weights, batch = least_squares()
    trainer = treeopt.Trainer(
        lambda w, b, r: (mse(w, b, r),) * 3, treeopt.SGD(), weights
    )
    with pytest.raises(TypeError, match=r"scalar loss or a pair.*tuple of 3"):
        trainer.one_step(batch, jax.random.key(0))


@pytest.mark.parametrize(
    "first_step, error, match",
    [
        (-1, ValueError, r"first_step must be in \[0"),
        (1.5, TypeError, "first_step must be an int, got 1.5"),
        (True, TypeError, "first_step must be an int, got True"),
    ],
)
def test_bad_first_step(first_step, error, match):
    weights, _ = least_squares()
    with pytest.raises(error, match=match):
        treeopt.Trainer(mse, treeopt.SGD(), weights, first_step=first_step)


def test_learning_rate_override_stays_without_a_schedule():
    weights, batch = least_squares()
    trainer = treeopt.Trainer(mse, treeopt.SGD(0.01), weights)
    trainer.one_step(batch, jax.random.key(0), learning_rate=0.5)
    _, metrics = trainer.one_step(batch, jax.random.key(0))
    assert float(metrics["learning_rate"]) == 0.5
