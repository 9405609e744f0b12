"""The sharded cases shared by ``test_sharding.py`` and ``sharding_worker.py``.

Importing this module does not touch JAX's devices, so the test process (one
CPU device) and the worker (8 virtual devices) read the same table.
"""

import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

import treeopt

from cases import CASES

STEPS = 3

# Weight tree: a square matrix (its row and column statistics have the same
# shape), a 3-D leaf (Adafactor's v_row/v_col keep two axes each), a vector and
# a scalar.
SHAPES = {
    "bias": (8,),
    "conv": (4, 8, 16),
    "emb": (16, 8),
    "kernel": (8, 8),
    "scale": (),
}

# (mesh shape, axis names, axis type, one PartitionSpec per leaf), with each
# leaf's spec given in full (one entry per axis). Explicit is jax.make_mesh's
# default in JAX 0.10 (sharding in types); Auto leaves propagation to XLA.
_DATA8 = {"shape": (8,), "axes": ("data",), "axis_type": "Explicit"}
_X8 = {"shape": (8,), "axes": ("x",), "axis_type": "Explicit"}
_2X4 = {"shape": (2, 4), "axes": ("a", "b"), "axis_type": "Explicit"}
_4X2 = {"shape": (4, 2), "axes": ("a", "b"), "axis_type": "Explicit"}
COMBOS = {
    "x8-rows": {
        **_X8,
        "layout": {
            "bias": ("x",),
            "conv": (None, "x", None),
            "emb": ("x", None),
            "kernel": ("x", None),
            "scale": (),
        },
    },
    "x8-cols": {
        **_X8,
        "layout": {
            "bias": (None,),
            "conv": (None, None, "x"),
            "emb": (None, "x"),
            "kernel": (None, "x"),
            "scale": (),
        },
    },
    "2x4": {
        **_2X4,
        "layout": {
            "bias": ("b",),
            "conv": ("a", None, "b"),
            "emb": ("a", "b"),
            "kernel": ("b", "a"),
            "scale": (),
        },
    },
    "4x2": {
        **_4X2,
        "layout": {
            "bias": (("b", "a"),),
            "conv": ("a", "b", None),
            "emb": (("a", "b"), None),
            "kernel": (None, "a"),
            "scale": (),
        },
    },
    "2x4-auto": {
        **_2X4,
        "axis_type": "Auto",
        "layout": {
            "bias": ("a",),
            "conv": (None, "b", "a"),
            "emb": (None, ("a", "b")),
            "kernel": ("a", "b"),
            "scale": (),
        },
    },
}

# Every optimizer class, and the variants that change the slot layout (factored
# or not, momentum, grafting, ``[]`` placeholders) or add a global reduction
# (clipping, grafting norms).
_IDS = (
    "sgd-clip",
    "adam",
    "momentum-nesterov",
    "rmsprop-clip",
    "adafactor-unfactored",
    "adafactor-momentum",
    "sm3-ema",
    "sm3-graft-no-momentum",
)
OPTIMIZERS = [c for c in CASES if c[2] in _IDS]
assert len(OPTIMIZERS) == len(_IDS)

# A small transformer-like block for the per-device memory table: every leaf
# has an axis divisible by 8, so FSDP shards all of them.
MEMORY_MODEL = {
    "embed": (2048, 256),
    "attn_qkv": (256, 768),
    "attn_out": (256, 256),
    "mlp_in": (256, 1024),
    "mlp_out": (1024, 256),
    "mlp_bias": (1024,),
    "ln_scale": (256,),
}
MEMORY_OPTIMIZERS = [
    ("Adam", treeopt.Adam, {}),
    ("Adafactor", treeopt.Adafactor, {}),
    ("SM3", treeopt.SM3, {}),
]


def leaves(seed):
    """Deterministic float32 leaves for ``SHAPES``, in its key order."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in SHAPES.values()]


# ------------------------------------------------------------------ Trainer

TRAINER_STEPS = 4


def mlp_problem():
    """A one-hidden-layer regression: weights and one batch of 32 rows."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 16)).astype(np.float32)
    y = np.tanh(x @ rng.standard_normal((16, 8))).astype(np.float32)
    weights = {
        "b1": np.full((32,), 0.1, np.float32),
        "w1": (0.3 * rng.standard_normal((16, 32))).astype(np.float32),
        "w2": (0.3 * rng.standard_normal((32, 8))).astype(np.float32),
    }
    return weights, (x, y)


# The terms of the sums in one loss (and gradient) of the MLP: the products of
# x @ w1 (16) and h @ w2 (32) and the mean over 32 rows x 8 outputs (256). Two
# programs that sum them in other orders (devices, fusions) differ by at most
# that many roundings, relative (helpers.assert_sum_close).
MLP_SUM_TERMS = 16 + 32 + 32 * 8


def mlp_loss(weights, batch, rng):
    del rng
    x, y = batch
    h = jnp.tanh(x @ weights["w1"] + weights["b1"][None, :])
    return jnp.mean((h @ weights["w2"] - y) ** 2)


def last_axis_on_model(path, x):
    """A tensor-parallel rule: each weight's last axis over mesh axis 'model'."""
    del path
    return PartitionSpec(*([None] * (np.ndim(x) - 1)), "model")


# (mesh, rule name, expected weight specs, in full).
_REPLICATED = {"b1": [None], "w1": [None, None], "w2": [None, None]}
TRAINER_COMBOS = {
    "data8": {**_DATA8, "rule": None, "weights": _REPLICATED},
    "data8-fsdp": {
        **_DATA8,
        "rule": "fsdp",
        "weights": {"b1": ["data"], "w1": [None, "data"], "w2": ["data", None]},
    },
    "data8-fsdp-auto": {
        **_DATA8,
        "axis_type": "Auto",
        "rule": "fsdp",
        "weights": {"b1": ["data"], "w1": [None, "data"], "w2": ["data", None]},
    },
    "data4-model2": {
        "shape": (4, 2),
        "axes": ("data", "model"),
        "axis_type": "Explicit",
        "rule": "model",
        "weights": {"b1": ["model"], "w1": [None, "model"], "w2": [None, "model"]},
    },
}
TRAINER_OPTIMIZERS = [
    ("adafactor-momentum", treeopt.Adafactor, {"do_momentum": True, "beta1": 0.9}),
    ("sm3-graft", treeopt.SM3, {"second_moment_averaging": 0.9}),
]
