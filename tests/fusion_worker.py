"""Runs in a process started with XLA:CPU's multi-output fusion on (see
test_fusion.py): steps every elementwise case in the sibling form and writes the
results, and the kernels that one large leaf's step compiles to, as an .npz file."""

import sys

import jax
import jax.numpy as jnp
import numpy as np

import fusion_cases as fc
from treeopt import bench, fusion


def main(out_path: str) -> None:
    results = {"on": np.asarray(fusion.cpu_multi_output_fusion())}
    for case_id in fc.CASES:
        for path, x in fc.run_case(case_id, sibling=True).items():
            results[f"{case_id}/{path}"] = x
    for case_id in fc.PROFILED:
        opt = fc.optimizer(case_id, sibling=True)
        w = {"w": jnp.zeros(fc.BIG, jnp.float32)}
        slots, op = opt.tree_init(w, store_slots=False)

        def step(i, p, s, g, o, opt=opt):
            return opt.tree_update(i, g, p, s, o, store_slots=False)

        text = jax.jit(step, donate_argnums=(1, 2)).lower(0, w, slots, w, op)
        passes = bench.hlo_passes(text.compile().as_text(), fc.BIG)
        results[f"{case_id}/kernels"] = np.asarray([n for _, n in passes])
    np.savez(out_path, **results)


if __name__ == "__main__":
    main(sys.argv[1])
