"""What comes back is decided by content: tutorials' cell structures, shared objects, the kernel's own arrays.

Real IPython shell, real Keras on TensorFlow CPU, real PyTorch CPU, the embedded ``local`` host.
"""

from __future__ import annotations

import mmap
import os

import numpy as np
import pytest
from conftest import run

from remote_magic.agent import changes
from remote_magic.agent import digest as digests

torch = pytest.importorskip("torch")


def _injected_line(out: str) -> str:
    return next(line for line in out.splitlines() if "injected:" in line)


QUICKSTART_SETUP = """
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

torch.manual_seed(0)
images = torch.rand(256, 1, 28, 28)
labels = torch.randint(0, 10, (256,))
train_dataloader = DataLoader(TensorDataset(images[:192], labels[:192]), batch_size=64)
test_dataloader = DataLoader(TensorDataset(images[192:], labels[192:]), batch_size=64)
device = "cpu"

class NeuralNetwork(nn.Module):
    def __init__(self):
        super().__init__()
        self.flatten = nn.Flatten()
        self.linear_relu_stack = nn.Sequential(nn.Linear(28 * 28, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        return self.linear_relu_stack(self.flatten(x))

model = NeuralNetwork().to(device)
loss_fn = nn.CrossEntropyLoss()
optimizer = torch.optim.SGD(model.parameters(), lr=1e-1)
"""

QUICKSTART_FUNCTIONS = """
def train(dataloader, model, loss_fn, optimizer):
    model.train()
    for X, y in dataloader:
        loss = loss_fn(model(X), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

def test(dataloader, model, loss_fn):
    model.eval()
    correct = 0
    with torch.no_grad():
        for X, y in dataloader:
            correct += (model(X).argmax(1) == y).type(torch.float).sum().item()
    print(f"Test Error: Accuracy: {100 * correct / len(dataloader.dataset):>0.1f}%")

before = [p.detach().clone() for p in model.parameters()]
loader_before = train_dataloader
epochs = 3
"""

QUICKSTART_CELL = """%%remote_train
for t in range(epochs):
    print(f"Epoch {t+1}")
    train(train_dataloader, model, loss_fn, optimizer)
    test(test_dataloader, model, loss_fn)
print("Done!")
"""


def test_pytorch_quickstart_trained_in_notebook_functions_comes_back(ip, capsys) -> None:
    """The PyTorch Quickstart's own cells: ``model`` and ``optimizer`` change only inside ``train``."""
    for cell in (QUICKSTART_SETUP, QUICKSTART_FUNCTIONS):
        assert run(ip, cell).success
    capsys.readouterr()
    assert run(ip, QUICKSTART_CELL).success
    out = capsys.readouterr().out
    assert out.count("Test Error") == 3 and "Done!" in out
    line = _injected_line(out)
    assert "model, optimizer (changed by the cell)" in line, line
    assert "train_dataloader" not in line and "loss_fn" not in line and "train," not in line
    model, optimizer = ip.user_ns["model"], ip.user_ns["optimizer"]
    params = list(model.parameters())
    assert any(not torch.equal(p.detach(), b) for p, b in zip(params, ip.user_ns["before"], strict=True))
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    # The optimizer steps the injected model: one object per parameter.
    assert all(a is b for a, b in zip(optimizer.param_groups[0]["params"], params, strict=True))
    assert ip.user_ns["train_dataloader"] is ip.user_ns["loader_before"]  # unchanged: not sent back
    # The notebook's own function is the kernel's still (a copy would read a private copy of its globals).
    assert ip.user_ns["train"].__globals__ is ip.user_ns


KERAS_HELPER = """
import numpy as np
import keras

rng = np.random.default_rng(1)
x = rng.random((128, 4), dtype=np.float32)
y = (x.sum(axis=1) > 2).astype("float32")
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4, activation="relu"), keras.layers.Dense(1)])
model.compile(optimizer="adam", loss="mse")
weights_before = [w.copy() for w in model.get_weights()]
x_before, settings = x, {"epochs": 2, "tags": {"alpha", "beta", "gamma", "delta"}}

def run(m, x, y):
    m.fit(x, y, epochs=settings["epochs"], verbose=0)
"""


