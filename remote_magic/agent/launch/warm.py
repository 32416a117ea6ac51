"""Warm runners: a job starts in a Python that has already imported its heavy packages.

Importing TensorFlow or PyTorch costs seconds of CPU.  The agent keeps one
warm runner per (root, interpreter or environment, Keras backend, agent
version) that has imported the heavy packages the last jobs used and waits
on a FIFO in ``warm/``.  It never runs a job itself: for each job id written
into its FIFO it forks, and the fork (in a session of its own, adopted by
init) runs the job, so every job starts from the same freshly imported state
and none sees another's (random generators are reseeded in the fork).  So
cells back to back each find it ready, with no import competing with the
job before.  The fork takes the job by creating ``<job>/runner.claim``
exclusively and records itself in ``launch.json``; a submit that gets no
answer in time takes the claim itself and starts a runner of its own, so a
job never runs twice.  An unused warm runner exits after
``REMOTE_MAGIC_WARM_IDLE`` seconds (default 30 minutes);
``REMOTE_MAGIC_WARM=0`` on the host turns them off.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .. import bootstrap, disk, jobs, procs, protocol
from ..store import envs
from . import gpus
from .detach import spawn_detached, untagged_environment

HEAVY_MODULES = ("tensorflow", "keras", "torch", "jax", "sklearn", "pandas")
STARTING_TIMEOUT = 180.0
LOG_LIMIT = 1024 * 1024
CLAIM_FILE = "runner.claim"  # created exclusively by whoever starts the job's runner: it never runs twice
ANSWER_SECONDS = 5.0  # how long a submit waits for the warm runner's fork to take the job
LATE_ANSWER_SECONDS = 30.0  # it took the claim but has not written launch.json yet

# Runs a job in this process: (its folder, the warm runner's pid) -> exit status.  The caller's (cli), so that
# this module needs no runner: the runner is imported once by the warm runner, before any fork.
RunJob = Callable[[str, int], int]


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
    backend: str  # the KERAS_BACKEND the runner runs with: always named (see ``of``)

    @classmethod
    def of(cls, python: str, backend: str | None) -> RunnerKind:
        """``backend`` None or "" is the host's default, named as Keras would pick it, so that a job that leaves
        the backend to the host and one (or a warm-up) that names that same backend share a runner."""
        return cls(python, backend or protocol.default_backend())

    @classmethod
    def for_job(cls, root: str, spec: dict[str, Any]) -> RunnerKind:
        python = envs.env_python(root, spec["env"]) if spec.get("env") else None
        if spec.get("env") and python is None:
            raise jobs.AgentError(f"environment {spec['env']!r} is not built on this host")
        return cls.of(python or sys.executable, spec.get("backend"))

    @classmethod
    def of_this_process(cls) -> RunnerKind:
        return cls.of(sys.executable, None)

    def key(self, agent_hash: str) -> str:
        return hashlib.sha256(f"{self.python}\0{agent_hash}\0{self.backend}".encode()).hexdigest()[:12]

    def environment(self, env: dict[str, str]) -> dict[str, str]:
        """``env`` with this kind's Keras backend."""
        return {**env, "KERAS_BACKEND": self.backend}


# Written by stop_all; a job's end prepares no runner while it is there, a start or a warm-up removes it.
STOPPED_MARK = "stopped"


def _folder(root: str) -> str:
    return disk.ensure_dir(os.path.join(root, "warm"))


def _imports_file(root: str, key: str) -> str:
    return os.path.join(_folder(root), f"{key}.imports.json")


def wanted_imports(root: str, key: str) -> list[str]:
    try:
        with open(_imports_file(root, key), encoding="utf-8") as f:
            return [m for m in json.load(f) if m in HEAVY_MODULES]
    except (FileNotFoundError, ValueError):
        return []


def _waiting_runners(root: str, key: str) -> list[tuple[str, dict[str, Any]]]:
    """The live warm runners of ``key``: (ready file, what it says); those of runners that died (SIGKILL, OOM)
    are removed, and a file half written (a runner starting this instant) is left for the next look."""
    folder, prefix = _folder(root), key + "-"
    found = []
    for name in sorted(os.listdir(folder)):
        if not (name.startswith(prefix) and name.endswith(".ready")):
            continue
        path = os.path.join(folder, name)
        info = _read_json(path)
        if info is None:
            continue
        identity = procs.ProcessIdentity.from_json(info.get("identity"))
        if identity is None or not procs.is_running(identity):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            continue
        found.append((path, info))
    return found


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return None


