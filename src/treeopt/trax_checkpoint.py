"""Reads the checkpoints of Trax 1.4.1's training loop into treeopt's layout.

``Loop.save_checkpoint('model')`` writes ``model.pkl.gz`` (a pickle of the step,
model state, history and input signature), ``model.weights.npy.gz`` (the flat
weights) and ``model.opt_slots{i}.npy.gz`` (the flat slots of task ``i``): gzip
streams of ``.npy`` records, one per leaf, with bfloat16 leaves bit-cast to
``uint16`` and ``None`` slots dropped. ``load`` rebuilds the per-leaf slots of
``optimizer.tree_init(weights, store_slots=False)`` from them, checking every
record's shape and dtype against what the optimizer's ``init`` makes, and reads
the pickle with an unpickler that builds nothing but data.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from treeopt import base

try:  # numpy >= 2 moved it; pickles name either module
    from numpy._core.multiarray import scalar as _np_scalar
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import scalar as _np_scalar

_BF16 = np.dtype(jnp.bfloat16)
_U16 = np.dtype("<u2")


@dataclasses.dataclass(frozen=True)
class TraxCheckpoint:
    """What a Trax checkpoint holds, in treeopt's layout.

    ``step`` counts completed steps (resume with ``tree_update(step + 1, ...)``);
    ``slots`` is ``slots_per_task[0]``, shaped like ``optimizer.tree_init(weights,
    store_slots=False)[0]``; ``state`` and ``eval_state`` are the model's flat
    state lists, ``history`` Trax's metrics dict, ``input_signature`` one
    ``jax.ShapeDtypeStruct`` per model input.
    """

    step: int
    weights: Any
    slots: tuple
    slots_per_task: list
    state: list
    eval_state: list
    history: dict
    input_signature: tuple
    version_timestamp: str | None

    def summary(self) -> str:
        """What was found, for a person: the step, each weight leaf's shape and
        dtype with the shapes of its slots, and the bytes of each part."""

        def nbytes(tree: Any) -> int:
            return sum(int(np.asarray(x).nbytes) for x in jax.tree.leaves(tree))

        def shape(x: Any) -> str:
            return f"{np.dtype(x.dtype).name}{list(np.shape(x))}"

        weights = jax.tree.leaves(self.weights)
        lines = [
            f"{self.step} steps done (resume with step {self.step + 1}); "
            f"{len(weights)} weight leaves, {sum(int(np.size(w)) for w in weights)} "
            f"parameters, {nbytes(weights)} bytes; slots {nbytes(self.slots)} bytes"
            f" in {len(self.slots_per_task)} task(s)"
        ]
        for i, (w, s) in enumerate(zip(weights, self.slots, strict=True)):
            slots = ", ".join(shape(x) for x in jax.tree.leaves(s)) or "none"
            lines.append(f"  leaf {i}: {shape(w)}  slots: {slots}")
        return "\n".join(lines)


# ------------------------------------------------------------------ pickle


class _ShapeDtype:
    """Stands in for ``trax.shapes.ShapeDtype``, pickled with its ``__slots__``
    state ``(None, {'shape': ..., 'dtype': ...})``."""

    __slots__ = ("dtype", "shape")

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict) or set(state) != {"shape", "dtype"}:
            raise pickle.UnpicklingError(f"unexpected ShapeDtype state {state!r}")
        self.shape = tuple(int(d) for d in state["shape"])
        self.dtype = np.dtype(state["dtype"])


class _DataUnpickler(pickle.Unpickler):
    """Builds containers, numbers, strings, numpy dtypes and scalars and Trax's
    ShapeDtype; any other global (a function to call) is refused, so a crafted
    file cannot run code. Trax's containers and scalars need no builtins global
    under pickle protocol 2+ (they have opcodes of their own), so none is allowed.
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("trax.shapes", "ShapeDtype"):
            return _ShapeDtype
        if (module, name) == ("numpy", "dtype"):
            return np.dtype
        if module == "numpy.dtypes" and name.endswith("DType"):
            cls = getattr(np.dtypes, name, None)
            if isinstance(cls, type) and issubclass(cls, np.dtype):
                return cls
        scalar_modules = ("numpy.core.multiarray", "numpy._core.multiarray")
        if module in scalar_modules and name == "scalar":
            return _np_scalar
        raise pickle.UnpicklingError(
            f"refusing global {module}.{name}: a Trax checkpoint pickle holds "
            "only data (containers, numbers, numpy dtypes, trax.shapes.ShapeDtype)"
        )


