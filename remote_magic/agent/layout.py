"""A job's files on the host: the project layout it runs in, the modules it imports, what it wrote.

The client sends each file as a content-addressed blob and the spec lists
where it goes (``files``: the layout the cell runs in, ``modules``: folders
put first on ``sys.path``).  A blob is linked into the job's folder, not
copied, so a 2 GB data folder costs no disk and no time per job.  A link
shares the blob's bytes: the agent runs as the user (often root), so no file
mode keeps a cell from writing into it.  When the job ends, every linked
blob whose size or mtime moved is hashed again and a damaged one is dropped
from the store: the next submit finds it missing and sends it again, so no
later job sees the change.  Files with the executable bit, and any file that
cannot be linked (another filesystem), are copied instead.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from typing import Any

from . import jobs, protocol

WORK_DIR = "work"  # the layout root inside the job folder
MODULES_DIR = "modules"  # on sys.path first
LINKED_FILE = "linked.json"  # the blobs linked into this job, as they were when linked
LINKED_RECORDS = ".linked"  # in the blob store: the mtime of each linked blob when it was last known intact
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
        return f"{key} must be a list of [path, sha256, size, mode]"
    for entry in entries:
        if not (
            isinstance(entry, list)
            and len(entry) == 4
            and isinstance(entry[1], str)
            and isinstance(entry[2], int)
            and isinstance(entry[3], int)
        ):
            return f"{key} must be a list of [path, sha256, size, mode], not {entry!r}"
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
            os.mkdir(created, jobs.DIR_MODE)


def materialize(root: str, path: str, spec: dict[str, Any]) -> tuple[str, str | None]:
    """Place the job's files and modules; returns the cell's working directory and the modules folder (or None)."""
    linked: list[list[Any]] = []
    work = jobs.ensure_dir(os.path.join(path, WORK_DIR))
    for rel, digest, size, mode in spec.get("files", []):
        linked += _place(root, work, rel, digest, size, mode)
    modules = None
    if spec.get("modules"):
        modules = jobs.ensure_dir(os.path.join(path, MODULES_DIR))
        for rel, digest, size, mode in spec["modules"]:
            linked += _place(root, modules, rel, digest, size, mode)
    jobs.atomic_write(os.path.join(path, LINKED_FILE), json.dumps(linked).encode(), durable=False)
    cwd = job_cwd(path, spec)
    if not spec.get("workdir"):
        _private_dirs(cwd, work)
    elif not os.path.isdir(cwd):
        raise jobs.AgentError(f"--workdir {spec['workdir']} is not a folder on this host")
    return cwd, modules


def _place(root: str, folder: str, rel: str, digest: str, size: int, mode: int) -> list[list[Any]]:
    """Link (or copy) one blob to ``folder/rel``; the blob's state when linked, to check it later.

    A blob is linked only once it is known intact: one that a job linked
    earlier may have been written through that link since (by a job killed
    before its own check), so it is hashed again when its mtime moved.
    """
    problem = safe_relative(rel)
    if problem:
        raise jobs.AgentError(problem)
    blob = jobs.blob_path(root, digest)
    target = os.path.join(folder, *rel.split("/"))
    _private_dirs(os.path.dirname(target), folder)
    gone = jobs.AgentError(
        f"the host's stored copy of {rel} was changed by another job and dropped; run the cell again to send it anew"
    )
    if os.path.lexists(target) and not os.path.isdir(target):
        os.unlink(target)  # a requeued job places its files again; never copy onto a link to the blob
    try:
        st = os.stat(blob)
        if not _intact(root, digest, st):
            raise gone
        if not mode & 0o111:
            os.link(blob, target)
            return [[digest, size, st.st_mtime_ns, rel]]
    except FileNotFoundError:
        raise gone from None
    except OSError:
        pass  # another filesystem, or links not allowed here: a copy is always safe
    shutil.copyfile(blob, target)
    os.chmod(target, (mode & 0o700) | 0o600)
    return []


def _linked_record(root: str, digest: str) -> str:
    return os.path.join(jobs.ensure_dir(os.path.join(jobs.blobs_dir(root), LINKED_RECORDS)), digest)


def _intact(root: str, digest: str, st: os.stat_result) -> bool:
    """Whether a blob can be linked into a job: never linked before, or unchanged since, or hashed again intact.

    Only a linked blob can be written by a cell (inputs are mapped
    privately), so a blob with no record is as it was received.  One that
    fails its hash is dropped: the next submit sends the file again.
    """
    record = _linked_record(root, digest)
    try:
        with open(record, encoding="ascii") as f:
            recorded: int | None = int(f.read().strip())
    except (OSError, ValueError):
        recorded = None
    if recorded == st.st_mtime_ns:
        return True
    if recorded is not None and _sha256(jobs.blob_path(root, digest)) != digest:
        drop_blob(root, digest)
        return False
    jobs.atomic_write(record, str(st.st_mtime_ns).encode(), durable=False)
    return True


def drop_blob(root: str, digest: str) -> None:
    """Remove a damaged blob (and its link record): the next submit finds it missing and sends it again."""
    jobs.unlink_quietly(jobs.blob_path(root, digest))
    jobs.unlink_quietly(os.path.join(jobs.blobs_dir(root), LINKED_RECORDS, digest))


def check_linked(root: str, path: str) -> list[str]:
    """Drop every linked blob the job changed; the paths (as the job saw them) of those it changed.

    Only blobs whose size or mtime moved are hashed again, so a job that
    only read its files costs one ``stat`` per file.
    """
    try:
        with open(os.path.join(path, LINKED_FILE), encoding="utf-8") as f:
            linked = json.load(f)
    except (OSError, ValueError):
        return []
    changed = []
    for digest, size, mtime_ns, rel in linked:
        blob = jobs.blob_path(root, digest)
        try:
            st = os.stat(blob)
        except FileNotFoundError:
            continue
        if st.st_size == size and st.st_mtime_ns == mtime_ns:
            continue
        if st.st_size != size or _sha256(blob) != digest:
            drop_blob(root, digest)
            changed.append(rel)
        else:  # touched, not changed: trust its new mtime
            jobs.atomic_write(_linked_record(root, digest), str(st.st_mtime_ns).encode(), durable=False)
    return changed


def _sha256(file: str) -> str:
    hasher = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(_CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


def _inside(path: str, boundary: str) -> bool:
    real = os.path.realpath(path)
    return real == boundary or real.startswith(boundary.rstrip(os.sep) + os.sep)


def _files_under(top: str, boundary: str) -> Iterator[str]:
    """Every file under ``top`` that really lies inside ``boundary`` (links out of it are not followed),
    at most WALK_LIMIT of them."""
    seen = 0
    for folder, dirs, files in os.walk(top):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS and _inside(os.path.join(folder, d), boundary))
        for name in files:
            seen += 1
            if seen > WALK_LIMIT:
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
    if not isinstance(pattern, str) or not pattern.strip() or "\0" in pattern:
        return f"not a file pattern: {pattern!r}"
    if pattern.startswith(("/", "~")):
        return f"--fetch patterns are relative to the job's working folder, not {pattern!r}"
    return None


def matching_files(path: str, spec: dict[str, Any], patterns: list[str]) -> list[str]:
    """Files a pattern names: a glob (``**`` included), a file, or a folder (all of it), relative to the cell's
    working folder, each really inside the job's layout (or --workdir): a link out of it is never followed."""
    top, cwd = os.path.realpath(work_root(path, spec)), job_cwd(path, spec)
    matched: set[str] = set()
    for pattern in patterns:
        problem = pattern_problem(pattern)
        if problem:
            raise jobs.AgentError(problem)
        if not _inside(os.path.join(cwd, pattern.split("*")[0].split("?")[0].split("[")[0] or "."), top):
            raise jobs.AgentError(f"--fetch {pattern}: it reaches outside the job's folder on the host")
        for hit in glob.glob(pattern, root_dir=cwd, recursive=True):
            full = os.path.join(cwd, hit)
            if not _inside(full, top):
                continue
            found = _files_under(full, top) if os.path.isdir(full) else [full] if os.path.isfile(full) else []
            matched.update(os.path.relpath(os.path.normpath(f), cwd) for f in found)
    return sorted(rel.replace(os.sep, "/") for rel in matched)


