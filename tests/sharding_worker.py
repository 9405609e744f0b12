"""Runs the sharded cases on 8 virtual CPU devices and writes what it saw.

Started by ``test_sharding.py`` in a subprocess, because the device count must be
set before JAX initializes. For every optimizer configuration and every (mesh,
layout) in ``sharding_cases.COMBOS`` it creates slots with
``treeopt.sharding.tree_init``, runs ``STEPS`` jitted ``tree_update`` calls with
in/out shardings from ``slot_shardings``, and records the results, the shardings
of the returned arrays and the collectives in the compiled HLO. It also runs the
same steps on one device, and measures per-device bytes under FSDP sharding.
Usage: ``python sharding_worker.py OUT_DIR``.
"""

import os
import sys

# The backend optimization level only shortens the ~100 compilations (the SPMD
# partitioning, whose collectives are checked, runs at every level).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
)

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

import sharding_cases as sc
import treeopt
from treeopt import sharding

COLLECTIVES = ("all-gather", "all-to-all", "collective-permute", "all-reduce")


def spec_of(x):
    """The array's PartitionSpec padded to its rank, as JSON-friendly lists."""
    spec = tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))
    return [list(e) if isinstance(e, tuple) else e for e in spec]


def mesh_for(combo):
    types = (jax.sharding.AxisType[combo["axis_type"]],) * len(combo["axes"])
    return jax.make_mesh(combo["shape"], combo["axes"], axis_types=types)


def weight_shardings(mesh, layout):
    return {k: NamedSharding(mesh, PartitionSpec(*v)) for k, v in layout.items()}


def step_fn(opt):
    def fn(step, g, w, s, p):
        return opt.tree_update(step, g, w, s, p, store_slots=False)

    return fn


def run_case(opt, combo, weights, grads):
    mesh = mesh_for(combo)
    w_sh = weight_shardings(mesh, combo["layout"])
    s_sh = sharding.slot_shardings(opt, w_sh)
    w = jax.device_put(weights, w_sh)
    slots, params = sharding.tree_init(opt, w)
    init_specs = [spec_of(x) for x in jax.tree.leaves(slots)]
    update = jax.jit(
        step_fn(opt),
        in_shardings=(None, w_sh, w_sh, s_sh, None),
        out_shardings=(w_sh, s_sh),
    )
    gs = [jax.device_put(g, w_sh) for g in grads]
    compiled = update.lower(jnp.asarray(0), gs[0], w, slots, params).compile()
    hlo = compiled.as_text()
    for k, g in enumerate(gs):
        w, slots = compiled(jnp.asarray(k), g, w, slots, params)
    return {
        "weight_specs": {k: spec_of(x) for k, x in w.items()},
        "slot_specs": [spec_of(x) for x in jax.tree.leaves(slots)],
        "init_specs": init_specs,
        "rule_specs": [
            [list(e) if isinstance(e, tuple) else e for e in s.spec]
            for s in jax.tree.leaves(s_sh)
        ],
        "collectives": sorted(
            {c for c in COLLECTIVES if re.search(c + r"[(.\s-]", hlo)}
        ),
        "arrays": [np.asarray(x) for x in jax.tree.leaves((w, slots))],
    }


def run_single(opt, weights, grads):
    """The leaves of ``(weights, slots)`` at the start and after each step."""
    slots, params = opt.tree_init(weights, store_slots=False)
    update = jax.jit(step_fn(opt))
    w = weights
    path = [[np.asarray(x) for x in jax.tree.leaves((w, slots))]]
    for k, g in enumerate(grads):
        w, slots = update(jnp.asarray(k), g, w, slots, params)
        path.append([np.asarray(x) for x in jax.tree.leaves((w, slots))])
    return path


def memory_table():
    """Bytes per device of weights and slots, FSDP-sharded over 1, 2, 4, 8."""
    weights = {k: np.ones(s, np.float32) for k, s in sc.MEMORY_MODEL.items()}
    rows = []
    for n in (1, 2, 4, 8):
        mesh = jax.make_mesh((n,), ("fsdp",), devices=jax.devices()[:n])
        rule = sharding.fsdp(mesh, "fsdp")
        w_sh = {k: NamedSharding(mesh, rule((k,), x)) for k, x in weights.items()}
        w = jax.device_put(weights, w_sh)
        row = {"n": n, "weights": sharding.bytes_per_device(w)}
        for name, cls, kwargs in sc.MEMORY_OPTIMIZERS:
            slots, _ = sharding.tree_init(cls(**kwargs), w)
            row[name] = sharding.bytes_per_device(slots)
        rows.append({k: v if k == "n" else sorted(v.values()) for k, v in row.items()})
    return rows


