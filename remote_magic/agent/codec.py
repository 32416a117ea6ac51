"""Pickling shared by both ends: cloudpickle protocol 5, buffers out of band.

Lives in the agent package because the runner pickles outputs with exactly
the rules the client uses for inputs, and the agent may import nothing from
outside itself.  cloudpickle and keras are imported lazily: importing this
module costs nothing on a host that only runs ``status``.

Keras models get their own reduction.  Keras' built-in pickling looks custom
layers, losses and metrics up by their registered name, so a model using a
class defined in a notebook fails to unpickle anywhere else.  We save the
model to the native ``.keras`` zip (weights and optimizer state) and ship the
custom objects it needs beside it, pickled by value by cloudpickle, then load
with ``custom_objects``.
"""

from __future__ import annotations

import io
import os
import pickle
import sys
import tempfile
import types
import warnings
from collections.abc import Callable, Iterable
from typing import Any

PROTOCOL = 5
# Buffers at least this big travel out of band, as content-addressed blobs.
BLOB_THRESHOLD = 256 * 1024

_KERAS_PREFIXES = ("keras", "tensorflow", "tf_keras", "jax", "torch")


def dumps(
    values: dict[str, Any],
    notebook_objects: Iterable[Any] = (),
    threshold: int = BLOB_THRESHOLD,
) -> tuple[bytes, list[memoryview]]:
    """Pickle ``values``; return the in-band bytes and the out-of-band buffers.

    ``notebook_objects`` are functions and classes defined in the notebook
    (or cell); they go with every Keras model so custom layers, losses and
    metrics resolve when the model is loaded on the other side.
    """
    buffers: list[memoryview] = []

    def keep_out_of_band(buf: pickle.PickleBuffer) -> bool:
        raw = buf.raw()
        if raw.nbytes < threshold:
            return True
        buffers.append(raw)
        return False

    out = io.BytesIO()
    pickler = _pickler_class()(out, protocol=PROTOCOL, buffer_callback=keep_out_of_band)
    pickler.notebook_objects = list(notebook_objects)
    pickler.dump(values)
    return out.getvalue(), buffers


def loads(data: bytes, buffers: Iterable[Any]) -> Any:
    import cloudpickle  # noqa: F401  (functions pickled by value need it to load)

    return pickle.loads(data, buffers=buffers)


def first_unpicklable(values: dict[str, Any], notebook_objects: Iterable[Any] = ()) -> tuple[str | None, str]:
    """The first value that cannot be pickled, and why; (None, "") if all can."""
    notebook_objects = list(notebook_objects)
    for name, value in values.items():
        try:
            dumps({name: value}, notebook_objects)
        except Exception as exc:  # noqa: BLE001  (any failure makes the value unsendable)
            return name, f"{type(exc).__name__}: {exc}"
    return None, ""


def notebook_defined(namespace: dict[str, Any]) -> list[Any]:
    """Functions and classes defined interactively (module ``__main__``)."""
    return [
        value
        for value in namespace.values()
        if isinstance(value, (type, types.FunctionType)) and getattr(value, "__module__", None) == "__main__"
    ]


_PICKLER_CLASS: type | None = None


def _pickler_class() -> type:
    global _PICKLER_CLASS
    if _PICKLER_CLASS is None:
        import cloudpickle

        class Pickler(cloudpickle.Pickler):
            notebook_objects: list[Any]

            def reducer_override(self, obj: Any) -> Any:
                if _is_keras_model(obj):
                    return _reduce_keras_model(obj, self.notebook_objects)
                return super().reducer_override(obj)

        _PICKLER_CLASS = Pickler
    return _PICKLER_CLASS


def _is_keras_model(obj: Any) -> bool:
    keras = sys.modules.get("keras")
    return keras is not None and isinstance(obj, keras.Model)


def _reduce_keras_model(model: Any, notebook_objects: list[Any]) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    with tempfile.TemporaryDirectory(prefix="remote_magic-") as tmp:
        path = os.path.join(tmp, "model.keras")
        model.save(path)
        with open(path, "rb") as f:
            archive = bytearray(f.read())
    custom = _custom_objects(model, notebook_objects)
    return _rebuild_keras_model, (pickle.PickleBuffer(archive), custom)


def _rebuild_keras_model(archive: Any, custom_objects: dict[str, Any]) -> Any:
    import keras

    with tempfile.TemporaryDirectory(prefix="remote_magic-") as tmp:
        path = os.path.join(tmp, "model.keras")
        with open(path, "wb") as f:
            f.write(memoryview(archive))
        with warnings.catch_warnings():
            # A compiled model whose optimizer never ran saves 2 optimizer
            # variables and expects more on load; Keras warns, nothing is lost.
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            # Unpickling already trusts the sender, so Lambda layers may load too.
            return keras.saving.load_model(path, custom_objects=custom_objects, safe_mode=False)


def _custom_objects(model: Any, notebook_objects: list[Any]) -> dict[str, Any]:
    """Every non-Keras class or function the model's config may name."""
    import keras

    found: list[Any] = list(notebook_objects)
    for layer in model._flatten_layers(include_self=True, recursive=True):
        found.append(type(layer))
    compile_config = getattr(model, "_compile_config", None)
    if compile_config is not None:
        _collect_callables(getattr(compile_config, "config", {}), found)
    _collect_callables(getattr(model, "loss", None), found)

    custom: dict[str, Any] = {}
    for obj in found:
        module = getattr(obj, "__module__", None) or ""
        if module.split(".")[0] in _KERAS_PREFIXES or not hasattr(obj, "__name__"):
            continue
        custom[obj.__name__] = obj
        custom[keras.saving.get_registered_name(obj)] = obj
    return custom


def _collect_callables(value: Any, found: list[Any]) -> None:
    if isinstance(value, dict):
        for item in value.values():
            _collect_callables(item, found)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _collect_callables(item, found)
    elif isinstance(value, (type, types.FunctionType)):
        found.append(value)
    elif callable(value) and not isinstance(value, str):
        found.append(type(value))
