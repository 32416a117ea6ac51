"""Nothing is lost: killed runners yield their checkpoint, custom loops get the panel, gc keeps what matters."""

from __future__ import annotations

import json
import os
import re
import signal
import time

import numpy as np
import pytest
from conftest import MODEL_CELL, run
from test_lifecycle import _submitted_job_id
from wheels import build_wheel

from remote_magic.agent import protocol
from remote_magic.agent.digest import file_name
from remote_magic.errors import JobLost

SLOW_FIT = """
import time
class Slow(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        time.sleep(0.4)
history = model.fit(x_train, y_train, epochs=40, batch_size=32, verbose=0, callbacks=[Slow()])
"""


def _wait_for(ip, job_id: str, host: str, predicate, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = run(ip, f"%remote_status {job_id} --host {host}").result.row
        if predicate(row):
            return row
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} never reached the expected state: {row}")


def test_sigkill_of_the_runner_leaves_a_checkpoint_that_attach_injects(ip, capsys) -> None:
    assert run(ip, MODEL_CELL).success
    assert run(ip, "%%remote_train --host testhost --detach" + SLOW_FIT).success
    job_id = _submitted_job_id(capsys.readouterr().out)
    row = _wait_for(ip, job_id, "testhost", lambda r: (r.get("checkpoint") or {}).get("epoch", 0) >= 2)
    os.kill(row["pid"], signal.SIGKILL)
    row = _wait_for(ip, job_id, "testhost", lambda r: r["state"] == "killed")
    assert "ended without a final event" in row["message"]

    result = run(ip, f"%remote_attach {job_id} --host testhost")
    assert isinstance(result.error_in_exec, JobLost) and "--checkpoint" in str(result.error_in_exec)
    assert "history" not in ip.user_ns

    capsys.readouterr()
    assert run(ip, f"%remote_attach {job_id} --host testhost --checkpoint").success
    epoch = int(re.search(r"at epoch (\d+) of 40", capsys.readouterr().out).group(1))
    assert epoch >= 2
    model = ip.user_ns["model"]
    assert int(model.optimizer.iterations.numpy()) == epoch * 8
    assert not np.array_equal(model.get_weights()[0], ip.user_ns["weights_before"][0])
    assert model.predict(ip.user_ns["x_train"][:2], verbose=0).shape == (2, 1)


def test_remote_log_gives_a_numpy_loop_the_same_panel(ip, capsys) -> None:
    cell = (
        "%%remote_train\n"
        "import numpy as np\n"
        "w = 0.0\n"
        "for step in range(1, 4):\n"
        "    w += 0.5\n"
        "    remote_log(step=step, total=3, loss=1.0 / step, weight=w)\n"
    )
    assert run(ip, cell).success
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("Step")]
    assert lines == [  # a remote_log loop counts steps
        "Step 1/3 - loss: 1.0000 - weight: 0.5000",
        "Step 2/3 - loss: 0.5000 - weight: 1.0000",
        "Step 3/3 - loss: 0.3333 - weight: 1.5000",
    ]
    assert ip.user_ns["w"] == 1.5


def test_stop_ends_a_remote_log_loop_where_it_is_and_brings_back_what_it_has(ip) -> None:
    """Stop (or an interrupt) reaches a plain loop through remote_log, not only a Keras fit."""
    from remote_magic import session

    client = ip.magics_manager.registry["RemoteMagics"]._client("testhost")
    cell = (
        "import time\n"
        "done = 0\n"
        "for step in range(1, 1001):\n"
        "    time.sleep(0.05)\n"
        "    done = step\n"
        "    remote_log(step=step, total=1000, loss=1.0 / step)\n"
    )
    job_id = session.submit(client, session.prepare(cell, {}))
    seen: list[dict] = []

    def on_event(event: dict) -> None:
        seen.append(event)
        if event["type"] == "epoch" and event["epoch"] == 3:
            client.stop(job_id)

    final = session.follow(client, job_id, on_event)
    assert final["type"] == "done" and final["stopped"]
    values = session.fetch_outputs(client, job_id, final)
    assert 3 <= values["done"] < 100  # it ended near the step it was stopped at, not after 1000
    assert [e["epoch"] for e in seen if e["type"] == "epoch"][-1] == values["done"]


