"""What a job wrote, listed for its done event and brought back with ``--fetch``.

Kept apart from ``layout.py`` (which places the files a job receives)
because reading a job's folder back is the riskier direction: the cell may
have planted links anywhere in it.  So the patterns are matched without
following a link into a folder (a link is a hit, resolved to its real path
and kept only inside the job's layout or ``--workdir``); the bounds on
files and bytes are checked as the files are found, so a huge match stops
early and nothing is copied; and what matched is copied into the blob store
(hashed as it is written, opened without following a link), so a file the
job changes later never alters what was fetched and ``gc`` keeps the blobs
while the job is kept.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

from .. import digest as digests
from .. import disk, jobs, protocol
from . import blobs, layout

SKIPPED_DIRS = frozenset({"__pycache__", ".ipynb_checkpoints", ".git"})
WRITTEN_LIMIT = 1000  # files listed in the done event
WALK_LIMIT = 200_000  # entries looked at when listing what a job wrote
_CHUNK = 1 << 20


def written_files(
    path: str, spec: dict[str, Any], since: float, limit: int = WRITTEN_LIMIT
) -> tuple[list[list[Any]], int]:
    """Files of the job's layout (or --workdir) changed at or after ``since``: [path relative to the cell's working
    folder, size], newest first, at most ``limit``; and how many were found (the walk stops at WALK_LIMIT files)."""
    top, cwd = os.path.realpath(layout.work_root(path, spec)), layout.job_cwd(path, spec)
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


def _inside(path: str, boundary: str) -> bool:
    return _within(os.path.realpath(path), boundary)


def _within(real: str, boundary: str) -> bool:
    """Whether a real (resolved) path is ``boundary`` or lies below it."""
    return real == boundary or real.startswith(boundary.rstrip(os.sep) + os.sep)


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
    top, cwd = os.path.realpath(layout.work_root(path, spec)), os.path.realpath(layout.job_cwd(path, spec))
    found = _Found(patterns, cwd, top, max_files, max_bytes)
    for pattern in patterns:
        _check_pattern(pattern, cwd, top)
        _match_pattern(pattern, cwd, top, found)
    return dict(sorted(found.files.items()))


class _Found:
    """The files matched so far ({path relative to ``cwd``: real path}), counted against the bounds as each
    is added."""

    def __init__(self, patterns: list[str], cwd: str, top: str, max_files: int, max_bytes: int) -> None:
        self.patterns, self.cwd, self.top = patterns, cwd, top
        self.max_files, self.max_bytes = max_files, max_bytes
        self.files: dict[str, str] = {}
        self.taken: set[str] = set()  # folders whose files are all in ``files`` (walked by ``_files_in``)
        self.total = 0

    def add(self, file: str) -> None:
        """Add one file by its real path; refuse as soon as the files or their bytes pass a bound."""
        rel = os.path.relpath(file, self.cwd).replace(os.sep, "/")
        if rel in self.files:
            return
        self.files[rel] = file
        self.total += _size(file)
        if len(self.files) > self.max_files:
            raise jobs.AgentError(_too_many(self.patterns, self.max_files))
        if self.total > self.max_bytes:
            raise jobs.AgentError(_too_big(self.patterns, len(self.files), self.total, self.max_bytes, stopped=True))

    def add_folder(self, folder: str) -> None:
        """Add every file under the real folder ``folder`` (once: a folder already walked adds nothing)."""
        if folder not in self.taken:
            for file in _files_in(folder, self.top, self.taken):
                self.add(file)


def _check_pattern(pattern: str, cwd: str, top: str) -> None:
    """Refuse a pattern that is no pattern, or whose fixed part leads out of ``top``."""
    problem = pattern_problem(pattern)
    if problem:
        raise jobs.AgentError(problem)
    if _reaches_outside(pattern, cwd, top):
        raise jobs.AgentError(f"--fetch {pattern}: it reaches outside the job's folder on the host")


def _match_pattern(pattern: str, cwd: str, top: str, found: _Found) -> None:
    """Add what one pattern names to ``found``; refuse it when everything it names lies outside ``top``."""
    outside = inside = 0
    for real in _pattern_hits(pattern, cwd, top):
        if real is None:
            outside += 1
            continue
        inside += 1
        if os.path.isdir(real):
            found.add_folder(real)
        elif os.path.isfile(real):
            found.add(real)
    if outside and not inside:
        raise jobs.AgentError(
            f"--fetch {pattern}: it reaches outside the job's folder on the host (through a link); "
            "only files inside the job's folder come back"
        )


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
    top = os.path.realpath(layout.work_root(path, spec))
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
        f"--fetch {','.join(patterns)}: {count:,} files match, {layout.size_text(total)} in all, more than the "
        f"{layout.size_text(max_bytes)} one fetch brings back{' (the search stopped there)' if stopped else ''}; "
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
