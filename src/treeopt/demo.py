"""``treeopt demo``: every optimizer trains the same character Transformer.

The corpus is the Python standard library's own source (every install has it),
or any UTF-8 file given with ``--data``. Each optimizer starts from the same
weights, sees the same batches and follows the same schedule shape (linear
warmup over the first 10% of steps, then cosine decay), with its own peak
learning rate (``registry.Entry.demo_learning_rate``). Losses are reported in
bits per character.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

import treeopt
from treeopt import registry, schedules
from treeopt.demo_model import CharTransformer, cross_entropy, generate
from treeopt.errors import Interrupted, UsageError, check_writable_dir

if TYPE_CHECKING:
    from rich.progress import Progress
    from rich.table import Table

_LN2 = math.log(2.0)
VALIDATION_FRACTION = 0.1
STDLIB_CHARS = 2_000_000  # corpus size read from the standard library
EVAL_WINDOWS = 128  # fixed windows for each validation (and final training) loss
OUTPUTS = ("curves.csv", "results.json", "demo.png")  # written into --out


@dataclasses.dataclass(frozen=True)
class Config:
    """What ``treeopt demo`` was asked to do; defaults live in ``treeopt.cli``."""

    optimizers: tuple[str, ...]
    steps: int
    seed: int
    out: Path
    data: Path | None
    context: int
    batch_size: int
    d_model: int
    layers: int
    heads: int
    evals: int
    sample_chars: int


@dataclasses.dataclass
class Corpus:
    """Text as integer ids over a character vocabulary, split train/validation."""

    chars: list[str]
    train: np.ndarray
    val: np.ndarray
    source: str

    @classmethod
    def from_text(cls, text: str, source: str) -> Corpus:
        chars = sorted(set(text))
        index = {c: i for i, c in enumerate(chars)}
        ids = np.fromiter((index[c] for c in text), np.int32, len(text))
        split = int(len(ids) * (1 - VALIDATION_FRACTION))
        return cls(chars, ids[:split], ids[split:], source)

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)


def stdlib_text(max_chars: int = STDLIB_CHARS) -> tuple[str, str]:
    """The first ``max_chars`` characters of the standard library's top-level
    ``*.py`` files, in sorted order (the same text on every run of this Python)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, n = [], 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        n += len(text)
        if n >= max_chars:
            break
    return "".join(parts)[:max_chars], f"{len(parts)} files of {root}"


def load_corpus(data: Path | None, context: int) -> Corpus:
    """Reads ``data`` (or the standard library) and checks it is long enough."""
    if data is None:
        text, source = stdlib_text()
    else:
        if not data.exists():
            raise UsageError(f"--data {data}: no such file")
        if not data.is_file():
            raise UsageError(f"--data {data} is not a file")
        try:
            text = data.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(f"--data {data} is not UTF-8 text ({e.reason})") from None
        except OSError as e:
            raise UsageError(f"--data {data}: {e.strerror}") from None
        if not text:
            raise UsageError(f"--data {data} is empty")
        source = str(data)
    corpus = Corpus.from_text(text, source)
    if len(corpus.val) < context + 1:
        need = math.ceil((context + 1) / VALIDATION_FRACTION)
        raise UsageError(
            f"corpus too short: {len(text)} characters leave {len(corpus.val)} for "
            f"validation, fewer than --context + 1 = {context + 1}; give at least "
            f"{need} characters or a smaller --context"
        )
    return corpus


def windows(ids: np.ndarray, n: int, context: int, rng: np.random.Generator):
    """``n`` random windows of ``context + 1`` consecutive ids, shape (n, ctx+1)."""
    starts = rng.integers(0, len(ids) - context, size=n)
    return ids[starts[:, None] + np.arange(context + 1)]


@dataclasses.dataclass
class Run:
    """One optimizer's training run: curves and final numbers."""

    name: str
    optimizer: str
    steps: list[int] = dataclasses.field(default_factory=list)
    train_bpc: list[float] = dataclasses.field(default_factory=list)
    val_bpc: list[float] = dataclasses.field(default_factory=list)
    final_train_bpc: float = math.nan
    final_val_bpc: float = math.nan
    ms_per_step: float | None = None  # None: no step after the compiling one
    state_bytes: int = 0
    param_bytes: int = 0
    weights: dict | None = None


