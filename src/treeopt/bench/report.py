"""The benchmark's output: the machine it ran on, a markdown table, JSON."""

from __future__ import annotations

import json
import os
import platform
import time

import jax

import treeopt
from treeopt import fusion
from treeopt.bench.hlo import profile_markdown


def cpu_count() -> int:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 0


def machine_info() -> dict:
    """Device, host and library versions, for the report."""
    import optax

    dev = jax.devices()[0]
    return {
        "device": getattr(dev, "device_kind", str(dev)),
        "platform": dev.platform,
        "processor": platform.processor() or platform.machine(),
        "cpu_count": cpu_count(),
        "jax": jax.__version__,
        "optax": optax.__version__,
        "treeopt": treeopt.__version__,
        "xla_cpu_multi_output_fusion": fusion.cpu_multi_output_fusion(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


def row_line(row: dict) -> str:
    """One row as a line for the log, as it finishes."""
    head = f"{row['tree']:>12} {row['optimizer']:>9}"
    if "error" in row:
        return f"{head}  FAILED {row['error'][:120]}"
    s = f"{head}  treeopt {row['treeopt']['ms']:8.3f} ms  optax "
    s += f"{row['optax']['ms']:8.3f} ms  ratio {row['ratio']:.2f}"
    if "packed" in row:
        s += f"  packed {row['packed']['ms']:8.3f} ms ({row['packed_ratio']:.2f})"
    return s + f"  [{row['wall_s']:.1f} s]"


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f}"


_HEADER = (
    "| tree | optimizer | treeopt ms | optax ms | ratio | packed ms | packed ratio "
    "| compile s (treeopt / optax / packed) | bound ms (axpy GB/s) "
    "| % of bound (treeopt / optax / packed) "
    "| state MB (treeopt / optax) / params MB |"
)
_COLUMNS = _HEADER.count("|") - 1


def _table_row(row: dict) -> str:
    if "error" in row:
        cells = [row["tree"], row["optimizer"], f"failed: {row['error'][:80]}"]
        return "| " + " | ".join(cells + [""] * (_COLUMNS - 3)) + " |"
    t, o, p = row["treeopt"], row["optax"], row.get("packed")

    def three(key: str, fmt: str) -> str:
        return " / ".join(format(r[key], fmt) if r else "-" for r in (t, o, p))

    tree = f"{row['tree']} ({row['n_leaves']} leaves, {row['n_params'] / 1e6:.1f}M)"
    cells = [
        tree,
        row["optimizer"],
        f"{t['ms']:.3f}",
        f"{o['ms']:.3f}",
        f"{row['ratio']:.2f}",
        f"{p['ms']:.3f}" if p else "-",
        f"{row['packed_ratio']:.2f}" if p else "-",
        three("compile_s", ".2f"),
        f"{t['bound_ms']:.3f} ({row['axpy']['gbs']:.0f})",
        three("pct_of_bound", ".0f"),
        f"{_mb(t['state_bytes'])} / {_mb(o['state_bytes'])} / "
        f"{_mb(row['param_bytes'])}",
    ]
    return "| " + " | ".join(cells) + " |"


def to_markdown(result: dict) -> str:
    """The rows as a markdown table, the machine line above it and the
    profile, if any, below."""
    m, cfg = result["machine"], result["config"]
    switches = [
        ("XLA:CPU multi-output fusion on", m["xla_cpu_multi_output_fusion"]),
        (
            "treeopt's elementwise steps as fusion.SiblingOutputs",
            cfg["sibling_outputs"],
        ),
    ]
    lines = [
        f"{m['device']} ({m['platform']}, {m['cpu_count']} cores), jax {m['jax']}, "
        f"optax {m['optax']}, {m['date']}, medians of {cfg['rounds']} rounds"
        + "".join(f", {text}" for text, on in switches if on)
        + ". Bound: every array read once and every output written once, at the "
        "bandwidth of a jitted axpy as large as the tree (capped: see the JSON), "
        "timed in the row's rounds.",
        "",
        _HEADER,
        "|---|---|" + "---:|" * (_COLUMNS - 2),
    ]
    lines += [_table_row(row) for row in result["rows"]]
    profile = result.get("profile")
    if profile is not None and "rows" in profile:
        lines += ["", profile_markdown(profile["rows"], tuple(profile["shape"]))]
    elif profile is not None:
        shape = tuple(profile["shape"])
        lines += ["", f"Profile of one {shape} leaf failed: {profile['error']}"]
    return "\n".join(lines)


def to_json(result: dict) -> str:
    """The full result as indented JSON."""
    return json.dumps(result, indent=2, sort_keys=True)
