"""Per-job Python environments on the host, built once per requirements list and reused.

A job that needs packages the host's Python lacks (or other versions of
them) names a requirements list.  The agent builds a virtualenv from it
under ``<root>/envs/<key>/``, where ``key`` hashes the normalized list and
the interpreter, so the same list on the same Python is built once and then
reused by every later job, from any kernel.

The env is not isolated from the host: a ``.pth`` file in its site-packages
adds this interpreter's own site-packages folders *after* the env's.  What
the list pins wins; everything else (cloudpickle, numpy, the host's CUDA
builds of torch, tensorflow, jax) stays importable without being installed
again.  ``--system-site-packages`` would not do: when the agent's Python is
itself a venv, it exposes the base interpreter's packages, not this venv's.

Layout::

    envs/<key>.lock                 flock: one build of a key at a time
    envs/<key>/                     the venv (0700)
    envs/<key>/requirements.txt     the normalized list it was built from
    envs/<key>/.ready               written last: the env is complete; its mtime is the env's last use

Every lookup of a built env for a job (submit, launch, a version check, a
reuse by ``ensure``) moves its last use, so ``collect`` (``%remote_gc``)
can remove the envs no job has used for a while.  What an interpreter has
installed (a built env's or this one's) is ``versions.py``'s.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import site
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import util

from .. import disk, jobs, procs
from . import versions

ENVS_DIR = "envs"
READY_FILE = ".ready"
REQUIREMENTS_FILE = "requirements.txt"
PTH_FILE = "_remote_magic_host.pth"
DEFAULT_TIMEOUT = 1800.0  # seconds; REMOTE_MAGIC_ENV_TIMEOUT overrides
TAIL_LINES = 20  # lines of the installer's output quoted in an error
_PIP_PYTHON_OPTION = (22, 3)  # the first pip with `pip --python`
_KEY = re.compile(r"[0-9a-f]{16}")
# pip's and uv's words for a requirement the package index (as configured on the host) does not have
_NOT_ON_INDEX = re.compile(r"No matching distribution found for (\S+)|Because (\S+) was not found in the package")
_pip_version_cache: dict[str, tuple[int, ...] | None] = {}


@dataclass
class EnvResult:
    key: str
    python: str  # the env's interpreter: launch the job's runner with it
    built: bool  # False: an env built earlier was reused
    seconds: float  # time ensure() took, waiting for another build included


# ------------------------------------------------------------------ the key
def normalize_requirements(text: str) -> list[str]:
    """The list in a canonical form, so two spellings of the same list share one env.

    Comments and blank lines go, continuation lines are joined; option lines
    (``--no-index``, ``--find-links X``, ``-f X``, ``--extra-index-url X``)
    keep their order, first; requirement lines are sorted and deduplicated.
    """
    options: list[str] = []
    requirements: set[str] = set()
    for raw in re.sub(r"\\\r?\n", " ", text).splitlines():
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()
        if not line:
            continue
        line = " ".join(line.split())
        if line.startswith("-"):
            options.append(line)
        else:
            requirements.add(line)
    return options + sorted(requirements)


def env_key(requirements: list[str], python: str = sys.executable) -> str:
    """16 hex digits of sha256 over the list, the interpreter's path and its full version.

    An upgraded or replaced interpreter gets new envs: a venv's links and
    compiled packages belong to the Python that built them.
    """
    version = sys.version if python == sys.executable else versions.run_python(python, "import sys; print(sys.version)")
    text = "\n".join([*requirements, "", python, version.strip()])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def env_dir(root: str, key: str) -> str:
    if not _KEY.fullmatch(key):
        raise jobs.AgentError(f"not an environment key: {key!r}")
    return os.path.join(os.path.expanduser(root), ENVS_DIR, key)


def _bin_python(path: str) -> str:
    return os.path.join(path, "bin", "python")


def env_python(root: str, key: str) -> str | None:
    """The env's interpreter once its build finished (``.ready`` exists), else None.

    A lookup is a use (a job submitted or launched in it, its versions asked): it moves the env's last use, so
    ``collect`` keeps the envs that jobs still use.
    """
    path = env_dir(root, key)
    python = _bin_python(path)
    ready = os.path.join(path, READY_FILE)
    if os.path.exists(ready) and os.path.exists(python):
        with contextlib.suppress(OSError):
            os.utime(ready)
        return python
    return None


def last_used(path: str) -> float:
    """When a job last used the env at ``path``: its ``.ready``'s mtime (the folder's, for one never finished)."""
    for candidate in (os.path.join(path, READY_FILE), path):
        with contextlib.suppress(OSError):
            return os.stat(candidate).st_mtime
    return 0.0


# ---------------------------------------------------------------- the build
def ensure(root: str, requirements_text: str, on_output: Callable[[str], None] = lambda line: None) -> EnvResult:
    """The env for ``requirements_text``: reused when built before, else built now.

    Two callers asking for the same env at once build it once: the second
    waits on the lock, then reuses.  Every output line of a build goes to
    ``on_output`` as it comes (the client shows it as the job's progress).
    A failed or timed-out build leaves nothing behind and raises AgentError
    with the installer's last lines.
    """
    started = time.monotonic()
    requirements = normalize_requirements(requirements_text)
    if not any(not line.startswith("-") for line in requirements):
        raise jobs.AgentError(
            "the environment's requirements list names no package (only comments or options); "
            "add at least one line such as `pandas==2.2.2`, or leave out --env"
        )
    key = env_key(requirements)
    envs = disk.ensure_dir(os.path.join(os.path.expanduser(root), ENVS_DIR))
    with _build_lock(os.path.join(envs, f"{key}.lock"), on_output):
        python = env_python(root, key)  # a use: moves its last use
        if python is not None:
            return EnvResult(key, python, False, time.monotonic() - started)
        python = _build(env_dir(root, key), requirements, on_output, started)
        return EnvResult(key, python, True, time.monotonic() - started)


@contextlib.contextmanager
def _build_lock(path: str, on_output: Callable[[str], None]) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, disk.FILE_MODE)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            on_output("another job is building this environment; waiting for it to finish")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _build(path: str, requirements: list[str], on_output: Callable[[str], None], started: float) -> str:
    timeout = _timeout()
    deadline = time.monotonic() + timeout  # the build's own time: waiting for the lock does not count
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)

    def output(line: str) -> None:
        tail.append(line)
        on_output(line)

    # A build whose agent died (a dropped connection) may have left its installer running: end it first.
    tag = f"env-build-{os.path.basename(path)}"
    with contextlib.suppress(OSError, ValueError):
        procs.terminate_tagged(tag, grace=2.0)
    shutil.rmtree(path, ignore_errors=True)  # a build that died half-way
    try:
        disk.ensure_dir(path)
        python = _bin_python(path)
        count = sum(not line.startswith("-") for line in requirements)
        output(f"building the Python environment {os.path.basename(path)} ({count} requirement{'s' * (count != 1)})")
        _run(
            "creating the virtualenv (python -m venv)",
            [sys.executable, "-m", "venv", "--without-pip", path],
            deadline,
            timeout,
            output,
            tag,
        )
        _write_pth(python)
        requirements_file = os.path.join(path, REQUIREMENTS_FILE)
        disk.atomic_write(requirements_file, ("\n".join(requirements) + "\n").encode("utf-8"), durable=False)
        for what, command in _install_commands(python, requirements_file):
            _run(what, command, deadline, timeout, output, tag)
        elapsed = time.monotonic() - started
        output(f"environment {os.path.basename(path)} ready in {elapsed:.1f} s")
        ready = {"requirements": requirements, "python": sys.executable, "version": sys.version, "seconds": elapsed}
        disk.atomic_write(os.path.join(path, READY_FILE), json.dumps(ready).encode("utf-8"))
        return python
    except _BuildFailed as failure:
        shutil.rmtree(path, ignore_errors=True)
        quoted = "\n".join(f"  {line}" for line in tail)
        raise jobs.AgentError(
            f"could not build the Python environment for this job: {failure}, so nothing ran and the "
            f"half-built environment was not kept. {_build_fix(tail)} The last lines of the build were:\n{quoted}"
        ) from None
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise


def _build_fix(lines: collections.deque[str]) -> str:
    """What to do about a failed build: for requirements the host's package index lacks, name them and say how."""
    missing = list(dict.fromkeys(m[1] or m[2] for line in lines if (m := _NOT_ON_INDEX.search(line))))
    if not missing:
        return "Fix the requirements list and run the cell again."
    return (
        f"The host's package index has no {', '.join(missing)} (pip looked where the host's pip is configured "
        "to: pip.conf, PIP_INDEX_URL, PIP_FIND_LINKS, and the list's own --index-url and --find-links lines). "
        "If that name or version is a mistake, fix the requirements list; if the package is your own, put its "
        "wheel in a folder on the host and list `--find-links FOLDER` with it in a requirements file for "
        "--env FILE, or install it there; then run the cell again."
    )


class _BuildFailed(Exception):
    """A build step exited non-zero or ran out of time (the message says which)."""


def _timeout() -> float:
    try:
        return float(os.environ.get("REMOTE_MAGIC_ENV_TIMEOUT") or DEFAULT_TIMEOUT)
    except ValueError:
        return DEFAULT_TIMEOUT


def _run(
    what: str, command: list[str], deadline: float, timeout: float, output: Callable[[str], None], tag: str
) -> None:
    """Run one build step, its merged stdout/stderr to ``output`` line by line, killed at ``deadline``.

    ``tag`` marks the step's processes (see procs.py), so a later build can end one its dead agent left.
    """
    env = _step_environment(tag)
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise _BuildFailed(f"building the environment took longer than {timeout:.0f} s (REMOTE_MAGIC_ENV_TIMEOUT)")
    proc = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        encoding="utf-8",
        errors="replace",
        env=env,
        start_new_session=True,  # a timeout kills the installer's children too
    )
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)

    watchdog = threading.Timer(remaining, kill)
    watchdog.daemon = True
    watchdog.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\r\n")
            if line.strip():
                output(line)
        returncode = proc.wait()
    except BaseException:
        kill()
        proc.wait()
        raise
    finally:
        watchdog.cancel()
        if proc.stdout is not None:
            proc.stdout.close()
    if timed_out.is_set() and returncode != 0:
        raise _BuildFailed(
            f"building the environment took longer than {timeout:.0f} s and was stopped; "
            "set REMOTE_MAGIC_ENV_TIMEOUT (seconds) on the host to allow more"
        )
    if returncode != 0:
        raise _BuildFailed(f"{what} failed (exit status {returncode})")


