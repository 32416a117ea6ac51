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

import fnmatch
import glob
import hashlib
import json
import os
import secrets
import shutil
from typing import Any

from . import jobs, protocol

WORK_DIR = "work"  # the layout root inside the job folder
MODULES_DIR = "modules"  # on sys.path first
LINKED_FILE = "linked.json"  # the blobs linked into this job, as they were when linked
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


def job_cwd(path: str, spec: dict[str, Any]) -> str:
    """Where the cell runs: ``--workdir`` on the host, else its place in the job's layout."""
    if spec.get("workdir"):
        return os.path.abspath(os.path.expanduser(spec["workdir"]))
    cwd = spec.get("cwd") or ""
    return os.path.join(path, WORK_DIR, *([cwd] if cwd else []))


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
        os.makedirs(cwd, mode=jobs.DIR_MODE, exist_ok=True)
    elif not os.path.isdir(cwd):
        raise jobs.AgentError(f"--workdir {spec['workdir']} is not a folder on this host")
    return cwd, modules


def _place(root: str, folder: str, rel: str, digest: str, size: int, mode: int) -> list[list[Any]]:
    """Link (or copy) one blob to ``folder/rel``; the blob's state when linked, to check it later."""
    problem = safe_relative(rel)
    if problem:
        raise jobs.AgentError(problem)
    blob = jobs.blob_path(root, digest)
    target = os.path.join(folder, *rel.split("/"))
    os.makedirs(os.path.dirname(target), mode=jobs.DIR_MODE, exist_ok=True)
    if not mode & 0o111:
        try:
            os.link(blob, target)
            st = os.stat(blob)
            return [[digest, size, st.st_mtime_ns, rel]]
        except OSError:
            pass  # another filesystem, or links not allowed here: a copy is always safe
    shutil.copyfile(blob, target)
    os.chmod(target, (mode & 0o777) | 0o600)
    return []


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
            jobs.unlink_quietly(blob)
            changed.append(rel)
    return changed


def _sha256(file: str) -> str:
    hasher = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(_CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


def written_files(cwd: str, since: float, limit: int = WRITTEN_LIMIT) -> tuple[list[list[Any]], int]:
    """Files under ``cwd`` changed at or after ``since`` (relative path, size), newest first; and how many in all."""
    found: list[tuple[float, str, int]] = []
    seen = 0
    for folder, dirs, files in os.walk(cwd):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS)
        for name in files:
            seen += 1
            if seen > WALK_LIMIT:
                break
            full = os.path.join(folder, name)
            try:
                st = os.lstat(full)
            except OSError:
                continue
            if st.st_mtime >= since and os.path.isfile(full):
                found.append((st.st_mtime, os.path.relpath(full, cwd).replace(os.sep, "/"), st.st_size))
    found.sort(key=lambda item: (-item[0], item[1]))
    return [[rel, size] for _, rel, size in found[:limit]], len(found)


def pattern_problem(pattern: object) -> str | None:
    """A --fetch pattern names files under the job's working directory, never above it."""
    if not isinstance(pattern, str) or not pattern.strip():
        return f"not a file pattern: {pattern!r}"
    if pattern.startswith(("/", "~")) or ".." in pattern.split("/"):
        return f"--fetch patterns are relative to the job's working directory and stay inside it, not {pattern!r}"
    return None


def matching_files(cwd: str, patterns: list[str]) -> list[str]:
    """Files under ``cwd`` that a pattern names: a glob (``**`` included), a file, or a folder (all of it)."""
    matched: set[str] = set()
    for pattern in patterns:
        problem = pattern_problem(pattern)
        if problem:
            raise jobs.AgentError(problem)
        for hit in glob.glob(pattern, root_dir=cwd, recursive=True):
            full = os.path.join(cwd, hit)
            if os.path.isdir(full):
                for folder, dirs, files in os.walk(full):
                    dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS]
                    matched.update(os.path.relpath(os.path.join(folder, n), cwd) for n in files)
            elif os.path.isfile(full):
                matched.add(os.path.normpath(hit))
    return sorted(rel.replace(os.sep, "/") for rel in matched if not fnmatch.fnmatch(os.path.basename(rel), "*.part-*"))


def store_files(root: str, path: str, cwd: str, patterns: list[str]) -> list[list[Any]]:
    """Copy the matching files into the blob store; [relative path, sha256, size] for each.

    A copy, hashed while it is written, so a file the job (or anyone) changes
    later never alters what was fetched.  The digests are recorded in the job
    folder so ``gc`` keeps them while the job is kept.
    """
    found = []
    with jobs.blob_lock(root, exclusive=False):
        for rel in matching_files(cwd, patterns):
            digest, size = _copy_into_store(root, os.path.join(cwd, *rel.split("/")))
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
