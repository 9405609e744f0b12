"""Tree plumbing: slots layout, store_slots, metrics, clipping, errors."""

import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import treeopt
from treeopt import base

import reference
from cases import CASES, IDS
from helpers import needs_float16

# ------------------------------------------------------ the seed's behaviour


def test_slots_none_before_tree_init_and_tuple_after():
    opt = treeopt.Adam()
    assert opt.slots is None
    weights = {"b": jnp.ones(3), "a": [jnp.ones((2, 2)), jnp.zeros(())]}
    slots, _ = opt.tree_init(weights)
    assert isinstance(slots, tuple) and len(slots) == 3
    assert opt.slots is slots
    # Flatten order: dict keys sorted, so 'a'[0], 'a'[1], 'b'.
    assert [s[0].shape for s in slots] == [(2, 2), (), (3,)]


@pytest.mark.parametrize(("cls", "kwargs", "case_id"), CASES, ids=IDS)
def test_opt_params_hold_constructor_values_as_arrays(cls, kwargs, case_id):
    opt = cls(**kwargs)
    params = opt.opt_params
    assert "learning_rate" in params
    for name, value in params.items():
        assert isinstance(value, jax.Array) and value.shape == (), name
        assert value.dtype == jnp.float32, name
    for name, value in kwargs.items():
        if name in params and value is not None:
            assert float(params[name]) == pytest.approx(float(value)), name


def test_store_slots_true_stores_and_false_does_not():
    opt = treeopt.Momentum()
    w = [jnp.ones(3)]
    slots, p = opt.tree_init(w)
    _, new_slots = opt.tree_update(0, [jnp.ones(3)], w, slots, p, store_slots=False)
    assert opt.slots is slots
    _, new_slots = opt.tree_update(0, [jnp.ones(3)], w, slots, p)
    assert opt.slots is new_slots


def test_slots_and_opt_params_setters():
    opt = treeopt.SGD()
    opt.slots = (None,)
    assert opt.slots == (None,)
    opt.opt_params = {"learning_rate": jnp.asarray(0.5)}
    assert float(opt.opt_params["learning_rate"]) == 0.5


def test_tree_init_returns_a_copy_of_opt_params():
    opt = treeopt.Adam(learning_rate=0.1)
    _, params = opt.tree_init([jnp.ones(2)])
    params["learning_rate"] = jnp.asarray(9.0)
    assert float(opt.opt_params["learning_rate"]) == pytest.approx(0.1)


def test_store_slots_under_jit_raises_clear_error():
    opt = treeopt.Adam()
    w = [jnp.ones(3)]
    slots, p = opt.tree_init(w)
    with pytest.raises(RuntimeError, match="store_slots=False"):
        jax.jit(lambda g: opt.tree_update(0, g, w, slots, p))([jnp.ones(3)])
    with pytest.raises(RuntimeError, match="store_slots=False"):
        jax.jit(lambda w: opt.tree_init(w))(w)
    assert opt.slots is slots  # nothing traced was stored


def test_with_metrics_returns_norms_before_clipping_and_update():
    opt = treeopt.SGD(learning_rate=0.1, clip_grad_norm=1.0)
    w = {"x": jnp.array([3.0, 4.0])}
    g = {"x": jnp.array([6.0, 8.0])}
    slots, p = opt.tree_init(w)
    new_w, _, metrics = opt.tree_update(0, g, w, slots, p, with_metrics=True)
    assert set(metrics) == {"gradients_l2", "weights_l2"}
    np.testing.assert_allclose(metrics["gradients_l2"], 10.0)
    np.testing.assert_allclose(metrics["weights_l2"], 5.0)
    # Clipped to norm 1: g -> [0.6, 0.8]; w - 0.1 g = [2.94, 3.92].
    np.testing.assert_allclose(new_w["x"], [2.94, 3.92], rtol=1e-6)


def test_step_may_be_int_or_array():
    opt = treeopt.Adam(learning_rate=0.1)
    w = [jnp.ones(3)]
    slots, p = opt.tree_init(w)
    g = [jnp.full(3, 0.5)]
    a, _ = opt.tree_update(4, g, w, slots, p, store_slots=False)
    b, _ = opt.tree_update(jnp.asarray(4), g, w, slots, p, store_slots=False)
    c, _ = opt.tree_update(np.int64(4), g, w, slots, p, store_slots=False)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[0], c[0])


