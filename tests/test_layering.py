"""The layering DESIGN.md promises, read from the imports themselves (no process needed)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "remote_magic"
# What the client side may import from the agent package: the modules shared by design.
SHARED_AGENT_MODULES = {"remote_magic.agent.protocol", "remote_magic.agent.frames", "remote_magic.agent.codec",
                        "remote_magic.agent.bootstrap", "remote_magic.agent.digest"}  # fmt: skip


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, at import time?) for every import in the file, TYPE_CHECKING blocks left out."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, top_level: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                continue
            if isinstance(child, ast.Import):
                found.extend((alias.name, top_level) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - child.level + 1]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                names = [f"{target}.{alias.name}" for alias in child.names]
                submodules = [n for n in names if _exists(n)]
                found.extend((n, top_level) for n in (submodules or [target]))
            is_scope = isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            visit(child, top_level and not is_scope)

    visit(ast.parse(path.read_text()), True)
    return found


def _exists(module: str) -> bool:
    relative = Path(*module.split("."))
    return (PACKAGE.parent / relative).with_suffix(".py").exists() or (
        PACKAGE.parent / relative / "__init__.py"
    ).exists()


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        if "labextension" in path.parts:
            continue
        graph[_module_name(path)] = {
            m for m, _ in _imports(path) if m.startswith("remote_magic") and m != "remote_magic"
        }
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                cycles.append([*trail[trail.index(target) :], target] if target in trail else [node, target])
            elif target not in state:
                visit(target, [*trail, target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_no_import_cycles() -> None:
    assert _cycles(_graph()) == []


def test_the_agent_imports_only_the_standard_library_and_itself() -> None:
    problems = []
    for path in (PACKAGE / "agent").glob("*.py"):
        for module, at_import_time in _imports(path):
            top = module.split(".")[0]
            if module.startswith("remote_magic."):
                if not module.startswith("remote_magic.agent"):
                    problems.append(f"{path.name} imports {module}")
            elif at_import_time and top not in sys.stdlib_module_names and top != "__future__":
                problems.append(f"{path.name} imports {module} at import time")
    assert problems == []


def test_the_client_imports_from_the_agent_only_the_shared_modules() -> None:
    problems = []
    for path in PACKAGE.rglob("*.py"):
        if "agent" in path.relative_to(PACKAGE).parts[:1]:
            continue
        for module, _ in _imports(path):
            if module.startswith("remote_magic.agent.") and module not in SHARED_AGENT_MODULES:
                problems.append(f"{_module_name(path)} imports {module}")
    assert problems == []


def test_the_layering_check_sees_a_cycle_and_a_forbidden_import() -> None:
    """The checks above can fail: they see what they are meant to see."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    agent_cli = _imports(PACKAGE / "agent" / "cli.py")
    assert ("remote_magic.agent.jobs", True) in agent_cli
    server = _imports(PACKAGE / "agent" / "server.py")
    assert ("remote_magic.agent.frames", True) in server
    codec = dict(_imports(PACKAGE / "agent" / "codec.py"))
    assert codec.get("cloudpickle") is False  # imported inside a function: allowed in the agent