def _signature(x: Any) -> Any:
    if isinstance(x, _ShapeDtype):
        if not hasattr(x, "shape"):
            raise pickle.UnpicklingError("a ShapeDtype without shape and dtype")
        return jax.ShapeDtypeStruct(x.shape, x.dtype)
    if isinstance(x, list | tuple):
        return tuple(_signature(y) for y in x)
    return x


def _read_pickle(path: str) -> dict:
    try:
        with gzip.open(path, "rb") as f:
            data = _DataUnpickler(f).load()
            if isinstance(data, dict):
                data["input_signature"] = _signature(data.get("input_signature", ()))
    except FileNotFoundError:
        raise FileNotFoundError(f"no Trax checkpoint file {path}") from None
    except pickle.UnpicklingError as e:
        raise pickle.UnpicklingError(f"{path}: {e}") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ValueError(f"{path} is truncated or not gzip: {e}") from None
    except OSError:
        raise
    except Exception as e:  # garbage that unpickles into a failing call
        raise ValueError(f"{path} is not a Trax checkpoint pickle: {e!r}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a dict")
    for key in ("step", "flat_weights", "slots_per_task"):
        if key not in data:
            raise ValueError(f"{path} has no {key!r}: not a Trax 1.4.1 checkpoint")
    if isinstance(data["step"], bool) or not isinstance(data["step"], int | np.integer):
        raise ValueError(f"{path}: 'step' is {data['step']!r}, not an int")
    for key in ("flat_weights", "slots_per_task"):
        # Trax 1.4.1 stores the compresslevel here and the arrays in .npy.gz
        # files; older Trax pickled the arrays themselves.
        if not isinstance(data[key], int):
            raise ValueError(
                f"{path}: {key!r} is a {type(data[key]).__name__}, not the "
                "compresslevel that Trax 1.4.1 writes; older formats are not read"
            )
    return data


# ------------------------------------------------------------- npy records


def _read_into(f: Any, array: np.ndarray) -> None:
    """Fills the contiguous ``array`` from ``f`` (no second copy of the data)."""
    buf = memoryview(array.reshape(-1).view(np.uint8))
    got = 0
    while got < len(buf):
        n = f.readinto(buf[got:])
        if not n:
            raise ValueError(f"ends after {got} of {len(buf)} bytes")
        got += n


def _read_record(f: Any) -> np.ndarray:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise ValueError(f"npy format {version} (Trax writes 1.0)")
    if dtype.hasobject:
        raise ValueError(f"dtype {dtype} holds Python objects (allow_pickle=False)")
    array = np.empty(int(np.prod(shape, dtype=np.int64)), dtype)
    _read_into(f, array)
    if fortran:
        return array.reshape(shape[::-1]).transpose()
    return array.reshape(shape)


def _read_records(path: str) -> list[np.ndarray]:
    """The ``.npy`` records of a gzip file, one after another to its end."""
    records: list[np.ndarray] = []
    try:
        with gzip.open(path, "rb") as f:
            while f.peek(1):
                try:
                    records.append(_read_record(f))
                except ValueError as e:
                    raise ValueError(f"{path}: record {len(records)}: {e}") from None
    except FileNotFoundError:
        raise FileNotFoundError(f"no Trax checkpoint file {path}") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ValueError(
            f"{path} is truncated or not gzip (at record {len(records)}): {e}"
        ) from None
    return records


# ---------------------------------------------------------------- matching


def _show(shape: tuple, dtype: Any) -> str:
    return f"shape {tuple(shape)} {np.dtype(dtype)}"


def _describe(optimizer: base.Optimizer) -> str:
    options = ", ".join(
        f"{k}={getattr(optimizer, k)!r}" for k in type(optimizer).structural
    )
    return f"{type(optimizer).__name__}({options})"


def _as_weight(x: np.ndarray) -> np.ndarray:
    # Weights are floats: a uint16 record can only be a bit-cast bfloat16.
    return x.view(_BF16) if x.dtype == _U16 else x


def _fit_weights(path: str, records: list, like: Any) -> Any:
    """``records`` unflattened into ``like``'s structure, checked leaf by leaf."""
    leaves, treedef = jax.tree.flatten_with_path(like)
    if len(leaves) != len(records):
        raise ValueError(
            f"`like` has {len(leaves)} leaves but {path} holds {len(records)} weights"
        )
    for i, ((key, x), r) in enumerate(zip(leaves, records, strict=True)):
        shape = tuple(np.shape(x))
        dtype = np.dtype(x.dtype) if hasattr(x, "dtype") else np.result_type(x)
        if (shape, dtype) != (r.shape, r.dtype):
            raise ValueError(
                f"weight leaf {i} ({jax.tree_util.keystr(key) or '<root>'}): "
                f"`like` has {_show(shape, dtype)}, {path} record {i} has "
                f"{_show(r.shape, r.dtype)}"
            )
    return jax.tree.unflatten(treedef, records)


