"""What a user installs: the sdist's files and metadata, the license, the version,
and the one-line messages when an optional extra is missing."""

import hashlib
import shutil
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest

import treeopt

ROOT = Path(__file__).resolve().parents[1]
# sha256 of the Apache License 2.0 as published (LICENSE-2.0.txt).
APACHE_2_SHA256 = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"
_BUILD_SDIST = (
    "import sys; from setuptools import build_meta; "
    "print(build_meta.build_sdist(sys.argv[1]))"
)


def _repo_files() -> list[str]:
    """The files git tracks, and new ones it does not ignore (not yet added)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout")
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return sorted(f for f in listed.split("\0") if f and (ROOT / f).is_file())


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> tuple[list[str], str]:
    """Builds the sdist from a copy of the checkout (with a stray bytecode file);
    returns its file names (without the top folder) and its PKG-INFO."""
    src = tmp_path_factory.mktemp("checkout")
    for name in _repo_files():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    (src / "tests" / "__pycache__").mkdir()
    (src / "tests" / "__pycache__" / "helpers.cpython-311.pyc").write_bytes(b"")
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, "-c", _BUILD_SDIST, str(out)],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    archive = out / proc.stdout.splitlines()[-1]
    with tarfile.open(archive) as tar:
        top = f"{archive.name.removesuffix('.tar.gz')}/"
        names = [m.name.removeprefix(top) for m in tar.getmembers() if m.isfile()]
        pkg_info = tar.extractfile(f"{top}PKG-INFO").read().decode()
    return names, pkg_info


def test_sdist_carries_every_file_of_the_repository(sdist):
    names, _ = sdist
    # tests/ whole, with the helpers, references and workers its tests import,
    # and every file the README names.
    wanted = _repo_files()
    assert "tests/helpers.py" in wanted and "tests/conftest.py" in wanted
    assert [f for f in wanted if f not in names] == []
    assert [f for f in names if "__pycache__" in f or f.endswith(".pyc")] == []


def test_sdist_metadata_names_the_license_and_version(sdist):
    _, pkg_info = sdist
    lines = pkg_info.splitlines()
    assert f"Version: {treeopt.__version__}" in lines
    assert "License-Expression: Apache-2.0" in lines
    assert "License-File: LICENSE" in lines
    assert not [line for line in lines if line.startswith("Classifier: License")]
    assert "Project-URL: Source, https://github.com/treeopt/treeopt" in lines


def test_license_is_apache_2_unmodified_under_our_copyright():
    first, rest = (ROOT / "LICENSE").read_bytes().split(b"\n", 1)
    assert first == b"Copyright 2026 The treeopt Authors"
    assert hashlib.sha256(rest).hexdigest() == APACHE_2_SHA256
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]


def _python(prelude: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", prelude, *args],
        capture_output=True,
        text=True,
        timeout=180,
    )


def _without(*packages: str) -> str:
    """Code that makes ``packages`` unimportable, as if not installed."""
    return f"""
import importlib.abc, runpy, sys

class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {packages!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

sys.meta_path.insert(0, NotInstalled())
"""


_RUN_TREEOPT = 'runpy.run_module("treeopt", run_name="__main__", alter_sys=True)'
_OPTIONAL = ("optax", "flax", "orbax", "matplotlib", "rich")


def _console_script() -> str:
    """Code that runs what the installed ``treeopt`` program runs."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    module, function = scripts["scripts"]["treeopt"].split(":")
    return (
        f"import sys; sys.argv[0] = 'treeopt'; import {module}; {module}.{function}()"
    )


@pytest.mark.parametrize("program", ["python -m treeopt", "treeopt"])
def test_version_needs_nothing_but_treeopt(program):
    run = _RUN_TREEOPT if program == "python -m treeopt" else _console_script()
    proc = _python(_without("jax", "numpy", *_OPTIONAL) + run, "--version")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "treeopt 0.1.0\n", "")
    assert treeopt.__version__ == "0.1.0"


@pytest.mark.parametrize(
    "module, missing, extra",
    [
        ("treeopt.optax", "optax", "optax"),
        ("treeopt.checkpoint", "orbax-checkpoint", "checkpoint"),
    ],
)
def test_import_without_its_extra_names_it(module, missing, extra):
    proc = _python(_without(*_OPTIONAL) + f"import {module}")
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1] == (
        f"ModuleNotFoundError: {module} needs {missing}: pip install 'treeopt[{extra}]'"
    )


@pytest.mark.parametrize(
    "argv, missing",
    [
        (["demo"], _OPTIONAL),  # only the core installed
        (["demo"], ("flax",)),
        (["demo", "--steps", "1"], ("matplotlib",)),
        (["demo", "--optimizers", "sgd"], ("rich",)),
        (["bench", "--quick"], ("optax",)),
    ],
)
def test_cli_without_its_extra_is_one_line(argv, missing):
    proc = _python(_without(*missing) + _RUN_TREEOPT, *argv)
    command = argv[0]
    name = "flax" if command == "demo" and len(missing) > 1 else missing[0]
    extra = "demo" if command == "demo" else "optax"
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == (
        f"treeopt {command}: error: {command} needs {name}: "
        f"pip install 'treeopt[{extra}]'\n"
    )
