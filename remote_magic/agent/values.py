"""A job's values on the host: its inputs loaded from their blobs, and what comes back written as blobs.

The runner owns running the cell; this module owns the two ends of it, which share how the inputs were
mapped (``changes.Blobs``): an input array the cell never wrote is stored back under its own name,
without a byte of it hashed or copied.
"""

from __future__ import annotations

import builtins
import json
import os
from dataclasses import dataclass, field
from typing import Any

from . import changes, codec, disk, protocol
from . import digest as digests
from .store import blobs


@dataclass
class Inputs:
    """The inputs as loaded: their blobs' mappings, and each one's fingerprint before the cell ran."""

    blobs: changes.Blobs
    before: dict[str, str | Exception] = field(default_factory=dict)


def load_inputs(root: str, path: str, spec: dict[str, Any]) -> tuple[dict[str, Any], Inputs]:
    with open(os.path.join(path, protocol.INPUTS_FILE), "rb") as f:
        data = f.read()
    names = [name for name, _ in spec.get("blobs", [])]
    buffers = [blobs.map_blob(root, name) for name in names]
    values = codec.loads(data, buffers, receiver="host")
    namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
    namespace.update(values)
    return namespace, Inputs(changes.Blobs.of(buffers, names, [blobs.blob_path(root, name) for name in names]))


def write_outputs(
    root: str, path: str, spec: dict[str, Any], namespace: dict[str, Any], emit: Any, inputs: Inputs
) -> dict[str, Any]:
    """Pickle what comes back (``changes.returned``) and store its buffers; the manifest of the final event."""
    chosen = changes.returned(spec, namespace, inputs.before, inputs.blobs)
    for name, reason in chosen.unknown.items():
        emit(
            protocol.WARNING,
            message=f"could not tell whether the cell changed {name!r} ({reason}), so it was left out; if it did, "
            "name it in --out to bring it back",
        )
    values, why = chosen.values, chosen.why
    notebook_objects = codec.notebook_defined(namespace)
    skipped: dict[str, str] = {}
    while True:
        try:
            pickled: set[int] = set()
            data, buffers = codec.dumps(values, notebook_objects, pickled=pickled)
        except Exception:
            culprit, reason = codec.first_unpicklable(values, notebook_objects)
            if culprit is None:
                raise
            skipped[culprit] = reason
            del values[culprit], why[culprit]
            emit(protocol.WARNING, message=f"output {culprit!r} cannot be sent back and was left out: {reason}")
            continue
        unchanged = [n for n in inputs.before if n not in why and n not in skipped]
        shared = changes.shared_with(pickled, namespace, unchanged)
        if not shared:
            break
        values.update({n: namespace[n] for n in shared})  # then the kernel's copies stay one object too
        why.update(dict.fromkeys(shared, "shared"))
    # An input's own array, never written: known by its blob, not hashed, and the kernel may use its own copy.
    as_is = [inputs.blobs.untouched_input(buf) for buf in buffers]
    with blobs.blob_lock(root, exclusive=False):  # gc waits, and then sees the list below
        names = [known or digests.of(buf) for known, buf in zip(as_is, buffers, strict=True)]
        disk.atomic_write(os.path.join(path, protocol.OUTPUT_BLOBS_FILE), json.dumps(names).encode())
        stored = [blobs.write_blob(root, buf, name) for buf, name in zip(buffers, names, strict=True)]
    disk.atomic_write(os.path.join(path, protocol.OUTPUTS_FILE), data)
    manifest = {"outputs": list(values), "why": why, "blobs": stored, "skipped": skipped, "pickle_bytes": len(data)}
    return {**manifest, "inputs_as_is": sorted({known for known in as_is if known})}
