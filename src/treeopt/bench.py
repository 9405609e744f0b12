"""Step time and memory of treeopt against optax: the engine of ``treeopt bench``.

Needs ``optax`` (the ``optax`` extra). Everything runs in one process: every
(tree, optimizer) row's steps, both libraries', are traced and compiled (in
threads, at most one per core, while the next ones are traced; see ``run``),
then each row is timed interleaved, one jitted step at a time with donated
buffers and ``block_until_ready``, and the median is kept. The bound of a
row is the time the bytes an ideal step moves (read ``w``, ``g`` and the state
once, write ``w`` and the state once) take at the rate of a jitted
``y <- a x + y`` over as many elements as the tree has parameters (the same
memory regime: caches or DRAM; at most ``Config.bandwidth_elements``), timed
in the same rounds as the row. It is the axpy's rate, not the memory's peak: a
step can beat it.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import platform
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import treeopt
from treeopt import fusion
from treeopt import packed as packed_lib
from treeopt.cli import Interrupted

Shapes = dict[str, tuple[int, ...]]


# ------------------------------------------------------------------- trees


def transformer_shapes(
    d_model: int = 512,
    n_layers: int = 8,
    vocab: int = 2048,
    seq: int = 512,
    n_heads: int = 8,
    d_ff: int | None = None,
) -> Shapes:
    """Leaf shapes of a decoder-only transformer (Flax-like naming and layout).

    The defaults give 26.5M parameters in 132 leaves; ``d_model=2048,
    n_layers=20, vocab=32768, seq=2048, n_heads=16`` gives 1.08B in 324.
    """
    d, h = d_model, n_heads
    hd, ff = d // h, d_ff or 4 * d_model
    shapes: Shapes = {"embed": (vocab, d), "pos_embed": (seq, d)}
    for i in range(n_layers):
        p = f"layer{i:02d}/"
        shapes |= {
            p + "ln1/scale": (d,),
            p + "ln1/bias": (d,),
            p + "attn/query": (d, h, hd),
            p + "attn/key": (d, h, hd),
            p + "attn/value": (d, h, hd),
            p + "attn/query_bias": (h, hd),
            p + "attn/key_bias": (h, hd),
            p + "attn/value_bias": (h, hd),
            p + "attn/out": (h, hd, d),
            p + "attn/out_bias": (d,),
            p + "ln2/scale": (d,),
            p + "ln2/bias": (d,),
            p + "mlp/wi": (d, ff),
            p + "mlp/bi": (ff,),
            p + "mlp/wo": (ff, d),
            p + "mlp/bo": (d,),
        }
    shapes |= {"final_ln/scale": (d,), "final_ln/bias": (d,)}
    return shapes


# Eight shapes averaging 1000 elements: small matrices, vectors, a 3-d kernel.
_SMALL_SHAPES = [(32, 32), (1024,), (16, 64), (8, 8, 16), (512,), (48, 32), (256,)]
_SMALL_SHAPES.append((40, 40))


def many_small_shapes(n_leaves: int = 2000, scale: int = 1) -> Shapes:
    """``n_leaves`` leaves of about ``1000 * scale`` elements each (8 shapes)."""
    shapes: Shapes = {}
    for i in range(n_leaves):
        s = _SMALL_SHAPES[i % len(_SMALL_SHAPES)]
        shapes[f"block{i // 8:03d}/p{i % 8}"] = (s[0] * scale, *s[1:])
    return shapes


def one_big_shapes(n: int = 4096) -> Shapes:
    """One ``n x n`` matrix."""
    return {"w": (n, n)}


def _nest(shapes: Shapes, leaf: Callable[[tuple[int, ...]], Any]) -> dict:
    """The flat ``'a/b/c'`` names as a nested dict, one ``leaf(shape)`` each."""
    tree: dict = {}
    for name, shape in shapes.items():
        *parents, last = name.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = leaf(shape)
    return tree


def make_tree(shapes: Shapes, seed: int, dtype: Any = jnp.float32) -> dict:
    """A nested dict of random normal leaves (std 0.02), drawn on the device.

    One draw of every element, cut into the leaves on the host and put back:
    for the 2000 small leaves here 0.8 s the first time (compiling the draw),
    then 0.2 s, where a draw per leaf took 6 s (dispatch, and a compile per
    shape) and a jitted split 39 s to compile.
    """
    sizes = [math.prod(s) for s in shapes.values()]
    flat = 0.02 * jax.random.normal(jax.random.key(seed), (sum(sizes),), dtype)
    host = np.asarray(flat)
    del flat  # one copy of the tree on the device at a time
    parts = iter(np.split(host, np.cumsum(sizes)[:-1]))
    return jax.device_put(_nest(shapes, lambda shape: next(parts).reshape(shape)))


# -------------------------------------------------------------- optimizers


def _optax_configs() -> dict[str, tuple[Callable, Callable]]:
    """name -> (treeopt factory, closest optax factory), same hyperparameters."""
    import optax

    lr = 1e-3
    return {
        "sgd": (lambda: treeopt.SGD(lr), lambda: optax.sgd(lr)),
        "momentum": (
            lambda: treeopt.Momentum(lr, mass=0.9, weight_decay_rate=0.0),
            lambda: optax.sgd(lr, momentum=0.9, nesterov=True),
        ),
        "rmsprop": (
            lambda: treeopt.RMSProp(lr, gamma=0.9, eps=1e-8),
            lambda: optax.rmsprop(lr, decay=0.9, eps=1e-8, initial_scale=1.0),
        ),
        # Trax's decay w <- (1 - wd) w is adamw with weight_decay = wd / lr.
        "adam": (
            lambda: treeopt.Adam(lr, weight_decay_rate=1e-5, eps=1e-5),
            lambda: optax.adamw(lr, eps=1e-5, weight_decay=1e-5 / lr),
        ),
        # min_dim_size_to_factor=1: optax then factors every matrix, as Trax does.
        "adafactor": (
            lambda: treeopt.Adafactor(lr, weight_decay_rate=0.0),
            lambda: optax.adafactor(lr, min_dim_size_to_factor=1),
        ),
        "sm3": (
            lambda: treeopt.SM3(lr, momentum=0.9),
            lambda: optax.sm3(lr, momentum=0.9),
        ),
    }


OPTIMIZERS = ("sgd", "momentum", "rmsprop", "adam", "adafactor", "sm3")
TREES = ("transformer", "many_small", "one_big")


@dataclasses.dataclass(frozen=True)
class Config:
    """What to run and how long: trees by name, optimizers, rounds x steps."""

    trees: dict[str, Shapes]
    optimizers: Sequence[str] = OPTIMIZERS
    rounds: int = 7
    steps_per_round: int = 3
    # The bandwidth probe uses as many elements as the tree, at most this many.
    bandwidth_elements: int = 1 << 26
    packed: bool = True
    # (tree, optimizer) pairs in the order to run; None: every tree x optimizer.
    rows: Sequence[tuple[str, str]] | None = None
    # No row starts after this many seconds (the rows run so far are kept).
    budget_s: float = float("inf")
    # One leaf of this shape is profiled (kernels, bytes per parameter); None: no.
    profile_shape: tuple[int, ...] | None = (4096, 4096)
    # Compile steps at the same time (at most one thread per core).
    concurrent_compile: bool = True
    # Trace every row first while XLA compiles, then time the rows (see
    # ``run``); False: trace, compile and time one row after the other, so
    # ``budget_s`` bounds the whole run (what a lent accelerator needs).
    pipeline: bool = True
    # With the pipeline, rows on trees of at most this many parameter bytes get
    # their arrays while the compiles run (the eager init of 2000 leaves' state
    # takes seconds); their arrays then live until each row is timed.
    arm_ahead_bytes: int = 1 << 25

    def row_order(self) -> list[tuple[str, str]]:
        if self.rows is not None:
            return list(self.rows)
        return [(t, o) for t in self.trees for o in self.optimizers]


def config(name: str) -> Config:
    """``'full'``, ``'quick'`` (about a minute) or ``'tiny'`` (seconds, for tests)."""
    trees = {
        "transformer": transformer_shapes(),
        "many_small": many_small_shapes(),
        "one_big": one_big_shapes(),
    }
    if name == "full":
        return Config(trees, rounds=10, steps_per_round=3)
    if name == "quick":
        # An eighth of the small leaves: compiling optax's Adafactor and SM3 for
        # 2000 leaves alone takes minutes on a busy 2-core machine.
        trees["many_small"] = many_small_shapes(250)
        return Config(trees, rounds=4, steps_per_round=2)
    if name == "tiny":
        tiny = {
            "transformer": transformer_shapes(32, 2, 64, 16, 4),
            "many_small": many_small_shapes(12),
            "one_big": one_big_shapes(64),
        }
        return Config(
            tiny,
            rounds=2,
            steps_per_round=1,
            bandwidth_elements=1 << 16,
            profile_shape=(32, 64),
        )
    raise ValueError(f"config must be 'full', 'quick' or 'tiny', got {name!r}")


# ------------------------------------------------------------ measurement


def _nbytes(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _block(tree: Any) -> None:
    jax.block_until_ready(tree)


class _Runner:
    """One compiled, donated step of one library on one tree, with its state.

    Built in phases: ``__init__`` traces and lowers (Python, holds the GIL; the
    arguments may be ``jax.ShapeDtypeStruct``), ``compile`` runs XLA, which
    releases the GIL, so steps compile on other cores while more are traced
    (see ``run``), and ``set_args`` gives it the arrays to step on.
    """

    def __init__(self, step_fn: Callable, args: tuple, donate: tuple, static: tuple):
        self._static = static
        t0 = time.perf_counter()
        jitted = jax.jit(step_fn, donate_argnums=donate)
        self._lowered = jitted.lower(*static, *args)
        self.lower_s = time.perf_counter() - t0
        self.compile_s = float("nan")
        self._compiled: Any = None
        self._args = args
        self._n_dynamic = len(donate)
        self.times: list[float] = []

    def compile(self) -> None:
        """XLA compilation; ``compile_s`` is tracing + lowering + this."""
        t0 = time.perf_counter()
        self._compiled = self._lowered.compile()
        self.compile_s = self.lower_s + time.perf_counter() - t0
        self._lowered = None

    def compiled_text(self) -> str:
        """The optimized HLO of the compiled step."""
        return self._compiled.as_text()

    def set_args(self, args: tuple) -> None:
        """The arrays to step on (same shapes and dtypes as at lowering)."""
        self._args = args

    def step(self, record: bool) -> None:
        t0 = time.perf_counter()
        out = self._compiled(*self._static, *self._args)
        _block(out)
        if record:
            self.times.append(time.perf_counter() - t0)
        self._args = (*out, *self._args[self._n_dynamic :])

    def median_ms(self) -> float:
        return 1e3 * float(np.median(self.times))


def compile_all(runners: Sequence[_Runner], concurrent: bool = True) -> None:
    """Compiles the runners, at the same time in threads (at most one per core)
    if ``concurrent``; each ``compile_s`` counts from the start of its own compile.

    XLA compiles one module on one core, so on an idle machine with as many
    cores as runners each compile takes as long as it would alone (measured
    here: 5.4 and 5.8 s together against 5.1 and 5.5 s one after the other for
    the 300-leaf Adafactor steps of both libraries).
    """
    if not concurrent or len(runners) < 2:
        for r in runners:
            r.compile()
        return
    with ThreadPoolExecutor(
        max_workers=max(1, min(len(runners), _cpu_count()))
    ) as pool:
        for future in [pool.submit(r.compile) for r in runners]:
            future.result()


# A step to benchmark: (step_fn, make_args(params, grads), donated argnums,
# static leading args). make_args builds the full argument tuple, whose entry 1
# is the optimizer state.
_Step = tuple[Callable, Callable, tuple, tuple]


def _treeopt_step(opt: treeopt.Optimizer) -> _Step:
    def make_args(params: Any, grads: Any) -> tuple:
        slots, opt_params = opt.tree_init(params, store_slots=False)
        return params, slots, grads, opt_params

    def step_fn(step, params, slots, grads, opt_params):
        return opt.tree_update(
            step, grads, params, slots, opt_params, store_slots=False
        )

    return step_fn, make_args, (1, 2), (jnp.asarray(0, jnp.int32),)


def _packed_step(opt: treeopt.Optimizer, params: Any) -> _Step:
    """Weights and gradients held packed, as a model using ``Packed`` keeps them."""
    pk = packed_lib.Packed(opt, params)

    def make_args(params: Any, grads: Any) -> tuple:
        params, grads = pk.pack(params), pk.pack(grads)
        slots, opt_params = pk.init(params)
        return params, slots, grads, opt_params

    def step_fn(step, params, slots, grads, opt_params):
        return pk.update(step, grads, params, slots, opt_params)

    return step_fn, make_args, (1, 2), (jnp.asarray(0, jnp.int32),)


def _optax_step(tx: Any) -> _Step:
    import optax

    def make_args(params: Any, grads: Any) -> tuple:
        return params, tx.init(params), grads

    def step_fn(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step_fn, make_args, (0, 1), ()


def _axpy(y: jax.Array, x: jax.Array) -> tuple[jax.Array]:
    return (0.5 * x + y,)


def _axpy_runner(n: int) -> _Runner:
    """The bandwidth probe: a compiled, donated ``y <- x / 2 + y`` over ``n``
    float32 elements, which moves 12 bytes per element (read x and y, write y)."""
    vector = jax.ShapeDtypeStruct((n,), jnp.float32)
    runner = _Runner(_axpy, (vector, vector), (0,), ())
    runner.compile()
    runner.set_args((jnp.zeros((n,), jnp.float32), jnp.ones((n,), jnp.float32)))
    return runner


def _copy(tree: Any) -> Any:
    return jax.tree.map(jnp.copy, tree)


@dataclasses.dataclass
class _Row:
    """One (tree, optimizer) row: its steps, lowered, waiting to be timed."""

    tree: str
    optimizer: str
    shapes: Shapes
    make_args: dict[str, Callable]
    runners: dict[str, _Runner]
    state_bytes: dict[str, int]
    armed: bool = False  # the runners hold their arrays (``_arm_row``)


def _plan_row(tree_name: str, shapes: Shapes, opt_name: str, cfg: Config) -> _Row:
    """Traces and lowers the row's steps on abstract trees (no arrays made)."""
    make_treeopt, make_optax = _optax_configs()[opt_name]
    params = _nest(shapes, lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32))
    steps = {
        "treeopt": _treeopt_step(make_treeopt()),
        "optax": _optax_step(make_optax()),
    }
    if cfg.packed:
        steps["packed"] = _packed_step(make_treeopt(), params)
    runners, state_bytes = {}, {}
    for name, (step_fn, make_args, donate, static) in steps.items():
        args = jax.eval_shape(make_args, params, params)
        runners[name] = _Runner(step_fn, args, donate, static)
        state_bytes[name] = _nbytes(args[1])
    make_args = {name: step[1] for name, step in steps.items()}
    return _Row(tree_name, opt_name, shapes, make_args, runners, state_bytes)


