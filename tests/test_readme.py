"""Runs the README's snippets: every ```python block that directly follows a
``<!-- tested -->`` line, each in a fresh namespace and an empty working folder.

To have a new snippet tested, put ``<!-- tested -->`` on the line above it. The
snippets run inside the test process: they must not change JAX's global
configuration (use an untested block for that).
"""

import ast
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- tested -->"
_BLOCK = re.compile(r"^<!-- tested -->\n```python\n(.*?)^```$", re.M | re.S)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _snippets() -> list:
    text = README.read_text(encoding="utf-8")
    params = []
    for match in _BLOCK.finditer(text):
        first_line = text.count("\n", 0, match.start(1)) + 1
        prose = re.sub(r"^```.*?^```$", "", text[: match.start()], flags=re.M | re.S)
        headings = re.findall(r"^#+ (.*)$", prose, re.M)
        section = _slug(headings[-1]) if headings else "top"
        params.append(
            pytest.param(match.group(1), first_line, id=f"{section}-line{first_line}")
        )
    return params


def test_every_marker_is_followed_by_a_python_block():
    text = README.read_text(encoding="utf-8")
    assert text.count(MARKER) == len(_BLOCK.findall(text)) > 0


@pytest.mark.parametrize(("code", "first_line"), _snippets())
def test_snippet_runs(code, first_line, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tree = ast.increment_lineno(ast.parse(code), first_line - 1)  # README lines
    exec(compile(tree, str(README), "exec"), {"__name__": "__readme__"})
