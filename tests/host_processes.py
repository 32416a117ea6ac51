"""The processes a test's host root left behind (runners, warm runners, dispatchers), found by their command line."""

from __future__ import annotations

import os
import signal
from pathlib import Path


def processes_under(root: Path) -> list[int]:
    """Pids whose command line names ``root`` (every agent process gets its root as an argument)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if str(root).encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def kill_processes_under(root: Path) -> None:
    """Stop what the tests' jobs left: runners still going, warm runners, the dispatcher."""
    for pid in processes_under(root):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