def _n_params(row: _Row) -> int:
    return sum(math.prod(s) for s in row.shapes.values())


class _TreeArrays:
    """Each tree's weights and gradients, made when a row first needs them and
    dropped after the last row on the tree (``rows``: the run's row order).
    Gradients are never donated; each step gets its own copy of the weights."""

    def __init__(self, rows: Sequence[tuple[str, str]]):
        self._left = collections.Counter(tree for tree, _ in rows)
        self._arrays: dict[str, tuple[Any, Any]] = {}

    def get(self, row: _Row) -> tuple[Any, Any]:
        if row.tree not in self._arrays:
            weights = make_tree(row.shapes, seed=0)
            self._arrays[row.tree] = weights, make_tree(row.shapes, seed=1)
        return self._arrays[row.tree]

    def row_done(self, tree: str) -> None:
        self._left[tree] -= 1
        if self._left[tree] <= 0:
            self._arrays.pop(tree, None)


def _arm_row(row: _Row, trees: _TreeArrays) -> None:
    """Gives the row's runners their arrays: a copy of the tree's weights each,
    the gradients, a fresh state."""
    params, grads = trees.get(row)
    try:
        for name, r in row.runners.items():
            r.set_args(row.make_args[name](_copy(params), grads))
    except BaseException:
        _disarm(row)
        raise
    row.armed = True


