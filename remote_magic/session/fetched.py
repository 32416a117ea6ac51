"""The local record of the files ``--fetch`` wrote, so a later fetch may replace its own unchanged file.

A re-run cell that fetches ``best_model.keras`` again must replace the copy the last run's fetch
wrote, or the notebook's next cell loads the old model while the new one waits beside it.  A file is
ours to replace only while the record says a fetch wrote it and it is unchanged since; anything else
at that path is the user's and is kept.  The record lives in this machine's data dir
(``fetched.json``, 0600, replaced whole), never in the user's folder; a missing, damaged or foreign
record only makes every file look like the user's.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

from ..agent import digest as digests
from ..agent import disk
from ..paths import data_dir

RECORD_LIMIT = 20_000
"""Files the record remembers; the oldest writes go first (a forgotten file is only kept, never lost)."""


@dataclass(frozen=True)
class Written:
    """What a fetch wrote at one path: the content (digest, size) and the file's stat just after."""

    digest: str
    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int
    written: float


class FetchedFiles:
    """The files earlier fetches wrote, by absolute real path; ``wrote`` adds to it, ``save`` keeps it."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path or os.path.join(data_dir(), "fetched.json")
        self.lock_path = f"{self.path}.lock"  # its own file: ``save`` replaces the record (a new inode)
        self._entries = _read(self.path)
        self._new: dict[str, Written] = {}

    def ours_unchanged(self, target: str, local_digest: Callable[[], str]) -> bool:
        """Whether a fetch wrote ``target`` and nobody changed it since: the same size, and the same stat
        (a cheap check, trusted only on a file system with fine timestamps) or else the same digest."""
        entry = self._entries.get(_key(target))
        try:
            st = os.lstat(target)
        except OSError:
            return False
        if entry is None or not stat.S_ISREG(st.st_mode) or st.st_size != entry.size:
            return False
        same_stat = (st.st_mtime_ns, st.st_ctime_ns, st.st_ino) == (entry.mtime_ns, entry.ctime_ns, entry.ino)
        if same_stat and st.st_mtime_ns % 1000:  # whole microseconds or seconds: an edit may share the stamp
            return True
        return local_digest() == entry.digest

    def wrote(self, target: str, digest: str, size: int) -> None:
        """Remember that a fetch just wrote ``target`` with this content (a file gone already is not)."""
        try:
            st = os.lstat(target)
        except OSError:
            return
        entry = Written(digests.normal(digest), size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, time.time())
        self._entries[_key(target)] = self._new[_key(target)] = entry

    def save(self) -> None:
        """Add this fetch's files to the record on disk, merged with what other kernels added meanwhile.

        A record that cannot be written only costs a later fetch its replacing: that file is then kept as
        the user's and the new one saved beside it."""
        if not self._new:
            return
        with contextlib.suppress(OSError), self._locked():
            entries = {**_read(self.path), **self._new}
            newest = sorted(entries.items(), key=lambda item: item[1].written, reverse=True)[:RECORD_LIMIT]
            record = {"version": 1, "files": {key: asdict(entry) for key, entry in newest}}
            disk.atomic_write(self.path, json.dumps(record).encode())  # 0600, whole or not at all
            self._new.clear()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        os.makedirs(os.path.dirname(self.path) or ".", mode=0o700, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield  # closing the descriptor releases the lock
        finally:
            os.close(fd)


def _key(target: str) -> str:
    """The record's name for a file: its folder's real path and its own name (itself never followed)."""
    folder, name = os.path.split(os.path.abspath(target))
    return os.path.join(os.path.realpath(folder), name)


def _read(path: str) -> dict[str, Written]:
    """The record's entries; an entry (or a whole record) that is not one is left out, never an error."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):  # missing, unreadable, damaged, not UTF-8
        return {}
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict):
        return {}
    entries = {}
    for key, fields in files.items():
        with contextlib.suppress(TypeError, ValueError):
            entry = Written(**fields)
            numbers = (entry.size, entry.mtime_ns, entry.ctime_ns, entry.ino, entry.written)
            if digests.is_digest(entry.digest) and all(
                isinstance(value, int | float) and not isinstance(value, bool) for value in numbers
            ):
                entries[key] = Written(**{**fields, "digest": digests.normal(entry.digest)})
    return entries
