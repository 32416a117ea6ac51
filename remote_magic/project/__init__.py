"""Which local files travel with a job: the user's own modules and the data files of ``--files``.

Client side, in the user's kernel; it reads the local disk and nothing else.  Every
file becomes a ``ProjectFile``: a content-addressed blob (sha256) plus the relative
path where the host places it, so the host stores one copy per content however many
jobs and paths use it.

Modules: a module the cell needs is *local* when its source lies outside the standard
library and every site-packages folder (the host installs those itself).  It always
travels as its whole top-level package, found by ``ast`` (never by importing it), and
the imports of what travels are followed until nothing new is found.

Data files: ``--files`` names files, folders and globs relative to the working
directory; they keep the layout the user sees, relative to the deepest folder shared
with the working directory.  Folder walks leave out ``.git``, ``.venv``,
``__pycache__``, ``.ipynb_checkpoints`` and what git ignores (``.gitignore`` files,
``.git/info/exclude``, ``core.excludesFile``: read as git reads them, without running
git); a file named explicitly (or matched by a glob) always travels.

Hashing a large folder again is free: ``HashCache`` keeps each file's sha256 keyed by
its path, size, mtime, ctime, inode and device in a small sqlite database.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import re
import site
import sqlite3
import stat
import sys
import sysconfig
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from ..paths import data_dir
from . import capture

SKIPPED_NAMES = frozenset({".git", ".venv", "__pycache__", ".ipynb_checkpoints"})
"""Never part of a folder walk: version control, virtualenvs, bytecode, notebook autosaves."""

_CHUNK = 1 << 20  # hash in 1 MiB reads: large files never sit in memory whole
_RACY_NS = 2_000_000_000
"""A file modified this recently (ns) is hashed but not cached: a write within the same mtime tick
(coarse on some filesystems) would otherwise leave a stale digest behind an unchanged key."""
_SQL_BATCH = 900  # below SQLite's oldest limit on bound parameters per statement
_HASH_THREADS = min(4, os.cpu_count() or 1)  # hashlib releases the GIL on large reads

_new_hasher: Callable[[], Any] = hashlib.sha256  # a seam: tests change a file mid-hash through it


class ProjectError(ValueError):
    """A path or module that cannot travel; the message names it and says what to do."""


@dataclass(frozen=True)
class ProjectFile:
    rel: str  # posix path where the host places it; never absolute, never '..'
    local: str  # absolute local path (a symlink stays a symlink here; its target's bytes travel)
    size: int
    mode: int  # permission bits (stat.S_IMODE), so scripts stay executable
    digest: str  # sha256 hex of the content


@dataclass
class FileSet:
    files: list[ProjectFile]
    root: str  # the local layout root (absolute)
    cwd: str  # the kernel's cwd relative to root, posix; "" when cwd is the root


@dataclass(frozen=True)
class LocalModule:
    name: str  # top-level module or package name, e.g. "src" or "helpers"
    path: str  # the package folder or the single .py file
    import_root: str  # the folder that holds it: what the host puts on sys.path


# -- hashing ---------------------------------------------------------------------------------------


class HashCache:
    """sha256 of local files keyed by (path, size, mtime_ns, ctime_ns, inode, device), so re-sending an
    unchanged 2 GB folder hashes nothing.  ctime is in the key because no tool can set it: a file rewritten
    with the same size and a restored mtime (``cp -p``, ``rsync -t``, ``tar``) is still hashed again.

    The database is only a cache: when it is missing, locked for long, unwritable or damaged, files are
    simply hashed again.  WAL mode lets several kernels read and write it at once.
    """

    def __init__(self, path: str | None = None) -> None:
        self.path = path or os.path.join(data_dir(), "hashes.sqlite")
        self._unusable = False

    def digest(self, path: str, st: os.stat_result | None = None) -> str:
        """The sha256 of one file; ``st`` (from ``os.stat``) saves a stat when the caller has one."""
        path = os.path.abspath(path)
        return self._digests([(path, st if st is not None else _stat(path))])[0]

    def digests(self, paths: list[str]) -> dict[str, str]:
        """Many files at once: one pass over the database, one transaction for the new entries."""
        items = [(os.path.abspath(p), _stat(os.path.abspath(p))) for p in paths]
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
            if row is not None and row[:-1] == _key(st):
                found[i] = row[-1]
        return found

    def _store(self, entries: list[tuple[tuple[str, os.stat_result], str]]) -> None:
        settled = time.time_ns() - _RACY_NS
        rows = [
            (path, *_key(st), digest) for (path, st), digest in entries if max(st.st_mtime_ns, st.st_ctime_ns) < settled
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


def _close(conn: sqlite3.Connection | None) -> None:
    if conn is not None:
        conn.close()


def _key(st: os.stat_result) -> tuple[int, int, int, int, int]:
    """What must match for a cached digest to hold; inode and device folded into SQLite's signed 64 bits."""
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, _signed64(st.st_ino), _signed64(st.st_dev)


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= (1 << 63) else value


