"""The layering DESIGN.md promises, read from the imports themselves (no process needed)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "remote_magic"
# What the client side may import from the agent package: the modules shared by design.
SHARED_AGENT_MODULES = {"remote_magic.agent.protocol", "remote_magic.agent.frames", "remote_magic.agent.codec",
                        "remote_magic.agent.disk",
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


# Which part of the system may import which (DESIGN.md's module map, read as rules).  A part is a
# package of the client or the agent (``session``, ``wire``, ``agent.launch``...), or a module at the top of
# either.  Each imports only parts below it; "agent" on the client side means the shared modules only
# (see SHARED_AGENT_MODULES).
_AGENT_BASE = {"agent.protocol", "agent.codec", "agent.frames", "agent.digest", "agent.bootstrap", "agent.procs",
               "agent.disk"}  # fmt: skip
MAY_IMPORT: dict[str, set[str]] = {
    # the client, from the bottom up
    "paths": set(),
    "config": set(),
    "errors": set(),
    "registry": {"paths"},
    "transport": {"agent", "errors", "paths"},
    "project": {"agent", "errors", "paths"},
    "wire": {"transport", "agent", "errors", "paths"},
    "session": {"wire", "project", "transport", "registry", "agent", "errors", "paths", "config"},
    "sweep": {"session", "wire", "registry", "agent", "errors"},
    "ui": {"session", "sweep", "agent", "errors"},
    "server": {"session", "registry", "config", "agent", "errors"},
    "magic_options": {"session", "sweep", "wire", "agent", "errors"},  # the magics' options and their checks
    "magics": {"magic_options", "session", "sweep", "ui", "project", "wire", "transport", "registry", "config",
               "agent", "errors"},
    "": {"magics", "server"},  # remote_magic/__init__.py: the entry points
    # the agent, from the bottom up
    **{base: _AGENT_BASE for base in _AGENT_BASE},
    "agent.jobs": _AGENT_BASE,
    "agent.callbacks": _AGENT_BASE,
    "agent.store": _AGENT_BASE | {"agent.jobs"},
    "agent.changes": _AGENT_BASE,
    "agent.cells": _AGENT_BASE,
    "agent.values": _AGENT_BASE | {"agent.changes", "agent.store"},
    "agent.launch": _AGENT_BASE | {"agent.jobs", "agent.callbacks", "agent.store"},
    "agent.runner": _AGENT_BASE | {"agent.jobs", "agent.callbacks", "agent.store", "agent.launch", "agent.changes",
                     "agent.values", "agent.cells"},
    "agent.commands": _AGENT_BASE | {"agent.jobs", "agent.store", "agent.launch", "agent.runner"},
    "agent.cli": _AGENT_BASE | {"agent.jobs", "agent.launch", "agent.commands"},
    "agent.server": {"agent.cli", "agent.frames"},
    "agent.entry": {"agent.cli", "agent.server"},
    "agent.": set(),  # agent/__init__.py
}  # fmt: skip


def _part(module: str) -> str:
    """The part of the system a module belongs to, as MAY_IMPORT names it."""
    parts = module.split(".")[1:]
    if parts[:1] != ["agent"]:
        return parts[0] if parts else ""
    return f"agent.{parts[1]}" if len(parts) > 1 else "agent."  # agent/launch/slurm.py: agent.launch


def _crossings(graph: dict[str, set[str]], rules: dict[str, set[str]]) -> list[str]:
    """Every import from one part into another that the rules do not allow (a client's "agent" is the package)."""
    problems = []
    for module, targets in sorted(graph.items()):
        here = _part(module)
        for target in sorted(targets):
            there = _part(target)
            if there == here:
                continue
            allowed = rules.get(here, set())
            if there not in allowed and not (there.startswith("agent.") and "agent" in allowed):
                problems.append(f"{module} ({here or 'remote_magic'}) imports {target} ({there})")
    return problems


def test_each_part_imports_only_the_parts_below_it() -> None:
    graph = _graph()
    assert sorted({_part(m) for m in graph} - set(MAY_IMPORT)) == []  # a new part is placed in the rules
    assert _crossings(graph, MAY_IMPORT) == []


def test_no_import_cycles() -> None:
    assert _cycles(_graph()) == []


def test_the_agent_imports_only_the_standard_library_and_itself() -> None:
    problems = []
    agent_files = sorted((PACKAGE / "agent").rglob("*.py"))
    assert len(agent_files) > len(list((PACKAGE / "agent").glob("*.py")))  # its subpackages are read too
    for path in agent_files:
        for module, at_import_time in _imports(path):
            top = module.split(".")[0]
            if module.startswith("remote_magic."):
                if not module.startswith("remote_magic.agent"):
                    problems.append(f"{_module_name(path)} imports {module}")
            elif at_import_time and top not in sys.stdlib_module_names and top != "__future__":
                problems.append(f"{_module_name(path)} imports {module} at import time")
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
    upward = {"remote_magic.agent.store.blobs": {"remote_magic.agent.launch.slurm"}}
    assert _crossings(upward, MAY_IMPORT) == [
        "remote_magic.agent.store.blobs (agent.store) imports remote_magic.agent.launch.slurm (agent.launch)"
    ]
    assert _crossings({"remote_magic.wire.client": {"remote_magic.session.hosts"}}, MAY_IMPORT) != []
    assert _crossings({"remote_magic.session.hosts": {"remote_magic.agent.protocol"}}, MAY_IMPORT) == []
    codec = dict(_imports(PACKAGE / "agent" / "codec.py"))
    assert codec.get("cloudpickle") is False  # imported inside a function: allowed in the agent
