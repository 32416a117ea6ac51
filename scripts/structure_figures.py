"""The structure's figures: modules, import arrows, floors, cycles, and what outgrows a newcomer's rules.

    .venv/bin/python scripts/structure_figures.py [CHECKOUT]   # default: this one

Reads the import graph the way tests/test_layering.py does (so the figures and the layering rules agree),
then lists modules over 500 lines and functions over 60: the rule of thumb for reading one in one sitting.
"""

from __future__ import annotations

import ast
import functools
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE / "tests"))
import test_layering as layering  # noqa: E402  (the graph as the layering test reads it)

MODULE_LINES, FUNCTION_LINES = 500, 60


def main() -> int:
    checkout = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else HERE
    layering.PACKAGE = checkout / "remote_magic"
    graph = layering._graph()
    graph = {module: {target for target in targets if target in graph} for module, targets in graph.items()}

    @functools.cache
    def floor(module: str) -> int:
        return 1 + max((floor(target) for target in graph[module] if target != module), default=0)

    files = sorted(layering.PACKAGE.rglob("*.py"))
    long_modules, long_functions = [], []
    for path in files:
        text = path.read_text()
        name = path.relative_to(checkout).as_posix()
        if text.count("\n") > MODULE_LINES:
            long_modules.append(f"{name} {text.count(chr(10))}")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > FUNCTION_LINES:
                    long_functions.append(f"{name}:{node.name} {length}")
    print(f"modules {len(graph)}, import arrows {sum(map(len, graph.values()))}, "
          f"floors {max(map(floor, graph))}, cycles {len(layering._cycles(graph))}")  # fmt: skip
    print(f"over {MODULE_LINES} lines: {', '.join(long_modules) or 'none'}")
    print(f"functions over {FUNCTION_LINES} lines: {', '.join(long_functions) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
