"""One process of a multi-process data-parallel Trainer run on CPU.

Started twice by ``test_multihost.py`` (process ids 0 and 1), each with 4
virtual CPU devices, joined by ``jax.distributed.initialize`` over 127.0.0.1 and
gloo collectives. The mesh spans all 8 devices of both processes; the weights
are FSDP-sharded over it; each process feeds its own half of the batch rows.
Writes the losses and the gathered final weights as JSON.
Usage: ``python multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.json``.
"""

import json
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

import sharding_cases as sc
import treeopt
from treeopt import sharding

LOCAL_DEVICES = 4


def main(process_id, num_processes, port, out_path):
    jax.config.update("jax_num_cpu_devices", LOCAL_DEVICES)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        f"127.0.0.1:{port}",
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=60,
    )
    print(
        f"process {jax.process_index()}/{jax.process_count()}: "
        f"{jax.local_device_count()} local devices, {jax.device_count()} global",
        flush=True,
    )
    weights, (x, y) = sc.mlp_problem()
    rows = len(x) // num_processes
    mine = slice(process_id * rows, (process_id + 1) * rows)
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    opt_id, cls, kwargs = sc.TRAINER_OPTIMIZERS[0]
    trainer = treeopt.Trainer(
        sc.mlp_loss,
        cls(**kwargs),
        weights,
        mesh=mesh,
        sharding_rule=sharding.fsdp(mesh, "data"),
    )
    key = jax.random.key(0)
    losses = []
    for step in range(sc.TRAINER_STEPS):
        loss, _ = trainer.one_step((x[mine], y[mine]), key)
        losses.append(float(loss))
        print(
            f"process {process_id} step {step} {opt_id} loss {losses[-1]:.7f}",
            flush=True,
        )
    held = sharding.bytes_per_device(trainer.weights)
    print(
        f"process {process_id}: weights {sorted(held.values())} bytes on its "
        f"{len(held)} devices",
        flush=True,
    )
    final = multihost_utils.process_allgather(trainer.weights, tiled=True)
    with open(out_path, "w") as f:
        json.dump(
            {
                "losses": losses,
                "weights": {k: np.asarray(v).tolist() for k, v in final.items()},
            },
            f,
        )
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
