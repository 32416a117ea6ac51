"""A job's files on the host: the project layout it runs in, the modules it imports, what it wrote.

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
back) are removed; the ones it changed stay beside what it wrote.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import json
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO

from .. import digest as digests
from .. import jobs, protocol
from . import blobs, disk

WORK_DIR = "work"  # the layout root inside the job folder
MODULES_DIR = "modules"  # on sys.path first
COPIES_FILE = "copies.json"  # the job's copies of shipped files as placed: [path in the job folder, inode, size,
# mtime_ns, ctime_ns]
LINKED_RECORDS = ".linked"  # in the blob store: blobs an agent before copies linked into a job (hashed again once)
COPY_ROOM_CHECK = 64 << 20  # a job's files of this many bytes or more: check the free disk before copying them
COPY_THREADS = min(4, os.cpu_count() or 1)
COPY_ROOM_SPARE = 256 << 20  # left free after the copies (the job writes too)
SKIPPED_DIRS = frozenset({"__pycache__", ".ipynb_checkpoints", ".git"})
WRITTEN_LIMIT = 1000  # files listed in the done event
WALK_LIMIT = 200_000  # entries looked at when listing what a job wrote
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
            f"the host has {_size_text(free)} free where jobs run and this job's files need {_size_text(needed)} "
            "(each job gets its own copy); free disk space there (`%remote_gc` removes old jobs) "
            "or send fewer files"
        )


def _size_text(size: int) -> str:
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


def _inside(path: str, boundary: str) -> bool:
    return _within(os.path.realpath(path), boundary)


def _files_under(top: str, boundary: str, limit: int | None = WALK_LIMIT) -> Iterator[str]:
    """Every file under ``top`` that really lies inside ``boundary`` (links out of it are not followed),
    at most ``limit`` of them (None: all; the caller bounds them)."""
    seen = 0
    for folder, dirs, files in os.walk(top):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS and _inside(os.path.join(folder, d), boundary))
        for name in files:
            seen += 1
            if limit is not None and seen > limit:
                return
            full = os.path.join(folder, name)
            if os.path.isfile(full) and _inside(full, boundary):
                yield full


def written_files(
    path: str, spec: dict[str, Any], since: float, limit: int = WRITTEN_LIMIT
) -> tuple[list[list[Any]], int]:
    """Files of the job's layout (or --workdir) changed at or after ``since``: [path relative to the cell's working
    folder, size], newest first, at most ``limit``; and how many were found (the walk stops at WALK_LIMIT files)."""
    top, cwd = os.path.realpath(work_root(path, spec)), job_cwd(path, spec)
    found: list[tuple[float, str, int]] = []
    for full in _files_under(top, top):
        try:
            st = os.stat(full)
        except OSError:
            continue
        if st.st_mtime >= since:
            found.append((st.st_mtime, os.path.relpath(full, cwd).replace(os.sep, "/"), st.st_size))
    found.sort(key=lambda item: (-item[0], item[1]))
    return [[rel, size] for _, rel, size in found[:limit]], len(found)


def pattern_problem(pattern: object) -> str | None:
    """A --fetch pattern is relative to the cell's working folder; ``..`` may climb within the job's layout only."""
    if not isinstance(pattern, str) or not pattern.strip() or any(ord(c) < 32 or c == "\x7f" for c in pattern):
        return f"not a file pattern: {pattern!r}"
    if pattern.startswith(("/", "~")):
        return f"--fetch patterns are relative to the job's working folder, not {pattern!r}"
    return None


def fetch_limit_problem(max_files: int, max_bytes: int) -> str | None:
    """What is wrong with the bounds a fetch request carries, or None."""
    if max_files < 1 or max_bytes < 1:
        return f"a fetch needs room for at least one file and one byte, not {max_files} files and {max_bytes} bytes"
    return None


def _within(real: str, boundary: str) -> bool:
    """Whether a real (resolved) path is ``boundary`` or lies below it."""
    return real == boundary or real.startswith(boundary.rstrip(os.sep) + os.sep)


def _reaches_outside(pattern: str, cwd: str, top: str) -> bool:
    """The fixed part of a pattern (before any wildcard) leaves ``top`` read either way: lexically (as
    ``normpath`` would, ``a/..`` is nothing) or physically (links resolved first)."""
    fixed = os.path.join(cwd, pattern.split("*")[0].split("?")[0].split("[")[0] or ".")
    return not (_within(os.path.normpath(fixed), top) and _inside(fixed, top))


def matching_files(
    path: str,
    spec: dict[str, Any],
    patterns: list[str],
    max_files: int = protocol.FETCH_MAX_FILES,
    max_bytes: int = protocol.FETCH_MAX_BYTES,
) -> dict[str, str]:
    """The files the patterns name: {path relative to the cell's working folder: the real path it names}.

    A pattern is a glob (``**`` included), a file, or a folder (all of it),
    relative to the cell's working folder, matched as ``glob`` does but
    without its walk through links to folders (``a -> .`` and ``b -> .``
    would make ``**`` walk 2^40 paths): ``**`` spans real folders only, and
    each folder is looked at once per place in the pattern however many
    links lead to it.  Every hit is resolved by real path and must lie inside
    the job's layout (or --workdir); the path reported is that real path
    relative to the cell's working folder, so ``deep/..`` through a link can
    never name one file here and another when it is read.  The files are
    counted as they are found: the bounds stop the search as soon as more
    match than they allow.
    """
    top, cwd = os.path.realpath(work_root(path, spec)), os.path.realpath(job_cwd(path, spec))
    matched: dict[str, str] = {}
    taken: set[str] = set()  # folders whose files are all in ``matched`` (walked by ``_files_in``)
    total = 0

    def add(file: str) -> None:
        nonlocal total
        rel = os.path.relpath(file, cwd).replace(os.sep, "/")
        if rel in matched:
            return
        matched[rel] = file
        total += _size(file)
        if len(matched) > max_files:
            raise jobs.AgentError(_too_many(patterns, max_files))
        if total > max_bytes:
            raise jobs.AgentError(_too_big(patterns, len(matched), total, max_bytes, stopped=True))

    for pattern in patterns:
        problem = pattern_problem(pattern)
        if problem:
            raise jobs.AgentError(problem)
        if _reaches_outside(pattern, cwd, top):
            raise jobs.AgentError(f"--fetch {pattern}: it reaches outside the job's folder on the host")
        outside = inside = 0
        for real in _pattern_hits(pattern, cwd, top):
            if real is None:
                outside += 1
                continue
            inside += 1
            if os.path.isdir(real):
                if real not in taken:
                    for file in _files_in(real, top, taken):
                        add(file)
            elif os.path.isfile(real):
                add(real)
        if outside and not inside:
            raise jobs.AgentError(
                f"--fetch {pattern}: it reaches outside the job's folder on the host (through a link); "
                "only files inside the job's folder come back"
            )
    return dict(sorted(matched.items()))


_MAGIC = ("*", "?", "[")  # what makes a part of a pattern a glob (``glob.has_magic``)


def _pattern_hits(pattern: str, cwd: str, top: str) -> Iterator[str | None]:
    """The real paths ``pattern`` names from the real folder ``cwd``, glob's way: ``*``, ``?`` and ``[...]``
    match within one name, ``**`` (a whole part) any depth of folders, a name starting with ``.`` only
    where the pattern's part does, ``..`` is the parent, and a trailing ``/`` names folders only.

    Unlike glob, ``**`` walks real folders only (a link to a folder is a hit, never walked through), and
    the folders reached at each part of the pattern are kept once each by real path, so no arrangement of
    links makes the search longer than the layout's folders times the pattern's parts.  None for each
    folder or hit whose real path is outside ``top`` (never listed)."""
    parts = [part for part in pattern.split("/") if part]
    folders = [cwd]
    for index, part in enumerate(parts):
        last = index == len(parts) - 1
        dirs_only = not last or pattern.endswith("/")
        reached: dict[str, None] = {}
        walked: set[str] = set()  # ``**``: folders a walk of this part went through (a second one adds nothing)
        for folder in folders:
            root_left_out = last and folder == cwd and all(p == "**" for p in parts)  # as glob: ``**`` is not ''
            for real in _part_hits(folder, part, dirs_only, not root_left_out, walked):
                if not _within(real, top):
                    yield None
                elif last:
                    yield real
                else:
                    reached[real] = None
        folders = list(reached)


def _part_hits(folder: str, part: str, dirs_only: bool, include_self: bool, walked: set[str]) -> Iterator[str]:
    """The real paths one part of a pattern names in the real folder ``folder``."""
    if part == "**":
        if folder in walked:
            return
        if include_self:
            yield folder
        for full, name, is_link, is_dir in _walk(folder, lambda name: not name.startswith(".")):
            if name.startswith("."):
                continue
            if is_link:
                if not dirs_only or os.path.isdir(full):
                    yield os.path.realpath(full)
            elif is_dir:
                walked.add(full)
                yield full
            elif not dirs_only:
                yield full
    elif any(c in part for c in _MAGIC):
        hidden = part.startswith(".")
        for name, is_link, is_dir in _entries(folder):
            if (hidden or not name.startswith(".")) and fnmatch.fnmatchcase(name, part):
                full = os.path.join(folder, name)
                if not dirs_only or (os.path.isdir(full) if is_link else is_dir):
                    yield os.path.realpath(full) if is_link else full
    else:
        full = os.path.join(folder, part)
        if os.path.isdir(full) if dirs_only else os.path.lexists(full):
            yield os.path.realpath(full)


def _files_in(folder: str, top: str, taken: set[str]) -> Iterator[str]:
    """The real path of every file under the real folder ``folder`` that lies inside ``top`` (a link to
    a file counts by its real path; links to folders and SKIPPED_DIRS are not walked); each folder
    walked is added to ``taken``."""
    taken.add(folder)
    for full, name, is_link, is_dir in _walk(folder, lambda name: name not in SKIPPED_DIRS):
        if is_dir and not is_link:
            if name not in SKIPPED_DIRS:
                taken.add(full)
        elif is_link:
            real = os.path.realpath(full)
            if os.path.isfile(real) and _within(real, top):
                yield real
        elif os.path.isfile(full):
            yield full


def _walk(folder: str, walk_into: Callable[[str], bool]) -> Iterator[tuple[str, str, bool, bool]]:
    """(path, name, is a link, is a real folder) of each entry below the real folder ``folder``, depth
    first; real folders whose name ``walk_into`` accepts are walked, links never.  A stack, not recursion:
    a layout may be thousands of folders deep."""
    pending = [(folder, iter(_entries(folder)))]
    while pending:
        parent, entries = pending[-1]
        entry = next(entries, None)
        if entry is None:
            pending.pop()
            continue
        name, is_link, is_dir = entry
        full = os.path.join(parent, name)
        yield full, name, is_link, is_dir
        if is_dir and not is_link and walk_into(name):
            pending.append((full, iter(_entries(full))))


def _entries(folder: str) -> list[tuple[str, bool, bool]]:
    """(name, is a link, is a real folder) for each entry of ``folder``, by name; [] where it cannot be read."""
    try:
        with os.scandir(folder) as it:
            found = []
            for entry in it:
                with contextlib.suppress(OSError):
                    found.append((entry.name, entry.is_symlink(), entry.is_dir(follow_symlinks=False)))
            return sorted(found)
    except OSError:
        return []


def _too_many(patterns: list[str], max_files: int) -> str:
    return (
        f"--fetch {','.join(patterns)}: more than {max_files:,} files match, the most one fetch brings back; "
        f"name fewer files (a narrower pattern), or raise the bound in the kernel: "
        f"`%env {protocol.FETCH_MAX_FILES_SETTING}={max_files * 10}`"
    )


def store_files(
    root: str,
    path: str,
    spec: dict[str, Any],
    patterns: list[str],
    max_files: int = protocol.FETCH_MAX_FILES,
    max_bytes: int = protocol.FETCH_MAX_BYTES,
) -> list[list[Any]]:
    """Copy the matching files into the blob store; [relative path, digest (named), size] for each.

    A copy, hashed while it is written, so a file the job (or anyone) changes
    later never alters what was fetched; of exactly the file that was matched
    (opened without following a link, then checked by what was opened).  The
    bounds are checked before anything is copied (while matching).  The
    digests are recorded in the job folder so ``gc`` keeps them while the job
    is kept.
    """
    top = os.path.realpath(work_root(path, spec))
    matched = matching_files(path, spec, patterns, max_files, max_bytes)
    found = []
    left = max_bytes  # a file that grew since it was counted cannot carry the fetch past the bound
    with blobs.blob_lock(root, exclusive=False):
        for rel, real in matched.items():
            digest, size = _copy_into_store(root, real, top, rel, left)
            left -= size
            found.append([rel, digest, size])
        record = os.path.join(path, protocol.FETCHED_BLOBS_FILE)
        earlier = [d for d in blobs.read_digests(record) if digests.is_digest(d)]  # bare hex, as older agents wrote
        fetched = sorted({d for _, d, _ in found} | {digests.normal(d) for d in earlier})
        disk.atomic_write(record, json.dumps(fetched).encode(), durable=False)
    return found


def _size(real: str) -> int:
    try:
        return os.stat(real).st_size
    except OSError:
        return 0


def _too_big(patterns: list[str], count: int, total: int, max_bytes: int, stopped: bool = False) -> str:
    """The byte bound's refusal; ``stopped``: the search stopped at the file that passed it (maybe more match)."""
    return (
        f"--fetch {','.join(patterns)}: {count:,} files match, {_size_text(total)} in all, more than the "
        f"{_size_text(max_bytes)} one fetch brings back{' (the search stopped there)' if stopped else ''}; "
        f"name fewer files (a narrower pattern), or raise the bound in the kernel: "
        f"`%env {protocol.FETCH_MAX_BYTES_SETTING}={-(-total // 2**20)}MiB`{' or more' if stopped else ''}"
    )


def _opened_path(fd: int) -> str | None:
    """The real path of an open file, from the kernel (None where it cannot say)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def _copy_into_store(root: str, source: str, top: str, rel: str, budget: int) -> tuple[str, int]:
    """Store the file at the real path ``source`` as a blob, reading at most ``budget`` bytes.

    Opened with ``O_NOFOLLOW`` (a last component swapped for a link fails),
    then the open file's own path is checked against ``top``, so a folder
    swapped for a link meanwhile cannot make it read another file.
    """
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise jobs.AgentError(f"--fetch: cannot read {rel} on the host ({exc.strerror}); nothing was fetched") from None
    with os.fdopen(fd, "rb") as f:
        opened = _opened_path(fd)
        if not stat.S_ISREG(os.fstat(fd).st_mode) or (opened is not None and not _within(opened, top)):
            raise jobs.AgentError(
                f"--fetch: {rel} changed into something else (a link, a pipe) while it was being fetched; "
                "nothing was fetched"
            )
        return _store_stream(root, f, rel, budget)


def _store_stream(root: str, source: BinaryIO, rel: str, budget: int) -> tuple[str, int]:
    """Hash and write ``source`` into the store as it is read; the whole of it must fit in ``budget``."""
    folder = blobs.blobs_dir(root)
    tmp = os.path.join(folder, f"fetch.part-{os.getpid()}-{secrets.token_hex(4)}")
    hasher = digests.new()
    size = 0
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, disk.FILE_MODE)
        with os.fdopen(fd, "wb") as out:
            while chunk := source.read(_CHUNK):
                size += len(chunk)
                if size > budget:
                    raise jobs.AgentError(
                        f"--fetch: {rel} grew while it was being fetched, past the bound; nothing was fetched"
                    )
                hasher.update(chunk)
                out.write(chunk)
        digest = digests.named(hasher)
        target = blobs.blob_path(root, digest)
        if os.path.exists(target) and os.path.getsize(target) == size:
            disk.unlink_quietly(tmp)
        else:
            os.replace(tmp, target)
        return digest, size
    except BaseException:
        disk.unlink_quietly(tmp)
        raise
