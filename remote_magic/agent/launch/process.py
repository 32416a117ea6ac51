"""How a job runs: the one seam between the job store and whatever executes jobs.

Everything that decides whether a job is alive (``status``, ``attach``,
``cancel``, ``stop``, ``gc``) asks its launcher, never a pid directly: a job
waiting in a GPU queue or running on a Slurm compute node has no local
process, and must not be taken for dead.  ``ProcessLauncher`` runs the job as
a detached process on this host (a warm runner when one is ready); it
records the runner's identity (pid, start time, boot id) so that a reused pid
is never signalled and never taken for the job.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from .. import jobs, protocol
from . import gpu_queue, gpus, procs, start
from .base import ENDED, Launcher, Phase
from .slurm import SlurmLauncher


class ProcessLauncher(Launcher):
    """The job's runner is a detached process on this host."""

    name = "process"

    def start(self, root: str, agent_hash: str, path: str, spec: dict[str, Any]) -> None:
        """At once on a host without GPUs; through the host's queue on one with GPUs, and for a sweep's trial
        (the queue keeps to the sweep's parallel limit)."""
        has_gpus = bool(gpus.inventory())
        if spec.get("sweep") and spec["sweep"].get("parallel"):
            gpu_queue.enqueue(root, agent_hash, path, spec)
        elif not has_gpus:
            start.start_runner(root, agent_hash, path, spec, None, self.name)
        elif gpu_queue.wanted_gpus(spec) is None:
            start.start_runner(root, agent_hash, path, spec, [], self.name)  # no GPU wanted: none visible
        else:
            gpu_queue.enqueue(root, agent_hash, path, spec)

    def poll(self, path: str, spec: dict[str, Any]) -> Phase:
        record = jobs.read_launch(path)
        if record is None:
            root = os.path.dirname(os.path.dirname(path))
            if gpu_queue.is_queued(root, spec["job_id"]):
                last = jobs.last_event(path) or {}
                return Phase(
                    protocol.STATE_QUEUED,
                    "waiting in the queue",
                    reason=last.get("reason"),
                    position=last.get("position"),
                )
            if os.path.exists(os.path.join(path, protocol.PID_FILE)):
                return Phase(ENDED, "unknown", where=start.hostname())  # recorded before start times: never trusted
            if time.time() - (spec.get("submitted") or 0) < start.START_GRACE_SECONDS:
                return Phase(protocol.STATE_QUEUED, "starting", reason="starting")
            return Phase(ENDED, "never started")
        identity = procs.ProcessIdentity.from_json(record.get("identity"))
        if identity is not None and procs.is_running(identity):
            return Phase(protocol.STATE_RUNNING, "running", where=record.get("host"))
        return Phase(ENDED, "exited", where=record.get("host"))

    def stop(self, path: str, spec: dict[str, Any]) -> bool:
        if _leave_queue(path, spec, "stopped before it started: it had nothing to return yet"):
            return True
        identity = start.runner_identity(path)
        return identity is not None and procs.signal_process(identity, signal.SIGINT)

    def cancel(self, path: str, spec: dict[str, Any], grace: float) -> dict[str, Any]:
        if _leave_queue(path, spec, "cancelled while it waited in the GPU queue"):
            return {"queued": True}
        identity = start.runner_identity(path)
        runner = identity if identity is not None and procs.is_running(identity) else None
        return procs.terminate_tagged(spec["job_id"], grace, also=runner)


def _leave_queue(path: str, spec: dict[str, Any], message: str) -> bool:
    """Take a job that has not started out of the GPU queue, with its final event; whether it was queued."""
    if not gpu_queue.remove(os.path.dirname(os.path.dirname(path)), spec["job_id"]):
        return False
    jobs.append_event(path, protocol.CANCELLED, message=message)
    return True


LAUNCHERS: dict[str, Launcher] = {ProcessLauncher.name: ProcessLauncher(), SlurmLauncher.name: SlurmLauncher()}


def launcher_for(spec: dict[str, Any]) -> Launcher:
    name = spec.get("launcher") or ProcessLauncher.name
    if name not in LAUNCHERS:
        raise jobs.AgentError(f"this agent cannot run jobs with launcher {name!r}")
    return LAUNCHERS[name]


def job_row(path: str, spec: dict[str, Any] | None = None) -> dict[str, Any]:
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
    launcher = launcher_for(spec)
    phase = launcher.poll(path, spec)
    row["launcher"] = f"{launcher.name}: {phase.word}"
    if phase.active:
        row["state"] = summary["state"] or phase.state
        row.update(reason=phase.reason, position=phase.position, where=phase.where or row["where"])
        return row
    row.update(state=phase.final or protocol.STATE_KILLED, message=phase.message or LOST_MESSAGE)
    return row


LOST_MESSAGE = "the runner process ended without a final event (killed, out of memory, or the host rebooted)"
