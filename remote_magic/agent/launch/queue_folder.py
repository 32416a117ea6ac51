"""The GPU queue's folders on disk: ours, the shared one they may lie in, and the queue's lock.

A private queue is ``<root>/queue`` (0700).  With the host setting ``queue``
naming a shared folder, ``<root>/queue`` links to a folder of ours inside it
(``u<uid>-<random>``, 2750: the group reads it, only we write), and the other
users' folders beside it are read as their owners' word and nothing more
(queue_records.py).  The shared folder must be sticky and owned by root (or
by us, for one user), with no folder above it that others could rename it
in: nobody can delete, rename or replace another's folder or records.  It
must not be world-writable, and hard links to other users' files must be
forbidden (``fs.protected_hardlinks``), so nobody can move the change time
of our records.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator

from .. import disk, jobs
from . import queue_records, start
from .queue_records import HELD_DIR, Entry, Held, Member

QUEUE_DIR = "queue"
SETUP_LOCK = "queue.setup.lock"  # in the private root
STALE_SECONDS = start.START_GRACE_SECONDS  # REMOTE_MAGIC_QUEUE_STALE_SECONDS on the host changes it
SHARED_FILE_MODE = 0o640  # what another user's dispatcher reads; only its owner changes or removes it
OWN_FOLDER_MODE = 0o2750  # ours in the shared folder: the group reads it, only we write
OWN_RECORDS = 100_000  # our own folder: every trial of our sweeps may wait in it


def stale_seconds() -> float:
    try:
        return float(os.environ.get("REMOTE_MAGIC_QUEUE_STALE_SECONDS") or STALE_SECONDS)
    except ValueError:
        return STALE_SECONDS


def recent(written_ns: int) -> bool:
    """Written within the grace period (a ctime ahead of the clock counts as nothing)."""
    return -1.0 <= time.time() - written_ns / 1e9 < stale_seconds()


# -- our folder and the shared one ----------------------------------------------------------------------------


def link(root: str) -> str:
    return os.path.join(root, QUEUE_DIR)


def shared_top(root: str) -> str | None:
    """The shared folder our queue folder lies in; None for a private queue."""
    path = link(root)
    return os.path.dirname(os.path.realpath(path)) if os.path.islink(path) else None


def _is_own_folder(folder: str) -> bool:
    match = queue_records.MEMBER_FOLDER.fullmatch(os.path.basename(folder))
    return match is not None and int(match.group(1)) == os.getuid()


def own(root: str) -> str:
    """Our queue folder: the private ``<root>/queue``, or ours in the shared folder (``<root>/queue`` links to it).

    A link made by an older agent points at the shared folder itself: our records there move into a folder of
    our own first.
    """
    path = link(root)
    if not os.path.islink(path):
        return disk.ensure_dir(path)
    folder = os.path.realpath(path)
    if not _is_own_folder(folder):
        with locked(os.path.join(root, SETUP_LOCK)):
            if not _is_own_folder(os.path.realpath(path)):
                return _upgrade_legacy(root, folder)
        folder = os.path.realpath(path)
    try:
        st = os.lstat(folder)
    except OSError:
        raise jobs.AgentError(shared_missing(os.path.dirname(folder))) from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise jobs.AgentError(
            f"{folder}, your folder in the shared GPU queue, is not a folder that only you can write; "
            f"remove the link {path} (`rm {path}`) and submit again"
        )
    return folder


def shared_missing(folder: str) -> str:
    return (
        f"the shared GPU queue folder {folder} (host setting 'queue') does not exist or you cannot write to it; "
        f"ask the host's admin to create it for your group: sudo install -d -m 3770 -g GROUP {folder}"
    )


def check_shared_folder(top: str, setting: str) -> None:
    """A shared queue folder lets members add folders but never remove, rename or replace each other's."""
    try:
        st = os.stat(top)
    except OSError:
        raise jobs.AgentError(shared_missing(setting)) from None
    if not stat.S_ISDIR(st.st_mode) or not os.access(top, os.W_OK | os.X_OK):
        raise jobs.AgentError(shared_missing(setting))
    if st.st_uid not in (0, os.getuid()):
        raise jobs.AgentError(
            f"the shared GPU queue folder {top} belongs to {queue_records.user_name(st.st_uid)}, who could remove "
            f"every member's records; ask the host's admin to give it to root: sudo chown root {top}"
        )
    if st.st_mode & stat.S_IWOTH:
        raise jobs.AgentError(
            f"the shared GPU queue folder {top} can be written by every user of the host, not only its group; "
            f"ask the host's admin to run: sudo chmod o-rwx {top}"
        )
    if not st.st_mode & stat.S_ISVTX:
        if st.st_uid != os.getuid():
            raise jobs.AgentError(
                f"the shared GPU queue folder {top} lets every member delete or replace the others' files (it has "
                f"no sticky bit, as an older README made it); ask the host's admin to run: sudo chmod +t {top}"
            )
        os.chmod(top, stat.S_IMODE(st.st_mode) | stat.S_ISVTX)
    _check_above(top)
    if not os.path.exists("/proc/1/stat"):
        raise jobs.AgentError(
            "this host hides other users' processes (/proc mounted with hidepid), so a shared GPU queue cannot "
            "tell whether another user's job still holds its GPUs; use a private queue (no 'queue' setting), or "
            "ask the host's admin to mount /proc without hidepid"
        )
    if _sysctl("fs/protected_hardlinks") == "0":
        raise jobs.AgentError(
            "this host lets users hard-link each other's files (fs.protected_hardlinks is 0), which would let a "
            "member move your place in a shared GPU queue; ask the host's admin to run: "
            "sudo sysctl fs.protected_hardlinks=1"
        )


