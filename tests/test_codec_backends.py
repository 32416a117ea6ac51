"""Round trips between two processes, as between notebook and host: Keras on the jax and torch backends, PyTorch.

The Keras backend is fixed when keras is first imported, so each side runs in
its own subprocess with ``KERAS_BACKEND`` set; the class a model uses is
defined in that process's ``__main__``, as in a notebook, so the loading
process has only what the pickle carries.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Writes the pickle and its buffers to the folder given, and what the loading side checks against.
SAVE = """
import sys
from pathlib import Path
import numpy as np
from remote_magic.agent import codec


def save(folder, values, namespace):
    data, buffers = codec.dumps(values, codec.notebook_defined(namespace), threshold=1024)
    folder = Path(folder)
    (folder / "data.pkl").write_bytes(data)
    for i, buf in enumerate(buffers):
        (folder / f"buffer{i}").write_bytes(buf)
    return len(buffers)


def load(folder):
    folder = Path(folder)
    buffers = sorted(folder.glob("buffer*"), key=lambda p: int(p.name[6:]))
    return codec.loads((folder / "data.pkl").read_bytes(), [bytearray(p.read_bytes()) for p in buffers])
"""

KERAS_DUMP = """
import keras

class Scale(keras.layers.Layer):
    def __init__(self, factor=2.0, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor
        self.bias = self.add_weight(shape=(), initializer="zeros", name="bias")

    def call(self, x):
        return x * self.factor + self.bias

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}


def squared_error(y_true, y_pred):
    return keras.ops.mean((y_true - y_pred) ** 2)


rng = np.random.default_rng(0)
x = rng.random((64, 4), dtype=np.float32)
y = x.sum(axis=1, keepdims=True)
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"), Scale(3.0), keras.layers.Dense(1)])
model.compile(optimizer="adam", loss=squared_error)
model.fit(x, y, epochs=1, batch_size=16, verbose=0)
assert save(sys.argv[1], {"model": model}, globals()) >= 1
np.savez(Path(sys.argv[1]) / "expected.npz", x=x, y=y, prediction=model.predict(x, verbose=0), *model.get_weights())
print(keras.backend.backend())
"""

KERAS_LOAD = """
import keras

model = load(sys.argv[1])["model"]
expected = np.load(Path(sys.argv[1]) / "expected.npz")
weights = [expected[f"arr_{i}"] for i in range(len(model.get_weights()))]
assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), weights, strict=True))
scale = model.layers[1]
assert type(scale).__name__ == "Scale" and type(scale).__module__ == "__main__" and scale.factor == 3.0
assert np.allclose(model.predict(expected["x"], verbose=0), expected["prediction"], atol=1e-6)
assert int(model.optimizer.iterations.numpy()) == 4  # 64 samples / 16 per batch: the optimizer state came too
model.fit(expected["x"], expected["y"], epochs=1, batch_size=16, verbose=0)
assert int(model.optimizer.iterations.numpy()) == 8
print(keras.backend.backend())
"""

TORCH_DUMP = """
import torch

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = torch.nn.Linear(4, 8)
        self.out = torch.nn.Linear(8, 1)

    def forward(self, x):
        return self.out(torch.relu(self.hidden(x)))


torch.manual_seed(0)
x = torch.randn(64, 4)
net = Net()
optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=16)
for xb, yb in loader:
    optimizer.zero_grad()
    torch.nn.functional.mse_loss(net(xb), yb).backward()
    optimizer.step()
save(sys.argv[1], {"net": net, "optimizer": optimizer, "loader": loader}, globals())
torch.save({"x": x, "prediction": net(x).detach()}, Path(sys.argv[1]) / "expected.pt")
print("saved")
"""

TORCH_LOAD = """
import torch

values = load(sys.argv[1])
net, optimizer, loader = values["net"], values["optimizer"], values["loader"]
expected = torch.load(Path(sys.argv[1]) / "expected.pt")
assert type(net).__name__ == "Net" and type(net).__module__ == "__main__"
assert torch.equal(net(expected["x"]).detach(), expected["prediction"])
assert optimizer.param_groups[0]["params"][0] is net.hidden.weight
assert torch.equal(torch.cat([xb for xb, _ in loader]), expected["x"])
for xb, yb in loader:
    optimizer.zero_grad()
    torch.nn.functional.mse_loss(net(xb), yb).backward()
    optimizer.step()
assert int(optimizer.state[net.hidden.weight]["step"]) == 8
print("torch", torch.__version__)
"""


def _run(script: str, folder: Path, backend: str) -> str:
    path = folder / "script.py"
    path.write_text(textwrap.dedent(SAVE) + textwrap.dedent(script))
    env = {
        **os.environ,
        "KERAS_BACKEND": backend,
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(
        [sys.executable, str(path), str(folder)], env=env, capture_output=True, text=True, timeout=300, cwd=folder
    )
    assert done.returncode == 0, f"{backend}:\n{done.stdout}\n{done.stderr[-4000:]}"
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_a_keras_model_with_a_notebook_layer_and_loss_round_trips_on_the_backend(backend, tmp_path: Path) -> None:
    pytest.importorskip(backend)
    assert _run(KERAS_DUMP, tmp_path, backend) == backend
    (tmp_path / "script.py").unlink()
    assert _run(KERAS_LOAD, tmp_path, backend) == backend


def test_a_notebook_torch_module_optimizer_and_loader_load_in_a_process_that_never_defined_them(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    assert _run(TORCH_DUMP, tmp_path, "torch") == "saved"
    assert _run(TORCH_LOAD, tmp_path, "torch").startswith("torch ")
