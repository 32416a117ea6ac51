"""Which names a cell reads (its inputs) and writes (its outputs).

Static analysis of the cell's source only; no I/O, no evaluation.

The output rule (documented in README): a name comes back when the cell
assigns it at top level (``x = ...``, ``for x in``, ``def x``, ``import x``
is excluded at runtime since modules are not sent), or when it is an input
the cell visibly changes in place:

* an attribute or item of it is assigned or deleted (``cfg["lr"] = 0.1``,
  ``obj.n += 1``), or
* a method that changes objects in place is called on it: Keras/sklearn
  ``fit``, ``partial_fit``, ``train``, ``compile``, ``load_weights``, ...
  PyTorch ``step``, ``zero_grad``, ``load_state_dict``
  and the list/dict/set/ndarray mutators (``append``, ``update``, ``sort``,
  ``fill``, ...), see ``MUTATING_METHODS``.

Anything else an input does to itself unseen (a function that mutates its
argument) is not detected; name it with ``--out``.
"""

from __future__ import annotations

import ast
import builtins
from dataclasses import dataclass, field

MUTATING_METHODS = frozenset(
    {
        # training in place
        "fit", "fit_generator", "partial_fit", "train", "train_on_batch", "compile",
        "load_weights", "set_weights", "reset_states", "build",
        # PyTorch: an optimizer or scheduler stepped, a state loaded
        "step", "zero_grad", "load_state_dict",
        # containers and arrays
        "append", "extend", "insert", "pop", "popitem", "remove", "clear", "update",
        "setdefault", "add", "discard", "sort", "reverse", "fill", "resize",
        "put", "itemset", "setflags", "intersection_update", "difference_update",
        "symmetric_difference_update", "appendleft", "extendleft", "rotate",
    }
)  # fmt: skip


class CaptureError(ValueError):
    """A problem with the cell itself, found before anything is sent."""


@dataclass
class CellNames:
    reads: list[str] = field(default_factory=list)  # read at top level before any assignment
    lazy_reads: list[str] = field(default_factory=list)  # read inside functions, classes, lambdas
    assigned: list[str] = field(default_factory=list)
    mutated: list[str] = field(default_factory=list)


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


def _base_name(node: ast.AST) -> str | None:
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


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

    def _store_target(self, target: ast.AST) -> None:
        if isinstance(target, (ast.Attribute, ast.Subscript)):
            base = _base_name(target)
            if base is not None:
                _add(self.names.mutated, base)
        self.visit(target)

    # -- statements whose value runs before the target is bound
    def visit_Assign(self, node: ast.Assign) -> None:
        self.visit(node.value)
        for target in node.targets:
            self._store_target(target)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self.visit(node.value)
            self._store_target(node.target)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        self.visit(node.value)
        if isinstance(node.target, ast.Name):
            self.visit_Name(ast.Name(node.target.id, ast.Load()))
        self._store_target(node.target)

    def visit_NamedExpr(self, node: ast.NamedExpr) -> None:
        self.visit(node.value)
        self.visit(node.target)

    def visit_For(self, node: ast.For | ast.AsyncFor) -> None:
        self.visit(node.iter)
        self._store_target(node.target)
        for statement in node.body + node.orelse:
            self.visit(statement)

    visit_AsyncFor = visit_For

    def visit_Delete(self, node: ast.Delete) -> None:
        for target in node.targets:
            if isinstance(target, (ast.Attribute, ast.Subscript)):
                self._store_target(target)
            else:
                self.visit(target)

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

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr in MUTATING_METHODS:
            base = _base_name(func.value)
            if base is not None:
                _add(self.names.mutated, base)
        self.generic_visit(node)

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
            elif isinstance(child, ast.Call):
                func = child.func
                if isinstance(func, ast.Attribute) and func.attr in MUTATING_METHODS:
                    base = _base_name(func.value)
                    if base is not None and base not in bound:
                        _add(self.names.mutated, base)

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


def default_outputs(names: CellNames, inputs: list[str]) -> list[str]:
    outputs = [name for name in names.assigned if name != "_"]
    outputs += [name for name in names.mutated if name in inputs and name not in outputs]
    return outputs


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
