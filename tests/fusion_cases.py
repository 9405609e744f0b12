"""The elementwise cases that test_fusion.py runs with XLA:CPU's multi-output
fusion off (in the test process) and on (in fusion_worker.py)."""

import jax
import jax.numpy as jnp
import numpy as np

import treeopt
from treeopt import fusion, packed

STEPS = 3
BIG = (512, 256)  # the leaf whose compiled kernels are counted

CASES = {
    "sgd": lambda: treeopt.SGD(0.1),
    "momentum-nesterov": lambda: treeopt.Momentum(0.1),
    "momentum-heavy-wd-clip": lambda: treeopt.Momentum(
        0.1, nesterov=False, weight_decay_rate=0.05, clip_grad_norm=0.5
    ),
    "rmsprop": lambda: treeopt.RMSProp(0.05),
    "rmsprop-clip": lambda: treeopt.RMSProp(0.05, clip_grad_norm=0.5),
    "adam": lambda: treeopt.Adam(0.05),
    "adam-wd": lambda: treeopt.Adam(0.05, weight_decay_rate=0.1),
    "adam-packed": lambda: treeopt.Adam(0.05),
}
PROFILED = {k: CASES[k] for k in ("momentum-nesterov", "rmsprop", "adam")}


def make_tree(seed: int) -> dict:
    """float32 and bfloat16 leaves of ranks 0 to 3."""
    rng = np.random.default_rng(seed)

    def r(shape, dtype=jnp.float32):
        return jnp.asarray(rng.standard_normal(shape), dtype)

    return {
        "dense": {"kernel": r((33, 17)), "bias": r((17,))},
        "scale": r(()),
        "conv": r((2, 3, 4)),
        "embed": r((40, 8), jnp.bfloat16),
    }


def optimizer(case_id: str, sibling: bool):
    """The case's optimizer, in the sibling form if asked, packed if its id
    says so."""
    opt = CASES[case_id]()
    if sibling:
        opt = fusion.SiblingOutputs(opt)
    if case_id.endswith("-packed"):
        return packed.Packed(opt, make_tree(0))
    return opt


def run_case(case_id: str, sibling: bool) -> dict[str, np.ndarray]:
    """``STEPS`` jitted, donated steps; the weights and slots by path, as float32
    (exact for bfloat16)."""
    opt = optimizer(case_id, sibling)
    weights = make_tree(0)
    if isinstance(opt, packed.Packed):  # packed weights, gradients and slots
        weights = opt.pack(weights)
        slots, opt_params = opt.init(weights)

        def step(i, w, s, g, o):
            return opt.update(i, opt.pack(g), w, s, o)

    else:
        slots, opt_params = opt.tree_init(weights, store_slots=False)

        def step(i, w, s, g, o):
            return opt.tree_update(i, g, w, s, o, store_slots=False)

    jitted = jax.jit(step, donate_argnums=(1, 2))
    for i in range(STEPS):
        weights, slots = jitted(i, weights, slots, make_tree(i + 1), opt_params)
    if isinstance(opt, packed.Packed):
        weights, slots = opt.unpack(weights), opt.unpack_slots(slots)
    flat = jax.tree_util.tree_flatten_with_path((weights, slots))[0]
    return {jax.tree_util.keystr(path): np.asarray(x, np.float32) for path, x in flat}
