"""Compare the kernel's Python and packages with the host's before a job is sent.

A cell pickled here is unpickled on the host: a different Python minor
version, a package the host lacks, or another major version of cloudpickle
or keras fails there, after the upload and the wait.  ``compare`` finds
these first (blocking rows: nothing is sent) and lists the smaller
differences as warnings; ``auto_requirements`` turns the report into the
list ``--env auto`` builds on the host.

``--env auto`` asks the host's package index for each package by name and
version.  A package index may hold a stranger's project under a private
name, so a version that never came from an index (a local build such as
``1.4.2+corp``, or one installed from a wheel file, a folder or a VCS URL)
is never asked of one: the host lacking it refuses ``--env auto`` with the
fix (its wheel, ``--find-links``, or ``--env FILE``).

The client side may not import the agent's modules (``tests/test_layering``),
so the PEP 503 name rule is repeated here.
"""

from __future__ import annotations

import html
import json
import os
import re
import sys
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from ..errors import HostSetupError

# Packages whose major version decides whether what one side pickled loads on the other.
MAJOR_MUST_MATCH = ("cloudpickle", "keras")
# The host keeps its own builds of these (CUDA, matched to its driver): ``--env auto`` never pins them.
_HOST_BUILDS = re.compile(r"(torch|torchvision|torchaudio|triton|jax|jaxlib|jax-cuda.*|tensorflow(-.*)?|nvidia-.*)")
MISSING = "missing"


@dataclass
class Row:
    package: str  # a distribution name, or "python"
    here: str | None  # the version in this kernel
    host: str | None  # the version on the host; None: not installed there
    fix: str
    blocking: bool
    unpinnable: str | None = None  # why --env auto may not ask an index for this version (None: it may)


@dataclass(repr=False)
class EnvReport:
    host: str
    python_here: str
    python_host: str
    rows: list[Row] = field(default_factory=list)  # the differences: blocking first, then warnings
    matching: list[Row] = field(default_factory=list)  # the packages that match (patch-only differences too)

    def blocking(self) -> list[Row]:
        """The rows that stop the job: it would fail on the host."""
        return [row for row in self.rows if row.blocking]

    def warnings(self) -> list[Row]:
        """The rows that may change results but need not stop the job."""
        return [row for row in self.rows if not row.blocking]

    def _title(self) -> str:
        return f"host {self.host}: python {self.python_host} there, {self.python_here} here"

    def _table(self, rows: list[Row]) -> str:
        """The title, then an aligned table, package | here | host | fix; rows that stop the job marked ``*``."""
        header = ("package", "here", "host", "fix")
        cells = [_cells(row) for row in rows]
        widths = [max(len(line[i]) for line in [header, *cells]) for i in range(3)]

        def line(mark: str, values: tuple[str, str, str, str]) -> str:
            text = f"{mark} " + "  ".join(v.ljust(w) for v, w in zip(values[:3], widths, strict=True))
            return f"{text}  {values[3]}".rstrip()

        lines = [self._title(), line(" ", header)]
        lines += [line("*" if row.blocking else " ", cell) for row, cell in zip(rows, cells, strict=True)]
        if not rows:
            lines.append("  (no package to compare: the last cell imported none, and none of the common ones is here)")
        if any(row.blocking for row in rows):
            lines.append("* the job cannot run on the host until this is fixed")
        return "\n".join(lines)

    def text(self) -> str:
        """The title, then the table of every package compared: the differences first, then what matches."""
        return self._table([*self.rows, *self.matching])

    def _repr_html_(self) -> str:
        """The same table as HTML; rows that stop the job in red, marked *; matching rows in grey."""
        head = "".join(f"<th style='text-align:left'>{h}</th>" for h in ("", "package", "here", "host", "fix"))
        body = []
        for row, matches in [*((row, False) for row in self.rows), *((row, True) for row in self.matching)]:
            if row.blocking:
                kind, mark, style = "blocking", "*", " style='color:#b00020;font-weight:600'"
            elif matches:
                kind, mark, style = "match", "", " style='color:#6b6b6b'"
            else:
                kind, mark, style = "warning", "", ""
            tds = "".join(f"<td style='text-align:left'>{html.escape(c)}</td>" for c in _cells(row))
            body.append(f"<tr class='remote-magic-env-{kind}' title='{kind}'{style}><td>{mark}</td>{tds}</tr>")
        if not body:
            body.append("<tr><td></td><td colspan='4'>(no package to compare)</td></tr>")
        note = "<p>* the job cannot run on the host until this is fixed</p>" if self.blocking() else ""
        return (
            f"<div class='remote-magic-envcheck'><p>{html.escape(self._title())}</p>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{note}</div>"
        )

    def __repr__(self) -> str:
        return self.text()

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(self.text())

    def refusal(self) -> str:
        """The message of the error raised when rows block: what happened, then the differences with the fixes."""
        count = len(self.blocking())
        return (
            f"nothing was sent: the Python on host {self.host} cannot run this cell as it is "
            f"({count} problem{'s' if count != 1 else ''} marked *, each with its fix)\n{self._table(self.rows)}"
        )


