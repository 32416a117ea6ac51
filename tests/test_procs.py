"""Process identities and job tags, against real processes: a stale pid never hits a stranger,
and cancel reaches every process of a job, wherever it ran off to."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from remote_magic.agent import procs
from remote_magic.agent.procs import ProcessIdentity

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

# A job process that starts a child in its own session, a grandchild double-forked away to init,
# and a zombie it never reaps; it writes their pids to argv[1] once all exist, then waits.
TREE = r"""
import json, os, subprocess, sys, time
child = subprocess.Popen(["sleep", "60"], start_new_session=True)
r, w = os.pipe()
middle = os.fork()
if middle == 0:
    os.setsid()
    if os.fork() == 0:
        os.close(r)
        os.write(w, str(os.getpid()).encode())
        os.close(w)
        os.execvp("sleep", ["sleep", "60"])
    os._exit(0)
os.close(w)
os.waitpid(middle, 0)
grandchild = int(os.read(r, 32))
zombie = os.fork()
if zombie == 0:
    os._exit(0)
out = sys.argv[1]
with open(out + ".tmp", "w") as f:
    json.dump({"child": child.pid, "grandchild": grandchild, "zombie": zombie}, f)
os.rename(out + ".tmp", out)
time.sleep(60)
"""


class Processes:
    """Everything a test starts, so that all of it ends with the test, passed or failed."""

    def __init__(self) -> None:
        self.popens: list[subprocess.Popen[bytes]] = []
        self.identities: list[ProcessIdentity] = []
        self.job_ids: list[str] = []

    def job_id(self) -> str:
        job_id = f"test-procs-{uuid.uuid4().hex}"
        self.job_ids.append(job_id)
        return job_id

    def start(self, argv: list[str], job_id: str | None = None, **kwargs: object) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if k != procs.TAG_VARIABLE}
        if job_id is not None:
            env = procs.tag_environment(env, job_id)
        popen = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, **kwargs)  # type: ignore[call-overload]
        self.popens.append(popen)
        identity = procs.identity_of(popen.pid)
        assert identity is not None
        self.identities.append(identity)
        return popen

    def track(self, pid: int) -> ProcessIdentity:
        identity = procs.identity_of(pid)
        assert identity is not None, f"process {pid} is gone already"
        self.identities.append(identity)
        return identity

    def end_all(self) -> None:
        for job_id in self.job_ids:
            self.identities.extend(procs.tagged_processes(job_id))
        for identity in self.identities:
            procs.signal_process(identity, signal.SIGKILL)
        for popen in self.popens:
            if popen.poll() is None:
                popen.kill()
            popen.wait(timeout=10)
            if popen.stdout is not None:
                popen.stdout.close()


@pytest.fixture
def processes() -> Iterator[Processes]:
    started = Processes()
    try:
        yield started
    finally:
        started.end_all()


def wait_for(predicate: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def wait_ready(popen: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Until the process printed a line: its signal handlers are set up by then."""
    assert popen.stdout is not None
    ready, _, _ = select.select([popen.stdout], [], [], timeout)
    assert ready and popen.stdout.readline().strip() == b"ready", "the process did not start"