def _fit_slot(
    record: np.ndarray, want: jax.ShapeDtypeStruct, weight: np.ndarray
) -> np.ndarray | None:
    """``record`` as the slot ``want`` describes, or None if it does not fit."""
    if record.shape != want.shape:
        return None
    want_dtype = np.dtype(want.dtype)
    if record.dtype == want_dtype:
        return record
    if record.dtype == _U16 and want_dtype == _BF16:
        return record.view(_BF16)
    if record.dtype == _U16 and weight.dtype == _BF16 and want_dtype == np.float32:
        # Trax's Adafactor made the unfactored v in the weight's dtype (float32
        # after the first update); treeopt's is float32: widening is exact.
        return record.view(_BF16).astype(np.float32)
    return None


def _slots_for(path: str, records: list, optimizer: base.Optimizer, weights: list):
    """The per-leaf slot tuple of ``optimizer`` rebuilt from the flat records."""
    specs = []
    for w in weights:
        abstract = jax.eval_shape(
            optimizer.init, jax.ShapeDtypeStruct(w.shape, w.dtype)
        )
        specs.append(jax.tree.flatten(abstract))
    expected = sum(len(leaves) for leaves, _ in specs)
    counts = (
        f"{len(records)} slot records, {_describe(optimizer)} makes {expected} "
        "for these weights"
    )
    slots, k = [], 0
    for i, (w, (leaves, struct)) in enumerate(zip(weights, specs, strict=True)):
        fitted = []
        for j, want in enumerate(leaves):
            if k >= len(records):
                raise ValueError(
                    f"{path} has {counts}: nothing left for slot {j} of weight "
                    f"leaf {i} ({_show(want.shape, want.dtype)}); another "
                    "optimizer or option?"
                )
            got = _fit_slot(records[k], want, w)
            if got is None:
                raise ValueError(
                    f"{path} record {k} has {_show(records[k].shape, records[k].dtype)}"
                    f" but slot {j} of weight leaf {i} (weight "
                    f"{_show(w.shape, w.dtype)}) should have "
                    f"{_show(want.shape, want.dtype)} (the file has {counts}); another "
                    "optimizer or option?"
                )
            fitted.append(got)
            k += 1
        slots.append(jax.tree.unflatten(struct, fitted))
    if k != len(records):
        raise ValueError(
            f"{path} has {counts}: records {k} to {len(records) - 1} are left "
            "over; another optimizer or option?"
        )
    return tuple(slots)


# -------------------------------------------------------------------- load


def load(
    basename: str | os.PathLike, optimizer: base.Optimizer, like: Any = None
) -> TraxCheckpoint:
    """Reads the Trax 1.4.1 checkpoint ``basename`` (e.g. ``out/model`` for
    ``out/model.pkl.gz``, ``out/model.weights.npy.gz`` and
    ``out/model.opt_slots{i}.npy.gz``) with the slots of ``optimizer``.

    Weights come back as Trax's flat list of NumPy arrays, or unflattened into
    ``like`` (any pytree with as many leaves, of the same shapes and dtypes, in
    ``jax.tree_util`` order). Values are bit-exact; ``uint16`` records become
    bfloat16 again. Raises ``FileNotFoundError`` for a missing file, and
    ``ValueError`` naming the file, record and leaf for a truncated or garbled
    file or slots that do not fit ``optimizer`` (another class or option), and
    ``pickle.UnpicklingError`` if the pickle asks for anything but data.
    """
    name = os.fspath(basename).removesuffix(".pkl.gz")
    data = _read_pickle(f"{name}.pkl.gz")
    weights_path = f"{name}.weights.npy.gz"
    flat = [_as_weight(r) for r in _read_records(weights_path)]
    weights = flat if like is None else _fit_weights(weights_path, flat, like)
    slots_per_task = []
    while True:
        path = f"{name}.opt_slots{len(slots_per_task)}.npy.gz"
        if slots_per_task and not os.path.exists(path):
            break  # the pickle does not say how many tasks there were
        records = _read_records(path)
        slots_per_task.append(_slots_for(path, records, optimizer, flat))
    signature = data["input_signature"]
    return TraxCheckpoint(
        step=int(data["step"]),
        weights=weights,
        slots=slots_per_task[0],
        slots_per_task=slots_per_task,
        state=list(data.get("flat_state", [])),
        eval_state=list(data.get("flat_eval_state", [])),
        history=dict(data.get("history", {})),
        input_signature=signature if isinstance(signature, tuple) else (signature,),
        version_timestamp=data.get("version_timestamp"),
    )
