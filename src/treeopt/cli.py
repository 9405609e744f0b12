"""The ``treeopt`` command line (also ``python -m treeopt``).

Each subcommand is a function ``_add_<name>(subparsers)`` that declares its
arguments and sets ``func``, a callable taking the parsed arguments. A
subcommand reports bad input by raising ``UsageError``: ``main`` prints it as
one line on stderr and exits with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path


class UsageError(Exception):
    """Bad input to a subcommand; its message is shown as one line."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (exit status 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults in --help, except None (the help text explains those)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def _int_at_least(low: int, what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be a {what} integer, got {text!r}"
            ) from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be a {what} integer, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1, "positive")
_nonnegative_int = _int_at_least(0, "non-negative")


def _optimizer_names(text: str) -> tuple[str, ...]:
    from treeopt.demo import OPTIMIZERS

    names = tuple(n.strip().lower() for n in text.split(",") if n.strip())
    for name in names:
        if name not in OPTIMIZERS:
            raise argparse.ArgumentTypeError(
                f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}"
            )
    if not names:
        raise argparse.ArgumentTypeError("no optimizer given")
    return names


def _add_demo(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="train a small character Transformer with every optimizer",
        formatter_class=_Help,
        description=(
            "Trains the same small decoder-only Transformer character model with "
            "each optimizer (same weights, batches and warmup+cosine schedule), "
            "then prints a table of losses in bits per character, step times and "
            "optimizer-state sizes, writes curves.csv, results.json and demo.png "
            "into --out, and prints a text sample from the best model."
        ),
    )
    p.add_argument(
        "--optimizers",
        type=_optimizer_names,
        default=None,
        help="comma-separated subset of sgd,momentum,rmsprop,adam,adafactor,sm3 "
        "(default: all)",
    )
    p.add_argument(
        "--steps", type=_positive_int, default=400, help="steps per optimizer"
    )
    p.add_argument(
        "--seed",
        type=_nonnegative_int,
        default=0,
        help="seed of the weights, batches and sample",
    )
    p.add_argument(
        "--out", type=Path, default=Path("treeopt-demo"), help="output directory"
    )
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="UTF-8 text file to train on (default: the Python standard "
        "library's own source files)",
    )
    p.add_argument(
        "--context", type=_positive_int, default=64, help="characters per window"
    )
    p.add_argument(
        "--batch-size", type=_positive_int, default=16, help="windows per step"
    )
    p.add_argument("--d-model", type=_positive_int, default=96, help="model width")
    p.add_argument("--layers", type=_positive_int, default=2, help="Transformer blocks")
    p.add_argument("--heads", type=_positive_int, default=4, help="attention heads")
    p.add_argument(
        "--evals", type=_positive_int, default=10, help="validation points per run"
    )
    p.add_argument(
        "--sample-chars", type=_positive_int, default=240, help="sample length"
    )
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> None:
    from treeopt import demo

    names = args.optimizers or tuple(demo.OPTIMIZERS)
    demo.run(
        demo.Config(
            optimizers=names,
            steps=args.steps,
            seed=args.seed,
            out=args.out,
            data=args.data,
            context=args.context,
            batch_size=args.batch_size,
            d_model=args.d_model,
            layers=args.layers,
            heads=args.heads,
            evals=min(args.evals, args.steps),
            sample_chars=args.sample_chars,
        )
    )


def _add_bench(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="step time and optimizer memory against optax on this machine",
        description="Times every optimizer against the closest optax configuration "
        "(interleaved, medians) on three trees and prints a markdown table.",
        formatter_class=_Help,
    )
    p.add_argument("--quick", action="store_true", help="about a minute")
    p.add_argument("--json", type=Path, default=None, help="also write JSON here")
    p.add_argument(
        "--optimizers",
        type=lambda t: tuple(n.strip().lower() for n in t.split(",") if n.strip()),
        default=None,
        help="comma-separated subset (default: all)",
    )
    p.add_argument(
        "--xla-cpu-multi-output-fusion",
        action="store_true",
        help="turn on XLA:CPU's multi-output fusion for the run (treeopt.fusion)",
    )
    p.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> None:
    try:
        import optax  # noqa: F401
    except ImportError:
        msg = "bench compares with optax: pip install 'treeopt[optax]'"
        raise UsageError(msg) from None
    from treeopt import bench

    names = args.optimizers or bench.OPTIMIZERS
    unknown = [n for n in names if n not in bench.OPTIMIZERS]
    if unknown:
        choices = ", ".join(bench.OPTIMIZERS)
        raise UsageError(f"unknown optimizer {unknown[0]!r}; choose from {choices}")
    if args.xla_cpu_multi_output_fusion:
        from treeopt import fusion

        try:
            fusion.enable_cpu_multi_output_fusion()
        except RuntimeError as e:
            raise UsageError(str(e)) from None
    cfg = bench.config("quick" if args.quick else "full")
    cfg = bench.dataclasses.replace(cfg, optimizers=names)
    result = bench.run(cfg, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(bench.to_markdown(result))
    if args.json is not None:
        args.json.write_text(bench.to_json(result))


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``treeopt`` with ``argv`` (default: ``sys.argv[1:]``); returns the
    exit status."""
    parser = _Parser(
        prog="treeopt",
        description="treeopt: the Trax optimizers for current JAX.",
    )
    subparsers = parser.add_subparsers(
        dest="command", required=True, parser_class=_Parser
    )
    _add_demo(subparsers)
    _add_bench(subparsers)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except UsageError as e:
        print(f"treeopt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"treeopt {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0