def _cells(row: Row) -> tuple[str, str, str, str]:
    return (row.package, row.here or MISSING, row.host or MISSING, row.fix)


# ---------------------------------------------------------------- versions
def canonical(name: str) -> str:
    """PEP 503: ``-``, ``_`` and ``.`` are one character, case does not count."""
    return re.sub(r"[-_.]+", "-", name).lower()


_owners: tuple[tuple[tuple[str, int], ...], Mapping[str, list[str]]] | None = None
_owners_lock = threading.Lock()


def _site_folders_state() -> tuple[tuple[str, int], ...]:
    """The mtime of each folder on sys.path: installing or removing a distribution adds or deletes its
    ``.dist-info`` there, which changes it.  The working folder is left out: a notebook's autosave changes it
    all day, and no one installs into it."""
    try:
        cwd = os.getcwd()
    except OSError:  # the kernel's working folder was deleted
        cwd = None
    state = []
    for entry in sys.path:
        if entry in ("", ".", cwd):
            continue
        try:
            state.append((entry, os.stat(entry).st_mtime_ns))
        except OSError:
            state.append((entry, -1))
    return tuple(state)


def installed_modules() -> Mapping[str, list[str]]:
    """Top-level import name -> the installed distributions that provide it.

    importlib reads every distribution's file list for this (0.2 s for 150 packages, seconds in a large conda
    env): it is read once, again only after an install changed a folder on sys.path.  ``%load_ext`` reads it
    in the background, so a kernel's first cell does not wait for it.
    """
    global _owners
    state = _site_folders_state()
    with _owners_lock:
        if _owners is None or _owners[0] != state:
            _owners = (state, metadata.packages_distributions())
        return _owners[1]


def distributions_for(import_names: Iterable[str]) -> dict[str, str]:
    """Top-level import name -> the distribution in this kernel that provides it.

    Standard-library modules and modules no installed distribution provides
    (a local ``utils.py``) are left out: the host needs nothing for them.
    """
    owners = installed_modules()
    found: dict[str, str] = {}
    for name in import_names:
        top = name.split(".")[0]
        if not top or top in sys.stdlib_module_names or top in found:
            continue
        candidates = owners.get(top, [])
        same = [d for d in candidates if canonical(d) == canonical(top)]
        if same or candidates:
            found[top] = (same or candidates)[0]
            continue
        try:  # an editable install or one without RECORD: its name may be the module's
            found[top] = metadata.metadata(top)["Name"] or top
        except metadata.PackageNotFoundError:
            pass
    return found


def local_versions(distributions: Iterable[str]) -> dict[str, str | None]:
    """Installed versions in this kernel (None when missing), from metadata: nothing is imported."""
    versions: dict[str, str | None] = {}
    for name in distributions:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _release(version: str) -> tuple[int, ...] | None:
    """``(2, 13, 0)`` for ``2.13.0+cpu``, ``1!2.0rc1`` -> ``(2, 0)``; None when it is no version."""
    match = re.match(r"\s*v?(?:\d+!)?(\d+(?:\.\d+)*)", version)
    return tuple(int(p) for p in match[1].split(".")) if match else None


def public(version: str) -> str:
    """The version without its local label: ``2.13.0+cpu`` -> ``2.13.0``."""
    return version.split("+", 1)[0].strip()


def _major_minor(version: str) -> tuple[int, int] | None:
    release = _release(version)
    if release is None:
        return None
    return release[0], (release[1] if len(release) > 1 else 0)


def _host_build(name: str) -> bool:
    return _HOST_BUILDS.fullmatch(canonical(name)) is not None


def install_origin(name: str) -> str | None:
    """Where this kernel's ``name`` was installed from when it was no package index: the URL in its PEP 610
    ``direct_url.json`` (a wheel file, a folder, a VCS or archive URL); None when it came from an index."""
    try:
        text = metadata.distribution(name).read_text("direct_url.json")
        url = json.loads(text)["url"] if text else None
    except (metadata.PackageNotFoundError, OSError, ValueError, KeyError, TypeError):
        return None
    return url if isinstance(url, str) and url else None


def _unpinnable(name: str, here: str, origin: str | None) -> str | None:
    """Why ``--env auto`` may not ask a package index for ``name`` at this version; None when it may."""
    if _host_build(name):
        return None  # never pinned by --env auto: the host keeps its own build (its fix says so)
    if "+" in here:
        return f"{here} is a local build (+{here.split('+', 1)[1]}), which no package index has"
    if origin:
        return f"it was installed here from {origin}, not from a package index"
    return None


def _unpinnable_fix(name: str, here: str, origin: str | None, host_python_path: str) -> str:
    """How to give the host this very build when ``--env auto`` may not ask an index for it."""
    if origin and not origin.startswith("file:"):
        return f"list `{name} @ {origin}` in --env FILE"
    return (
        f"put its wheel on the host and list the wheel's path in --env FILE (or a `--find-links FOLDER` line and "
        f"{name}=={here}), or `{host_python_path} -m pip install` that wheel there"
    )