def test_gc_removes_fetched_jobs_and_their_blobs_but_keeps_unfetched_ones(ip, sshd, capsys) -> None:
    root = sshd.host_root
    assert run(ip, "import numpy as np\nbig = np.arange(300_000.0)\n").success
    assert run(ip, "%%remote_train --host testhost\ntotal = big.sum()\n").success  # fetched
    fetched = re.findall(r"host testhost · job (\S+)", capsys.readouterr().out)[-1]
    assert run(ip, "%%remote_train --host testhost --detach\nleft = big * 2\n").success  # never fetched
    unfetched = _submitted_job_id(capsys.readouterr().out)
    _wait_for(ip, unfetched, "testhost", lambda r: r["state"] == "done")

    assert run(ip, "%remote_gc --host testhost --older-than 0").success
    out = capsys.readouterr().out
    assert re.search(r"host testhost: removed \d+ jobs", out) and unfetched in out
    remaining = set(os.listdir(root / "jobs"))
    assert unfetched in remaining and fetched not in remaining
    # What stays: jobs never fetched (this one, and any an earlier test on this host left) or still running.
    kept_fetched = {job for job in remaining if (root / "jobs" / job / protocol.FETCHED_MARK).exists()}
    assert kept_fetched <= _running_jobs(root)
    spec = json.loads((root / "jobs" / unfetched / "spec.json").read_text())
    for digest, _ in spec["blobs"]:
        assert (root / "blobs" / file_name(digest)).exists()  # still referenced by the kept job

    assert run(ip, "%remote_gc --host testhost --older-than 0 --include-unfetched").success
    assert unfetched not in os.listdir(root / "jobs")
    assert not any((root / "blobs" / file_name(digest)).exists() for digest, _ in spec["blobs"])
    assert run(ip, "%remote_gc --host testhost --older-than 5x").error_in_exec is not None


def _running_jobs(root) -> set[str]:
    running = set()
    for job_id in os.listdir(root / "jobs"):
        events = (root / "jobs" / job_id / "events.jsonl").read_text().splitlines()
        if json.loads(events[-1])["type"] not in ("done", "error", "cancelled"):
            running.add(job_id)
    return running


def _built_env(ip, capsys, requirements: str, cell: str) -> str:  # type: ignore[no-untyped-def]
    """Run ``cell`` with ``--env requirements``; the key of the environment it built."""
    assert run(ip, f"%%remote_train --host testhost --env {requirements}\n{cell}").success
    return re.findall(r"built environment (\S+) on host testhost", capsys.readouterr().out)[-1]


def _gc(ip, capsys, options: str) -> str:  # type: ignore[no-untyped-def]
    assert run(ip, f"%remote_gc --host testhost {options}").success
    return capsys.readouterr().out


def test_gc_removes_environments_no_job_used_within_older_than(
    ip, sshd, tmp_path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Two environments built by real jobs; one was last used two days ago. A running job keeps its own."""
    for version in ("1.0", "2.0"):
        build_wheel(tmp_path / "wheels", "gcpkg", version)
        (tmp_path / f"req{version}.txt").write_text(
            f"--no-index\n--find-links {tmp_path / 'wheels'}\ngcpkg=={version}\n"
        )
    monkeypatch.chdir(tmp_path)
    magics = ip.magics_manager.registry["RemoteMagics"]
    monkeypatch.setattr(magics, "warm_runner", False)  # a warm runner from an env would keep it (tested below)
    old = _built_env(ip, capsys, "req1.0.txt", "import gcpkg\nv = gcpkg.__version__\n")
    recent = _built_env(ip, capsys, "req2.0.txt", "import gcpkg\nv = gcpkg.__version__\n")
    assert ip.user_ns["v"] == "2.0"
    envs_root = sshd.host_root / "envs"
    two_days_ago = time.time() - 2 * 86400
    os.utime(envs_root / old / ".ready", (two_days_ago, two_days_ago))

    out = _gc(ip, capsys, "--older-than 1d --dry-run")
    assert "1 environments no job used within 1d" in out and f"would remove environments {old} " in out, out
    assert (envs_root / old).is_dir()

    out = _gc(ip, capsys, "--older-than 1d")
    with capsys.disabled():
        print(f"\n%remote_gc --host testhost --older-than 1d:\n{out}")
    assert f"removed environments {old} " in out and recent not in out
    assert re.search(r"\(\d+\.\d [KMG]B\)", out), out  # what the environment held
    assert not (envs_root / old).exists() and (envs_root / recent / ".ready").exists()

    # A job running in it keeps an environment, however long ago it was built or last used.
    assert run(ip, "%%remote_train --host testhost --env req2.0.txt --detach\nimport time\ntime.sleep(60)\n").success
    job_id = _submitted_job_id(capsys.readouterr().out)
    _wait_for(ip, job_id, "testhost", lambda r: r["state"] == "running")
    os.utime(envs_root / recent / ".ready", (two_days_ago, two_days_ago))
    assert "and 0 environments" in _gc(ip, capsys, "--older-than 1d") and (envs_root / recent).is_dir()
    assert run(ip, f"%remote_cancel {job_id} --host testhost").success
    os.utime(envs_root / recent / ".ready", (two_days_ago, two_days_ago))
    assert f"removed environments {recent} " in _gc(ip, capsys, "--older-than 1d")
    assert not (envs_root / recent).exists()
