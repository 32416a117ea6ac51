"""Sending the blobs a host lacks: input buffers, project files and modules.

The host answers ``submit`` with the digests it is missing; only those move
(an unchanged 2 GB data folder moves 0 bytes).  Small blobs go many to a
request, so 100k small files cost as much as their bytes and not 100k round
trips; large ones go one by one: an input buffer compressed where it pays, a
file streamed as it is read (never whole in memory).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ..agent import digest as digests
from ..errors import AgentCommandError
from .client import AgentClient

LARGE_BLOB = 8 * 1024 * 1024  # sent alone (an input buffer maybe compressed); smaller ones are batched
FILE_CHUNK = 4 * 1024 * 1024
BATCH_BYTES = 16 * 1024 * 1024
BATCH_COUNT = 2000

Progress = Callable[[int, int], None]  # (bytes moved, bytes to move)
PROGRESS_SECONDS = 0.5


class TransferProgress:
    """Bytes moved so far, told to ``progress`` at most every PROGRESS_SECONDS and once at the end."""

    def __init__(self, total: int, progress: Progress | None) -> None:
        self.total = total
        self.progress = progress
        self.done = 0  # bytes of the blobs finished
        self._last = 0.0

    def __call__(self, moved: int, force: bool = False) -> None:
        if self.progress is not None and (force or time.monotonic() - self._last >= PROGRESS_SECONDS):
            self._last = time.monotonic()
            self.progress(moved, self.total)

    def within(self, moved: int) -> None:
        """``moved`` bytes of the blob now on its way."""
        self(self.done + moved)

    def add(self, size: int) -> None:
        """A blob of ``size`` bytes is done."""
        self.done += size
        self(self.done)

    def finish(self) -> None:
        self(self.done, force=True)


class FileChanged(ValueError):
    """A local file changed between being hashed and being sent."""


@dataclass(frozen=True)
class BlobSource:
    """Where a blob's bytes are: a buffer in memory, or a local file (``path``) read only when sent."""

    digest: str
    size: int
    buffer: memoryview | None = None
    path: str | None = None

    def chunks(self) -> Iterator[bytes | memoryview]:
        """The bytes, a bounded piece at a time (a file is read as it is sent, never whole and never mapped:
        a file truncated meanwhile is an error here, not a crash of the kernel)."""
        if self.buffer is not None:
            yield self.buffer
            return
        assert self.path is not None
        try:
            with open(self.path, "rb") as f:
                remaining = self.size
                while remaining:
                    chunk = f.read(min(FILE_CHUNK, remaining))
                    if not chunk:
                        raise FileChanged(f"{self.path} got shorter while it was being sent")
                    remaining -= len(chunk)
                    yield chunk
                if f.read(1):
                    raise FileChanged(f"{self.path} got longer while it was being sent")
        except OSError as exc:
            raise FileChanged(f"{self.path} could not be read while it was being sent ({exc.strerror})") from None

    def read(self) -> bytes:
        return b"".join(bytes(chunk) for chunk in self.chunks())


def send_missing(
    client: AgentClient,
    sources: list[BlobSource],
    missing: set[str],
    compress: str = "auto",
    progress: Progress | None = None,
) -> int:
    """Upload the sources whose digest is in ``missing``; returns the bytes sent (before compression).

    Raises FileChanged naming the local file when the host found that a
    file's content no longer matches the digest it was listed under.
    """
    wanted = {digests.normal(digest) for digest in missing if digests.is_digest(digest)}  # named or bare: one blob
    todo: dict[str, BlobSource] = {}
    for source in sources:
        key = digests.normal(source.digest)
        if key in wanted:
            todo.setdefault(key, source)
    report = TransferProgress(sum(source.size for source in todo.values()), progress)
    batch: list[BlobSource] = []
    batch_bytes = 0

    def flush() -> None:
        nonlocal batch, batch_bytes
        if not batch:
            return
        with _naming_the_file(batch):
            client.put_blobs([(source.digest, memoryview(source.read())) for source in batch])
        report.add(batch_bytes)
        batch, batch_bytes = [], 0

    for source in todo.values():
        if source.size >= LARGE_BLOB:
            with _naming_the_file([source]):
                if source.buffer is not None:
                    client.put_blob(source.digest, source.buffer, compress, report.within)
                else:  # a project file: streamed as it is read, as is
                    client.put_blob_stream(source.digest, source.size, lambda s=source: _told(s.chunks(), report))
            report.add(source.size)
            continue
        batch.append(source)
        batch_bytes += source.size
        if batch_bytes >= BATCH_BYTES or len(batch) >= BATCH_COUNT:
            flush()
    flush()
    report.finish()
    return report.done


def _told(chunks: Iterator[bytes | memoryview], report: TransferProgress) -> Iterator[bytes | memoryview]:
    """``chunks``, telling ``report`` how far the blob has gone after each."""
    moved = 0
    for chunk in chunks:
        yield chunk
        moved += memoryview(chunk).nbytes
        report.within(moved)


@contextmanager
def _naming_the_file(sources: list[BlobSource]) -> Iterator[None]:
    """Turn the host's "content does not match its sha256" into the local file that changed (the host names a
    blob by ``digest.short``)."""
    try:
        yield
    except AgentCommandError as exc:
        text = str(exc)
        for source in sources:
            if source.path and f"blob {digests.short(source.digest)}" in text:
                raise FileChanged(
                    f"{source.path} changed while it was being sent; nothing was run. Run the cell again "
                    "once nothing writes to it"
                ) from None
        raise
    except FileChanged as exc:
        raise FileChanged(f"{exc}; nothing was run. Run the cell again once nothing writes to it") from None