def _disarm(row: _Row) -> None:
    """Frees the arrays that the row's runners hold."""
    for r in row.runners.values():
        r.set_args(())
    row.armed = False


def _time_row(row: _Row, cfg: Config, trees: _TreeArrays | None = None) -> dict:
    """Steps the compiled runners of ``row`` and the bandwidth probe,
    interleaved; returns the row's record. The row's arrays are freed however
    it ends.

    The probe runs in the same rounds as the steps, so the bound and the % of
    it that a step reaches compare medians taken under the same load (a probe
    timed once per tree, before its rows, put SGD's one-big step, the same
    kernel as the probe, anywhere from 62 to 109% in runs on a shared machine).
    """
    trees = _TreeArrays([(row.tree, row.optimizer)]) if trees is None else trees
    n_params = _n_params(row)
    n_probe = max(1 << 10, min(n_params, cfg.bandwidth_elements))
    probe = None
    try:
        if not row.armed:
            _arm_row(row, trees)
        param_bytes = _nbytes(trees.get(row)[0])
        probe = _axpy_runner(n_probe)
        order = [*row.runners.values(), probe]
        for r in order:
            r.step(record=False)
        for i in range(cfg.rounds):
            for r in order if i % 2 == 0 else order[::-1]:
                for _ in range(cfg.steps_per_round):
                    r.step(record=True)
    finally:
        _disarm(row)
        if probe is not None:
            probe.set_args(())
    bandwidth = 12 * n_probe / (probe.median_ms() / 1e3)
    record: dict[str, Any] = {
        "tree": row.tree,
        "optimizer": row.optimizer,
        "n_leaves": len(row.shapes),
        "n_params": n_params,
        "param_bytes": param_bytes,
        "axpy": {
            "elements": n_probe,
            "samples": len(probe.times),
            "ms": probe.median_ms(),
            "gbs": bandwidth / 1e9,
        },
    }
    for name, r in row.runners.items():
        moved = 3 * param_bytes + 2 * row.state_bytes[name]
        record[name] = {
            "ms": r.median_ms(),
            "samples": len(r.times),
            "compile_s": r.compile_s,
            "lower_s": r.lower_s,
            "state_bytes": row.state_bytes[name],
            "bound_ms": 1e3 * moved / bandwidth,
            "pct_of_bound": 100 * (1e3 * moved / bandwidth) / r.median_ms(),
        }
    record["ratio"] = record["treeopt"]["ms"] / record["optax"]["ms"]
    if "packed" in record:
        record["packed_ratio"] = record["packed"]["ms"] / record["optax"]["ms"]
    return record


