"""Files on the host that others read: written whole or not at all, 0600 in 0700 folders."""

from __future__ import annotations

import os
import secrets

DIR_MODE = 0o700


FILE_MODE = 0o600


def ensure_dir(path: str) -> str:
    """Create ``path`` (and parents) as 0700; tighten an existing folder we own."""
    os.makedirs(path, mode=DIR_MODE, exist_ok=True)
    os.chmod(path, DIR_MODE)
    return path


def atomic_write(path: str, data: bytes | memoryview, durable: bool = True, mode: int = FILE_MODE) -> None:
    """Write tmp, fsync (when ``durable``), rename: readers never see a partial file.

    ``mode`` other than 0600 (a queue shared by a group) is set whatever the umask.
    """
    tmp = f"{path}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        if mode != FILE_MODE:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        unlink_quietly(tmp)
        raise


def unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
