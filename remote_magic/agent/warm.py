"""Warm runners: a job starts in a Python that has already imported its heavy packages.

Importing TensorFlow or PyTorch costs seconds.  The agent keeps one
pre-started runner per (root, interpreter or environment, Keras backend,
agent version) that has imported
the heavy packages the last jobs used, waiting on a FIFO in ``warm/``.
``submit`` claims it by renaming its ``.ready`` file (atomic: one claimant
wins) and writing the job id into the FIFO.  A warm runner serves exactly
one job, so no state leaks between jobs; the next one is started when a job
ends.  An unused warm runner exits after ``REMOTE_MAGIC_WARM_IDLE`` seconds
(default 30 minutes); ``REMOTE_MAGIC_WARM=0`` on the host turns them off.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import select
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from . import bootstrap, envs, gpus, jobs, procs, protocol
from .detach import spawn_detached, untagged_environment

HEAVY_MODULES = ("tensorflow", "keras", "torch", "jax", "sklearn", "pandas")
STARTING_TIMEOUT = 180.0
LOG_LIMIT = 1024 * 1024


def enabled() -> bool:
    return os.environ.get("REMOTE_MAGIC_WARM", "1") != "0"


def idle_seconds() -> float:
    return float(os.environ.get("REMOTE_MAGIC_WARM_IDLE", 1800))


@dataclass(frozen=True)
class RunnerKind:
    """What a runner must share with a job to serve it: interpreter (an environment's or the host's) and backend.

    A warm runner has imported keras, which fixes the Keras backend for the
    life of the process, so a runner of another backend or environment can
    never take the job: the key has all three (with the agent version).
    """

    python: str
    backend: str  # the KERAS_BACKEND the runner runs with; "" for the host's default

    @classmethod
    def for_job(cls, root: str, spec: dict[str, Any]) -> RunnerKind:
        python = envs.env_python(root, spec["env"]) if spec.get("env") else None
        if spec.get("env") and python is None:
            raise jobs.AgentError(f"environment {spec['env']!r} is not built on this host")
        return cls(python or sys.executable, spec.get("backend") or os.environ.get("KERAS_BACKEND", ""))

    @classmethod
    def of_this_process(cls) -> RunnerKind:
        return cls(sys.executable, os.environ.get("KERAS_BACKEND", ""))

    def key(self, agent_hash: str) -> str:
        return hashlib.sha256(f"{self.python}\0{agent_hash}\0{self.backend}".encode()).hexdigest()[:12]

    def environment(self, env: dict[str, str]) -> dict[str, str]:
        """``env`` with this kind's Keras backend."""
        return {**env, "KERAS_BACKEND": self.backend} if self.backend else env


def _folder(root: str) -> str:
    return jobs.ensure_dir(os.path.join(root, "warm"))


def _imports_file(root: str, key: str) -> str:
    return os.path.join(_folder(root), f"{key}.imports.json")


def wanted_imports(root: str, key: str) -> list[str]:
    try:
        with open(_imports_file(root, key), encoding="utf-8") as f:
            return [m for m in json.load(f) if m in HEAVY_MODULES]
    except (FileNotFoundError, ValueError):
        return []


def _ready_files(root: str, key: str) -> list[str]:
    folder, prefix = _folder(root), key + "-"
    return [
        os.path.join(folder, n) for n in sorted(os.listdir(folder)) if n.startswith(prefix) and n.endswith(".ready")
    ]


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return None


def claim(
    root: str, agent_hash: str, kind: RunnerKind, message: str, cuda_untouched: bool = False
) -> procs.ProcessIdentity | None:
    """Hand ``message`` (a job id, or "exit") to one waiting warm runner of ``kind``; its identity, or None.

    ``cuda_untouched``: only a runner in which the CUDA driver is not loaded
    will do (a GPU host: the job's CUDA_VISIBLE_DEVICES must take effect).
    """
    return _claim(root, kind.key(agent_hash), message, cuda_untouched)