def store_files(root: str, path: str, spec: dict[str, Any], patterns: list[str]) -> list[list[Any]]:
    """Copy the matching files into the blob store; [relative path, sha256, size] for each.

    A copy, hashed while it is written, so a file the job (or anyone) changes
    later never alters what was fetched.  The digests are recorded in the job
    folder so ``gc`` keeps them while the job is kept.
    """
    found = []
    with jobs.blob_lock(root, exclusive=False):
        cwd = job_cwd(path, spec)
        for rel in matching_files(path, spec, patterns):
            digest, size = _copy_into_store(root, os.path.normpath(os.path.join(cwd, rel)))
            found.append([rel, digest, size])
        record = os.path.join(path, protocol.FETCHED_BLOBS_FILE)
        digests = sorted({d for _, d, _ in found} | set(jobs.read_digests(record)))
        jobs.atomic_write(record, json.dumps(digests).encode(), durable=False)
    return found


def _copy_into_store(root: str, source: str) -> tuple[str, int]:
    folder = jobs.blobs_dir(root)
    tmp = os.path.join(folder, f"fetch.part-{os.getpid()}-{secrets.token_hex(4)}")
    hasher = hashlib.sha256()
    size = 0
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, jobs.FILE_MODE)
        with os.fdopen(fd, "wb") as out, open(source, "rb") as f:
            while chunk := f.read(_CHUNK):
                hasher.update(chunk)
                out.write(chunk)
                size += len(chunk)
        digest = hasher.hexdigest()
        target = jobs.blob_path(root, digest)
        if os.path.exists(target) and os.path.getsize(target) == size:
            jobs.unlink_quietly(tmp)
        else:
            os.replace(tmp, target)
        return digest, size
    except BaseException:
        jobs.unlink_quietly(tmp)
        raise
