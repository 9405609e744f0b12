"""Checkpoints of a training state with orbax, checked against the optimizer and
tree they are restored into (needs the checkpoint extra).

Each save is one orbax ``CheckpointManager`` step: written to a temporary
directory and renamed when complete, so a save killed midway leaves the earlier
checkpoints as they were. Beside the state, a checkpoint records the optimizer's
class, structural options and opt_params names, and every leaf's path, shape and
dtype, so that ``restore`` can name a mismatch instead of silently casting (orbax
alone converts a bfloat16 momentum into a float32 target without a word, and
cannot tell Momentum slots from RMSProp slots).
"""

from __future__ import annotations

import enum
import os
from typing import Any

import jax
import jax.numpy as jnp

from treeopt import base

try:
    import orbax.checkpoint as ocp
except ModuleNotFoundError as e:
    if e.name not in ("orbax", "orbax.checkpoint"):  # broken, not missing
        raise
    msg = "treeopt.checkpoint needs orbax-checkpoint: pip install 'treeopt[checkpoint]'"
    raise ModuleNotFoundError(msg, name=e.name) from None

_FORMAT = 1


def describe(optimizer: base.Optimizer) -> dict[str, Any]:
    """The optimizer's class, structural options (those its class declares in
    ``structural``, such as Adafactor's ``factored``: the ones that fix the
    state's layout) and opt_params names, as JSON data."""
    options = {}
    for name in type(optimizer).structural:
        value = getattr(optimizer, name)
        if isinstance(value, base.Optimizer):
            value = describe(value)
        elif isinstance(value, enum.Enum):
            value = value.name
        elif not isinstance(value, bool | int | float | str | type(None)):
            value = repr(value)
        options[name] = value
    cls = type(optimizer)
    return {
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "options": options,
        "opt_params": sorted(optimizer.opt_params),
    }


def _is_placeholder(x: Any) -> bool:
    return x is None or (isinstance(x, list | tuple | dict) and len(x) == 0)


def _leaf_specs(tree: base.PyTree) -> list[list]:
    """``[path, shape, dtype]`` per array leaf, ``[path, 'None' or '[]']`` per
    placeholder (SGD's ``None`` slot, SM3's ``[]``), in flatten order."""
    abstract = jax.eval_shape(lambda t: t, tree)
    specs = []
    for path, x in jax.tree.flatten_with_path(abstract, is_leaf=_is_placeholder)[0]:
        key = jax.tree_util.keystr(path) or "<root>"
        if _is_placeholder(x):
            specs.append([key, repr(x)])
        else:
            specs.append([key, list(x.shape), str(x.dtype)])
    return specs


def _show(spec: list) -> str:
    if len(spec) == 2:
        return spec[1]
    return f"shape {tuple(spec[1])} {spec[2]}"


def _some(paths: list[str]) -> str:
    more = f" and {len(paths) - 3} more" if len(paths) > 3 else ""
    return ", ".join(paths[:3]) + more


def _tree_mismatch(saved: list[list], wanted: list[list]) -> str | None:
    """The leaves only one side has, else the first leaf whose shape, dtype or
    placeholder differs; None if the trees fit."""
    saved_by_path = {spec[0]: spec for spec in saved}
    wanted_by_path = {spec[0]: spec for spec in wanted}
    only_saved = [p for p in saved_by_path if p not in wanted_by_path]
    only_wanted = [p for p in wanted_by_path if p not in saved_by_path]
    problems = []
    if only_wanted:
        problems.append(f"`like` has {_some(only_wanted)}, the checkpoint has not")
    if only_saved:
        problems.append(f"the checkpoint has {_some(only_saved)}, `like` has not")
    if problems:
        return "; ".join(problems)
    for path, s in saved_by_path.items():
        w = wanted_by_path[path]
        if s != w:
            return f"at {path}: checkpoint has {_show(s)}, `like` has {_show(w)}"
    return None


def _optimizer_mismatch(saved: dict, wanted: dict, prefix: str = "") -> list[str]:
    """Every difference between two ``describe`` results, as readable lines."""
    if saved["class"] != wanted["class"]:
        return [f"{prefix}class: saved {saved['class']}, now {wanted['class']}"]
    problems = []
    # Only the options the class declares structural now: a checkpoint from a
    # treeopt that recorded more (every property) still restores.
    for name in sorted(wanted["options"]):
        s, w = saved["options"].get(name), wanted["options"][name]
        if isinstance(s, dict) and isinstance(w, dict):
            problems += _optimizer_mismatch(s, w, f"{prefix}{name}.")
        elif s != w:
            problems.append(f"{prefix}{name}: saved {s!r}, now {w!r}")
    if saved["opt_params"] != wanted["opt_params"]:
        problems.append(
            f"{prefix}opt_params names: saved {saved['opt_params']}, "
            f"now {wanted['opt_params']}"
        )
    return problems


