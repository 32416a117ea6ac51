"""Pickling shared by both ends: cloudpickle protocol 5, buffers out of band.

Lives in the agent package because the runner pickles outputs with exactly
the rules the client uses for inputs, and the agent may import nothing from
outside itself.  cloudpickle, keras, torch and tensorflow are imported
lazily, and the reductions below only look at a library already in
``sys.modules``: importing this module, or pickling plain values, costs
nothing on a host that only runs ``status``.

Keras models get their own reduction.  Keras' built-in pickling looks custom
layers, losses and metrics up by their registered name, so a model using a
class defined in a notebook fails to unpickle anywhere else.  We save the
model to the native ``.keras`` zip (weights and optimizer state) and ship the
custom objects it needs beside it, pickled by value by cloudpickle, then load
with ``custom_objects``.  This works on every Keras backend.

PyTorch tensors get one too.  torch's own pickling puts every byte in band
(through ``torch.save``) and loads a CUDA tensor only where that device
exists; ours sends the data as an out-of-band buffer (a large tensor becomes
a content-addressed blob, like a numpy array) and maps the device to what
the loading process has, with a note instead of an error.

A finite ``tf.data.Dataset`` travels as the folder ``Dataset.save`` writes,
in one uncompressed tar, and is loaded back from a folder that lives until
the process exits.

Some of this is worth telling the user (a tensor moved to the CPU, a shuffle
order frozen by the save): the caller that shows a result collects the notes
of the ``dumps``/``loads`` that made it (``with noting() as notes``), so the
notes travel with that result and never reach another's panel (a cell's and
a background follower's, in other threads or the same one).
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import io
import os
import pickle
import sys
import tempfile
import threading
import types
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

PROTOCOL = 5
# Buffers at least this big travel out of band, as content-addressed blobs.
BLOB_THRESHOLD = 256 * 1024

_KERAS_PREFIXES = ("keras", "tensorflow", "tf_keras", "jax", "torch")

_NOTES: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("remote_magic_codec_notes", default=None)
# Who is loading, for the wording of device notes: set by ``loads`` for the unpickling thread.
_LOADING = threading.local()


def dumps(
    values: dict[str, Any],
    notebook_objects: Iterable[Any] = (),
    threshold: int = BLOB_THRESHOLD,
    referenced_modules: set[str] | None = None,
    pickled: set[int] | None = None,
    order_unused: Iterable[str] = (),
) -> tuple[bytes, list[memoryview]]:
    """Pickle ``values``; return the in-band bytes and the out-of-band buffers.

    ``notebook_objects`` are functions and classes defined in the notebook (or cell); they go with every
    Keras model so custom layers, losses and metrics resolve when the model is loaded on the other side.

    ``referenced_modules``, when given, receives the ``__module__`` of every class and function pickled
    (by reference or by value), the name of every module object pickled, and the module of the type of
    every object reduced: the caller finds there the local modules the other side needs.
    ``pickled`` receives the ids of the objects the pickle holds; ``order_unused`` names the datasets the cell
    never trains on (no note about their frozen shuffle order).
    """
    buffers: list[memoryview] = []

    def keep_out_of_band(buf: pickle.PickleBuffer) -> bool:
        raw = buf.raw()
        if raw.nbytes < threshold:
            return True
        buffers.append(raw)
        return False

    out = io.BytesIO()
    pickler = pickler_class()(out, protocol=PROTOCOL, buffer_callback=keep_out_of_band)
    pickler.notebook_objects = list(notebook_objects)
    pickler.referenced_modules = referenced_modules
    pickler.value_names = {id(value): name for name, value in values.items()}
    pickler.order_unused = frozenset(order_unused)
    pickler.dump(values)
    if pickled is not None:
        pickled.update(pickler.memo.copy())
    return out.getvalue(), buffers


def loads(data: bytes, buffers: Iterable[Any], *, receiver: str = "kernel") -> Any:
    """Unpickle what ``dumps`` wrote.

    ``receiver`` words the device notes: "kernel" when the notebook loads
    what the host sent, "host" when the runner loads the notebook's inputs.
    """
    import cloudpickle  # noqa: F401  (functions pickled by value need it to load)

    previous = getattr(_LOADING, "receiver", None)
    _LOADING.receiver = receiver
    try:
        return pickle.loads(data, buffers=buffers)
    finally:
        _LOADING.receiver = previous


@contextlib.contextmanager
def noting() -> Iterator[list[str]]:
    """The notes of the ``dumps`` and ``loads`` made inside, each once, for whoever shows their result.

    Notes made outside any ``noting`` are dropped: nobody would show them.
    """
    notes: list[str] = []
    token = _NOTES.set(notes)
    try:
        yield notes
    finally:
        _NOTES.reset(token)
        notes[:] = dict.fromkeys(notes)


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


def _note(text: str) -> None:
    notes = _NOTES.get()
    if notes is not None:
        notes.append(text)


_PICKLER_CLASS: type | None = None


def pickler_class() -> type:
    global _PICKLER_CLASS
    if _PICKLER_CLASS is None:
        import cloudpickle

        class Pickler(cloudpickle.Pickler):
            notebook_objects: list[Any]
            referenced_modules: set[str] | None
            value_names: dict[int, str]
            order_unused: frozenset[str]

            def reducer_override(self, obj: Any) -> Any:
                if self.referenced_modules is not None:
                    _record_modules(obj, self.referenced_modules)
                if is_keras_model(obj):
                    return _reduce_keras_model(obj, self.notebook_objects)
                if _is_plain_tensor(obj):
                    return _reduce_torch_tensor(obj)
                if _is_tf_dataset(obj):
                    name = self.value_names.get(id(obj))
                    return _reduce_tf_dataset(obj, name, order_unused=name in self.order_unused)
                return super().reducer_override(obj)

        _PICKLER_CLASS = Pickler
    return _PICKLER_CLASS


def _record_modules(obj: Any, modules: set[str]) -> None:
    if isinstance(obj, types.ModuleType):
        modules.add(obj.__name__)
    elif isinstance(obj, (type, types.FunctionType, types.BuiltinFunctionType)):
        module = getattr(obj, "__module__", None)
        if isinstance(module, str):
            modules.add(module)
    module = getattr(type(obj), "__module__", None)
    if isinstance(module, str):
        modules.add(module)


# Keras models ---------------------------------------------------------------


def is_keras_model(obj: Any) -> bool:
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
        if isinstance(layer, keras.layers.Lambda):  # a named function is saved by its name
            _collect_callables(getattr(layer, "function", None), found)
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


# PyTorch tensors ------------------------------------------------------------


def _is_plain_tensor(obj: Any) -> bool:
    """A dense ``torch.Tensor`` or ``Parameter``; subclasses, sparse and meta tensors are left to torch."""
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    parameter = getattr(sys.modules.get("torch.nn.parameter"), "Parameter", None)
    cls = type(obj)
    if cls is not getattr(torch, "Tensor", None) and (parameter is None or cls is not parameter):
        return False
    return obj.layout == torch.strided and not obj.is_nested and not obj.is_quantized and obj.device.type != "meta"


def _reduce_torch_tensor(tensor: Any) -> tuple[Any, ...]:
    import torch

    data = tensor.detach()
    if data.device.type != "cpu":
        data = data.cpu()
    data = data.resolve_conj().resolve_neg().contiguous()
    try:
        array = data.numpy()
    except TypeError:  # bfloat16, float8, complex32: numpy has no such dtype, the bytes travel as integers
        integer = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[data.element_size()]
        array = data.view(integer).numpy()
    args = (
        pickle.PickleBuffer(array),
        str(tensor.dtype).removeprefix("torch."),
        tuple(tensor.shape),
        bool(tensor.requires_grad),
        str(tensor.device),
        isinstance(tensor, torch.nn.Parameter),
    )
    attributes = tensor.__dict__
    if attributes:  # set after the tensor is memoized, so an attribute may refer back to it
        return _rebuild_torch_tensor, args, dict(attributes), None, None, _set_tensor_attributes
    return _rebuild_torch_tensor, args


def _rebuild_torch_tensor(
    buffer: Any, dtype: str, shape: tuple[int, ...], requires_grad: bool, device: str, parameter: bool = False
) -> Any:
    import torch

    torch_dtype = getattr(torch, dtype)
    view = memoryview(buffer).cast("B")
    if view.nbytes == 0:
        tensor = torch.empty(shape, dtype=torch_dtype)
    else:
        if view.readonly:  # torch has no read-only tensors: writing to one would crash
            view = memoryview(bytearray(view))
        tensor = torch.frombuffer(view, dtype=torch_dtype).reshape(shape)
    tensor = _to_available_device(torch, tensor, device)
    if parameter:
        return torch.nn.Parameter(tensor, requires_grad=requires_grad)
    if requires_grad:
        tensor.requires_grad_(True)
    return tensor


def _set_tensor_attributes(tensor: Any, attributes: dict[str, Any]) -> None:
    tensor.__dict__.update(attributes)


def _to_available_device(torch: Any, tensor: Any, device: str) -> Any:
    """``tensor`` on ``device`` when this process has it, else on the nearest it has, with a note."""
    if device == "cpu":
        return tensor
    origin, here, machine = _loading_words()
    try:
        wanted = torch.device(device)
        if wanted.type == "cuda":
            if not torch.cuda.is_available():
                _note(f"tensors that were on {device} {origin} are on the CPU {here}: {machine} has no GPU")
                return tensor
            count = torch.cuda.device_count()
            target = torch.device("cuda", wanted.index or 0) if (wanted.index or 0) < count else torch.device("cuda", 0)
            if target != wanted and wanted.index is not None:
                gpus = "1 GPU" if count == 1 else f"{count} GPUs"
                _note(f"tensors that were on {device} {origin} are on {target} {here}: {machine} has {gpus}")
            return tensor.to(target)
        backend = getattr(torch, wanted.type, None)
        if backend is None or not backend.is_available():
            _note(
                f"tensors that were on {device} {origin} are on the CPU {here}: {machine} has no {wanted.type} device"
            )
            return tensor
        return tensor.to(wanted)
    except Exception as exc:  # noqa: BLE001  (a tensor on the CPU beats a failed unpickling)
        _note(f"tensors that were on {device} {origin} are on the CPU {here}: moving them failed ({exc})")
        return tensor


def _loading_words() -> tuple[str, str, str]:
    """Where the tensor came from, where it is now, and who lacks the device, as the user reads it."""
    if getattr(_LOADING, "receiver", None) == "host":
        return "in the notebook", "on the host", "the host"
    return "on the host", "here", "this kernel"


# tf.data datasets -----------------------------------------------------------


def _is_tf_dataset(obj: Any) -> bool:
    ops = sys.modules.get("tensorflow.python.data.ops.dataset_ops")
    dataset = getattr(ops, "DatasetV2", None)
    return dataset is not None and isinstance(obj, dataset)


def _reduce_tf_dataset(
    dataset: Any, name: str | None, order_unused: bool = False
) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    import tarfile

    import tensorflow as tf

    called = f"dataset {name!r}" if name else "a tf.data dataset"
    nodes = list(_dataset_chain(dataset))
    ops = [op for node in nodes for op in _function_ops(node)]
    if any("Generator" in type(node).__name__ for node in nodes) or any(op.type == "GeneratorDataset" for op in ops):
        raise pickle.PicklingError(f"{called} built from a Python generator cannot be sent; build it inside the cell")
    cardinality = int(dataset.cardinality())
    if cardinality == tf.data.INFINITE_CARDINALITY:
        raise pickle.PicklingError(
            f"{called} is infinite (it repeats forever), so it cannot be saved and sent; "
            "build it inside the cell, or send it without .repeat() and repeat it in the cell"
        )
    if cardinality == tf.data.UNKNOWN_CARDINALITY and any(
        int(node.cardinality()) == tf.data.INFINITE_CARDINALITY for node in nodes
    ):
        raise pickle.PicklingError(
            f"{called} may be infinite (it repeats forever before a step of unknown length), "
            "so it cannot be saved and sent; build it inside the cell"
        )
    if not order_unused and _reshuffles(nodes, ops):
        _note(
            f"{called} was saved with one shuffle order: on the host every epoch sees that same order; "
            "to reshuffle each epoch, shuffle inside the cell (e.g. ds = ds.unbatch().shuffle(1000).batch(32))"
        )
    archive = io.BytesIO()
    with tempfile.TemporaryDirectory(prefix="remote_magic-") as tmp:
        folder = os.path.join(tmp, "dataset")
        dataset.save(folder)
        with tarfile.open(fileobj=archive, mode="w", format=tarfile.PAX_FORMAT) as tar:
            tar.add(folder, arcname=".")
    spec = dataset.element_spec
    try:
        pickle.dumps(spec, protocol=PROTOCOL)
    except Exception:  # noqa: BLE001  (Dataset.load reads the spec from the folder as well)
        spec = None
    return _rebuild_tf_dataset, (pickle.PickleBuffer(archive.getbuffer()), spec)


def _rebuild_tf_dataset(archive: Any, element_spec: Any) -> Any:
    import tarfile

    import tensorflow as tf

    folder = tempfile.mkdtemp(prefix="remote_magic-dataset-")
    _remove_at_exit(folder)
    with tarfile.open(fileobj=io.BytesIO(memoryview(archive)), mode="r:") as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(folder, filter="data")
        else:  # Python before 3.11.4; the archive is one dumps wrote
            tar.extractall(folder)
    return tf.data.Dataset.load(folder, element_spec)


def _dataset_chain(dataset: Any) -> Iterator[Any]:
    """The dataset and every dataset it reads from, each once."""
    seen: set[int] = set()
    pending = [dataset]
    while pending:
        node = pending.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        yield node
        try:
            inputs = list(node._inputs())
        except Exception:  # noqa: BLE001  (a private API: fall back to the attributes it reads)
            inputs = [getattr(node, "_input_dataset", None), *getattr(node, "_input_datasets", ())]
        for attribute in ("_dataset", "_input_dataset"):  # the V1 adapter wraps, some _inputs() omit
            inputs.append(getattr(node, attribute, None))
        pending.extend(item for item in inputs if item is not None and hasattr(item, "cardinality"))


def _function_ops(node: Any) -> list[Any]:
    """The ops in the functions a dataset step runs (map, flat_map, interleave...): datasets built there."""
    ops: list[Any] = []
    for value in vars(node).values():
        graph = getattr(getattr(value, "function", None), "graph", None)
        if graph is not None and hasattr(graph, "get_operations"):
            ops.extend(graph.get_operations())
    return ops


def _reshuffles(nodes: list[Any], ops: list[Any]) -> bool:
    """Whether a shuffle in the pipeline would have drawn a new order each epoch."""
    for node in nodes:
        if "Shuffle" in type(node).__name__ and getattr(node, "_reshuffle_each_iteration", True) is not False:
            return True
    return any("Shuffle" in op.type and _op_attribute(op, "reshuffle_each_iteration", True) for op in ops)


def _op_attribute(op: Any, name: str, default: Any) -> Any:
    try:
        return op.get_attr(name)
    except Exception:  # noqa: BLE001  (ops without the attribute)
        return default


_DATASET_FOLDERS: list[str] = []
_DATASET_FOLDERS_LOCK = threading.Lock()


def _remove_at_exit(folder: str) -> None:
    """Loaded datasets read their folder lazily, so it lives until the process exits."""
    with _DATASET_FOLDERS_LOCK:
        if not _DATASET_FOLDERS:
            atexit.register(_remove_dataset_folders)
        _DATASET_FOLDERS.append(folder)


def _remove_dataset_folders() -> None:
    import shutil

    for folder in _DATASET_FOLDERS:
        shutil.rmtree(folder, ignore_errors=True)
