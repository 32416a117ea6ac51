"""Detach, status, attach and cancel over the test sshd."""

from __future__ import annotations

import os
import re
import time

import numpy as np
from conftest import MODEL_CELL, run

from remote_magic.agent.procs import process_alive


def _live_members_of_group(pgid: int) -> list[int]:
    """Processes (not zombies waiting to be reaped) whose process group is ``pgid``."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(entry))
    return members


def _submitted_job_id(out: str) -> str:
    match = re.search(r"job (\S+) submitted to host", out)
    assert match, out
    return match.group(1)


def test_detach_then_status_then_attach_injects_the_model(ip, capsys) -> None:
    assert run(ip, MODEL_CELL).success
    capsys.readouterr()
    cell = "%%remote_train --host testhost --detach --name background-fit\nhistory = model.fit(x_train, y_train, epochs=3, verbose=0)\n"
    assert run(ip, cell).success
    job_id = _submitted_job_id(capsys.readouterr().out)
    assert "history" not in ip.user_ns  # returned at once, nothing injected yet

    table = run(ip, "%remote_status --host testhost").result
    row = next(line for line in repr(table).splitlines() if line.startswith(job_id))
    assert "background-fit" in row and re.search(r"\b(queued|running|done)\b", row)
    assert "<table>" in table._repr_html_()

    capsys.readouterr()
    assert run(ip, f"%remote_attach {job_id} --host testhost").success
    out = capsys.readouterr().out
    assert [line.split(" - ")[0] for line in out.splitlines() if line.startswith("Epoch")] == [
        "Epoch 1/3",
        "Epoch 2/3",
        "Epoch 3/3",
    ]
    assert len(ip.user_ns["history"].history["loss"]) == 3
    trained = ip.user_ns["model"].get_weights()
    assert not np.array_equal(trained[0], ip.user_ns["weights_before"][0])

    detail = repr(run(ip, f"%remote_status {job_id} --host testhost").result)
    assert f"job {job_id} on host testhost: done" in detail and "epoch: 3/3" in detail


def test_cancel_ends_the_whole_process_group(ip, capsys) -> None:
    cell = (
        "%%remote_train --host testhost --detach --name sleeper\n"
        "import subprocess, time\n"
        "child = subprocess.Popen(['sleep', '300'])\n"
        "print('child', child.pid, flush=True)\n"
        "time.sleep(300)\n"
    )
    assert run(ip, cell).success
    job_id = _submitted_job_id(capsys.readouterr().out)
    child_pid = runner_pid = None
    deadline = time.monotonic() + 60
    while child_pid is None and time.monotonic() < deadline:
        detail = run(ip, f"%remote_status {job_id} --host testhost").result
        lines = [line for line in detail.row["log_tail"] if line.startswith("child ")]
        if lines:
            child_pid, runner_pid = int(lines[0].split()[1]), detail.row["pid"]
        else:
            time.sleep(0.2)
    assert child_pid and runner_pid and process_alive(child_pid) and process_alive(runner_pid)

    capsys.readouterr()
    assert run(ip, f"%remote_cancel {job_id} --host testhost").success
    assert f"job {job_id} on host testhost cancelled" in capsys.readouterr().out
    assert not process_alive(runner_pid) and not process_alive(child_pid)
    assert _live_members_of_group(runner_pid) == []
    assert run(ip, f"%remote_status {job_id} --host testhost").result.row["state"] == "cancelled"


def test_proxyjump_reaches_the_host_through_a_jump_host(ip, sshd, tmp_path) -> None:
    config = tmp_path / "config"
    sshd.write_client_config(tmp_path / "jump_block", "jump")
    sshd.write_client_config(tmp_path / "target_block", "behind-jump", ProxyJump="jump")
    config.write_text((tmp_path / "jump_block").read_text() + (tmp_path / "target_block").read_text())
    magics = ip.magics_manager.registry["RemoteMagics"]
    magics.ssh_config = str(config)
    magics.hosts = {"behind-jump": {"python": magics.hosts["testhost"]["python"]}}
    logins = sshd.accepted_logins()
    assert run(ip, "x = 41").success
    result = run(ip, "%%remote_train --host behind-jump\ny = x + 1\n")
    assert result.success, result.error_in_exec
    assert ip.user_ns["y"] == 42
    assert sshd.accepted_logins() >= logins + 2  # one login for the jump, one for the target through it


def test_detached_job_followed_in_the_background_respects_no_inject(ip, capsys) -> None:
    magics = ip.magics_manager.registry["RemoteMagics"]
    magics.follow_detached = True
    try:
        assert run(ip, "%%remote_train --detach\nfirst = 1\n").success
        assert run(ip, "%%remote_train --detach --no-inject\nsecond = 2\n").success
        for follower in list(magics.background):
            follower.join(60)
    finally:
        magics.follow_detached = False
    out = capsys.readouterr().out
    assert ip.user_ns.get("first") == 1 and "second" not in ip.user_ns
    # Ended between cells, it went in at once; during the next cell, it waited for that cell's end.
    assert "injected: first (assigned)" in out or "outputs ready: first; they enter the namespace" in out, out
    assert "outputs not injected, as asked: `%remote_attach" in out
