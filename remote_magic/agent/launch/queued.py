"""The host's GPU queue as a launcher: a job waits in the queue for its GPUs (or its sweep's turn), then runs as
a runner process on this host, as the process launcher's jobs do.

The queue itself (its rounds, its order, its dispatcher) is gpu_queue.py's.
Until the queue starts the job, its phase is the queue's, and a stop or a
cancel takes it out of the queue with its final event; once started, it is
a local runner like any other.
"""

from __future__ import annotations

import os
from typing import Any

from .. import jobs, protocol
from . import gpu_queue
from .base import Phase
from .local import LocalLauncher


class QueuedLauncher(LocalLauncher):
    """Jobs that want GPUs on a host that has them, and the trials of a sweep (the queue keeps to its parallel)."""

    name = "queue"

    def start(self, root: str, agent_hash: str, path: str, spec: dict[str, Any]) -> None:
        gpu_queue.enqueue(root, agent_hash, path, spec)

    def poll(self, path: str, spec: dict[str, Any]) -> Phase:
        if jobs.read_launch(path) is None and gpu_queue.is_queued(_root_of(path), spec["job_id"]):
            last = jobs.last_event(path) or {}
            reason, position = last.get("reason"), last.get("position")
            return Phase(protocol.STATE_QUEUED, "waiting in the queue", reason=reason, position=position)
        return super().poll(path, spec)

    def stop(self, path: str, spec: dict[str, Any]) -> bool:
        if _leave_queue(path, spec, "stopped before it started: it had nothing to return yet"):
            return True
        return super().stop(path, spec)

    def cancel(self, path: str, spec: dict[str, Any], grace: float) -> dict[str, Any]:
        if _leave_queue(path, spec, "cancelled while it waited in the GPU queue"):
            return {"queued": True}
        return super().cancel(path, spec, grace)


def _root_of(path: str) -> str:
    """The host root of a job folder (``<root>/jobs/<job_id>``)."""
    return os.path.dirname(os.path.dirname(path))


def _leave_queue(path: str, spec: dict[str, Any], message: str) -> bool:
    """Take a job that has not started out of the GPU queue, with its final event; whether it was queued."""
    if not gpu_queue.remove(_root_of(path), spec["job_id"]):
        return False
    jobs.append_event(path, protocol.CANCELLED, message=message)
    return True
