"""The files that travel with a job, each a content-addressed blob: ``--files`` and the hashing of every file.

Every file becomes a ``ProjectFile``: its content's digest (``agent/digest.py``) plus the relative path where
the host places it, so the host stores one copy per content however many jobs and paths use it.

``--files`` names files, folders and globs relative to the working directory; they keep the layout the user
sees, relative to the deepest folder shared with the working directory.  Folders are walked as ``git add``
sees them (``walk.py``); a file named explicitly (or matched by a glob) always travels.

Hashing a large folder again is free: ``HashCache`` keeps each file's digest keyed by its path, size, mtime,
ctime, inode and device in a small sqlite database.
"""

from __future__ import annotations

import glob
import os
import sqlite3
import stat
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..agent import digest as digests
from ..paths import data_dir
from .walk import SKIPPED_NAMES, Found, ProjectError, Walker, stat_path

_CHUNK = 1 << 20  # hash in 1 MiB reads: large files never sit in memory whole
_RACY_NS = 2_000_000_000
"""A file modified this recently (ns) is hashed but not cached: a write within the same mtime tick
(coarse on some filesystems) would otherwise leave a stale digest behind an unchanged key."""
_SQL_BATCH = 900  # below SQLite's oldest limit on bound parameters per statement
_HASH_THREADS = min(4, os.cpu_count() or 1)  # hashlib releases the GIL on large reads
_ROW_ALGORITHM = "sha256"  # the cache's digest column holds this algorithm's bare hex, in every release

_new_hasher: Callable[[], digests.Hasher] = digests.new  # a seam: tests change a file mid-hash through it


@dataclass(frozen=True)
class ProjectFile:
    rel: str  # posix path where the host places it; never absolute, never '..'
    local: str  # absolute local path (a symlink stays a symlink here; its target's bytes travel)
    size: int
    mode: int  # permission bits (stat.S_IMODE), so scripts stay executable
    digest: str  # the content's digest, named: sha256:<hex>


@dataclass
class FileSet:
    files: list[ProjectFile]
    root: str  # the local layout root (absolute)
    cwd: str  # the kernel's cwd relative to root, posix; "" when cwd is the root


# -- hashing ---------------------------------------------------------------------------------------


