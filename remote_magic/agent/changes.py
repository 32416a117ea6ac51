"""Which inputs the cell changed, decided by their content rather than by how the cell is written.

A cell that trains through a function (``train(model, ...)``), a library call or a method nobody
listed changes its inputs as surely as ``model.fit`` does; reading the source cannot see that.  So
the runner takes a fingerprint of each input right after loading it and again after the cell, in
the same process (a set of strings iterates in the same order both times: no false change from
hash randomisation), and an input comes back when the two differ.

A fingerprint is the digest of the input's pickle, with each out-of-band buffer (an array, a
tensor's data) stood for by its own digest.  The inputs are private memory maps of their blobs
(``store.blobs.map_blob``), so an array whose pages were never written still lies exactly in its
mapping and its digest is the blob's name: on Linux ``/proc/self/smaps`` says so without reading a
byte of it.  Keras models are fingerprinted by their config and variables (their saved archive
carries the time it was saved), tf.data datasets not at all (they cannot change in place).
"""

from __future__ import annotations

import ctypes
import io
import os
import pickle
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from . import codec
from . import digest as digests

# Values of these types are never "changed in place" and are not worth returning because shared.
_IMMUTABLE = (str, bytes, int, float, complex, bool, type(None), range)


@dataclass
class MappedBlob:
    start: int  # the mapping's address in this process
    size: int
    digest: str
    path: str  # the blob's file: what the mapping at ``start`` must still map


@dataclass
class Blobs:
    """The inputs' blobs as mapped at load: what lets an untouched array's digest be known without hashing it."""

    mapped: list[MappedBlob] = field(default_factory=list)
    _written: dict[int, bool] | None = None  # mapping start -> written since mapped (or unknown); read once per check

    @classmethod
    def of(cls, buffers: Iterable[Any], names: Iterable[str], paths: Iterable[str]) -> Blobs:
        mapped = []
        for buffer, name, path in zip(buffers, names, paths, strict=True):
            start = address(buffer)
            if start is not None and len(buffer):
                mapped.append(MappedBlob(start, len(buffer), name, os.path.realpath(path)))
        return cls(mapped)

    def digest(self, raw: memoryview, written: bool = True) -> str:
        """The digest of ``raw``: its blob's name when it is a whole mapping still unwritten, else hashed.

        ``written=False`` (just loaded: nothing could have written it yet) skips asking the kernel."""
        return self.untouched_input(raw, written) or digests.of(raw)

    def untouched_input(self, raw: memoryview, written: bool = True) -> str | None:
        """The blob whose unwritten mapping ``raw`` is, exactly (so the value is the input itself), or None."""
        start = address(raw)
        for blob in self.mapped:
            if blob.start == start and blob.size == raw.nbytes and not (written and self._was_written(blob)):
                return blob.digest
        return None

    def forget_writes(self) -> None:
        """Ask the kernel again at the next check (the cell may have run in between)."""
        self._written = None

    def _was_written(self, blob: MappedBlob) -> bool:
        if self._written is None:
            self._written = _written_mappings(self.mapped)
        return self._written.get(blob.start, True)


def address(buffer: Any) -> int | None:
    """Where a writable buffer's bytes start in this process; None when it cannot be told (read-only)."""
    try:
        view = memoryview(buffer)
        if view.readonly or not view.contiguous or view.nbytes == 0:
            return None
        return ctypes.addressof(ctypes.c_char.from_buffer(view.cast("B")))
    except (TypeError, ValueError, BufferError):
        return None


