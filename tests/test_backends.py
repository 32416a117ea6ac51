"""Keras on the jax and torch backends, PyTorch loops and tf.data datasets, end to end.

Keras fixes its backend when it is first imported, so the jax and torch
backends run in real Jupyter kernels started with ``KERAS_BACKEND``; the
shell of the other tests is on tensorflow and asks for another backend with
``--backend``.  Each test stops the kernels it starts and the warm runners
its jobs leave behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import MODEL_CELL, PYTHON, run
from kernel import Kernel
from notebooks import write_profile

from remote_magic.agent import codec
from remote_magic.agent.launch import warm
from remote_magic.transport.deploy import agent_hash

torch = pytest.importorskip("torch")

# conftest's throw-away folder: the job roots of the local host and of the test sshd are under it.
TESTS_ROOT = str(Path(os.environ["REMOTE_MAGIC_DATA_DIR"]).parent)


def _agent_runners() -> set[int]:
    """Job runners and warm runners working in a job root of the tests."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if ("warm-runner" in argv or "run-job" in argv) and any(a.startswith(TESTS_ROOT) for a in argv):
            found.add(int(entry))
    return found


@pytest.fixture(autouse=True)
def _stop_the_runners_the_test_started():
    """A job's runner starts the warm runner of the next job as it ends: the test ends those it caused.

    A runner still in a job's folder is winding that job up and exits by itself; the others wait for a job.
    """
    before = _agent_runners()
    yield
    quiet, deadline = 0, time.monotonic() + 30
    while quiet < 3 and time.monotonic() < deadline:
        started = _agent_runners() - before
        quiet = 0 if started else quiet + 1
        for pid in started:
            if not _in_a_job_folder(pid) or deadline - time.monotonic() < 5:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        time.sleep(0.3)


def _in_a_job_folder(pid: int) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/cwd").startswith(TESTS_ROOT)
    except OSError:
        return False


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


def _epoch_lines(text: str) -> list[str]:
    """The panel's epoch rows (step rows for a remote_log loop), without the ETA that depends on timing."""
    return [line.split(" - ETA ")[0] for line in text.splitlines() if line.startswith(("Epoch ", "Step "))]


# ---------------------------------------------------------------- Keras on jax and torch, in real kernels

KERNEL_SETUP = """%load_ext remote_magic
%config RemoteMagics.panel = 'text'
import numpy as np
import keras


class Gain(keras.layers.Layer):
    def build(self, input_shape):
        self.gain = self.add_weight(shape=(input_shape[-1],), initializer="ones", name="gain")

    def call(self, x):
        return x * self.gain


rng = np.random.default_rng(0)
x_train = rng.random((128, 8), dtype=np.float32)
y_train = (x_train.sum(axis=1) > 4).astype("float32")
model = keras.Sequential(
    [keras.Input((8,)), Gain(), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1, activation="sigmoid")]
)
model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
weights_before = [w.copy() for w in model.get_weights()]
"""

KERNEL_FIT = """%%remote_train --host {host}
inside = keras.backend.backend()
history = model.fit(x_train, y_train, epochs=2, batch_size=32, verbose=0)
"""

KERNEL_CHECK = """
print("kernel", keras.backend.backend())
print("inside", inside)
print("changed", all(not np.array_equal(a, b) for a, b in zip(model.get_weights(), weights_before)))
print("notebook layer", type(model.layers[0]) is Gain)
print("iterations", int(keras.ops.convert_to_numpy(model.optimizer.iterations)))
print("prediction", model.predict(x_train[:3], verbose=0).shape)
print("history", len(history.history["loss"]))
"""


@pytest.fixture
def start_kernel(sshd, tmp_path):
    """Starts real kernels on a Keras backend, configured for the test sshd as in test_kernel.py; stops them after."""
    write_profile(tmp_path / "ipython", ssh_config=str(sshd.ssh_config), hosts={sshd.alias: {"python": PYTHON}})
    started: list[Kernel] = []

    def start(backend: str) -> Kernel:
        env = {**os.environ, "IPYTHONDIR": str(tmp_path / "ipython"), "REMOTE_MAGIC_PANEL": "text"}
        started.append(Kernel({**env, "KERAS_BACKEND": backend}))
        return started[-1]

    yield start
    for kernel in started:
        kernel.shutdown()


