"""The ``treeopt`` command line (also ``python -m treeopt``).

Each subcommand is a function ``_add_<name>(subparsers)`` that declares its
arguments and sets ``func``, a callable taking the parsed arguments. A
subcommand reports bad input by raising ``UsageError``: ``main`` prints it as
one line on stderr and exits with status 2, without a traceback. A Ctrl-C,
wherever it lands (importing JAX included: this module imports nothing heavy),
ends with one line and status 130; a subcommand that kept partial results says
so by raising ``Interrupted``.
"""

from __future__ import annotations

import _thread
import argparse
import contextlib
import dataclasses
import functools
import importlib
import os
import pickle
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import treeopt
from treeopt import registry
from treeopt.errors import Interrupted, UsageError, check_writable_file


@contextlib.contextmanager
def _ctrl_c_held() -> Iterator[None]:
    """Holds SIGINT back until the block ends: a Ctrl-C while jaxlib's extension
    initializes turns into an ImportError or an abort, not a KeyboardInterrupt."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows
        yield
        return
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def require_extra(command: str, extra: str, modules: Sequence[str]) -> None:
    """Imports ``modules`` (a Ctrl-C meanwhile takes effect after them); a missing
    one is a ``UsageError`` naming ``extra``."""
    with _ctrl_c_held():
        for module in modules:
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as e:
                missing = (e.name or module).partition(".")[0]
                raise UsageError(
                    f"{command} needs {missing}: pip install 'treeopt[{extra}]'"
                ) from None


def _interrupt_again(hook: Callable[[Any], object], unraisable: Any) -> None:
    """``sys.unraisablehook`` while ``main`` runs (``hook``: the one before): a
    Ctrl-C that lands in a callback, such as JAX's garbage-collection callback,
    is printed and dropped by Python; it is raised in the main thread again."""
    if not issubclass(unraisable.exc_type, KeyboardInterrupt):
        hook(unraisable)
        return
    # Raised from here it would be dropped again; a moment later, from another
    # thread, it lands in the main thread's own code (or comes back here).
    timer = threading.Timer(0.05, _ctrl_c_to_main_thread)
    timer.daemon = True
    timer.start()


def _ctrl_c_to_main_thread() -> None:
    # A real signal, unlike interrupt_main, also ends a blocking call (a sleep).
    if hasattr(signal, "pthread_kill"):
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
    else:
        _thread.interrupt_main()


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
    try:
        return registry.parse_names(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


_OPTIMIZERS_HELP = (
    f"comma-separated subset of {','.join(registry.NAMES)} (default: all)"
)


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
        help=_OPTIMIZERS_HELP,
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
    require_extra("demo", "demo", ("jax", "flax.linen", "matplotlib", "rich"))
    from treeopt import demo

    demo.run(
        demo.Config(
            optimizers=args.optimizers or registry.NAMES,
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


def _tree_names(text: str) -> tuple[str, ...]:
    # Checked against the benchmark's trees by ``_bench``: they are known once
    # the engine, and so JAX, is imported, which parsing does not do.
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError("no tree given")
    return names


def _add_bench(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="step time and optimizer memory against optax on this machine",
        description="Times every optimizer against the closest optax configuration "
        "(interleaved, medians) on three trees and prints a markdown table.",
        formatter_class=_Help,
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller trees: a minute")
    size.add_argument("--tiny", action="store_true", help="tiny trees: checks it runs")
    p.add_argument("--json", type=Path, default=None, help="also write JSON here")
    p.add_argument(
        "--optimizers", type=_optimizer_names, default=None, help=_OPTIMIZERS_HELP
    )
    p.add_argument(
        "--trees",
        type=_tree_names,
        default=None,
        help="comma-separated subset of the preset's trees (default: all)",
    )
    p.add_argument(
        "--xla-cpu-multi-output-fusion",
        action="store_true",
        help="turn on XLA:CPU's multi-output fusion for the run and time "
        "treeopt's elementwise optimizers as fusion.SiblingOutputs",
    )
    p.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> None:
    require_extra("bench", "optax", ("jax", "optax"))
    from treeopt import bench

    preset = "tiny" if args.tiny else "quick" if args.quick else "full"
    cfg = bench.config(preset)
    trees = args.trees or tuple(cfg.trees)
    for name in trees:
        if name not in cfg.trees:
            raise UsageError(
                f"unknown tree {name!r}; choose from {', '.join(cfg.trees)}"
            )
    if args.json is not None:
        check_writable_file(args.json, "--json")
    if args.xla_cpu_multi_output_fusion:
        from treeopt import fusion

        try:
            fusion.enable_cpu_multi_output_fusion()
        except RuntimeError as e:
            raise UsageError(str(e)) from None
    cfg = dataclasses.replace(
        cfg,
        trees={name: cfg.trees[name] for name in trees},
        optimizers=args.optimizers or registry.NAMES,
        sibling_outputs=args.xla_cpu_multi_output_fusion,
    )
    log = lambda line: print(line, file=sys.stderr, flush=True)
    try:
        result = bench.run(cfg, log=log)
    except Interrupted as e:  # the rows that finished
        _bench_report(e.result, args.json)
        raise
    _bench_report(result, args.json)


def _bench_report(result: dict, json_path: Path | None) -> None:
    from treeopt import bench

    print(bench.to_markdown(result))
    if json_path is not None:
        json_path.write_text(bench.to_json(result))


def _option(text: str) -> tuple[str, Any]:
    key, sep, raw = (part.strip() for part in text.partition("="))
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"must be KEY=VALUE, got {text!r}")
    words = {"true": True, "false": False, "none": None}
    if raw.lower() in words:
        return key, words[raw.lower()]
    for parse in (int, float):
        with contextlib.suppress(ValueError):
            return key, parse(raw)
    return key, raw


def _add_import_trax(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "import-trax",
        help="convert a Trax 1.4.1 training checkpoint to a treeopt checkpoint",
        formatter_class=_Help,
        description="Reads the checkpoint Trax's Loop.save_checkpoint wrote, checks "
        "its slots against the optimizer and saves {'step': the next step, "
        "'weights', 'slots', 'opt_params'} with treeopt.checkpoint under the "
        "number of completed steps (needs the checkpoint extra).",
    )
    p.add_argument("basename", help="e.g. output_dir/model")
    p.add_argument("--optimizer", type=str.lower, choices=registry.NAMES, required=True)
    p.add_argument(
        "--option",
        type=_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a constructor argument Trax used, e.g. learning_rate=0.01",
    )
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory")
    p.set_defaults(func=_import_trax)


def _import_trax(args: argparse.Namespace) -> None:
    require_extra("import-trax", "checkpoint", ("jax", "orbax.checkpoint"))
    from treeopt import checkpoint, trax_checkpoint
    from treeopt.errors import check_writable_dir

    cls = getattr(treeopt, registry.ENTRIES[args.optimizer].class_name)
    try:
        opt = cls(**dict(args.option))
        ckpt = trax_checkpoint.load(args.basename, opt)
    except (TypeError, ValueError, OSError, pickle.UnpicklingError) as e:
        raise UsageError(" ".join(str(e).split())) from None
    check_writable_dir(args.out, "--out")
    state = dict(step=ckpt.step + 1, weights=ckpt.weights, slots=ckpt.slots)
    state["opt_params"] = opt.opt_params
    try:
        checkpoint.save(args.out, ckpt.step, state, optimizer=opt)
    except ValueError as e:
        raise UsageError(" ".join(str(e).split())) from None
    print(f"Trax checkpoint {args.basename}, read for {opt!r}:\n{ckpt.summary()}")
    print(f"wrote treeopt checkpoint {args.out / str(ckpt.step)}")


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``treeopt`` with ``argv`` (default: ``sys.argv[1:]``); returns the
    exit status."""
    parser = _Parser(
        prog="treeopt",
        description="treeopt: the Trax optimizers for current JAX.",
    )
    parser.add_argument(
        "--version", action="version", version=f"treeopt {treeopt.__version__}"
    )
    subparsers = parser.add_subparsers(
        dest="command", required=True, parser_class=_Parser
    )
    _add_demo(subparsers)
    _add_bench(subparsers)
    _add_import_trax(subparsers)
    prog = "treeopt"
    hook = sys.unraisablehook
    sys.unraisablehook = functools.partial(_interrupt_again, hook)
    try:
        args = parser.parse_args(argv)
        prog = f"treeopt {args.command}"
        args.func(args)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        kept = f" {e}" if isinstance(e, Interrupted) else ""
        print(f"{prog}: interrupted{kept}", file=sys.stderr)
        return 130
    finally:
        sys.unraisablehook = hook
    return 0


def console_main() -> NoReturn:
    """The ``treeopt`` program (and ``python -m treeopt``): exits with ``main()``'s
    status. After a Ctrl-C it exits at once, skipping the interpreter's teardown,
    in which XLA crashes after an interrupted compile."""
    status = main()
    if status == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
