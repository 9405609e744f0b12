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


GITHUB = "https://github.com/treeopt/treeopt"
# A link to a file of this repository, on GitHub or as raw bytes (images).
_REPO_URL = re.compile(
    r"^(?:https://github\.com/treeopt/treeopt/(?:blob|tree)/main/"
    r"|https://raw\.githubusercontent\.com/treeopt/treeopt/main/)(.+)$"
)
_PATH = re.compile(r"^\.?\w[\w.-]*(?:/[\w.-]+)*/?$")
_FILE_SUFFIXES = (".md", ".txt", ".toml", ".py", ".in", ".cfg")
# Where a bare file name (`reference.py`) may live.
_FOLDERS = ("", "tests", "src/treeopt", "benchmarks", "examples", "docs")


def _prose() -> str:
    """The README without its fenced code blocks (indented ones in lists too)."""
    text = README.read_text(encoding="utf-8")
    return re.sub(r"^ *```.*?^ *```$", "", text, flags=re.M | re.S)


def _links() -> list[str]:
    prose = _prose()
    return re.findall(r"\]\(([^)\s]+)\)", prose) + re.findall(
        r"<(https?://[^>]+)>", prose
    )


def _named_paths() -> set[str]:
    """Repository paths in the README: words of code spans that look like a path
    (`benchmarks/RESULTS.md`, `constraints.txt`) and links to the repository."""
    named = set()
    # A code span may go on over a line break, not over a blank line.
    for span in re.findall(r"`((?:[^`\n]|\n(?!\n))+)`", _prose()):
        for word in span.split():
            word = word.strip("'\",;:")
            looks_like_file = word.endswith(_FILE_SUFFIXES) or word in ("LICENSE",)
            if _PATH.match(word) and ("/" in word or looks_like_file):
                named.add(word)
    for link in _links():
        match = _REPO_URL.match(link)
        if match:
            named.add(match.group(1))
    return named


def _exists(path: str) -> bool:
    root = README.parent
    if "/" in path:
        return (root / path).exists()
    return any((root / folder / path).is_file() for folder in _FOLDERS)


def test_every_file_the_readme_names_exists():
    named = _named_paths()
    assert {"benchmarks/RESULTS.md", "docs/demo.png", "tests/reference.py"} <= named
    assert sorted(p for p in named if not _exists(p)) == []


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_work_where_the_readme_is_not_on_github():
    # On PyPI a relative link or image is broken and an in-page anchor goes
    # nowhere, so every link is absolute.
    links = _links()
    assert links and [u for u in links if not u.startswith("https://")] == []
    sections = re.findall(r"^## (.+)$", _prose(), re.M)
    anchors = [
        u.removeprefix(f"{GITHUB}#") for u in links if u.startswith(GITHUB + "#")
    ]
    contents = [_anchor(s) for s in sections if s != "Contents"]
    assert anchors == contents  # the table of contents lists every section
