"""Faults a review found in the core: each test reproduces one with real processes (local agent, sshd)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import run
from IPython.core.error import UsageError
from test_lifecycle import _submitted_job_id
from test_recovery import _wait_for

from remote_magic import session
from remote_magic.agent import jobs, procs, protocol, runner
from remote_magic.agent.digest import file_name
from remote_magic.agent.store import blobs
from remote_magic.errors import AgentCommandError, HostSetupError, RemoteMagicError
from remote_magic.transport import LocalTransport
from remote_magic.wire.client import AgentClient

MiB = 1024 * 1024


def _magics(ip):
    return ip.magics_manager.registry["RemoteMagics"]


def _job_path(client: AgentClient, job_id: str) -> Path:
    return Path(client.transport.root or "") / "jobs" / job_id


@pytest.fixture
def sleeper():
    """An unrelated process, in its own session (as `setsid sleep` was when cancel killed it)."""
    process = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def _answers_within(client: AgentClient, seconds: float = 20.0) -> bool:
    """Whether the connection still answers a command (a hung link never does)."""
    done = threading.Event()

    def ask() -> None:
        client.status()
        done.set()

    threading.Thread(target=ask, daemon=True).start()
    return done.wait(seconds)


# ---------------------------------------------------------------- fault 2: job ids
def test_an_option_as_job_id_never_reaches_the_agent_and_the_link_survives(ip, capsys) -> None:
    client = _magics(ip)._client("local")
    for bad in ("-h", "--help"):  # refused by the parser as an error frame: no help text on the stream
        with pytest.raises(AgentCommandError, match="required"):
            client.call("attach", bad)
    for bad in ("../../etc", "x" * 10, "20261127-103000-1A2B3C"):
        with pytest.raises(AgentCommandError, match="not a job id"):
            client.call("cancel", bad)
    with pytest.raises(AgentCommandError):
        client.call("status", "--lines", "-h")  # an unknown option is an error frame, never help text
    with pytest.raises(AgentCommandError):
        client.call("no-such-command", "-h")
    assert _answers_within(client)
    result = run(ip, "%remote_attach -h")
    assert isinstance(result.error_in_exec, UsageError)  # the magic's own parser; nothing sent
    result = run(ip, "%remote_cancel ../jobs")
    assert "not a job id" in str(result.error_in_exec)


# ------------------------------------------------------- fault 3: reused pids
def _finished_job(ip, capsys, cell: str = "y = 1\n") -> tuple[AgentClient, str]:
    assert run(ip, "%%remote_train --detach --no-inject\n" + cell).success
    job_id = _submitted_job_id(capsys.readouterr().out)
    client = _magics(ip)._client("local")
    _wait_for(ip, job_id, "local", lambda r: r["state"] not in protocol.ACTIVE_STATES)
    return client, job_id


def _record_runner(path: Path, identity: procs.ProcessIdentity) -> None:
    record = json.loads((path / protocol.LAUNCH_FILE).read_text())
    record["identity"] = identity.to_json()
    (path / protocol.LAUNCH_FILE).write_text(json.dumps(record))


def test_cancel_of_a_done_job_never_signals_the_process_that_reused_its_pid(ip, capsys, sleeper) -> None:
    _magics(ip).follow_detached = False
    client, job_id = _finished_job(ip, capsys)
    path = _job_path(client, job_id)
    # The worst case: the recorded identity is exactly that of a live stranger. The ended log still wins.
    identity = procs.identity_of(sleeper.pid)
    assert identity is not None
    _record_runner(path, identity)
    result = client.cancel(job_id)
    assert result["cancelled"] is False and result["state"] == "done"
    assert client.stop(job_id)["stop_requested"] is False
    time.sleep(0.2)
    assert sleeper.poll() is None


def _as_if_killed(path: Path) -> None:
    """Make a finished job look like one whose runner died without a final event."""
    lines = (path / protocol.EVENTS_FILE).read_text().splitlines(True)
    (path / protocol.EVENTS_FILE).write_text("".join(lines[:2]))
    (path / protocol.SUMMARY_FILE).unlink()


def test_a_killed_job_whose_pid_was_reused_shows_as_killed_not_running(ip, capsys, sleeper) -> None:
    client, job_id = _finished_job(ip, capsys)
    path = _job_path(client, job_id)
    _as_if_killed(path)
    # A job whose pid now belongs to another process (same pid, another start time).
    stranger = procs.identity_of(sleeper.pid)
    assert stranger is not None
    _record_runner(path, procs.ProcessIdentity(stranger.pid, stranger.start_ticks - 1, stranger.boot_id))
    row = client.status(job_id)
    assert row["state"] == "killed"
    assert client.cancel(job_id)["cancelled"] is False
    time.sleep(0.2)
    assert sleeper.poll() is None


def test_a_job_recorded_with_a_bare_pid_is_never_signalled(ip, capsys, sleeper) -> None:
    client, job_id = _finished_job(ip, capsys)
    path = _job_path(client, job_id)
    _as_if_killed(path)
    (path / protocol.LAUNCH_FILE).unlink()
    (path / protocol.PID_FILE).write_text(str(sleeper.pid))  # as agents before start times wrote it
    assert client.status(job_id)["state"] == "killed"
    client.stop(job_id)
    client.cancel(job_id)
    time.sleep(0.2)
    assert sleeper.poll() is None


# ------------------------------------------------- fault 6: escaping processes
ESCAPER = (
    "import subprocess, time\n"
    "child = subprocess.Popen(['sleep', '300'], start_new_session=True)\n"
    "print('child', child.pid, flush=True)\n"
)


def _child_pid(ip, job_id: str) -> int:
    row = _wait_for(ip, job_id, "local", lambda r: any(line.startswith("child ") for line in r["log_tail"]))
    return int(next(line for line in row["log_tail"] if line.startswith("child ")).split()[1])


def test_cancel_ends_a_child_that_started_its_own_session(ip, capsys) -> None:
    _magics(ip).follow_detached = False
    assert run(ip, "%%remote_train --detach --no-inject\n" + ESCAPER + "time.sleep(300)\n").success
    job_id = _submitted_job_id(capsys.readouterr().out)
    child = _child_pid(ip, job_id)
    assert procs.process_alive(child)
    assert run(ip, f"%remote_cancel {job_id}").success
    assert not procs.process_alive(child)
    assert procs.tagged_processes(job_id) == []


def test_a_finished_job_leaves_no_process_behind(ip, capsys) -> None:
    assert run(ip, "%%remote_train\n" + ESCAPER).success
    child = int(capsys.readouterr().out.split("child ", 1)[1].split()[0])
    deadline = time.monotonic() + 10
    while procs.process_alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not procs.process_alive(child)


def test_children_of_a_sigkilled_runner_are_ended_by_cancel(ip, capsys) -> None:
    _magics(ip).follow_detached = False
    assert run(ip, "%%remote_train --detach --no-inject\n" + ESCAPER + "time.sleep(300)\n").success
    job_id = _submitted_job_id(capsys.readouterr().out)
    child = _child_pid(ip, job_id)
    os.kill(run(ip, f"%remote_status {job_id}").result.row["pid"], signal.SIGKILL)
    _wait_for(ip, job_id, "local", lambda r: r["state"] == "killed")
    assert procs.process_alive(child)  # adopted by init: a process-group kill can no longer reach it
    assert run(ip, f"%remote_cancel {job_id}").success
    assert not procs.process_alive(child)


# ------------------------------------------------ fault 7: one malformed event line
def test_a_malformed_event_line_breaks_nothing(ip, capsys) -> None:
    client, job_id = _finished_job(ip, capsys)
    path = _job_path(client, job_id)
    (path / protocol.SUMMARY_FILE).unlink()
    lines = (path / protocol.EVENTS_FILE).read_bytes().splitlines(True)
    lines.insert(1, b'{"seq": 1, "ty\xff\n')
    lines.insert(2, b"[1, 2]\n")
    (path / protocol.EVENTS_FILE).write_bytes(b"".join(lines))
    jobs.forget_summary(str(path))
    rows = {row["job_id"]: row for row in client.status()}
    assert rows[job_id]["state"] == "done"
    assert all(row["state"] != "unreachable" for row in session.registered_jobs([], client_for=lambda h: client))
    assert client.status(job_id)["state"] == "done"
    seen: list[dict] = []
    final = session.follow(client, job_id, seen.append)
    assert final is not None and final["type"] == "done"
    assert client.cancel(job_id)["cancelled"] is False
    assert job_id in client.gc(0, include_unfetched=True, dry_run=True)["removed_jobs"]
    log = Path(client.transport.root or "") / jobs.AGENT_LOG
    assert "not an event" in log.read_text()


# --------------------------------------------------- fault 8: uploads that fail early
def test_an_upload_the_agent_stops_reading_fails_fast_and_the_link_lives(ip) -> None:
    client = AgentClient(LocalTransport())
    try:
        data = os.urandom(64 * MiB)
        digest = hashlib.sha256(data[:MiB]).hexdigest()
        wrong = hashlib.sha256(b"not it").hexdigest()
        # The agent reads 1 MiB (the declared size), finds the hash wrong and ends; 63 MiB are still coming.
        with pytest.raises(AgentCommandError, match="does not match its sha256"):
            client.call("put-blob", wrong, str(MiB), stdin=[data])
        assert _answers_within(client)
        client.call("put-blob", digest, str(MiB), stdin=[data[:MiB]])
        assert _answers_within(client)
    finally:
        client.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_disk_that_fills_during_an_upload_fails_it_and_the_link_lives(tmp_path) -> None:
    root = tmp_path / "small"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(root)], check=True)
    client = AgentClient(LocalTransport(root=str(root)))
    try:
        data = os.urandom(48 * MiB)
        with pytest.raises(AgentCommandError, match="No space left"):
            client.put_blob(hashlib.sha256(data).hexdigest(), memoryview(data), "none")
        assert _answers_within(client)
        assert not [p for p in (root / "blobs").iterdir() if not p.name.startswith(".")]  # no partial blob
    finally:
        client.close()
        subprocess.run(["umount", "-l", str(root)], check=False)


# --------------------------------------------------- fault 9: bad input does nothing
def test_a_bad_option_is_refused_before_anything_is_sent(ip) -> None:
    registry_before = len(_magics(ip).registry.records())
    root = Path(_magics(ip)._client("local").transport.root or "")
    jobs_before = len(os.listdir(root / "jobs")) if (root / "jobs").exists() else 0
    result = run(ip, "%%remote_train --checkpoint-every -1\ny = 1\n")
    assert "--checkpoint-every" in str(result.error_in_exec)
    result = run(ip, "%%remote_train --no-inject\ny = 1\n")
    assert "--no-inject goes with --detach" in str(result.error_in_exec)
    assert "y" not in ip.user_ns
    assert len(_magics(ip).registry.records()) == registry_before
    assert (len(os.listdir(root / "jobs")) if (root / "jobs").exists() else 0) == jobs_before


def test_a_submit_with_fewer_input_bytes_than_declared_creates_no_job(ip) -> None:
    client = _magics(ip)._client("local")
    root = Path(client.transport.root or "")
    before = set(os.listdir(root / "jobs"))
    body = json.dumps({"source": "y = 1\n", "outputs": ["y"], "blobs": [], "inputs_size": 1000}).encode() + b"\n"
    with pytest.raises(AgentCommandError, match="ended after 10 of 1000 bytes"):
        client.call("submit", stdin=[body, b"x" * 10])
    with pytest.raises(AgentCommandError, match="checkpoint_every"):
        client.submit({"source": "", "outputs": [], "blobs": [], "checkpoint_every": -1}, b"")
    assert set(os.listdir(root / "jobs")) == before


def test_a_local_python_that_does_not_exist_is_a_host_setup_error(ip) -> None:
    result = run(ip, "%%remote_train --python /nonexistent/python\ny = 1\n")
    assert isinstance(result.error_in_exec, HostSetupError)
    assert "no Python at `/nonexistent/python`" in str(result.error_in_exec)


# ------------------------------------------------------- fault 10: bounded output
def test_carriage_return_progress_keeps_only_the_last_redraw() -> None:
    emitted: list[str] = []
    stream = runner.EventStream(lambda kind, text: emitted.append(text), "stdout")
    for i in range(20000):
        stream.write(f"\r{i:6d} / 20000 [{'#' * (i // 1000)}]")
        assert len(stream.pending) < 100  # each write costs its own length, not the line's so far
    stream.write("\n")
    assert emitted == [f"{19999:6d} / 20000 [{'#' * 19}]\n"]
    stream.write("x" * (runner.MAX_LINE_CHARS * 3 + 5))
    assert len(stream.pending) <= runner.MAX_LINE_CHARS and len(emitted) == 4


LOUD_CELL = """
import sys
line = "x" * 1_000_000
for _ in range(200):
    sys.stdout.write(line + "\\n")
