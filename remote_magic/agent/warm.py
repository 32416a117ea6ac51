"""Warm runners: a job starts in a Python that has already imported its heavy packages.

Importing TensorFlow or PyTorch costs seconds.  The agent keeps one
pre-started runner per (root, interpreter, agent version) that has imported
the heavy packages the last jobs used, waiting on a FIFO in ``warm/``.
``submit`` claims it by renaming its ``.ready`` file (atomic: one claimant
wins) and writing the job id into the FIFO.  A warm runner serves exactly
one job, so no state leaks between jobs; the next one is started when a job
ends.  An unused warm runner exits after ``REMOTE_MAGIC_WARM_IDLE`` seconds
(default 30 minutes); ``REMOTE_MAGIC_WARM=0`` on the host turns them off.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import subprocess
import sys
import time
from typing import Any

from . import bootstrap, jobs, protocol

HEAVY_MODULES = ("tensorflow", "keras", "torch", "jax", "sklearn", "pandas")
STARTING_TIMEOUT = 180.0


def enabled() -> bool:
    return os.environ.get("REMOTE_MAGIC_WARM", "1") != "0"


def idle_seconds() -> float:
    return float(os.environ.get("REMOTE_MAGIC_WARM_IDLE", 1800))


def spawn_detached(argv: list[str], log: str, cwd: str) -> int:
    """Start ``argv`` as an orphan in its own session; return its pid.

    A launcher process starts it and exits at once, so the job is nobody's
    child here: it outlives this agent process and its SSH connection (even
    if every process of that connection is killed), and never lingers as a
    zombie of the long-lived ``serve``.
    """
    launched = subprocess.run(
        [sys.executable, "-c", bootstrap.LAUNCH, log, cwd, *argv],
        capture_output=True,
        check=False,
        start_new_session=True,
    )
    if launched.returncode != 0:
        raise jobs.AgentError(f"could not start the job: {launched.stderr.decode(errors='replace').strip()}")
    return int(launched.stdout)


def _key(agent_hash: str) -> str:
    return hashlib.sha256(f"{sys.executable}\0{agent_hash}".encode()).hexdigest()[:12]


def _folder(root: str) -> str:
    return jobs.ensure_dir(os.path.join(root, "warm"))


def _imports_file(root: str, agent_hash: str) -> str:
    return os.path.join(_folder(root), f"{_key(agent_hash)}.imports.json")


def wanted_imports(root: str, agent_hash: str) -> list[str]:
    try:
        with open(_imports_file(root, agent_hash), encoding="utf-8") as f:
            return [m for m in json.load(f) if m in HEAVY_MODULES]
    except (FileNotFoundError, ValueError):
        return []


def _ready_files(root: str, agent_hash: str) -> list[str]:
    folder, prefix = _folder(root), _key(agent_hash) + "-"
    return [
        os.path.join(folder, n) for n in sorted(os.listdir(folder)) if n.startswith(prefix) and n.endswith(".ready")
    ]


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return None


def claim(root: str, agent_hash: str, message: str) -> int | None:
    """Hand ``message`` (a job id, or "exit") to one waiting warm runner; its pid, or None."""
    for ready in _ready_files(root, agent_hash):
        claimed = ready[: -len(".ready")] + ".claimed"
        try:
            os.rename(ready, claimed)
        except FileNotFoundError:
            continue  # another submit took it
        info = _read_json(claimed)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(claimed)
        if info is None or not jobs.process_alive(info["pid"]):
            continue
        try:
            fd = os.open(info["fifo"], os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            continue  # nobody reading: it is gone
        try:
            os.write(fd, (message + "\n").encode())
        finally:
            os.close(fd)
        return info["pid"]
    return None


def ensure(root: str, agent_hash: str, used_modules: list[str] | None = None) -> None:
    """Make sure a warm runner is ready or starting, with the packages recent jobs used.

    ``used_modules``: heavy modules the job that just ended imported; when
    they add to what the waiting runner has, it is replaced.
    """
    if not enabled():
        return
    folder, key = _folder(root), _key(agent_hash)
    wanted = wanted_imports(root, agent_hash)
    if used_modules is not None and not set(used_modules) <= set(wanted):
        wanted = sorted(set(wanted) | set(used_modules))
        jobs.atomic_write(_imports_file(root, agent_hash), json.dumps(wanted).encode())
        while claim(root, agent_hash, "exit") is not None:
            pass  # retire runners that lack the new packages
    if _ready_files(root, agent_hash):
        return
    starting = os.path.join(folder, f"{key}.starting")
    info = _read_json(starting)
    if info and jobs.process_alive(info["pid"]) and time.time() - info["t"] < STARTING_TIMEOUT:
        return
    pid = spawn_detached(
        [sys.executable, "-c", bootstrap.RUN, root, agent_hash, "warm-runner"],
        log=os.path.join(folder, f"{key}.log"),
        cwd=os.path.expanduser("~"),
    )
    jobs.atomic_write(starting, json.dumps({"pid": pid, "t": time.time()}).encode())


def heavy_modules_in_use() -> list[str]:
    return sorted(m for m in HEAVY_MODULES if m in sys.modules)


def serve_one_job(root: str, agent_hash: str) -> int:
    """The warm runner: import, wait for one job id on the FIFO, run that job."""
    folder, key, pid = _folder(root), _key(agent_hash), os.getpid()
    modules = wanted_imports(root, agent_hash)
    for module in ["cloudpickle", "numpy", *modules]:
        try:
            __import__(module)
        except Exception:  # noqa: BLE001  (a package that fails to import just stays cold)
            continue
    from . import runner

    fifo = os.path.join(folder, f"{key}-{pid}.fifo")
    ready = os.path.join(folder, f"{key}-{pid}.ready")
    os.mkfifo(fifo, 0o600)
    # Read-write keeps a writer open on our side: no end-of-file while nobody has written yet.
    fd = os.open(fifo, os.O_RDWR)
    try:
        jobs.atomic_write(ready, json.dumps({"pid": pid, "fifo": fifo, "modules": modules}).encode())
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(folder, f"{key}.starting"))
        readable, _, _ = select.select([fd], [], [], idle_seconds())
        if not readable:
            try:
                os.rename(ready, ready + ".expired")  # nobody can claim us any more
                os.unlink(ready + ".expired")
                return 0
            except FileNotFoundError:
                readable, _, _ = select.select([fd], [], [], 10)  # claimed at this very moment
                if not readable:
                    return 0
        message = os.read(fd, 4096).decode().strip()
    finally:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(fifo)
    if message in ("", "exit"):
        return 0
    path = jobs.job_dir(root, message)
    log = os.open(os.path.join(path, protocol.RUNNER_LOG), os.O_WRONLY | os.O_CREAT | os.O_APPEND, jobs.FILE_MODE)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    spec = jobs.read_spec(path)
    os.chdir(os.path.expanduser(spec.get("workdir") or "~"))
    return runner.run_job(root, path, agent_hash, warm=True)
