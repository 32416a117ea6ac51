"""The local cache of output blobs, so the same output is never downloaded twice.

Blobs are content-addressed, so a cached file is valid forever; the cache
lives under the data dir (``blobs/<sha256>``, 0600 files in a 0700 folder)
and is verified against its name when read.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import threading

from .paths import data_dir


class BlobCache:
    def __init__(self, folder: str | None = None) -> None:
        self.folder = folder or os.path.join(data_dir(), "blobs")
        self._writers: list[threading.Thread] = []

    def _path(self, digest: str) -> str:
        return os.path.join(self.folder, digest)

    def get(self, digest: str, size: int) -> bytearray | None:
        """The cached blob, or None if absent or damaged (a damaged file is removed)."""
        path = self._path(digest)
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
        if hashlib.sha256(buffer).hexdigest() != digest:
            _remove(path)
            return None
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
        os.makedirs(self.folder, mode=0o700, exist_ok=True)
        path = self._path(digest)
        tmp = f"{path}.tmp-{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
