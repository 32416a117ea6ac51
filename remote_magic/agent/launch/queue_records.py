"""The records in a GPU queue's folders, read as their owners' word and nothing more (README, "Security model").

In a queue shared by a host's users, every other user's folder and record is
untrusted:

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
import json
import os
import pwd
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .. import procs, protocol
from ..protocol import GpuRequest

HELD_DIR = "held"
DISPATCHER_ID = "dispatcher.id"  # in each queue folder: how other users tell that its owner's dispatcher runs
RECORD_MAX_BYTES = 4096  # a real record is about 150 bytes
RECORDS_PER_MEMBER_FOLDER = 256
FOLDERS_PER_USER = 4
MAX_GPUS = 1024
MEMBER_FOLDER = re.compile(r"u([0-9]+)-[A-Za-z0-9_]+")
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
    wanted: GpuRequest  # another user's job: from its record; ours: from our private spec
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


def runs_as(identity: procs.ProcessIdentity | None, uid: int) -> bool:
    """The process lives and belongs to ``uid``: a record can never borrow another user's process."""
    return identity is not None and procs.owner_uid(identity.pid) == uid and procs.is_running(identity)


def wanted_record(request: GpuRequest) -> int | list[int] | None:
    """A GPU request as an entry says it to other users: a count (-1: all), exact ids, or None for none."""
    if request.ids:
        return list(request.ids)
    return request.count or None


@contextlib.contextmanager
def open_folder(path: str, owner: int | None, at: int | None = None) -> Iterator[int | None]:
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


def records(fd: int, uid: int, limit: int, single_link: bool = False) -> Iterator[tuple[str, dict[str, Any], int, int]]:
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


def _checked_wanted(value: Any) -> GpuRequest | None:
    """What ``wanted_record`` wrote, back as a request; None for anything else."""
    if value is None:
        return GpuRequest()
    if type(value) is int and (value == GpuRequest.ALL or 0 < value <= MAX_GPUS):
        return GpuRequest(value)
    ids = _gpu_list(value, allow_empty=False)
    return None if ids is None else GpuRequest(ids=tuple(ids))


_INVALID = object()


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


def entries(fd: int, folder: str, uid: int, limit: int, single_link: bool) -> list[Entry]:
    """The valid entries in one user's queue folder (its descriptor), in the order they were written."""
    found = []
    for name, record, written_ns, inode in records(fd, uid, limit, single_link):
        wanted, sweep = _checked_wanted(record.get("wanted")), _checked_sweep(record.get("sweep"))
        if not protocol.is_job_id(record.get("job_id")) or wanted is None or sweep is _INVALID:
            continue
        file = os.path.join(folder, name)
        found.append(Entry(file, record["job_id"], uid, written_ns, inode, wanted, sweep, folder))
    return sorted(found, key=lambda entry: (entry.written_ns, entry.job_id))


def held_in(fd: int, folder: str, uid: int, mine: bool, limit: int, single_link: bool) -> list[Held]:
    """The valid held records in the ``held`` folder of one user's queue folder (its descriptor)."""
    found = []
    with open_folder(HELD_DIR, uid, at=fd) as held_fd:
        if held_fd is None:
            return []
        for name, record, written_ns, _ in records(held_fd, uid, limit, single_link):
            ids, sweep = _gpu_list(record.get("gpus"), allow_empty=True), record.get("sweep")
            if not protocol.is_job_id(record.get("job_id")) or ids is None:
                continue
            if sweep is not None and not protocol.is_sweep_id(sweep):
                continue
            identity = procs.ProcessIdentity.from_json(record.get("identity"))
            file = os.path.join(folder, HELD_DIR, name)
            found.append(Held(file, record["job_id"], uid, written_ns, ids, sweep, identity, folder, mine))
    return found


def _member_folders(top: str, mine: str) -> dict[int, list[str]]:
    """uid -> the names of its queue folders at the top (real folders of the uid their name says, that no one
    else can write), its ``FOLDERS_PER_USER`` most recently changed: names, files or links made to look like
    another user's folder are passed over, and cannot push a real one out of the budget."""
    candidates: dict[int, list[tuple[int, str]]] = {}
    with open_folder(top, None) as top_fd, contextlib.suppress(OSError):
        if top_fd is None:
            return {}
        with os.scandir(top_fd) as found:
            for item in found:  # streamed: a flood of names costs time, never memory
                match = MEMBER_FOLDER.fullmatch(item.name)
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


def members_of(top: str, mine: str) -> list[Member]:
    """Every other user's queue folder in the shared folder ``top`` (ours is ``mine``), each read within its
    owner's budget."""
    found = []
    for uid, names in _member_folders(top, mine).items():
        for name in names:
            folder = os.path.join(top, name)
            with open_folder(folder, uid) as fd:
                if fd is None:
                    continue
                waiting = entries(fd, folder, uid, RECORDS_PER_MEMBER_FOLDER, single_link=True)
                held = held_in(fd, folder, uid, False, RECORDS_PER_MEMBER_FOLDER, single_link=True)
                read = read_record(DISPATCHER_ID, uid, at=fd, single_link=True)
            alive = read is not None and runs_as(procs.ProcessIdentity.from_json(read[0]), uid)
            holding = [record for record in held if runs_as(record.identity, uid)]
            found.append(Member(folder, uid, waiting, holding, alive))
    return found