def bench_row(
    tree_name: str,
    shapes: Shapes,
    opt_name: str,
    cfg: Config,
    trees: _TreeArrays | None = None,
) -> dict:
    """Lowers, compiles and times one (tree, optimizer) row; returns its record.
    ``trees``: the run's tree arrays, shared by its rows."""
    row = _plan_row(tree_name, shapes, opt_name, cfg)
    compile_all(list(row.runners.values()), cfg.concurrent_compile)
    return _time_row(row, cfg, trees)


def run(cfg: Config, log: Callable[[str], None] | None = None) -> dict:
    """Runs every row of ``cfg``; a failing row is recorded, not raised. On
    Ctrl-C, raises ``cli.Interrupted`` whose ``result`` holds the rows timed so
    far (and ``"interrupted": True``).

    Two phases. First every row's steps are traced and lowered, one after the
    other, and each is handed to a pool of compile threads, so XLA compiles
    while Python traces the next steps (one thread per core, tracing included;
    one compile at a time without ``cfg.concurrent_compile``; the profile of
    ``cfg.profile_shape`` is made there too, and rows on trees of at most
    ``cfg.arm_ahead_bytes`` get their arrays). Then, with nothing else running,
    each row is timed: its steps and the bandwidth probe interleaved, on fresh
    arrays. A row's ``wall_s`` is its tracing plus its
    timing; compile times are in each step's record. ``budget_s`` stops the
    tracing, not the compiles or timing of rows already traced; with
    ``cfg.pipeline=False`` rows run one after the other and no row starts
    after ``budget_s``.
    """
    start = time.perf_counter()
    result: dict = {"machine": machine_info(), "rows": []}

    def add(record: dict, t0: float) -> None:
        record["wall_s"] = time.perf_counter() - t0
        result["rows"].append(record)
        if log is not None:
            log(_row_summary(record))

    try:
        if cfg.pipeline:
            profile = _run_pipelined(cfg, start, add, log)
        else:
            _run_row_by_row(cfg, start, add)
            profile = _profile(cfg.profile_shape) if cfg.profile_shape else None
    except KeyboardInterrupt:
        result["interrupted"] = True
        result["wall_s"] = time.perf_counter() - start
        done, total = len(result["rows"]), len(cfg.row_order())
        raise Interrupted(f"after {done} of {total} rows", result) from None
    if profile is not None:
        result["profile"] = profile
    result["wall_s"] = time.perf_counter() - start
    return result


