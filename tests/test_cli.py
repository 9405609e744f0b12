"""The ``treeopt`` command line: a tiny demo end to end, and bad input."""

import csv
import json
import re
import subprocess
import sys

import pytest

from treeopt import cli

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
