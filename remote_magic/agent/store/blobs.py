"""The blob store: content-addressed buffers and files under ``<root>/blobs``, verified as they arrive.

A blob is stored under its digest (``agent/digest.py``), so a buffer or file that many jobs and paths
use is stored once; ``gc`` removes those no job names any more.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import mmap
import os
import secrets
import threading
import time
from collections.abc import Iterator
from typing import IO, Any

from .. import digest as digests
from .. import jobs, protocol
from ..disk import FILE_MODE, atomic_write, ensure_dir, unlink_quietly

_CHUNK = 4 * 1024 * 1024


def blobs_dir(root: str) -> str:
    return ensure_dir(os.path.join(root, "blobs"))


def blob_path(root: str, digest: str) -> str:
    """Where a blob is stored; a digest named (``sha256:<hex>``) or bare gives the same file."""
    try:
        return os.path.join(blobs_dir(root), digests.file_name(digest))
    except ValueError as exc:
        raise jobs.AgentError(str(exc)) from None


def missing_blobs(root: str, blobs: list[tuple[str, int]]) -> list[str]:
    """The digests of ``blobs`` the store lacks (or holds with the wrong size)."""
    missing = []
    for digest, size in blobs:
        try:
            if os.path.getsize(blob_path(root, digest)) == size:
                continue
        except FileNotFoundError:
            pass
        missing.append(digest)
    return missing


def receive_blob(root: str, digest: str, size: int, stream: IO[bytes], zstd: bool = False) -> None:
    """Store exactly ``size`` bytes from ``stream`` under ``digest``, verified.

    ``zstd``: the stream is zstandard-compressed (needs the zstandard package
    here).  A short or corrupt upload never becomes visible under the digest.
    """
    if zstd:
        try:
            import zstandard
        except ImportError:
            raise jobs.AgentError("this host's Python has no zstandard package; upload without compression") from None
        stream = zstandard.ZstdDecompressor().stream_reader(stream, read_across_frames=True)
    path = blob_path(root, digest)
    tmp = f"{path}.part-{os.getpid()}-{secrets.token_hex(4)}"
    hasher = digests.new()
    remaining = size
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    hashing: threading.Thread | None = None
    try:
        with os.fdopen(fd, "wb") as f:
            while remaining:
                chunk = stream.read(min(_CHUNK, remaining))
                if not chunk:
                    raise jobs.AgentError(
                        f"blob {digests.short(digest)}: upload ended after {size - remaining} of {size} bytes"
                    )
                # Hash one chunk while the next one is read and this one written (both let go of the GIL):
                # on the host, hashing and writing are the cost of an upload.
                if hashing is not None:
                    hashing.join()
                hashing = threading.Thread(target=hasher.update, args=(chunk,))
                hashing.start()
                f.write(chunk)
                remaining -= len(chunk)
            if hashing is not None:
                hashing.join()
                hashing = None
        # No fsync: see check_blob_after_reboot for how a blob that a crash may have damaged is caught.
        if not digests.matches(hasher, digest):
            raise jobs.AgentError(f"blob {digests.short(digest)}: content does not match its sha256; it was not stored")
        os.replace(tmp, path)
    except BaseException:
        if hashing is not None:
            hashing.join()
        unlink_quietly(tmp)
        raise


def write_blob(root: str, data: memoryview, digest: str | None = None) -> tuple[str, int]:
    """Store a buffer produced on the host (an output); returns (digest, size)."""
    digest = digest or digests.of(data)
    path = blob_path(root, digest)
    if not (os.path.exists(path) and os.path.getsize(path) == data.nbytes):
        atomic_write(path, data, durable=False)
    return digest, data.nbytes


def boot_time() -> float | None:
    """When this host last booted (Linux), or None when unknown."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            for line in f:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def map_blob(root: str, digest: str) -> Any:
    """A blob as a private, writable memory map: an input array costs no read and no copy.

    Pages are read when touched; writes go to private copies, never to the file.
    """
    path = blob_path(root, digest)
    size = os.path.getsize(path)
    if size == 0:
        return bytearray()
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    check_blob_after_reboot(path, digest, mapped)
    return mapped


def check_blob_after_reboot(path: str, digest: str, data: bytes | bytearray | None = None) -> None:
    """Verify a blob written before the last boot (once), then make it durable.

    Blobs are written without fsync (it cost more than the upload itself).
    Within one boot the page cache makes every completed write visible, so
    only a blob written before the last boot can have been damaged by a
    crash: such a blob is checked against its hash once, then fsynced and
    re-dated.  A damaged one is removed, and the next submit sends it again.
    """
    booted = boot_time()
    if booted is not None and os.path.getmtime(path) >= booted:
        return
    hasher = digests.new()
    if data is None:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                hasher.update(chunk)
    else:
        hasher.update(data)
    if not digests.matches(hasher, digest):
        unlink_quietly(path)
        raise jobs.AgentError(
            f"blob {digests.short(digest)} was damaged on the host (a crash?); run the cell again to resend it"
        )
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    os.utime(path)


@contextlib.contextmanager
def blob_lock(root: str, exclusive: bool) -> Iterator[None]:
    """Shared while a job is created or outputs are stored, exclusive while ``gc`` deletes blobs.

    Without it ``gc`` could delete a blob between a submit finding it present
    and the job naming it, or an output blob a finishing job has written but
    not yet listed in its ``done`` event.
    """
    fd = os.open(os.path.join(blobs_dir(root), ".lock"), os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def referenced_blobs(spec: dict[str, Any]) -> list[tuple[str, int]]:
    """Every blob a job's spec needs on the host: its inputs, its files and its modules."""
    pairs = [(digest, size) for digest, size in spec.get("blobs", [])]
    for key in ("files", "modules"):
        pairs += [(digest, size) for _, digest, size, _ in spec.get(key, [])]
    return pairs


def read_digests(file: str) -> list[str]:
    """A JSON list of blob digests a job recorded; empty when missing or unreadable."""
    try:
        with open(file, encoding="utf-8") as f:
            digests = json.load(f)
        return [d for d in digests if isinstance(d, str)] if isinstance(digests, list) else []
    except (OSError, ValueError):
        return []


def unreferenced_blobs(root: str) -> list[str]:
    """Blobs that no job's inputs, files, modules or outputs name (partial uploads included once stale).

    Call with ``blob_lock(root, exclusive=True)`` held.  Outputs count from
    ``outputs.blobs`` (written before the blobs by the runner) as well as
    from the ``done`` event.
    """
    referenced: set[str] = set()
    parent = jobs.jobs_dir(root)
    for job_id in os.listdir(parent):
        path = os.path.join(parent, job_id)
        try:
            referenced.update(digest for digest, _ in referenced_blobs(jobs.read_spec(path)))
        except (OSError, ValueError):
            continue
        referenced.update(read_digests(os.path.join(path, protocol.OUTPUT_BLOBS_FILE)))
        referenced.update(read_digests(os.path.join(path, protocol.FETCHED_BLOBS_FILE)))
        last = jobs.last_event(path)
        if last is not None and last["type"] == protocol.DONE:
            referenced.update(digest for digest, _ in last.get("blobs", []))
    names = {digests.file_name(d) for d in referenced if digests.is_digest(d)}  # named or bare: one file
    stale = time.time() - 3600
    unreferenced = []
    for name in os.listdir(blobs_dir(root)):
        if name.startswith("."):
            continue  # the lock
        if name.split(".", 1)[0] in names:
            continue
        if "." in name and os.path.getmtime(os.path.join(blobs_dir(root), name)) > stale:
            continue  # an upload in progress right now
        unreferenced.append(name)
    return unreferenced
