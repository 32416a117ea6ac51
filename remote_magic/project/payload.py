"""Turning a namespace into bytes + blobs and back.

The pickling rules themselves (cloudpickle protocol 5, Keras models with
their custom objects) live in ``agent/codec.py`` because the runner applies
the same rules to outputs; this module is the client's side: it chooses what
goes, names the variable that cannot travel, and addresses each large buffer
by its digest (``agent/digest.py``) so the host keeps only one copy of it.
"""

from __future__ import annotations

import types
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..agent import codec
from ..agent import digest as digests


class PayloadError(ValueError):
    """A value cannot be sent; the message names it and says why."""


@dataclass
class Payload:
    data: bytes
    buffers: list[memoryview]
    blobs: list[tuple[str, int]] = field(default_factory=list)  # (digest, size), in buffer order
    modules: set[str] = field(default_factory=set)  # modules of the classes and functions the pickle names
    notes: list[str] = field(default_factory=list)  # what pickling them is worth telling (codec's notes)
    # code filename -> "name:first line" of each notebook function (and code inside it) pickled by value
    code_files: dict[str, set[str]] = field(default_factory=dict)

    def hash(self, seen: dict[tuple[int, int], str] | None = None) -> None:
        """Address each buffer by its digest: 0.3 s per 512 MiB, so a cell runs it beside other work.

        ``seen`` carries digests from one payload to the next of the same cell (a sweep's trials pickle the
        same arrays): keyed by the exporting object, alive and unchanged while the cell prepares."""
        if len(self.blobs) == len(self.buffers):
            return
        seen = {} if seen is None else seen
        blobs = []
        for buf in self.buffers:
            if buf.obj is None:  # no exporting object to know it by
                blobs.append((digests.of(buf), buf.nbytes))
                continue
            key = (id(buf.obj), buf.nbytes)
            if key not in seen:
                seen[key] = digests.of(buf)
            blobs.append((seen[key], buf.nbytes))
        self.blobs = blobs


def pack(
    values: dict[str, Any], namespace: dict[str, Any], hash_buffers: bool = True, order_unused: Iterable[str] = ()
) -> Payload:
    """Pickle ``values``; functions and classes defined in ``namespace`` travel by value.

    ``hash_buffers=False`` leaves the buffers' digests to a later ``Payload.hash()``; ``order_unused`` names the
    datasets the cell does not train on (``codec.dumps``)."""
    notebook_objects = codec.notebook_defined(namespace)
    modules: set[str] = set()
    pickled: set[int] = set()
    try:
        with codec.noting() as notes:
            data, buffers = codec.dumps(
                values, notebook_objects, referenced_modules=modules, pickled=pickled, order_unused=order_unused
            )
    except Exception as exc:  # noqa: BLE001  (name the culprit, whatever the pickler raised)
        name, reason = codec.first_unpicklable(values, notebook_objects)
        if name is None:
            raise PayloadError(f"the inputs cannot be pickled: {type(exc).__name__}: {exc}") from None
        raise PayloadError(
            f"variable {name!r} ({type(values[name]).__name__}) cannot be sent to the host: {reason}. "
            f"Create it inside the cell instead, or leave it out of the cell"
        ) from None
    packed = Payload(data, buffers, [], modules, notes, _code_files(notebook_objects, pickled))
    if hash_buffers:
        packed.hash()
    return packed


def _code_files(notebook_objects: list[Any], pickled: set[int]) -> dict[str, set[str]]:
    """Where the notebook's functions that went into the pickle were compiled, and their code's keys.

    cloudpickle renames their code's file ``<dynamic-code>``, so the host
    knows a function's cell by its name and first line (runner's ``cells``).
    """
    files: dict[str, set[str]] = {}
    for obj in notebook_objects:
        if id(obj) not in pickled:
            continue
        functions = vars(obj).values() if isinstance(obj, type) else [obj]
        codes = [code for code in (getattr(f, "__code__", None) for f in functions) if code is not None]
        while codes:
            code = codes.pop()
            files.setdefault(code.co_filename, set()).add(f"{code.co_name}:{code.co_firstlineno}")
            codes += [c for c in code.co_consts if isinstance(c, types.CodeType)]
    return files


class Values(dict[str, Any]):
    """Unpickled values, with the notes their loading made (tensors that were on a GPU are on the CPU here)."""

    notes: list[str]


def unpack(data: bytes, buffers: Iterable[Any]) -> Values:
    with codec.noting() as notes:
        values = Values(codec.loads(data, buffers))
    values.notes = notes
    return values