def claim(
    root: str, agent_hash: str, kind: RunnerKind, job_id: str, cuda_untouched: bool = False
) -> procs.ProcessIdentity | None:
    """Have a warm runner of ``kind`` fork the runner of ``job_id``; the fork's identity, or None.

    ``cuda_untouched``: only a runner in which the CUDA driver is not loaded
    will do (a GPU host: the job's CUDA_VISIBLE_DEVICES must take effect).
    None means no warm runner took the job, and the claim is ours: start one.
    """
    try:
        path = jobs.job_dir(root, job_id)
    except jobs.AgentError:
        return None  # no such job here: nothing to start
    for _ready, info in _waiting_runners(root, kind.key(agent_hash)):
        if cuda_untouched and info.get("cuda", True):
            continue  # it may have initialised CUDA for every GPU: never for a job that must see only its own
        if not _send(info["fifo"], job_id):
            continue
        launched = _wait_for_launch(path, ANSWER_SECONDS)
        if launched is not None:
            return launched
        if _take_claim(path):
            return None  # it never read the job id (it was exiting): the job is ours to start
        return _wait_for_launch(path, LATE_ANSWER_SECONDS)  # it has the job: wait for its record
    if not _take_claim(path):
        return _wait_for_launch(path, LATE_ANSWER_SECONDS)
    return None


def _send(fifo: str, message: str) -> bool:
    """One line into a warm runner's FIFO (atomic: under PIPE_BUF); False when nobody reads it any more."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        os.write(fd, (message + "\n").encode())
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _take_claim(path: str) -> bool:
    try:
        os.close(os.open(os.path.join(path, CLAIM_FILE), os.O_WRONLY | os.O_CREAT | os.O_EXCL, disk.FILE_MODE))
        return True
    except FileExistsError:
        return False
    except FileNotFoundError:
        return True  # no job folder (yet): nobody can have started its runner


def _wait_for_launch(path: str, seconds: float) -> procs.ProcessIdentity | None:
    deadline = time.monotonic() + seconds
    while True:
        record = jobs.read_launch(path)
        if record and record.get("identity"):
            return procs.ProcessIdentity.from_json(record["identity"])
        if time.monotonic() > deadline:
            return None
        time.sleep(0.005)


def _retire(root: str, key: str) -> bool:
    """Tell one waiting warm runner of ``key`` to exit (it lacks packages recent jobs use); whether one was."""
    for ready, info in _waiting_runners(root, key):
        try:
            os.unlink(ready)  # no submit finds it any more
        except FileNotFoundError:
            continue  # another retired it, or it expired
        _send(info["fifo"], "exit")
        return True
    return False


@contextlib.contextmanager
def _exclusive(path: str) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, disk.FILE_MODE)
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
    if used_modules is None:  # asked for by a job that starts or a client: runners are wanted again
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(folder, STOPPED_MARK))
    # Two submits (or a submit and a job's end) at the same moment must not start two runners
    # (600 MB each with TensorFlow): the check and the start happen under one lock.
    with _exclusive(os.path.join(folder, f"{key}.lock")):
        _ensure_locked(root, agent_hash, kind, key, used_modules)


def _ensure_locked(root: str, agent_hash: str, kind: RunnerKind, key: str, used_modules: list[str] | None) -> None:
    folder = _folder(root)
    wanted = wanted_imports(root, key)
    if used_modules is not None and not set(used_modules) <= set(wanted):
        wanted = sorted(set(wanted) | set(used_modules))
        disk.atomic_write(_imports_file(root, key), json.dumps(wanted).encode())
        while _retire(root, key):
            pass  # retire runners that lack the new packages
    if _waiting_runners(root, key):
        return
    starting = os.path.join(folder, f"{key}.starting")
    info = _read_json(starting)
    if info and procs.process_alive(info["pid"]) and time.time() - info["t"] < STARTING_TIMEOUT:
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
        disk.atomic_write(starting, json.dumps(record).encode())


def heavy_modules_in_use() -> list[str]:
    return sorted(m for m in HEAVY_MODULES if m in sys.modules)


IMPORT_NICENESS = 10


def _import_gently(modules: list[str]) -> None:
    """Import ``modules`` in a thread of lower CPU priority, so that a job or an upload running meanwhile keeps
    the CPU (TensorFlow's import is seconds of it).  Linux's nice is per thread: the thread that later forks the
    jobs keeps its own priority, so jobs run at the user's normal one."""

    def run() -> None:
        with contextlib.suppress(OSError, AttributeError):
            thread = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, thread, os.getpriority(os.PRIO_PROCESS, thread) + IMPORT_NICENESS)
        for module in modules:
            try:
                __import__(module)
            except Exception:  # noqa: BLE001  (a package that fails to import just stays cold)
                continue

    importing = threading.Thread(target=run, name="remote_magic warm imports")
    importing.start()
    importing.join()


