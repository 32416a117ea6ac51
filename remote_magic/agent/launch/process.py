"""Which launcher runs a job (the host decides), the process launcher, and a job's status row.

Everything that decides whether a job is alive (``status``, ``attach``,
``cancel``, ``stop``, ``gc``) asks its launcher, never a pid directly: a job
waiting in a GPU queue or running on a Slurm compute node has no local
process, and must not be taken for dead.  The host decides which launcher
runs a job (host.py), once, at submit; the job's spec records it.
"""

from __future__ import annotations

import os
from typing import Any

from .. import jobs, protocol
from ..protocol import PROCESS_LAUNCHER, SLURM_LAUNCHER
from . import gpus, start
from .base import Launcher
from .host import HostFile
from .local import LocalLauncher
from .queued import QueuedLauncher
from .slurm import SlurmLauncher


class ProcessLauncher(LocalLauncher):
    """The job's runner starts at once, as a detached process on this host (a warm runner's fork when one fits)."""

    name = PROCESS_LAUNCHER

    def start(self, root: str, agent_hash: str, path: str, spec: dict[str, Any]) -> None:
        """No GPU visible to a job that wants none, on a host that has some; on one without, nothing to hide."""
        start.start_runner(root, agent_hash, path, spec, [] if gpus.inventory() else None, self.name)


LAUNCHERS: dict[str, Launcher] = {each.name: each for each in (ProcessLauncher(), QueuedLauncher(), SlurmLauncher())}


def launcher_for(root: str, spec: dict[str, Any]) -> Launcher:
    """The job's launcher: the one its spec names, else the one this host chooses for it.

    At submit the agent chooses and names it in the spec, so the choice is
    made once; a spec of an earlier client may name ``slurm`` itself.  A job
    folder of an earlier agent names none: its launch record does once the
    job started, and before that it may wait in the GPU queue.
    """
    name = spec.get("launcher")
    if name is None:
        name = _earlier_agents(root, spec) if "job_id" in spec else _choose(root, spec)
    if name not in LAUNCHERS:
        raise jobs.AgentError(f"this agent cannot run jobs with launcher {name!r}")
    return LAUNCHERS[name]


def _choose(root: str, spec: dict[str, Any]) -> str:
    """A plain host's job waits in its GPU queue when it wants GPUs the host has, or when it is a sweep's trial
    (the queue keeps to the sweep's parallel limit); else it starts at once."""
    if HostFile.read(root).launcher == SLURM_LAUNCHER:
        return SLURM_LAUNCHER
    if (spec.get("sweep") or {}).get("parallel"):
        return QueuedLauncher.name
    wanted = protocol.GpuRequest.from_spec(spec).wanted
    return QueuedLauncher.name if wanted and gpus.inventory() else PROCESS_LAUNCHER


def _earlier_agents(root: str, spec: dict[str, Any]) -> str:
    """The launcher of a job an earlier agent took: as its launch record names it (``process``, ``slurm``), or,
    not started yet, the queue's, which also knows a job that never waited in it."""
    record = jobs.read_launch(jobs.job_dir(root, spec["job_id"]))
    name = (record or {}).get("launcher")
    if name in LAUNCHERS:
        return str(name)
    return SLURM_LAUNCHER if HostFile.read(root).launcher == SLURM_LAUNCHER else QueuedLauncher.name


def job_row(root: str, path: str, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    """One job's row for ``status``: what its events say, and for a job still going, its launcher's phase.

    The event log is the truth once it has an end; a job whose launcher says
    it ended without a final event was killed (out of memory, SIGKILL, reboot).
    """
    spec = spec or jobs.read_spec(path)
    row = protocol.status_row(spec)
    summary = jobs.event_summary(path)
    row.update({k: v for k, v in summary.items() if k in row and v is not None})
    row["checkpoint"] = jobs.read_checkpoint_meta(path)
    row["fetched"] = os.path.exists(os.path.join(path, protocol.FETCHED_MARK))
    if summary["ended"] is not None:
        return row
    launcher = launcher_for(root, spec)
    phase = launcher.poll(path, spec)
    row["launcher"] = f"{launcher.name}: {phase.word}"
    if phase.active:
        row["state"] = summary["state"] or phase.state
        row.update(reason=phase.reason, position=phase.position, where=phase.where or row["where"])
        return row
    row.update(state=phase.final or protocol.STATE_KILLED, message=phase.message or LOST_MESSAGE)
    return row


LOST_MESSAGE = "the runner process ended without a final event (killed, out of memory, or the host rebooted)"
