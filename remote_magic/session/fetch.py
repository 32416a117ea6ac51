"""What comes back from a finished job: its outputs, its last checkpoint, and its files (``--fetch``).

Blobs come from the local cache when an earlier fetch stored them.  A fetched file is checked
against the host's word at every step: whatever the host answers, nothing is written outside
this kernel's copy of the job's layout, and a file arrives whole or not at all.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..agent import digest, protocol
from ..errors import RemoteMagicError
from ..project import payload
from ..wire import upload
from ..wire.cache import BlobCache
from ..wire.client import AgentClient
from . import fetched
from .hosts import memory_mib
from .sent import SENT, SentBuffers

# Transfers at least this big show their progress in the panel.
SHOWN_TRANSFER_BYTES = 32 * 1024 * 1024


def shown_progress(show: Callable[[str], None], what: str) -> upload.Progress:
    """A transfer's progress as a panel line ("uploading: 12.6 of 536.9 MB (2%)"), for those worth showing."""

    def progress(moved: int, total: int) -> None:
        if total >= SHOWN_TRANSFER_BYTES:
            show(f"{what}: {moved / 1e6:,.1f} of {total / 1e6:,.1f} MB ({100 * moved // total}%)")

    return progress


def fetch_outputs(
    client: AgentClient,
    job_id: str,
    done: dict[str, Any],
    cache: BlobCache | None = None,
    progress: upload.Progress | None = None,
    *,
    sent: SentBuffers | None = SENT,
) -> payload.Values:
    """Load the job's outputs (with the notes their loading made).

    A blob this kernel sent as an input and still holds, unchanged, is not downloaded (``sent``): an output
    that is the input itself, never written on the host (``inputs_as_is``), shares the kernel's memory, as it
    shared the input's there; another with the same bytes (``y = x.copy()``) gets a copy of them.  Else the
    blob comes from the local cache when an earlier fetch stored it, else from the host.
    """
    data = client.outputs(job_id)
    blobs = done.get("blobs", [])
    same_object = set(done.get("inputs_as_is", []))
    found = [sent.find(blob, size) if sent is not None else None for blob, size in blobs]
    downloads = sum(size for (_, size), have in zip(blobs, found, strict=True) if have is None)
    report = upload.TransferProgress(downloads, progress)
    buffers: list[Any] = []
    for (blob, size), have in zip(blobs, found, strict=True):
        if have is not None:
            buffers.append(have if blob in same_object else bytearray(have))
            continue
        buffers.append(fetch_blob(client, blob, size, cache, report.within))
        report.add(size)
    report.finish()
    return payload.unpack(data, buffers)


def fetch_blob(
    client: AgentClient,
    blob: str,
    size: int,
    cache: BlobCache | None = None,
    progress: Callable[[int], None] | None = None,
) -> bytearray:
    """The blob named by its digest, from the local cache or the host (then cached, in the background)."""
    # The local host's blobs are on this disk already: caching them would only store them twice.
    cache = None if client.is_local else cache or BlobCache()
    buffer = cache.get(blob, size) if cache is not None else None
    if buffer is None:
        buffer = client.get_blob(blob, size, progress)  # verified against its digest while it arrives
        if cache is not None:
            cache.put_in_background(blob, buffer)
    return buffer


def fetch_checkpoint(client: AgentClient, job_id: str) -> tuple[payload.Values, dict[str, Any]]:
    """The model of the job's last checkpoint, and the checkpoint's epoch information."""
    meta = client.status(job_id).get("checkpoint")
    if not meta:
        raise RemoteMagicError(
            f"job {job_id} on host {client.host} has no checkpoint: no Keras epoch ended "
            "(or it ran with --checkpoint-every 0)"
        )
    return payload.unpack(client.checkpoint(job_id), []), meta


@dataclass
class FileFetch:
    """``--fetch``: the job's files matching ``patterns`` come back into ``folder`` (the kernel's working folder).

    ``layout_cwd`` is ``folder``'s place inside the job's layout (the
    submission's ``cwd``) when the caller knows it; otherwise the host says,
    and its word counts only as far as ``folder`` really ends with that path.
    The bounds default to the kernel's ``REMOTE_MAGIC_FETCH_MAX_FILES`` and
    ``REMOTE_MAGIC_FETCH_MAX_BYTES``, else the agent's defaults.
    """

    patterns: list[str]
    folder: str
    overwrite: bool = False
    layout_cwd: str | None = None
    max_files: int | None = None
    max_bytes: int | None = None