class HashCache:
    """Digests of local files keyed by (path, size, mtime_ns, ctime_ns, inode, device), so re-sending an
    unchanged 2 GB folder hashes nothing.  ctime is in the key because no tool can set it: a file rewritten
    with the same size and a restored mtime (``cp -p``, ``rsync -t``, ``tar``) is still hashed again.

    The database is only a cache: when it is missing, locked for long, unwritable or damaged, files are
    simply hashed again.  WAL mode lets several kernels read and write it at once.

    Its ``digest`` column holds sha256's bare hex, as it always has, and is named (``sha256:<hex>``) when read:
    an earlier release sharing the file sends a row as it finds it to its own agent, which takes bare hex only.
    Keeping the file and its rows in that form costs nothing; a new file would hash every file again once.
    """

    def __init__(self, path: str | None = None) -> None:
        self.path = path or os.path.join(data_dir(), "hashes.sqlite")
        self._unusable = False

    def digest(self, path: str, st: os.stat_result | None = None) -> str:
        """The digest of one file; ``st`` (from ``os.stat``) saves a stat when the caller has one."""
        path = os.path.abspath(path)
        return self._digests([(path, st if st is not None else stat_path(path))])[0]

    def digests(self, paths: list[str]) -> dict[str, str]:
        """Many files at once: one pass over the database, one transaction for the new entries."""
        items = [(os.path.abspath(p), stat_path(os.path.abspath(p))) for p in paths]
        return dict(zip(paths, self._digests(items), strict=True))

    def _digests(self, items: list[tuple[str, os.stat_result]]) -> list[str]:
        known = self._lookup(items)
        result: list[str | None] = [known.get(i) for i in range(len(items))]
        missing = [i for i, digest in enumerate(result) if digest is None]
        if len(missing) > 1 and _HASH_THREADS > 1:
            pool = ThreadPoolExecutor(_HASH_THREADS)
            try:
                hashed = list(pool.map(lambda i: _hash_file(*items[i]), missing))
            finally:  # on the first bad file (or Ctrl-C) stop at once rather than hash the rest
                pool.shutdown(wait=True, cancel_futures=True)
        else:
            hashed = [_hash_file(*items[i]) for i in missing]
        for i, digest in zip(missing, hashed, strict=True):
            result[i] = digest
        self._store([(items[i], digest) for i, digest in zip(missing, hashed, strict=True)])
        return [digest for digest in result if digest is not None]

    def _lookup(self, items: list[tuple[str, os.stat_result]]) -> dict[int, str]:
        """Index in ``items`` -> cached digest, for entries whose size, times, inode and device still match."""
        conn = self._connect()
        if conn is None or not items:
            return {}
        rows: dict[str, tuple[Any, ...]] = {}
        try:
            with conn:
                paths = sorted({path for path, _ in items})
                for start in range(0, len(paths), _SQL_BATCH):
                    batch = paths[start : start + _SQL_BATCH]
                    marks = ",".join("?" * len(batch))
                    query = (
                        f"SELECT path, size, mtime_ns, ctime_ns, ino, dev, digest FROM hashes WHERE path IN ({marks})"
                    )
                    for path, *key, digest in conn.execute(query, batch):
                        rows[path] = (*key, digest)
        except sqlite3.Error:
            return {}
        finally:
            conn.close()
        found: dict[int, str] = {}
        for i, (path, st) in enumerate(items):
            row = rows.get(path)
            if row is not None and row[:-1] == _key(st) and digests.is_digest(row[-1]):
                found[i] = digests.normal(row[-1])  # bare hex (a few rows of a development version: named)
        return found

    def _store(self, entries: list[tuple[tuple[str, os.stat_result], str]]) -> None:
        settled = time.time_ns() - _RACY_NS
        rows = [
            (path, *_key(st), hex_)
            for (path, st), digest in entries
            if max(st.st_mtime_ns, st.st_ctime_ns) < settled and (hex_ := _row_digest(digest)) is not None
        ]
        if not rows:
            return
        conn = self._connect()
        if conn is None:
            return
        try:
            with conn:
                conn.executemany("INSERT OR REPLACE INTO hashes VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        except sqlite3.Error:
            pass  # busy for too long, or a full disk: the next send hashes these again
        finally:
            conn.close()

    def _connect(self) -> sqlite3.Connection | None:
        """A connection with the table in place, or None: no cache this time (never an error).

        A file that is not a database (damaged, or something else) is moved aside once so the cache
        works again; a locked or unwritable one is left alone.
        """
        if self._unusable:
            return None
        for attempt in range(2):
            conn = None
            try:
                folder = os.path.dirname(self.path)
                os.makedirs(folder, mode=0o700, exist_ok=True)
                if not os.path.exists(self.path):
                    os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))  # paths are private
                conn = sqlite3.connect(self.path, timeout=10.0)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS hashes (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, "
                    "ctime_ns INTEGER, ino INTEGER, dev INTEGER, digest TEXT) WITHOUT ROWID"
                )
                return conn
            except sqlite3.OperationalError:
                _close(conn)
                return None  # locked, read-only, no space: try again next time
            except sqlite3.DatabaseError:
                _close(conn)
                if attempt == 0:
                    try:
                        os.replace(self.path, self.path + ".damaged")
                        continue
                    except OSError:
                        pass
                self._unusable = True
                return None
            except OSError:
                _close(conn)
                self._unusable = True
                return None
        return None


def _row_digest(digest: str) -> str | None:
    """A digest as the cache's column holds it: sha256's bare hex, which every release reads; None for
    another algorithm's (not cached: an earlier release would take its hex for sha256)."""
    parts = digests.split(digest)
    return parts[1] if parts is not None and parts[0] == _ROW_ALGORITHM else None


def _close(conn: sqlite3.Connection | None) -> None:
    if conn is not None:
        conn.close()


def _key(st: os.stat_result) -> tuple[int, int, int, int, int]:
    """What must match for a cached digest to hold; inode and device folded into SQLite's signed 64 bits."""
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, _signed64(st.st_ino), _signed64(st.st_dev)


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= (1 << 63) else value


def _hash_file(path: str, st: os.stat_result) -> str:
    """The digest of the file as it was when ``st`` was taken; a file that changes meanwhile is an error, since the
    digest, size and bytes sent would disagree."""
    hasher = _new_hasher()
    read = 0
    try:
        with open(path, "rb", buffering=0) as f:
            while read < st.st_size and (chunk := f.read(min(_CHUNK, st.st_size - read))):
                hasher.update(chunk)
                read += len(chunk)
            grown = f.read(1)  # never more than the size taken: a file that keeps growing would never end
        after = os.stat(path)
    except FileNotFoundError:
        raise ProjectError(f"{path} was removed while it was being read; run the cell again") from None
    except OSError as exc:
        raise ProjectError(
            f"cannot read {path} ({exc.strerror}); make it readable (chmod u+r), or leave it out "
            f"(inside a folder: list it in a .gitignore there)"
        ) from None
    if read != st.st_size or grown or _key(after) != _key(st):
        raise ProjectError(
            f"{path} changed while it was being read; wait until whatever writes it has finished, "
            f"then run the cell again"
        )
    return digests.named(hasher)


# -- --files ---------------------------------------------------------------------------------------


