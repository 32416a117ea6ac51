"""Job folders an earlier release wrote still attach, fetch and collect with today's client and agent.

Moving the agent's files (agent/launch/, agent/store/) changed the agent's hash and the paths ``bootstrap``
checks.  Here the release of commit ``OLD_COMMIT`` (the last one before that move) is taken from git at test
time, its own client submits jobs exactly as it did (a subprocess with the old tree on PYTHONPATH, its old
agent deployed under its own hash in a root shared with today's agent), and today's client takes them over:

- a job the old runner finished: attached from seq 0, outputs fetched (blobs named by bare hex), gc keeps
  what it names and collects the rest;
- a detached job still running in the old agent's runner: attached, followed to its end, collected;
- a Slurm job the old agent submitted, requeued by Slurm, then followed and fetched by today's client;
- a Slurm spec as old clients wrote it (``"launcher": "slurm"``) still goes to the Slurm launcher.

No part of the agent is mocked: old and new agents run as the processes they are on a host.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from slurm_cluster import SlurmCluster

from remote_magic import session
from remote_magic.transport import LocalTransport
from remote_magic.transport.deploy import agent_hash
from remote_magic.wire.client import AgentClient

OLD_COMMIT = "76a3e04"  # the last commit before the agent's files moved (172fd8c)
REPO = Path(__file__).resolve().parent.parent
X = np.arange(65536, dtype=np.float64)  # 512 KiB: above the codec's 256 KiB, so it travels as a blob

# Run by the OLD release (its tree first on sys.path): submits the jobs of a JSON request, as its magics did.
OLD_DRIVER = r"""
import json, os, sys, time
import numpy as np
from remote_magic import session
from remote_magic.client import AgentClient
from remote_magic.transport import LocalTransport
from remote_magic.transport.deploy import agent_hash

os.environ.pop("PYTHONPATH", None)  # the old agent and its runners start as on a host: from their own folder
request = json.loads(sys.argv[1])
client = AgentClient(LocalTransport(root=request["root"]))
out = {"agent_hash": agent_hash(), "session": session.__file__, "jobs": {}}
try:
    for name, job in request["jobs"].items():
        namespace = {"x": np.arange(65536, dtype=np.float64), "names": ["a", "b"], "flag": job.get("flag", "")}
        submission = session.prepare(job["cell"], namespace)
        if "slurm" in job:  # what Connections did for a host with scheduler "slurm"
            submission.slurm = session.SlurmSettings(**job["slurm"]).job_options(0, {})
        if job.get("spec_only"):
            out["jobs"][name] = {"spec": submission.spec()}
            continue
        job_id = session.submit(client, submission)
        seen, deadline = [], time.monotonic() + 60
        with client.attach(job_id) as events:  # as the old panel followed it, until the kernel went away
            for event in events:
                seen.append(event)
                if event["type"] == job["until"] or time.monotonic() > deadline:
                    break
        out["jobs"][name] = {"job_id": job_id, "events": seen}
finally:
    client.close()
print(json.dumps(out))
"""

FINISHED_CELL = """
import numpy as np
print("old runner", len(x))
doubled = x * 2
stats = {"sum": float(x.sum()), "n": len(x)}
tags = [s.upper() for s in names]
"""

# Waits (bounded) for the test to create ``flag``; a Slurm restart runs it again from the top.
WAITING_CELL = """
import os, time
print("waiting for the flag", os.environ.get("SLURM_RESTART_COUNT", "-"), flush=True)
deadline = time.monotonic() + 60
while not os.path.exists(flag) and time.monotonic() < deadline:
    time.sleep(0.05)
released = os.path.exists(flag)
restarts = os.environ.get("SLURM_RESTART_COUNT")
tripled = x * 3
"""


def _wait(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"after {timeout:.0f} s, still waiting for {what}")


def _events(root: Path, job_id: str) -> list[dict[str, Any]]:
    path = root / "jobs" / job_id / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _is_bare_hex(digest: str) -> bool:
    return len(digest) == 64 and not digest.strip("0123456789abcdef")


def _blob_digests(root: Path, job_id: str) -> list[str]:
    """Every blob the job's folder names: its inputs (spec) and its outputs (done event, outputs.blobs)."""
    folder = root / "jobs" / job_id
    spec = json.loads((folder / "spec.json").read_text())
    named = [digest for digest, _ in spec["blobs"]]
    named += [digest for e in _events(root, job_id) if e["type"] == "done" for digest, _ in e["blobs"]]
    named += json.loads((folder / "outputs.blobs").read_text())
    return named


