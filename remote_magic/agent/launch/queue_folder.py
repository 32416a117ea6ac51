"""The GPU queue's folders on disk: ours, and, in a queue shared by a host's users, the others' read as untrusted.

A private queue is ``<root>/queue`` (0700).  With the host setting ``queue``
naming a shared folder, ``<root>/queue`` links to a folder of ours inside it
(``u<uid>-<random>``, 2750: the group reads it, only we write), and the other
users' folders beside it are read as their owners' word and nothing more
(README, "Security model"):

* The shared folder must be sticky and owned by root (or by us, for one
  user), with no folder above it that others could rename it in: nobody can
  delete, rename or replace another's folder or records.  It must not be
  world-writable, and hard links to other users' files must be forbidden
  (``fs.protected_hardlinks``), so nobody can move the change time of our
  records.
* A folder is read through its descriptor, opened without following a link
  and checked to be a real folder of the uid its name says.  A record is
  opened relative to it without following links and without blocking (a
  FIFO is refused, never waited on): a regular file with one link, of at
  most ``RECORD_MAX_BYTES``, owned by the folder's owner, every field
  type-checked.  Whose it is comes from the owner, never from what it says;
  its time is its ``st_ctime``, which its owner can move later but never
  back (``utime`` cannot).
* Each user is read within a budget (``FOLDERS_PER_USER`` folders of
  ``RECORDS_PER_MEMBER_FOLDER`` records): no member can make a round slow
  for the others.
* A held record of another user counts only while the process it names is
  alive and belongs to that user.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .. import jobs, protocol
from ..store import disk
from . import procs, start

QUEUE_DIR = "queue"
HELD_DIR = "held"
DISPATCHER_ID = "dispatcher.id"  # in our queue folder: how other users tell that our dispatcher runs
SETUP_LOCK = "queue.setup.lock"  # in the private root
STALE_SECONDS = start.START_GRACE_SECONDS  # REMOTE_MAGIC_QUEUE_STALE_SECONDS on the host changes it
SHARED_FILE_MODE = 0o640  # what another user's dispatcher reads; only its owner changes or removes it
OWN_FOLDER_MODE = 0o2750  # ours in the shared folder: the group reads it, only we write
RECORD_MAX_BYTES = 4096  # a real record is about 150 bytes
OWN_RECORDS = 100_000  # our own folder: every trial of our sweeps may wait in it
RECORDS_PER_MEMBER_FOLDER = 256
FOLDERS_PER_USER = 4
MAX_GPUS = 1024
_MEMBER_FOLDER = re.compile(r"u([0-9]+)-[A-Za-z0-9_]+")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


@dataclass(frozen=True)
class Entry:
    """A job waiting in the queue, as far as its record can be trusted."""

    file: str
    job_id: str
    uid: int
    written_ns: int  # the file's ctime: when its owner wrote it, never earlier
    inode: int
    wanted: int | list[int] | None  # another user's job: from its record; ours: from our private spec
    sweep: tuple[str, int] | None  # (sweep id, parallel or 0)
    owner: str  # the owner's queue folder: sweeps of different users never mix


@dataclass(frozen=True)
class Held:
    """GPUs a started job holds."""

    file: str
    job_id: str
    uid: int
    written_ns: int
    gpus: list[int]
    sweep: str | None
    identity: procs.ProcessIdentity | None
    owner: str
    mine: bool


@dataclass(frozen=True)
class Member:
    """Another queue folder in the shared one, read once: its waiting entries, its held records (those that
    still hold), and whether its owner's dispatcher runs."""

    folder: str
    uid: int
    entries: list[Entry]
    held: list[Held]
    dispatcher_alive: bool


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def stale_seconds() -> float:
    try:
        return float(os.environ.get("REMOTE_MAGIC_QUEUE_STALE_SECONDS") or STALE_SECONDS)
    except ValueError:
        return STALE_SECONDS


def recent(written_ns: int) -> bool:
    """Written within the grace period (a ctime ahead of the clock counts as nothing)."""
    return -1.0 <= time.time() - written_ns / 1e9 < stale_seconds()


def runs_as(identity: procs.ProcessIdentity | None, uid: int) -> bool:
    """The process lives and belongs to ``uid``: a record can never borrow another user's process."""
    return identity is not None and procs.owner_uid(identity.pid) == uid and procs.is_running(identity)


# -- our folder and the shared one ----------------------------------------------------------------------------


def link(root: str) -> str:
    return os.path.join(root, QUEUE_DIR)


