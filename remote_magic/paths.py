"""Where remote_magic keeps state on this machine."""

from __future__ import annotations

import os


def data_dir() -> str:
    """$REMOTE_MAGIC_DATA_DIR, else ``$XDG_DATA_HOME/remote_magic`` (``~/.local/share/remote_magic``)."""
    if os.environ.get("REMOTE_MAGIC_DATA_DIR"):
        return os.path.expanduser(os.environ["REMOTE_MAGIC_DATA_DIR"])
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "remote_magic")