def _check_above(top: str) -> None:
    """No folder above the shared one may let others rename it away (unless sticky and root's or ours)."""
    folder = os.path.dirname(top)
    while True:
        st = os.stat(folder)
        writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if st.st_uid not in (0, os.getuid()) or (writable and not st.st_mode & stat.S_ISVTX):
            raise jobs.AgentError(
                f"{folder}, a folder above the shared GPU queue folder {top}, can be changed by other users, who "
                "could swap the queue's folder for their own; ask the host's admin to put the queue in a folder "
                "only root can change (for example /srv)"
            )
        if folder == os.path.dirname(folder):
            return
        folder = os.path.dirname(folder)


def _sysctl(name: str) -> str | None:
    try:
        with open(f"/proc/sys/{name}", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return None


def _make_own_folder(root: str, top: str) -> str:
    """A folder of ours in the shared one, under a name nobody can take first, and ``<root>/queue`` linked to it."""
    folder = tempfile.mkdtemp(prefix=f"u{os.getuid()}-", dir=top)
    with contextlib.suppress(OSError):  # the shared folder's group, also when it lacks the setgid bit
        os.chown(folder, -1, os.stat(top).st_gid)
    os.chmod(folder, OWN_FOLDER_MODE)
    path = link(root)
    tmp = f"{path}.tmp-{os.getpid()}"
    disk.unlink_quietly(tmp)
    os.symlink(folder, tmp)
    os.replace(tmp, path)
    return folder


def _upgrade_legacy(root: str, top: str) -> str:
    """Copy the records an older agent left at the top of the shared folder (and in its ``held/``, when that
    folder is ours) into a folder of our own, as the bytes we checked; then remove ours from the top."""
    check_shared_folder(top, top)
    folder = _make_own_folder(root, top)
    me, real_root = os.getuid(), os.path.realpath(root)
    for source, target in ((top, folder), (os.path.join(top, HELD_DIR), os.path.join(folder, HELD_DIR))):
        with queue_records.open_folder(source, me if source != top else None) as fd:
            if fd is None:
                continue
            for name, record, _, _ in queue_records.records(fd, me, OWN_RECORDS, single_link=True):
                if record.get("root") != real_root:
                    continue
                if target != folder:
                    _ensure_folder(target, shared=True)
                disk.atomic_write(os.path.join(target, name), json.dumps(record).encode(), mode=SHARED_FILE_MODE)
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=fd)
    return folder


def use_queue(root: str, folder: str | None) -> None:
    """Make ``<root>/queue`` the queue the host setting names: our folder in a shared one, or our own folder.

    Switching is refused while jobs of ours wait or run in the queue being left.
    """
    path = link(root)
    top = os.path.realpath(os.path.expanduser(folder)) if folder else None
    if top is not None:
        check_shared_folder(top, folder or "")
    if os.path.islink(path) and not _is_own_folder(os.path.realpath(path)):
        own(root)  # an older agent's link to the shared folder itself: our records there move to our own folder
    if top == shared_top(root):
        return
    with locked(os.path.join(root, SETUP_LOCK)):
        if os.path.lexists(path):
            with queue_lock(root):
                mine = own_entries(root)
                busy = [record for record in held_records(root, []) if record.mine]
                if mine or busy:
                    raise jobs.AgentError(
                        f"the host setting 'queue' changed while {len(mine)} of your jobs wait and {len(busy)} "
                        f"run in the queue at {os.path.realpath(path)}; let them end (or cancel them) first"
                    )
            if os.path.islink(path):
                left = os.path.realpath(path)
                os.unlink(path)
                if _is_own_folder(left):  # ours, and nothing of ours waits or runs in it: no folder left behind
                    shutil.rmtree(left, ignore_errors=True)
            else:
                shutil.rmtree(path, ignore_errors=True)
        if top is None:
            disk.ensure_dir(path)
        else:
            _make_own_folder(root, top)


