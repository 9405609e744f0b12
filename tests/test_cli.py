"""The ``treeopt`` command line: a tiny demo end to end, and bad input."""

import csv
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from treeopt import cli, errors

TINY = [
    "--steps", "4", "--evals", "2", "--context", "16", "--batch-size", "4",
    "--d-model", "16", "--layers", "1", "--heads", "2", "--sample-chars", "20",
]  # fmt: skip


def test_demo_end_to_end(tmp_path):
    pytest.importorskip("flax")
    out = tmp_path / "out"
    argv = ["demo", "--optimizers", "sgd,adafactor", "--out", str(out), *TINY]
    proc = subprocess.run(
        [sys.executable, "-m", "treeopt", *argv],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.startswith("| optimizer"))
    assert "val bpc" in header and "ms/step" in header and "state / params" in header
    rows = {line.split("|")[1].strip(): line for line in lines if line.startswith("|")}
    assert {"sgd", "adafactor"} <= set(rows)
    assert rows["sgd"].rstrip(" |").endswith("0.00x")  # SGD keeps no state
    assert "Sample from" in proc.stdout
    png = (out / "demo.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    with open(out / "curves.csv") as f:
        curves = list(csv.DictReader(f))
    assert [(r["optimizer"], r["step"]) for r in curves] == [
        ("sgd", "2"),
        ("sgd", "4"),
        ("adafactor", "2"),
        ("adafactor", "4"),
    ]
    assert all(0 < float(r["val_bpc"]) < 20 for r in curves)
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results["runs"]] == ["sgd", "adafactor"]
    assert results["runs"][0]["state_bytes"] == 0
    assert results["runs"][1]["state_bytes"] < results["runs"][1]["param_bytes"]


def test_bad_input_in_a_real_process(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "treeopt", "demo", "--data", str(tmp_path / "no")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr == f"treeopt demo: error: --data {tmp_path / 'no'}: no such file\n"
    )


def _files(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("print('hello')\n" * 20)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 500)
    return tmp_path


@pytest.mark.parametrize(
    "argv, match",
    [
        (["demo", "--data", "{tmp}/missing.txt"], r"missing.txt: no such file$"),
        (["demo", "--data", "{tmp}/empty.txt"], r"empty.txt is empty$"),
        (["demo", "--data", "{tmp}"], r"is not a file$"),
        (
            ["demo", "--data", "{tmp}/short.txt"],
            r"corpus too short: 300 characters leave 30 for validation, fewer "
            r"than --context \+ 1 = 65; give at least 650 characters",
        ),
        (["demo", "--data", "{tmp}/latin1.txt"], r"latin1.txt is not UTF-8 text"),
        (
            ["demo", "--optimizers", "adam,nadam"],
            r"unknown optimizer 'nadam'; choose from sgd, momentum, rmsprop, adam",
        ),
        (["demo", "--steps", "0"], r"--steps: must be a positive integer, got 0 "),
        (["demo", "--steps", "-3"], r"--steps: must be a positive integer, got -3 "),
        (["demo", "--steps", "ten"], r"must be a positive integer, got 'ten'"),
        (["demo", "--seed", "-1"], r"--seed: must be a non-negative integer, got -1"),
        (["demo", "--d-model", "30"], r"--d-model 30 is not a multiple of --heads 4"),
        (["bench-nothing"], r"invalid choice: 'bench-nothing'"),
        ([], r"the following arguments are required: command"),
    ],
)
def test_bad_input_is_one_line(tmp_path, capsys, argv, match):
    pytest.importorskip("flax")
    argv = [a.format(tmp=_files(tmp_path)) for a in argv]
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse exits on its own errors
        code = e.code
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("treeopt")
    assert "Traceback" not in captured.err
    assert re.search(match, captured.err), captured.err


TINY_2 = [
    "--steps", "2", "--optimizers", "sgd,adam", "--d-model", "8", "--layers", "1",
    "--heads", "1", "--context", "8", "--batch-size", "2", "--evals", "1",
    "--sample-chars", "4",
]  # fmt: skip


def _must_not_run(*args, **kwargs):
    raise AssertionError("the run started although its output cannot be written")


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    assert captured.err.count("\n") == 1
    return captured.err


@pytest.mark.parametrize("case", ["under-a-file", "read-only-dir"])
def test_demo_checks_out_is_writable_before_training(
    tmp_path, capsys, monkeypatch, case
):
    pytest.importorskip("flax")
    from treeopt import demo

    if case == "under-a-file":  # fails for root too
        (tmp_path / "file").write_text("")
        out, why = tmp_path / "file" / "sub", "Not a directory"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into a read-only directory")
        out, why = tmp_path / "ro", "Permission denied"
        out.mkdir(mode=0o500)
    monkeypatch.setattr(demo, "train_one", _must_not_run)
    monkeypatch.setattr(demo, "CharTransformer", _must_not_run)
    assert cli.main(["demo", "--out", str(out), *TINY_2]) == 2
    assert _one_error_line(capsys) == f"treeopt demo: error: --out {out}: {why}\n"


def test_demo_out_naming_a_file(tmp_path, capsys, monkeypatch):
    pytest.importorskip("flax")
    from treeopt import demo

    (tmp_path / "file").write_text("keep")
    monkeypatch.setattr(demo, "train_one", _must_not_run)
    assert cli.main(["demo", "--out", str(tmp_path / "file"), *TINY_2]) == 2
    err = _one_error_line(capsys)
    assert err == f"treeopt demo: error: --out {tmp_path / 'file'} is not a directory\n"
    assert (tmp_path / "file").read_text() == "keep"


def test_out_probe_makes_the_directory_and_leaves_it_empty(tmp_path):
    out = tmp_path / "new" / "dir"
    errors.check_writable_dir(out, "--out")
    assert out.is_dir() and list(out.iterdir()) == []


