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
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cloudpickle
import fake_nvidia_smi as fake
import pytest
from conftest import run
from host_processes import kill_processes_under
from sshd import Sshd, make_sshd

from remote_magic.agent import dispatch

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
def shared_host(shared_base: SharedHost) -> Iterator[SharedHost]:
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
    from remote_magic import payload

    done = _events(root, job_id)[-1]
    buffers = [(root / "blobs" / digest).read_bytes() for digest, _ in done.get("blobs", [])]
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
    assert waited and waited[-1]["reason"] == f"waiting for 2 GPUs: 0,1,2,3 by job {first} of rm-alice", waited
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
    assert stat.S_IMODE(alice.stat().st_mode) == 0o700 and (alice / dispatch.QUEUE_DIR).is_symlink()


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
    root = tmp_path / "hostroot"
    magics = ip.magics_manager.registry["RemoteMagics"]
    magics.hosts = {**magics.hosts, "local": {"root": str(root), "queue": str(queue)}}
    magics.connections.close()
    try:
        job = _submit(ip, "local", "--gpus 1", 0)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(e["type"] == "done" for e in _events(root, job)):
            time.sleep(0.2)
        assert _outputs(root, job)["seen"] == "0"
        assert (root / dispatch.QUEUE_DIR).resolve().parent == queue.resolve()
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