def _runner_alive(record: dict[str, Any]) -> bool:
    """Whether the runner a launch record names still runs (same pid and start time: never a reused pid)."""
    identity = record.get("identity") or {}
    try:
        stat = Path(f"/proc/{identity['pid']}/stat").read_text()
    except (KeyError, OSError):
        return False
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[19]) == identity.get("start_ticks") and fields[0] != "Z"


def _stop_runner(root: Path, job_id: str, timeout: float = 15) -> None:
    """Let the job's runner end by itself (its flag is there), then kill it if it has not."""
    launch = root / "jobs" / job_id / "launch.json"
    if not launch.exists():
        return
    record = json.loads(launch.read_text())
    deadline = time.monotonic() + timeout
    while _runner_alive(record) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _runner_alive(record):
        os.kill(record["identity"]["pid"], signal.SIGKILL)


@pytest.fixture(scope="module")
def old_tree() -> Iterator[Path]:
    """The release of OLD_COMMIT, from git: ``remote_magic`` (client and agent) and the driver above."""
    found = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{OLD_COMMIT}^{{commit}}"], capture_output=True)
    if found.returncode != 0:
        pytest.fail(
            f"commit {OLD_COMMIT} (the release whose job folders must still work) is not in the git history of "
            f"{REPO}: run the tests in a full clone (git fetch --unshallow). git said: {found.stderr.decode().strip()}"
        )
    folder = Path(tempfile.mkdtemp(prefix="remote_magic-old-"))
    try:
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", OLD_COMMIT, "remote_magic"], capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
        (folder / "old_driver.py").write_text(OLD_DRIVER)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _run_old(old_tree: Path, request: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run the old release's client on ``request``; its answer (the old agent's hash, the jobs it submitted)."""
    done = subprocess.run(
        [sys.executable, str(old_tree / "old_driver.py"), json.dumps(request)],
        cwd=old_tree,
        env={**os.environ, "PYTHONPATH": str(old_tree), "REMOTE_MAGIC_WARM": "0", **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"the old client failed:\n{done.stdout}\n{done.stderr}"
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["session"].startswith(str(old_tree)), answer["session"]  # the old client ran, not today's
    return answer


@dataclass
class OldHost:
    root: Path
    old_hash: str
    finished: str  # a job the old runner finished
    finished_events: list[dict[str, Any]]  # as the old client saw them
    waiting: str  # a detached job the old runner still runs, waiting for ``flag``
    flag: Path
    slurm_spec: dict[str, Any]  # the spec an old client wrote for a Slurm host


@pytest.fixture(scope="module")
def old_host(old_tree: Path) -> Iterator[OldHost]:
    """A root where the old release's agent ran two jobs: one finished, one detached and still running."""
    root = Path(tempfile.mkdtemp(prefix="remote_magic-oldroot-"))
    flag = root.parent / f"{root.name}.flag"
    waiting = None
    try:
        answer = _run_old(
            old_tree,
            {
                "root": str(root),
                "jobs": {
                    "finished": {"cell": FINISHED_CELL, "until": "done"},
                    "waiting": {"cell": WAITING_CELL, "flag": str(flag), "until": "stdout"},
                    "slurm": {"cell": FINISHED_CELL, "slurm": {"partition": "debug"}, "spec_only": True},
                },
            },
        )
        jobs = answer["jobs"]
        waiting = jobs["waiting"]["job_id"]
        long_ago = time.time() - 2 * 3600  # deployed long ago: gc's grace for a fresh deploy does not keep it
        os.utime(root / "agent" / answer["agent_hash"], (long_ago, long_ago))
        yield OldHost(
            root,
            answer["agent_hash"],
            jobs["finished"]["job_id"],
            jobs["finished"]["events"],
            waiting,
            flag,
            jobs["slurm"]["spec"],
        )
    finally:
        flag.touch()
        if waiting is not None:
            _stop_runner(root, waiting)
        flag.unlink(missing_ok=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def client(old_host: OldHost) -> Iterator[AgentClient]:
    """Today's client on the old host's root (it deploys today's agent there, beside the old one)."""
    new = AgentClient(LocalTransport(root=str(old_host.root)))
    try:
        yield new
    finally:
        new.close()


class _Follower:
    """Today's client following a job in a thread, as a kernel's background follower does: every event it saw,
    then the final event or the error it raised."""

    def __init__(self, client: AgentClient, job_id: str) -> None:
        self.seen: list[dict[str, Any]] = []
        self.final: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._follow, args=(client, job_id), daemon=True)
        self.thread.start()

    def _follow(self, client: AgentClient, job_id: str) -> None:
        try:
            self.final = session.follow(client, job_id, self.seen.append)
        except BaseException as exc:  # noqa: BLE001  (reported by the test's assertion)
            self.error = exc


