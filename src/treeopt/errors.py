"""The command line's exceptions, and the checks of output paths that raise
them before a run starts; shared by ``cli``, ``demo`` and ``bench``.

Imports nothing from treeopt, so that a subcommand may use them without
importing the command line (which imports the subcommands).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any


class UsageError(Exception):
    """Bad input to a subcommand; its message is shown as one line."""


class Interrupted(KeyboardInterrupt):
    """A Ctrl-C after which a subcommand kept what had finished.

    The message says what was kept (``cli.main`` prints it after
    "interrupted"); ``result`` holds it for the caller.
    """

    def __init__(self, message: str, result: Any = None) -> None:
        super().__init__(message)
        self.result = result


def check_writable_dir(path: Path, flag: str) -> None:
    """Creates directory ``path`` if needed and checks that a file can be made in
    it, so that a run does not lose its results at the end."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".treeopt-probe-"):
            pass
    except OSError as e:
        raise UsageError(f"{flag} {path}: {e.strerror or e}") from None


def check_writable_file(path: Path, flag: str) -> None:
    """Checks that file ``path`` can be written; an existing file is left as it
    is (opened to append, nothing written) and a new one is removed again."""
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a directory")
    existed = path.exists()
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        raise UsageError(f"{flag} {path}: {e.strerror or e}") from None
    if not existed:
        path.unlink()
