"""A job's runner process: started (a warm one when it fits, else a new one) and told apart from the dead.

Shared by the process launcher, which starts jobs at once, and the host's
queue (gpu_queue.py), which starts them when their GPUs free up; the launch
record (``launch.json``: the runner's pid, start time and boot id) is how
both later know whether the job still runs.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

from .. import bootstrap, disk, jobs, procs, protocol
from . import gpus, warm
from .detach import spawn_detached, untagged_environment

START_GRACE_SECONDS = 30.0  # a job may be this long between being started and its launch record appearing


def runner_identity(path: str) -> procs.ProcessIdentity | None:
    record = jobs.read_launch(path)
    return procs.ProcessIdentity.from_json(record.get("identity")) if record else None


def hostname() -> str:
    return socket.gethostname()


def start_runner(
    root: str, agent_hash: str, path: str, spec: dict[str, Any], gpu_ids: list[int] | None, launcher: str
) -> procs.ProcessIdentity | None:
    """Start the job's runner: a warm runner's fork when one fits (the fork records itself), else a new
    process, recorded here; the runner's identity.

    ``gpu_ids``: the GPUs the job holds (``[]``: none visible), written
    before the runner starts so a warm one sets CUDA_VISIBLE_DEVICES before
    the cell; None on a host without GPUs.
    """
    job_id = spec["job_id"]
    identity = None
    kind = warm.RunnerKind.for_job(root, spec)
    env = procs.tag_environment(kind.environment(untagged_environment()), job_id)
    if gpu_ids is not None:
        disk.atomic_write(os.path.join(path, protocol.ASSIGNED_FILE), json.dumps({"gpus": gpu_ids}).encode())
        env.update(gpus.visible_devices_env(gpu_ids))
    use_warm = spec.get("warm", True) and warm.enabled()
    if use_warm:
        identity = warm.claim(root, agent_hash, kind, job_id, cuda_untouched=gpu_ids is not None)
    if identity is None:
        identity = spawn_detached(
            [kind.python, "-c", bootstrap.RUN, root, agent_hash, "run-job", job_id],
            log=os.path.join(path, protocol.RUNNER_LOG),
            cwd=path,  # the runner moves to the job's working folder once its files are in place
            env=env,
        )
        jobs.write_launch(path, launcher, identity.to_json() if identity else None)
    if use_warm:
        warm.ensure(root, agent_hash, kind)  # the next job's runner
    return identity


def still_running(path: str, started: float) -> bool:
    """Whether a job started at ``started`` goes on: its log has no end and its runner lives.

    Without a launch record yet, it is starting (within the grace period)
    or its start failed.
    """
    if jobs.event_summary(path)["ended"] is not None:
        return False
    if jobs.read_launch(path) is None:
        return time.time() - started < START_GRACE_SECONDS
    identity = runner_identity(path)
    return identity is not None and procs.is_running(identity)