def test_empty_tree_returns_empty_tree_and_slots():
    for tree in ({}, [], ()):
        opt = treeopt.Adam()
        slots, p = opt.tree_init(tree)
        assert slots == ()
        new_w, new_slots, metrics = opt.tree_update(
            0, tree, tree, slots, p, with_metrics=True
        )
        assert new_w == tree and new_slots == ()
        assert float(metrics["gradients_l2"]) == 0.0


Pair = collections.namedtuple("Pair", ["kernel", "bias"])


@needs_float16
def test_structure_and_dtypes_preserved_for_namedtuple_python_float_numpy():
    opt = treeopt.Momentum(learning_rate=0.1)
    w = {
        "layer": Pair(np.ones((2, 3), np.float32), jnp.zeros(3, jnp.bfloat16)),
        "scale": 2.0,
        "h": jnp.ones(4, jnp.float16),
    }
    g = jax.tree.map(lambda x: jnp.full(jnp.shape(x), 0.5, jnp.asarray(x).dtype), w)
    slots, p = opt.tree_init(w)
    new_w, _ = opt.tree_update(0, g, w, slots, p)
    assert jax.tree.structure(new_w) == jax.tree.structure(w)
    assert isinstance(new_w["layer"], Pair)
    assert new_w["layer"].bias.dtype == jnp.bfloat16
    assert new_w["h"].dtype == jnp.float16
    assert new_w["layer"].kernel.dtype == jnp.float32
    # Nesterov first step: u = mass*g + g = 1.9 * 0.5; w = 2*(1-1e-5) - 0.1*0.95.
    np.testing.assert_allclose(new_w["scale"], 2.0 * (1 - 1e-5) - 0.095, rtol=1e-6)


# ------------------------------------------------------------ norms & clipping


def test_l2_norm_and_clip_grads_hand_values():
    tree = {"a": jnp.array([3.0]), "b": [jnp.array([[4.0]], jnp.bfloat16)]}
    np.testing.assert_allclose(base.l2_norm(tree), 5.0)
    clipped = treeopt.clip_grads(tree, 1.0)
    np.testing.assert_allclose(clipped["a"], [0.6], rtol=1e-6)
    assert clipped["b"][0].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.float32(clipped["b"][0][0, 0]), 0.8, rtol=1e-2)
    unclipped = treeopt.clip_grads(tree, 10.0)
    np.testing.assert_array_equal(unclipped["a"], tree["a"])


def test_l2_norm_accumulates_in_float32_for_bfloat16():
    # 4096 entries of 1.0 in bfloat16: a bfloat16 sum would stop growing at 256.
    x = jnp.ones((4096,), jnp.bfloat16)
    np.testing.assert_allclose(base.l2_norm([x]), 64.0)
    assert base.l2_norm([x]).dtype == jnp.float32


def test_clip_grads_zero_gradients_stay_zero():
    out = treeopt.clip_grads([jnp.zeros(3)], 1.0)
    np.testing.assert_array_equal(out[0], np.zeros(3))


def test_global_clipping_uses_all_leaves_together():
    opt = treeopt.SGD(learning_rate=1.0, clip_grad_norm=1.0)
    w = [jnp.zeros(1), jnp.zeros(1)]
    slots, p = opt.tree_init(w)
    new_w, _ = opt.tree_update(0, [jnp.array([3.0]), jnp.array([4.0])], w, slots, p)
    np.testing.assert_allclose(np.concatenate(new_w), [-0.6, -0.8], rtol=1e-6)


# ------------------------------------------------------------- compile once


def test_jitted_tree_update_compiles_once_across_steps_and_learning_rates():
    opt = treeopt.Adafactor(do_momentum=True)
    w = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
    slots, p = opt.tree_init(w, store_slots=False)
    traces = []

    @jax.jit
    def step(s, g, w, slots, p):
        traces.append(1)
        return opt.tree_update(s, g, w, slots, p, store_slots=False)

    g = jax.tree.map(jnp.ones_like, w)
    for k in range(5):
        p = dict(p, learning_rate=jnp.asarray(0.01 * (k + 1), jnp.float32))
        w, slots = step(jnp.asarray(k), g, w, slots, p)
    assert len(traces) == 1


# ------------------------------------------------------------------ errors