def run_trainer(opt, combo):
    """Losses, weights and layouts of TRAINER_STEPS data-parallel steps (or of
    one device when ``combo`` is None)."""
    weights, batch = sc.mlp_problem()
    kwargs = {}
    if combo is not None:
        mesh = mesh_for(combo)
        rules = {
            None: None,
            "fsdp": sharding.fsdp(mesh, "data"),
            "model": sc.last_axis_on_model,
        }
        kwargs = {"mesh": mesh, "sharding_rule": rules[combo["rule"]]}
    traces = []

    def loss_fn(w, batch, rng):
        traces.append(1)
        return sc.mlp_loss(w, batch, rng)

    trainer = treeopt.Trainer(loss_fn, opt, weights, **kwargs)
    key = jax.random.key(0)
    path = [[np.asarray(x) for x in jax.tree.leaves(trainer.weights)]]
    losses = []
    for _ in range(sc.TRAINER_STEPS):
        losses.append(float(trainer.one_step(batch, key)[0]))
        path.append([np.asarray(x) for x in jax.tree.leaves(trainer.weights)])
    rec = {"losses": losses, "traces": len(traces)}
    if combo is not None:
        rec["weight_specs"] = {k: spec_of(x) for k, x in trainer.weights.items()}
        rec["slot_specs"] = [spec_of(x) for x in jax.tree.leaves(trainer.slots)]
    return rec, path


def trainer_errors():
    """Messages of the data-parallel Trainer's input errors on 8 devices."""
    weights, (x, y) = sc.mlp_problem()
    mesh = jax.make_mesh((8,), ("data",))
    trainer = treeopt.Trainer(sc.mlp_loss, treeopt.SGD(), weights, mesh=mesh)
    try:
        trainer.one_step((x[:30], y[:30]), jax.random.key(0))
    except ValueError as e:
        return {"rows": str(e)}
    return {"rows": None}


def main(out_dir):
    weights = {k: v for k, v in zip(sc.SHAPES, sc.leaves(0), strict=True)}
    grads = [
        {k: v for k, v in zip(sc.SHAPES, sc.leaves(s), strict=True)}
        for s in range(1, sc.STEPS + 1)
    ]
    summary, arrays = {}, {}
    for cls, kwargs, case_id in sc.OPTIMIZERS:
        path = run_single(cls(**kwargs), weights, grads)
        arrays[f"{case_id}/single"] = path[-1]
        for t, leaves in enumerate(path):
            arrays[f"{case_id}/path{t}"] = leaves
        for combo_id, combo in sc.COMBOS.items():
            rec = run_case(cls(**kwargs), combo, weights, grads)
            arrays[f"{case_id}/{combo_id}"] = rec.pop("arrays")
            summary[f"{case_id}/{combo_id}"] = rec
    for opt_id, cls, kwargs in sc.TRAINER_OPTIMIZERS:
        rec, path = run_trainer(cls(**kwargs), None)
        summary[f"trainer/{opt_id}/single"] = rec
        arrays[f"trainer/{opt_id}/single"] = path[-1]
        for t, leaves in enumerate(path):
            arrays[f"trainer/{opt_id}/path{t}"] = leaves
        for combo_id, combo in sc.TRAINER_COMBOS.items():
            key = f"trainer/{opt_id}/{combo_id}"
            summary[key], path = run_trainer(cls(**kwargs), combo)
            arrays[key] = path[-1]
    summary["trainer_errors"] = trainer_errors()
    summary["memory"] = memory_table()
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f)
    np.savez(
        os.path.join(out_dir, "arrays.npz"),
        **{f"{k}/{i}": a for k, v in arrays.items() for i, a in enumerate(v)},
    )


if __name__ == "__main__":
    main(sys.argv[1])