"""

MEMORY_PROBE = r"""
import json, os, resource, sys, threading, time
from remote_magic import session
from remote_magic.wire.client import AgentClient
from remote_magic.transport import LocalTransport
from remote_magic.ui.panel import TextPanel
from remote_magic.agent import procs

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()

client = AgentClient(LocalTransport(root=sys.argv[1]))
warm = session.submit(client, session.prepare("y = 1\n", {}))
session.follow(client, warm, lambda e: None)
def agent_rss(field):
    with open(f"/proc/{client.link().pipe.process.pid}/status") as f:
        return [int(l.split()[1]) * 1024 for l in f if l.startswith(field)][0]

agent_before = agent_rss("VmRSS")
before = rss()
peak, following = before, True

def sample():  # the kernel's peak while this job streams (ru_maxrss would include earlier peaks)
    global peak
    while following:
        peak = max(peak, rss())
        time.sleep(0.005)

sampler = threading.Thread(target=sample)
sampler.start()
job = session.submit(client, session.prepare(sys.argv[2], {}))
panel = TextPanel("local", write=lambda text: None)
panel.start(job)
final = session.follow(client, job, panel.handle)
following = False
sampler.join()
print(json.dumps({"type": final["type"], "kernel_growth": peak - before,
                  "agent_growth": agent_rss("VmHWM") - agent_before,
                  "lines_kept": len(panel.view.output)}))
