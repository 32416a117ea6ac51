"""Which names a cell reads (its inputs) and assigns (the names that come back).

Static analysis of the cell's source only; no I/O, no evaluation.  Which inputs the cell
changes is not decided here: however it changes them (``model.fit``, a notebook function, a
library call), the host tells by their content (``agent/changes.py``).
"""

from __future__ import annotations

import ast
import builtins
from dataclasses import dataclass, field


class CaptureError(ValueError):
    """A problem with the cell itself, found before anything is sent."""


@dataclass
class CellNames:
    reads: list[str] = field(default_factory=list)  # read at top level before any assignment
    lazy_reads: list[str] = field(default_factory=list)  # read inside functions, classes, lambdas
    assigned: list[str] = field(default_factory=list)


def analyze(source: str) -> CellNames:
    try:
        tree = ast.parse(source, "<remote_train cell>")
    except SyntaxError as exc:
        raise CaptureError(f"the cell is not valid Python: {exc.msg} (cell line {exc.lineno})") from None
    visitor = _CellVisitor()
    for statement in tree.body:
        visitor.visit(statement)
    return visitor.names


def _add(names: list[str], name: str) -> None:
    if name not in names:
        names.append(name)


class _CellVisitor(ast.NodeVisitor):
    """Walks top-level code in execution order (values before targets)."""

    def __init__(self) -> None:
        self.names = CellNames()

    # -- names
    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load):
            if node.id not in self.names.assigned:
                _add(self.names.reads, node.id)
        else:
            _add(self.names.assigned, node.id)

    # -- statements whose value runs before the target is bound
    def visit_Assign(self, node: ast.Assign) -> None:
        self.visit(node.value)
        for target in node.targets:
            self.visit(target)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self.visit(node.value)
            self.visit(node.target)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        self.visit(node.value)
        if isinstance(node.target, ast.Name):
            self.visit_Name(ast.Name(node.target.id, ast.Load()))
        self.visit(node.target)

    def visit_NamedExpr(self, node: ast.NamedExpr) -> None:
        self.visit(node.value)
        self.visit(node.target)

    def visit_For(self, node: ast.For | ast.AsyncFor) -> None:
        self.visit(node.iter)
        self.visit(node.target)
        for statement in node.body + node.orelse:
            self.visit(statement)

    visit_AsyncFor = visit_For

    def visit_Import(self, node: ast.Import | ast.ImportFrom) -> None:
        for alias in node.names:
            if alias.name != "*":
                _add(self.names.assigned, alias.asname or alias.name.split(".")[0])

    visit_ImportFrom = visit_Import

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        if node.type is not None:
            self.visit(node.type)
        if node.name:
            _add(self.names.assigned, node.name)
        for statement in node.body:
            self.visit(statement)

    # -- nested scopes: evaluated later, so their reads are lazy
    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        for decorator in node.decorator_list:
            self.visit(decorator)
        for default in node.args.defaults + [d for d in node.args.kw_defaults if d is not None]:
            self.visit(default)
        self._nested_scope(node)
        _add(self.names.assigned, node.name)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for expression in node.decorator_list + node.bases + [k.value for k in node.keywords]:
            self.visit(expression)
        self._nested_scope(node)
        _add(self.names.assigned, node.name)

    def visit_Lambda(self, node: ast.Lambda) -> None:
        for default in node.args.defaults + [d for d in node.args.kw_defaults if d is not None]:
            self.visit(default)
        self._nested_scope(node)

    def visit_ListComp(self, node: ast.ListComp | ast.SetComp | ast.DictComp | ast.GeneratorExp) -> None:
        # Runs at once, in its own scope: its loop variables are not the cell's.
        bound = {n.id for g in node.generators for n in ast.walk(g.target) if isinstance(n, ast.Name)}
        for child in ast.walk(node):
            if isinstance(child, ast.Name) and isinstance(child.ctx, ast.Load) and child.id not in bound:
                self.visit_Name(child)
            elif isinstance(child, ast.NamedExpr) and isinstance(child.target, ast.Name):
                _add(self.names.assigned, child.target.id)

    visit_SetComp = visit_DictComp = visit_GeneratorExp = visit_ListComp

    def _nested_scope(self, node: ast.AST) -> None:
        local: set[str] = set()
        declared_global: set[str] = set()
        loads: list[str] = []
        for child in ast.walk(node):
            if isinstance(child, ast.Name):
                if isinstance(child.ctx, ast.Load):
                    loads.append(child.id)
                else:
                    local.add(child.id)
            elif isinstance(child, ast.arg):
                local.add(child.arg)
            elif isinstance(child, ast.Global):
                declared_global.update(child.names)
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and child is not node:
                local.add(child.name)
            elif isinstance(child, (ast.Import, ast.ImportFrom)):
                local.update(a.asname or a.name.split(".")[0] for a in child.names)
        for name in declared_global:
            _add(self.names.assigned, name)
        for name in loads:
            if name in declared_global or name not in local:
                if name not in self.names.assigned and name not in self.names.reads:
                    _add(self.names.lazy_reads, name)


def select_inputs(
    names: CellNames, namespace: dict[str, object], hidden: set[str] | frozenset[str] = frozenset()
) -> list[str]:
    """The names to send; an undefined top-level read is an error naming it."""
    inputs: list[str] = []
    for name in names.reads:
        if name in namespace and name not in hidden:
            inputs.append(name)
        elif not hasattr(builtins, name) and name not in hidden:
            raise CaptureError(
                f"name {name!r} is not defined: the cell reads it before assigning it; "
                "define it in an earlier cell (or in this one, before its first use)"
            )
    for name in names.lazy_reads:
        if name in namespace and name not in hidden and name not in inputs:
            inputs.append(name)
    return inputs


def default_outputs(names: CellNames) -> list[str]:
    """The names the cell assigns at top level; the inputs it changes are added on the host, by content."""
    return [name for name in names.assigned if name != "_"]


def imported_modules(source: str) -> list[str]:
    """Top-level names of the modules a piece of code imports absolutely, anywhere in it (in order, once each).

    Used for the cell and for the user's local modules that travel with it:
    what they import must exist on the host.  Code that does not parse
    imports nothing here (the cell is checked elsewhere).
    """
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                _add(found, alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            _add(found, node.module.split(".")[0])
    return found


def validated_only(source: str) -> set[str]:
    """Names the cell only validates or evaluates on (``validation_data=val_ds``, ``model.evaluate(test_ds)``).

    What the model is never trained on can be sent in any order: the codec's
    note about a frozen shuffle order is not for them.  Any other use of the
    name (a method call, an assignment, a positional ``fit`` argument) keeps
    it out.
    """
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return set()
    allowed: set[int] = set()  # the Name nodes in a validation-only place
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        for keyword in node.keywords:
            if keyword.arg == "validation_data" or (keyword.arg == "x" and _calls_evaluate(node)):
                allowed.add(id(keyword.value))
        if node.args and _calls_evaluate(node):
            allowed.add(id(node.args[0]))
    found: dict[str, bool] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            found[node.id] = found.get(node.id, True) and id(node) in allowed
    return {name for name, only in found.items() if only}


def _calls_evaluate(call: ast.Call) -> bool:
    return isinstance(call.func, ast.Attribute) and call.func.attr == "evaluate"
