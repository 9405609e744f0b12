"""treeopt vs optax on one accelerator: a 1.08B-parameter transformer tree and
1000 small leaves. Needs only jax, optax and numpy: treeopt is imported from this
checkout's ``src/``. Rows run most important first; none starts after
``--budget`` seconds, so the whole run stays under about 4 minutes.

    python benchmarks/gpu.py --out $OUT/gpu.json
"""

import argparse
import os
import sys
import time

# The 1B Adam row holds about 12x its 4.3 GB of parameters (weights and state of
# treeopt, optax and packed, the tree's weights and gradients) and a 1 GB probe.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
sys.path.insert(0, SRC)

from treeopt import bench  # noqa: E402  (after the sys.path line)

ROWS = [
    ("transformer_1b", "adam"),
    ("transformer_1b", "adafactor"),
    ("transformer_1b", "sm3"),
    ("many_small", "adam"),
    ("many_small", "adafactor"),  # optax's takes about a minute to compile
    ("many_small", "sgd"),
    ("transformer_1b", "sgd"),
    ("many_small", "sm3"),
    ("many_small", "momentum"),
    ("many_small", "rmsprop"),
    ("transformer_1b", "momentum"),
    ("transformer_1b", "rmsprop"),
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu.json", help="JSON result path")
    p.add_argument("--budget", type=float, default=110.0, help="no row starts later")
    p.add_argument("--smoke", action="store_true", help="tiny trees: checks it runs")
    p.add_argument(
        "--sibling-outputs",
        action="store_true",
        help="treeopt's elementwise optimizers as fusion.SiblingOutputs",
    )
    args = p.parse_args()
    t0 = time.perf_counter()
    big = bench.transformer_shapes(2048, 20, 32768, 2048, 16)
    small = bench.many_small_shapes(1000, 4)
    if args.smoke:
        big = bench.transformer_shapes(64, 2, 128, 32, 4)
        small = bench.many_small_shapes(40)
    cfg = bench.Config(
        trees={"transformer_1b": big, "many_small": small},
        rounds=20,
        bandwidth_elements=1 << 27,
        sibling_outputs=args.sibling_outputs,
        profile_shape=None,  # the profile reads XLA:CPU's HLO
        rows=ROWS,
        budget_s=args.budget,
    )

    def log(line: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f} s] {line}", flush=True)

    # A failing row is recorded in the table; each row is also logged as it ends.
    result = bench.run(cfg, log=log)
    with open(args.out, "w") as f:
        f.write(bench.to_json(result))
    print(bench.to_markdown(result), flush=True)
    print(f"total {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
