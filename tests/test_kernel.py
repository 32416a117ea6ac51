"""Interrupt and restart in real kernels: the trained model comes back either way."""

from __future__ import annotations

import os
import queue
import re
import time

import pytest
from conftest import MODEL_CELL, PYTHON
from kernel import Kernel
from notebooks import write_profile


@pytest.fixture
def kernel_env(sshd, tmp_path) -> dict[str, str]:
    """The environment of a kernel configured for the test sshd, as a user's ipython_config.py would."""
    write_profile(tmp_path / "ipython", ssh_config=str(sshd.ssh_config), hosts={sshd.alias: {"python": PYTHON}})
    return {**os.environ, "IPYTHONDIR": str(tmp_path / "ipython"), "REMOTE_MAGIC_PANEL": "text"}


@pytest.fixture
def kernel(kernel_env):
    k = Kernel(kernel_env)
    yield k
    k.shutdown()


LONG_FIT = """%%remote_train --host {host}
import time
class Slow(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        time.sleep(0.3)
history = model.fit(x_train, y_train, epochs=40, batch_size=32, verbose=0, callbacks=[Slow()])
"""


@pytest.mark.parametrize("host", ["local", "testhost"])
def test_interrupt_stops_training_gracefully_and_injects_the_model(kernel, host) -> None:
    reply, _ = kernel.execute("%load_ext remote_magic\n" + MODEL_CELL)
    assert reply["status"] == "ok"
    interrupted = []

    def interrupt_at_epoch_3(text: str) -> None:
        if not interrupted and "Epoch 3/40" in text:
            interrupted.append(True)
            kernel.interrupt()

    reply, text = kernel.execute(LONG_FIT.format(host=host), while_running=interrupt_at_epoch_3)
    job_id = re.search(r"job (\S+) ·", text).group(1)
    assert interrupted and reply["status"] == "ok", text
    stopped_at = int(re.search(r"stopped at epoch (\d+) of 40", text).group(1))
    assert 3 <= stopped_at < 40
    assert "injected: Slow, history (assigned); model (changed by the cell)" in text

    check = (
        "import numpy as np\n"
        "print('iterations', int(model.optimizer.iterations.numpy()))\n"
        "print('changed', not np.array_equal(model.get_weights()[0], weights_before[0]))\n"
        "print('epochs', len(history.history['loss']))\n"
    )
    reply, text = kernel.execute(check)
    iterations = int(re.search(r"iterations (\d+)", text).group(1))
    assert (stopped_at - 1) * 8 < iterations <= stopped_at * 8  # stopped within its last epoch, at a batch end
    assert "changed True" in text and f"epochs {stopped_at}" in text
    _, status_text = kernel.execute(f"%remote_status {job_id}")
    assert f"job {job_id} on host {host}: stopped" in status_text


def test_a_fresh_kernel_finds_the_job_and_attaches_to_it(kernel_env) -> None:
    first = Kernel(kernel_env)
    try:
        reply, _ = first.execute("%load_ext remote_magic\n" + MODEL_CELL)
        assert reply["status"] == "ok"
        reply, text = first.execute(
            "%%remote_train --host testhost --detach --name survives-restart\n"
            "history = model.fit(x_train, y_train, epochs=3, batch_size=32, verbose=0)\n"
        )
        job_id = re.search(r"job (\S+) submitted", text).group(1)
    finally:
        first.shutdown()

    second = Kernel(kernel_env)
    try:
        _, text = second.execute("%load_ext remote_magic\n%remote_status")
        row = next(line for line in text.splitlines() if job_id in line)
        assert row.startswith("testhost") and "survives-restart" in row
        reply, text = second.execute(f"%remote_attach {job_id}")
        assert reply["status"] == "ok", text
        assert [f"Epoch {i}/3" for i in (1, 2, 3)] == re.findall(r"Epoch \d/3", text)
        _, text = second.execute("print(int(model.optimizer.iterations.numpy()), len(history.history['loss']))")
        assert text.strip() == "24 3"
    finally:
        second.shutdown()