def test_keras_trained_through_a_helper_function_comes_back_and_unchanged_inputs_stay(ip, capsys) -> None:
    assert run(ip, KERAS_HELPER).success
    settings = ip.user_ns["settings"]
    capsys.readouterr()
    assert run(ip, "%%remote_train\nrun(model, x, y)\n").success
    line = _injected_line(capsys.readouterr().out)
    assert line.endswith("injected: model (changed by the cell)"), line
    model = ip.user_ns["model"]
    assert any(not np.array_equal(a, b) for a, b in zip(model.get_weights(), ip.user_ns["weights_before"], strict=True))
    assert model.predict(ip.user_ns["x"][:3], verbose=0).shape == (3, 1)
    # x, y and a dict holding a set of strings were read, not changed: the kernel keeps its own objects.
    assert ip.user_ns["x"] is ip.user_ns["x_before"] and ip.user_ns["settings"] is settings


def test_an_input_changed_in_place_comes_back_and_what_shares_it_stays_shared(ip, capsys) -> None:
    setup = """
cfg = {"lr": 0.1}
owner = {"name": "me"}
run_info = {"cfg": cfg, "owner": owner}
def bump(d):
    d["lr"] *= 2
"""
    assert run(ip, setup).success
    capsys.readouterr()
    assert run(ip, "%%remote_train\nbump(cfg)\nby = owner\nkeys = list(run_info)\n").success
    line = _injected_line(capsys.readouterr().out)
    assert line.endswith(
        "injected: by, keys (assigned); cfg, run_info (changed by the cell); owner (held by what came back)"
    ), line
    ns = ip.user_ns
    assert ns["cfg"] == {"lr": 0.2} and ns["run_info"]["cfg"] is ns["cfg"]
    assert ns["by"] is ns["owner"] is ns["run_info"]["owner"]  # one object, as in the cell


def test_out_brings_back_exactly_what_it_names(ip, capsys) -> None:
    assert run(ip, "a = [1]\nb = [2]\ndef grow(v):\n    v.append(0)\n").success
    capsys.readouterr()
    assert run(ip, "%%remote_train --out a\ngrow(a)\ngrow(b)\nc = 3\n").success
    assert _injected_line(capsys.readouterr().out).endswith("injected: a (--out)")
    assert ip.user_ns["a"] == [1, 0] and ip.user_ns["b"] == [2] and "c" not in ip.user_ns


TABLE_MODEL = """
import numpy as np
import keras

TABLE = np.random.default_rng(0).random(25_000_000)  # 200 MB that the loss reads
def table_loss(y_true, y_pred):
    return keras.ops.mean(keras.ops.square(y_true - y_pred)) + float(TABLE[0]) * 0.0

model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
model.compile(optimizer="sgd", loss=table_loss)
x = np.random.default_rng(2).random((64, 4), dtype=np.float32)
y = x.sum(axis=1, keepdims=True)
"""


def test_a_200_mb_global_read_by_a_custom_loss_is_not_downloaded_back(ip, capsys) -> None:
    """The model carries its loss by value, the loss its global: the host sends it back under the digest
    the kernel gave it, and the kernel reads it from its own array instead of the wire."""
    assert run(ip, TABLE_MODEL).success
    client = ip.magics_manager.registry["RemoteMagics"]._client("local")
    received = client.bytes_received
    assert run(ip, "%%remote_train\nmodel.fit(x, y, epochs=2, verbose=0)\n").success
    assert _injected_line(capsys.readouterr().out).endswith("injected: model (changed by the cell)")
    assert client.bytes_received - received < 5_000_000  # the model and the pickle: not the 200 MB
    loss = ip.user_ns["model"].loss
    assert float(loss(np.zeros((1, 1)), np.ones((1, 1)))) == pytest.approx(1.0)
    assert np.shares_memory(loss.__globals__["TABLE"], ip.user_ns["TABLE"])  # no second copy in memory


