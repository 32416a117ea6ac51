"""The GPU queue of a host: jobs wait for free GPUs, first come first served, with no client connected.

A job that asks for GPUs is written into our queue folder as an entry.
Whoever holds the queue's lock decides: ``submit`` runs one round at once (a
job whose GPUs are free starts without delay), and a small detached
dispatcher (``agent dispatch``) runs rounds while anything waits, then exits,
like a warm runner.  A round starts the head of the queue while its GPUs are
free (strict FIFO: a large job is never starved by small ones behind it),
records which GPUs each started job holds (``held/<job>.json``), and tells
each waiting job why it waits and where it stands, as ``queued`` events in
its own log (so the panel and a replay show it).  A GPU is free when no live
job holds it and processes that are not ours use less than
``busy_gpu_memory`` of it (our own host setting: each user's dispatcher
decides with its own).  A job that ended, or whose runner died, holds
nothing.  The trials of a sweep go through the same queue, on any host, so
that no more than its ``parallel`` run at once, also with no client connected.

The queue is private (``<root>/queue``, 0700) unless the host setting
``queue`` names a folder shared by the host's users.  Its members may learn
who waits for which GPU, and nothing more (README, "Security model"):

* The shared folder is sticky and group-writable; each user writes only in
  a folder of their own inside it (``u<uid>-<random>``, 2750), which
  ``<root>/queue`` links to.  Nobody can delete, replace or add another's
  records.
* A record is read as untrusted: opened without following links and without
  blocking (a FIFO never hangs us), a regular file of at most 64 KiB owned by
  the folder's owner, every field type-checked.  Whose it is comes from the
  file's owner, never from its contents; its time is the file's ``st_ctime``,
  which its owner can move later but never back (``utime`` cannot set it),
  and the queue's order is that time, not a file name.
* Nothing read from the shared folder is executed or used as a path: a
  dispatcher starts only its own user's jobs, from the private spec in its
  own 0700 root (agent version included).  The lock is the shared folder
  itself (``flock`` on its descriptor), so no lock file can be planted.
* Another user's entry counts while its owner's dispatcher runs (a process
  of that uid, by its identity) or for ``STALE_SECONDS`` after it was
  written, and no longer than ``STALE_SECONDS`` once its GPUs are free and
  it still has not started; a held record counts while the process it names
  is alive and belongs to its owner.  A member holding the lock stops the
  others for at most ``STALE_SECONDS``: they then go on without it.
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
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from . import bootstrap, gpus, jobs, procs, protocol, runners
from .detach import spawn_detached, untagged_environment

QUEUE_DIR = "queue"
HELD_DIR = "held"
DISPATCHER_LOCK = "dispatcher.lock"  # in the private root: nobody else can open it, so nobody can hold it
DISPATCHER_ID = "dispatcher.id"  # in our queue folder: how other users tell that our dispatcher runs
ROUND_SECONDS = 0.25
DEFAULT_BUSY_MIB = 1024
STALE_SECONDS = runners.START_GRACE_SECONDS  # REMOTE_MAGIC_QUEUE_STALE_SECONDS on the host changes it
SHARED_FILE_MODE = 0o640  # what another user's dispatcher reads; only its owner changes or removes it
OWN_FOLDER_MODE = 0o2750  # ours in the shared folder: the group reads it, only we write
RECORD_MAX_BYTES = 64 * 1024
RECORDS_PER_FOLDER = 4096
FOLDERS_PER_QUEUE = 1024
MAX_GPUS = 1024
_OWN_FOLDER = re.compile(r"u([0-9]+)-[A-Za-z0-9_]+")
_AGENT_HASH = re.compile(r"[0-9a-f]{8,64}")


@dataclass(frozen=True)
class Entry:
    """A job waiting in the queue, as far as its record can be trusted."""

    file: str
    job_id: str
    uid: int
    written_ns: int  # the file's ctime: when its owner wrote it, never earlier
    wanted: int | list[int] | None  # another user's job: from its record; ours: from our private spec
    sweep: tuple[str, int] | None  # (sweep id, parallel), with the owner's folder in ``owner``
    owner: str  # the owner's queue folder: sweeps of different users never mix

    @property
    def order(self) -> tuple[int, int, str]:
        return (self.written_ns, self.uid, self.job_id)


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


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _link(root: str) -> str:
    return os.path.join(root, QUEUE_DIR)


def _shared_top(root: str) -> str | None:
    """The shared folder our queue folder lies in; None for a private queue."""
    link = _link(root)
    return os.path.dirname(os.path.realpath(link)) if os.path.islink(link) else None


def _is_own_folder(folder: str) -> bool:
    match = _OWN_FOLDER.fullmatch(os.path.basename(folder))
    return match is not None and int(match.group(1)) == os.getuid()


def _own(root: str) -> str:
    """Our queue folder: the private ``<root>/queue``, or ours in the shared folder (``<root>/queue`` links to it).

    A link made by an older agent points at the shared folder itself: our records there move into a folder of
    our own first.
    """
    link = _link(root)
    if not os.path.islink(link):
        return jobs.ensure_dir(link)
    folder = os.path.realpath(link)
    if not _is_own_folder(folder):
        with _setup_lock(root):
            if not _is_own_folder(os.path.realpath(link)):
                return _upgrade_legacy(root, folder)
        folder = os.path.realpath(link)
    try:
        st = os.lstat(folder)
    except OSError:
        raise jobs.AgentError(_shared_missing(os.path.dirname(folder))) from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise jobs.AgentError(
            f"{folder}, your folder in the shared GPU queue, is not a folder that only you can write; "
            f"remove the link {link} (`rm {link}`) and submit again"
        )
    return folder


def _shared_missing(folder: str) -> str:
    return (
        f"the shared GPU queue folder {folder} (host setting 'queue') does not exist or you cannot write to it; "
        f"ask the host's admin to create it for your group: sudo install -d -m 3770 -g GROUP {folder}"
    )


def _check_shared_folder(top: str, setting: str) -> None:
    """A shared queue folder must let members add files but never remove or replace each other's (sticky bit)."""
    try:
        st = os.stat(top)
    except OSError:
        raise jobs.AgentError(_shared_missing(setting)) from None
    if not stat.S_ISDIR(st.st_mode) or not os.access(top, os.W_OK | os.X_OK):
        raise jobs.AgentError(_shared_missing(setting))
    if st.st_mode & stat.S_IWOTH:
        raise jobs.AgentError(
            f"the shared GPU queue folder {top} can be written by every user of the host, not only its group; "
            f"ask the host's admin to run: sudo chmod o-rwx {top}"
        )
    if st.st_mode & stat.S_ISVTX:
        return
    if st.st_uid == os.getuid():
        os.chmod(top, stat.S_IMODE(st.st_mode) | stat.S_ISVTX)
        return
    raise jobs.AgentError(
        f"the shared GPU queue folder {top} lets every member delete or replace the others' files (it has no "
        f"sticky bit, as an older README made it); ask the host's admin to run: sudo chmod +t {top}"
    )