def shared_top(root: str) -> str | None:
    """The shared folder our queue folder lies in; None for a private queue."""
    path = link(root)
    return os.path.dirname(os.path.realpath(path)) if os.path.islink(path) else None


def _is_own_folder(folder: str) -> bool:
    match = _MEMBER_FOLDER.fullmatch(os.path.basename(folder))
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
            f"the shared GPU queue folder {top} belongs to {user_name(st.st_uid)}, who could remove every "
            f"member's records; ask the host's admin to give it to root: sudo chown root {top}"
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
        with _open_folder(source, me if source != top else None) as fd:
            if fd is None:
                continue
            for name, record, _, _ in _records(fd, me, OWN_RECORDS, single_link=True):
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


# -- reading records as untrusted -----------------------------------------------------------------------------


@contextlib.contextmanager
def _open_folder(path: str, owner: int | None, at: int | None = None) -> Iterator[int | None]:
    """A folder's descriptor, opened without following a link; None unless it is a real folder of ``owner``
    (None: any owner) that no one else can write."""
    try:
        fd = os.open(path, _DIR_FLAGS, dir_fd=at)
    except OSError:
        yield None
        return
    try:
        st = os.fstat(fd)
        usable = owner is None or (st.st_uid == owner and not st.st_mode & 0o022)
        yield fd if usable else None
    finally:
        os.close(fd)


def _names(fd: int, limit: int) -> list[str]:
    """At most ``limit`` names in a folder: a member cannot make us read a million."""
    names: list[str] = []
    with contextlib.suppress(OSError), os.scandir(fd) as found:
        for item in found:
            if len(names) >= limit:
                break
            names.append(item.name)
    return names


