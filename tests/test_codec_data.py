"""The codec carries data objects: PyTorch tensors, modules and loaders, tf.data datasets, the modules they name."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from remote_magic.agent import codec
from remote_magic.project import payload

torch = pytest.importorskip("torch")

MiB = 1024 * 1024


def _round_trip(values: dict[str, Any], notebook_objects: list[Any] | None = None) -> dict[str, Any]:
    data, buffers = codec.dumps(values, notebook_objects or [])
    # Out-of-band buffers arrive as separate bytes objects, as they do from blobs.
    return codec.loads(data, [bytes(buf) for buf in buffers])


# PyTorch tensors -------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float32,
        torch.float64,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.uint8,
        torch.bool,
        torch.complex64,
    ],
)
def test_a_tensor_keeps_its_values_dtype_and_shape(dtype) -> None:
    tensor = (torch.arange(24, dtype=torch.float32).reshape(2, 3, 4) % 5).to(dtype)
    back = _round_trip({"t": tensor})["t"]
    assert type(back) is torch.Tensor
    assert back.dtype == dtype and back.shape == tensor.shape and back.device.type == "cpu"
    assert torch.equal(back, tensor)


def test_bfloat16_float8_scalars_and_empty_tensors_travel_as_raw_bytes() -> None:
    values = {
        "bf16": torch.randn(5, 7).to(torch.bfloat16),
        "f8": torch.randn(9).to(torch.float8_e4m3fn),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 3),
    }
    back = _round_trip(values)
    assert torch.equal(back["bf16"], values["bf16"])
    assert torch.equal(back["f8"].view(torch.uint8), values["f8"].view(torch.uint8))
    assert back["f8"].dtype == torch.float8_e4m3fn
    assert back["scalar"].shape == () and back["scalar"].item() == 3.5
    assert back["empty"].shape == (0, 3)


def test_a_non_contiguous_view_comes_back_as_its_own_writable_values() -> None:
    base = torch.arange(100.0).reshape(10, 10)
    view = base.t()[::2, 1:4]
    assert not view.is_contiguous()
    back = _round_trip({"v": view})["v"]
    assert torch.equal(back, view)
    back += 1  # writable, and no longer tied to the base
    assert torch.equal(base, torch.arange(100.0).reshape(10, 10))


def test_requires_grad_is_kept_and_a_non_leaf_comes_back_as_a_leaf() -> None:
    leaf = torch.ones(3, requires_grad=True)
    non_leaf = leaf * 2
    back = _round_trip({"leaf": leaf, "non_leaf": non_leaf, "plain": torch.ones(2)})
    assert back["leaf"].requires_grad and back["leaf"].is_leaf
    assert back["non_leaf"].requires_grad and back["non_leaf"].is_leaf
    assert torch.equal(back["non_leaf"].detach(), non_leaf.detach())
    assert not back["plain"].requires_grad
    (back["leaf"] * 3).sum().backward()
    assert torch.equal(back["leaf"].grad, torch.full((3,), 3.0))


def test_a_parameter_stays_a_parameter_with_its_requires_grad_and_attributes() -> None:
    trained = torch.nn.Parameter(torch.randn(4, 2))
    frozen = torch.nn.Parameter(torch.randn(3), requires_grad=False)
    trained.tag = "encoder"  # some libraries mark their parameters
    trained.owner = trained  # an attribute may even refer back to the tensor
    back = _round_trip({"trained": trained, "frozen": frozen})
    assert type(back["trained"]) is torch.nn.Parameter and back["trained"].requires_grad
    assert type(back["frozen"]) is torch.nn.Parameter and not back["frozen"].requires_grad
    assert torch.equal(back["trained"].detach(), trained.detach()) and torch.equal(back["frozen"], frozen)
    assert back["trained"].tag == "encoder" and back["trained"].owner is back["trained"]


def test_a_large_tensor_goes_out_of_band_and_a_small_one_in_band() -> None:
    large = torch.randn(MiB // 4)  # 1 MiB of float32
    large_bf16 = torch.randn(MiB // 2).to(torch.bfloat16)
    data, buffers = codec.dumps({"large": large, "large_bf16": large_bf16, "small": torch.ones(10)})
    assert sorted(buf.nbytes for buf in buffers) == [MiB, MiB]
    assert len(data) < 16 * 1024
    assert bytes(buffers[0]) == large.numpy().tobytes()  # the blob is the tensor's bytes: equal tensors dedup
    back = codec.loads(data, buffers)
    assert torch.equal(back["large"], large) and torch.equal(back["large_bf16"], large_bf16)


def test_a_read_only_buffer_is_copied_and_a_writable_one_is_used_in_place() -> None:
    tensor = torch.arange(MiB // 8, dtype=torch.float64)
    data, buffers = codec.dumps({"t": tensor})
    from_bytes = codec.loads(data, [bytes(buffers[0])])["t"]
    from_bytes += 1  # writing to a read-only buffer would crash: it was copied
    writable = bytearray(buffers[0])
    in_place = codec.loads(data, [writable])["t"]
    in_place[0] = 42.0
    assert np.frombuffer(writable, dtype=np.float64)[0] == 42.0  # a mapped blob costs no copy


def test_shared_tensors_stay_one_object() -> None:
    tensor = torch.randn(3)
    embedding = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = embedding.weight  # tied weights
    back = _round_trip({"a": tensor, "b": [tensor, {"again": tensor}], "embedding": embedding, "head": head})
    assert back["a"] is back["b"][0] is back["b"][1]["again"]
    assert back["head"].weight is back["embedding"].weight


NET_SOURCE = """
import torch

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = torch.nn.Linear(4, 8)
        self.out = torch.nn.Linear(8, 1)

    def forward(self, x):
        return self.out(torch.relu(self.hidden(x)))