@contextlib.contextmanager
def _setup_lock(root: str) -> Iterator[None]:
    """Ours alone (in the 0700 root): two submits of ours never make two folders in the shared queue."""
    with _locked(os.path.join(root, "queue.setup.lock")):
        yield


def _make_own_folder(root: str, top: str) -> str:
    """A folder of ours in the shared one, under a name nobody can take first, and ``<root>/queue`` linked to it."""
    own = tempfile.mkdtemp(prefix=f"u{os.getuid()}-", dir=top)
    with contextlib.suppress(OSError):  # the shared folder's group, also when it lacks the setgid bit
        os.chown(own, -1, os.stat(top).st_gid)
    os.chmod(own, OWN_FOLDER_MODE)
    link = _link(root)
    tmp = f"{link}.tmp-{os.getpid()}"
    jobs.unlink_quietly(tmp)
    os.symlink(own, tmp)
    os.replace(tmp, link)
    return own


def _upgrade_legacy(root: str, top: str) -> str:
    """Move the records an older agent left at the top of the shared folder into a folder of our own."""
    _check_shared_folder(top, top)
    own = _make_own_folder(root, top)
    me, real_root = os.getuid(), os.path.realpath(root)
    for source, target in ((top, own), (os.path.join(top, HELD_DIR), os.path.join(own, HELD_DIR))):
        for name in _names(source, RECORDS_PER_FOLDER):
            read = _read_record(os.path.join(source, name), me) if name.endswith(".json") else None
            if read is None or read[0].get("root") != real_root:
                continue
            if target != own:
                _ensure_folder(target, shared=True)
            with contextlib.suppress(OSError):
                os.rename(os.path.join(source, name), os.path.join(target, name))
    return own


