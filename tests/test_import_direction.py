"""Dependencies point one way (the developers' brief): ``dicom_io``, ``models`` and ``config`` import nothing of the
other packages, ``training`` nothing of ``worker``, and no module imports one that (through others) imports it
back: calls flow one way inside a package too. No module imports another's private (``_``) names.

Read from the sources' syntax trees, every ``import`` counted, also those inside functions (deferred imports still
make a cycle of calls). ``from package import submodule`` is an edge to the submodule only.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("config", "dicom_io", "models", "training", "worker")
#: What each package may import of the project's packages (itself included).
MAY_IMPORT = {
    "config": {"config"},
    "dicom_io": {"dicom_io"},
    "models": {"models"},
    "training": {"config", "dicom_io", "models", "training"},
    "worker": set(PACKAGES),
}


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imported(module: str, path: Path, modules: dict[str, Path]) -> Iterator[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules]
            names = submodules if len(submodules) == len(node.names) else [base, *submodules]
        else:
            continue
        for name in names:
            while name and name not in modules:  # import a.b.c of a module a.b's attribute c
                name = name.rpartition(".")[0]
            if name and name != module:
                yield name


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {module: set(_imported(module, path, modules)) for module, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_each_package_imports_only_what_it_may() -> None:
    graph = import_graph()
    assert len(graph) > 100  # the packages were found
    crossing = sorted((module, target) for module, targets in graph.items() for target in targets
                      if target.split(".")[0] not in MAY_IMPORT[module.split(".")[0]])
    assert crossing == []


def test_no_module_imports_one_that_imports_it_back() -> None:
    assert cycles(import_graph()) == []


def test_no_module_imports_another_modules_private_names() -> None:
    modules = project_modules()
    reaching = []
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] in PACKAGES:
                reaching += [f"{module}: {node.module}.{alias.name}" for alias in node.names
                             if alias.name.startswith("_") and not alias.name.startswith("__")]
    assert reaching == []


def test_a_cycle_is_found() -> None:
    graph = {"worker.cli": {"worker.backfill_cli"}, "worker.backfill_cli": {"worker.cli_options", "worker.cli"},
             "worker.cli_options": set()}
    assert cycles(graph) == [["worker.backfill_cli", "worker.cli"]]
