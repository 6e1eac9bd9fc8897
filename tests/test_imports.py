"""The package layout's rules, read statically from the source: no import cycles, client and server apart."""

import ast
import importlib.metadata
import re
import sys
import tomllib

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


def test_every_third_party_package_the_code_imports_is_declared():
    """A fresh `pip install -e .` (or `.[export]`) must bring everything the packages import."""
    imported = set()
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    imported |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - set(PACKAGES)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    declared = {re.split(r"[\[<>=!~ ;]", requirement, maxsplit=1)[0].lower().replace("_", "-") for requirement in requirements}
    distributions = importlib.metadata.packages_distributions()
    undeclared = {
        name for name in third_party
        if not {d.lower().replace("_", "-") for d in distributions.get(name, [name])} & declared
    }
    assert undeclared == set()
