"""The package layout's rules, read statically from the source: no import cycles, client and server apart."""

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("common", "client", "server", "simulations")


def import_graph() -> dict[str, set[str]]:
    """Every project module and the project modules it imports (at any depth of its code)."""
    modules = {
        ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): path
        for package in PACKAGES
        for path in (REPO / package).rglob("*.py")
    }
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        graph[name] = {target for target in imported if target in modules and target != name}
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in graph[todo.pop()]:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_no_module_imports_one_that_imports_it_back():
    graph = import_graph()
    assert len(graph) > 30  # the walk found the project
    cycles = sorted(name for name in graph if name in reachable(graph, name))
    assert cycles == []


def test_client_and_server_never_import_each_other():
    graph = import_graph()
    for name, targets in graph.items():
        top = name.split(".")[0]
        if top in ("client", "server"):
            other = "server" if top == "client" else "client"
            assert not {t for t in targets if t.split(".")[0] == other}, name