def _step_environment(tag: str) -> dict[str, str]:
    """The environment of a build step: quiet, unbuffered installers, no venv of the agent's, ``tag`` set."""
    env = procs.tag_environment(
        dict(
            os.environ,
            PYTHONUNBUFFERED="1",  # lines as they happen, not when a buffer fills
            PIP_DISABLE_PIP_VERSION_CHECK="1",
            PIP_NO_INPUT="1",
            PIP_PROGRESS_BAR="off",
            UV_NO_PROGRESS="1",
        ),
        tag,
    )
    env.pop("VIRTUAL_ENV", None)  # the installers are told the target explicitly
    return env


def host_site_dirs() -> list[str]:
    """This interpreter's site-packages folders (user site included when enabled), in ``sys.path`` order."""
    candidates = [sysconfig.get_path("purelib"), sysconfig.get_path("platlib"), *site.getsitepackages()]
    if site.ENABLE_USER_SITE:
        candidates.append(site.getusersitepackages())
    found: dict[str, str] = {}
    for path in candidates:
        if path and os.path.isdir(path):
            found.setdefault(os.path.realpath(path), path)
    order = {os.path.realpath(p): i for i, p in reversed(list(enumerate(sys.path)))}
    return sorted(found.values(), key=lambda p: order.get(os.path.realpath(p), len(order)))


