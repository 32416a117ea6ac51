"""The cell itself on the host: run under its own file name, and its errors told as IPython would.

A traceback through the cell shows the cell's lines; one through a function defined in an earlier
notebook cell (pickled by value: its code's file is renamed ``<dynamic-code>``) shows that cell as
``Cell In[2], line 7`` with its source line, from the cell sources the client sent in the spec.
"""

from __future__ import annotations

import linecache
import os
import traceback
from typing import Any

CELL_FILENAME = "<remote_train cell>"


def run_cell(source: str, namespace: dict[str, Any], cells: dict[str, list[str]] | None = None) -> None:
    # Registering the source lets tracebacks show the cell's own lines.
    linecache.cache[CELL_FILENAME] = (len(source), None, source.splitlines(True), CELL_FILENAME)
    _register_cells(cells or {})
    code = compile(source, CELL_FILENAME, "exec")
    exec(code, namespace)


# "name:first line" of a notebook function's code -> its cell's label as IPython prints it (``Cell In[2]``).
_CELL_OF_CODE: dict[str, str] = {}
DYNAMIC_CODE = "<dynamic-code>"  # cloudpickle's filename for the code of every function pickled by value


def _register_cells(cells: dict[str, list[str]]) -> None:
    """Put the sources of the notebook cells whose functions came pickled into ``linecache``, under their labels.

    A function defined in an earlier cell arrives with its code's file
    renamed ``<dynamic-code>``: without this a traceback through it shows
    neither its cell nor its line.
    """
    for label, (source, *keys) in cells.items():
        linecache.cache[label] = (len(source), None, source.splitlines(True), label)
        _CELL_OF_CODE.update(dict.fromkeys(keys, label))


def _label_cells(summary: traceback.TracebackException, tb: Any) -> None:
    """Name each frame of a notebook function by its cell (``Cell In[2]``) and give it its source line."""
    stack = summary.stack
    for index, (frame, _) in enumerate(traceback.walk_tb(tb)):
        code = frame.f_code
        label = _CELL_OF_CODE.get(f"{code.co_name}:{code.co_firstlineno}")
        renamed = code.co_filename == DYNAMIC_CODE or not os.path.exists(code.co_filename)  # older cloudpickle
        if label and renamed and index < len(stack):
            old = stack[index]
            line = linecache.getline(label, old.lineno or 0).strip()
            stack[index] = traceback.FrameSummary(label, old.lineno, old.name, lookup_line=False, line=line)


def _format_exception(exc: BaseException, tb: Any) -> str:
    """The traceback as Python prints it, with IPython's names for the frames of notebook functions."""
    summary = traceback.TracebackException(type(exc), exc, tb)
    chain, seen = [(summary, tb, exc)], set()
    while chain:  # the exceptions it was raised from or during, too
        part, part_tb, part_exc = chain.pop()
        if id(part_exc) in seen:
            continue
        seen.add(id(part_exc))
        _label_cells(part, part_tb)
        for attribute in ("__cause__", "__context__"):
            inner, inner_exc = getattr(part, attribute), getattr(part_exc, attribute)
            if inner is not None and inner_exc is not None:
                chain.append((inner, inner_exc.__traceback__, inner_exc))
    text = "".join(summary.format())
    for label in set(_CELL_OF_CODE.values()):
        text = text.replace(f'File "{label}", line ', f"{label}, line ")
    return text


_PHASE_WORDS = {
    "files": "placing the job's files on the host failed",
    "inputs": "loading the cell's inputs on the host failed",
    "outputs": "the cell ran, but saving what it assigned failed",
}


def describe_exception(exc: BaseException, source: str, phase: str = "cell") -> dict[str, Any]:
    """The error event: the traceback from the cell's frame on, with its line.

    Outside the cell (placing files, loading inputs) the traceback would show
    only the agent's own code, so the event says what failed instead; a
    module the host lacks is named (``missing_module``) so the client can say
    which local file it is and how to send it.
    """
    fields: dict[str, Any] = {"phase": phase}
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        fields["missing_module"] = exc.name
    if phase in ("files", "inputs"):
        return {
            "exc_type": type(exc).__name__,
            "message": f"{_PHASE_WORDS[phase]}: {type(exc).__name__}: {exc}",
            "traceback": "",
            "cell_line": None,
            **fields,
        }
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != CELL_FILENAME:
        tb = tb.tb_next
    if tb is None:  # raised outside the cell (loading inputs, writing outputs)
        tb = exc.__traceback__
    cell_line = None
    walk = tb
    while walk is not None:
        if walk.tb_frame.f_code.co_filename == CELL_FILENAME:
            cell_line = walk.tb_lineno
        walk = walk.tb_next
    text = _format_exception(exc, tb)
    return {
        "exc_type": type(exc).__name__,
        "message": str(exc),
        "traceback": text,
        "cell_line": cell_line,
        **fields,
    }
