"""A dropped SSH link mid-training: the client reconnects and every epoch arrives exactly once."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from conftest import MODEL_CELL, run

SLOW_FIT = """%%remote_train --host testhost
import time
class Slow(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        time.sleep(0.3)
history = model.fit(x_train, y_train, epochs=12, batch_size=32, verbose=0, callbacks=[Slow()])
"""


def _epochs_written(host_root: Path) -> int:
    """Highest epoch event in the newest job's log on the host (read straight from its files)."""
    jobs = sorted((host_root / "jobs").iterdir(), key=lambda p: p.stat().st_mtime)
    epochs = [json.loads(line).get("epoch", 0) for line in (jobs[-1] / "events.jsonl").read_text().splitlines()]
    return max([e for e in epochs if e] or [0])


def _break_link_at_epoch_3(sshd, how: str, done: threading.Event, dropped: list[int]) -> None:
    deadline = time.monotonic() + 120
    start = time.time()
    while time.monotonic() < deadline and not done.is_set():
        newest = max((sshd.host_root / "jobs").iterdir(), key=lambda p: p.stat().st_mtime, default=None)
        if newest is not None and newest.stat().st_mtime >= start - 1 and _epochs_written(sshd.host_root) >= 3:
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