@pytest.fixture
def widget_kernel(kernel_env):
    k = Kernel({**kernel_env, "REMOTE_MAGIC_PANEL": "widget"})
    yield k
    k.shutdown()


def test_stop_button_works_while_the_cell_blocks(widget_kernel) -> None:
    kernel = widget_kernel
    reply, _ = kernel.execute("%load_ext remote_magic\n" + MODEL_CELL)
    assert reply["status"] == "ok"
    clicked = []

    # The panel's label shows "3/40"; the header and table update with each epoch.
    def watch(text: str) -> None:
        if not clicked and any(
            m["msg_type"] == "comm_msg" and m["content"].get("data", {}).get("state", {}).get("value") == "3/40"
            for m in kernel.messages
        ):
            clicked.append(True)
            kernel.click(kernel.button_comm("Stop"))

    msg_id = kernel.client.execute(LONG_FIT.format(host="local"))
    deadline = time.monotonic() + 120
    while not clicked and time.monotonic() < deadline:
        try:
            kernel.messages.append(kernel.client.get_iopub_msg(timeout=1))
        except queue.Empty:
            continue
        watch("")
    assert clicked, "the epoch label never reached 3/40"
    reply = kernel.client.get_shell_msg(timeout=120)
    assert reply["parent_header"]["msg_id"] == msg_id and reply["content"]["status"] == "ok"
    _, text = kernel.execute("print(len(history.history['loss']), int(model.optimizer.iterations.numpy()))")
    epochs, iterations = map(int, text.split())
    assert 3 <= epochs < 40 and (epochs - 1) * 8 < iterations <= epochs * 8


def test_detached_job_is_followed_in_the_background_and_injected(widget_kernel) -> None:
    kernel = widget_kernel
    reply, _ = kernel.execute("%load_ext remote_magic\n" + MODEL_CELL)
    reply, text = kernel.execute(
        "%%remote_train --detach\nhistory = model.fit(x_train, y_train, epochs=3, batch_size=32, verbose=0)\n"
    )
    assert reply["status"] == "ok" and "submitted to host local" in text
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        _, text = kernel.execute("print('history' in globals())")
        if text.strip() == "True":
            break
        time.sleep(0.5)
    assert text.strip() == "True"
    _, text = kernel.execute("print(len(history.history['loss']), int(model.optimizer.iterations.numpy()))")
    assert text.split() == ["3", "24"]
    finished = [
        m["content"]["data"]["text/plain"]
        for m in kernel.messages
        if m["msg_type"] == "update_display_data" and "text/plain" in m["content"].get("data", {})
    ]
    assert (
        finished
        and "injected: history (assigned); model (changed by the cell)" in finished[-1]
        and "Epoch 3/3" in finished[-1]
    )


SLOW_BATCHES = """%%remote_train
import time
class SlowBatches(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        time.sleep(0.4 if self.model.stop_training else 0.05)
history = model.fit(x_train, y_train, epochs=40, batch_size=32, verbose=0, callbacks=[SlowBatches()])
"""


def test_a_second_interrupt_cancels_and_falls_back_to_the_checkpoint(kernel) -> None:
    reply, _ = kernel.execute("%load_ext remote_magic\n" + MODEL_CELL)
    assert reply["status"] == "ok"
    interrupts = []

    def interrupt_twice(text: str) -> None:
        if not interrupts and "Epoch 2/40" in text:
            interrupts.append(1)
            kernel.interrupt()
        elif len(interrupts) == 1 and "interrupted: the host stops training" in text:
            interrupts.append(2)
            kernel.interrupt()

    reply, text = kernel.execute(SLOW_BATCHES, while_running=interrupt_twice)
    assert len(interrupts) == 2, text
    assert reply["status"] == "ok", text
    epoch = int(re.search(r"cancelled; injected model from the checkpoint of epoch (\d+) of 40", text).group(1))
    assert epoch >= 2
    _, text = kernel.execute("print(int(model.optimizer.iterations.numpy()), 'history' in globals())")
    assert text.split() == [str(epoch * 8), "False"]