def use_queue(root: str, folder: str | None) -> None:
    """Make ``<root>/queue`` the queue the host setting names: our folder in a shared one, or our own folder.

    Switching is refused while jobs of ours wait or run in the queue being left.
    """
    link = _link(root)
    top = os.path.realpath(os.path.expanduser(folder)) if folder else None
    if top is not None:
        _check_shared_folder(top, folder or "")
    if os.path.islink(link) and not _is_own_folder(os.path.realpath(link)):
        _own(root)  # an older agent's link to the shared folder itself: our records there move to our own folder
    if top == _shared_top(root):
        return
    with _setup_lock(root):
        if os.path.lexists(link):
            with _queue_lock(root):
                mine = _entries(_own(root), os.getuid())
                busy = [record for record in _held_records(root) if record.mine]
                if mine or busy:
                    raise jobs.AgentError(
                        f"the host setting 'queue' changed while {len(mine)} of your jobs wait and {len(busy)} "
                        f"run in the queue at {os.path.realpath(link)}; let them end (or cancel them) first"
                    )
            if os.path.islink(link):
                os.unlink(link)
            else:
                shutil.rmtree(link, ignore_errors=True)
        if top is None:
            jobs.ensure_dir(link)
        else:
            _make_own_folder(root, top)


def _file_mode(root: str) -> int:
    return SHARED_FILE_MODE if _shared_top(root) else jobs.FILE_MODE


def _ensure_folder(folder: str, shared: bool) -> str:
    if not shared:
        return jobs.ensure_dir(folder)
    with contextlib.suppress(FileExistsError):
        os.mkdir(folder, 0o700)
        os.chmod(folder, OWN_FOLDER_MODE)
    return folder


def _held_folder(root: str) -> str:
    return _ensure_folder(os.path.join(_own(root), HELD_DIR), shared=_shared_top(root) is not None)


@contextlib.contextmanager
def _locked(path: str, blocking: bool = True) -> Iterator[bool]:
    """A lock file in our private root (0700): nobody else can open it, so nobody else can hold it."""
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, jobs.FILE_MODE)  # flock needs no write access
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