# ----------------------------------------------------------------- compare
def compare(
    host: str,
    local: dict[str, str | None],
    remote: dict[str, str | None],
    python_here: str,
    python_host: str,
    host_python_path: str = "python3",
    origins: Mapping[str, str | None] | None = None,
) -> EnvReport:
    """The differences between this kernel (``local``) and the host (``remote``) that matter.

    Blocking: another Python major.minor, a distribution missing on the
    host, another major version of cloudpickle or keras.  Warnings: any
    other major or minor difference.  Equal versions and patch-only
    differences are listed in ``matching`` (shown by ``text``, never a refusal).
    ``host_python_path`` names the host's interpreter in the fixes;
    ``origins`` where each distribution came from when no index (default:
    read from this kernel's metadata, see ``install_origin``).
    """
    rows: list[Row] = []
    here_py, host_py = _major_minor(python_here), _major_minor(python_host)
    if here_py != host_py:
        x_y = ".".join(map(str, here_py)) if here_py else python_here
        rows.append(
            Row(
                "python",
                python_here,
                python_host,
                f"use a python {x_y} on the host: --python /path/to/python{x_y}",
                True,
            )
        )
    remote_by_name = {canonical(name): version for name, version in remote.items()}
    matching: list[Row] = []
    for name, here in local.items():
        if here is None:
            continue  # not installed here either: nothing to match
        there = remote_by_name.get(canonical(name))
        row = _package_row(name, here, there, host_python_path)
        if row is not None:
            rows.append(row)
        elif there is not None:
            same = "matches" if public(here) == public(there) else "matches (only the patch differs)"
            matching.append(Row(name, here, there, same, False))
    for row in rows:  # no --env auto nor an index's pin in the fix where an index could give another project
        here = local.get(row.package) if row.package != "python" else None
        if here is None:
            continue
        origin = origins.get(row.package) if origins is not None else install_origin(row.package)
        row.unpinnable = _unpinnable(row.package, here, origin)
        if row.unpinnable:
            row.fix = _unpinnable_fix(row.package, here, origin, host_python_path)
    rows.sort(key=lambda row: (not row.blocking, canonical(row.package)))
    matching.sort(key=lambda row: canonical(row.package))
    return EnvReport(host, python_here, python_host, rows, matching)


def _package_row(name: str, here: str, there: str | None, host_python_path: str) -> Row | None:
    """The row of one distribution installed here (``there``: its version on the host), or None when it matches."""
    pin = f"{name}=={public(here)}"
    if there is None:
        install = f"`{host_python_path} -m pip install {pin}` on the host"
        if _host_build(name):
            fix = f"{install} (the build that fits its CUDA), or pin it in --env FILE"
        else:
            fix = f"`--env auto`, or {install}"
        return Row(name, here, None, fix, True)
    ours, theirs = _major_minor(here), _major_minor(there)
    if ours is None or theirs is None:
        return Row(name, here, there, f"pin it in --env FILE ({pin})", False) if public(here) != public(there) else None
    if ours == theirs:
        return None  # patch-only
    auto = "" if _host_build(name) else f"--env auto installs {pin}, or "
    if canonical(name) in MAJOR_MUST_MATCH and ours[0] != theirs[0]:
        return Row(name, here, there, f"{auto}`{host_python_path} -m pip install {pin}` on the host", True)
    return Row(name, here, there, f"{auto}pin it in --env FILE", False)


def auto_requirements(report: EnvReport) -> list[str]:
    """``name==version`` (this kernel's) for what ``--env auto`` installs on the host.

    The distributions the host lacks or has in another major.minor version;
    never python, and never torch, tensorflow*, jax, jaxlib, nvidia-* and
    their kin: the host keeps its own CUDA builds (pin them in --env FILE).
    A version no index may be asked for (``Row.unpinnable``) is left as the
    host has it; one the host lacks refuses ``--env auto`` (HostSetupError,
    nothing sent), with the fix for each.
    """
    refused = [row for row in report.rows if row.unpinnable and row.host is None]
    if refused:
        lines = [f"  {row.package} {row.here}: {row.unpinnable}; {row.fix}" for row in refused]
        raise HostSetupError(
            f"nothing was sent: --env auto installs only what a package index has, asked for by name and version, "
            f"and an index may hold someone else's project under the same name. Host {report.host} lacks "
            f"{len(refused)} package{'s' * (len(refused) != 1)} that came from elsewhere, each with its fix:\n"
            + "\n".join(lines)
        )
    pins = set()
    for row in report.rows:
        if row.package == "python" or row.here is None or _host_build(row.package) or row.unpinnable:
            continue
        if row.host is not None:
            ours, theirs = _major_minor(row.here), _major_minor(row.host)
            if ours is None or theirs is None or ours == theirs:
                continue
        if _release(row.here) is not None:
            pins.add(f"{row.package}=={public(row.here)}")
    return sorted(pins, key=canonical)