def test_a_job_the_old_agent_finished_attaches_fetches_and_keeps_its_blobs_through_gc(
    old_host: OldHost, client: AgentClient
) -> None:
    root, job = old_host.root, old_host.finished
    assert old_host.old_hash != agent_hash()  # two agents side by side, each under its own hash
    assert client.hello()  # today's agent, deployed now
    assert {p.name for p in (root / "agent").iterdir()} >= {old_host.old_hash, agent_hash()}
    named = _blob_digests(root, job)
    assert len(named) >= 3 and all(_is_bare_hex(d) for d in named), named  # as the old code wrote them

    row = client.status(job)
    assert row["state"] == "done" and row["fetched"] is False
    seen: list[dict[str, Any]] = []
    final = session.follow(client, job, seen.append)
    assert [e["seq"] for e in seen] == list(range(len(_events(root, job))))
    assert seen == old_host.finished_events  # every event, from seq 0, as the old client saw them
    assert final == seen[-1] and final["type"] == "done"
    assert any(e["type"] == "stdout" and e["text"] == f"old runner {len(X)}\n" for e in seen)

    # gc collects a blob nobody names, and keeps every blob the old job names by bare hex (and the old agent:
    # the detached job below still runs in it).
    stray = root / "blobs" / ("0" * 64)
    stray.write_bytes(b"named by no job")
    answer = client.gc(3600, include_unfetched=False, dry_run=False)
    assert answer["removed_jobs"] == [], answer
    assert not stray.exists()
    assert all((root / "blobs" / d).exists() for d in named), sorted(p.name for p in (root / "blobs").iterdir())
    assert (root / "agent" / old_host.old_hash).is_dir()

    values = session.fetch_outputs(client, job, final)
    assert sorted(values) == ["doubled", "stats", "tags"]
    np.testing.assert_array_equal(values["doubled"], X * 2)
    assert values["stats"] == {"sum": float(X.sum()), "n": len(X)}
    assert values["tags"] == ["A", "B"]
    assert client.status(job)["fetched"] is True


def test_a_detached_job_running_in_the_old_runner_is_followed_to_its_end_and_collected(
    old_host: OldHost, client: AgentClient
) -> None:
    root, job = old_host.root, old_host.waiting
    record = json.loads((root / "jobs" / job / "launch.json").read_text())
    assert _runner_alive(record)
    cmdline = Path(f"/proc/{record['identity']['pid']}/cmdline").read_bytes().split(b"\0")
    assert old_host.old_hash.encode() in cmdline  # the old agent's code runs it

    rows = {r["job_id"]: r for r in client.status()}
    assert {old_host.finished: rows[old_host.finished]["state"], job: rows[job]["state"]} == {
        old_host.finished: "done",
        job: "running",
    }
    assert rows[job]["launcher"].startswith("process:") and rows[job]["pid"] == record["identity"]["pid"]

    follower = _Follower(client, job)
    seen = follower.seen
    _wait(lambda: any(e["type"] == "stdout" for e in seen), 30, "the waiting line, through today's attach")
    assert follower.thread.is_alive() and client.status(job)["state"] == "running"
    old_host.flag.touch()
    follower.thread.join(60)
    assert not follower.thread.is_alive(), "the job did not end within 60 s of its flag"
    assert follower.error is None, follower.error
    final = follower.final
    assert final is not None and final["type"] == "done", final
    assert [e["seq"] for e in seen] == list(range(len(seen)))
    assert [e["type"] for e in seen][:2] == ["queued", "started"]

    values = session.fetch_outputs(client, job, final)
    assert values["released"] is True
    np.testing.assert_array_equal(values["tripled"], X * 3)
    _wait(lambda: not _runner_alive(record), 15, "the old runner to exit")
    rows = {r["job_id"]: r for r in client.status()}
    assert rows[job]["state"] == "done" and rows[job]["fetched"] is True

    # Both jobs collected: their folders and every blob; the old agent goes with its last job.
    answer = client.gc(0, include_unfetched=True, dry_run=False)
    assert sorted(answer["removed_jobs"]) == sorted([old_host.finished, job]), answer
    assert [p.name for p in (root / "blobs").iterdir() if not p.name.startswith(".")] == []
    assert old_host.old_hash in answer["removed_agents"] and (root / "agent" / agent_hash()).is_dir()


