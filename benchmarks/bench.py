"""treeopt vs optax step time on this machine; prints a markdown table.

python benchmarks/bench.py [--quick | --tiny] [--json PATH] [--trees ...] [--opts ...]
                           [--xla-cpu-multi-output-fusion]
"""

import argparse
import sys

from treeopt import bench, fusion


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="about a minute")
    p.add_argument("--tiny", action="store_true", help="seconds; for the tests")
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    p.add_argument("--trees", nargs="+", choices=bench.TREES, default=bench.TREES)
    p.add_argument("--opts", nargs="+", choices=bench.OPTIMIZERS, default=None)
    p.add_argument(
        "--xla-cpu-multi-output-fusion",
        action="store_true",
        help="turn on XLA:CPU's multi-output fusion for the run (treeopt.fusion)",
    )
    args = p.parse_args(argv)
    if args.xla_cpu_multi_output_fusion:
        try:
            fusion.enable_cpu_multi_output_fusion()
        except RuntimeError as e:
            p.error(str(e))
    cfg = bench.config("tiny" if args.tiny else "quick" if args.quick else "full")
    cfg = bench.dataclasses.replace(
        cfg,
        trees={k: v for k, v in cfg.trees.items() if k in args.trees},
        optimizers=args.opts or bench.OPTIMIZERS,
    )
    result = bench.run(cfg, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(bench.to_markdown(result))
    if args.json:
        with open(args.json, "w") as f:
            f.write(bench.to_json(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