def serve(root: str, agent_hash: str, run: RunJob) -> int:
    """The warm runner: import, then fork a runner for each job id written into the FIFO (``run`` runs it), until
    idle."""
    kind = RunnerKind.of_this_process()
    folder, key, pid = _folder(root), kind.key(agent_hash), os.getpid()
    modules = wanted_imports(root, key)
    _import_gently(["cloudpickle", "numpy", *modules])
    fifo = os.path.join(folder, f"{key}-{pid}.fifo")
    ready = os.path.join(folder, f"{key}-{pid}.ready")
    os.mkfifo(fifo, 0o600)
    # Read-write keeps a writer open on our side: no end-of-file while nobody has written yet.
    fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    try:
        identity = procs.identity_of(pid)
        info = {"pid": pid, "fifo": fifo, "modules": modules, "agent": agent_hash, "cuda": gpus.cuda_driver_mapped()}
        info["identity"] = identity.to_json() if identity else None
        disk.atomic_write(ready, json.dumps(info).encode())
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(folder, f"{key}.starting"))
        pending = ""
        while True:
            readable, _, _ = select.select([fd], [], [], idle_seconds())
            if not readable:
                with contextlib.suppress(FileNotFoundError):
                    os.rename(ready, ready + ".expired")  # no submit finds us any more
                    os.unlink(ready + ".expired")
                time.sleep(0.2)  # a submit that found us just before: its job id arrives now or never
            with contextlib.suppress(BlockingIOError):
                pending += os.read(fd, 4096).decode()
            *lines, pending = pending.split("\n")
            for message in (line.strip() for line in lines):
                if message == "exit":
                    return 0
                if message:
                    _fork_job(root, message, fd, run)
            if not readable or not os.path.exists(ready):
                return 0
    finally:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(fifo)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(ready)


def _fork_job(root: str, job_id: str, fifo_fd: int, run: RunJob) -> None:
    """Run ``job_id`` in a fork of this process, detached (its own session, adopted by init) as a cold runner is."""
    warm_runner = os.getpid()
    child = os.fork()
    if child:
        os.waitpid(child, 0)  # the intermediate process exits at once
        return
    code = 1
    try:
        os.setsid()
        if os.fork():
            os._exit(0)
        os.close(fifo_fd)
        code = _run_forked(root, job_id, warm_runner, run)
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _run_forked(root: str, job_id: str, warm_runner: int, run: RunJob) -> int:
    path = jobs.job_dir(root, job_id)
    if not protocol.is_job_id(job_id) or not _take_claim(path):
        return 0  # another runner has it (the submit gave up waiting for us)
    identity = procs.identity_of(os.getpid())
    jobs.write_launch(
        path,
        jobs.read_spec(path).get("launcher") or protocol.PROCESS_LAUNCHER,
        identity.to_json() if identity else None,
    )
    _reseed()
    # From here on this process is the job's: what the cell starts carries the job's tag.
    os.environ.update(procs.tag_environment({}, job_id))
    log = os.open(os.path.join(path, protocol.RUNNER_LOG), os.O_WRONLY | os.O_CREAT | os.O_APPEND, disk.FILE_MODE)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    os.chdir(path)  # the runner moves to the job's working folder once its files are in place
    return run(path, warm_runner)


def _reseed() -> None:
    """A fork starts with its parent's random generators: give the job fresh ones, as a new process has."""
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    if "torch" in sys.modules:
        with contextlib.suppress(Exception):
            sys.modules["torch"].seed()


def prepare_next(root: str, agent_hash: str, kind: RunnerKind) -> None:
    """Start the warm runner for the next job, with the heavy packages the job that ends used.

    Called by a job's runner as it ends, with the kind it was started as (a cell may have changed
    KERAS_BACKEND since); the runner's own tag is not passed on.
    """
    if os.path.exists(os.path.join(_folder(root), STOPPED_MARK)):
        return  # stop_all ran while this job ended: a one-shot run wants no runner left behind
    try:
        ensure(root, agent_hash, kind, heavy_modules_in_use())
    except Exception:  # noqa: BLE001  (the job is over; a missing warm runner only costs speed)
        pass


def stop_all(root: str) -> int:
    """End every warm runner of this root, waiting or still starting; how many were told to.

    For a one-shot run (``make demo``, a script) that should leave no process behind: a waiting
    runner is asked to exit as a retired one is, a starting one (still importing) is terminated.
    """
    folder, stopped = _folder(root), 0
    disk.atomic_write(os.path.join(folder, STOPPED_MARK), b"")  # a job ending now prepares none after this
    for key in {name.rsplit("-", 1)[0] for name in os.listdir(folder) if name.endswith(".ready")}:
        while _retire(root, key):
            stopped += 1
    for name in [name for name in os.listdir(folder) if name.endswith(".starting")]:
        info = _read_json(os.path.join(folder, name))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(folder, name))
        if info and procs.process_alive(info.get("pid")) and time.time() - info["t"] < STARTING_TIMEOUT:
            with contextlib.suppress(ProcessLookupError):
                os.kill(info["pid"], signal.SIGTERM)
            stopped += 1
    return stopped


def agent_versions_in_use(root: str) -> set[str]:
    """Agent versions that waiting or starting warm runners were started from (gc spares them)."""
    used = set()
    folder = _folder(root)
    for name in os.listdir(folder):
        if name.endswith((".ready", ".starting")):
            info = _read_json(os.path.join(folder, name))
            if info and info.get("agent") and procs.process_alive(info.get("pid")):
                used.add(info["agent"])
    return used