def _manager(directory: str | os.PathLike, keep: int | None = None, create=False):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=create,
        enable_async_checkpointing=False,
    )
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def latest_step(directory: str | os.PathLike) -> int | None:
    """The newest complete checkpoint's step in ``directory``, or None."""
    if not os.path.isdir(directory):
        return None
    with _manager(directory) as manager:
        return manager.latest_step()


def save(
    directory: str | os.PathLike,
    step: int,
    state: base.PyTree,
    *,
    optimizer: base.Optimizer | None = None,
    keep: int | None = None,
) -> None:
    """Writes ``state`` as checkpoint ``step`` under ``directory``; blocks until
    it is complete on disk.

    Args:
      directory: folder of checkpoints, one subfolder per step (created if needed).
      step: the step this checkpoint is saved under; must be new.
      state: any pytree of arrays, e.g. ``{'step': step, 'weights': weights,
        'slots': slots, 'opt_params': opt_params}`` or a Flax ``TrainState``;
        ``None`` and empty-container slot entries are kept.
      optimizer: the optimizer whose state this is; recorded so that ``restore``
        refuses a different class or structural option.
      keep: keep only the newest ``keep`` checkpoints (None: keep all).
    """
    state = jax.tree.map(jnp.asarray, state)
    meta = {
        "format": _FORMAT,
        "optimizer": None if optimizer is None else describe(optimizer),
        "tree": _leaf_specs(state),
    }
    with _manager(directory, keep, create=True) as manager:
        if step in manager.all_steps():
            raise ValueError(
                f"a checkpoint for step {step} already exists in {directory}"
            )
        manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), treeopt=ocp.args.JsonSave(meta)
            ),
        )
        manager.wait_until_finished()


def _target(abstract: jax.ShapeDtypeStruct, x: Any) -> jax.ShapeDtypeStruct:
    """What orbax restores a leaf of ``like`` as: its shape and (canonical) dtype,
    and its sharding if it has one (else the first device)."""
    sharding = getattr(x, "sharding", None) or jax.sharding.SingleDeviceSharding(
        jax.devices()[0]
    )
    return jax.ShapeDtypeStruct(abstract.shape, abstract.dtype, sharding=sharding)


def restore(
    directory: str | os.PathLike,
    like: base.PyTree,
    *,
    optimizer: base.Optimizer | None = None,
    step: int | None = None,
) -> base.PyTree:
    """Reads checkpoint ``step`` (default: the newest complete one).

    ``like`` is a tree of the same structure as the saved state (arrays,
    ``jax.ShapeDtypeStruct`` or Python scalars; e.g. a freshly initialized
    state); the result has its containers and, for arrays, its shardings. Raises
    ``ValueError`` naming the first difference if the saved leaves' paths, shapes
    or dtypes differ from ``like``'s, or if ``optimizer`` differs in class,
    structural options or opt_params names from the one recorded at save.
    """
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no complete checkpoint in {directory}")
    if step is None:
        step = latest_step(directory)
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {directory}")
    with _manager(directory) as manager:
        if step not in manager.all_steps():
            raise FileNotFoundError(
                f"no complete checkpoint for step {step} in {directory}; "
                f"complete steps: {list(manager.all_steps())}"
            )
        meta = manager.restore(
            step, args=ocp.args.Composite(treeopt=ocp.args.JsonRestore())
        ).treeopt
        where = os.path.join(os.fspath(directory), str(step))
        if meta.get("format") != _FORMAT:
            raise ValueError(
                f"checkpoint {where} has format {meta.get('format')!r}; this "
                f"treeopt reads format {_FORMAT}"
            )
        if optimizer is not None:
            if meta["optimizer"] is None:
                raise ValueError(
                    f"checkpoint {where} records no optimizer; restore it with "
                    f"optimizer=None"
                )
            problems = _optimizer_mismatch(meta["optimizer"], describe(optimizer))
            if problems:
                raise ValueError(
                    f"checkpoint {where} was saved by another optimizer "
                    f"configuration: {'; '.join(problems)}"
                )
        problem = _tree_mismatch(meta["tree"], _leaf_specs(like))
        if problem:
            raise ValueError(f"checkpoint {where} does not fit `like`: {problem}")
        target = jax.tree.map(_target, jax.eval_shape(lambda t: t, like), like)
        return manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        ).state
