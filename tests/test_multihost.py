"""The data-parallel Trainer across 2 processes x 4 CPU devices (jax.distributed,
gloo) trains exactly like one process on one device."""

import contextlib
import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np

import sharding_cases as sc
import treeopt

from helpers import assert_reordered_close, assert_sum_close, isa_flags

HERE = os.path.dirname(os.path.abspath(__file__))
PROCESSES = 2
DEADLINE_S = 120  # both processes together; they normally finish in seconds


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path):
    """Runs the processes; returns their [(exit code, output)] and result paths.
    Kills every process still running at the deadline or once one has failed."""
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": isa_flags(), "JAX_PLATFORMS": "cpu"}
    outs = [tmp_path / f"process{i}.json" for i in range(PROCESSES)]
    procs = []
    with contextlib.ExitStack() as stack:
        logs = [
            stack.enter_context(open(tmp_path / f"process{i}.log", "w+"))
            for i in range(PROCESSES)
        ]
        try:
            for i in range(PROCESSES):
                cmd = [sys.executable, os.path.join(HERE, "multihost_worker.py")]
                cmd += [str(i), str(PROCESSES), str(port), str(outs[i])]
                procs.append(
                    subprocess.Popen(
                        cmd, cwd=HERE, env=env, stdout=logs[i], stderr=subprocess.STDOUT
                    )
                )
            end = time.monotonic() + DEADLINE_S
            while time.monotonic() < end and any(p.poll() is None for p in procs):
                if any(p.poll() not in (None, 0) for p in procs):
                    break  # the others would wait for the failed one until timeout
                time.sleep(0.2)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
        runs = []
        for p, log in zip(procs, logs, strict=True):
            log.seek(0)
            runs.append((p.returncode, log.read()))
    return runs, outs


def test_two_processes_train_like_one_device(tmp_path):
    runs, outs = _launch(tmp_path)
    for i, (rc, output) in enumerate(runs):
        assert rc == 0, f"process {i} exited with {rc}:\n{output[-4000:]}"
        print(output)
    assert "process 0/2: 4 local devices, 8 global" in runs[0][1]
    assert "process 1/2: 4 local devices, 8 global" in runs[1][1]
    results = [json.loads(out.read_text()) for out in outs]

    weights, batch = sc.mlp_problem()
    _, cls, kwargs = sc.TRAINER_OPTIMIZERS[0]
    single = treeopt.Trainer(sc.mlp_loss, cls(**kwargs), weights)
    key = jax.random.key(0)
    losses, path = [], [jax.tree.map(np.asarray, single.weights)]
    for _ in range(sc.TRAINER_STEPS):
        losses.append(float(single.one_step(batch, key)[0]))
        path.append(jax.tree.map(np.asarray, single.weights))
    assert losses[-1] < losses[0]
    for r in results:
        assert_sum_close(r["losses"], losses, sc.MLP_SUM_TERMS, "losses")
        got = {k: np.asarray(w, np.float32) for k, w in r["weights"].items()}
        assert_reordered_close(got, path[-1], path, sc.MLP_SUM_TERMS, "weights")
    # Each process holds half of the FSDP-sharded weights: 1/8 per device.
    total = 4 * sum(np.size(w) for w in weights.values())
    for _, output in runs:
        assert f"weights {[total // 8] * 4} bytes on its 4 devices" in output
