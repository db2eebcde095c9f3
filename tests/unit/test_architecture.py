"""The shape of `proxy/` that docs/architecture.md promises: no import cycle, no module reaching
into another's `_private` names, and every module the page names exists."""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "proxy"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


@functools.cache
def _imports(name: str) -> list[tuple[str, list[str]]]:
    """(imported proxy module, names taken from it) for every import in module `name`, lazy
    and TYPE_CHECKING-only ones included: each is a dependency all the same."""
    tree = ast.parse(MODULES[name].read_text())
    found: list[tuple[str, list[str]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.split(".")[0] == "proxy"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != "proxy":
                continue
            names = [a.name for a in node.names]
            submodules = [f"{node.module}.{n}" for n in names if f"{node.module}.{n}" in MODULES]
            found.append((node.module, [n for n in names if f"{node.module}.{n}" not in MODULES]))
            found += [(sub, []) for sub in submodules]
    return found


@functools.cache
def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name in MODULES:
        # A package's __init__ runs before its modules: importing proxy.a.b depends on proxy.a.
        graph[name] = {dep for dep, _ in _imports(name) if dep in MODULES and dep != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for dep in sorted(graph[node]):
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_in_proxy_is_part_of_an_import_cycle() -> None:
    assert _cycles(_graph()) == []


def test_the_cycle_check_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_no_module_imports_another_modules_private_names() -> None:
    reached = [
        f"{name} imports {names} from {dep}"
        for name in MODULES
        for dep, taken in _imports(name)
        if dep != name
        for names in taken
        if names.startswith("_") and not names.startswith("__")
    ]
    assert reached == []


def test_the_data_plane_does_not_import_the_server_outside_the_composition_root() -> None:
    importers = sorted(name for name in MODULES if "proxy.dataplane.server" in _graph()[name])
    assert importers == ["proxy.app"]


def test_every_module_the_architecture_page_names_exists() -> None:
    text = (REPO / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`((?:proxy|tests)/[\w/]+(?:\.py)?)`", text))
    named |= set(re.findall(r"\b((?:proxy|tests)/[\w/]+\.py)\b", text))
    assert len(named) >= 20
    assert sorted(p for p in named if not (REPO / p).exists()) == []