"""


def _notebook_namespace() -> dict[str, Any]:
    """Classes defined as a notebook defines them: module ``__main__``, so cloudpickle sends them by value."""
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec(compile(NET_SOURCE, "<cell>", "exec"), namespace)
    return namespace


def _train(net: Any, optimizer: Any, loader: Any) -> None:
    for x, y in loader:
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        optimizer.step()


def test_a_module_its_optimizer_and_loader_round_trip_and_keep_working() -> None:
    torch.manual_seed(0)
    namespace = _notebook_namespace()
    net = namespace["Net"]()
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
    x = torch.randn(64, 4)
    dataset = torch.utils.data.TensorDataset(x, x.sum(dim=1, keepdim=True))
    loader = torch.utils.data.DataLoader(dataset, batch_size=16, shuffle=False)
    _train(net, optimizer, loader)

    back = _round_trip({"net": net, "optimizer": optimizer, "loader": loader}, codec.notebook_defined(namespace))
    net2, optimizer2, loader2 = back["net"], back["optimizer"], back["loader"]
    assert type(net2).__name__ == "Net"  # sent by value (another process gets a new class: test_codec_backends.py)
    with torch.no_grad():
        assert torch.equal(net2(x), net(x))

    # One object per parameter: the module's, the optimizer's groups and its state keys.
    params2 = list(net2.parameters())
    assert all(a is b for a, b in zip(optimizer2.param_groups[0]["params"], params2, strict=True))
    assert set(map(id, optimizer2.state)) == set(map(id, params2))
    assert all(type(p) is torch.nn.Parameter and p.requires_grad for p in params2)
    assert int(optimizer2.state[params2[0]]["step"]) == 4

    assert all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(loader, loader2, strict=True)
    )  # the same batches, in the same order
    _train(net, optimizer, loader)
    _train(net2, optimizer2, loader2)  # the optimizer steps on from its state: the same weights as here
    assert int(optimizer2.state[params2[0]]["step"]) == 8
    for a, b in zip(net.parameters(), params2, strict=True):
        assert torch.allclose(a, b)


# Devices --------------------------------------------------------------------


def _recorded_as(monkeypatch, device: str) -> None:
    """The reduction records ``device`` as the tensor's, as a host with that GPU would."""
    reduce = codec._reduce_torch_tensor

    def on_device(tensor: Any) -> tuple[Any, ...]:
        rebuild, args, *rest = reduce(tensor)
        return (rebuild, (*args[:4], device, *args[5:]), *rest)

    monkeypatch.setattr(codec, "_reduce_torch_tensor", on_device)


