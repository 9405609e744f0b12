"""treeopt.checkpoint: exact round trips, bit-identical resume, named mismatches,
and a save killed midway that leaves the previous checkpoint readable."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.training import train_state

import treeopt
from treeopt import MomentumType, checkpoint
from treeopt.optax import to_optax

from cases import BF16_MOMENTUM, CASES

ALL_CASES = [*CASES, BF16_MOMENTUM]


def _weights(h_dtype=jnp.bfloat16):
    rng = np.random.default_rng(0)
    return {
        "s": jnp.asarray(rng.standard_normal(()), jnp.float32),
        "m": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32),
        "h": jnp.asarray(rng.standard_normal((2, 3)), h_dtype),
    }


def _grads(steps, seed=1):
    rng = np.random.default_rng(seed)
    w = _weights()
    return [
        {k: jnp.asarray(rng.standard_normal(x.shape), x.dtype) for k, x in w.items()}
        for _ in range(steps)
    ]


def _train(opt, state, grads, first_step):
    """Class-API steps from ``state``, with the step kept in the state."""
    w, slots, opt_params = state["weights"], state["slots"], state["opt_params"]
    for k, g in enumerate(grads):
        w, slots = opt.tree_update(
            first_step + k, g, w, slots, opt_params, store_slots=False
        )
    step = jnp.int32(first_step + len(grads))
    return {"step": step, "weights": w, "slots": slots, "opt_params": opt_params}


def _fresh(opt, weights):
    slots, opt_params = opt.tree_init(weights, store_slots=False)
    return {"step": 0, "weights": weights, "slots": slots, "opt_params": opt_params}


def _assert_identical(a, b, what):
    """Same treedef (None and [] entries included), dtypes and bits."""
    assert jax.tree.structure(a) == jax.tree.structure(b), what
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, what
        np.testing.assert_array_equal(
            np.atleast_1d(x).view(np.uint8), np.atleast_1d(y).view(np.uint8), what
        )


@pytest.mark.parametrize(
    ("cls", "kwargs", "case_id"), ALL_CASES, ids=[c[2] for c in ALL_CASES]
)
def test_round_trip_is_exact(cls, kwargs, case_id, tmp_path):
    opt = cls(**kwargs)
    state = _train(opt, _fresh(opt, _weights()), _grads(2), 0)
    checkpoint.save(tmp_path, 2, state, optimizer=opt)
    restored = checkpoint.restore(tmp_path, _fresh(cls(**kwargs), _weights()))
    _assert_identical(restored, state, case_id)


def test_none_and_empty_slot_entries_come_back(tmp_path):
    # SGD's slot is None per leaf; SM3 without momentum or grafting has [].
    sgd, sm3 = treeopt.SGD(), treeopt.SM3(momentum=0.0)
    checkpoint.save(tmp_path / "sgd", 1, _fresh(sgd, _weights()), optimizer=sgd)
    checkpoint.save(tmp_path / "sm3", 1, _fresh(sm3, _weights()), optimizer=sm3)
    slots = checkpoint.restore(tmp_path / "sgd", _fresh(sgd, _weights()))["slots"]
    assert slots == (None, None, None)
    slots = checkpoint.restore(tmp_path / "sm3", _fresh(sm3, _weights()))["slots"]
    assert [(m, v2s) for m, _, v2s in slots] == [([], [])] * 3
    assert [len(v1s) for _, v1s, _ in slots] == [2, 2, 1]  # h, m, s (sorted keys)


@pytest.mark.parametrize(
    "make",
    [
        lambda: treeopt.Adam(0.05),
        lambda: treeopt.Adafactor(0.5, do_momentum=True, momentum_in_bfloat16=True),
        lambda: treeopt.SM3(0.1, second_moment_averaging=0.9),
    ],
    ids=["adam", "adafactor-bf16-momentum", "sm3-graft"],
)
def test_resume_is_bit_identical(make, tmp_path):
    # bfloat16 weights: restored opt_params are strongly typed float32 arrays
    # while the uninterrupted run uses weakly typed ones; results must not care.
    grads = _grads(6)
    opt = make()
    start = _fresh(opt, _weights())
    start["opt_params"] = {
        k: jnp.asarray(float(v)) for k, v in start["opt_params"].items()
    }
    assert all(v.weak_type for v in start["opt_params"].values())
    uninterrupted = _train(opt, start, grads, 0)

    halfway = _train(opt, start, grads[:3], 0)
    checkpoint.save(tmp_path, 3, halfway, optimizer=opt)
    opt2 = make()
    like = _fresh(opt2, _weights())
    restored = checkpoint.restore(tmp_path, like, optimizer=opt2)
    assert not any(v.weak_type for v in restored["opt_params"].values())
    resumed = _train(opt2, restored, grads[3:], int(restored["step"]))
    _assert_identical(resumed["weights"], uninterrupted["weights"], "weights")
    _assert_identical(resumed["slots"], uninterrupted["slots"], "slots")
    assert resumed["weights"]["h"].dtype == jnp.bfloat16


@pytest.mark.parametrize(
    ("saved", "restored", "match"),
    [
        (
            treeopt.Momentum(),
            treeopt.RMSProp(),
            r"class: saved treeopt\.momentum\.Momentum, now treeopt\.rms_prop\.RMSProp",
        ),
        (
            treeopt.Adafactor(),
            treeopt.Adafactor(factored=False),
            "factored: saved True",
        ),
        (
            treeopt.Adafactor(do_momentum=True, momentum_in_bfloat16=True),
            treeopt.Adafactor(do_momentum=True),
            "momentum_in_bfloat16: saved True, now False",
        ),
        (
            treeopt.SM3(),
            treeopt.SM3(momentum_type=MomentumType.NESTEROV),
            "momentum_type: saved 'EMA', now 'NESTEROV'",
        ),
        (treeopt.SM3(), treeopt.SM3(momentum=0.0), "has_momentum: saved True"),
        (
            treeopt.SkipNonFinite(treeopt.Adam()),
            treeopt.Adam(),
            "class: saved treeopt.guard.SkipNonFinite",
        ),
    ],
    ids=[
        "class",
        "factored",
        "bf16-momentum",
        "momentum-type",
        "no-momentum",
        "guard",
    ],
)
def test_restore_into_another_configuration_raises(saved, restored, match, tmp_path):
    checkpoint.save(tmp_path, 1, _fresh(saved, _weights()), optimizer=saved)
    with pytest.raises(ValueError, match=match):
        checkpoint.restore(tmp_path, _fresh(restored, _weights()), optimizer=restored)


@pytest.mark.parametrize(
    ("saved", "restored"),
    [
        (treeopt.Adam(), treeopt.Adam(clip_grad_norm=1.0)),
        (treeopt.Momentum(), treeopt.Momentum(nesterov=False)),
        (treeopt.Adafactor(), treeopt.Adafactor(multiply_by_parameter_scale=False)),
        (treeopt.Adafactor(), treeopt.Adafactor(do_clipping=False)),
    ],
    ids=["clip-grad-norm", "nesterov", "parameter-scale", "update-clipping"],
)
def test_options_that_do_not_shape_the_state_may_change_on_restore(
    saved, restored, tmp_path
):
    # Declared structural options only (the state's layout): a run may resume
    # with gradient clipping turned on, or another update rule on the same slots.
    state = _fresh(saved, _weights())
    checkpoint.save(tmp_path, 1, state, optimizer=saved)
    back = checkpoint.restore(
        tmp_path, _fresh(restored, _weights()), optimizer=restored
    )
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (
            lambda w: {**w, "x": jnp.zeros(2)},
            r"`like` has .*\['weights'\]\['x'\], the checkpoint has not",
        ),
        (
            lambda w: {k: v for k, v in w.items() if k != "s"},
            r"checkpoint has .*\['weights'\]\['s'\], `like` has not",
        ),
        (lambda w: {**w, "m": jnp.zeros((3, 5))}, r"shape \(3, 4\) float32, `like` "),
        (lambda w: {**w, "h": w["h"].astype(jnp.float32)}, "bfloat16, `like` has"),
    ],
    ids=["extra-leaf", "missing-leaf", "shape", "dtype"],
)
def test_restore_into_another_tree_raises(change, match, tmp_path):
    opt = treeopt.Adam()
    checkpoint.save(tmp_path, 1, _fresh(opt, _weights()), optimizer=opt)
    with pytest.raises(ValueError, match=match):
        checkpoint.restore(tmp_path, _fresh(opt, change(_weights())), optimizer=opt)
    with pytest.raises(ValueError, match=match):  # also without the optimizer
        checkpoint.restore(tmp_path, _fresh(opt, change(_weights())))


def test_missing_steps_and_duplicates(tmp_path):
    opt = treeopt.SGD()
    state = _fresh(opt, _weights())
    assert checkpoint.latest_step(tmp_path / "none") is None
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        checkpoint.restore(tmp_path / "none", state)
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, step, state, keep=2)
    assert checkpoint.latest_step(tmp_path) == 3
    with pytest.raises(FileNotFoundError, match=r"complete steps: \[2, 3\]"):
        checkpoint.restore(tmp_path, state, step=1)
    with pytest.raises(ValueError, match="already exists"):
        checkpoint.save(tmp_path, 3, state)
    with pytest.raises(ValueError, match="records no optimizer"):
        checkpoint.restore(tmp_path, state, optimizer=opt)


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(1)(nn.tanh(nn.Dense(4)(x)))


def test_flax_train_state_with_to_optax_resumes_bit_identically(tmp_path):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((16, 3)), jnp.float32)
    y = jnp.sin(x.sum(1, keepdims=True))
    model = _MLP()
    opt = treeopt.Adafactor(0.1, do_momentum=True, momentum_in_bfloat16=True)

    def new_state():
        params = model.init(jax.random.key(0), x)["params"]
        return train_state.TrainState.create(
            apply_fn=model.apply, params=params, tx=to_optax(opt)
        )

    @jax.jit
    def step(state):
        def loss_fn(p):
            return jnp.mean((model.apply({"params": p}, x) - y) ** 2)

        return state.apply_gradients(grads=jax.grad(loss_fn)(state.params))

    state = new_state()
    for k in range(6):
        state = step(state)
        if k == 2:
            checkpoint.save(tmp_path, 3, state, optimizer=opt)
    resumed = checkpoint.restore(tmp_path, new_state(), optimizer=opt)
    assert int(resumed.step) == 3 and int(resumed.opt_state.count) == 3
    for _ in range(3):
        resumed = step(resumed)
    _assert_identical(resumed.params, state.params, "params")
    _assert_identical(resumed.opt_state, state.opt_state, "opt_state")


_CHILD = textwrap.dedent(
    """
    import sys
    import jax.numpy as jnp
    import numpy as np
    import treeopt
    from treeopt import checkpoint

    directory = sys.argv[1]
    opt = treeopt.SM3(momentum=0.0)
    w = {"a": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(4, jnp.bfloat16)}
    slots, opt_params = opt.tree_init(w, store_slots=False)
    state = {"step": 1, "weights": w, "slots": slots, "opt_params": opt_params}
    checkpoint.save(directory, 1, state, optimizer=opt)
    rng = np.random.default_rng(0)
    big = {f"w{i}": rng.standard_normal((1024, 1024), np.float32) for i in range(16)}
    print("saving", flush=True)
    checkpoint.save(directory, 2, big)
    print("finished", flush=True)
    """
)


def test_save_killed_midway_leaves_the_previous_checkpoint(tmp_path):
    with subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        try:
            assert child.stdout.readline().strip() == "saving"
            deadline = time.monotonic() + 60
            while not any("tmp" in name for name in os.listdir(tmp_path)):
                assert time.monotonic() < deadline, "the save never started"
                time.sleep(0.002)
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
    assert child.returncode == -signal.SIGKILL
    # Killed midway: the unfinished step is still in its temporary folder.
    assert any("tmp" in name for name in os.listdir(tmp_path))

    opt = treeopt.SM3(momentum=0.0)
    w = {"a": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(4, jnp.bfloat16)}
    like = _fresh(opt, w)
    assert checkpoint.latest_step(tmp_path) == 1
    restored = checkpoint.restore(tmp_path, like, optimizer=opt)
    _assert_identical(restored, {**like, "step": jnp.int32(1)}, "previous")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint for step 2"):
        checkpoint.restore(tmp_path, {"w0": jnp.zeros((1024, 1024))}, step=2)
    # The folder stays usable: step 2 can be written again.
    checkpoint.save(tmp_path, 2, like, optimizer=opt)
    assert checkpoint.latest_step(tmp_path) == 2


def test_restore_into_an_abstract_like(tmp_path):
    opt = treeopt.Adafactor(do_momentum=True, momentum_in_bfloat16=True)
    state = _train(opt, _fresh(opt, _weights()), _grads(2), 0)
    checkpoint.save(tmp_path, 2, state, optimizer=opt)
    like = jax.eval_shape(lambda: _fresh(opt, _weights()))
    assert isinstance(like["weights"]["h"], jax.ShapeDtypeStruct)
    _assert_identical(checkpoint.restore(tmp_path, like, optimizer=opt), state, "sds")


def test_opt_params_as_loaded_from_numpy_change_nothing():
    # A checkpoint read through NumPy gives strongly typed (even float64)
    # scalars instead of the weakly typed jnp.array(0.999) Trax used. Explicit
    # casts keep bfloat16 results identical in value and dtype.
    opt = treeopt.Adam(0.05)
    w = _weights()
    slots, opt_params = opt.tree_init(w, store_slots=False)
    forms = {
        "float32": opt_params,
        "weak": {k: jnp.asarray(float(v)) for k, v in opt_params.items()},
        "numpy64": {k: np.asarray(float(v), np.float64) for k, v in opt_params.items()},
        "numpy32": {k: np.asarray(v, np.float32) for k, v in opt_params.items()},
    }
    results = {
        name: _train(opt, {"weights": w, "slots": slots, "opt_params": p}, _grads(3), 0)
        for name, p in forms.items()
    }
    for name, result in results.items():
        assert result["weights"]["h"].dtype == jnp.bfloat16, name
        _assert_identical(result["weights"], results["float32"]["weights"], name)
        _assert_identical(result["slots"], results["float32"]["slots"], name)
