"""Data-parallel and FSDP training with treeopt on JAX's own runtime.

One process (8 virtual CPU devices when there is no accelerator)::

    python examples/data_parallel.py             # weights replicated
    python examples/data_parallel.py --fsdp      # weights and slots sharded

Several processes (here 2 on one machine, 4 CPU devices each; on a cluster run
one per host with the coordinator's address)::

    python examples/data_parallel.py --fsdp --devices 4 --num-processes 2 \\
        --coordinator 127.0.0.1:1234 --process-id 0 &
    python examples/data_parallel.py --fsdp --devices 4 --num-processes 2 \\
        --coordinator 127.0.0.1:1234 --process-id 1

Prints the per-device memory of weights and slots sharded 1, 2, 4 and 8 ways,
then trains a small MLP with ``treeopt.Trainer(..., mesh=...)`` and compares
its losses with a one-device run.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import treeopt
from treeopt import sharding

# A transformer-sized block of weights for the memory table.
MEMORY_MODEL = {
    "embed": (2048, 256),
    "attn_qkv": (256, 768),
    "attn_out": (256, 256),
    "mlp_in": (256, 1024),
    "mlp_out": (1024, 256),
    "mlp_bias": (1024,),
    "ln_scale": (256,),
}


def memory_table():
    """Per-device bytes of weights and slots under FSDP sharding (one process)."""
    weights = {k: np.ones(s, np.float32) for k, s in MEMORY_MODEL.items()}
    opts = {
        "Adam": treeopt.Adam(),
        "Adafactor": treeopt.Adafactor(),
        "SM3": treeopt.SM3(),
    }
    print("per-device KiB, FSDP over n devices (weights and slots sharded):")
    print(f"{'n':>3} {'weights':>9} " + " ".join(f"{k + ' slots':>16}" for k in opts))
    n = 1
    while n <= len(jax.devices()):
        mesh = jax.make_mesh((n,), ("fsdp",), devices=jax.devices()[:n])
        rule = sharding.fsdp(mesh, "fsdp")
        w = jax.device_put(
            weights,
            {k: jax.NamedSharding(mesh, rule(k, x)) for k, x in weights.items()},
        )
        cols = [max(sharding.bytes_per_device(w).values())]
        for opt in opts.values():
            slots, _ = sharding.tree_init(opt, w)
            cols.append(max(sharding.bytes_per_device(slots).values()))
        print(
            f"{n:>3} {cols[0] / 1024:>9.1f} "
            + " ".join(f"{c / 1024:>16.1f}" for c in cols[1:])
        )
        n *= 2


def problem(rows=256):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, 32)).astype(np.float32)
    y = np.sin(x @ rng.standard_normal((32, 4))).astype(np.float32)
    weights = {
        "w1": (rng.standard_normal((32, 128)) / np.sqrt(32)).astype(np.float32),
        "b1": np.zeros((128,), np.float32),
        "w2": (rng.standard_normal((128, 4)) / np.sqrt(128)).astype(np.float32),
    }
    return weights, x, y


def loss_fn(weights, batch, rng):
    del rng
    x, y = batch
    h = jax.nn.gelu(x @ weights["w1"] + weights["b1"][None, :])
    return jnp.mean((h @ weights["w2"] - y) ** 2)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fsdp", action="store_true", help="shard the weights too")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--devices", type=int, default=8, help="CPU devices per process"
    )
    parser.add_argument("--coordinator", help="host:port of process 0")
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    args = parser.parse_args()

    # Virtual CPU devices; ignored when JAX runs on an accelerator. Must be set
    # before JAX starts its backend.
    jax.config.update("jax_num_cpu_devices", args.devices)
    if args.num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
        )
    me = jax.process_index()
    print(
        f"process {me}/{jax.process_count()}: {jax.local_device_count()} local "
        f"devices, {jax.device_count()} in the mesh"
    )
    if jax.process_count() == 1:
        memory_table()

    weights, x, y = problem()
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    rule = sharding.fsdp(mesh, "data") if args.fsdp else None
    trainer = treeopt.Trainer(
        loss_fn, treeopt.Adam(1e-2), weights, mesh=mesh, sharding_rule=rule
    )
    reference = treeopt.Trainer(loss_fn, treeopt.Adam(1e-2), weights)
    rows = len(x) // jax.process_count()  # each process feeds its own rows
    mine = slice(me * rows, (me + 1) * rows)
    key = jax.random.key(0)
    for step in range(args.steps):
        loss, _ = trainer.one_step((x[mine], y[mine]), key)
        want, _ = reference.one_step((x, y), key)
        if step % 5 == 0 or step == args.steps - 1:
            print(
                f"step {step:3d}  loss {float(loss):.6f}  one device {float(want):.6f}"
            )
    held = sharding.bytes_per_device(trainer.weights)
    print(
        f"weights per local device: {sorted(held.values())} bytes "
        f"({'FSDP' if args.fsdp else 'replicated'})"
    )
    if args.num_processes > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