def _setup(opt=None):
    opt = opt or treeopt.Adam()
    w = {"dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}}
    slots, p = opt.tree_init(w)
    return opt, w, slots, p


def test_grads_with_a_different_key_name_the_path():
    opt, w, slots, p = _setup()
    g = {"dense": {"kernel": jnp.ones((2, 3)), "bais": jnp.zeros(3)}}
    with pytest.raises(ValueError, match=r"\['dense'\]\['bais'\]"):
        opt.tree_update(0, g, w, slots, p)


def test_grads_missing_a_leaf_name_the_path():
    opt, w, slots, p = _setup()
    g = {"dense": {"kernel": jnp.ones((2, 3))}}
    with pytest.raises(ValueError, match=r"\['dense'\]\['kernel'\]"):
        opt.tree_update(0, g, w, slots, p)


def test_grads_with_wrong_shape_name_the_path():
    opt, w, slots, p = _setup()
    g = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(3)}}
    with pytest.raises(ValueError, match=r"\['dense'\]\['kernel'\].*\(3, 2\)"):
        opt.tree_update(0, g, w, slots, p)


def test_slots_from_another_tree_raise():
    opt, w, slots, p = _setup()
    g = jax.tree.map(jnp.ones_like, w)
    with pytest.raises(ValueError, match="2 leaves"):
        opt.tree_update(0, g, w, slots[:1], p)
    other, _ = opt.tree_init({"a": jnp.ones((2, 3)), "b": jnp.ones(3)})
    with pytest.raises(ValueError, match="another tree or optimizer"):
        opt.tree_update(0, g, w, other, p)


def test_slots_from_another_optimizer_raise():
    _, w, _, _ = _setup()
    momentum_slots, _ = treeopt.Momentum().tree_init(w)
    opt, _, _, p = _setup(treeopt.Adam())
    g = jax.tree.map(jnp.ones_like, w)
    with pytest.raises(ValueError, match="do not fit Adam"):
        opt.tree_update(0, g, w, momentum_slots, p)


def test_slots_not_a_sequence_raise():
    opt, w, _, p = _setup()
    with pytest.raises(TypeError, match="slots must be"):
        opt.tree_update(0, w, w, {"m": 1}, p)


def test_missing_opt_param_names_it():
    opt, w, slots, p = _setup()
    del p["b2"]
    with pytest.raises(ValueError, match="'b2'"):
        opt.tree_update(0, w, w, slots, p)


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ({"a": "hello"}, r"\['a'\] is a str"),
        ({"a": jnp.ones(3, jnp.int32)}, r"\['a'\] has dtype int32"),
        ([np.array([True])], r"\[0\] has dtype bool"),
        ({"n": 3}, r"\['n'\] has dtype int"),
    ],
)
def test_non_float_weights_raise(weights, match):
    with pytest.raises(TypeError, match=match):
        treeopt.SGD().tree_init(weights)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"learning_rate": -0.1}, r"learning_rate must be in \[0, inf\], got -0.1"),
        ({"learning_rate": float("nan")}, "learning_rate must be"),
        ({"clip_grad_norm": 0.0}, r"clip_grad_norm must be in \(0, inf\]"),
        ({"clip_grad_norm": -1.0}, "clip_grad_norm must be"),
        ({"momentum": None}, r"opt_params\['momentum'\] must be a scalar"),
        ({"momentum": [0.1, 0.2]}, r"opt_params\['momentum'\] must be a scalar"),
    ],
)
def test_base_constructor_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        treeopt.SGD(**kwargs)


def test_clip_grads_rejects_non_positive_max_norm():
    with pytest.raises(ValueError, match="max_norm"):
        treeopt.clip_grads([jnp.ones(2)], 0.0)


def test_reference_global_norm_matches():
    leaves = [np.arange(3.0), np.ones((2, 2))]
    np.testing.assert_allclose(base.l2_norm(leaves), reference.global_norm(leaves))


# ------------------------------------------------ dataclasses, weak typing


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Dense:
    kernel: jax.Array
    bias: jax.Array


def test_registered_dataclass_weights():
    w = Dense(jnp.ones((2, 3)), jnp.zeros(3))
    opt = treeopt.SGD(learning_rate=0.5)
    slots, p = opt.tree_init(w)
    new, _ = opt.tree_update(0, Dense(jnp.ones((2, 3)), jnp.ones(3)), w, slots, p)
    assert isinstance(new, Dense)
    np.testing.assert_allclose(new.bias, -0.5 * np.ones(3))


