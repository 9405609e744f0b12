"""The package's layout: small modules, no import cycle, a core that imports
only ``base``, one list of optimizer names."""

import ast
import pathlib
import subprocess
import sys

import pytest

from treeopt import registry

SRC = pathlib.Path(__file__).parents[1] / "src"
PACKAGE = SRC / "treeopt"
MAX_LINES = 400
# The optimizers themselves: each imports nothing from treeopt but base, and
# base nothing but its input checks.
CORE = ("adam", "adafactor", "momentum", "rms_prop", "sm3")


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _target(name: str) -> str | None:
    """The treeopt module that importing ``name`` runs last, if any."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> list[tuple[str, bool]]:
    """``(imported treeopt module, at module level)`` for each import that runs
    (``if TYPE_CHECKING:`` blocks do not)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child, top)
            return
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0]
                base = f"{anchor}.{base}" if base else anchor
            # "from a import b" imports module a.b where there is one, else a.
            names = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                for a in node.names
            ]
        else:
            inner = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            for child in ast.iter_child_nodes(node):
                visit(child, top and not inner)
            return
        for name in names:
            target = _target(name) if name.startswith("treeopt") else None
            if target is not None and target != module:
                found.append((target, top))

    visit(ast.parse(path.read_text(encoding="utf-8")), True)
    return found


GRAPH = {m: _imports(m) for m in MODULES}


def _find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    state: dict[str, str] = {}  # "open" while on the path, then "done"
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = "open"
        path.append(m)
        for n in graph[m]:
            if state.get(n) == "open":
                return [*path[path.index(n) :], n]
            if n not in state and (cycle := visit(n)):
                return cycle
        state[m] = "done"
        path.pop()
        return None

    for m in graph:
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_the_graph_sees_the_imports():
    assert ("treeopt.base", True) in GRAPH["treeopt.adam"]
    assert ("treeopt.bench", False) in GRAPH["treeopt.cli"]  # inside _bench
    assert ("treeopt.bench.steps", True) in GRAPH["treeopt.bench.hlo"]
    assert _find_cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": ["b"], "b": [], "c": ["a", "b"]}) is None


def test_no_import_cycle():
    graph = {m: sorted({t for t, _ in edges}) for m, edges in GRAPH.items()}
    assert _find_cycle(graph) is None


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_over_the_line_limit(module):
    lines = len(MODULES[module].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{MODULES[module].relative_to(SRC)}: {lines} lines"


@pytest.mark.parametrize("module", CORE)
def test_core_modules_import_only_base(module):
    imported = {t for t, _ in GRAPH[f"treeopt.{module}"]}
    assert imported <= {"treeopt.base"}, imported


def test_base_imports_only_its_checks():
    assert {t for t, _ in GRAPH["treeopt.base"]} == {"treeopt.checks"}
    assert GRAPH["treeopt.checks"] == []


def test_errors_and_registry_import_no_other_module():
    assert GRAPH["treeopt.errors"] == []
    # registry reaches the optimizers through treeopt's lazy names.
    assert {t for t, _ in GRAPH["treeopt.registry"]} <= {"treeopt"}


def test_only_the_cli_imports_the_benchmark_and_only_when_asked():
    importers = {
        (m, top)
        for m, edges in GRAPH.items()
        if not m.startswith("treeopt.bench")
        for t, top in edges
        if t.startswith("treeopt.bench")
    }
    assert importers == {("treeopt.cli", False)}


def test_registry_imports_neither_jax_nor_optax():
    code = (
        "import sys, treeopt.registry, treeopt.cli\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'jax', 'jaxlib', 'optax', 'numpy'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out == "[]\n"


def _string_sets(tree: ast.AST) -> list[list[str]]:
    """The string constants of each tuple, list, set and dict (keys and values
    apart) in a module."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Tuple | ast.List | ast.Set):
            groups = [node.elts]
        elif isinstance(node, ast.Dict):
            groups = [[k for k in node.keys if k is not None], node.values]
        else:
            continue
        for group in groups:
            found.append(
                [
                    e.value
                    for e in group
                    if isinstance(e, ast.Constant) and isinstance(e.value, str)
                ]
            )
    return found


def _name_lists(source: str) -> list[list[str]]:
    """Collections of two or more optimizer names, and strings naming three or
    more, in Python ``source``; a collection of treeopt module names (``sm3``
    is both) is not one."""
    tree = ast.parse(source)
    names, modules = set(registry.NAMES), {m.rpartition(".")[2] for m in MODULES}
    lists = [
        s
        for s in _string_sets(tree)
        if len(set(s) & names) >= 2 and not set(s) <= modules
    ]
    texts = [
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str)
    ]
    lists += [[t] for t in texts if len(set(t.replace(",", " ").split()) & names) >= 3]
    return lists


def test_the_name_check_finds_lists():
    assert _name_lists('X = ("sgd", "adam")') == [["sgd", "adam"]]
    assert _name_lists('X = {"sgd": 1, "rmsprop": 2}') == [["sgd", "rmsprop"]]
    assert _name_lists('h = "one of sgd,adam,sm3"') == [["one of sgd,adam,sm3"]]
    assert _name_lists('MODULES = {"adam", "sm3", "base"}') == []


def test_registry_names_are_the_only_list_of_optimizers():
    assert registry.NAMES == ("sgd", "momentum", "rmsprop", "adam", "adafactor", "sm3")
    lists = {
        m: _name_lists(p.read_text(encoding="utf-8"))
        for m, p in MODULES.items()
        if m != "treeopt.registry"
    }
    assert {m: found for m, found in lists.items() if found} == {}
    # The command line, the demo and the benchmark read the registry.
    readers = {
        m for m, edges in GRAPH.items() for t, _ in edges if t.endswith("registry")
    }
    assert {"treeopt.cli", "treeopt.demo", "treeopt.bench.steps"} <= readers


@pytest.mark.parametrize("name", registry.NAMES)
def test_registry_class_names_are_the_classes_the_entries_make(name):
    import treeopt

    entry = registry.ENTRIES[name]
    made = entry.make(entry.demo_learning_rate)
    assert type(made) is getattr(treeopt, entry.class_name)
    assert type(entry.make_matched(0.1)) is type(made)