def file_mode(root: str) -> int:
    return SHARED_FILE_MODE if shared_top(root) else disk.FILE_MODE


def _ensure_folder(folder: str, shared: bool) -> str:
    if not shared:
        return disk.ensure_dir(folder)
    with contextlib.suppress(FileExistsError):
        os.mkdir(folder, 0o700)
        os.chmod(folder, OWN_FOLDER_MODE)
    return folder


def held_folder(root: str) -> str:
    return _ensure_folder(os.path.join(own(root), HELD_DIR), shared=shared_top(root) is not None)


@contextlib.contextmanager
def locked(path: str, blocking: bool = True) -> Iterator[bool]:
    """A lock file in our private root (0700): nobody else can open it, so nobody else can hold it."""
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, disk.FILE_MODE)  # flock needs no write access
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


CONTENDED_FILE = "queue.contended"  # in the private root: when a member last held the shared lock too long
CONTENDED_WAIT = 5.0  # seconds: longer than an honest round holds the lock; the wait while it is contended


@contextlib.contextmanager
def queue_lock(root: str) -> Iterator[None]:
    """The queue's lock: the queue folder itself (``flock`` on its descriptor), so there is no lock file to plant.

    Any member can hold a shared folder's lock, so it is waited for at most
    the stale timeout, and while it stays held (``CONTENDED_FILE``, for every
    process of ours) only briefly; the round then goes on without it
    (agent.log says so) rather than let one member stop the queue for
    everyone.  Our own rounds never overlap: a private lock in our root is
    always taken first.
    """
    top = shared_top(root)
    with locked(os.path.join(root, "queue.round.lock")):
        fd = os.open(top or own(root), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if top is None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            else:
                _flock_shared(root, fd, top)
            yield
        finally:
            os.close(fd)


def _flock_shared(root: str, fd: int, top: str) -> None:
    """Take the shared lock, waiting at most the grace period, and ``CONTENDED_WAIT`` while a member has held it
    lately.

    "Lately" is any wait over ``CONTENDED_WAIT`` (longer than an honest round holds it), not only one that ran
    out: a member who lets go just before the deadline, again and again, is still holding the queue.  It is
    forgotten when the lock is free at once.
    """
    contended = os.path.join(root, CONTENDED_FILE)
    try:
        held_lately = time.time() - os.stat(contended).st_mtime < 2 * stale_seconds()
    except OSError:
        held_lately = False
    began = time.monotonic()
    deadline = began + (min(CONTENDED_WAIT, stale_seconds() / 2) if held_lately else stale_seconds())
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            got = True
        except BlockingIOError:
            got = False
        waited = time.monotonic() - began
        if got and waited < 0.05:
            disk.unlink_quietly(contended)
        elif got or time.monotonic() >= deadline:
            if waited > min(CONTENDED_WAIT, stale_seconds() / 2) or not got:
                disk.atomic_write(contended, b"", durable=False)
            if not got and not held_lately:
                jobs.log_problem(root, f"the shared GPU queue {top} stayed locked {waited:.0f} s; going on without it")
        if got or time.monotonic() >= deadline:
            return
        time.sleep(0.02)


# -- what is in the queue --------------------------------------------------------------------------------------


def own_entries(root: str) -> list[Entry]:
    """Our waiting entries, oldest first."""
    folder = own(root)
    with queue_records.open_folder(folder, os.getuid()) as fd:
        return [] if fd is None else queue_records.entries(fd, folder, os.getuid(), OWN_RECORDS, single_link=False)


def members(root: str) -> list[Member]:
    """Every other user's queue folder in the shared one, each read within its owner's budget."""
    top = shared_top(root)
    return [] if top is None else queue_records.members_of(top, os.path.realpath(link(root)))


def held_records(root: str, others: list[Member]) -> list[Held]:
    """What the queue started and still runs: ours (ended ones pruned) and the other users' in ``others``."""
    found = []
    folder = own(root)
    with queue_records.open_folder(folder, os.getuid()) as fd:
        ours = (
            [] if fd is None else queue_records.held_in(fd, folder, os.getuid(), True, OWN_RECORDS, single_link=False)
        )
    for record in ours:
        if _still_running(root, record):
            found.append(record)
        else:
            disk.unlink_quietly(record.file)
    return found + [record for member in others for record in member.held]


def _still_running(root: str, record: Held) -> bool:
    try:
        return start.still_running(jobs.job_dir(root, record.job_id), record.written_ns / 1e9)
    except (OSError, ValueError, jobs.AgentError):
        return False