def collect_files(paths: str | Sequence[str], cwd: str | None = None, cache: HashCache | None = None) -> FileSet:
    """The files ``--files`` names (files, folders and globs, relative to ``cwd``), hashed.

    ``paths``: the items as the magic's ``path_list`` read them, or one string of comma-separated ones.

    Every check (a path that matches nothing, one outside any folder shared with ``cwd``, an unreadable or
    changing file) runs here, so a bad ``--files`` fails before anything is sent.
    """
    cwd = os.path.realpath(cwd if cwd is not None else os.getcwd())
    if isinstance(paths, str):
        items = [item.strip() for item in paths.split(",") if item.strip()]
    else:
        items = list(paths)  # as written, spaces included
    if not items:
        return FileSet([], cwd, "")
    named: list[tuple[str, str]] = []  # (as the user wrote it, absolute location)
    for item in items:
        named.extend((item, location) for location in _expand(item, cwd))
    root = cwd
    for item, location in named:
        shared = os.path.commonpath([cwd, location])
        if shared == os.path.dirname(shared):  # only '/' in common
            raise ProjectError(
                f"--files: {item} ({location}) shares no folder with the working directory {cwd}; copy it "
                f"into the project, or use --workdir for data that already lives on the host"
            )
        root = os.path.commonpath([root, location])
    walker = Walker(boundary=root)
    found: list[Found] = []
    for item, location in named:
        rel = _posix_rel(location, root)
        st = stat_path(location)
        if stat.S_ISDIR(st.st_mode):
            walker.ignored.clear()
            inside = walker.walk(location, rel)
            if not inside:
                raise ProjectError(_empty_folder_message(item, walker.ignored))
            found.extend(inside)
        elif stat.S_ISREG(st.st_mode):
            found.append((rel, location, st))
        else:
            raise ProjectError(f"--files: {item} is not a regular file or folder; leave it out of --files")
    files = hashed_files(found, cache)
    return FileSet(files, root, _posix_rel(cwd, root))


def _expand(item: str, cwd: str) -> list[str]:
    """Absolute locations for one ``--files`` entry: the folder part resolved (symlinks, ``..``), the last
    part kept as written, so a symlink named by the user travels under its own name."""
    pattern = os.path.expanduser(item)
    if glob.has_magic(pattern):
        matches = sorted(glob.glob(pattern, root_dir=cwd, recursive=True))
        literal = set(pattern.replace("\\", "/").split("/"))
        matches = [m for m in matches if not (set(m.replace("\\", "/").split("/")) & SKIPPED_NAMES) - literal]
        if not matches:
            raise ProjectError(f"--files: nothing matches {item}{_relative_to(item, cwd)}")
    else:
        matches = [pattern]
    locations = []
    for match in matches:
        path = os.path.join(cwd, match)
        head, tail = os.path.split(path)
        location = os.path.realpath(path) if tail in ("", ".", "..") else os.path.join(os.path.realpath(head), tail)
        if not os.path.exists(location):
            raise ProjectError(f"--files: no such file or folder: {item}{_relative_to(item, cwd)}")
        locations.append(location)
    return locations


def _relative_to(item: str, cwd: str) -> str:
    return "" if os.path.isabs(os.path.expanduser(item)) else f" (relative to {cwd})"


def _empty_folder_message(item: str, ignored: list[str]) -> str:
    if not ignored:
        return f"--files: the folder {item} has no files to send; put the data in it, or leave it out of --files"
    ignored = sorted(ignored)
    examples = ", ".join(ignored[:3]) + (f" and {len(ignored) - 3} more" if len(ignored) > 3 else "")
    suffixes = [os.path.splitext(path)[1] for path in ignored if not path.endswith("/")]
    pattern = f"*{suffixes[0]}" if suffixes and suffixes[0] else "**/*"
    return (
        f"--files: every file in the folder {item} is ignored by a .gitignore ({examples}); name the files "
        f"themselves (a file named in --files, or matched by a glob such as {item.rstrip('/')}/{pattern}, "
        f"always travels), or change the .gitignore"
    )


def _posix_rel(path: str, root: str) -> str:
    rel = os.path.relpath(path, root)
    return "" if rel == "." else rel.replace(os.sep, "/")


def hashed_files(found: list[Found], cache: HashCache | None) -> list[ProjectFile]:
    """ProjectFiles sorted by rel; a rel reached twice travels once (two different contents: an error)."""
    cache = cache or HashCache()
    unique: dict[str, tuple[str, os.stat_result]] = {}
    for rel, local, st in found:
        unique.setdefault(rel, (local, st))
    for rel, local, _ in found:
        if unique[rel][0] != local and not os.path.samefile(unique[rel][0], local):
            other = unique[rel][0]
            both = cache.digests([other, local])
            if both[other] != both[local]:
                raise ProjectError(
                    f"--files: {other} and {local} would both land on {rel} with different contents; "
                    f"name only one of them"
                )
    rels = sorted(unique)
    items = [unique[rel] for rel in rels]
    return [
        ProjectFile(rel, local, st.st_size, stat.S_IMODE(st.st_mode), digest)
        for rel, (local, st), digest in zip(rels, items, cache._digests(items), strict=True)
    ]