@pytest.mark.parametrize("promotion", ["standard", "strict"])
@pytest.mark.parametrize(("cls", "kwargs", "case_id"), CASES, ids=IDS)
def test_restored_float64_opt_params_do_not_change_dtypes_or_values(
    cls, kwargs, case_id, promotion
):
    # opt_params that went through NumPy (a checkpoint) are float64 and not weakly
    # typed: results must keep the weights' dtype and equal the fresh run.
    opt = cls(**kwargs)
    w = [jnp.ones((3, 2), jnp.bfloat16), jnp.ones(4, jnp.float32)]
    g = [jnp.full((3, 2), 0.25, jnp.bfloat16), jnp.full(4, -0.5, jnp.float32)]
    slots, p = opt.tree_init(w, store_slots=False)
    restored = {k: np.asarray(v, np.float64) for k, v in p.items()}
    with jax.numpy_dtype_promotion(promotion):
        a, sa = opt.tree_update(1, g, w, slots, p, store_slots=False)
        b, sb = opt.tree_update(1, g, w, slots, restored, store_slots=False)
    assert [x.dtype for x in b] == [jnp.bfloat16, jnp.float32]
    for x, y in zip(jax.tree.leaves((a, sa)), jax.tree.leaves((b, sb)), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(
            np.asarray(x, np.float32), np.asarray(y, np.float32)
        )


class _Scaled(treeopt.Optimizer):
    """A custom optimizer, ``w <- w - lr * scale * g``, that records the dtypes
    ``update`` sees."""

    def __init__(self, **kwargs):
        super().__init__(scale=2.0, **kwargs)
        self.seen = []

    def init(self, weights):
        return None

    def update(self, step, grads, weights, slots, opt_params):
        self.seen.append(
            [jnp.dtype(x.dtype) for x in (grads, weights, *opt_params.values())]
        )
        lr, scale = opt_params["learning_rate"], opt_params["scale"]
        return weights - lr * scale * grads, None

    def slot_axes(self, ndim):
        return []


@pytest.mark.parametrize(
    "low", [jnp.bfloat16, pytest.param(jnp.float16, marks=needs_float16)]
)
def test_update_gets_every_input_in_the_compute_dtype_and_results_cast_back(low):
    opt = _Scaled(learning_rate=0.5)
    weights = [
        jnp.ones((2,)),
        jnp.ones((3,), low),
        jnp.ones(()),
        jnp.ones((1, 2), low),
    ]
    grads = [jnp.full(w.shape, 0.25, w.dtype) for w in weights]
    slots, params = opt.tree_init(weights, store_slots=False)
    new, _ = opt.tree_update(0, grads, weights, slots, params, store_slots=False)
    # 16-bit leaves compute in float32: grads, weights and hyperparameters.
    assert opt.seen == [[jnp.dtype(jnp.float32)] * 4] * 4
    for w, n in zip(weights, new, strict=True):
        assert n.dtype == w.dtype
        np.testing.assert_allclose(np.asarray(n, np.float32), 1 - 0.5 * 2.0 * 0.25)
    w1, _ = opt.update(0, grads[0], weights[0], None, params)
    np.testing.assert_allclose(w1, new[0])


def test_hyperparameters_are_cast_once_per_step_and_compute_dtype(monkeypatch):
    casts = []
    as_dtype = treeopt.base.as_dtype

    def counting(x, dtype):
        if np.ndim(x) == 0:
            casts.append(jnp.dtype(dtype))
        return as_dtype(x, dtype)

    monkeypatch.setattr(treeopt.base, "as_dtype", counting)
    opt = treeopt.Adam()
    weights = [jnp.ones(3), jnp.ones((2, 2), jnp.bfloat16), jnp.ones(4)]
    slots, params = opt.tree_init(weights, store_slots=False)
    opt.tree_update(0, weights, weights, slots, params, store_slots=False)
    # Five hyperparameters, one compute dtype (float32), whatever the leaves.
    assert casts == [jnp.dtype(jnp.float32)] * len(params)


def test_subclass_overriding_update_keeps_its_update_in_tree_update():
    class HalfStepAdam(treeopt.Adam):
        def update(self, step, grads, weights, slots, opt_params):
            return super().update(step, 0.5 * grads, weights, slots, opt_params)

    weights = [jnp.ones((3,))]
    grads = [jnp.array([1.0, -2.0, 3.0])]
    mine, base_adam = HalfStepAdam(learning_rate=0.1), treeopt.Adam(learning_rate=0.1)
    out = {}
    for name, opt in (("mine", mine), ("adam", base_adam)):
        slots, params = opt.tree_init(weights, store_slots=False)
        out[name] = opt.tree_update(0, grads, weights, slots, params, store_slots=False)
    # Adam's first step is nearly sign-invariant to scale; the slots show it.
    (m_mine, _), (m_adam, _) = out["mine"][1][0], out["adam"][1][0]
    np.testing.assert_allclose(m_mine, 0.5 * m_adam, rtol=1e-6)


def test_optimizer_without_update_raises_not_implemented_naming_it():
    class Empty(treeopt.Optimizer):
        def init(self, weights):
            return None

    opt = Empty()
    with pytest.raises(NotImplementedError, match="Empty must define update"):
        opt.update(0, jnp.ones(2), jnp.ones(2), None, opt.opt_params)
    with pytest.raises(NotImplementedError, match="Empty must define update"):
        opt.tree_update(0, [jnp.ones(2)], [jnp.ones(2)], (None,), opt.opt_params)
    with pytest.raises(NotImplementedError, match="Empty must define slot_axes"):
        opt.slot_axes(2)


def test_update_replaced_on_the_instance_is_called_by_tree_update():
    opt = treeopt.SGD(learning_rate=0.1)
    calls = []
    original = opt.update

    def counting(*args):
        calls.append(1)
        return original(*args)

    opt.update = counting
    weights = [jnp.ones(2), jnp.ones(3), jnp.ones(())]
    slots, params = opt.tree_init(weights, store_slots=False)
    new, _ = opt.tree_update(0, weights, weights, slots, params, store_slots=False)
    assert len(calls) == 3
    np.testing.assert_allclose(new[1], 0.9 * np.ones(3), rtol=1e-6)


@pytest.mark.parametrize(("cls", "kwargs", "case_id"), CASES, ids=IDS)
def test_unknown_opt_params_key_names_the_known_ones(cls, kwargs, case_id):
    opt = cls(**kwargs)
    w = {"a": jnp.ones((2, 3))}
    slots, opt_params = opt.tree_init(w, store_slots=False)
    opt_params["lr"] = jnp.float32(1e-3)  # a typo for learning_rate
    known = str(sorted(opt.opt_params))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['lr'\]") as e:
        opt.tree_update(0, w, w, slots, opt_params, store_slots=False)
    assert known in str(e.value), case_id


@pytest.mark.parametrize("step", [-1, np.int32(-3), jnp.asarray(-2)])
def test_negative_concrete_step_raises(step):
    opt = treeopt.Adam()
    w = [jnp.ones(3)]
    slots, p = opt.tree_init(w, store_slots=False)
    with pytest.raises(ValueError, match="step must be >= 0"):
        opt.tree_update(step, w, w, slots, p, store_slots=False)


def test_step_that_is_not_a_scalar_raises():
    opt = treeopt.SGD()
    w = [jnp.ones(3)]
    slots, p = opt.tree_init(w, store_slots=False)
    with pytest.raises(ValueError, match="step must be a scalar"):
        opt.tree_update(jnp.zeros(2, jnp.int32), w, w, slots, p, store_slots=False)


@pytest.mark.parametrize(
    "opt", [treeopt.Adam(), treeopt.Adafactor(), treeopt.SM3(momentum=0.0)]
)
def test_per_step_scalars_are_traced_once_per_step_not_per_leaf(opt):
    # Bias corrections and decay schedules (pow, ==, <) do not grow with leaves.
    def per_step_ops(n_leaves):
        weights = [jnp.ones((3, 2))] * n_leaves
        slots, params = opt.tree_init(weights, store_slots=False)
        jaxpr = jax.make_jaxpr(
            lambda k, w, s: opt.tree_update(k, w, w, s, params, store_slots=False)
        )(0, weights, slots)
        names = [e.primitive.name for e in jaxpr.jaxpr.eqns]
        return sum(n in ("pow", "eq", "lt") for n in names)

    assert per_step_ops(10) == per_step_ops(1) > 0


def test_once_per_step_outside_a_step_just_calls():
    calls = []
    f = lambda x: calls.append(x) or 2 * x
    assert treeopt.base.once_per_step(f, 3) == 6
    assert treeopt.base.once_per_step(f, 3) == 6
    assert calls == [3, 3]