def _write_pth(env_python_path: str) -> None:
    """Make this interpreter's packages visible in the env, after the env's own.

    ``site.addsitedir`` (not bare path lines) so the ``.pth`` files in those
    folders run too: editable installs and namespace hooks keep working.
    """
    site_packages = versions.run_python(
        env_python_path, "import sysconfig; print(sysconfig.get_path('purelib'))", error="the new environment"
    ).strip()
    dirs = [d for d in host_site_dirs() if "\n" not in d]
    text = (
        "# remote_magic: the host interpreter's site-packages, searched after this environment's own\n"
        f"import site; list(map(site.addsitedir, {dirs!r}))\n"
    )
    disk.atomic_write(os.path.join(site_packages, PTH_FILE), text.encode("utf-8"), durable=False)


def _install_commands(python: str, requirements_file: str) -> list[tuple[str, list[str]]]:
    """How to install the list into the env at ``python``.

    pip first: run in the env's interpreter it sees the host's packages
    through the ``.pth`` and keeps them (a dependency on torch is met by the
    host's CUDA build).  uv does not look past the env's own site-packages,
    so it would install a second torch, numpy, ... into the env; it is used
    only where this Python has no usable pip, or when
    REMOTE_MAGIC_ENV_INSTALLER=uv asks for it.
    """
    choice = (os.environ.get("REMOTE_MAGIC_ENV_INSTALLER") or "auto").lower()
    uv = shutil.which("uv")
    pip_version = host_pip_version()
    if choice == "uv" and uv is None:
        raise _BuildFailed(
            "REMOTE_MAGIC_ENV_INSTALLER=uv but there is no `uv` on the host's PATH; install uv or unset it"
        )
    if choice == "uv" or (choice == "auto" and pip_version is None and uv is not None):
        return [("uv pip install", [uv or "uv", "pip", "install", "--python", python, "-r", requirements_file])]
    if pip_version is not None and pip_version >= _PIP_PYTHON_OPTION:
        return [("pip install", [sys.executable, "-m", "pip", "--python", python, "install", "-r", requirements_file])]
    if not _has_ensurepip():
        raise _BuildFailed(
            f"this host's Python ({sys.executable}) has no pip {'.'.join(map(str, _PIP_PYTHON_OPTION))} or newer "
            "and no ensurepip to build environments with; install pip there "
            f"(`{sys.executable} -m pip install -U pip`, or `sudo apt install python3-pip python3-venv`) or uv"
        )
    # An old or missing pip: give the env its own current pip (offline, from the wheel ensurepip carries).
    return [
        ("installing pip into the environment (ensurepip)", [python, "-m", "ensurepip", "--upgrade", "--default-pip"]),
        ("pip install", [python, "-m", "pip", "install", "-r", requirements_file]),
    ]