def _failed(tree_name: str, opt_name: str, why: str) -> dict:
    return {"tree": tree_name, "optimizer": opt_name, "error": why}


def _profile(shape: tuple[int, ...]) -> dict:
    """``result["profile"]``: ``profile_leaf``'s rows, or why it failed."""
    try:
        return {"shape": list(shape), "rows": profile_leaf(shape)}
    except Exception as e:  # keep the timed rows
        return {"shape": list(shape), "error": repr(e)}


def _run_pipelined(
    cfg: Config,
    start: float,
    add: Callable[[dict, float], None],
    log: Callable[[str], None] | None,
) -> dict | None:
    """``run``'s default order: trace everything while compiling, then time.
    Returns the profile (``_profile``), made in the pool before the timing."""
    workers = max(1, _cpu_count() if cfg.concurrent_compile else 1)
    # One core per thread: tracing holds a core, so one compile fewer runs
    # until every row is traced.
    cores = threading.Semaphore(workers)

    def compile_on_a_core(runner: _Runner) -> None:
        with cores:
            runner.compile()

    def profile_on_a_core(shape: tuple[int, ...]) -> dict:
        with cores:
            return _profile(shape)

    def arm_on_a_core(row: _Row) -> None:
        with cores:
            try:
                _arm_row(row, trees)
            except Exception as e:  # retried, and recorded, when the row is timed
                if log is not None:
                    log(f"{row.tree} {row.optimizer}: arrays not made ahead: {e!r}")

    trees = _TreeArrays(cfg.row_order())
    planned: list[tuple[str, str, Any, float]] = []
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        cores.acquire()
        try:
            _plan_rows(cfg, start, pool, compile_on_a_core, planned)
        finally:
            cores.release()
        if log is not None:
            log(f"traced {len(planned)} rows in {time.perf_counter() - start:.0f} s")
        profile = None
        if cfg.profile_shape is not None:
            profile = pool.submit(profile_on_a_core, cfg.profile_shape)
        for *_, plan, _ in planned:
            if (
                not isinstance(plan, str)
                and 4 * _n_params(plan[0]) <= cfg.arm_ahead_bytes  # float32
            ):
                arm_on_a_core(plan[0])
        # Every compile has ended before the first step is timed.
        wait(
            [f for *_, plan, _ in planned if not isinstance(plan, str) for f in plan[1]]
            + ([profile] if profile is not None else [])
        )
        for tree_name, opt_name, plan, plan_s in planned:
            # The row's wall time is its tracing plus its timing.
            t0 = time.perf_counter() - plan_s
            if isinstance(plan, str):
                trees.row_done(tree_name)
                add(_failed(tree_name, opt_name, plan), t0)
                continue
            row, futures = plan
            try:
                for future in futures:
                    future.result()
                add(_time_row(row, cfg, trees), t0)
            except Exception as e:  # a row may run out of memory; keep the rest
                _disarm(row)
                add(_failed(tree_name, opt_name, repr(e)), t0)
            finally:
                trees.row_done(tree_name)
    finally:
        # After a Ctrl-C, wait for the compiles running, not for every one queued.
        pool.shutdown(cancel_futures=True)
    return None if profile is None else profile.result()


