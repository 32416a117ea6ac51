"""A job's shipped files on the host: the project layout it runs in and the modules it imports.

The client sends each file as a content-addressed blob and the spec lists
where it goes (``files``: the layout the cell runs in, ``modules``: folders
put first on ``sys.path``).  Each job gets its own copy of every file, made
in the kernel (``sendfile``/``copy_file_range``, no pass through Python): a
hard link would share the blob's bytes with the store and with every job
running at once, and no file mode keeps a cell from writing through it (the
agent often runs as root), so one trial's edit would reach the others and
the next job.  Copies cost time and disk (a 2 GiB folder: about 0.5-1 s and
2 GiB while the job runs), so when a job ends its copies that the cell left
unchanged (same inode, size, mtime and ctime: ``utime`` cannot set a ctime
back) are removed; the ones it changed stay beside what it wrote.  What the
job wrote, and ``--fetch``, are ``fetch.py``'s.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .. import digest as digests
from .. import disk, jobs
from . import blobs

WORK_DIR = "work"  # the layout root inside the job folder
MODULES_DIR = "modules"  # on sys.path first
COPIES_FILE = "copies.json"  # the job's copies of shipped files as placed: [path in the job folder, inode, size,
# mtime_ns, ctime_ns]
LINKED_RECORDS = ".linked"  # in the blob store: blobs an agent before copies linked into a job (hashed again once)
COPY_ROOM_CHECK = 64 << 20  # a job's files of this many bytes or more: check the free disk before copying them
COPY_THREADS = min(4, os.cpu_count() or 1)
COPY_ROOM_SPARE = 256 << 20  # left free after the copies (the job writes too)
_CHUNK = 1 << 20


def safe_relative(rel: object) -> str | None:
    """What is wrong with a path the client wants a file at, or None: it must stay inside its folder."""
    if not isinstance(rel, str) or not rel or "\0" in rel:
        return f"not a relative path: {rel!r}"
    parts = rel.split("/")
    if rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        return f"a path must stay inside the job's folder: {rel!r}"
    return None


def entries_problem(entries: object, key: str) -> str | None:
    """What is wrong with a spec's ``files`` or ``modules`` list, or None."""
    if not isinstance(entries, list):
        return f"{key} must be a list of [path, digest, size, mode]"
    for entry in entries:
        if not (
            isinstance(entry, list)
            and len(entry) == 4
            and digests.is_digest(entry[1])
            and isinstance(entry[2], int)
            and isinstance(entry[3], int)
        ):
            return f"{key} must be a list of [path, digest, size, mode], not {entry!r}"
        problem = safe_relative(entry[0])
        if problem:
            return f"{key}: {problem}"
    return None


def work_root(path: str, spec: dict[str, Any]) -> str:
    """The folder whose files a job may list and fetch: ``--workdir``, else the job's whole layout."""
    if spec.get("workdir"):
        return os.path.abspath(os.path.expanduser(spec["workdir"]))
    return os.path.join(path, WORK_DIR)


def job_cwd(path: str, spec: dict[str, Any]) -> str:
    """Where the cell runs: ``--workdir`` on the host, else its place in the job's layout."""
    cwd = "" if spec.get("workdir") else spec.get("cwd") or ""
    return os.path.join(work_root(path, spec), *([cwd] if cwd else []))


def _private_dirs(folder: str, top: str) -> None:
    """Create ``folder`` and every missing folder between it and ``top`` as 0700 (makedirs' mode covers the leaf only)."""
    missing = []
    while not os.path.isdir(folder) and folder != top:
        missing.append(folder)
        folder = os.path.dirname(folder)
    for created in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(created, disk.DIR_MODE)


def materialize(root: str, path: str, spec: dict[str, Any]) -> tuple[str, str | None]:
    """Place the job's files and modules; returns the cell's working directory and the modules folder (or None)."""
    _room_for_copies(path, spec)
    work = disk.ensure_dir(os.path.join(path, WORK_DIR))
    modules = disk.ensure_dir(os.path.join(path, MODULES_DIR)) if spec.get("modules") else None
    wanted = [
        (top, rel, digest, mode)
        for top, key in ((WORK_DIR, "files"), (MODULES_DIR, "modules"))
        for rel, digest, _size, mode in spec.get(key, [])
    ]
    with ThreadPoolExecutor(COPY_THREADS) as pool:  # the kernel copies; threads let it use several cores
        copies = list(pool.map(lambda entry: _place(root, path, *entry), wanted))
    disk.atomic_write(os.path.join(path, COPIES_FILE), json.dumps(copies).encode(), durable=False)
    cwd = job_cwd(path, spec)
    if not spec.get("workdir"):
        _private_dirs(cwd, work)
    elif not os.path.isdir(cwd):
        raise jobs.AgentError(f"--workdir {spec['workdir']} is not a folder on this host")
    return cwd, modules