def test_an_equal_copy_made_on_the_host_is_not_downloaded_and_is_its_own_array(ip, capsys) -> None:
    assert run(ip, "import numpy as np\nx = np.arange(1_000_000, dtype=np.float64)\n").success
    client = ip.magics_manager.registry["RemoteMagics"]._client("local")
    received = client.bytes_received
    assert run(ip, "%%remote_train\ny = x.copy()\n").success
    assert client.bytes_received - received < 1_000_000  # read from the kernel's own x, not the wire
    x, y = ip.user_ns["x"], ip.user_ns["y"]
    assert np.array_equal(x, y) and not np.shares_memory(x, y)  # a copy on the host is a copy here
    x[0] = 123.0
    assert y[0] == 0.0


def test_an_array_changed_here_since_it_was_sent_is_not_taken_for_the_host_s_output(ip, capsys) -> None:
    assert run(ip, "import numpy as np\nx = np.arange(1_000_000, dtype=np.float64)\n").success
    assert run(ip, "%%remote_train\nn = len(x)\n").success  # x went to the host
    assert run(ip, "x[:] = 0\n").success  # and changed here since
    assert run(ip, "%%remote_train\nimport numpy as np\ny = np.arange(1_000_000, dtype=np.float64)\n").success
    assert ip.user_ns["y"][5] == 5.0 and not np.shares_memory(ip.user_ns["x"], ip.user_ns["y"])


# ---------------------------------------------------------------- changes.py on its own


def _mapped_blob(tmp_path, data: bytes) -> tuple[mmap.mmap, str]:
    path = tmp_path / "blob"
    path.write_bytes(data)
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), len(data), flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    return mapped, digests.of(data)


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux /proc")
def test_an_unwritten_mapped_array_is_known_by_its_blob_and_a_write_is_seen(tmp_path, monkeypatch) -> None:
    data = np.arange(1 << 20, dtype=np.float64).tobytes()  # 8 MiB
    mapped, name = _mapped_blob(tmp_path, data)
    array = np.frombuffer(mapped, dtype=np.float64)
    blobs = changes.Blobs.of([mapped], [name], [str(tmp_path / "blob")])
    before = changes.fingerprints({"a": array}, ["a"], blobs)
    hashed: list[int] = []
    real_of = digests.of
    monkeypatch.setattr(changes.digests, "of", lambda data: hashed.append(memoryview(data).nbytes) or real_of(data))
    assert changes.changed_inputs(before, {"a": array}, blobs).changed == []
    assert (1 << 23) not in hashed  # told by the mapping, not by reading 8 MiB
    array[5] = -1.0  # a private copy of one page: the mapping is written now
    assert changes.changed_inputs(before, {"a": array}, blobs).changed == ["a"]
    array[5] = 5.0  # the same bytes again: hashed, and unchanged
    assert changes.changed_inputs(before, {"a": array}, blobs).changed == []
    assert (1 << 23) in hashed
    del array
    mapped.close()


@pytest.mark.skipif(not hasattr(mmap, "MADV_DONTFORK"), reason="needs Linux madvise")
def test_a_write_to_any_part_of_a_mapping_split_in_two_is_seen(tmp_path) -> None:
    data = np.zeros(1 << 20, dtype=np.float64).tobytes()
    mapped, name = _mapped_blob(tmp_path, data)
    mapped.madvise(mmap.MADV_DONTFORK, 0, 4 << 20)  # the kernel splits the mapping in two here
    array = np.frombuffer(mapped, dtype=np.float64)
    blobs = changes.Blobs.of([mapped], [name], [str(tmp_path / "blob")])
    before = changes.fingerprints({"a": array}, ["a"], blobs)
    assert changes.changed_inputs(before, {"a": array}, blobs).changed == []
    array[-1] = 1.0  # in the second part
    assert changes.changed_inputs(before, {"a": array}, blobs).changed == ["a"]
    del array
    mapped.close()


def test_an_input_that_cannot_be_told_is_named_with_the_fix() -> None:
    class Odd:
        def __reduce__(self):
            raise RuntimeError("no pickling here")

    before = changes.fingerprints({"odd": Odd()}, ["odd"], changes.Blobs())
    unknown = changes.changed_inputs(before, {"odd": Odd()}, changes.Blobs()).unknown
    assert list(unknown) == ["odd"] and "no pickling here" in unknown["odd"]