def _stat(path: str) -> os.stat_result:
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise ProjectError(f"{path} no longer exists; run the cell again once it is back") from None
    except OSError as exc:
        raise ProjectError(f"cannot read {path} ({exc.strerror}); make it readable, or leave it out") from None


def _hash_file(path: str, st: os.stat_result) -> str:
    """sha256 of the file as it was when ``st`` was taken; a file that changes meanwhile is an error, since the
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
    return hasher.hexdigest()


# -- .gitignore ------------------------------------------------------------------------------------


class _IgnoreFile:
    """The rules of one ``.gitignore``, compiled into two regular expressions (files, folders).

    The rules are alternated last-first, so the alternative that matches is the last matching rule,
    which is the one git obeys; its group name says whether it was a ``!`` rule.
    """

    def __init__(self, folder: str, lines: Iterable[str]) -> None:
        self.folder = folder
        self._cut = len(folder.rstrip("/")) + 1  # path[cut:] is the path relative to this folder
        rules = [rule for rule in map(_parse_rule, lines) if rule is not None]
        self._negated = [negated for _, negated, _ in rules]
        self._files = _alternation([(i, rx) for i, (rx, _, dir_only) in enumerate(rules) if not dir_only])
        self._dirs = _alternation([(i, rx) for i, (rx, _, _) in enumerate(rules)])

    def verdict(self, path: str, is_dir: bool) -> bool | None:
        """True: ignored, False: re-included by a ``!`` rule, None: no rule here speaks of it."""
        regex = self._dirs if is_dir else self._files
        if regex is None:
            return None
        match = regex.fullmatch(path, self._cut)
        if match is None or match.lastgroup is None:
            return None
        return not self._negated[int(match.lastgroup[1:])]


def _alternation(rules: list[tuple[int, str]]) -> re.Pattern[str] | None:
    if not rules:
        return None
    return re.compile("|".join(f"(?P<r{i}>{rx})" for i, rx in reversed(rules)), re.DOTALL)


def _parse_rule(line: str) -> tuple[str, bool, bool] | None:
    """(regex over the path relative to the .gitignore's folder, negated, folders only), or None."""
    line = line.rstrip("\r\n")
    if not line or line.startswith("#"):
        return None
    while line.endswith(" ") and not line.endswith("\\ "):
        line = line[:-1]
    negated = line.startswith("!")
    if negated:
        line = line[1:]
    if line.startswith(("\\!", "\\#")):
        line = line[1:]
    dir_only = line.endswith("/")
    line = line.rstrip("/") if dir_only else line
    if not line:
        return None
    anchored = "/" in line  # a slash at the start or in the middle ties the rule to this folder
    line = line.removeprefix("/")
    regex = _translate(line)
    return (regex if anchored else "(?:.*/)?" + regex), negated, dir_only


def _translate(pattern: str) -> str:
    """A gitignore glob as a regex: ``*`` and ``?`` stay inside one path segment, ``**`` spans segments."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            j = i
            while j < n and pattern[j] == "*":
                j += 1
            whole_segment = j - i == 2 and (i == 0 or pattern[i - 1] == "/") and (j == n or pattern[j] == "/")
            if not whole_segment:
                out.append("[^/]*")
            elif j == n:
                out.append(".*")  # 'a/**': everything inside a
            else:
                out.append("(?:.*/)?")  # '**/b', 'a/**/b': zero or more folders
                j += 1
            i = j
            continue
        if c == "?":
            out.append("[^/]")
        elif c == "[":
            end = i + 1
            if end < n and pattern[end] in "!^":
                end += 1
            if end < n and pattern[end] == "]":
                end += 1
            while end < n and pattern[end] != "]":
                end += 1
            if end >= n:
                out.append(re.escape(c))  # no closing bracket: a literal '['
            else:
                inner = pattern[i + 1 : end]
                negate = inner[:1] in ("!", "^")
                inner = inner[1:] if negate else inner
                body = "".join(ch if ch == "-" else re.escape(ch) for ch in inner)
                out.append(f"[^/{body}]" if negate else f"[{body}]")
                i = end + 1
                continue
        elif c == "\\" and i + 1 < n:
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


class _Walker:
    """Walks folders the way ``git add`` would see them; remembers the ignore files it has read."""

    def __init__(self, boundary: str, skip_file: Callable[[str], bool] | None = None) -> None:
        self.boundary = boundary  # outside any git repository, .gitignore files above this are not read
        self.skip_file = skip_file
        self._loaded: dict[str, _IgnoreFile | None] = {}
        self._repositories: dict[str, tuple[_IgnoreFile, ...]] = {}
        self.ignored: list[str] = []  # what .gitignore rules left out, for the message when nothing is left

    def _ignore_file(self, folder: str) -> _IgnoreFile | None:
        if folder not in self._loaded:
            lines = _lines_of(os.path.join(folder, ".gitignore"))
            self._loaded[folder] = None if lines is None else _IgnoreFile(folder, lines)
        return self._loaded[folder]

    def _repository_rules(self, top: str) -> tuple[_IgnoreFile, ...]:
        """Git's other ignore sources for the repository whose work tree is ``top``, weakest first:
        ``core.excludesFile`` (default ``~/.config/git/ignore``), then ``.git/info/exclude``."""
        if top not in self._repositories:
            git_dir = _git_common_dir(top)
            found = []
            for source in (_excludes_file(top, git_dir), os.path.join(git_dir, "info", "exclude")):
                lines = _lines_of(source) if source else None
                if lines:
                    found.append(_IgnoreFile(top, lines))
            self._repositories[top] = tuple(found)
        return self._repositories[top]

    def _inherited(self, top: str) -> tuple[_IgnoreFile, ...]:
        """The .gitignore files above ``top`` that apply inside it, outermost first: up to the repository's
        root (the folder holding ``.git``), or, outside any repository, up to the boundary."""
        chain: list[str] = []
        folder = top
        repository: tuple[_IgnoreFile, ...] = ()
        while not os.path.lexists(os.path.join(folder, ".git")):
            parent = os.path.dirname(folder)
            if parent == folder:  # no repository above: keep only what lies inside the boundary
                chain = [f for f in chain if f == self.boundary or f.startswith(self.boundary.rstrip("/") + "/")]
                break
            folder = parent
            chain.append(folder)
        else:
            repository = self._repository_rules(folder)
        found = (self._ignore_file(folder) for folder in reversed(chain))
        return repository + tuple(f for f in found if f is not None)

    def walk(self, top: str, rel_top: str) -> list[tuple[str, str, os.stat_result]]:
        """(rel, local, stat) of every regular file below ``top``; rel is ``rel_top`` + the path inside it.

        Symlinked files are followed; symlinked folders too, except into a folder being walked already (a loop).
        """
        found: list[tuple[str, str, os.stat_result]] = []
        top_st = _stat(top)
        stack = [(top, rel_top, self._inherited(top), frozenset({(top_st.st_dev, top_st.st_ino)}))]
        while stack:
            folder, rel_folder, rules, above = stack.pop()
            try:
                with os.scandir(folder) as scan:
                    entries = list(scan)
            except OSError as exc:
                raise ProjectError(
                    f"cannot read the folder {folder} ({exc.strerror}); make it readable, "
                    f"or list it in a .gitignore so it is left out"
                ) from None
            names = {entry.name for entry in entries}
            if ".git" in names and folder != top:
                rules = self._repository_rules(folder)  # a nested repository: its own ignore files only
            if ".gitignore" in names:
                own = self._ignore_file(folder)
                if own is not None:
                    rules = (*rules, own)
            for entry in entries:
                name = entry.name
                if name in SKIPPED_NAMES:
                    continue
                path = f"{folder.rstrip('/')}/{name}"
                rel = f"{rel_folder}/{name}" if rel_folder else name
                try:
                    st = entry.stat()  # follows symlinks
                except FileNotFoundError:
                    continue  # a dangling symlink: nothing to send
                except OSError as exc:
                    raise ProjectError(
                        f"cannot read {path} ({exc.strerror}); make it readable, "
                        f"or list it in a .gitignore so it is left out"
                    ) from None
                if stat.S_ISDIR(st.st_mode):
                    ident = (st.st_dev, st.st_ino)
                    if ident in above or _ignored(rules, path, True):
                        if ident not in above:
                            self.ignored.append(path + "/")
                        continue
                    stack.append((path, rel, rules, above | {ident}))
                elif stat.S_ISREG(st.st_mode):
                    if self.skip_file is not None and self.skip_file(name):
                        continue
                    if _ignored(rules, path, False):
                        self.ignored.append(path)
                        continue
                    found.append((rel, path, st))
                # sockets, pipes, devices: not data
        return found


def _lines_of(path: str) -> list[str] | None:
    """The lines of a text file; None when it is missing or unreadable (no rules, as git does)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().splitlines()
    except OSError:
        return None


def _git_common_dir(top: str) -> str:
    """The folder holding ``info/exclude`` and ``config`` of the work tree ``top``: its ``.git`` folder, or
    where a ``.git`` file points (``gitdir: ...`` of a submodule or a worktree, whose ``commondir`` leads on)."""
    git = os.path.join(top, ".git")
    if os.path.isdir(git):
        return git
    lines = _lines_of(git) or [""]
    pointed = lines[0].removeprefix("gitdir:").strip() if lines[0].startswith("gitdir:") else ""
    if not pointed:
        return git
    git_dir = os.path.join(top, os.path.expanduser(pointed))
    common = (_lines_of(os.path.join(git_dir, "commondir")) or [""])[0].strip()
    return os.path.normpath(os.path.join(git_dir, common)) if common else git_dir


def _excludes_file(top: str, git_dir: str) -> str | None:
    """Where ``core.excludesFile`` points for the work tree ``top``, read from git's config files as git
    reads them (system, global, the repository's; the last setting wins), without running git."""
    home = os.path.expanduser("~")
    xdg = os.environ.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
    configs = [] if os.environ.get("GIT_CONFIG_NOSYSTEM") else ["/etc/gitconfig"]
    configs += (
        [os.environ["GIT_CONFIG_GLOBAL"]]
        if os.environ.get("GIT_CONFIG_GLOBAL")
        else [
            os.path.join(xdg, "git", "config"),
            os.path.join(home, ".gitconfig"),
        ]
    )
    configs.append(os.path.join(git_dir, "config"))
    value = None
    for config in configs:
        value = _config_value(_lines_of(config) or [], "core", "excludesfile") or value
    if value is None:
        return os.path.join(xdg, "git", "ignore")
    return os.path.join(top, os.path.expanduser(value)) if value else None


def _config_value(lines: list[str], section: str, key: str) -> str | None:
    """The last ``key`` of ``[section]`` in git config lines (names without case; quotes, escapes and
    comments as git reads them); None when it is not set.  Includes are not followed."""
    value, inside = None, False
    for raw in lines:
        line = raw.strip()
        if line.startswith("["):
            end = line.find("]")
            inside = end > 0 and line[1:end].strip().lower() == section
            line = line[end + 1 :].strip() if end > 0 else ""
        if not inside or not line or line[0] in "#;":
            continue
        name, equals, rest = line.partition("=")
        if name.strip().lower() == key:
            value = _config_text(rest) if equals else ""
    return value


def _config_text(text: str) -> str:
    """A git config value: quotes removed, ``\\`` escapes read, a comment (``#``, ``;``) outside quotes cut."""
    out, quoted, i = [], False, 0
    text = text.strip()
    while i < len(text):
        c = text[i]
        if c == '"':
            quoted = not quoted
        elif c == "\\" and i + 1 < len(text):
            i += 1
            out.append({"n": "\n", "t": "\t", "b": "\b"}.get(text[i], text[i]))
        elif c in "#;" and not quoted:
            break
        else:
            out.append(c)
        i += 1
    return "".join(out).strip()


def _ignored(rules: tuple[_IgnoreFile, ...], path: str, is_dir: bool) -> bool:
    for rules_file in reversed(rules):  # the deepest .gitignore that speaks of a path decides
        verdict = rules_file.verdict(path, is_dir)
        if verdict is not None:
            return verdict
    return False


# -- --files ---------------------------------------------------------------------------------------


def collect_files(paths: str, cwd: str | None = None, cache: HashCache | None = None) -> FileSet:
    """The files ``--files`` names (comma-separated files, folders and globs, relative to ``cwd``), hashed.

    Every check (a path that matches nothing, one outside any folder shared with ``cwd``, an unreadable or
    changing file) runs here, so a bad ``--files`` fails before anything is sent.
    """
    cwd = os.path.realpath(cwd if cwd is not None else os.getcwd())
    items = [item.strip() for item in paths.split(",") if item.strip()]
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
    walker = _Walker(boundary=root)
    found: list[tuple[str, str, os.stat_result]] = []
    for item, location in named:
        rel = _posix_rel(location, root)
        st = _stat(location)
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
    files = _hashed(found, cache)
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


def _hashed(found: list[tuple[str, str, os.stat_result]], cache: HashCache | None) -> list[ProjectFile]:
    """ProjectFiles sorted by rel; a rel reached twice travels once (two different contents: an error)."""
    cache = cache or HashCache()
    unique: dict[str, tuple[str, os.stat_result]] = {}
    for rel, local, st in found:
        unique.setdefault(rel, (local, st))
    for rel, local, _ in found:
        if unique[rel][0] != local and not os.path.samefile(unique[rel][0], local):
            other = unique[rel][0]
            digests = cache.digests([other, local])
            if digests[other] != digests[local]:
                raise ProjectError(
                    f"--files: {other} and {local} would both land on {rel} with different contents; "
                    f"name only one of them"
                )
    rels = sorted(unique)
    items = [unique[rel] for rel in rels]
    digests = cache._digests(items)
    return [
        ProjectFile(rel, local, st.st_size, stat.S_IMODE(st.st_mode), digest)
        for rel, (local, st), digest in zip(rels, items, digests, strict=True)
    ]


# -- local modules ---------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _installed_roots() -> tuple[str, ...]:
    """Folders whose modules the host installs itself: the standard library and every site-packages."""
    roots: set[str] = set()
    for prefix in {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}:
        bases = {"base": prefix, "platbase": prefix, "installed_base": prefix, "installed_platbase": prefix}
        paths = sysconfig.get_paths(vars=bases)
        roots.update(paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib"))
    defaults = sysconfig.get_paths()
    roots.update(defaults[key] for key in ("stdlib", "platstdlib", "purelib", "platlib"))
    try:
        roots.update(site.getsitepackages())
    except AttributeError:  # some old virtualenv builds of site.py lack it
        pass
    roots.add(site.getusersitepackages())
    normalized = {os.path.abspath(r) for r in roots} | {os.path.realpath(r) for r in roots}
    return tuple(sorted(r.rstrip("/") + "/" for r in normalized))


def _installed(path: str) -> bool:
    """Under the standard library or a site-packages folder (also one that is not this interpreter's own,
    such as another environment put on sys.path)."""
    for candidate in {os.path.abspath(path), os.path.realpath(path)}:
        if candidate.startswith(_installed_roots()):
            return True
        parts = candidate.split(os.sep)
        if "site-packages" in parts or "dist-packages" in parts:
            return True
    return False


def _installed_by_a_distribution(import_root: str, top: str) -> bool:
    """A package that pip put in a folder of its own (``pip install --target``): a ``*.dist-info`` there lists it.

    Such a folder is no site-packages by name, but its packages are installed ones (maybe compiled): the host
    must install them, never get their .py files shipped.
    """
    try:
        names = os.listdir(import_root)
    except OSError:
        return False
    owned = (f"{top}/", f"{top}.py,", f"{top}/__init__.py,")
    for name in names:
        if not name.endswith(".dist-info"):
            continue
        folder = os.path.join(import_root, name)
        try:
            with open(os.path.join(folder, "top_level.txt"), encoding="utf-8") as f:
                if top in {line.strip() for line in f}:
                    return True
        except OSError:
            pass
        try:
            with open(os.path.join(folder, "RECORD"), encoding="utf-8") as f:
                if any(line.startswith(owned) for line in f):
                    return True
        except OSError:
            continue
    return False


def is_local_module(name: str) -> LocalModule | None:
    """The top-level package or module of ``name`` when it is the user's own source, else None.

    Looks at ``sys.modules`` first and otherwise asks the import system where the module would come from
    (``find_spec`` on the top-level name runs no module code), so an editable install resolves to its source.
    """
    top = name.split(".")[0]
    if not top.isidentifier() or top in ("__main__", "remote_magic") or top in sys.builtin_module_names:
        return None
    module = sys.modules.get(top)
    if module is not None:
        origin = getattr(module, "__file__", None)
        locations = getattr(module, "__path__", None)
    else:
        try:
            spec = importlib.util.find_spec(top)
        except (ImportError, ValueError, AttributeError):
            return None
        if spec is None:
            return None
        origin = spec.origin if spec.has_location else None
        locations = spec.submodule_search_locations
    if origin:
        origin = os.path.abspath(origin)
        if not origin.endswith(".py") or not os.path.isfile(origin) or _installed(origin):
            return None  # compiled only, inside a zip, frozen, or installed
        if locations is not None:  # a regular package: its __init__.py
            if os.path.basename(origin) != "__init__.py":
                return None
            folder = os.path.dirname(origin)
            found = LocalModule(top, folder, os.path.dirname(folder))
        else:
            found = LocalModule(top, origin, os.path.dirname(origin))
        return None if _installed_by_a_distribution(found.import_root, top) else found
    if locations is None:
        return None  # built in or frozen
    portions = [os.path.abspath(p) for p in list(locations)]
    if not portions or any(_installed(p) for p in portions) or not os.path.isdir(portions[0]):
        return None
    return LocalModule(top, portions[0], os.path.dirname(portions[0]))  # a namespace package


def find_local_modules(source: str, referenced: Iterable[str] = (), extra: Iterable[str] = ()) -> list[LocalModule]:
    """The local modules a job needs: those the cell imports, the ones the pickler met (``referenced``), the
    ones named with ``--modules`` (``extra``), and every local module their own files import, sorted by name.
    """
    wanted: dict[str, LocalModule] = {}
    for name in extra:
        name = name.strip()
        module = is_local_module(name) if name else None
        if module is None or _module_file(module, name) is None:
            raise ProjectError(
                f"--modules: no local module named {name!r} (it is not importable here, or it is installed in "
                f"site-packages, which the host must install itself)"
            )
        wanted[module.name] = module
    checked: set[str] = set(wanted)
    queue = [*_imported_names(source), *referenced]
    queue = [name for name in queue if name]
    pending = list(wanted.values())
    while queue or pending:
        for name in queue:
            top = name.split(".")[0]
            if top in checked:
                continue
            checked.add(top)
            module = is_local_module(top)
            if module is not None:
                wanted[top] = module
                pending.append(module)
        queue = []
        for module in pending:
            for path in _python_files(module):
                queue.extend(_imported_names(path, from_file=True))
        pending = []
    return [wanted[name] for name in sorted(wanted)]


def _imported_names(source: str, from_file: bool = False) -> list[str]:
    """Top-level names of the absolute imports in ``source`` (or in the file it names); relative ones stay inside
    their package, and a file that cannot be read imports nothing here (it fails on the host with its own error)."""
    if from_file:
        try:
            with open(source, encoding="utf-8", errors="replace") as f:
                source = f.read()
        except OSError:
            return []
    return capture.imported_modules(source)


def _python_files(module: LocalModule) -> list[str]:
    if not os.path.isdir(module.path):
        return [module.path]
    walker = _Walker(boundary=module.import_root, skip_file=_bytecode)
    return sorted(local for _, local, _ in walker.walk(module.path, "") if local.endswith(".py"))


def _bytecode(name: str) -> bool:
    return name.endswith((".pyc", ".pyo"))


def module_files(modules: list[LocalModule], cache: HashCache | None = None) -> list[ProjectFile]:
    """Every file of each module, hashed; rel starts with the module's name (``src/models/__init__.py``,
    ``helpers.py``), so all modules can sit in one folder on the host's sys.path, even an editable install
    whose package folder is named differently from the package."""
    found: list[tuple[str, str, os.stat_result]] = []
    for module in modules:
        if os.path.isdir(module.path):
            walker = _Walker(boundary=module.import_root, skip_file=_bytecode)
            found.extend(walker.walk(module.path, module.name))
        else:
            found.append((f"{module.name}.py", module.path, _stat(module.path)))
    return _hashed(found, cache)


def local_origin(module_name: str) -> str | None:
    """Where ``module_name`` comes from here, in words, when it is local (for a host's ModuleNotFoundError):
    "the local file /home/u/proj/src/models/__init__.py"; None when it is not local or not found here either."""
    module = is_local_module(module_name)
    if module is None:
        return None
    path = _module_file(module, module_name)
    if path is None:
        return None
    return f"the local folder {path}" if os.path.isdir(path) else f"the local file {path}"


def _module_file(module: LocalModule, dotted: str) -> str | None:
    """The file (or namespace folder) of ``dotted`` inside ``module``, found without importing anything."""
    loaded = sys.modules.get(dotted)
    loaded_file = getattr(loaded, "__file__", None) if loaded is not None else None
    if loaded_file and loaded_file.endswith(".py"):
        return os.path.abspath(loaded_file)
    parts = dotted.split(".")[1:]
    if not os.path.isdir(module.path):
        return None if parts else module.path
    path = module.path
    for part in parts:
        path = os.path.join(path, part)
    for candidate in (os.path.join(path, "__init__.py"), path + ".py"):
        if os.path.isfile(candidate):
            return candidate
    return path if os.path.isdir(path) else None
