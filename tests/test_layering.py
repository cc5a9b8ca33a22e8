"""The package's layers: no import circle, no import from a lower layer to a higher one.

Every module under ``src/loramix`` is parsed with ``ast``; every ``import`` in it counts, at module level
and inside functions and classes, except those under ``if TYPE_CHECKING:`` (annotations only: Python never
runs them). Importing ``a.b.c`` also runs the ``__init__`` of package ``a.b``, so that is an edge too
(except for a package the importer lives in, which is already being imported).
"""

from __future__ import annotations

import ast
import textwrap
from collections.abc import Iterable
from pathlib import Path

import pytest

import loramix

PACKAGE_DIR = Path(loramix.__file__).resolve().parent

# Lowest first. A module belongs to the entry with the longest matching prefix ("loramix" alone is the
# package's own __init__); it may import its own layer and the layers below it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("loramix.checks", "loramix.version", "loramix.context", "loramix.assets", "loramix.hub")),
    ("blocks", ("loramix.gating", "loramix.mixers", "loramix.routers")),
    ("methods", ("loramix.methods",)),
    ("config", ("loramix.config",)),
    ("layer", ("loramix.layer", "loramix.heads")),
    ("model", ("loramix.export", "loramix.model", "loramix")),
    ("data", ("loramix.data",)),
    ("runs", ("loramix.runs",)),
    ("train, eval", ("loramix.train", "loramix.eval", "loramix.moa", "loramix.integrations")),
    ("app", ("loramix.demo", "loramix.cli")),
]

# (importer, imported): prefixes that must not meet although the layers would allow it.
INDEPENDENT = [
    ("loramix.train", "loramix.eval"),
    ("loramix.eval", "loramix.train"),
    # data turns files into batches and knows nothing of the model
    *(("loramix.data", core) for core in ("loramix.methods", "loramix.config", "loramix.layer", "loramix.model")),
]

# Function-level imports of loramix modules, each with its reason; none is needed today (a deferred import
# of a loramix module is how the circles of the past were hidden).
DEFERRED: dict[tuple[str, str], str] = {}