@contextlib.contextmanager
def _queue_lock(root: str) -> Iterator[None]:
    """The queue folder itself is the lock (``flock`` on its descriptor): there is no lock file to plant or replace.

    Any member can hold a shared folder's lock, so it is waited for at most
    the stale timeout; then the round goes on without it (and says so in
    agent.log) rather than let one member stop the queue for everyone.
    """
    global _LOCK_HELD_BY_OTHERS
    top = _shared_top(root)
    fd = os.open(top or _own(root), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if top is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        else:
            wait = ROUND_SECONDS * 4 if _LOCK_HELD_BY_OTHERS else _stale_seconds()
            deadline = time.monotonic() + wait
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    _LOCK_HELD_BY_OTHERS = False
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        if not _LOCK_HELD_BY_OTHERS:
                            jobs.log_problem(root, f"the shared GPU queue {top} stayed locked {wait:.0f} s; going on")
                        _LOCK_HELD_BY_OTHERS = True  # until it is free again, each round waits only briefly
                        break
                    time.sleep(0.02)
        yield
    finally:
        os.close(fd)


_LOCK_HELD_BY_OTHERS = False


def wanted_gpus(spec: dict[str, Any]) -> int | list[int] | None:
    """What the job asks for: a count, ``all`` (-1), exact ids, or None (no GPU wanted)."""
    if spec.get("gpu_ids"):
        return [int(i) for i in spec["gpu_ids"]]
    count = spec.get("gpus")
    if count in (None, 0):
        return None
    return -1 if count == "all" else int(count)


def enqueue(root: str, agent_hash: str, path: str, spec: dict[str, Any]) -> None:
    """Put a job in the host's GPU queue, start what can start now, and keep a dispatcher for the rest.

    The entry says only what other users may know: the job, the GPUs it wants, its sweep.
    """
    use_queue(root, spec.get("queue"))
    sweep = _sweep_of(spec)
    entry = {
        "job_id": spec["job_id"],
        "wanted": wanted_gpus(spec),
        "sweep": {"id": sweep[0], "parallel": sweep[1]} if sweep else None,
        "uid": os.getuid(),
        "user": _user_name(os.getuid()),
    }
    name = f"{time.time_ns():020d}-{spec['job_id']}.json"
    with _queue_lock(root):
        jobs.atomic_write(os.path.join(_own(root), name), json.dumps(entry).encode(), mode=_file_mode(root))
        waiting = _round(root, agent_hash)
    if waiting:
        _ensure_dispatcher(root, agent_hash)


# -- reading records as untrusted --------------------------------------------------------------------------


def _names(folder: str, limit: int) -> list[str]:
    """At most ``limit`` names in a folder: a member cannot make us read a million."""
    names: list[str] = []
    with contextlib.suppress(OSError), os.scandir(folder) as found:
        for item in found:
            if len(names) >= limit:
                break
            names.append(item.name)
    return names


def _read_record(path: str, owner: int) -> tuple[dict[str, Any], int] | None:
    """A record and its ctime (ns), if it is a small regular file of ``owner`` holding a JSON object; else None.

    Opened without following a link and without blocking (a FIFO is refused, never waited on).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != owner or st.st_size > RECORD_MAX_BYTES:
            return None
        data = os.read(fd, RECORD_MAX_BYTES + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        record = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return (record, st.st_ctime_ns) if isinstance(record, dict) else None


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


def _records(folder: str, uid: int) -> Iterator[tuple[str, dict[str, Any], int]]:
    """(file, record, ctime ns) of each readable ``*.json`` record of ``uid`` in ``folder``."""
    for name in _names(folder, RECORDS_PER_FOLDER):
        if name.endswith(".json"):
            file = os.path.join(folder, name)
            read = _read_record(file, uid)
            if read is not None:
                yield file, *read


def _entries(folder: str, uid: int) -> list[Entry]:
    """The valid entries in one user's queue folder, in queue order."""
    found = []
    for file, record, written_ns in _records(folder, uid):
        wanted, sweep = _checked_wanted(record.get("wanted")), _checked_sweep(record.get("sweep"))
        if not protocol.is_job_id(record.get("job_id")) or wanted is _INVALID or sweep is _INVALID:
            continue
        found.append(Entry(file, record["job_id"], uid, written_ns, wanted, sweep, folder))
    return sorted(found, key=lambda entry: entry.order)


def _held_in(folder: str, uid: int, mine: bool) -> list[Held]:
    held_dir = os.path.join(folder, HELD_DIR)
    try:
        st = os.lstat(held_dir)
    except OSError:
        return []
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid:
        return []
    found = []
    for file, record, written_ns in _records(held_dir, uid):
        ids, sweep = _gpu_list(record.get("gpus"), allow_empty=True), record.get("sweep")
        if not protocol.is_job_id(record.get("job_id")) or ids is None:
            continue
        if sweep is not None and not protocol.is_sweep_id(sweep):
            continue
        identity = procs.ProcessIdentity.from_json(record.get("identity"))
        found.append(Held(file, record["job_id"], uid, written_ns, ids, sweep, identity, folder, mine))
    return found


def _stale_seconds() -> float:
    try:
        return float(os.environ.get("REMOTE_MAGIC_QUEUE_STALE_SECONDS") or STALE_SECONDS)
    except ValueError:
        return STALE_SECONDS


def _age(written_ns: int) -> float:
    return time.time() - written_ns / 1e9


def _recent(written_ns: int) -> bool:
    """Written within the grace period (a ctime ahead of the clock counts as nothing)."""
    return -1.0 <= _age(written_ns) < _stale_seconds()


def _runs_as(identity: procs.ProcessIdentity | None, uid: int) -> bool:
    """The process lives and belongs to ``uid``: a record can never borrow another user's process."""
    return identity is not None and procs.owner_uid(identity.pid) == uid and procs.is_running(identity)


def _other_folders(root: str) -> list[tuple[str, int]]:
    """(folder, its owner) for every other queue folder in the shared one: real folders, named for their owner."""
    top = _shared_top(root)
    if top is None:
        return []
    own = os.path.realpath(_link(root))
    found = []
    for name in _names(top, FOLDERS_PER_QUEUE):
        match = _OWN_FOLDER.fullmatch(name)
        folder = os.path.join(top, name)
        if match is None or folder == own:
            continue
        try:
            st = os.lstat(folder)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_uid == int(match.group(1)) and not st.st_mode & 0o022:
            found.append((folder, st.st_uid))
    return found


def is_queued(root: str, job_id: str) -> bool:
    return any(entry.job_id == job_id for entry in _entries(_own(root), os.getuid()))


def remove(root: str, job_id: str) -> bool:
    """Take a job out of the queue (cancel or stop before it started); whether it was there."""
    with _queue_lock(root):
        for entry in _entries(_own(root), os.getuid()):
            if entry.job_id == job_id:
                jobs.unlink_quietly(entry.file)
                return True
    return False


def _held_records(root: str) -> list[Held]:
    """What the queue started and still runs, ours and other users' (our ended jobs are pruned)."""
    records = []
    for record in _held_in(_own(root), os.getuid(), mine=True):
        if _still_running(root, record):
            records.append(record)
        else:
            jobs.unlink_quietly(record.file)
    for folder, uid in _other_folders(root):
        for record in _held_in(folder, uid, mine=False):
            alive = _runs_as(record.identity, uid) if record.identity else _recent(record.written_ns)
            if alive:
                records.append(record)
    return records


def holdings(root: str) -> dict[int, Held]:
    """GPU index -> the held record of the live job that holds it (ours, or another user's)."""
    return {index: record for record in _held_records(root) for index in record.gpus}


def holder(record: Held, root: str) -> str:
    """``job <id>``, with the user (the record file's owner) for another user's job."""
    return f"job {record.job_id}" + ("" if record.mine else f" of {_user_name(record.uid)}")


def _still_running(root: str, record: Held) -> bool:
    try:
        return runners.still_running(jobs.job_dir(root, record.job_id), record.written_ns / 1e9)
    except (OSError, ValueError, jobs.AgentError):
        return False


def _counts(entry: Entry) -> bool:
    """Whether another user's entry still takes its place: its owner's dispatcher runs, or it was queued just now.

    Read from the dispatcher's record, never by trying its lock (which lies in its owner's private root).
    """
    if _recent(entry.written_ns):
        return True
    read = _read_record(os.path.join(entry.owner, DISPATCHER_ID), entry.uid)
    return read is not None and _runs_as(procs.ProcessIdentity.from_json(read[0]), entry.uid)


# When we first set GPUs aside for another user's entry, by (its file, its ctime): an entry whose GPUs are free
# is started by its owner's dispatcher within a round; one that stays unstarted stops counting after STALE_SECONDS.
_SET_ASIDE: dict[tuple[str, int], float] = {}


def _round(root: str, agent_hash: str) -> int:
    """Start the head of the queue while its GPUs are free; tell the others why they wait. Call under the lock.

    Goes through every user's entries in the one order, starting only ours, each from its private spec.
    Returns how many of ours still wait.
    """
    own = _own(root)
    specs: dict[str, tuple[str, dict[str, Any]]] = {}
    for entry in _entries(own, os.getuid()):
        try:
            path = jobs.job_dir(root, entry.job_id)
            spec = jobs.read_spec(path)
        except (OSError, ValueError, jobs.AgentError):
            jobs.unlink_quietly(entry.file)  # collected meanwhile
            continue
        if jobs.event_summary(path)["ended"] is not None:
            jobs.unlink_quietly(entry.file)  # cancelled while it waited
            continue
        specs[entry.job_id] = (path, spec)
    if not specs:
        return 0
    entries = [e for e in _entries(own, os.getuid()) if e.job_id in specs]
    entries += [e for folder, uid in _other_folders(root) for e in _entries(folder, uid) if _counts(e)]
    entries.sort(key=lambda entry: entry.order)
    inventory = gpus.inventory()
    records = _held_records(root)
    held = {index: holder(record, root) for record in records for index in record.gpus}
    running = _running_trials(records)
    foreign = others_on_gpus(inventory, _busy_mib([spec for _, spec in specs.values()]))
    free = [g.index for g in inventory if g.index not in held and g.index not in foreign]
    waiting: list[tuple[Entry, int | list[int] | None, tuple[str, int] | None]] = []
    now, seen = time.monotonic(), set()
    for entry in entries:
        mine = entry.owner == own
        if mine:
            wanted, sweep = wanted_gpus(specs[entry.job_id][1]), _sweep_of(specs[entry.job_id][1])
        else:
            wanted, sweep = entry.wanted, entry.sweep
        if _sweep_full(entry.owner, sweep, running):  # the sweep's own limit: its later trials wait, others go on
            waiting.append((entry, wanted, sweep))
            continue
        # Strict FIFO for GPUs: a job waiting for GPUs holds back every job behind it; one waiting only for
        # its sweep's limit does not.
        blocked = any(not _sweep_full(e.owner, s, running) for e, _, s in waiting)
        chosen = None if blocked else _choose(wanted if inventory else None, free, len(inventory))
        if chosen is None:
            waiting.append((entry, wanted, sweep))
            continue
        if not mine:  # set aside for its own dispatcher, unless that never comes
            key = (entry.file, entry.written_ns)
            seen.add(key)
            if now - _SET_ASIDE.setdefault(key, now) > _stale_seconds():
                continue
        free = [i for i in free if i not in chosen]
        if sweep:
            running[(entry.owner, sweep[0])] = running.get((entry.owner, sweep[0]), 0) + 1
        if mine:
            path, spec = specs[entry.job_id]
            jobs.unlink_quietly(entry.file)
            _start(root, _agent_of(spec, agent_hash), path, spec, chosen if inventory else None)
    for key in set(_SET_ASIDE) - seen:
        del _SET_ASIDE[key]
    for position, (entry, wanted, sweep) in enumerate(waiting, 1):
        if entry.owner != own:
            continue
        if _sweep_full(entry.owner, sweep, running):
            reason = f"waiting for a trial of {sweep[0]} to end: it runs {sweep[1]} at a time"  # type: ignore[index]
        else:
            reason = _why(wanted, inventory, held, foreign, position)
        jobs.tell_waiting(specs[entry.job_id][0], reason, position)
    return sum(entry.owner == own for entry, _, _ in waiting)


def _agent_of(spec: dict[str, Any], fallback: str) -> str:
    """The agent version that took the job (our private spec says it); the dispatcher's own otherwise."""
    agent = spec.get("agent")
    return agent if isinstance(agent, str) and _AGENT_HASH.fullmatch(agent) else fallback


def _sweep_of(spec: dict[str, Any]) -> tuple[str, int] | None:
    sweep = spec.get("sweep") or {}
    return (sweep["id"], int(sweep.get("parallel") or 0)) if sweep else None


def _sweep_full(owner: str, sweep: tuple[str, int] | None, running: dict[tuple[str, str], int]) -> bool:
    return sweep is not None and sweep[1] > 0 and running.get((owner, sweep[0]), 0) >= sweep[1]


def _running_trials(records: list[Held]) -> dict[tuple[str, str], int]:
    """(owner's folder, sweep id) -> how many of its trials run now: one user's records never count for another's."""
    counts: dict[tuple[str, str], int] = {}
    for record in records:
        if record.sweep:
            counts[(record.owner, record.sweep)] = counts.get((record.owner, record.sweep), 0) + 1
    return counts


def others_on_gpus(inventory: list[gpus.Gpu], busy_mib: int) -> dict[int, list[gpus.GpuProcess]]:
    """GPUs where processes that belong to no job of ours use more than ``busy_mib``: not ours to give."""
    found = gpus.processes(inventory)
    ours = {p.pid for p in found if gpus.job_of(p.pid)}
    return gpus.busy_by_others(inventory, found, ours, busy_mib)


def _busy_mib(specs: list[dict[str, Any]]) -> int:
    """Our own ``busy_gpu_memory`` (a host setting: our first waiting job's), never another user's."""
    for spec in specs:
        if type(spec.get("busy_gpu_memory")) is int:
            return int(spec["busy_gpu_memory"])
    return DEFAULT_BUSY_MIB


def _choose(wanted: int | list[int] | None, free: list[int], total: int) -> list[int] | None:
    """The GPUs to give the job from ``free``, or None when they are not free (yet)."""
    if wanted is None:
        return []
    if isinstance(wanted, list):
        return wanted if all(i in free for i in wanted) else None
    count = total if wanted == -1 else wanted
    return sorted(free)[:count] if len(free) >= count else None


def _why(
    wanted: int | list[int] | None,
    inventory: list[gpus.Gpu],
    held: dict[int, str],
    foreign: dict[int, list[gpus.GpuProcess]],
    position: int,
) -> str:
    """`waiting for 2 GPUs: 0 by job 20261127-..., 1 by another process (pid 4242)`.

    No memory figures: the reason is logged each time it changes, and another process's memory moves all the time.
    """
    if isinstance(wanted, list):
        what, relevant = f"GPU {','.join(map(str, wanted))}", wanted
    else:
        count = len(inventory) if wanted == -1 else wanted or 0
        what, relevant = f"{count} GPU{'s' * (count != 1)}", [g.index for g in inventory]
    by: dict[str, list[int]] = {}  # holder -> the GPUs it holds, so a job holding two is named once
    for index in relevant:
        if index in held:
            by.setdefault(held[index], []).append(index)
        elif index in foreign:
            by.setdefault(", ".join(gpus.describe_holder(p, memory=False) for p in foreign[index]), []).append(index)
    busy = [f"{','.join(map(str, indices))} by {holder}" for holder, indices in by.items()]
    ahead = f" (behind {position - 1} earlier job{'s' * (position != 2)})" if position > 1 else ""
    return f"waiting for {what}{ahead}" + (f": {', '.join(busy)}" if busy else "")


def _start(root: str, agent_hash: str, path: str, spec: dict[str, Any], chosen: list[int] | None) -> None:
    """Record the GPUs as held before the runner starts; then add the runner's identity, by which other
    users' dispatchers tell whether it still holds them."""
    held = {
        "job_id": spec["job_id"],
        "gpus": chosen or [],
        "sweep": (spec.get("sweep") or {}).get("id"),
        "uid": os.getuid(),
        "user": _user_name(os.getuid()),
    }
    file, mode = os.path.join(_held_folder(root), f"{spec['job_id']}.json"), _file_mode(root)
    jobs.atomic_write(file, json.dumps(held).encode(), mode=mode)
    identity = runners.start_runner(root, agent_hash, path, spec, chosen, spec.get("launcher") or "process")
    if _shared_top(root) and identity is not None:
        jobs.atomic_write(file, json.dumps({**held, "identity": identity.to_json()}).encode(), mode=mode)


def _ensure_dispatcher(root: str, agent_hash: str) -> None:
    """Start our dispatcher unless one runs (it holds ``<root>/dispatcher.lock`` for its life).

    Isolated (``python -I``: no PYTHONPATH, no user site-packages, no working folder on ``sys.path``) and in our
    private root: nothing a member drops into the shared folder is ever imported.
    """
    with _locked(os.path.join(root, DISPATCHER_LOCK), blocking=False) as free:
        if not free:
            return
    spawn_detached(
        [sys.executable, "-I", "-c", bootstrap.RUN, root, agent_hash, "dispatch"],
        log=os.path.join(root, "dispatcher.log"),
        cwd=root,
        env=untagged_environment(),
    )


MAX_FAILED_ROUNDS = 20


def serve(root: str, agent_hash: str) -> int:
    """The dispatcher: rounds until nothing of ours waits.

    It gives up its own lock while it still holds the queue's: a submit that
    queues a job right after this one decided to exit then always finds the
    dispatcher lock free, and starts a new dispatcher.  A round that fails
    (a queue folder removed under it) is logged and tried again, a bounded
    number of times in a row.
    """
    mine = os.open(os.path.join(root, DISPATCHER_LOCK), os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, jobs.FILE_MODE)
    try:
        fcntl.flock(mine, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(mine)
        return 0  # another one runs
    failures = 0
    try:
        identity = procs.identity_of(os.getpid())
        if identity is not None:
            record = json.dumps(identity.to_json()).encode()
            jobs.atomic_write(os.path.join(_own(root), DISPATCHER_ID), record, mode=_file_mode(root))
        while True:
            try:
                with _queue_lock(root):
                    if _round(root, agent_hash) == 0:
                        os.close(mine)
                        mine = -1
                        return 0
                failures = 0
            except (OSError, jobs.AgentError) as e:
                failures += 1
                jobs.log_problem(root, f"the GPU queue's dispatcher: {e}")
                if failures >= MAX_FAILED_ROUNDS:
                    return 1
                time.sleep(1.0)
            time.sleep(ROUND_SECONDS)
    finally:
        if mine >= 0:
            os.close(mine)
