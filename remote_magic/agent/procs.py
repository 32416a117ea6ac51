"""Which processes belong to a job, told apart from strangers that reuse their pids.

A pid alone names a process only while it lives: once a job ends, its pid can
go to any other process (``pid_max`` may be as low as 32768), so cancelling
an old job by pid could kill a stranger, and a dead job could look alive. A
process is therefore named by its pid, its start time (clock ticks since boot,
field 22 of ``/proc/PID/stat``) and the boot id, which together never repeat.

A job's processes are found by a tag, not by their process group: every
process of a job carries ``REMOTE_MAGIC_JOB=<job_id>`` in its environment,
which children inherit, so a child that started its own session, or that was
re-parented to init after its parent died, still shows it in
``/proc/PID/environ``. Processes that exec with a scrubbed environment
(``env -i``, ``subprocess.run(env={})``) lose the tag and escape; so do forks
of a process whose environment was tagged after it started (``os.environ``
changes reach exec'd children only), which is why the runner's own session
also counts while the runner is alive.

Linux only (``/proc``); stdlib only, as all of ``agent/``.
"""

from __future__ import annotations

import functools
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

TAG_VARIABLE = "REMOTE_MAGIC_JOB"

_GONE_STATES = frozenset("ZX")  # zombie (exited, not reaped) and dead: neither can run again
_POLL = 0.05
_KILL_ROUNDS = 5
_KILL_WAIT = 2.0


@dataclass(frozen=True)
class ProcessIdentity:
    """One process, for as long as the machine is up: pids repeat, (pid, start, boot) do not."""

    pid: int
    start_ticks: int
    boot_id: str

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "start_ticks": self.start_ticks, "boot_id": self.boot_id}

    @classmethod
    def from_json(cls, data: Any) -> ProcessIdentity | None:
        """None for anything incomplete: a bare pid cannot be told from a stranger's, so it is never trusted."""
        if not isinstance(data, dict):
            return None
        pid, ticks, boot = data.get("pid"), data.get("start_ticks"), data.get("boot_id")
        if type(pid) is not int or type(ticks) is not int or not isinstance(boot, str):
            return None
        if pid <= 0 or ticks < 0 or not boot:
            return None
        return cls(pid, ticks, boot)


@dataclass(frozen=True)
class _Stat:
    state: str
    session: int
    start_ticks: int


@functools.cache
def boot_id() -> str:
    """Changes at every boot, so an identity recorded before a reboot never matches (start ticks restart)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


def _parse_stat(text: str) -> _Stat | None:
    """Split after the last ')': the command name may itself hold spaces and parentheses."""
    _, paren, rest = text.rpartition(")")
    fields = rest.split()
    # After the name: state (field 3), ppid, pgrp, session (field 6), ..., starttime (field 22).
    if not paren or len(fields) < 20:
        return None
    try:
        return _Stat(state=fields[0], session=int(fields[3]), start_ticks=int(fields[19]))
    except ValueError:
        return None


def _read_stat(pid: int) -> _Stat | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            return _parse_stat(f.read())
    except OSError:  # gone (ENOENT, ESRCH), or not a pid at all
        return None


def owner_uid(pid: int) -> int | None:
    """The real uid of a process (``/proc/PID/status``, readable by every user); None when it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def identity_of(pid: int) -> ProcessIdentity | None:
    """Record right after a start, while the pid surely still names the process just started."""
    if pid <= 0:
        return None
    stat = _read_stat(pid)
    return None if stat is None else ProcessIdentity(pid, stat.start_ticks, boot_id())


def _matches(identity: ProcessIdentity, stat: _Stat | None) -> bool:
    return stat is not None and stat.start_ticks == identity.start_ticks and stat.state not in _GONE_STATES


def is_running(identity: ProcessIdentity) -> bool:
    """A zombie counts as gone: it has exited and can neither run nor handle a signal."""
    if identity.pid <= 0 or identity.boot_id != boot_id():
        return False
    return _matches(identity, _read_stat(identity.pid))


