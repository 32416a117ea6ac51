"""A job whose runner is a process on this host: how it is watched, stopped and cancelled, and what its
launcher does inside it.

Shared by the launchers of a plain host: the process launcher starts the
runner at once, the GPU queue's when the job's GPUs are free; from then on
they are the same.  The runner's identity (pid, start time, boot id, in
``launch.json``) is what is watched and signalled, so a reused pid is never
taken for the job.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

from .. import jobs, procs, protocol
from ..callbacks import Cancelled, TrainingHooks
from . import gpus, start, warm
from .base import ENDED, InJob, Launcher, Phase


class LocalLauncher(Launcher):
    """The job's runner is a detached process on this host; how it starts is the subclass's."""

    def poll(self, path: str, spec: dict[str, Any]) -> Phase:
        record = jobs.read_launch(path)
        if record is None:
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
        identity = start.runner_identity(path)
        return identity is not None and procs.signal_process(identity, signal.SIGINT)

    def cancel(self, path: str, spec: dict[str, Any], grace: float) -> dict[str, Any]:
        identity = start.runner_identity(path)
        runner = identity if identity is not None and procs.is_running(identity) else None
        return procs.terminate_tagged(spec["job_id"], grace, also=runner)

    def in_job(self, root: str, agent_hash: str) -> InJob:
        return ProcessJob(root, agent_hash)


class ProcessJob(InJob):
    """Inside a runner on this host: SIGTERM cancels, the GPUs are those the queue wrote down, and the runner
    leaves a warm runner ready for the next job as it ends.

    ``warm_runner``: the pid of the warm runner this one was forked from (None: started cold).  The kind of
    runner to keep warm is read now, before the cell may change KERAS_BACKEND.
    """

    def __init__(self, root: str, agent_hash: str, warm_runner: int | None = None) -> None:
        self.root, self.agent_hash, self.warm_runner = root, agent_hash, warm_runner
        self.kind = warm.RunnerKind.of_this_process()

    def gpus(self, path: str) -> list[int] | None:
        """A warm runner started before the job's GPUs were known: they become visible here, CUDA not loaded yet."""
        try:
            with open(os.path.join(path, protocol.ASSIGNED_FILE), encoding="utf-8") as f:
                assigned = [int(i) for i in json.load(f)["gpus"]]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        os.environ.update(gpus.visible_devices_env(assigned))
        return assigned

    def handle_signals(self, path: str, hooks: TrainingHooks) -> None:
        signal.signal(signal.SIGTERM, _raise_cancelled)

    def started(self) -> dict[str, Any]:
        return {"warm": self.warm_runner is not None, "warm_runner": self.warm_runner}

    def ended(self, spec: dict[str, Any]) -> None:
        if spec.get("warm", True):
            warm.prepare_next(self.root, self.agent_hash, self.kind)


def _raise_cancelled(*_: Any) -> None:
    raise Cancelled()
