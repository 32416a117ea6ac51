"""Running notebooks and kernels as a user would: an IPython profile with their settings, nbclient to execute."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nbformat
from nbclient import NotebookClient


def write_profile(ipython_dir: Path, **settings: Any) -> Path:
    """An ``ipython_config.py`` setting ``c.RemoteMagics.<name> = <value>`` for each setting; the IPYTHONDIR to use."""
    profile = ipython_dir / "profile_default"
    profile.mkdir(parents=True, exist_ok=True)
    (profile / "ipython_config.py").write_text("".join(f"c.RemoteMagics.{k} = {v!r}\n" for k, v in settings.items()))
    return ipython_dir


def execute(path: Path, timeout: int = 300) -> nbformat.NotebookNode:
    """Run the notebook in a kernel whose working folder is the notebook's, as Jupyter does."""
    nb = nbformat.read(path, as_version=4)
    resources = {"metadata": {"path": str(path.parent)}}
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources=resources).execute()
    return nb


def texts(cell: nbformat.NotebookNode) -> str:
    """What a code cell printed and showed, as text."""
    parts = []
    for output in cell.get("outputs", []):
        parts.append(output.get("text", ""))
        parts.append(output.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)