def test_simulated_cuda_tensor_loads_on_the_cpu_here_with_a_note(monkeypatch) -> None:
    assert not torch.cuda.is_available()
    _recorded_as(monkeypatch, "cuda:0")
    weights = torch.nn.Parameter(torch.randn(3, 3))
    with codec.noting() as notes:
        back = _round_trip({"w": weights, "t": torch.ones(2)})
    assert back["w"].device.type == "cpu" and type(back["w"]) is torch.nn.Parameter
    assert torch.equal(back["w"].detach(), weights.detach())
    assert notes == ["tensors that were on cuda:0 on the host are on the CPU here: this kernel has no GPU"]
    with codec.noting() as later:
        _round_trip({"n": 1})
    assert later == []  # each result has its own notes


def test_simulated_cuda_input_on_a_host_without_gpu_is_worded_for_the_host(monkeypatch) -> None:
    _recorded_as(monkeypatch, "cuda:1")
    data, buffers = codec.dumps({"t": torch.ones(2)})
    with codec.noting() as notes:
        assert codec.loads(data, buffers, receiver="host")["t"].device.type == "cpu"
    assert notes == ["tensors that were on cuda:1 in the notebook are on the CPU on the host: the host has no GPU"]


def test_simulated_cuda_index_missing_here_maps_to_cuda_0(monkeypatch) -> None:
    _recorded_as(monkeypatch, "cuda:3")
    moved: list[Any] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, device: moved.append(device) or self)
    with codec.noting() as notes:
        _round_trip({"t": torch.ones(2)})
    assert moved == [torch.device("cuda", 0)]
    assert notes == ["tensors that were on cuda:3 on the host are on cuda:0 here: this kernel has 1 GPU"]


