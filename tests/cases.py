"""The table of optimizer configurations that drives the cross-cutting tests.

Each case is ``(cls, kwargs, id)``. Hyperparameters are chosen so that a few
steps move the weights by a visible fraction (large learning rates), which
makes the reference comparisons sensitive to the update, not only to ``w``.
"""

import treeopt
from treeopt import MomentumType

CASES = [
    (treeopt.SGD, {"learning_rate": 0.1}, "sgd"),
    (treeopt.SGD, {"learning_rate": 0.1, "clip_grad_norm": 0.5}, "sgd-clip"),
    (treeopt.Adam, {"learning_rate": 0.05}, "adam"),
    (treeopt.Adam, {"learning_rate": 0.05, "weight_decay_rate": 0.1}, "adam-wd"),
    (treeopt.Adam, {"learning_rate": 0.05, "clip_grad_norm": 0.5}, "adam-clip"),
    (treeopt.Momentum, {"learning_rate": 0.1}, "momentum-nesterov"),
    (treeopt.Momentum, {"learning_rate": 0.1, "nesterov": False}, "momentum-heavy"),
    (
        treeopt.Momentum,
        {"learning_rate": 0.1, "weight_decay_rate": 0.05, "clip_grad_norm": 0.5},
        "momentum-wd-clip",
    ),
    (treeopt.RMSProp, {"learning_rate": 0.05}, "rmsprop"),
    (treeopt.RMSProp, {"learning_rate": 0.05, "clip_grad_norm": 0.5}, "rmsprop-clip"),
    (treeopt.Adafactor, {"learning_rate": 0.5}, "adafactor"),
    (
        treeopt.Adafactor,
        {"learning_rate": 0.5, "factored": False},
        "adafactor-unfactored",
    ),
    (
        treeopt.Adafactor,
        {"learning_rate": 0.05, "multiply_by_parameter_scale": False},
        "adafactor-no-scale",
    ),
    (
        treeopt.Adafactor,
        {"learning_rate": 0.5, "do_clipping": False},
        "adafactor-no-clip",
    ),
    (
        treeopt.Adafactor,
        {"learning_rate": 0.5, "clipping_threshold": 0.3},
        "adafactor-clip-0.3",
    ),
    (
        treeopt.Adafactor,
        {"learning_rate": 0.5, "do_momentum": True, "beta1": 0.9},
        "adafactor-momentum",
    ),
    (
        treeopt.Adafactor,
        {"learning_rate": 0.5, "weight_decay_rate": 0.1, "weight_decay_n_steps": 3},
        "adafactor-wd-n-steps",
    ),
    (
        treeopt.Adafactor,
        {
            "learning_rate": 0.5,
            "clipping_threshold": None,
            "weight_decay_n_steps": None,
        },
        "adafactor-none-options",
    ),
    (
        treeopt.Adafactor,
        {"learning_rate": 0.5, "clip_grad_norm": 0.5},
        "adafactor-global-clip",
    ),
    (treeopt.SM3, {"learning_rate": 0.1}, "sm3-ema"),
    (treeopt.SM3, {"learning_rate": 0.1, "clip_grad_norm": 0.5}, "sm3-clip"),
    (
        treeopt.SM3,
        {"learning_rate": 0.1, "momentum_type": MomentumType.HEAVY_BALL},
        "sm3-heavy-ball",
    ),
    (
        treeopt.SM3,
        {"learning_rate": 0.1, "momentum_type": MomentumType.NESTEROV},
        "sm3-nesterov",
    ),
    (treeopt.SM3, {"learning_rate": 0.1, "momentum": 0.0}, "sm3-no-momentum"),
    (
        treeopt.SM3,
        {"learning_rate": 0.1, "second_moment_averaging": 0.9, "weight_decay": 0.01},
        "sm3-graft-wd",
    ),
    (
        treeopt.SM3,
        {
            "learning_rate": 0.1,
            "second_moment_averaging": 0.9,
            "momentum_type": MomentumType.NESTEROV,
        },
        "sm3-graft-nesterov",
    ),
    (
        treeopt.SM3,
        {"learning_rate": 0.1, "momentum": 0.0, "second_moment_averaging": 0.9},
        "sm3-graft-no-momentum",
    ),
]

# bfloat16 momentum is excluded from CASES because its slot is rounded: it is
# compared against the reference at bfloat16 tolerance in test_adafactor.py.
BF16_MOMENTUM = (
    treeopt.Adafactor,
    {
        "learning_rate": 0.5,
        "do_momentum": True,
        "beta1": 0.9,
        "momentum_in_bfloat16": True,
    },
    "adafactor-bf16-momentum",
)

IDS = [c[2] for c in CASES]