def _nbytes(tree: object) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def train_one(
    name: str,
    cfg: Config,
    corpus: Corpus,
    model: CharTransformer,
    params: dict,
    eval_sets: dict[str, jax.Array],
    eval_loss: Callable,
    progress: Progress,
) -> Run:
    """Trains a copy of ``params`` with optimizer ``name``; records the curves."""
    entry = registry.ENTRIES[name]
    peak = entry.demo_learning_rate
    optimizer = entry.make(peak)
    warmup = max(1, cfg.steps // 10)
    schedule = schedules.multifactor(
        "constant * linear_warmup * cosine_decay",
        peak,
        warmup_steps=warmup,
        steps_per_cycle=max(1, cfg.steps - warmup),
    )

    def loss_fn(weights: dict, batch: jax.Array, rng: jax.Array) -> jax.Array:
        del rng
        return cross_entropy(model.apply(weights, batch[:, :-1]), batch[:, 1:])

    trainer = treeopt.Trainer(loss_fn, optimizer, params, schedule)
    run = Run(name, repr(optimizer))
    run.state_bytes, run.param_bytes = _nbytes(trainer.slots), _nbytes(params)
    rng = np.random.default_rng(cfg.seed)
    key = jax.random.key(cfg.seed)
    eval_at = {round(cfg.steps * k / cfg.evals) for k in range(1, cfg.evals + 1)}
    task = progress.add_task(name, total=cfg.steps, loss=math.nan)
    step_time, timed_steps, recent = 0.0, 0, []
    for step in range(1, cfg.steps + 1):
        batch = jnp.asarray(windows(corpus.train, cfg.batch_size, cfg.context, rng))
        start = time.perf_counter()
        loss, _ = trainer.one_step(batch, jax.random.fold_in(key, step))
        loss = float(loss) / _LN2
        if step > 1:  # the first step compiles
            step_time += time.perf_counter() - start
            timed_steps += 1
        recent.append(loss)
        progress.update(task, advance=1, loss=loss)
        if step in eval_at:
            run.steps.append(step)
            run.train_bpc.append(float(np.mean(recent)))
            run.val_bpc.append(float(eval_loss(trainer.weights, eval_sets["val"])))
            recent = []
    run.final_val_bpc = run.val_bpc[-1]
    run.final_train_bpc = float(eval_loss(trainer.weights, eval_sets["train"]))
    if timed_steps:
        run.ms_per_step = 1000 * step_time / timed_steps
    run.weights = trainer.weights
    return run


def _table(runs: list[Run]) -> Table:
    from rich import box
    from rich.table import Table

    table = Table(box=box.MARKDOWN, title=None)
    for col in ("optimizer", "train bpc", "val bpc", "ms/step", "state bytes"):
        table.add_column(col, justify="left" if col == "optimizer" else "right")
    table.add_column("state / params", justify="right")
    for r in runs:
        table.add_row(
            r.name,
            f"{r.final_train_bpc:.3f}",
            f"{r.final_val_bpc:.3f}",
            "n/a" if r.ms_per_step is None else f"{r.ms_per_step:.1f}",
            f"{r.state_bytes:,}",
            f"{r.state_bytes / r.param_bytes:.2f}x",
        )
    return table


def _write_outputs(runs: list[Run], cfg: Config, corpus: Corpus, extra: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(cfg.out / "curves.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["optimizer", "step", "train_bpc", "val_bpc"])
        for r in runs:
            for row in zip(r.steps, r.train_bpc, r.val_bpc, strict=True):
                writer.writerow([r.name, *row])
    summary = {
        "config": {k: str(v) for k, v in dataclasses.asdict(cfg).items()},
        "corpus": {
            "source": corpus.source,
            "vocab": len(corpus.chars),
            "train_chars": len(corpus.train),
            "val_chars": len(corpus.val),
        },
        **extra,
        "runs": [
            {k: v for k, v in dataclasses.asdict(r).items() if k != "weights"}
            for r in runs
        ],
    }
    (cfg.out / "results.json").write_text(json.dumps(summary, indent=1))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in runs:
        ax.plot(r.steps, r.val_bpc, marker="o", markersize=3, label=r.name)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (bits per character)")
    ax.set_title(
        f"treeopt demo: {extra['params']:,}-parameter char Transformer, "
        f"{cfg.steps} steps"
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(cfg.out / "demo.png", dpi=120)
    plt.close(fig)


def run(cfg: Config) -> None:
    """Trains every optimizer in ``cfg``, prints the table and a sample, and
    writes ``curves.csv``, ``results.json`` and ``demo.png`` into ``cfg.out``
    (checked writable first). On Ctrl-C, prints the table and writes the files
    of the optimizers that finished, then raises ``errors.Interrupted``."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    if cfg.d_model % cfg.heads:
        raise UsageError(
            f"--d-model {cfg.d_model} is not a multiple of --heads {cfg.heads}"
        )
    corpus = load_corpus(cfg.data, cfg.context)
    check_writable_dir(cfg.out, "--out")
    for name in OUTPUTS:
        if (cfg.out / name).is_dir():
            raise UsageError(f"--out {cfg.out}: {name} is a directory")
    out, err = Console(soft_wrap=True), Console(stderr=True)
    model = CharTransformer(
        len(corpus.chars), cfg.context, cfg.d_model, cfg.layers, cfg.heads
    )
    dummy = jnp.zeros((1, cfg.context), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(cfg.seed), dummy)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    rng = np.random.default_rng(cfg.seed + 1)
    eval_sets = {
        split: jnp.asarray(windows(ids, EVAL_WINDOWS, cfg.context, rng))
        for split, ids in (("train", corpus.train), ("val", corpus.val))
    }

    @jax.jit
    def eval_loss(weights: dict, batch: jax.Array) -> jax.Array:
        return cross_entropy(model.apply(weights, batch[:, :-1]), batch[:, 1:]) / _LN2

    err.print(
        f"corpus: {corpus.source}; {len(corpus.train):,} train / "
        f"{len(corpus.val):,} validation characters, vocabulary {len(corpus.chars)}"
    )
    err.print(
        f"model: {n_params:,} parameters (d_model {cfg.d_model}, {cfg.layers} "
        f"layers, {cfg.heads} heads, context {cfg.context}); batch {cfg.batch_size}, "
        f"{cfg.steps} steps per optimizer on {jax.devices()[0].platform}"
    )
    columns = (
        TextColumn("{task.description:>9}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f} bpc"),
        TimeElapsedColumn(),
    )
    start = time.perf_counter()
    runs: list[Run] = []
    interrupted = False
    try:
        with Progress(*columns, console=err) as progress:
            for name in cfg.optimizers:
                runs.append(
                    train_one(
                        name, cfg, corpus, model, params, eval_sets, eval_loss, progress
                    )
                )
    except KeyboardInterrupt:
        interrupted = True
    wall = time.perf_counter() - start
    done = f"after {len(runs)} of {len(cfg.optimizers)} optimizers"
    if interrupted and not runs:
        raise Interrupted(f"{done}; nothing written")
    out.print(_table(runs))
    out.print(
        f"{n_params:,} parameters, {runs[0].param_bytes:,} bytes; bpc: bits per "
        "character; state: the optimizer's slots"
    )
    extra = {
        "params": n_params,
        "wall_seconds": round(wall, 1),
        "interrupted": interrupted,
    }
    if interrupted:  # keep the finished runs; no sample, the user wants out
        _write_outputs(runs, cfg, corpus, extra)
        names = ", ".join(r.name for r in runs)
        raise Interrupted(
            f"{done}; wrote {', '.join(OUTPUTS)} for {names} to {cfg.out}/"
        )
    best = min(runs, key=lambda r: r.final_val_bpc)
    prompt = [int(i) for i in corpus.val[: max(1, cfg.context // 2)]]
    key = jax.random.key(cfg.seed)
    sample = generate(model, best.weights, prompt, cfg.sample_chars, key)
    _write_outputs(runs, cfg, corpus, extra)
    out.print(f"\nSample from {best.name} (lowest validation loss), after the prompt:")
    out.print(corpus.decode(prompt), style="dim", end="", markup=False, highlight=False)
    out.print(corpus.decode(sample), markup=False, highlight=False)
    out.print(
        f"\nTrained {len(runs)} optimizers in {wall:.0f} s; wrote curves.csv, "
        f"results.json and demo.png to {cfg.out}/"
    )
