"""A GPU queue shared by the users of one host (host setting ``queue``), on simulated GPUs (a fake ``nvidia-smi``).

Two real Unix users log in through a test sshd and share one group-writable
queue folder: each one's dispatcher starts only that user's jobs, in the one
order of the shared queue.  Creating the users needs root (CI runs as root);
they are removed again at the end.  The users cannot read this checkout's
Python (under /root), so their agents run the system Python with copies of
cloudpickle and numpy (what the agent requires of a host's Python).
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cloudpickle
import fake_nvidia_smi as fake
import pytest
from conftest import run
from host_processes import kill_processes_under, processes_under
from sshd import Sshd, make_sshd

from remote_magic.agent import bootstrap
from remote_magic.agent.digest import file_name
from remote_magic.agent.launch import queue_folder

GROUP = "rm-gpuqueue"
USERS = ("rm-alice", "rm-bob")
SYSTEM_PYTHON = "/usr/bin/python3"
CELL = "import os, time\nseen = os.environ.get('CUDA_VISIBLE_DEVICES')\nbegan = time.time()\ntime.sleep({s})\nended = time.time()\n"


@dataclass
class SharedHost:
    sshd: Sshd
    base: Path
    queue: Path
    roots: dict[str, Path]  # user -> their host root
    gpus: Path  # the simulated GPUs' state file


def _ensure_users(homes: Path) -> None:
    """The group and both users, with homes under ``homes`` ("*": no password, but not a locked account)."""
    try:
        grp.getgrnam(GROUP)
    except KeyError:
        subprocess.run(["groupadd", GROUP], check=True)
    for user in USERS:
        home = homes / user
        try:
            pwd.getpwnam(user)
            subprocess.run(["usermod", "-d", str(home), user], check=True)
        except KeyError:
            subprocess.run(
                ["useradd", "-N", "-p", "*", "-g", GROUP, "-s", "/bin/sh", "-d", str(home), user], check=True
            )
        home.mkdir(mode=0o700, exist_ok=True)
        os.chown(home, pwd.getpwnam(user).pw_uid, -1)


def _end_users() -> None:
    for user in USERS:
        subprocess.run(["pkill", "-KILL", "-u", user], check=False)
    time.sleep(0.2)
    for user in USERS:
        subprocess.run(["userdel", user], check=False, capture_output=True)
    subprocess.run(["groupdel", GROUP], check=False, capture_output=True)


@pytest.fixture(scope="module")
def shared_base(tmp_path_factory) -> Iterator[SharedHost]:  # type: ignore[no-untyped-def]
    """The two users (one of them hostile), their sshd, 4 simulated GPUs: made once for every test here."""
    if os.getuid() != 0 or not os.access(SYSTEM_PYTHON, os.X_OK) or not shutil.which("useradd"):
        pytest.skip("two real users need root, useradd and a system Python (CI has them)")
    base = Path(tempfile.mkdtemp(prefix="rm-shared-queue-", dir="/tmp"))
    sshd = None
    try:
        base.chmod(0o755)
        _ensure_users(base)
        site = base / "site"  # the users' Python: the system one, with what the agent requires
        packages = Path(cloudpickle.__file__).parent.parent
        for pattern in ("cloudpickle", "cloudpickle-*.dist-info", "numpy", "numpy.libs", "numpy-*.dist-info"):
            for found in packages.glob(pattern):
                shutil.copytree(found, site / found.name, symlinks=True)
        python = base / "python"
        python.write_text(f'#!/bin/sh\nPYTHONPATH={site} exec {SYSTEM_PYTHON} "$@"\n')
        python.chmod(0o755)
        state = fake.write_state(base / "gpus.json", gpus=4)
        state.chmod(0o644)
        fake.install(base / "bin", state, python=SYSTEM_PYTHON, copy=True)
        keys = base / "authorized_keys"
        sshd = make_sshd(
            tmp_path_factory.mktemp("sshd"),
            alias="alice",
            extra_config=f"Match User {','.join(USERS)}\n  AuthorizedKeysFile {keys}",
        )
        shutil.copy(sshd.dir / "client_ed25519.pub", keys)
        keys.chmod(0o644)
        sshd.add_env(
            {
                "PATH": fake.path_with(base / "bin", "/usr/bin:/bin"),
                "REMOTE_MAGIC_GPU_SAMPLE_SECONDS": "0.5",
                "REMOTE_MAGIC_QUEUE_STALE_SECONDS": str(STALE),
            }
        )
        config_dir = tmp_path_factory.mktemp("ssh-config")
        configs = [sshd.write_client_config(config_dir / f"{u}.conf", u.removeprefix("rm-"), User=u) for u in USERS]
        sshd.ssh_config.write_text("".join(c.read_text() for c in configs))
        sshd.start()
        yield SharedHost(sshd, base, base / "queue", {}, state)
    finally:
        if sshd is not None:
            sshd.stop()
        _end_users()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def shared_host(shared_base: SharedHost, ip) -> Iterator[SharedHost]:  # type: ignore[no-untyped-def]
    """A fresh queue folder, made as README says (``install -d -m 3770 -g GROUP``), and fresh host roots."""
    global _COUNT
    _COUNT += 1
    queue = shared_base.base / f"queue-{_COUNT}"
    queue.mkdir()
    os.chown(queue, -1, grp.getgrnam(GROUP).gr_gid)
    queue.chmod(0o3770)
    roots = {user: shared_base.base / user / f".remote_magic-{_COUNT}" for user in USERS}
    fake.save_state(shared_base.gpus, json.loads(json.dumps(fake.read_state(shared_base.gpus))) | {"processes": []})
    host = SharedHost(shared_base.sshd, shared_base.base, queue, roots, shared_base.gpus)
    yield host
    magics = ip.magics_manager.registry["RemoteMagics"]
    magics.stop_background()
    magics.connections.close()  # before the users' processes go: their agents serve these connections
    for user in USERS:
        subprocess.run(["pkill", "-KILL", "-u", user], check=False)


_COUNT = 0
STALE = 4  # seconds: the host's grace for a record nobody vouches for (REMOTE_MAGIC_QUEUE_STALE_SECONDS)


def _configure(ip, host: SharedHost) -> None:  # type: ignore[no-untyped-def]
    magics = ip.magics_manager.registry["RemoteMagics"]
    magics.ssh_config = str(host.sshd.ssh_config)
    python = str(host.base / "python")
    magics.hosts = {
        u.removeprefix("rm-"): {"python": python, "root": str(host.roots[u]), "queue": str(host.queue)} for u in USERS
    }


def _events(root: Path, job_id: str) -> list[dict]:
    path = root / "jobs" / job_id / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _wait_ended(host: SharedHost, jobs: dict[str, str], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        last = {j: (_events(host.roots[u], j)[-1:] or [{}])[0].get("type") for j, u in jobs.items()}
        if all(t in ("done", "error", "cancelled") for t in last.values()):
            assert set(last.values()) == {"done"}, {j: _events(host.roots[u], j)[-1] for j, u in jobs.items()}
            return
        time.sleep(0.2)
    raise AssertionError({j: _events(host.roots[u], j)[-1:] for j, u in jobs.items()})


def _submit(ip, host: str, options: str, seconds: float) -> str:  # type: ignore[no-untyped-def]
    magics = ip.magics_manager.registry["RemoteMagics"]
    before = {r.job_id for r in magics.registry.records()}
    result = run(ip, f"%%remote_train --host {host} {options} --detach --no-inject\n" + CELL.format(s=seconds))
    assert result.success, result.error_in_exec
    [job] = [r.job_id for r in magics.registry.records() if r.job_id not in before]
    return job


def _outputs(root: Path, job_id: str) -> dict:
    from remote_magic.project import payload

    done = _events(root, job_id)[-1]
    buffers = [(root / "blobs" / file_name(digest)).read_bytes() for digest, _ in done.get("blobs", [])]
    return payload.unpack((root / "jobs" / job_id / "outputs.pkl").read_bytes(), buffers)


def test_two_users_share_one_gpu_queue_in_one_order_simulated_gpus(ip, shared_host: SharedHost) -> None:
    magics = ip.magics_manager.registry["RemoteMagics"]
    _configure(ip, shared_host)
    alice, bob = (shared_host.roots[u] for u in USERS)
    first = _submit(ip, "alice", "--gpus all", 3)  # holds all 4 GPUs
    second = _submit(ip, "bob", "--gpus 2", 1)  # waits for alice's job
    third = _submit(ip, "alice", "--gpus all", 0)  # behind bob's: strict order across users
    time.sleep(0.5)
    waited = [e for e in _events(bob, second) if e["type"] == "queued" and e.get("reason")]
    assert waited and waited[-1]["reason"] == "waiting for 2 GPUs: 0,1,2,3 by a job of rm-alice", waited
    assert any("behind 1 earlier job" in e.get("reason", "") for e in _events(alice, third))
    # Every agent server and connection goes: only the two users' dispatchers are left to start the rest.
    magics.stop_background()
    magics.connections.close()
    shared_host.sshd.drop_connections()
    _wait_ended(shared_host, {first: "rm-alice", second: "rm-bob", third: "rm-alice"})
    runs = {j: _outputs(root, j) for j, root in ((first, alice), (second, bob), (third, alice))}
    assert runs[first]["seen"] == "0,1,2,3" and len(runs[second]["seen"].split(",")) == 2
    assert runs[first]["ended"] <= runs[second]["began"]  # bob's job waited for alice's GPUs
    assert runs[second]["ended"] <= runs[third]["began"]  # alice's later job did not overtake bob's
    # The shared folder holds only group-readable records; each user's own root stays closed.
    records = [p for p in shared_host.queue.rglob("*") if p.is_file()]
    assert records and all(stat.S_IMODE(p.stat().st_mode) & 0o007 == 0 for p in records)
    assert all(p.stat().st_gid == grp.getgrnam(GROUP).gr_gid for p in records)
    assert stat.S_IMODE(alice.stat().st_mode) == 0o700 and (alice / queue_folder.QUEUE_DIR).is_symlink()


def _local_host_on(ip, queue: Path, tmp_path: Path) -> tuple[Path, Any]:  # type: ignore[no-untyped-def]
    """The local host with a root of its own, on the shared queue ``queue``."""
    root = tmp_path / "hostroot"
    magics = ip.magics_manager.registry["RemoteMagics"]
    magics.hosts = {**magics.hosts, "local": {"root": str(root), "queue": str(queue)}}
    magics.connections.close()
    return root, magics


def test_an_entry_whose_owner_has_no_dispatcher_left_blocks_nobody_simulated_gpus(ip, tmp_path, monkeypatch) -> None:
    """Another user's entry, queued long ago, whose dispatcher is gone: our job is not held behind it."""
    state = fake.write_state(tmp_path / "gpus.json", gpus=2)
    fake.install(tmp_path / "bin", state)
    monkeypatch.setenv("PATH", fake.path_with(tmp_path / "bin"))
    monkeypatch.setenv("REMOTE_MAGIC_QUEUE_STALE_SECONDS", "2")  # the host's grace period, shortened for the test
    queue = tmp_path / "shared-queue"
    queue.mkdir()
    queue.chmod(0o3770)
    someone = os.getuid() + 1
    folder = queue / f"u{someone}-gone"  # another user's folder in the shared queue, as its agent makes it
    folder.mkdir(mode=0o2750)
    entry = folder / "00000000000000000001-20260101-000000-abcdef.json"
    entry.write_text(json.dumps({"job_id": "20260101-000000-abcdef", "wanted": -1, "sweep": None}))
    os.chown(folder, someone, -1)
    os.chown(entry, someone, -1)
    time.sleep(2.5)  # written before the grace period: it counts only while its owner's dispatcher runs
    root, magics = _local_host_on(ip, queue, tmp_path)
    try:
        job = _submit(ip, "local", "--gpus 1", 0)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(e["type"] == "done" for e in _events(root, job)):
            time.sleep(0.2)
        assert _outputs(root, job)["seen"] == "0"
        assert (root / queue_folder.QUEUE_DIR).resolve().parent == queue.resolve()
    finally:
        magics.connections.close()
        kill_processes_under(root)


