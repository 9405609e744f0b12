"""Schedules: hand-computed values, jit == eager, multifactor == its factors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from treeopt import schedules

# (schedule, step, value computed by hand)
HAND_VALUES = [
    (schedules.constant(0.3), 0, 0.3),
    (schedules.constant(0.3), 12345, 0.3),
    (schedules.linear_warmup(0.2, 10), 0, 0.0),
    (schedules.linear_warmup(0.2, 10), 5, 0.1),  # 0.2 * 5/10
    (schedules.linear_warmup(0.2, 10), 10, 0.2),
    (schedules.linear_warmup(0.2, 10), 50, 0.2),
    (schedules.linear_warmup(0.2, 0), 0, 0.2),  # no warmup: Trax divides by 0
    (schedules.rsqrt_decay(0.5, 100), 0, 0.5),
    (schedules.rsqrt_decay(0.5, 100), 100, 0.5),
    (schedules.rsqrt_decay(0.5, 100), 400, 0.25),  # 0.5 * sqrt(100/400)
    (schedules.rsqrt_decay(0.5, 0), 0, 0.5),  # sqrt(1 / max(0, 0, 1))
    (schedules.rsqrt_decay(0.5, 0), 4, 0.25),  # 0.5 / sqrt(4)
    (schedules.cosine_decay(1.0, 100), 0, 1.0),
    (schedules.cosine_decay(1.0, 100), 25, (1 + math.cos(math.pi / 4)) / 2),
    (schedules.cosine_decay(1.0, 100), 50, 0.5),
    (schedules.cosine_decay(1.0, 100), 100, 1.0),  # Trax's cycle restarts
    (schedules.cosine_decay(2.0, 100, warmup_steps=20), 10, 2.0),
    (schedules.cosine_decay(2.0, 100, warmup_steps=20), 70, 1.0),
    (schedules.warmup(10, 1.0), 3, 0.3),
    (schedules.warmup_and_rsqrt_decay(100, 0.01), 50, 0.005),
    (schedules.warmup_and_rsqrt_decay(100, 0.01), 100, 0.01),
    (schedules.warmup_and_rsqrt_decay(100, 0.01), 400, 0.005),
    # Trax's default: 0.1 * min(1, s/400) / sqrt(max(s, 400))
    (schedules.multifactor(), 100, 0.1 * 0.25 / 20),
    (schedules.multifactor(), 1600, 0.1 / 40),
    (schedules.multifactor("constant * decay_every", 1.0, steps_per_decay=10), 9, 1.0),
    (schedules.multifactor("constant * decay_every", 1.0, steps_per_decay=10), 10, 0.5),
    (
        schedules.multifactor(
            "constant*decay_every", 1.0, decay_factor=0.5, steps_per_decay=10
        ),
        35,
        0.125,
    ),
    (
        schedules.multifactor(
            "two_constants", 1.0, second_constant=0.1, second_constant_step=5
        ),
        4,
        1.0,
    ),
    (
        schedules.multifactor(
            "two_constants", 1.0, second_constant=0.1, second_constant_step=5
        ),
        5,
        0.1,
    ),
    (
        schedules.multifactor(
            "constant * linear_warmup", 1.0, warmup_steps=10, minimum=0.05
        ),
        0,
        0.05,
    ),
]


@pytest.mark.parametrize("schedule, step, expected", HAND_VALUES)
def test_value_by_hand(schedule, step, expected):
    value = schedule(step)
    assert value.shape == () and value.dtype == jnp.float32
    np.testing.assert_allclose(float(value), expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("schedule, step, expected", HAND_VALUES)
def test_jit_equals_eager(schedule, step, expected):
    del expected
    eager = schedule(step)
    jitted = jax.jit(schedule)(jnp.asarray(step, jnp.int32))
    assert jitted.dtype == jnp.float32 and jitted.shape == ()
    np.testing.assert_allclose(jitted, eager, rtol=1e-6)


def test_float32_under_x64(x64):
    del x64
    value = schedules.multifactor()(jnp.asarray(123, jnp.int64))
    assert value.dtype == jnp.float32


ALL_FACTORS = (
    "constant * two_constants * linear_warmup * rsqrt_decay * "
    "rsqrt_normalized_decay * decay_every * cosine_decay"
)
KWARGS = dict(
    constant=0.7,
    warmup_steps=30,
    decay_factor=0.8,
    steps_per_decay=25,
    steps_per_cycle=200,
    second_constant=0.2,
    second_constant_step=60,
)


def trax_multifactor_f64(step, c, w, df, spd, spc, c2, s2):
    """Trax's formulas in float64, for one step (w >= 1 so no special cases)."""
    lr = c * (c if step < s2 else c2)
    lr *= min(1.0, step / w)
    lr /= math.sqrt(max(step, w))
    lr *= math.sqrt(w) / math.sqrt(max(step, w))
    lr *= df ** (step // spd)
    progress = max(0.0, (step - w) / spc)
    return lr * 0.5 * (1 + math.cos(math.pi * (progress % 1.0)))


def test_multifactor_equals_product_of_factors():
    steps = jnp.arange(0, 500, 7)
    combined = jax.vmap(schedules.multifactor(ALL_FACTORS, **KWARGS))(steps)
    product = np.ones(steps.shape, np.float64)
    for name in ALL_FACTORS.split("*"):
        single = schedules.multifactor(name.strip(), **KWARGS)
        product *= np.asarray(jax.vmap(single)(steps), np.float64)
    np.testing.assert_allclose(combined, product, rtol=2e-6, atol=1e-12)
    ref = [trax_multifactor_f64(int(s), *KWARGS.values()) for s in steps]
    np.testing.assert_allclose(combined, ref, rtol=2e-5, atol=1e-12)


def test_one_compilation_for_all_steps():
    traces = []

    def counted(step):
        traces.append(1)
        return schedules.multifactor()(step)

    jitted = jax.jit(counted)
    values = [float(jitted(jnp.asarray(s, jnp.int32))) for s in (0, 1, 400, 10**6)]
    assert len(traces) == 1
    assert values[0] == 0.0 and values[2] > values[3] > 0


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: schedules.linear_warmup(0.1, -1), r"warmup_steps must be .*>= 0.*-1"),
        (lambda: schedules.rsqrt_decay(0.1, 2.5), r"warmup_steps must be an integer"),
        (lambda: schedules.multifactor("constant * linear_warmpu"), "linear_warmpu"),
        (lambda: schedules.multifactor("constant * "), r"unknown schedule factor ''"),
        (lambda: schedules.cosine_decay(0.1, 0), r"steps_per_cycle must be .*>= 1"),
        (
            lambda: schedules.multifactor("decay_every", steps_per_decay=0),
            r"steps_per_decay must be .*>= 1",
        ),
        (
            lambda: schedules.multifactor("decay_every", decay_factor=0.0),
            r"decay_factor must be in \(0",
        ),
    ],
)
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()
