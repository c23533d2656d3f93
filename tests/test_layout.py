"""The package layout's rules, read from the source: the core imports no service package, a
service package imports no other, and no module imports one that imports it back."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dlopbox"
SERVICES = {"watch", "interface", "client"}
#: Above the services: the command line and the operators' tools may use any of them.
TOP = {"cli", "__main__", "tools"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every dlopbox module ``path`` imports, as absolute names (relative imports resolved)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.startswith("dlopbox"):
                found.add(module)
                found.update(f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("dlopbox"))
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def _area(module: str) -> str:
    """``dlopbox.watch.moves`` -> ``watch``; ``dlopbox.events`` -> ``core``."""
    parts = module.split(".")
    if len(parts) > 1 and (parts[1] in SERVICES or parts[1] in TOP):
        return parts[1]
    return "core"


def test_the_core_imports_no_service_and_no_service_imports_another():
    wrong = []
    for module, imported in _graph().items():
        area = _area(module)
        for other in imported:
            target = _area(other)
            if area in TOP or target == area or target == "core":
                continue
            wrong.append(f"{module} imports {other}")
    assert wrong == []


def test_no_import_cycles():
    graph = _graph()
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for other in sorted(graph[module]):
            if state.get(other) == 1:
                cycles.append(" -> ".join(path[path.index(other):] + [other]))
            elif other not in state:
                visit(other, path + [other])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_rules_see_real_imports():
    """The checks above read the real graph: a service module importing the core is seen."""
    graph = _graph()
    assert "dlopbox.settings" in graph["dlopbox.client.service"]
    assert "dlopbox.watch.delivery" in graph["dlopbox.watch.service"]
    assert {_area(m) for m in graph} == SERVICES | TOP | {"core"}


def test_each_module_logs_under_its_own_name():
    named = []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        if "logging.getLogger(" in text and "logging.getLogger(__name__)" not in text:
            named.append(str(path.relative_to(PACKAGE)))
    assert named == []