# The jax kernel runs its job in a subprocess here, the torch kernel over SSH (a host without KERAS_BACKEND).
@pytest.mark.parametrize(("backend", "host"), [("jax", "local"), ("torch", "testhost")])
def test_keras_on_the_kernels_backend_trains_remotely_and_comes_back(start_kernel, backend, host) -> None:
    pytest.importorskip(backend)
    kernel = start_kernel(backend)
    reply, text = kernel.execute(KERNEL_SETUP)
    assert reply["status"] == "ok", text

    reply, text = kernel.execute(KERNEL_FIT.format(host=host))
    assert reply["status"] == "ok", text
    assert [line.split(" - ")[0] for line in _epoch_lines(text)] == ["Epoch 1/2", "Epoch 2/2"]
    assert all(" - accuracy: " in line and " - loss: " in line for line in _epoch_lines(text))
    assert f"host {host}" in text and "injected: inside, history (assigned); model (changed by the cell)" in text

    reply, text = kernel.execute(KERNEL_CHECK)
    assert reply["status"] == "ok", text
    assert text.splitlines() == [
        f"kernel {backend}",
        f"inside {backend}",  # the job ran on the kernel's backend, not the host's default (tensorflow)
        "changed True",
        "notebook layer True",
        "iterations 8",  # 128 samples / 32 per batch, 2 epochs
        "prediction (3, 1)",
        "history 2",
    ]


# ---------------------------------------------------------------- --backend, and warm runners per backend


def _magics(ip):  # type: ignore[no-untyped-def]
    return ip.magics_manager.registry["RemoteMagics"]


def _job_started(ip, host: str, out: str) -> dict:  # type: ignore[no-untyped-def]
    """The started event of the last job the panel text shows: its runner's pid, and whether it was warm."""
    job_id = re.findall(r"job (\S+) ·", out)[-1]
    return next(e for e in _magics(ip)._client(host).events(job_id) if e["type"] == "started")


