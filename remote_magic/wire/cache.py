"""The local cache of output blobs, so the same output is never downloaded twice.

Blobs are content-addressed, so a cached file is valid forever; the cache
lives under the data dir (``blobs/<hex>``, 0600 files in a 0700 folder, named
as the host names its blob files: ``digest.file_name``, so an entry an earlier
version stored is found for a named digest) and is verified when read.

Outputs can be large (a model's weights, arrays of predictions), so the cache
is bounded: by default 10 GiB (``DEFAULT_CACHE_LIMIT``).  After each ``put``
the least recently used blobs go until the rest fits; "used" is the file's
mtime, which ``get`` refreshes on every hit.  A lost blob only costs a download.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import threading
import time
from typing import BinaryIO, NamedTuple

from ..agent import digest as digests
from ..paths import data_dir

_CHUNK = 4 * 1024 * 1024

DEFAULT_CACHE_LIMIT = 10 * 2**30
"""Bytes of blobs the cache keeps when no limit is given: 10 GiB."""

_STALE_TMP_AGE = 3600.0
"""A temporary file this old belongs to a writer that died; a live writer renames it within seconds."""


class _Entry(NamedTuple):
    used: float
    size: int
    path: str


class BlobCache:
    """Blobs under ``folder``, at most ``limit`` bytes of them (None: ``DEFAULT_CACHE_LIMIT``, 0: cache nothing)."""

    def __init__(self, folder: str | None = None, limit: int | None = None) -> None:
        if limit is not None and limit < 0:
            raise ValueError(f"the blob cache limit must be 0 or more bytes, not {limit}")
        self.folder = folder or os.path.join(data_dir(), "blobs")
        self.limit = DEFAULT_CACHE_LIMIT if limit is None else limit
        self._writers: list[threading.Thread] = []

    def _path(self, digest: str) -> str | None:
        """Where the blob is kept; None for what is no digest (a host's junk never names a path here)."""
        return os.path.join(self.folder, digests.file_name(digest)) if digests.is_digest(digest) else None

    def get(self, digest: str, size: int) -> bytearray | None:
        """The cached blob, or None if absent or damaged (a damaged file is removed)."""
        path = self._path(digest)
        if path is None:
            return None
        try:
            if os.path.getsize(path) != size:
                raise ValueError
            buffer = bytearray(size)
            with open(path, "rb") as f:
                if f.readinto(buffer) != size:
                    raise ValueError
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            _remove(path)
            return None
        if digests.of(buffer) != digests.normal(digest):
            _remove(path)
            return None
        try:
            os.utime(path)  # a hit makes it the most recently used: eviction takes it last
        except OSError:
            pass  # evicted meanwhile by another kernel: the bytes in hand are still good
        return buffer

    def put_in_background(self, digest: str, data: bytearray) -> threading.Thread:
        """Store without making the caller wait.  If the caller changes ``data`` meanwhile, the
        entry no longer matches its digest and ``get`` discards it."""
        thread = threading.Thread(target=self._put_quietly, args=(digest, data), daemon=True)
        thread.start()
        self._writers = [t for t in self._writers if t.is_alive()] + [thread]
        return thread

    def wait(self) -> None:
        """Until every background write has finished."""
        for thread in self._writers:
            thread.join()
        self._writers.clear()

    def _put_quietly(self, digest: str, data: bytearray) -> None:
        try:
            self.put(digest, data)
        except OSError:
            pass  # a full disk only costs a later download

    def put(self, digest: str, data: bytearray) -> None:
        """Store a blob, then evict the least recently used ones over the limit.

        A blob larger than the whole limit is not stored: it would only push out everything else.
        """
        path = self._path(digest)
        if path is None or memoryview(data).nbytes > self.limit:
            return
        os.makedirs(self.folder, mode=0o700, exist_ok=True)
        tmp = f"{path}.tmp-{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            _remove(tmp)
            raise
        self._evict()

    def copy_out(self, digest: str, size: int, out: BinaryIO) -> bool:
        """Write the cached blob to ``out`` a piece at a time, checked against its digest; False when absent.

        ``out`` may hold a partial copy when this returns False: the caller
        writes to a temporary file and starts over.
        """
        path = self._path(digest)
        if path is None:
            return False
        hasher = digests.new()
        try:
            if os.path.getsize(path) != size:
                raise ValueError
            with open(path, "rb") as f:
                while chunk := f.read(_CHUNK):
                    hasher.update(chunk)
                    out.write(chunk)
        except FileNotFoundError:
            return False
        except (OSError, ValueError):
            _remove(path)
            return False
        if not digests.matches(hasher, digest):
            _remove(path)
            return False
        with contextlib.suppress(OSError):
            os.utime(path)
        return True

    def put_file(self, digest: str, source: str) -> None:
        """Store a copy of a local file whose content is ``digest`` (a fetched file), then evict over the limit."""
        path = self._path(digest)
        if path is None or os.path.getsize(source) > self.limit:
            return
        os.makedirs(self.folder, mode=0o700, exist_ok=True)
        tmp = f"{path}.tmp-{secrets.token_hex(4)}"
        try:
            shutil.copyfile(source, tmp)
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
        except BaseException:
            _remove(tmp)
            raise
        self._evict()

    def usage(self) -> tuple[int, int]:
        """How many blobs the cache holds and their bytes (temporary files of writers not counted)."""
        entries = self._scan(tidy=False)
        return len(entries), sum(entry.size for entry in entries)

    def clear(self) -> int:
        """Remove every blob (and stale temporary files); the bytes freed."""
        freed = 0
        for entry in self._scan(tidy=True):
            if _remove(entry.path):
                freed += entry.size
        return freed

    def _evict(self) -> None:
        entries = sorted(self._scan(tidy=True))  # oldest use first
        total = sum(entry.size for entry in entries)
        for entry in entries:
            if total <= self.limit:
                break
            _remove(entry.path)  # gone already (another kernel evicting too) counts as removed
            total -= entry.size

    def _scan(self, tidy: bool) -> list[_Entry]:
        """The blobs, in one pass over the folder; with ``tidy``, stale temporary files are removed on the way.

        Files may vanish meanwhile (another kernel evicting): they are skipped, never an error.
        """
        entries: list[_Entry] = []
        stale = time.time() - _STALE_TMP_AGE
        try:
            scan = os.scandir(self.folder)
        except FileNotFoundError:
            return entries
        with scan:
            for item in scan:
                try:
                    if not item.is_file(follow_symlinks=False):
                        continue
                    info = item.stat(follow_symlinks=False)
                except OSError:
                    continue
                if ".tmp-" in item.name:
                    if tidy and info.st_mtime < stale:
                        _remove(item.path)
                    continue
                entries.append(_Entry(info.st_mtime, info.st_size, item.path))
        return entries


def _remove(path: str) -> bool:
    try:
        os.unlink(path)
    except OSError:
        return False
    return True