def fetch_files(client: AgentClient, job_id: str, request: FileFetch, cache: BlobCache | None = None) -> list[str]:
    """Bring back the job's files that match; what happened, one line each, for the panel.

    Each file arrives whole (a temporary file renamed into place, never a
    partial one).  A local file with other content is kept and the fetched
    one saved beside it (``model.<job id>.keras``) unless ``overwrite``, or
    unless an earlier fetch wrote it and it is unchanged since (the record in
    ``fetched``): a re-run's ``best_model.keras`` then replaces the last one.
    Whatever the host answers, nothing is written outside this folder's copy
    of the job's layout: every path is checked before the first file is.
    """
    max_files, max_bytes = fetch_bounds(request)
    answer = client.fetch_files(job_id, request.patterns, max_files, max_bytes)
    found = _fetched_list(answer, max_files, max_bytes)
    if not found:
        return [f"--fetch {','.join(request.patterns)}: no file of job {job_id} matched"]
    folder = os.path.realpath(request.folder)
    layout_root = _local_layout_root(folder, request.layout_cwd, answer.get("cwd"))
    targets = [_local_target(layout_root, folder, rel) for rel, _, _ in found]
    notes, saved = [], []
    record = fetched.FetchedFiles()
    try:
        for (rel, blob, size), target in zip(found, targets, strict=True):
            local_digest = functools.cache(functools.partial(_local_digest, target))  # read once at most
            if os.path.isfile(target) and _same_content(target, blob, size, local_digest):
                saved.append(f"{rel} (unchanged)")
                continue
            shown = f"{size:,} bytes"
            if os.path.exists(target) and not request.overwrite:
                if record.ours_unchanged(target, local_digest):
                    shown = f"replaced our earlier fetch, {size:,} bytes"
                else:
                    target = _beside(target, job_id)
                    notes.append(
                        f"{rel} exists here with other content: kept it, saved the job's as "
                        f"{os.path.relpath(target, folder)} (--fetch-overwrite replaces it)"
                    )
            _fetch_file(client, blob, size, target, None if client.is_local else cache or BlobCache(), layout_root)
            record.wrote(target, blob, size)
            saved.append(f"{os.path.relpath(target, folder)} ({shown})")
    finally:
        record.save()  # the files written before a failure are ours too
    return [f"fetched: {', '.join(saved)}", *notes]


def _beside(target: str, job_id: str) -> str:
    """Where the job's file goes when the user's own is kept: ``model.<job id>.keras``."""
    stem, ext = os.path.splitext(target)
    return f"{stem}.{job_id}{ext}"


def fetch_bounds(request: FileFetch) -> tuple[int, int]:
    """(files, bytes) one fetch may bring back: the request's, else the kernel's environment, else the defaults."""
    files, size = request.max_files, request.max_bytes
    setting = os.environ.get(protocol.FETCH_MAX_FILES_SETTING, "").strip()
    if files is None and setting:
        if not setting.isdigit() or int(setting) < 1:
            raise RemoteMagicError(
                f"{protocol.FETCH_MAX_FILES_SETTING} takes how many files one fetch may bring back (1 or more), "
                f"not {setting!r}"
            )
        files = int(setting)
    setting = os.environ.get(protocol.FETCH_MAX_BYTES_SETTING, "").strip()
    if size is None and setting:
        try:
            size = memory_mib(setting, protocol.FETCH_MAX_BYTES_SETTING) << 20
        except ValueError as exc:
            raise RemoteMagicError(str(exc)) from None
        if size < 1:
            raise RemoteMagicError(f"{protocol.FETCH_MAX_BYTES_SETTING} takes a size of 1MiB or more, not {setting!r}")
    return files or protocol.FETCH_MAX_FILES, size or protocol.FETCH_MAX_BYTES


def _fetched_list(answer: object, max_files: int, max_bytes: int) -> list[tuple[str, str, int]]:
    """The host's list of fetched files, each [path, digest, size], checked before it is used: the digest
    names a file in the local cache and the size how much is read."""
    files = answer.get("files") if isinstance(answer, dict) else None
    if not isinstance(files, list) or not all(
        isinstance(entry, list)
        and len(entry) == 3
        and isinstance(entry[0], str)
        and digest.is_digest(entry[1])
        and isinstance(entry[2], int)
        and entry[2] >= 0
        for entry in files
    ):
        raise RemoteMagicError(
            "the host's answer to --fetch is not a list of [path, digest, size]; nothing was written"
        )
    if len(files) > max_files or sum(size for _, _, size in files) > max_bytes:
        raise RemoteMagicError(
            f"the host's answer to --fetch lists {len(files):,} files, more than the bounds of this fetch "
            f"({max_files:,} files, {max_bytes:,} bytes); nothing was written"
        )
    return [(rel, blob, size) for rel, blob, size in files]


