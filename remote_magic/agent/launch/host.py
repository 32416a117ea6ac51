"""This host's own settings, as its client last said them at ``hello`` (``<root>/host.json``).

The host, not each job's spec, decides which launcher runs its jobs: a
client says ``hello --scheduler slurm`` for a Slurm login node (nothing for
a plain host), and every job submitted afterwards goes to that launcher,
with no client connected too (a dispatcher, a requeued job).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass

from .. import disk
from ..protocol import PROCESS_LAUNCHER, SLURM_LAUNCHER

HOST_FILE = "host.json"
SCHEDULERS = (SLURM_LAUNCHER,)  # what ``hello --scheduler`` takes


@dataclass(frozen=True)
class HostFile:
    """``scheduler``: ``slurm``, or None for a plain host (its jobs run as processes here, through its GPU queue)."""

    scheduler: str | None = None

    @property
    def launcher(self) -> str:
        return SLURM_LAUNCHER if self.scheduler == SLURM_LAUNCHER else PROCESS_LAUNCHER

    @classmethod
    def read(cls, root: str) -> HostFile:
        """As last written; a plain host where nothing (or nothing readable) was."""
        try:
            with open(os.path.join(root, HOST_FILE), encoding="utf-8") as f:
                scheduler = json.load(f).get("scheduler")
        except (OSError, ValueError, AttributeError):
            return cls()
        return cls(scheduler if scheduler in SCHEDULERS else None)

    def write(self, root: str) -> None:
        """Atomically, and only when changed: every connection says hello, and a rewrite costs an fsync."""
        path, data = os.path.join(root, HOST_FILE), json.dumps(asdict(self)).encode()
        with contextlib.suppress(OSError), open(path, "rb") as f:
            if f.read() == data:
                return
        disk.atomic_write(path, data)
