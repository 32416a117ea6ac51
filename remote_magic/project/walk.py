"""Local folders read the way ``git add`` sees them, for what travels with a job.

A walk leaves out ``.git``, ``.venv``, ``__pycache__``, ``.ipynb_checkpoints`` and what git ignores
(``.gitignore`` files, ``.git/info/exclude``, ``core.excludesFile``: read as git reads them, without
running git), so a data folder or a package travels as the user's repository holds it.  ``ProjectError``
lives here because reading the local disk is where every refusal of a path starts.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable, Iterable

SKIPPED_NAMES = frozenset({".git", ".venv", "__pycache__", ".ipynb_checkpoints"})
"""Never part of a folder walk: version control, virtualenvs, bytecode, notebook autosaves."""

Found = tuple[str, str, os.stat_result]
"""(rel, local, stat) of one file a walk found: where it lands, where it is here, what it was when seen."""


class ProjectError(ValueError):
    """A path or module that cannot travel; the message names it and says what to do."""


def stat_path(path: str) -> os.stat_result:
    """``os.stat``, its failure told as a ProjectError that says what to do."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise ProjectError(f"{path} no longer exists; run the cell again once it is back") from None
    except OSError as exc:
        raise ProjectError(f"cannot read {path} ({exc.strerror}); make it readable, or leave it out") from None


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


class Walker:
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

    def walk(self, top: str, rel_top: str) -> list[Found]:
        """(rel, local, stat) of every regular file below ``top``; rel is ``rel_top`` + the path inside it.

        Symlinked files are followed; symlinked folders too, except into a folder being walked already (a loop).
        """
        found: list[Found] = []
        top_st = stat_path(top)
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