def _module_names(root: Path, package: str) -> dict[str, Path]:
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.Module) -> Iterable[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Each import statement that runs, with whether it sits inside a function (or class)."""

    def visit(node: ast.AST, nested: bool) -> Iterable[tuple[ast.Import | ast.ImportFrom, bool]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                yield from (pair for item in child.orelse for pair in visit_one(item, nested))
                continue
            yield from visit_one(child, nested)

    def visit_one(node: ast.AST, nested: bool) -> Iterable[tuple[ast.Import | ast.ImportFrom, bool]]:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, nested
            return
        inner = nested or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda))
        yield from visit(node, inner)

    yield from visit(tree, False)


def import_graph(root: Path, package: str) -> tuple[dict[str, set[str]], list[tuple[str, str]]]:
    """The package's import graph {module: imported modules} and its function-level (importer, imported)."""
    modules = _module_names(root, package)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    nested_edges = []
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node, nested in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    parts = name.split(".") if is_package else name.split(".")[:-1]
                    parts = parts[: len(parts) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names
                ]
            for target in targets:
                if target != package and not target.startswith(package + "."):
                    continue
                while target not in modules:
                    target = target.rsplit(".", 1)[0]
                parents = target.split(".")
                for depth in range(2, len(parents) + 1):
                    module = ".".join(parents[:depth])
                    inside = name == module or name.startswith(module + ".")
                    if module in modules and module != name and (module == target or not inside):
                        graph[name].add(module)
                if nested:
                    nested_edges.append((name, target))
    return graph, nested_edges


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                connect(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return cycles


def layer_of(module: str, layers: list[tuple[str, tuple[str, ...]]] = LAYERS) -> int | None:
    """The index of ``module``'s layer in ``layers`` (longest prefix wins), or ``None`` when unassigned."""
    best, best_length = None, -1
    for rank, (_, prefixes) in enumerate(layers):
        for prefix in prefixes:
            root_only = "." not in prefix
            if (module == prefix or (not root_only and module.startswith(prefix + "."))) and len(prefix) > best_length:
                best, best_length = rank, len(prefix)
    return best


def violations(graph: dict[str, set[str]], layers=LAYERS, independent=INDEPENDENT) -> list[str]:
    """Every import from a lower layer to a higher one, and every import between independent parts."""
    found = []
    for importer, imported in sorted((a, b) for a, targets in graph.items() for b in targets):
        low, high = layer_of(importer, layers), layer_of(imported, layers)
        if low is not None and high is not None and high > low:
            found.append(f"{importer} ({layers[low][0]}) imports {imported} ({layers[high][0]})")
        for source, target in independent:
            if (importer == source or importer.startswith(source + ".")) and (
                imported == target or imported.startswith(target + ".")
            ):
                found.append(f"{importer} imports {imported}, but {source} must not import {target}")
    return found


@pytest.fixture(scope="module")
def loramix_graph() -> tuple[dict[str, set[str]], list[tuple[str, str]]]:
    return import_graph(PACKAGE_DIR, "loramix")


def test_every_module_has_a_layer(loramix_graph):
    graph, _ = loramix_graph
    assert len(graph) > 60
    assert [module for module in graph if layer_of(module) is None] == []


def test_no_import_cycles(loramix_graph):
    graph, _ = loramix_graph
    cycles = find_cycles(graph)
    assert cycles == [], "\n".join(" <-> ".join(cycle) for cycle in cycles)


def test_imports_go_down_the_layers(loramix_graph):
    graph, _ = loramix_graph
    found = violations(graph)
    assert found == [], "\n".join(found)


def test_train_and_eval_do_not_import_each_other(loramix_graph):
    graph, _ = loramix_graph
    crossing = [
        (a, b)
        for a, targets in graph.items()
        for b in targets
        if {a.split(".")[:2][-1], b.split(".")[:2][-1]} == {"train", "eval"}
    ]
    assert crossing == [], crossing
    # both use what they share from loramix.runs
    assert any(b.startswith("loramix.runs") for b in graph["loramix.eval.evaluate"])
    assert any(b.startswith("loramix.runs") for b in graph["loramix.train.pipeline"])


def test_no_deferred_loramix_imports(loramix_graph):
    _, nested = loramix_graph
    deferred = [edge for edge in nested if edge not in DEFERRED]
    assert deferred == [], f"function-level imports of loramix modules (import them at module level): {deferred}"


def _write_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root / "pkg"


def test_checker_finds_a_circle_hidden_in_a_function(tmp_path):
    root = _write_package(
        tmp_path,
        {
            "__init__.py": "",
            "low.py": "def f():\n    from pkg.high import g\n    return g\n",
            "high.py": "from pkg.low import f\n",
            "typed.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.high import g\n",
        },
    )
    graph, nested = import_graph(root, "pkg")
    assert graph == {"pkg": set(), "pkg.low": {"pkg.high"}, "pkg.high": {"pkg.low"}, "pkg.typed": set()}
    assert nested == [("pkg.low", "pkg.high")]
    assert find_cycles(graph) == [["pkg.high", "pkg.low"]]
    layers = [("low", ("pkg.low", "pkg.typed")), ("high", ("pkg.high",))]
    assert violations(graph, layers, []) == ["pkg.low (low) imports pkg.high (high)"]


def test_checker_counts_a_package_init_and_relative_imports(tmp_path):
    root = _write_package(
        tmp_path,
        {
            "__init__.py": "",
            "sub/__init__.py": "from pkg.sub.a import x\n",
            "sub/a.py": "from ..b import y\nx = 1\n",
            "b.py": "from pkg.sub import a\ny = 2\n",
        },
    )
    graph, _ = import_graph(root, "pkg")
    # b imports pkg.sub.a, which runs pkg/sub/__init__.py first
    assert graph["pkg.b"] == {"pkg.sub", "pkg.sub.a"}
    assert graph["pkg.sub.a"] == {"pkg.b"}
    assert graph["pkg.sub"] == {"pkg.sub.a"}
    assert find_cycles(graph) == [["pkg.b", "pkg.sub", "pkg.sub.a"]]
    independent = [("pkg.sub", "pkg.b")]
    assert violations(graph, [("all", ("pkg",))], independent) == [
        "pkg.sub.a imports pkg.b, but pkg.sub must not import pkg.b"
    ]


def _readme_layers() -> list[tuple[str, ...]]:
    """The module prefixes of each row of the README's layer table, bottom layer first."""
    readme = (PACKAGE_DIR.parents[1] / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| ") and line.split("|")[1].strip()[:1].isdigit()]
    layers = []
    for row in rows:
        files = [name.strip().strip("`") for name in row.split("|")[3].split(",")]
        prefixes = []
        for name in files:
            name = name.removesuffix("/*.py").removesuffix("/").removesuffix(".py")
            prefixes.append("loramix" if name == "__init__" else f"loramix.{name}")
        layers.append(tuple(sorted(prefixes)))
    return layers


def test_readme_table_shows_the_layers():
    assert _readme_layers() == [tuple(sorted(prefixes)) for _, prefixes in LAYERS]
