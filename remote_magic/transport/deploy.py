"""The agent as shipped: its content hash and a tar of its files.

The hash names the folder on the host (``agent/<hash>``), so a changed agent
is deployed beside the old one and jobs already running keep their code.
"""

from __future__ import annotations

import functools
import hashlib
import io
import tarfile
from pathlib import Path

AGENT_DIR = Path(__file__).resolve().parent.parent / "agent"
_PACKAGE_STUB = b'"""Only the agent of remote_magic, deployed to a training host."""\n'


def _agent_files() -> list[tuple[str, bytes]]:
    files = [("remote_magic/__init__.py", _PACKAGE_STUB)]
    for path in sorted(AGENT_DIR.rglob("*.py")):
        files.append((f"remote_magic/agent/{path.relative_to(AGENT_DIR).as_posix()}", path.read_bytes()))
    return files


@functools.cache
def agent_hash() -> str:
    digest = hashlib.sha256()
    for name, data in _agent_files():
        digest.update(name.encode() + b"\0" + data + b"\0")
    return digest.hexdigest()[:16]


@functools.cache
def agent_tarball() -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, data in _agent_files():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o600
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()