def _run_row_by_row(
    cfg: Config, start: float, add: Callable[[dict, float], None]
) -> None:
    """``run`` without the pipeline: each row traced, compiled and timed in turn."""
    trees = _TreeArrays(cfg.row_order())
    for tree_name, opt_name in cfg.row_order():
        t0 = time.perf_counter()
        if t0 - start > cfg.budget_s:
            trees.row_done(tree_name)
            add(_failed(tree_name, opt_name, "skipped: budget"), t0)
            continue
        try:
            shapes = cfg.trees[tree_name]
            add(bench_row(tree_name, shapes, opt_name, cfg, trees), t0)
        except Exception as e:  # a row may run out of memory; keep the rest
            add(_failed(tree_name, opt_name, repr(e)), t0)
        finally:
            trees.row_done(tree_name)


def _plan_rows(
    cfg: Config,
    start: float,
    pool: ThreadPoolExecutor,
    compile_fn: Callable,
    planned: list,
) -> None:
    """Traces the rows of ``cfg`` in order, submits their compiles to ``pool``
    and appends ``(tree, optimizer, (row, futures) or error, tracing s)``."""
    for tree_name, opt_name in cfg.row_order():
        t0 = time.perf_counter()
        if t0 - start > cfg.budget_s:
            planned.append((tree_name, opt_name, "skipped: budget", 0.0))
            continue
        try:
            row = _plan_row(tree_name, cfg.trees[tree_name], opt_name, cfg)
            futures = [pool.submit(compile_fn, r) for r in row.runners.values()]
            plan: Any = (row, futures)
        except Exception as e:  # e.g. an unknown optimizer; keep the rest
            plan = repr(e)
        planned.append((tree_name, opt_name, plan, time.perf_counter() - t0))