def test_a_failed_move_leaves_the_tensor_on_the_cpu_instead_of_failing_the_load(monkeypatch) -> None:
    _recorded_as(monkeypatch, "cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with codec.noting() as notes:
        back = _round_trip({"t": torch.ones(2)})  # this torch has no CUDA: .to("cuda:0") raises
    assert back["t"].device.type == "cpu"
    assert "are on the CPU here: moving them failed" in notes[0]


def test_notes_are_deduplicated() -> None:
    with codec.noting() as notes:
        codec._note("b")
        codec._note("a")
        codec._note("b")
    assert notes == ["b", "a"]


def test_a_threads_notes_stay_with_that_thread() -> None:
    """A background follower's loads (its own thread) never put notes into the running cell's panel."""
    import threading

    taken: list[list[str]] = []

    def follower() -> None:
        with codec.noting() as notes:
            codec._note("from the follower")
        taken.append(notes)

    with codec.noting() as cell:
        codec._note("from the cell")
        thread = threading.Thread(target=follower)
        thread.start()
        thread.join()
    assert taken == [["from the follower"]] and cell == ["from the cell"]


def test_notes_travel_with_the_values_they_came_from(monkeypatch) -> None:
    """Two results loaded one after the other in one thread: each carries its own notes, none the other's."""
    from remote_magic.project import payload

    _recorded_as(monkeypatch, "cuda:0")
    data, buffers = codec.dumps({"t": torch.ones(2)})
    moved = payload.unpack(data, [bytes(buf) for buf in buffers])
    plain = payload.unpack(*codec.dumps({"n": 1}))
    assert moved.notes == ["tensors that were on cuda:0 on the host are on the CPU here: this kernel has no GPU"]
    assert plain.notes == [] and plain == {"n": 1}


# Referenced modules ----------------------------------------------------------


def test_referenced_modules_name_the_local_modules_of_nested_values(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "mymod.py").write_text(
        "class Config:\n    def __init__(self):\n        self.rate = 0.1\n\ndef normalize(x):\n    return x\n"
    )
    (tmp_path / "helpers.py").write_text("def scale(x):\n    return 2 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import helpers
    import mymod

    namespace: dict[str, Any] = {"__name__": "__main__", "helpers": helpers}
    exec("def prepare(x):\n    return helpers.scale(x)\n", namespace)  # a notebook function using a local module
    modules: set[str] = set()
    codec.dumps(
        {"cfg": {"inner": [mymod.Config()]}, "fn": (mymod.normalize,), "prepare": namespace["prepare"]},
        referenced_modules=modules,
    )
    assert {"mymod", "helpers", "__main__"} <= modules
    assert codec.dumps({"x": 1})[0] == codec.dumps({"x": 1}, referenced_modules=None)[0]  # optional


def test_referenced_modules_see_the_custom_objects_of_a_keras_model(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "mylayers.py").write_text(
        textwrap.dedent(
            """
            import keras

            class Double(keras.layers.Layer):
                def call(self, x):
                    return 2 * x

            def my_loss(y_true, y_pred):
                return keras.ops.mean((y_true - y_pred) ** 2)

            def triple(x):
                return 3 * x
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import keras
    import mylayers

    layers = [keras.Input((3,)), mylayers.Double(), keras.layers.Lambda(mylayers.triple), keras.layers.Dense(1)]
    model = keras.Sequential(layers)
    model.compile(optimizer="adam", loss=mylayers.my_loss)
    modules: set[str] = set()
    data, buffers = codec.dumps({"wrapped": {"model": model}}, referenced_modules=modules)
    assert "mylayers" in modules
    back = codec.loads(data, buffers)["wrapped"]["model"]
    assert isinstance(back.layers[0], mylayers.Double)
    assert back.layers[1].function is mylayers.triple  # Keras saves a named function by its name only
    x = np.ones((2, 3), dtype=np.float32)
    assert np.array_equal(back.predict(x, verbose=0), model.predict(x, verbose=0))


def test_plain_values_import_neither_torch_nor_tensorflow() -> None:
    script = (
        "import sys, numpy as np\n"
        "from remote_magic.agent import codec\n"
        "modules = set()\n"
        "data, buffers = codec.dumps({'a': np.ones(10**6), 'b': [1, 'x', {2: 3.0}]}, referenced_modules=modules)\n"
        "codec.loads(data, buffers)\n"
        "print(sorted(m for m in ('torch', 'tensorflow', 'keras', 'jax') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1]
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# tf.data ---------------------------------------------------------------------


@pytest.fixture
def tf() -> Any:
    return pytest.importorskip("tensorflow")


def _xy(n: int = 100) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.random((n, 8), dtype=np.float32)
    return x, (x.sum(axis=1) > 4).astype("float32")


@pytest.mark.filterwarnings("ignore:`shuffle=True` was passed")  # Keras' note that a dataset shuffles itself
def test_a_dataset_round_trips_and_feeds_model_fit(tf) -> None:
    import keras

    x, y = _xy()
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
    with codec.noting() as notes:
        data, buffers = codec.dumps({"ds": dataset}, threshold=1024)
        assert len(buffers) == 1  # the saved folder, as one tar
        back = codec.loads(data, [bytes(b) for b in buffers])["ds"]
    assert back.element_spec == dataset.element_spec
    assert int(back.cardinality()) == 4
    for (bx, by), (ox, oy) in zip(back, dataset, strict=True):
        assert np.array_equal(bx.numpy(), ox.numpy()) and np.array_equal(by.numpy(), oy.numpy())

    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer="adam", loss="binary_crossentropy")
    history = model.fit(back, epochs=2, verbose=0)
    assert len(history.history["loss"]) == 2 and int(model.optimizer.iterations.numpy()) == 8
    assert notes == []


def test_a_shuffled_dataset_travels_with_a_note_that_its_order_is_frozen(tf) -> None:
    x, y = _xy()
    shuffled = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(100).batch(32)
    with codec.noting() as notes:
        back = _round_trip({"ds": shuffled})["ds"]
    first = np.concatenate([b.numpy() for _, b in back])
    second = np.concatenate([b.numpy() for _, b in back])
    assert np.array_equal(first, second) and sorted(first) == sorted(y)  # every element, one order
    assert notes == [
        "dataset 'ds' was saved with one shuffle order: on the host every epoch sees that same order; "
        "to reshuffle each epoch, shuffle inside the cell (e.g. ds = ds.unbatch().shuffle(1000).batch(32))"
    ]
    fixed = tf.data.Dataset.from_tensor_slices(x).shuffle(100, reshuffle_each_iteration=False)
    with codec.noting() as notes:
        _round_trip({"fixed": fixed})
    assert notes == []  # its order never changed anyway


def test_a_shuffle_inside_interleave_is_seen(tf) -> None:
    nested = tf.data.Dataset.range(3).interleave(lambda i: tf.data.Dataset.range(5).shuffle(5))
    with codec.noting() as notes:
        back = _round_trip({"nested": [nested]})["nested"][0]
    assert sorted(int(v) for v in back) == sorted(list(range(5)) * 3)
    assert notes == [
        "a tf.data dataset was saved with one shuffle order: on the host every epoch sees that same order; "
        "to reshuffle each epoch, shuffle inside the cell (e.g. ds = ds.unbatch().shuffle(1000).batch(32))"
    ]


def test_an_infinite_dataset_cannot_be_sent_and_the_message_says_build_it_in_the_cell(tf) -> None:
    endless = tf.data.Dataset.range(10).repeat().batch(2)
    with pytest.raises(payload.PayloadError) as caught:
        payload.pack({"ds": endless, "n": 3}, {})
    message = str(caught.value)
    assert message.startswith("variable 'ds' (")
    assert "dataset 'ds' is infinite (it repeats forever)" in message and "build it inside the cell" in message

    maybe = tf.data.Dataset.range(10).repeat().filter(lambda v: v > 3)
    with pytest.raises(payload.PayloadError, match="may be infinite"):
        payload.pack({"maybe": maybe}, {})
    finite = tf.data.Dataset.range(10).filter(lambda v: v > 3)  # unknown length, but no repeat: it travels
    assert [int(v) for v in _round_trip({"finite": finite})["finite"]] == list(range(4, 10))


def test_a_generator_dataset_cannot_be_sent_and_the_message_says_build_it_in_the_cell(tf) -> None:
    def numbers():
        yield from range(5)

    from_generator = tf.data.Dataset.from_generator(numbers, output_signature=tf.TensorSpec((), tf.int64))
    for value in (from_generator, from_generator.map(lambda v: v * 2).batch(2)):
        with pytest.raises(payload.PayloadError) as caught:
            payload.pack({"gen_ds": value}, {})
        assert "dataset 'gen_ds' built from a Python generator cannot be sent; build it inside the cell" in str(
            caught.value
        )


def test_a_loaded_dataset_reads_its_folder_until_the_process_exits_and_no_longer() -> None:
    script = (
        "import os\n"
        "os.environ['TF_CPP_MIN_LOG_LEVEL'] = '2'\n"
        "import tensorflow as tf\n"
        "from remote_magic.agent import codec\n"
        "data, buffers = codec.dumps({'ds': tf.data.Dataset.range(4)})\n"
        "back = codec.loads(data, buffers)['ds']\n"
        "folder, = codec._DATASET_FOLDERS\n"
        "assert [int(v) for v in back] == [0, 1, 2, 3] and os.listdir(folder)\n"
        "print(folder)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=180, cwd=Path(__file__).parents[1]
    )
    assert done.returncode == 0, done.stderr
    folder = done.stdout.strip().splitlines()[-1]
    assert "remote_magic-dataset-" in folder and not os.path.exists(folder)


def test_only_a_dataset_the_cell_trains_on_gets_the_shuffle_order_note(tf, ip, capsys) -> None:
    """Issue 20: the note fired for a dataset used only as ``validation_data=``, whose order does not matter."""
    from conftest import run

    setup = (
        "import numpy as np, tensorflow as tf, keras\n"
        "x = np.random.default_rng(0).random((64, 4), dtype=np.float32)\n"
        "y = (x.sum(axis=1) > 2).astype('float32')\n"
        "train_ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(64).batch(16)\n"
        "val_ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(64).batch(16)\n"
        "test_ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(64).batch(16)\n"
        "model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, activation='sigmoid')])\n"
        "model.compile(optimizer='adam', loss='binary_crossentropy')\n"
    )
    assert run(ip, setup).success
    capsys.readouterr()
    cell = (
        "%%remote_train\n"
        "history = model.fit(train_ds, validation_data=val_ds, epochs=1, verbose=0)\n"
        "score = model.evaluate(test_ds, verbose=0)\n"
    )
    assert run(ip, cell).success
    out = capsys.readouterr().out
    assert "dataset 'train_ds' was saved with one shuffle order" in out
    assert "'val_ds' was saved" not in out and "'test_ds' was saved" not in out
    assert len(ip.user_ns["history"].history["val_loss"]) == 1