def test_a_slurm_job_the_old_agent_submitted_is_requeued_then_followed_and_fetched_by_todays_client(
    old_tree: Path, slurm_cluster: SlurmCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sbatch script names the old agent's hash: its restart after the requeue runs the old runner again."""
    slurm_cluster.wait_idle()
    monkeypatch.setenv("SLURM_CONF", slurm_cluster.env()["SLURM_CONF"])  # today's agent asks squeue too
    root = Path(tempfile.mkdtemp(prefix="remote_magic-oldslurm-"))
    flag = root.parent / f"{root.name}.flag"
    new = AgentClient(LocalTransport(root=str(root)))
    try:
        answer = _run_old(
            old_tree,
            {
                "root": str(root),
                "jobs": {"job": {"cell": WAITING_CELL, "flag": str(flag), "slurm": {}, "until": "stdout"}},
            },
            env=slurm_cluster.env(),
        )
        job = answer["jobs"]["job"]["job_id"]
        slurm_id = json.loads((root / "jobs" / job / "slurm.json").read_text())["id"]
        assert f" {answer['agent_hash']} run-job " in (root / "jobs" / job / "slurm.sh").read_text()  # old runner
        slurm_cluster.run("scontrol", "requeue", slurm_id)  # what PreemptMode=REQUEUE does
        _wait(lambda: any(e["type"] == "requeued" for e in _events(root, job)), 30, "the old runner's requeued event")
        slurm_cluster.release(int(slurm_id))

        row = next(r for r in new.status() if r["job_id"] == job)
        assert row["state"] in ("requeued", "queued", "running") and row["launcher"].startswith("slurm:"), row
        follower = _Follower(new, job)
        seen = follower.seen
        _wait(lambda: sum(e["type"] == "stdout" for e in seen) >= 2, 60, "the restarted run's waiting line")
        flag.touch()
        follower.thread.join(60)
        assert not follower.thread.is_alive() and follower.error is None, follower.error
        final = follower.final
        assert final is not None and final["type"] == "done", final
        assert [e["seq"] for e in seen] == list(range(len(seen)))
        assert [e["slurm"]["restarts"] for e in seen if e["type"] == "started"] == [0, 1]
        assert [e["reason"] for e in seen if e["type"] == "requeued"] == ["preempted (SIGTERM from Slurm)"]
        values = session.fetch_outputs(new, job, final)
        assert values["released"] is True and values["restarts"] == "1"
        np.testing.assert_array_equal(values["tripled"], X * 3)
    finally:
        flag.touch()
        new.close()
        slurm_cluster.cancel_all()
        flag.unlink(missing_ok=True)
        shutil.rmtree(root, ignore_errors=True)


def test_a_slurm_spec_an_old_client_wrote_still_goes_to_the_slurm_launcher(
    old_host: OldHost, client: AgentClient
) -> None:
    """Even on a root whose host settings (written at today's ``hello``, no scheduler) say a plain host."""
    from remote_magic.agent.launch import process  # the agent's own choice, read where it makes it

    spec = old_host.slurm_spec
    assert spec["launcher"] == "slurm" and spec["slurm"]["partition"] == "debug"  # as the old client wrote it
    plain = {k: v for k, v in spec.items() if k not in ("launcher", "slurm")}
    if len(inspect.signature(process.launcher_for).parameters) == 1:
        launcher, default = process.launcher_for(spec), process.launcher_for(plain)
    else:  # launcher_for(root, spec): the host's settings decide only where the spec names no launcher
        client.hello()
        assert (old_host.root / "host.json").exists()
        root = str(old_host.root)
        launcher, default = process.launcher_for(root, spec), process.launcher_for(root, plain)
    assert launcher.name == "slurm" and default.name != "slurm"
