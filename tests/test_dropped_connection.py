"""A dropped SSH link mid-training: the client reconnects and every epoch arrives exactly once."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from conftest import MODEL_CELL, run

from remote_magic.agent.jobs import iter_events

SLOW_FIT = """%%remote_train --host testhost
import time
class Slow(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        time.sleep(0.3)
history = model.fit(x_train, y_train, epochs=12, batch_size=32, verbose=0, callbacks=[Slow()])
"""


def _epochs_of_new_jobs(host_root: Path, known: set[str]) -> int:
    """Highest epoch logged by a job that was not there before (read straight from the host's files)."""
    highest = 0
    for job in (host_root / "jobs").iterdir():
        if job.name not in known:
            for _, line in iter_events(str(job)):  # complete lines only, even mid-write
                highest = max(highest, json.loads(line).get("epoch") or 0)
    return highest


def _break_link_at_epoch_3(sshd, how: str, done: threading.Event, dropped: list[int]) -> None:
    deadline = time.monotonic() + 120
    known = {job.name for job in (sshd.host_root / "jobs").iterdir()}
    while time.monotonic() < deadline and not done.is_set():
        if _epochs_of_new_jobs(sshd.host_root, known) >= 3:
            if how == "kill":
                dropped.append(sshd.drop_connections())
            else:
                sshd.restart()
                dropped.append(1)
            return
        time.sleep(0.05)


@pytest.mark.parametrize("how", ["kill", "restart"])
def test_every_epoch_arrives_exactly_once_across_a_drop(ip, sshd, capsys, how) -> None:
    assert run(ip, MODEL_CELL).success
    assert run(ip, "%%remote_train --host testhost\nwarm = 1\n").success  # connection open before training
    capsys.readouterr()
    done, dropped = threading.Event(), []
    breaker = threading.Thread(target=_break_link_at_epoch_3, args=(sshd, how, done, dropped))
    breaker.start()
    try:
        result = run(ip, SLOW_FIT)
    finally:
        done.set()
        breaker.join()
    assert result.success, result.error_in_exec
    out = capsys.readouterr().out
    assert dropped and dropped[0] > 0, "the link was never broken"
    assert "reconnecting" in out
    epochs = [line.split(" - ")[0] for line in out.splitlines() if line.startswith("Epoch ")]
    assert epochs == [f"Epoch {i}/12" for i in range(1, 13)]
    assert len(ip.user_ns["history"].history["loss"]) == 12