def _room_for_copies(path: str, spec: dict[str, Any]) -> None:
    """Refuse before copying anything when the disk cannot hold the job's copies (no half-placed job)."""
    needed = sum(entry[2] for key in ("files", "modules") for entry in spec.get(key, []))
    if needed < COPY_ROOM_CHECK:
        return
    free = shutil.disk_usage(path).free
    if free < needed + COPY_ROOM_SPARE:
        raise jobs.AgentError(
            f"the host has {size_text(free)} free where jobs run and this job's files need {size_text(needed)} "
            "(each job gets its own copy); free disk space there (`%remote_gc` removes old jobs) "
            "or send fewer files"
        )


def size_text(size: int) -> str:
    """A size as people read it: 3.0 MiB, 20.0 GiB."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift:
            return f"{size / (1 << shift):.1f} {unit}"
    return f"{size} bytes"


def _place(root: str, path: str, top: str, rel: str, digest: str, mode: int) -> list[Any]:
    """Copy one blob to ``path/top/rel``; the copy as placed, to tell at the end whether the cell changed it."""
    problem = safe_relative(rel)
    if problem:
        raise jobs.AgentError(problem)
    blob = blobs.blob_path(root, digest)
    folder = os.path.join(path, top)
    target = os.path.join(folder, *rel.split("/"))
    _private_dirs(os.path.dirname(target), folder)
    if os.path.lexists(target) and not os.path.isdir(target):
        os.unlink(target)  # a requeued job places its files again
    try:
        _check_once_linked(root, digest)
        shutil.copyfile(blob, target)  # sendfile on Linux, fcopyfile on macOS: no pass through Python
    except FileNotFoundError:
        raise jobs.AgentError(
            f"the host's stored copy of {rel} is gone (collected, or found damaged); run the cell again to send it"
        ) from None
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise jobs.AgentError(
                f"the host's disk filled up while copying {rel} into the job's folder; free disk space there "
                "(`%remote_gc` removes old jobs) or send fewer files"
            ) from None
        raise
    os.chmod(target, (mode & 0o700) | 0o600)
    st = os.stat(target)
    return [f"{top}/{rel}", st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _check_once_linked(root: str, digest: str) -> None:
    """Hash again, once, a blob that an agent before copies linked into a job: a cell may have written
    through that link and set its mtime back.  A damaged one is dropped (the next submit sends it again)."""
    record = _linked_record(root, digest)
    if not os.path.exists(record):
        return
    if not _file_matches(blobs.blob_path(root, digest), digest):
        drop_blob(root, digest)
        raise FileNotFoundError(digest)
    disk.unlink_quietly(record)


def drop_blob(root: str, digest: str) -> None:
    """Remove a damaged blob (and its old link record): the next submit finds it missing and sends it again."""
    disk.unlink_quietly(blobs.blob_path(root, digest))
    disk.unlink_quietly(_linked_record(root, digest))


def _linked_record(root: str, digest: str) -> str:
    """The old link record of a blob: named, like the blob's file, by its bare hex (``digest.file_name``)."""
    return os.path.join(blobs.blobs_dir(root), LINKED_RECORDS, digests.file_name(digest))


def release_copies(root: str, path: str) -> None:
    """When a job ends: remove its copies of shipped files that the cell left unchanged, to free the disk.

    No stored blob can have changed (the job had copies of its own).  A copy
    counts as unchanged only if its inode, size, mtime and ctime are those it
    had when placed: ``os.utime`` can reset an mtime, never a ctime.  A job
    run as several Slurm tasks keeps its copies (another task may still read
    them).
    """
    spec = jobs.read_spec(path)
    slurm = spec.get("slurm") or {}
    if int(slurm.get("tasks") or 1) > 1 or int(slurm.get("nodes") or 1) > 1:
        return
    try:
        with open(os.path.join(path, COPIES_FILE), encoding="utf-8") as f:
            copies = json.load(f)
    except (OSError, ValueError):
        return
    for where, ino, size, mtime_ns, ctime_ns in copies:
        copy = os.path.join(path, *where.split("/"))
        with contextlib.suppress(OSError):
            st = os.lstat(copy)
            if (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) == (ino, size, mtime_ns, ctime_ns):
                os.unlink(copy)


def _file_matches(file: str, digest: str) -> bool:
    hasher = digests.new()
    with open(file, "rb") as f:
        while chunk := f.read(_CHUNK):
            hasher.update(chunk)
    return digests.matches(hasher, digest)