def _written_mappings(blobs: list[MappedBlob]) -> dict[int, bool]:
    """For each blob's mapping (by start): whether any page of it was written, or it is not known to be its file.

    A private file mapping's written pages become anonymous memory, which ``smaps`` counts (``Anonymous``,
    or ``Swap`` once swapped out).  A mapping may have been split in parts (``madvise``, ``mlock`` of a part):
    every part within the blob's range counts, and each must still map the blob's file (the address may have
    been reused by another mapping).  Without ``/proc`` nothing is known, and every buffer is hashed."""
    clean = {blob.start: False for blob in blobs}  # its first part was seen mapping its file, none written since
    inside: list[MappedBlob] = []
    try:
        with open("/proc/self/smaps", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split(None, 5)
                if fields and "-" in fields[0] and not fields[0].endswith(":"):
                    start = int(fields[0].split("-", 1)[0], 16)
                    path = fields[5].strip() if len(fields) > 5 else ""
                    inside = [b for b in blobs if b.start <= start < b.start + b.size]
                    for blob in inside:
                        if path != blob.path:
                            clean[blob.start] = False
                        elif start == blob.start:
                            clean[blob.start] = True
                elif inside and fields[0] in ("Anonymous:", "Swap:") and int(fields[1]) > 0:
                    for blob in inside:
                        clean[blob.start] = False
    except (OSError, ValueError, IndexError):
        return {}
    return {start: not is_clean for start, is_clean in clean.items()}


class _FingerprintSink(io.RawIOBase):
    """Where a fingerprint's pickle goes: hashed as it is written, never kept."""

    def __init__(self) -> None:
        self.hasher = digests.new()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.hasher.update(data)
        return len(data)


def fingerprint(value: Any, blobs: Blobs, written: bool = True) -> str:
    """The digest of ``value``'s content as the runner would send it (see the module's docstring)."""
    sink = _FingerprintSink()
    buffer_digests: list[str] = []

    def by_digest(buffer: pickle.PickleBuffer) -> bool:
        buffer_digests.append(blobs.digest(buffer.raw(), written))
        return False  # out of band: only its digest counts, its bytes are never copied

    pickler = _fingerprint_pickler()(sink, protocol=codec.PROTOCOL, buffer_callback=by_digest)
    pickler.notebook_objects, pickler.referenced_modules, pickler.value_names = [], None, {}
    pickler.order_unused = frozenset()
    pickler.dump(value)
    for name in buffer_digests:
        sink.hasher.update(name.encode())
    return digests.named(sink.hasher)


def fingerprints(namespace: dict[str, Any], names: Iterable[str], blobs: Blobs) -> dict[str, str | Exception]:
    """Each input's fingerprint just after loading (its buffers are still their blobs), or why there is none."""
    found: dict[str, str | Exception] = {}
    for name in names:
        if name in namespace and may_change(namespace[name]):
            try:
                found[name] = fingerprint(namespace[name], blobs, written=False)
            except Exception as exc:  # noqa: BLE001  (told to the user: name it in --out)
                found[name] = exc
    return found


def may_change(value: Any) -> bool:
    """Whether a value could have been changed in place, and should then come back.

    Functions and classes defined in the notebook never do: the kernel's own are the ones its other
    functions see (a copy would come back with a private copy of the globals it reads)."""
    if isinstance(value, _IMMUTABLE) or isinstance(value, type(sys)):
        return False
    return not (isinstance(value, (type, type(may_change))) and getattr(value, "__module__", None) == "__main__")


@dataclass
class Changes:
    changed: list[str] = field(default_factory=list)
    unknown: dict[str, str] = field(default_factory=dict)  # name -> why it could not be told


def changed_inputs(before: dict[str, str | Exception], namespace: dict[str, Any], blobs: Blobs) -> Changes:
    """The inputs whose content differs from ``before``, in input order; those that could not be told, with why."""
    result = Changes()
    blobs.forget_writes()
    for name, earlier in before.items():
        if name not in namespace:
            continue  # deleted by the cell
        try:
            if isinstance(earlier, Exception):
                raise earlier
            if fingerprint(namespace[name], blobs) != earlier:
                result.changed.append(name)
        except Exception as exc:  # noqa: BLE001
            result.unknown[name] = f"{type(exc).__name__}: {exc}"
    return result


def shared_with(pickled: set[int], namespace: dict[str, Any], names: Iterable[str]) -> list[str]:
    """The unchanged inputs that the outputs' pickle holds: they come back too, so both stay one object."""
    return [
        name
        for name in names
        if name in namespace and id(namespace[name]) in pickled and not isinstance(namespace[name], _IMMUTABLE)
    ]


_PICKLER: type | None = None


def _fingerprint_pickler() -> type:
    """The codec's pickler, but a Keras model stands for its state and a tf.data dataset for itself."""
    global _PICKLER
    if _PICKLER is None:

        class FingerprintPickler(codec.pickler_class()):  # type: ignore[misc]
            def reducer_override(self, obj: Any) -> Any:
                if codec.is_keras_model(obj):
                    return tuple, (_keras_state(obj),)
                if codec._is_tf_dataset(obj):
                    return tuple, ((type(obj).__qualname__, id(obj)),)
                return super().reducer_override(obj)

        _PICKLER = FingerprintPickler
    return _PICKLER


def _keras_state(model: Any) -> tuple[Any, ...]:
    """What a Keras model's training or recompiling changes: its config and variables, its optimizer's config and
    variables (its step count, its moments) and what ``compile`` was given (a recompile with other settings)."""
    optimizer = getattr(model, "optimizer", None)
    variables = list(model.variables) + list(getattr(optimizer, "variables", None) or [])
    values = []
    for variable in variables:
        array = variable.numpy()
        data = array.data if array.flags.c_contiguous else array.tobytes()
        values.append((getattr(variable, "path", None), str(array.dtype), array.shape, digests.of(data)))
    compiled = getattr(getattr(model, "_compile_config", None), "config", None)
    configs = (_config(model), type(optimizer).__qualname__, _config(optimizer), repr(compiled))
    return (type(model).__qualname__, configs, model.trainable, values)


def _config(obj: Any) -> str | None:
    """A Keras object's config as text; None without one (a subclassed model: its variables still count)."""
    try:
        return repr(obj.get_config())
    except Exception:  # noqa: BLE001
        return None


@dataclass
class Returned:
    """What comes back and why: ``why[name]`` is "assigned", "changed", "shared" or "--out"."""

    values: dict[str, Any]
    why: dict[str, str]
    unknown: dict[str, str]


def returned(
    spec: dict[str, Any], namespace: dict[str, Any], before: dict[str, str | Exception], blobs: Blobs
) -> Returned:
    """The values that come back: those the cell assigned (or ``--out`` named) and the inputs it changed."""
    reason = "assigned" if spec.get("changed_inputs") else "--out"
    why = {n: reason for n in spec.get("outputs", []) if n in namespace and not isinstance(namespace[n], type(sys))}
    found = changed_inputs({n: f for n, f in before.items() if n not in why}, namespace, blobs)
    why.update(dict.fromkeys(found.changed, "changed"))
    return Returned({n: namespace[n] for n in why}, why, found.unknown)