def test_a_missing_shared_queue_folder_is_a_clear_error(ip, tmp_path, monkeypatch) -> None:
    state = fake.write_state(tmp_path / "gpus.json", gpus=1)
    fake.install(tmp_path / "bin", state)
    monkeypatch.setenv("PATH", fake.path_with(tmp_path / "bin"))
    missing = tmp_path / "no-such-queue"
    magics = ip.magics_manager.registry["RemoteMagics"]
    magics.hosts = {**magics.hosts, "local": {"root": str(tmp_path / "hostroot"), "queue": str(missing)}}
    magics.connections.close()
    try:
        result = run(ip, "%%remote_train --gpus 1\nx = 1\n")
        assert not result.success
        message = str(result.error_in_exec)
        assert str(missing) in message and "sudo install -d -m 3770 -g GROUP" in message, message
        assert "x" not in ip.user_ns
    finally:
        magics.connections.close()


# -- a hostile member (rm-bob) against rm-alice: every attack of the second review ------------------------------

VICTIM, ATTACKER = USERS
PLANTED = ("subprocess", "json", "fcntl", "tempfile", "shutil", "signal", "socket", "secrets", "random", "pwd")


def _as(user: str, code: str) -> str:
    """Run Python ``code`` as ``user`` (its groups included) from ``/``; its stdout."""
    entry = pwd.getpwnam(user)
    done = subprocess.run(
        ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--init-groups", SYSTEM_PYTHON, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _attacker_folder(host: SharedHost) -> Path:
    """A folder of the attacker's own in the shared queue, as its agent would make it."""
    uid = pwd.getpwnam(ATTACKER).pw_uid
    _as(ATTACKER, f"import os; os.mkdir({str(host.queue / f'u{uid}-hostile')!r}, 0o2750)")
    return host.queue / f"u{uid}-hostile"


def _write_as(user: str, files: dict[Path, str]) -> None:
    code = "".join(f"open({str(p)!r}, 'w').write({text!r})\n" for p, text in files.items())
    _as(user, code)


def _started_at(root: Path, job: str) -> float:
    return next(e["t"] for e in _events(root, job) if e["type"] == "started")


def _live_process(user: str) -> tuple[subprocess.Popen, dict]:  # type: ignore[type-arg]
    """A process of ``user`` (``sleep 120``) and its identity as the agent records one."""
    process = subprocess.Popen(
        ["setpriv", f"--reuid={pwd.getpwnam(user).pw_uid}", "--regid=0", "--clear-groups", "sleep", "120"]
    )
    for _ in range(100):
        if Path(f"/proc/{process.pid}/status").read_text().count(f"\t{pwd.getpwnam(user).pw_uid}\t") >= 1:
            break
        time.sleep(0.02)
    ticks = int(Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return process, {"pid": process.pid, "start_ticks": ticks, "boot_id": boot}


def _marks(host: SharedHost) -> Path:
    marks = host.base / "marks"
    marks.mkdir(exist_ok=True)
    marks.chmod(0o1777)
    return marks


def test_a_forged_record_or_a_planted_module_never_runs_code_as_another_user_simulated_gpus(
    ip, shared_host: SharedHost
) -> None:
    """Bob copies alice's queue record, points it at an agent of his own and puts it first, and drops modules
    named like the stdlib's into every shared folder: alice's jobs run in order and none of his code runs as her."""
    _configure(ip, shared_host)
    alice = shared_host.roots[VICTIM]
    marks = _marks(shared_host)
    evil = shared_host.base / "evil" / "remote_magic" / "agent"
    evil.mkdir(parents=True)
    payload = f"import os\nopen(os.path.join({str(marks)!r}, 'ran-as-%d' % os.getuid()), 'w').close()\n"
    for name in ("__init__.py", "cli.py", "entry.py"):
        (evil / name).write_text(payload + ("def main(*a):\n    return 0\n" if name == "entry.py" else ""))
    (evil.parent / "__init__.py").write_text(payload)
    for folder in (evil, evil.parent, evil.parent.parent):
        folder.chmod(0o755)
    holder = _submit(ip, "alice", "--gpus all", 3)
    waiting = _submit(ip, "alice", "--gpus all", 0)
    [own] = [p for p in shared_host.queue.iterdir() if p.name.startswith(f"u{pwd.getpwnam(VICTIM).pw_uid}-")]
    [entry] = [p for p in own.iterdir() if p.name.endswith(".json") and waiting in p.name]
    mine = _attacker_folder(shared_host)
    forged = json.loads(_as(ATTACKER, f"print(open({str(entry)!r}).read())"))  # group members may read it
    forged |= {"agent": str(evil.parent.parent), "root": str(alice), "uid": pwd.getpwnam(VICTIM).pw_uid}
    planted = {shared_host.queue / f"{m}.py": payload for m in PLANTED} | {mine / f"{m}.py": payload for m in PLANTED}
    _write_as(
        ATTACKER,
        {
            mine / f"{0:020d}-{waiting}.json": json.dumps(forged),
            shared_host.queue / f"{0:020d}-{waiting}.json": json.dumps(forged),  # where an older agent looked
            **planted,
        },
    )
    refused = _as(ATTACKER, f"try:\n open({str(own / 'x.json')!r}, 'w')\nexcept PermissionError:\n print('refused')")
    assert refused.strip() == "refused"  # nobody writes into another member's folder
    _wait_ended(shared_host, {holder: VICTIM, waiting: VICTIM})
    assert _started_at(alice, waiting) >= _outputs(alice, holder)["ended"]
    assert sorted(p.name for p in marks.iterdir()) == []  # no code of bob's ran, as alice or anyone
    # An agent version that is a path is refused before anything is imported from it.
    done = subprocess.run(
        [SYSTEM_PYTHON, "-c", bootstrap.RUN, str(alice), str(evil.parent.parent), "dispatch"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2 and "not an agent version" in done.stderr and not list(marks.iterdir())


def test_hostile_files_in_the_shared_folder_neither_expose_nor_stop_the_victim_simulated_gpus(
    ip, shared_host: SharedHost
) -> None:
    """Links, FIFOs, malformed, huge and future-dated records, and held records that borrow the victim's
    processes: the victim's files stay closed, `%remote_status` works, and her jobs finish in order."""
    _configure(ip, shared_host)
    alice_home = shared_host.base / VICTIM
    secret = alice_home / "secret"
    secret.write_text("alice's secret")
    os.chown(secret, pwd.getpwnam(VICTIM).pw_uid, -1)
    secret.chmod(0o600)
    victims_process, borrowed = _live_process(VICTIM)  # a process of alice's that bob's records name as theirs
    try:
        mine = _attacker_folder(shared_host)
        job = "20261207-000000-abcdef"
        _as(
            ATTACKER,
            "import os, json\n"
            f"q, m = {str(shared_host.queue)!r}, {str(mine)!r}\n"
            f"os.symlink({str(secret)!r}, os.path.join(q, '.lock'))\n"
            f"os.symlink({str(alice_home)!r}, os.path.join(q, 'held'))\n"
            f"os.symlink({str(alice_home)!r}, os.path.join(q, 'u{pwd.getpwnam(ATTACKER).pw_uid}-link'))\n"
            "os.mkfifo(os.path.join(q, 'x.json'))\n"
            "os.mkfifo(os.path.join(m, 'f.json'))\n"
            f"os.mkfifo(os.path.join(q, 'u{pwd.getpwnam(VICTIM).pw_uid}-fifo'))\n"
            "for n, t in [('a', {'job_id': 'x'}), ('b', {}), ('c', []), ('d', {'job_id': "
            f"{job!r}, 'wanted': 'all'}}), ('e', {{'job_id': {job!r}, 'wanted': -1, 't': 9e12}})]:\n"
            "    open(os.path.join(m, n + '.json'), 'w').write(json.dumps(t))\n"
            "open(os.path.join(m, 'big.json'), 'w').write('[' * 100000 + ']' * 100000)\n"
            "open(os.path.join(m, 'deep.json'), 'w').write('[' * 30000 + ']' * 30000)\n"
            f"open(os.path.join(m, 'dispatcher.id'), 'w').write(json.dumps({borrowed!r}))\n"
            "os.mkdir(os.path.join(m, 'held'), 0o2750)\n"
            f"open(os.path.join(m, 'held', 'b.json'), 'w').write(json.dumps({{'job_id': {job!r}, 'gpus': [0, 1, 2, 3],"
            f" 'identity': {borrowed!r}}}))\n"
            f"open(os.path.join(m, 'held', 'c.json'), 'w').write(json.dumps({{'job_id': {job!r}, 'gpus': [0, 1, 2, 3],"
            " 't': 9e12}))\n",
        )
        written = time.monotonic()
        first = _submit(ip, "alice", "--gpus all", 1)
        second = _submit(ip, "alice", "--gpus 2", 0)
        result = run(ip, "%remote_status --host alice")
        assert result.success, result.error_in_exec
        _wait_ended(shared_host, {first: VICTIM, second: VICTIM}, timeout=60)
        alice = shared_host.roots[VICTIM]
        # Bob's unvouched held record counted for the grace period only, never longer.
        assert _started_at(alice, first) - time.time() + time.monotonic() - written < STALE + 5
        assert _started_at(alice, second) >= _outputs(alice, first)["ended"]
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and secret.read_text() == "alice's secret"
        assert not (alice / "dispatcher.log").exists() or "Traceback" not in (alice / "dispatcher.log").read_text()
    finally:
        victims_process.kill()
        victims_process.wait()


def test_another_users_entry_can_neither_jump_the_queue_nor_hold_free_gpus_past_the_grace_simulated_gpus(
    ip, shared_host: SharedHost
) -> None:
    """Bob's entry named to sort first, written after alice's, stays behind it; an entry of his whose GPUs are free
    and that his (live) dispatcher never starts stops holding alice's later job after the grace period."""
    _configure(ip, shared_host)
    alice = shared_host.roots[VICTIM]
    holder = _submit(ip, "alice", "--gpus all", 3)
    ahead = _submit(ip, "alice", "--gpus 1", 1)
    mine = _attacker_folder(shared_host)
    sleeper, identity = _live_process(ATTACKER)  # his own dispatcher, as his record says
    try:
        _write_as(
            ATTACKER,
            {
                mine / "dispatcher.id": json.dumps(identity),
                mine / f"{0:020d}-20261207-000000-bbbbbb.json": json.dumps(
                    {"job_id": "20261207-000000-bbbbbb", "wanted": -1}
                ),
            },
        )
        time.sleep(1.0)
        reasons = [e["reason"] for e in _events(alice, ahead) if e["type"] == "queued" and e.get("reason")]
        assert reasons and "behind" not in reasons[-1], reasons  # still first in line
        behind = _submit(ip, "alice", "--gpus 1", 0)
        _wait_ended(shared_host, {holder: VICTIM, ahead: VICTIM, behind: VICTIM}, timeout=60)
        freed = _outputs(alice, ahead)["ended"]
        # Strict order held it behind bob's entry while his dispatcher might start it; past the grace, not longer.
        assert _started_at(alice, behind) - freed < STALE + 3
        assert _started_at(alice, ahead) >= _outputs(alice, holder)["ended"]
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_queue_an_older_agent_shared_moves_into_a_folder_of_our_own_simulated_gpus(ip, tmp_path, monkeypatch) -> None:
    """An older agent linked the host root to the shared folder itself and kept its records at its top (and held/);
    the next submit moves ours into a folder of our own, sets the sticky bit on a folder we own, and every job runs
    in order."""
    state = fake.write_state(tmp_path / "gpus.json", gpus=4)
    fake.install(tmp_path / "bin", state)
    monkeypatch.setenv("PATH", fake.path_with(tmp_path / "bin"))
    queue = tmp_path / "shared-queue"
    queue.mkdir()
    queue.chmod(0o2770)  # as the older README made it: no sticky bit
    root, magics = _local_host_on(ip, queue, tmp_path)
    try:
        holder = _submit(ip, "local", "--gpus all", 3)
        waiting = _submit(ip, "local", "--gpus all", 0)
        for pid in processes_under(root):  # the dispatcher: the older agent's would have been gone
            if b"dispatch" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                os.kill(pid, signal.SIGKILL)
        own = (root / queue_folder.QUEUE_DIR).resolve()
        (queue / "held").mkdir()
        me = {"uid": os.getuid(), "user": "root", "root": str(root.resolve()), "agent": "0" * 16, "t": time.time()}
        for record in own.glob("*.json"):  # the waiting job's entry, as the older agent wrote it
            (queue / record.name).write_text(json.dumps(json.loads(record.read_text()) | me))
            record.unlink()
        for record in (own / "held").glob("*.json"):
            (queue / "held" / record.name).write_text(json.dumps(json.loads(record.read_text()) | me))
            record.unlink()
        (root / queue_folder.QUEUE_DIR).unlink()
        (root / queue_folder.QUEUE_DIR).symlink_to(queue)
        later = _submit(ip, "local", "--gpus 1", 0)
        assert (root / queue_folder.QUEUE_DIR).resolve().parent == queue.resolve()
        assert queue.stat().st_mode & stat.S_ISVTX  # ours: upgraded in place
        deadline = time.monotonic() + 60
        ended = {"done", "error", "cancelled"}
        while time.monotonic() < deadline and not all(
            (_events(root, j)[-1:] or [{}])[0].get("type") in ended for j in (holder, waiting, later)
        ):
            time.sleep(0.2)
        runs = {j: _outputs(root, j) for j in (holder, waiting, later)}
        assert runs[holder]["ended"] <= runs[waiting]["began"] <= runs[waiting]["ended"] <= runs[later]["began"]
        assert not list(queue.glob("*.json")) and not list((queue / "held").glob("*.json"))
    finally:
        magics.connections.close()
        kill_processes_under(root)


def test_a_member_holding_the_queues_lock_stops_the_victim_no_longer_than_the_grace_simulated_gpus(
    ip, shared_host: SharedHost
) -> None:
    """Any member can flock the shared folder; the victim waits for it at most the grace period, then goes on."""
    _configure(ip, shared_host)
    alice = shared_host.roots[VICTIM]
    entry = pwd.getpwnam(ATTACKER)
    holder = subprocess.Popen(
        ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--init-groups", SYSTEM_PYTHON, "-c",
         "import fcntl, os, sys, time\nfcntl.flock(os.open(sys.argv[1], os.O_RDONLY), fcntl.LOCK_EX)\n"
         "print('held', flush=True)\ntime.sleep(120)\n", str(shared_host.queue)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        began = time.time()
        first = _submit(ip, "alice", "--gpus all", 1)
        second = _submit(ip, "alice", "--gpus all", 0)
        _wait_ended(shared_host, {first: VICTIM, second: VICTIM}, timeout=60)
        assert _started_at(alice, first) - began < 2 * STALE + 3  # each submit waited the grace at most
        assert _started_at(alice, second) - _outputs(alice, first)["ended"] < 3  # then rounds go on promptly
        for job in (first, second):  # two rounds of hers never overlap, even without the shared lock
            assert sum(e["type"] == "started" for e in _events(alice, job)) == 1
        assert "stayed locked" in (alice / "agent.log").read_text()
    finally:
        holder.kill()
        holder.wait()


def test_a_member_cannot_slow_the_rounds_or_hide_others_with_many_records_links_or_files_simulated_gpus(
    ip, shared_host: SharedHost
) -> None:
    """One large record hard-linked into thousands of names in many folders, then 20,000 junk files at the top:
    each round still reads a bounded amount, and another user's running job still counts (it is not hidden)."""
    _configure(ip, shared_host)
    alice, bob = shared_host.roots[VICTIM], shared_host.roots[ATTACKER]
    uid = pwd.getpwnam(ATTACKER).pw_uid
    record = json.dumps({"job_id": "20261207-000000-cccccc", "wanted": -1, "pad": [0] * 20000})
    _as(
        ATTACKER,
        "import os, json\n"
        f"q = {str(shared_host.queue)!r}\n"
        f"one = os.path.join(q, 'u{uid}-slow0', 'a.json')\n"
        f"for f in range(12):\n    os.mkdir(os.path.join(q, 'u{uid}-slow%d' % f), 0o2750)\n"
        f"    open(os.path.join(q, 'u{uid}-slow%d' % f, 'dispatcher.id'), 'w').write('{{}}')\n"
        f"open(one, 'w').write({record!r})\n"
        "for f in range(12):\n    for i in range(3000):\n"
        f"        if (f, i) != (0, 0):\n            os.link(one, os.path.join(q, 'u{uid}-slow%d' % f, '%d.json' % i))\n",
    )
    began = time.monotonic()
    first = _submit(ip, "alice", "--gpus 1", 0)
    assert time.monotonic() - began < 3  # the submit's round read a bounded amount
    _as(
        ATTACKER,
        f"import os\nfor i in range(20000):\n    open(os.path.join({str(shared_host.queue)!r}, 'a%05d' % i), 'w')",
    )
    running = _submit(ip, "bob", "--gpus 2", 6)  # bob's real job holds 2 GPUs
    job = _submit(ip, "alice", "--gpus 4", 0)
    _wait_ended(shared_host, {first: VICTIM, running: ATTACKER, job: VICTIM}, timeout=60)
    assert _started_at(alice, job) >= _outputs(bob, running)["ended"]  # bob's job was seen through the junk


def test_no_show_entries_dormant_entries_and_renamed_folders_cannot_hold_back_or_overtake_the_victim_simulated_gpus(
    ip, shared_host: SharedHost
) -> None:
    """Four entries that a live 'dispatcher' never starts hold alice's job back for one grace period, not four;
    an entry written before alice's, dormant while she queued, and records renamed in from a hidden folder stay
    behind her job."""
    _configure(ip, shared_host)
    alice = shared_host.roots[VICTIM]
    uid = pwd.getpwnam(ATTACKER).pw_uid
    q = shared_host.queue
    dormant = {q / f"u{uid}-dormant" / f"{i}.json": json.dumps({"job_id": f"20261207-000000-d0000{i}", "wanted": -1})
               for i in range(2)}  # fmt: skip
    _as(ATTACKER, f"import os\nos.mkdir({str(q / f'u{uid}-dormant')!r}, 0o2750)\nos.mkdir({str(q / '.stash')!r})")
    _write_as(
        ATTACKER, dormant | {q / ".stash" / "s.json": json.dumps({"job_id": "20261207-000000-eeeeee", "wanted": -1})}
    )
    time.sleep(STALE + 0.5)  # written long ago: not counting (no dispatcher of his runs)
    holder = _submit(ip, "alice", "--gpus all", 2)
    waiting = _submit(ip, "alice", "--gpus all", 0)
    sleeper, identity = _live_process(ATTACKER)
    try:
        _as(ATTACKER, f"import os\nos.rename({str(q / '.stash')!r}, {str(q / f'u{uid}-renamed')!r})")
        _write_as(ATTACKER, {q / f"u{uid}-dormant" / "dispatcher.id": json.dumps(identity)})
        no_show = q / f"u{uid}-noshow"
        _as(ATTACKER, f"import os\nos.mkdir({str(no_show)!r}, 0o2750)")
        time.sleep(1.0)  # alice's queue sees the dormant one count again: behind her
        _write_as(
            ATTACKER,
            {no_show / "dispatcher.id": json.dumps(identity)}
            | {
                no_show / f"{i}.json": json.dumps({"job_id": f"20261207-000000-f0000{i}", "wanted": -1})
                for i in range(4)
            },
        )
        time.sleep(1.0)
        reasons = [e["reason"] for e in _events(alice, waiting) if e["type"] == "queued" and e.get("reason")]
        assert reasons and "behind" not in reasons[-1], reasons  # first in line, whatever bob did
        later = _submit(ip, "alice", "--gpus all", 0)  # behind bob's four no-shows
        _wait_ended(shared_host, {holder: VICTIM, waiting: VICTIM, later: VICTIM}, timeout=90)
        freed = _outputs(alice, holder)["ended"]
        assert _started_at(alice, waiting) - freed < 3
        assert _started_at(alice, later) - _outputs(alice, waiting)["ended"] < STALE + 4  # one grace, not four
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_shared_folder_a_member_owns_is_refused_and_flipping_records_do_not_grow_the_victims_log_simulated_gpus(
    ip, shared_host: SharedHost
) -> None:
    """The owner of a sticky folder may still delete anything in it: only root's (or one's own) is accepted.
    And another user's held record that changes every 0.3 s adds at most a line per 10 s to a waiting job's log."""
    _configure(ip, shared_host)
    alice = shared_host.roots[VICTIM]
    owned = shared_host.base / f"queue-owned-{_COUNT}"
    owned.mkdir()
    os.chown(owned, pwd.getpwnam(ATTACKER).pw_uid, grp.getgrnam(GROUP).gr_gid)
    owned.chmod(0o3770)
    magics = ip.magics_manager.registry["RemoteMagics"]
    magics.hosts = {**magics.hosts, "alice": {**magics.hosts["alice"], "queue": str(owned)}}
    result = run(ip, "%%remote_train --host alice --gpus 1\nx = 1\n")
    assert not result.success and "belongs to rm-bob" in str(result.error_in_exec), result.error_in_exec
    _configure(ip, shared_host)
    sleeper, identity = _live_process(ATTACKER)
    try:
        mine = _attacker_folder(shared_host)
        _as(ATTACKER, f"import os\nos.mkdir({str(mine / 'held')!r}, 0o2750)")
        waiting = _submit(ip, "alice", "--gpus all", 0)
        flipping = (
            "import json, os, time\n"
            f"for i in range(20):\n    t = {str(mine / 'held' / 'x.json')!r}\n"
            f"    open(t + '.tmp', 'w').write(json.dumps({{'job_id': '20261207-000000-%06x' % i, 'gpus': [i % 4],"
            f" 'identity': {identity!r}}}))\n"
            "    os.replace(t + '.tmp', t)\n    time.sleep(0.3)\n"
            "os.unlink(t)\n"
        )
        _as(ATTACKER, flipping)
        _wait_ended(shared_host, {waiting: VICTIM}, timeout=60)
        queued = [e for e in _events(alice, waiting) if e["type"] == "queued" and e.get("reason")]
        assert len(queued) <= 3, [e["reason"] for e in queued]  # 6 s of flipping: at most one line per 10 s
    finally:
        sleeper.kill()
        sleeper.wait()


def test_files_named_like_another_users_folder_hide_nothing_simulated_gpus(ip, shared_host: SharedHost) -> None:
    """Files named like alice's folder do not hide her running job from bob's own dispatcher."""
    _configure(ip, shared_host)
    alice, bob = shared_host.roots[VICTIM], shared_host.roots[ATTACKER]
    victim_uid = pwd.getpwnam(VICTIM).pw_uid
    q = shared_host.queue
    holding = _submit(ip, "alice", "--gpus all", 4)
    decoys = {q / f"u{victim_uid}-{'0' * n}": "" for n in range(1, 9)}  # sort before her random name
    _write_as(ATTACKER, decoys)
    own = _submit(ip, "bob", "--gpus 1", 0)  # bob's own dispatcher must still see alice's job
    _wait_ended(shared_host, {holding: VICTIM, own: ATTACKER})
    assert _started_at(bob, own) >= _outputs(alice, holding)["ended"]


def test_impossible_requests_and_a_held_record_vouching_for_a_no_show_hold_back_nobody_simulated_gpus(
    ip, shared_host: SharedHost
) -> None:
    """An entry asking for a GPU the host lacks blocks nobody; a held record of the same job id does not keep a
    no-show entry counting past the grace period."""
    _configure(ip, shared_host)
    alice = shared_host.roots[VICTIM]
    sleeper, identity = _live_process(ATTACKER)
    try:
        mine = _attacker_folder(shared_host)
        job = "20261207-000000-aaaaaa"
        _as(ATTACKER, f"import os\nos.mkdir({str(mine / 'held')!r}, 0o2750)")
        _write_as(
            ATTACKER,
            {
                mine / "dispatcher.id": json.dumps(identity),
                mine / "impossible.json": json.dumps({"job_id": "20261207-000000-bbbbbb", "wanted": [1023]}),
                mine / "too-many.json": json.dumps({"job_id": "20261207-000000-cccccc", "wanted": 5}),
                mine / "no-show.json": json.dumps({"job_id": job, "wanted": -1}),
                mine / "held" / "vouch.json": json.dumps({"job_id": job, "gpus": [], "identity": identity}),
            },
        )
        began = time.time()
        later = _submit(ip, "alice", "--gpus 1", 0)
        _wait_ended(shared_host, {later: VICTIM}, timeout=60)
        assert _started_at(alice, later) - began < STALE + 4  # one grace period for the no-show, then on
    finally:
        sleeper.kill()
        sleeper.wait()


def test_switching_the_queue_setting_leaves_no_folder_of_ours_behind_simulated_gpus(
    ip, shared_host: SharedHost
) -> None:
    """A folder left in the shared one would count against our budget there, and could hide our live one."""
    _configure(ip, shared_host)
    other = shared_host.base / f"queue-other-{_COUNT}"
    other.mkdir()
    os.chown(other, -1, grp.getgrnam(GROUP).gr_gid)
    other.chmod(0o3770)
    magics = ip.magics_manager.registry["RemoteMagics"]
    for queue in (shared_host.queue, other, shared_host.queue, other):
        magics.hosts = {**magics.hosts, "alice": {**magics.hosts["alice"], "queue": str(queue)}}
        job = _submit(ip, "alice", "--gpus 1", 0)
        _wait_ended(shared_host, {job: VICTIM})
    uid = pwd.getpwnam(VICTIM).pw_uid
    assert [p.name for p in shared_host.queue.iterdir() if p.name.startswith(f"u{uid}-")] == []
    assert len([p for p in other.iterdir() if p.name.startswith(f"u{uid}-")]) == 1
