"""What the kernel's saved notebook says before any cell runs: the hosts its ``%%remote_train`` cells name.

Read when the extension loads, so the hosts the notebook will use are warmed
instead of the default one.  Only the file on disk is read (the last save).
"""

from __future__ import annotations

import json
import os
import shlex

# A notebook this big is mostly outputs: parsing it would hold the kernel up for little.
MAX_NOTEBOOK_BYTES = 20 * 1024 * 1024


def hosts_to_warm(path: str | None, default: str) -> list[str]:
    """The hosts the ``%%remote_train`` cells name with ``--host``, and ``default`` if one names none.

    A notebook not known, not readable, or without such a cell yet: ``[default]``, as nothing says otherwise.
    A host given as ``$name`` or ``{name}`` is only known when the cell runs: none is warmed for it.
    """
    lines = _remote_train_lines(path)
    if not lines:
        return [default]
    hosts: list[str] = []
    for line in lines:
        host = _host_option(line)
        if host is None:
            hosts.append(default)
        elif host and not any(mark in host for mark in "${"):
            hosts.append(host)
    return list(dict.fromkeys(hosts))


def _remote_train_lines(path: str | None) -> list[str]:
    """The first line of each ``%%remote_train`` code cell of the notebook at ``path``; [] if it cannot be read."""
    cells = []
    for candidate in _candidates(path):
        try:
            if os.path.getsize(candidate) > MAX_NOTEBOOK_BYTES:
                return []
            with open(candidate, encoding="utf-8") as f:
                cells = json.load(f).get("cells") or []
            break
        except (OSError, ValueError, AttributeError):
            continue
    lines = []
    for cell in cells:
        if not isinstance(cell, dict) or cell.get("cell_type") != "code":
            continue
        source = cell.get("source") or ""
        source = "".join(source) if isinstance(source, list) else str(source)
        first = source.lstrip().split("\n", 1)[0]
        if first.split(maxsplit=1)[:1] == ["%%remote_train"]:
            lines.append(first)
    return lines


def _candidates(path: str | None) -> list[str]:
    """The notebook as named, then in the kernel's folder (a server may name it from its own root)."""
    if not path or not path.endswith(".ipynb"):
        return []
    return list(dict.fromkeys([path, os.path.basename(path)]))


def _host_option(line: str) -> str | None:
    """The value of ``--host`` on a ``%%remote_train`` line; None without one, "" where the line cannot be read."""
    try:
        words = shlex.split(line)
    except ValueError:
        return ""
    for index, word in enumerate(words):
        if word == "--host":
            return words[index + 1] if index + 1 < len(words) else ""
        if word.startswith("--host="):
            return word.removeprefix("--host=")
    return None