def _local_layout_root(folder: str, layout_cwd: str | None, host_cwd: object) -> str:
    """The local folder that mirrors the job's layout root: ``folder`` (which mirrors the cell's working
    folder) climbed as many levels as the cell's folder lies inside the layout.  The host's word for that
    is taken only when it is a plain relative path that ``folder`` really ends with; else no climbing."""
    offset = layout_cwd if layout_cwd is not None else host_cwd
    if not isinstance(offset, str) or _fetched_path_problem(offset or ".") or ".." in offset.split("/"):
        return folder
    parts = [part for part in offset.split("/") if part not in ("", ".")]
    root = folder
    for part in reversed(parts):
        if layout_cwd is None and os.path.basename(root) != part:
            return folder  # the kernel is elsewhere now: files land in this folder only
        root = os.path.dirname(root)
    return root


def _fetched_path_problem(rel: str) -> str | None:
    """Why a path the host answered cannot be used here, or None: absolute, empty, control characters."""
    if not rel or any(ord(c) < 32 or c == "\x7f" for c in rel):
        return "which is empty or has control characters"
    if (
        rel.startswith("/")
        or os.path.isabs(rel)
        or any(sep in rel for sep in (os.sep, os.altsep) if sep and sep != "/")
    ):
        return "which is absolute (or uses this system's separators)"
    return None


def _local_target(layout_root: str, folder: str, rel: str) -> str:
    """Where a fetched file goes: ``rel`` below ``folder``, refused unless it stays inside ``layout_root``, by
    name and by real path (a local link such as ``data -> /mnt/x`` would carry ``data/f`` out of it)."""
    problem = _fetched_path_problem(rel)
    if problem is None:
        target = os.path.normpath(os.path.join(folder, *rel.split("/")))
        if not target.startswith(layout_root.rstrip(os.sep) + os.sep):
            problem = f"which would land outside {layout_root}, this kernel's copy of the job's layout"
        else:
            problem = _linked_outside(layout_root, target)
            if problem is None:
                return target
    raise RemoteMagicError(
        f"--fetch: the host answered with the path {rel!r}, {problem}; nothing was written. Fetch from the "
        "folder the job was started in, with patterns inside the job's folder"
    )


def _linked_outside(layout_root: str, target: str) -> str | None:
    """Why ``target``'s folder, by its real path (the part that exists resolved, links included), is not
    inside ``layout_root``'s real path; None when it is."""
    root, real = os.path.realpath(layout_root), os.path.realpath(os.path.dirname(target))
    if real == root or real.startswith(root.rstrip(os.sep) + os.sep):
        return None
    return f"whose folder leads through a link to {real}, outside {layout_root}, this kernel's copy of the job's layout"


def _fetch_file(
    client: AgentClient, blob: str, size: int, target: str, cache: BlobCache | None, layout_root: str
) -> None:
    """One fetched file, streamed to a temporary file beside ``target`` and renamed into place when whole.

    Its folder is checked again once it exists (by real path, inside ``layout_root``), and the temporary
    file is created new (``O_EXCL | O_NOFOLLOW``): a link planted at its name is never written through."""
    os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
    problem = _linked_outside(layout_root, target)
    if problem is not None:
        raise RemoteMagicError(
            f"--fetch: {os.path.basename(target)} was not written: its folder {os.path.dirname(target)}, "
            f"{problem.removeprefix('whose folder ')}"
        )
    tmp = f"{target}.part-{os.getpid()}-{secrets.token_hex(4)}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(tmp, flags, 0o666)
    except FileExistsError:
        raise RemoteMagicError(
            f"--fetch: something is in the way of the temporary file {tmp} (left alone); "
            f"{os.path.basename(target)} was not written"
        ) from None
    try:
        with os.fdopen(fd, "wb") as f:
            cached = cache is not None and cache.copy_out(blob, size, f)
            if not cached:
                f.seek(0)
                f.truncate()
                client.get_blob_into(blob, size, f)
        if cache is not None and not cached:
            with contextlib.suppress(OSError):  # a full cache disk only costs a later download
                cache.put_file(blob, tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _same_content(path: str, expected: str, size: int, local_digest: Callable[[], str]) -> bool:
    """Whether the local file already holds the fetched one (its digest named or bare)."""
    if os.path.getsize(path) != size:
        return False
    return digest.split(local_digest()) == digest.split(expected)


def _local_digest(path: str) -> str:
    """The named digest of a local file, read in chunks (a fetched file may be larger than memory)."""
    hasher = digest.new()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            hasher.update(chunk)
    return digest.named(hasher)