def machine_info() -> dict:
    """Device, host and library versions, for the report."""
    import optax

    dev = jax.devices()[0]
    return {
        "device": getattr(dev, "device_kind", str(dev)),
        "platform": dev.platform,
        "processor": platform.processor() or platform.machine(),
        "cpu_count": _cpu_count(),
        "jax": jax.__version__,
        "optax": optax.__version__,
        "treeopt": treeopt.__version__,
        "xla_cpu_multi_output_fusion": fusion.cpu_multi_output_fusion(),
        "sibling_outputs": fusion.sibling_outputs_enabled(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0


def _row_summary(row: dict) -> str:
    head = f"{row['tree']:>12} {row['optimizer']:>9}"
    if "error" in row:
        return f"{head}  FAILED {row['error'][:120]}"
    s = f"{head}  treeopt {row['treeopt']['ms']:8.3f} ms  optax "
    s += f"{row['optax']['ms']:8.3f} ms  ratio {row['ratio']:.2f}"
    if "packed" in row:
        s += f"  packed {row['packed']['ms']:8.3f} ms ({row['packed_ratio']:.2f})"
    return s + f"  [{row['wall_s']:.1f} s]"


# ----------------------------------------------------------------- profile

# name = shape op(operands): the shape is one array or, for a multi-output
# fusion, a tuple of arrays; a layout in braces may follow each array.
_INSTR = re.compile(
    r"^\s*(?:ROOT )?%(\S+) = (\([^()]*\)|\S+?)(?:\{[^}]*\})? (\w[\w-]*)\((.*?)\)"
)


def hlo_passes(compiled_text: str, shape: tuple[int, ...]) -> list[tuple[str, int]]:
    """The kernels of a compiled step that touch full-size (``shape``) arrays.

    Reads the optimized HLO's entry computation; returns ``(name, n)`` per kernel
    (fusion, copy, ...) whose outputs or operands have ``shape``, ``n`` being how
    many full-size arrays it reads plus writes (a multi-output fusion writes
    several; reading one of its outputs reads one array).
    """
    full = "[" + ",".join(map(str, shape)) + "]"

    def is_full(array_shape: str) -> bool:
        return re.sub(r"\{[^}]*\}", "", array_shape).endswith(full)

    entry = compiled_text[compiled_text.index("\nENTRY") :]
    shapes: dict[str, list[str]] = {}
    passes = []
    for line in entry.splitlines():
        m = _INSTR.match(line)
        if m is None:
            continue
        name, out_shape, op, operands = m.groups()
        outs = [x.strip() for x in out_shape.strip("()").split(", ")]
        if op == "get-tuple-element":
            index = int(re.search(r"index=(\d+)", line).group(1))
            source = shapes.get(operands.strip().lstrip("%"), [""])
            shapes[name] = [source[index] if index < len(source) else ""]
            continue
        shapes[name] = outs
        if op in ("parameter", "tuple", "bitcast", "constant"):
            continue
        names = [
            x.strip().lstrip("%") for x in re.sub(r"/\*.*?\*/", "", operands).split(",")
        ]
        n_in = sum(len(shapes.get(x, [])) == 1 and is_full(shapes[x][0]) for x in names)
        n_out = sum(is_full(x) for x in outs)
        if n_in or n_out:
            passes.append((name, n_in + n_out))
    return passes


def profile_leaf(shape: tuple[int, ...] = (4096, 4096)) -> list[dict]:
    """Per optimizer, on one float32 leaf of ``shape``: the full-size kernels of
    the compiled treeopt and optax steps (the benchmark's own steps) and the
    bytes per parameter they move, against the ideal (each array read once,
    each output written once)."""
    rows = []
    params = {"w": jax.ShapeDtypeStruct(shape, jnp.float32)}
    for name, (make_treeopt, make_optax) in _optax_configs().items():
        steps = {
            "treeopt": _treeopt_step(make_treeopt()),
            "optax": _optax_step(make_optax()),
        }
        row: dict[str, Any] = {"optimizer": name}
        for lib, (step_fn, make_args, donate, static) in steps.items():
            args = jax.eval_shape(make_args, params, params)
            runner = _Runner(step_fn, args, donate, static)
            runner.compile()
            passes = hlo_passes(runner.compiled_text(), shape)
            row[lib] = {"kernels": len(passes), "bytes": 4 * sum(n for _, n in passes)}
            if lib == "treeopt":
                full_slots = sum(x.shape == shape for x in jax.tree.leaves(args[1]))
                row["ideal_bytes"] = 4 * (3 + 2 * full_slots)
        rows.append(row)
    return rows


def profile_markdown(rows: list[dict], shape: tuple[int, ...]) -> str:
    """``profile_leaf`` as a markdown table."""
    lines = [
        f"Full-size kernels and bytes moved per parameter, one {shape} float32 leaf "
        "(from the compiled HLO):",
        "",
        "| optimizer | ideal B/param | treeopt kernels | treeopt B/param | optax "
        "kernels | optax B/param |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        t, o = r["treeopt"], r["optax"]
        lines.append(
            f"| {r['optimizer']} | {r['ideal_bytes']} | {t['kernels']} | {t['bytes']} "
            f"| {o['kernels']} | {o['bytes']} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------ output


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f}"


# Machine-info switches named in the table's header line when on.
_FLAGS = {
    "xla_cpu_multi_output_fusion": "XLA:CPU multi-output fusion on",
    "sibling_outputs": "treeopt sibling outputs on",
}


def to_markdown(result: dict) -> str:
    """The rows as a markdown table, with the machine line above it."""
    m = result["machine"]
    lines = [
        f"{m['device']} ({m['platform']}, {m['cpu_count']} cores), jax {m['jax']}, "
        f"optax {m['optax']}, {m['date']}"
        + "".join(f", {text}" for key, text in _FLAGS.items() if m.get(key))
        + ". Bound: every array read once and every output written once, at the "
        "bandwidth of a jitted axpy as large as the tree (capped: see the JSON), "
        "timed in the row's rounds.",
        "",
        "| tree | optimizer | treeopt ms | optax ms | ratio | packed ms | packed "
        "ratio | compile s (treeopt / optax / packed) | bound ms (axpy GB/s) "
        "| % of bound (treeopt / optax / packed) "
        "| state MB (treeopt / optax) / params MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        if "error" in row:
            lines.append(
                f"| {row['tree']} | {row['optimizer']} | failed: "
                f"{row['error'][:80]} |" + " |" * 8
            )
            continue
        t, o, p = row["treeopt"], row["optax"], row.get("packed")
        tree = f"{row['tree']} ({row['n_leaves']} leaves, {row['n_params'] / 1e6:.1f}M)"
        lines.append(
            f"| {tree} | {row['optimizer']} | {t['ms']:.3f} | {o['ms']:.3f} "
            f"| {row['ratio']:.2f} | "
            + (f"{p['ms']:.3f} | {row['packed_ratio']:.2f}" if p else "- | -")
            + f" | {t['compile_s']:.2f} / {o['compile_s']:.2f} / "
            + (f"{p['compile_s']:.2f}" if p else "-")
            + f" | {t['bound_ms']:.3f} ({row['axpy']['gbs']:.0f}) | "
            f"{t['pct_of_bound']:.0f} / "
            f"{o['pct_of_bound']:.0f} / "
            + (f"{p['pct_of_bound']:.0f}" if p else "-")
            + f" | {_mb(t['state_bytes'])} / {_mb(o['state_bytes'])} / "
            f"{_mb(row['param_bytes'])} |"
        )
    profile = result.get("profile")
    if profile is not None and "rows" in profile:
        lines += ["", profile_markdown(profile["rows"], tuple(profile["shape"]))]
    elif profile is not None:
        lines += [
            "",
            f"Profile of one {tuple(profile['shape'])} leaf failed: {profile['error']}",
        ]
    return "\n".join(lines)


def to_json(result: dict) -> str:
    """The full result as indented JSON."""
    return json.dumps(result, indent=2, sort_keys=True)