def host_pip_version() -> tuple[int, ...] | None:
    """The version of this interpreter's pip, or None when it has none that runs (asked once per process)."""
    if sys.executable not in _pip_version_cache:
        try:
            out = subprocess.run(
                [sys.executable, "-m", "pip", "--version"],
                capture_output=True,
                text=True,
                timeout=60,
                env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"),
            )
            match = re.match(r"pip (\d+)\.(\d+)", out.stdout) if out.returncode == 0 else None
            _pip_version_cache[sys.executable] = (int(match[1]), int(match[2])) if match else None
        except (OSError, subprocess.SubprocessError):
            _pip_version_cache[sys.executable] = None
    return _pip_version_cache[sys.executable]


def _has_ensurepip() -> bool:
    try:
        return util.find_spec("ensurepip") is not None
    except (ImportError, ValueError):
        return False


# ------------------------------------------------------------ collection
def collect(root: str, older_than: float, in_use: set[str], dry_run: bool = False) -> tuple[list[str], int]:
    """Remove the envs no job has used for ``older_than`` seconds; (their keys, the bytes they held).

    Kept whatever their age: ``in_use`` (the envs of running and queued jobs), the envs a live process of ours
    runs from (a waiting warm runner, a job's leftovers), and an env being built or reused right now (its build
    lock is held).  Each goes under that lock, so a build or reuse that comes meanwhile waits, then builds anew.
    """
    folder = os.path.join(os.path.expanduser(root), ENVS_DIR)
    try:
        keys = sorted(name for name in os.listdir(folder) if _KEY.fullmatch(name))
    except FileNotFoundError:
        return [], 0
    cutoff = time.time() - older_than
    running = _envs_of_live_processes(folder)
    removed, freed = [], 0
    for key in keys:
        path = os.path.join(folder, key)
        if key in in_use or key in running or os.path.islink(path) or not os.path.isdir(path):
            continue
        fd = os.open(os.path.join(folder, f"{key}.lock"), os.O_RDWR | os.O_CREAT, disk.FILE_MODE)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a build or a reuse holds it
            if last_used(path) > cutoff:
                continue
            size = _tree_size(path)
            if not dry_run:
                shutil.rmtree(path, ignore_errors=True)
            removed.append(key)
            freed += size
        finally:
            os.close(fd)  # the lock file stays: a build waiting on it must lock the same file as the next one
    return removed, freed


def _envs_of_live_processes(folder: str) -> set[str]:
    """The envs whose interpreter a live process of ours was started as (``/proc/PID/cmdline``)."""
    prefix = os.path.join(os.path.abspath(folder), "")
    found: set[str] = set()
    try:
        entries = os.scandir("/proc")
    except OSError:
        return found
    with entries:
        for entry in entries:
            try:
                if not entry.name.isdigit() or entry.stat().st_uid != os.getuid():
                    continue
                with open(os.path.join(entry.path, "cmdline"), "rb") as f:
                    program = os.path.abspath(f.read().split(b"\0", 1)[0].decode(errors="replace") or "/")
            except OSError:
                continue  # ended meanwhile
            if program.startswith(prefix):
                found.add(program[len(prefix) :].split(os.sep, 1)[0])
    return found


def _tree_size(path: str) -> int:
    """Bytes of the files under ``path`` (links counted as links, not followed)."""
    total = 0
    for parent, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(parent, name)).st_size
    return total