def read_record(path: str, owner: int, at: int | None = None, single_link: bool = False) -> tuple[Any, int, int] | None:
    """(the JSON in it, its ctime in ns, its inode) if it is a small regular file of ``owner``; else None.

    Opened without following a link and without blocking (a FIFO is refused,
    never waited on).  ``single_link``: also refuse a file with other names
    (one record linked a thousand times is one record read a thousand times).
    """
    try:
        fd = os.open(path, _FILE_FLAGS, dir_fd=at)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != owner or st.st_size > RECORD_MAX_BYTES:
            return None
        if single_link and st.st_nlink != 1:
            return None
        data = os.read(fd, RECORD_MAX_BYTES + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        return json.loads(data), st.st_ctime_ns, st.st_ino
    except (ValueError, RecursionError):
        return None


def _records(
    fd: int, uid: int, limit: int, single_link: bool = False
) -> Iterator[tuple[str, dict[str, Any], int, int]]:
    """(name, record, ctime ns, inode) of each readable ``*.json`` record of ``uid`` in the folder ``fd``."""
    for name in _names(fd, limit):
        if name.endswith(".json"):
            read = read_record(name, uid, at=fd, single_link=single_link)
            if read is not None and isinstance(read[0], dict):
                yield name, read[0], read[1], read[2]


def _gpu_list(value: Any, allow_empty: bool) -> list[int] | None:
    if not isinstance(value, list) or len(value) > MAX_GPUS or (not value and not allow_empty):
        return None
    if not all(type(i) is int and 0 <= i < MAX_GPUS for i in value) or len(set(value)) != len(value):
        return None
    return list(value)


_INVALID = object()


def _checked_wanted(value: Any) -> Any:
    """A count (-1: all), exact ids, or None; ``_INVALID`` for anything else."""
    if value is None or (type(value) is int and (value == -1 or 0 < value <= MAX_GPUS)):
        return value
    ids = _gpu_list(value, allow_empty=False)
    return _INVALID if ids is None else ids


def _checked_sweep(value: Any) -> Any:
    """(sweep id, parallel or 0), None, or ``_INVALID``."""
    if value is None:
        return None
    if not isinstance(value, dict) or not protocol.is_sweep_id(value.get("id")):
        return _INVALID
    parallel = value.get("parallel")
    if parallel is not None and not (type(parallel) is int and 0 < parallel <= 100_000):
        return _INVALID
    return (value["id"], parallel or 0)


def _entries(fd: int, folder: str, uid: int, limit: int, single_link: bool) -> list[Entry]:
    """The valid entries in one user's queue folder (its descriptor), in the order they were written."""
    found = []
    for name, record, written_ns, inode in _records(fd, uid, limit, single_link):
        wanted, sweep = _checked_wanted(record.get("wanted")), _checked_sweep(record.get("sweep"))
        if not protocol.is_job_id(record.get("job_id")) or wanted is _INVALID or sweep is _INVALID:
            continue
        file = os.path.join(folder, name)
        found.append(Entry(file, record["job_id"], uid, written_ns, inode, wanted, sweep, folder))
    return sorted(found, key=lambda entry: (entry.written_ns, entry.job_id))


def _held_in(fd: int, folder: str, uid: int, mine: bool, limit: int, single_link: bool) -> list[Held]:
    found = []
    with _open_folder(HELD_DIR, uid, at=fd) as held_fd:
        if held_fd is None:
            return []
        for name, record, written_ns, _ in _records(held_fd, uid, limit, single_link):
            ids, sweep = _gpu_list(record.get("gpus"), allow_empty=True), record.get("sweep")
            if not protocol.is_job_id(record.get("job_id")) or ids is None:
                continue
            if sweep is not None and not protocol.is_sweep_id(sweep):
                continue
            identity = procs.ProcessIdentity.from_json(record.get("identity"))
            file = os.path.join(folder, HELD_DIR, name)
            found.append(Held(file, record["job_id"], uid, written_ns, ids, sweep, identity, folder, mine))
    return found


def own_entries(root: str) -> list[Entry]:
    """Our waiting entries, oldest first."""
    folder = own(root)
    with _open_folder(folder, os.getuid()) as fd:
        return [] if fd is None else _entries(fd, folder, os.getuid(), OWN_RECORDS, single_link=False)


def _member_folders(top: str, mine: str) -> dict[int, list[str]]:
    """uid -> the names of its queue folders at the top (real folders of the uid their name says, that no one
    else can write), its ``FOLDERS_PER_USER`` most recently changed: names, files or links made to look like
    another user's folder are passed over, and cannot push a real one out of the budget."""
    candidates: dict[int, list[tuple[int, str]]] = {}
    with _open_folder(top, None) as top_fd, contextlib.suppress(OSError):
        if top_fd is None:
            return {}
        with os.scandir(top_fd) as found:
            for item in found:  # streamed: a flood of names costs time, never memory
                match = _MEMBER_FOLDER.fullmatch(item.name)
                if match is None or os.path.join(top, item.name) == mine:
                    continue
                try:
                    st = item.stat(follow_symlinks=False)
                except OSError:
                    continue
                uid = int(match.group(1))
                if stat.S_ISDIR(st.st_mode) and st.st_uid == uid and not st.st_mode & 0o022:
                    kept = candidates.setdefault(uid, [])
                    kept.append((st.st_mtime_ns, item.name))
                    kept.sort(reverse=True)
                    del kept[FOLDERS_PER_USER:]
    return {uid: [name for _, name in kept] for uid, kept in candidates.items()}


def members(root: str) -> list[Member]:
    """Every other user's queue folder in the shared one, each read within its owner's budget."""
    top = shared_top(root)
    if top is None:
        return []
    found = []
    for uid, names in _member_folders(top, os.path.realpath(link(root))).items():
        for name in names:
            folder = os.path.join(top, name)
            with _open_folder(folder, uid) as fd:
                if fd is None:
                    continue
                entries = _entries(fd, folder, uid, RECORDS_PER_MEMBER_FOLDER, single_link=True)
                held = _held_in(fd, folder, uid, False, RECORDS_PER_MEMBER_FOLDER, single_link=True)
                read = read_record(DISPATCHER_ID, uid, at=fd, single_link=True)
            alive = read is not None and runs_as(procs.ProcessIdentity.from_json(read[0]), uid)
            holding = [record for record in held if runs_as(record.identity, uid)]
            found.append(Member(folder, uid, entries, holding, alive))
    return found


def held_records(root: str, others: list[Member]) -> list[Held]:
    """What the queue started and still runs: ours (ended ones pruned) and the other users' in ``others``."""
    records = []
    folder = own(root)
    with _open_folder(folder, os.getuid()) as fd:
        ours = [] if fd is None else _held_in(fd, folder, os.getuid(), True, OWN_RECORDS, single_link=False)
    for record in ours:
        if _still_running(root, record):
            records.append(record)
        else:
            disk.unlink_quietly(record.file)
    return records + [record for member in others for record in member.held]


def _still_running(root: str, record: Held) -> bool:
    try:
        return start.still_running(jobs.job_dir(root, record.job_id), record.written_ns / 1e9)
    except (OSError, ValueError, jobs.AgentError):
        return False