@pytest.mark.parametrize(
    "make, why",
    [
        (lambda d: d / "file" / "r.json", "r.json: Not a directory"),
        (lambda d: d / "missing" / "r.json", "r.json: No such file or directory"),
        (lambda d: d, " is a directory"),
    ],
)
def test_bench_checks_json_is_writable_before_running(
    tmp_path, capsys, monkeypatch, make, why
):
    pytest.importorskip("optax")
    from treeopt import bench

    (tmp_path / "file").write_text("")
    monkeypatch.setattr(bench, "run", _must_not_run)
    path = make(tmp_path)
    assert cli.main(["bench", "--quick", "--json", str(path)]) == 2
    err = _one_error_line(capsys)
    assert err.startswith(f"treeopt bench: error: --json {path}") and err.endswith(
        why + "\n"
    )


def test_json_probe_keeps_an_existing_file_and_leaves_no_new_one(tmp_path):
    old = tmp_path / "old.json"
    old.write_text('{"rows": []}')
    errors.check_writable_file(old, "--json")
    assert old.read_text() == '{"rows": []}'
    errors.check_writable_file(tmp_path / "new.json", "--json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.json"]


def _interrupt_at(monkeypatch, module, attr, n):
    """Makes the ``n``-th call of ``module.attr`` (from 1) raise KeyboardInterrupt,
    as a Ctrl-C there would."""
    real, calls = getattr(module, attr), []

    def fake(*args, **kwargs):
        calls.append(args)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, attr, fake)
    return calls


def test_ctrl_c_in_demo_keeps_the_finished_optimizers(tmp_path, capsys, monkeypatch):
    pytest.importorskip("flax")
    from treeopt import demo

    calls = _interrupt_at(monkeypatch, demo, "train_one", 2)
    out = tmp_path / "out"
    assert cli.main(["demo", "--out", str(out), *TINY_2]) == 130
    assert [c[0] for c in calls] == ["sgd", "adam"]
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert captured.err.splitlines()[-1] == (
        "treeopt demo: interrupted after 1 of 2 optimizers; wrote curves.csv, "
        f"results.json, demo.png for sgd to {out}/"
    )
    rows = {
        line.split("|")[1].strip() for line in captured.out.splitlines() if "|" in line
    }
    assert "sgd" in rows and "adam" not in rows
    with open(out / "curves.csv") as f:
        assert [r["optimizer"] for r in csv.DictReader(f)] == ["sgd"]
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results["runs"]] == ["sgd"] and results["interrupted"]
    assert (out / "demo.png").read_bytes().startswith(b"\x89PNG")


def test_ctrl_c_in_the_first_optimizer_writes_nothing(tmp_path, capsys, monkeypatch):
    pytest.importorskip("flax")
    from treeopt import demo

    _interrupt_at(monkeypatch, demo, "train_one", 1)
    out = tmp_path / "out"
    assert cli.main(["demo", "--out", str(out), *TINY_2]) == 130
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    assert captured.err.splitlines()[-1] == (
        "treeopt demo: interrupted after 0 of 2 optimizers; nothing written"
    )
    assert list(out.iterdir()) == []


def test_ctrl_c_in_bench_keeps_the_finished_rows(tmp_path, capsys, monkeypatch):
    pytest.importorskip("optax")
    from treeopt import bench

    tiny = bench.config("tiny")
    trees = {k: tiny.trees[k] for k in ("one_big", "many_small")}
    cfg = dataclasses.replace(tiny, trees=trees, profile_shape=None)
    monkeypatch.setattr(bench, "config", lambda name: cfg)
    _interrupt_at(monkeypatch, bench, "measure_row", 2)
    path = tmp_path / "r.json"
    argv = ["bench", "--quick", "--optimizers", "sgd", "--json", str(path)]
    assert cli.main(argv) == 130
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert captured.err.splitlines()[-1] == (
        "treeopt bench: interrupted after 1 of 2 rows"
    )
    assert "| one_big (1 leaves" in captured.out and "many_small" not in captured.out
    result = json.loads(path.read_text())
    assert [r["tree"] for r in result["rows"]] == ["one_big"] and result["interrupted"]


# A Ctrl-C while JAX is imported: the first thing each subcommand does.
_CTRL_C_AT_JAX_IMPORT = """
import importlib.abc, runpy, sys

class CtrlC(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "jax":
            raise KeyboardInterrupt

sys.meta_path.insert(0, CtrlC())
runpy.run_module("treeopt", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("command", ["demo", "bench"])
def test_ctrl_c_at_start_up_is_one_line(command):
    proc = subprocess.run(
        [sys.executable, "-c", _CTRL_C_AT_JAX_IMPORT, command],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (proc.returncode, proc.stderr) == (130, f"treeopt {command}: interrupted\n")


def test_real_ctrl_c_during_start_up(tmp_path):
    # 1.5 s after the start: importing JAX and Flax, or just past it.
    proc = subprocess.Popen(
        [sys.executable, "-m", "treeopt", "demo", "--out", str(tmp_path), *TINY_2],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith("treeopt demo: interrupted")


def test_ctrl_c_dropped_in_a_callback_still_interrupts(capsys, monkeypatch):
    class Finalized:
        def __del__(self):
            raise KeyboardInterrupt  # as a Ctrl-C landing in JAX's gc callback

    def work(args):
        Finalized()  # freed at once; Python would print the error and go on
        time.sleep(30)  # a long computation
        raise AssertionError("not interrupted")

    monkeypatch.setattr(cli, "_demo", work)
    start = time.perf_counter()
    assert cli.main(["demo"]) == 130
    assert time.perf_counter() - start < 10
    assert capsys.readouterr().err == "treeopt demo: interrupted\n"