def _claim(root: str, key: str, message: str, cuda_untouched: bool = False) -> procs.ProcessIdentity | None:
    for ready in _ready_files(root, key):
        if cuda_untouched and (_read_json(ready) or {}).get("cuda", True):
            continue  # it may have initialised CUDA for every GPU: never for a job that must see only its own
        claimed = ready[: -len(".ready")] + ".claimed"
        try:
            os.rename(ready, claimed)
        except FileNotFoundError:
            continue  # another submit took it
        info = _read_json(claimed)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(claimed)
        identity = procs.ProcessIdentity.from_json(info.get("identity")) if info else None
        if info is None or identity is None or not procs.is_running(identity):
            continue
        try:
            fd = os.open(info["fifo"], os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            continue  # nobody reading: it is gone
        try:
            os.write(fd, (message + "\n").encode())
        finally:
            os.close(fd)
        return identity
    return None


@contextlib.contextmanager
def _exclusive(path: str) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, jobs.FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def ensure(root: str, agent_hash: str, kind: RunnerKind, used_modules: list[str] | None = None) -> None:
    """Make sure a warm runner of ``kind`` is ready or starting, with the packages recent jobs used.

    ``used_modules``: heavy modules the job that just ended imported; when
    they add to what the waiting runner has, it is replaced.
    """
    if not enabled():
        return
    folder, key = _folder(root), kind.key(agent_hash)
    # Two submits (or a submit and a job's end) at the same moment must not start two runners
    # (600 MB each with TensorFlow): the check and the start happen under one lock.
    with _exclusive(os.path.join(folder, f"{key}.lock")):
        _ensure_locked(root, agent_hash, kind, key, used_modules)


def _ensure_locked(root: str, agent_hash: str, kind: RunnerKind, key: str, used_modules: list[str] | None) -> None:
    folder = _folder(root)
    wanted = wanted_imports(root, key)
    if used_modules is not None and not set(used_modules) <= set(wanted):
        wanted = sorted(set(wanted) | set(used_modules))
        jobs.atomic_write(_imports_file(root, key), json.dumps(wanted).encode())
        while _claim(root, key, "exit") is not None:
            pass  # retire runners that lack the new packages
    if _ready_files(root, key):
        return
    starting = os.path.join(folder, f"{key}.starting")
    info = _read_json(starting)
    if info and jobs.process_alive(info["pid"]) and time.time() - info["t"] < STARTING_TIMEOUT:
        return
    log = os.path.join(folder, f"{key}.log")
    if os.path.exists(log) and os.path.getsize(log) > LOG_LIMIT:
        os.replace(log, log + ".1")  # one old log kept, never an ever-growing one
    identity = spawn_detached(
        [kind.python, "-c", bootstrap.RUN, root, agent_hash, "warm-runner"],
        log=log,
        cwd=os.path.expanduser("~"),
        env=kind.environment(untagged_environment()),
    )
    if identity is not None:
        record = {"pid": identity.pid, "t": time.time(), "agent": agent_hash}
        jobs.atomic_write(starting, json.dumps(record).encode())


def heavy_modules_in_use() -> list[str]:
    return sorted(m for m in HEAVY_MODULES if m in sys.modules)


def serve_one_job(root: str, agent_hash: str) -> int:
    """The warm runner: import, wait for one job id on the FIFO, run that job."""
    kind = RunnerKind.of_this_process()
    folder, key, pid = _folder(root), kind.key(agent_hash), os.getpid()
    modules = wanted_imports(root, key)
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
        identity = procs.identity_of(pid)
        info = {"pid": pid, "fifo": fifo, "modules": modules, "agent": agent_hash, "cuda": gpus.cuda_driver_mapped()}
        info["identity"] = identity.to_json() if identity else None
        jobs.atomic_write(ready, json.dumps(info).encode())
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
    # From here on this process is the job's: what the cell starts carries the job's tag.
    os.environ.update(procs.tag_environment({}, message))
    log = os.open(os.path.join(path, protocol.RUNNER_LOG), os.O_WRONLY | os.O_CREAT | os.O_APPEND, jobs.FILE_MODE)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    os.chdir(path)  # the runner moves to the job's working folder once its files are in place
    return runner.run_job(root, path, warm=True, after=lambda: prepare_next(root, agent_hash, kind))


def prepare_next(root: str, agent_hash: str, kind: RunnerKind) -> None:
    """Start the warm runner for the next job, with the heavy packages the job that ends used.

    Called by a job's runner as it ends, with the kind it was started as (a cell may have changed
    KERAS_BACKEND since); the runner's own tag is not passed on.
    """
    try:
        ensure(root, agent_hash, kind, heavy_modules_in_use())
    except Exception:  # noqa: BLE001  (the job is over; a missing warm runner only costs speed)
        pass


def agent_versions_in_use(root: str) -> set[str]:
    """Agent versions that waiting or starting warm runners were started from (gc spares them)."""
    used = set()
    folder = _folder(root)
    for name in os.listdir(folder):
        if name.endswith((".ready", ".starting")):
            info = _read_json(os.path.join(folder, name))
            if info and info.get("agent") and jobs.process_alive(info.get("pid")):
                used.add(info["agent"])
    return used