def state_of(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return None


def test_identity_of_a_live_process_matches(processes: Processes) -> None:
    sleeper = processes.start(["sleep", "60"])
    identity = procs.identity_of(sleeper.pid)
    assert identity is not None
    assert identity.pid == sleeper.pid
    assert identity.boot_id == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert procs.identity_of(sleeper.pid) == identity
    assert procs.is_running(identity)
    assert ProcessIdentity.from_json(json.loads(json.dumps(identity.to_json()))) == identity


def test_a_stale_identity_never_signals_the_process_that_holds_its_pid_now(processes: Processes) -> None:
    stranger = processes.start(["sleep", "60"])
    real = procs.identity_of(stranger.pid)
    assert real is not None
    # What a finished job's record looks like once its pid went to another process: another start time.
    stale = ProcessIdentity(stranger.pid, real.start_ticks + 1, real.boot_id)
    before_reboot = ProcessIdentity(stranger.pid, real.start_ticks, "another-boot")
    for identity in (stale, before_reboot):
        assert not procs.is_running(identity)
        assert not procs.signal_process(identity, signal.SIGKILL)
    time.sleep(0.1)
    assert stranger.poll() is None
    assert procs.is_running(real)


def test_signal_process_reaches_the_recorded_process(processes: Processes, monkeypatch: pytest.MonkeyPatch) -> None:
    for without_pidfd in (False, True):
        if without_pidfd:
            monkeypatch.delattr(os, "pidfd_open", raising=False)
        sleeper = processes.start(["sleep", "60"])
        identity = procs.identity_of(sleeper.pid)
        assert identity is not None
        assert procs.signal_process(identity, signal.SIGTERM)
        assert sleeper.wait(timeout=10) == -signal.SIGTERM
        assert not procs.is_running(identity)
        assert not procs.signal_process(identity, signal.SIGTERM)


def test_a_zombie_is_not_running(processes: Processes) -> None:
    sleeper = processes.start(["sleep", "60"])
    identity = procs.identity_of(sleeper.pid)
    assert identity is not None
    os.kill(sleeper.pid, signal.SIGKILL)  # and not reaped yet: a zombie
    wait_for(lambda: state_of(sleeper.pid) == "Z")
    assert not procs.is_running(identity)
    assert not procs.signal_process(identity, signal.SIGKILL)
    sleeper.wait(timeout=10)
    after = procs.identity_of(sleeper.pid)  # reaped: gone, or already someone else's pid
    assert after is None or after != identity


def test_a_command_name_with_spaces_and_parentheses_is_parsed(processes: Processes) -> None:
    renamer = processes.start(
        [
            sys.executable,
            "-c",
            "import time;open('/proc/self/comm','w').write(') Z 1 (x) 2 ');print('ready',flush=True);time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
    )
    before = procs.identity_of(renamer.pid)
    wait_ready(renamer)
    assert Path(f"/proc/{renamer.pid}/comm").read_text().strip() == ") Z 1 (x) 2"
    assert procs.identity_of(renamer.pid) == before
    assert before is not None and procs.is_running(before)
    line = "4242 (a) b (c) S 1 4242 4242 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 987654 100 1"
    parsed = procs._parse_stat(line)
    assert parsed is not None and (parsed.state, parsed.session, parsed.start_ticks) == ("S", 4242, 987654)
    assert procs._parse_stat("4242 (truncated") is None


@pytest.mark.parametrize(
    "record",
    [
        {"pid": 1234},
        1234,
        None,
        {"pid": 1234, "start_ticks": 5},
        {"pid": "1234", "start_ticks": 5, "boot_id": "b"},
        {"pid": 1234, "start_ticks": True, "boot_id": "b"},
        {"pid": 0, "start_ticks": 5, "boot_id": "b"},
        {"pid": -1, "start_ticks": 5, "boot_id": "b"},
        {"pid": 1234, "start_ticks": 5, "boot_id": ""},
    ],
)
def test_an_old_or_invalid_record_is_never_trusted(record: object) -> None:
    assert ProcessIdentity.from_json(record) is None


def test_tag_environment_copies_and_refuses_empty_ids() -> None:
    env = {"PATH": "/bin"}
    assert procs.tag_environment(env, "j1") == {"PATH": "/bin", procs.TAG_VARIABLE: "j1"}
    assert env == {"PATH": "/bin"}
    for bad in ("", "a\0b"):
        with pytest.raises(ValueError):
            procs.tag_environment(env, bad)
        with pytest.raises(ValueError):
            procs.tagged_processes(bad)


def start_tree(processes: Processes, job_id: str, tmp_path: Path) -> dict[str, ProcessIdentity]:
    out = tmp_path / "tree.json"
    top = processes.start([sys.executable, "-c", TREE, str(out)], job_id=job_id)
    wait_for(lambda: out.exists() or top.poll() is not None)
    assert top.poll() is None, "the job process ended early"
    pids = json.loads(out.read_text())
    tree = {"top": procs.identity_of(top.pid)}
    tree.update({name: processes.track(pids[name]) for name in ("child", "grandchild")})
    assert all(tree.values())
    wait_for(lambda: state_of(pids["zombie"]) == "Z")
    return tree | {"zombie": pids["zombie"]}  # type: ignore[return-value,operator]


def test_every_process_of_a_job_is_found_and_ended(processes: Processes, tmp_path: Path) -> None:
    job_id = processes.job_id()
    tree = start_tree(processes, job_id, tmp_path)
    zombie = tree.pop("zombie")
    untagged = processes.start(["sleep", "60"])
    other_job = processes.start(["sleep", "60"], job_id=processes.job_id())
    prefix_job = processes.start(["sleep", "60"], job_id=job_id + "0")  # only the exact entry counts

    found = procs.tagged_processes(job_id)
    assert set(found) == set(tree.values())
    assert zombie not in {p.pid for p in found}

    grace = 5.0
    began = time.monotonic()
    result = procs.terminate_tagged(job_id, grace)
    assert time.monotonic() - began < grace
    assert result == {"terminated": 3, "killed": 0, "remaining": 0}
    assert not any(procs.is_running(p) for p in tree.values())
    assert procs.tagged_processes(job_id) == []
    for survivor in (untagged, other_job, prefix_job):
        assert survivor.poll() is None


def test_a_process_that_ignores_sigterm_is_killed_after_the_grace_period(processes: Processes) -> None:
    job_id = processes.job_id()
    stubborn = processes.start(
        [
            sys.executable,
            "-c",
            "import signal,time;signal.signal(signal.SIGTERM,signal.SIG_IGN);print('ready',flush=True);time.sleep(60)",
        ],
        job_id=job_id,
        stdout=subprocess.PIPE,
    )
    wait_ready(stubborn)
    grace = 1.0
    began = time.monotonic()
    result = procs.terminate_tagged(job_id, grace)
    took = time.monotonic() - began
    assert grace <= took < grace + 3
    assert result == {"terminated": 0, "killed": 1, "remaining": 0}
    assert stubborn.wait(timeout=10) == -signal.SIGKILL


def test_the_runner_and_its_untagged_forks_are_ended_too(processes: Processes) -> None:
    """A runner tagged only after it started (a warm runner) forks children without the tag."""
    job_id = processes.job_id()
    runner = processes.start(
        [
            sys.executable,
            "-c",
            "import os,time\nif os.fork()==0:\n time.sleep(60);os._exit(0)\nprint('ready',flush=True);time.sleep(60)",
        ],
        start_new_session=True,
        stdout=subprocess.PIPE,
    )
    wait_ready(runner)
    identity = procs.identity_of(runner.pid)
    assert identity is not None
    forks = [p for p in procs.job_processes(job_id, identity) if p != identity]
    assert len(forks) == 1
    processes.identities.extend(forks)
    assert procs.tagged_processes(job_id) == []

    result = procs.terminate_tagged(job_id, 5.0, also=identity)
    assert result == {"terminated": 2, "killed": 0, "remaining": 0}
    assert runner.wait(timeout=10) == -signal.SIGTERM
    assert not procs.is_running(forks[0])


def test_a_runner_that_is_not_a_session_leader_brings_no_strangers(processes: Processes) -> None:
    """Without its own session, the runner's session is someone else's (here: the test's)."""
    job_id = processes.job_id()
    neighbour = processes.start(["sleep", "60"])
    runner = processes.start(["sleep", "60"])
    identity = procs.identity_of(runner.pid)
    assert identity is not None
    assert procs.job_processes(job_id, identity) == [identity]
    assert procs.terminate_tagged(job_id, 5.0, also=identity) == {"terminated": 1, "killed": 0, "remaining": 0}
    assert runner.wait(timeout=10) == -signal.SIGTERM
    assert neighbour.poll() is None