"""


def test_printing_200_mb_grows_neither_kernel_nor_agent_by_50_mb(tmp_path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(MEMORY_PROBE)
    env = {**os.environ, "REMOTE_MAGIC_WARM": "0"}
    out = subprocess.run(
        [sys.executable, str(probe), str(tmp_path / "root"), LOUD_CELL],
        capture_output=True, text=True, timeout=240, env=env, check=True,
    ).stdout  # fmt: skip
    result = json.loads(out.strip().splitlines()[-1])
    assert result["type"] == "done"
    assert result["kernel_growth"] < 50 * MiB, result
    assert result["agent_growth"] < 50 * MiB, result
    assert result["lines_kept"] <= 200


# ------------------------------------------------------------ fault 12: warm runners
def test_two_ensures_at_once_start_one_warm_runner(tmp_path) -> None:
    root = str(tmp_path / "root")
    AgentClient(LocalTransport(root=root)).deploy()
    from remote_magic.transport.deploy import agent_hash

    script = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from remote_magic.agent.launch import warm; warm.ensure(sys.argv[2], sys.argv[3], warm.RunnerKind.of_this_process())"
    )
    repo = str(Path(__file__).resolve().parent.parent)
    starters = [
        subprocess.Popen([sys.executable, "-c", script, repo, root, agent_hash()]) for _ in range(4)
    ]  # fmt: skip
    for starter in starters:
        starter.wait(60)
    try:
        folder = Path(root) / "warm"
        deadline = time.monotonic() + 60
        while not list(folder.glob("*.ready")) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)
        runners = [p for p in _processes_with_arg(root) if "warm-runner" in p[1]]
        assert len(runners) == 1, runners
    finally:
        for ready in (Path(root) / "warm").glob("*.ready"):
            os.kill(json.loads(ready.read_text())["pid"], signal.SIGTERM)


def _processes_with_arg(arg: str) -> list[tuple[int, str]]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if arg in cmdline and procs.process_alive(int(entry)):
                found.append((int(entry), cmdline))
    return found


def test_gc_removes_old_agent_versions_but_spares_the_current_one(ip) -> None:
    client = _magics(ip)._client("local")
    client.status()
    agents = Path(client.transport.root or "") / "agent"
    old = agents / "0123456789abcdef"
    (old / "remote_magic").mkdir(parents=True)
    (old / "remote_magic" / "__init__.py").write_text("")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    current = {p.name for p in agents.iterdir()} - {old.name}
    result = client.gc(7 * 86400, include_unfetched=False, dry_run=False)
    assert "0123456789abcdef" in result["removed_agents"]
    assert not old.exists() and {p.name for p in agents.iterdir()} >= current


# ------------------------------------------------------------ fault 13
def test_gc_keeps_output_blobs_a_finishing_job_listed(ip, capsys) -> None:
    _magics(ip).follow_detached = False
    assert run(ip, "%%remote_train --detach --no-inject\nimport time\ntime.sleep(300)\n").success
    job_id = _submitted_job_id(capsys.readouterr().out)
    _wait_for(ip, job_id, "local", lambda r: r["state"] == "running")
    client = _magics(ip)._client("local")
    root = client.transport.root or ""
    data = os.urandom(1000)
    digest, _ = blobs.write_blob(root, memoryview(data))
    (_job_path(client, job_id) / protocol.OUTPUT_BLOBS_FILE).write_text(json.dumps([digest]))
    client.gc(0, include_unfetched=True, dry_run=False)
    assert (Path(root) / "blobs" / file_name(digest)).exists()
    client.cancel(job_id)


def test_a_job_of_a_newer_schema_is_refused_and_an_older_one_still_reads(ip, capsys) -> None:
    client, job_id = _finished_job(ip, capsys)
    path = _job_path(client, job_id)
    lines = (path / protocol.EVENTS_FILE).read_text().splitlines(True)
    first = json.loads(lines[0])
    old = {k: v for k, v in first.items() if k != "schema"}  # as schema 1 wrote it
    (path / protocol.EVENTS_FILE).write_text(json.dumps(old) + "\n" + "".join(lines[1:]))
    assert run(ip, f"%remote_attach {job_id}").success and ip.user_ns["y"] == 1
    newer = {**first, "schema": protocol.SCHEMA_VERSION + 1}
    (path / protocol.EVENTS_FILE).write_text(json.dumps(newer) + "\n" + "".join(lines[1:]))
    result = run(ip, f"%remote_attach {job_id}")
    assert isinstance(result.error_in_exec, RemoteMagicError)
    assert "newer remote_magic" in str(result.error_in_exec) and "pip install -U" in str(result.error_in_exec)


def test_a_damaged_output_blob_is_refused_when_downloaded(ip, sshd, capsys) -> None:
    import numpy as np

    assert run(ip, "%%remote_train --host testhost --detach --no-inject\nimport numpy as np\nbig = np.ones(MiB)\n"
               .replace("MiB", str(MiB))).success  # fmt: skip
    job_id = _submitted_job_id(capsys.readouterr().out)
    client = _magics(ip)._client("testhost")
    final = session.follow(client, job_id, lambda e: None)
    digest, size = final["blobs"][0]
    blob = sshd.host_root / "blobs" / file_name(digest)
    blob.write_bytes(np.zeros(MiB).tobytes())  # same size, other bytes: a disk fault within this boot
    with pytest.raises(AgentCommandError, match="does not match its sha256"):
        client.get_blob(digest, size)
    client.outputs(job_id)  # fetched: later gc tests may collect it


def test_a_background_follower_that_fails_says_so_in_the_panel(ip) -> None:
    from remote_magic.ui.panel import TextPanel

    lines: list[str] = []
    panel = TextPanel("local", write=lines.append)
    client = _magics(ip)._client("local")
    follower = _magics(ip).lifecycle.follow_in_background(client, "20200101-000000-abcdef", panel, inject=True)
    follower.join(30)
    assert follower.error is not None
    assert any("stopped following job 20200101-000000-abcdef" in line and "no job" in line for line in lines)