def signal_process(identity: ProcessIdentity, sig: int) -> bool:
    """Signal only the process that was recorded, never whoever holds its pid now; return whether sent.

    With a pidfd there is no race: the pidfd pins the process that held the pid when it was opened, and
    the identity check after opening proves that this is the recorded one (it lived before the open and
    still holds the pid after it, so it held it throughout). Without pidfds (kernels before 5.3, seccomp)
    a small window remains between the check and ``os.kill``.
    """
    if identity.pid <= 0:
        return False
    pidfd_open = getattr(os, "pidfd_open", None)
    pidfd_send_signal = getattr(signal, "pidfd_send_signal", None)
    if pidfd_open is not None and pidfd_send_signal is not None:
        try:
            pidfd = pidfd_open(identity.pid)
        except ProcessLookupError:
            return False
        except OSError:  # ENOSYS, EPERM from a sandbox: fall back to os.kill
            pidfd = None
        if pidfd is not None:
            try:
                if not is_running(identity):
                    return False
                pidfd_send_signal(pidfd, sig)
                return True
            except (ProcessLookupError, PermissionError):
                return False
            finally:
                os.close(pidfd)
    if not is_running(identity):
        return False
    try:
        os.kill(identity.pid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def tag_environment(env: dict[str, str], job_id: str) -> dict[str, str]:
    """A copy of ``env`` that marks every process started with it, and their children, as the job's."""
    _check_job_id(job_id)
    return {**env, TAG_VARIABLE: job_id}


def _check_job_id(job_id: str) -> None:
    # An empty id would match every process tagged with an empty value; a NUL cannot be in an environment.
    if not job_id or "\0" in job_id:
        raise ValueError(f"not a job id: {job_id!r}")


def _has_entry(pid: int, entry: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            data = f.read()
    except OSError:  # not ours to read (PermissionError), or gone meanwhile
        return False
    return entry in b"\0" + data + b"\0"


def _scan(job_id: str, runner: ProcessIdentity | None) -> list[ProcessIdentity]:
    _check_job_id(job_id)
    entry = b"\0" + f"{TAG_VARIABLE}={job_id}".encode() + b"\0"
    me, uid, boot = os.getpid(), os.getuid(), boot_id()
    # A session id names the runner's session only while the runner lives (its number cannot be reused
    # then), so members found by session count only if the runner is a session leader before and after.
    session = 0
    if runner is not None and runner.boot_id == boot:
        stat = _read_stat(runner.pid)
        if _matches(runner, stat) and stat is not None and stat.session == runner.pid:
            session = runner.pid
    found: list[ProcessIdentity] = []
    by_session: list[ProcessIdentity] = []
    try:
        entries = os.scandir("/proc")
    except OSError:
        return []
    with entries:
        for item in entries:
            if not item.name.isdigit():
                continue
            pid = int(item.name)
            if pid == me:
                continue
            try:
                if item.stat().st_uid != uid:  # others' environments are unreadable, and never a job's
                    continue
            except OSError:
                continue
            stat = _read_stat(pid)
            if stat is None or stat.state in _GONE_STATES:
                continue
            identity = ProcessIdentity(pid, stat.start_ticks, boot)
            if _has_entry(pid, entry):
                # The environment read belongs to this identity only if the pid still names it afterwards.
                if _matches(identity, _read_stat(pid)):
                    found.append(identity)
            elif session and stat.session == session:
                by_session.append(identity)
    if by_session and runner is not None and is_running(runner):
        found.extend(by_session)
    return found


def tagged_processes(job_id: str) -> list[ProcessIdentity]:
    """Every live process of our user tagged with this job, wherever it sits in the process tree."""
    return _scan(job_id, None)


def job_processes(job_id: str, runner: ProcessIdentity | None = None) -> list[ProcessIdentity]:
    """The tagged processes, plus the runner and its session while it lives.

    The session catches forks of a runner that was tagged after it started (a warm runner learns its
    job id late, and ``/proc/PID/environ`` shows the environment a process was started with).
    """
    found = _scan(job_id, runner)
    if runner is not None and runner not in found and runner.pid != os.getpid() and is_running(runner):
        found.insert(0, runner)
    return found


def terminate_tagged(job_id: str, grace: float, also: ProcessIdentity | None = None) -> dict[str, int]:
    """End every process of a job: SIGTERM, up to ``grace`` seconds to exit, then SIGKILL.

    ``also`` is the runner: it is signalled first, since it turns SIGTERM into a clean ``cancelled``
    event. Each process is signalled on its own, never by group, so nothing untagged is hit; scans
    repeat while waiting because dying processes may still fork. SIGCONT follows SIGTERM (as systemd
    does) so a stopped process can act on it. Returns how many processes ended after SIGTERM
    (``terminated``), how many needed SIGKILL (``killed``), and how many were still running at the
    end (``remaining``: e.g. stuck in uninterruptible sleep, or forking faster than the scans).
    """
    _check_job_id(job_id)
    termed: list[ProcessIdentity] = []
    seen: set[ProcessIdentity] = set()

    def term_new() -> int:
        fresh = 0
        for identity in job_processes(job_id, also):
            if identity in seen:
                continue
            seen.add(identity)
            fresh += 1
            if signal_process(identity, signal.SIGTERM):
                signal_process(identity, signal.SIGCONT)
                termed.append(identity)
        return fresh

    deadline = time.monotonic() + max(grace, 0.0)
    while True:
        fresh = term_new()
        alive = [p for p in seen if is_running(p)]
        remaining = deadline - time.monotonic()
        if (not alive and not fresh) or remaining <= 0:
            break
        time.sleep(min(_POLL, remaining))

    killed: set[ProcessIdentity] = set()
    for _ in range(_KILL_ROUNDS):
        targets = [p for p in {*seen, *job_processes(job_id, also)} if is_running(p)]
        if not targets:
            break
        seen.update(targets)
        for identity in targets:
            if signal_process(identity, signal.SIGKILL):
                killed.add(identity)
        wait_until = time.monotonic() + _KILL_WAIT
        while any(is_running(p) for p in targets) and time.monotonic() < wait_until:
            time.sleep(_POLL)
    return {
        "terminated": sum(1 for p in termed if p not in killed),
        "killed": len(killed),
        "remaining": sum(1 for p in seen if is_running(p)),
    }


def process_alive(pid: int | None) -> bool:
    """Whether a process with this pid exists (zombies count as gone).

    Only for processes whose pid cannot have been reused under us (a warm
    runner that holds a FIFO open); jobs are identified by procs.ProcessIdentity.
    """
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