def _next_warm_runner(ip, backend: str, after_job: dict) -> int:  # type: ignore[no-untyped-def]
    """The pid of the warm runner waiting for the next local job on ``backend``, once ``after_job`` has ended.

    The runner of a job starts (or replaces) that warm runner as it exits; waiting for the exit makes the
    runner found here the one the next job of that backend gets.
    """
    deadline = time.monotonic() + 90
    while not _gone(after_job["pid"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    key = warm.RunnerKind(PYTHON, backend).key(agent_hash())
    folder = Path(_magics(ip)._client("local").transport.root) / "warm"
    while time.monotonic() < deadline:
        for ready in folder.glob(f"{key}-*.ready"):
            try:
                pid = json.loads(ready.read_text())["pid"]
            except (OSError, ValueError):
                continue
            if not _gone(pid):
                return pid
        time.sleep(0.2)
    pytest.fail(f"no warm runner for {backend} became ready")


BACKEND_CELL = "import keras\nb = keras.backend.backend()\n"


def test_backend_option_overrides_the_kernels_and_warm_runners_never_mix_backends(ip, capsys) -> None:
    pytest.importorskip("jax")
    assert os.environ["KERAS_BACKEND"] == "tensorflow"  # the shell's backend (conftest)

    assert run(ip, "%%remote_train --backend jax\n" + BACKEND_CELL).success
    assert ip.user_ns["b"] == "jax"
    jax_runner = _next_warm_runner(ip, "jax", _job_started(ip, "local", capsys.readouterr().out))

    assert run(ip, "%%remote_train\n" + BACKEND_CELL).success
    assert ip.user_ns["b"] == "tensorflow"
    first = _job_started(ip, "local", capsys.readouterr().out)
    assert first.get("warm_runner") != jax_runner  # a tensorflow job never gets the waiting jax runner
    tensorflow_runner = _next_warm_runner(ip, "tensorflow", first)

    assert run(ip, "%%remote_train\n" + BACKEND_CELL).success
    assert ip.user_ns["b"] == "tensorflow"
    second = _job_started(ip, "local", capsys.readouterr().out)
    assert second["warm"] and second["warm_runner"] == tensorflow_runner  # served by the tensorflow warm runner

    assert run(ip, "%%remote_train --backend jax\n" + BACKEND_CELL).success
    assert ip.user_ns["b"] == "jax"
    last = _job_started(ip, "local", capsys.readouterr().out)
    assert last["warm"] and last["warm_runner"] == jax_runner  # the jax runner waited through both tensorflow jobs


# ---------------------------------------------------------------- a PyTorch loop with remote_log

TORCH_SETUP = """
import torch
from torch.utils.data import DataLoader, TensorDataset

torch.manual_seed(0)
x = torch.randn(128, 4)
y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1
net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
loader = DataLoader(TensorDataset(x, y), batch_size=16)
before = [p.detach().clone() for p in net.parameters()]
"""

TORCH_LOOP = """%%remote_train --host testhost{out}
losses = []
for epoch in range(3):
    net.train()
    seen = 0.0
    for xb, yb in loader:
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(net(xb), yb)
        loss.backward()
        optimizer.step()
        seen += loss.item() * len(xb)
    losses.append(seen / len(loader.dataset))
    remote_log(loss=losses[-1], total=3)
"""


def _check_torch_training(ip, out: str) -> None:  # type: ignore[no-untyped-def]
    rows = _epoch_lines(out)
    assert [row.split(" - ")[0] for row in rows] == ["Step 1/3", "Step 2/3", "Step 3/3"]
    losses = ip.user_ns["losses"]
    assert rows == [f"Step {i}/3 - loss: {loss:.4f}" for i, loss in enumerate(losses, 1)]
    assert losses[2] < losses[0]

    net, optimizer = ip.user_ns["net"], ip.user_ns["optimizer"]
    params = list(net.parameters())
    assert all(not torch.equal(p.detach(), b) for p, b in zip(params, ip.user_ns["before"], strict=True))
    with torch.no_grad():
        assert net(ip.user_ns["x"][:5]).shape == (5, 1)
    # One object per parameter: the optimizer steps the injected net, with its state.
    assert all(a is b for a, b in zip(optimizer.param_groups[0]["params"], params, strict=True))
    assert set(map(id, optimizer.state)) == set(map(id, params))
    assert int(optimizer.state[params[0]]["step"]) == 3 * 8  # 128 samples / 16 per batch, 3 epochs


def test_a_pytorch_loop_with_remote_log_brings_the_module_and_optimizer_back(ip, capsys) -> None:
    assert run(ip, TORCH_SETUP).success
    capsys.readouterr()
    result = run(ip, TORCH_LOOP.format(out=" --out net,optimizer,losses"))
    assert result.success, result.error_in_exec
    _check_torch_training(ip, capsys.readouterr().out)


def test_a_pytorch_loop_brings_back_the_optimizer_it_stepped_and_its_module_without_out(ip, capsys) -> None:
    """No --out and no net.train(): optimizer.step() marks the optimizer, and the net it steps comes with it."""
    assert run(ip, TORCH_SETUP).success
    stale = ip.user_ns["optimizer"], ip.user_ns["net"]
    capsys.readouterr()
    result = run(ip, TORCH_LOOP.format(out="").replace("    net.train()\n", ""))
    assert result.success, result.error_in_exec
    out = capsys.readouterr().out
    assert ip.user_ns["optimizer"] is not stale[0] and ip.user_ns["net"] is not stale[1]
    _check_torch_training(ip, out)


# ---------------------------------------------------------------- tf.data datasets built in an earlier cell

DATASET_CELL = """
import tensorflow as tf
ds = tf.data.Dataset.from_tensor_slices((x_train, y_train)).shuffle(64).batch(16)
"""


def test_a_tf_data_dataset_from_an_earlier_cell_trains_on_the_host(ip, capsys) -> None:
    assert run(ip, MODEL_CELL + DATASET_CELL).success
    capsys.readouterr()
    result = run(ip, "%%remote_train --host testhost\nhistory = model.fit(ds, epochs=2, verbose=0)\n")
    assert result.success, result.error_in_exec
    out = capsys.readouterr().out

    model = ip.user_ns["model"]
    assert all(not np.array_equal(a, b) for a, b in zip(model.get_weights(), ip.user_ns["weights_before"], strict=True))
    assert int(model.optimizer.iterations.numpy()) == 2 * 16  # 256 samples / 16 per batch, 2 epochs
    assert [line.split(" - ")[0] for line in _epoch_lines(out)] == ["Epoch 1/2", "Epoch 2/2"]
    assert (
        "[remote_train] dataset 'ds' was saved with one shuffle order: on the host every epoch sees that same "
        "order; to reshuffle each epoch, shuffle inside the cell" in out
    )


def test_an_infinite_dataset_is_refused_before_anything_is_sent(ip, capsys) -> None:
    assert run(ip, MODEL_CELL + DATASET_CELL + "forever = ds.repeat()\n").success
    client = _magics(ip)._client("testhost")
    jobs_before, sent_before = len(client.status()), client.bytes_sent
    result = run(ip, "%%remote_train --host testhost\nhistory = model.fit(forever, epochs=1, steps_per_epoch=4)\n")
    message = str(result.error_in_exec)
    assert "variable 'forever'" in message and "is infinite (it repeats forever)" in message, message
    assert "build it inside the cell" in message
    assert client.bytes_sent == sent_before and len(client.status()) == jobs_before
    assert "history" not in ip.user_ns
    assert "[remote_train] host" not in capsys.readouterr().out  # no job, no panel


# ---------------------------------------------------------------- tensors on a GPU, simulated


def _recorded_as(monkeypatch, device: str) -> None:  # type: ignore[no-untyped-def]
    """This kernel records its tensors as on ``device``, as a kernel with that GPU would (see test_codec_data.py)."""
    reduce = codec._reduce_torch_tensor

    def on_device(tensor):  # type: ignore[no-untyped-def]
        rebuild, args, *rest = reduce(tensor)
        return (rebuild, (*args[:4], device, *args[5:]), *rest)

    monkeypatch.setattr(codec, "_reduce_torch_tensor", on_device)


# The job's side of the simulation: the runner's codec records the tensors it sends back as on cuda:0.
CUDA_CELL = """%%remote_train --out weights,arrived_on,arrived
import sys
import torch

host_codec = sys.modules["remote_magic.agent.codec"]
host_reduce = host_codec._reduce_torch_tensor


def on_cuda(tensor):
    rebuild, args, *rest = host_reduce(tensor)
    return (rebuild, (*args[:4], "cuda:0", *args[5:]), *rest)


host_codec._reduce_torch_tensor = on_cuda
arrived_on, arrived = str(sent.device), sent * 1
weights = torch.nn.Parameter(torch.arange(6.0).reshape(2, 3))
"""


def test_tensors_on_a_gpu_on_either_side_arrive_on_the_cpu_with_a_note(ip, monkeypatch, capsys) -> None:
    assert not torch.cuda.is_available()
    ip.user_ns["sent"] = torch.arange(4.0)
    _recorded_as(monkeypatch, "cuda:1")
    result = run(ip, CUDA_CELL)
    assert result.success, result.error_in_exec
    out = capsys.readouterr().out

    assert ip.user_ns["arrived_on"] == "cpu" and torch.equal(ip.user_ns["arrived"], torch.arange(4.0))
    weights = ip.user_ns["weights"]
    assert type(weights) is torch.nn.Parameter and weights.device.type == "cpu"
    assert torch.equal(weights.detach(), torch.arange(6.0).reshape(2, 3))
    assert (
        "[remote_train] note: tensors that were on cuda:1 in the notebook are on the CPU on the host: "
        "the host has no GPU\n" in out
    )
    assert "[remote_train] tensors that were on cuda:0 on the host are on the CPU here: this kernel has no GPU\n" in out
