"""Inside a Slurm job: what the runner on a compute node learns from Slurm, and what Slurm's signals mean there.

USR2 (the time limit is near, ``--signal=B:USR2@N``) and SIGTERM (a
preemption) checkpoint the job and requeue it; a SIGTERM after our own
cancel (its mark in the job folder) is a cancel.  The handlers only set a
request: a fit honours it at the end of its current batch, elsewhere the
cell ends at once (it runs again from the top when the job comes back).
With ``--tasks N`` every task runs the runner: task 0 leads (events,
outputs), the others run the same cell on the same inputs, as PyTorch DDP
and ``keras.distribution`` expect, with their process group taken from
Slurm's variables.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

from .. import disk, protocol
from ..callbacks import Cancelled, EmitFn, Requeue, TrainingHooks
from .base import InJob

EARLY_USR2 = "_remote_magic_usr2"  # set on ``sys`` by the job script's first lines: a USR2 before the runner ran
TIME_LIMIT_REASON = "time limit near (USR2)"
PREEMPTED_REASON = "preempted (SIGTERM from Slurm)"
PLACED_FILE = "placed"  # task 0 of a multi-task job has placed the files (for this start of the job)
WORKER_WAIT_SECONDS = 300.0
REQUEUE_SECONDS = 60


class SlurmJob(InJob):
    """The runner of a Slurm job (one task of it, with ``--tasks``), from Slurm's environment variables."""

    def __init__(self) -> None:
        array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
        job = os.environ.get("SLURM_JOB_ID", "")
        self.id = f"{array}_{task}" if array and task else job  # as squeue and scancel take it
        self.node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
        self.restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        self.group = process_group()
        self.leads = self.group is None or self.group["RANK"] == "0"
        self.stamp = f"{job}-{self.restarts}"  # one start of the job: a requeued one places its files anew

    def begin(self, path: str) -> bool:
        """A job cancelled while Slurm started it: the cancel wrote its final event, nothing runs."""
        if os.path.exists(os.path.join(path, protocol.CANCEL_MARK)):
            return False
        if self.group is not None:
            os.environ.update(self.group)
        if not self.leads:
            signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # a requeue is task 0's to decide
        return True

    def gpus(self, path: str) -> list[int]:
        """Slurm set CUDA_VISIBLE_DEVICES itself when the job asked for GPUs."""
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        return [int(i) for i in visible.split(",") if i.strip().isdigit()]

    def handle_signals(self, path: str, hooks: TrainingHooks) -> None:
        def requeue(reason: str) -> None:
            if hooks.requeue_reason is not None:
                return
            hooks.requeue_reason = reason
            if not hooks.training:
                raise Requeue(reason)

        def on_term(*_: Any) -> None:
            if os.path.exists(os.path.join(path, protocol.CANCEL_MARK)):
                raise Cancelled()
            requeue(PREEMPTED_REASON)

        signal.signal(signal.SIGUSR2, lambda *_: requeue(TIME_LIMIT_REASON))
        signal.signal(signal.SIGTERM, on_term)
        if getattr(sys, EARLY_USR2, False):  # it came before this handler (the job script's first lines caught it)
            hooks.requeue_reason = TIME_LIMIT_REASON

    def started(self) -> dict[str, Any]:
        return {**super().started(), "slurm": {"id": self.id, "node": self.node, "restarts": self.restarts}}

    def files_placed(self, path: str) -> None:
        if self.group is not None:
            disk.atomic_write(os.path.join(path, PLACED_FILE), self.stamp.encode(), durable=False)

    def wait_for_files(self, path: str) -> bool:
        placed, deadline = os.path.join(path, PLACED_FILE), time.monotonic() + WORKER_WAIT_SECONDS
        while True:
            with contextlib.suppress(OSError), open(placed, encoding="utf-8") as f:
                if f.read() == self.stamp:
                    return True
            if time.monotonic() > deadline:
                print(f"task {os.environ.get('RANK')}: task 0 did not place the job's files in time", file=sys.stderr)
                return False
            time.sleep(0.1)

    def requeued(self, reason: str, emit: EmitFn) -> None:
        """At its time limit the job asks Slurm to put it back in the queue; a preempted one Slurm requeues itself."""
        if reason != TIME_LIMIT_REASON:
            return
        try:
            done = subprocess.run(
                ["scontrol", "requeue", self.id], capture_output=True, text=True, timeout=REQUEUE_SECONDS
            )
            problem = done.stderr.strip() if done.returncode else ""
        except (OSError, subprocess.TimeoutExpired) as exc:
            problem = str(exc)
        if problem:
            emit(protocol.WARNING, message=f"scontrol requeue {self.id} failed ({problem}): the job will not come back")


def process_group() -> dict[str, str] | None:
    """What PyTorch DDP (``env://``) and ``keras.distribution.initialize()`` read, from Slurm's variables,
    when the job runs as several tasks (``--tasks``); None otherwise."""
    tasks = int(os.environ.get("SLURM_NTASKS") or 1)
    if "SLURM_JOB_ID" not in os.environ or "SLURM_STEP_ID" not in os.environ or tasks < 2:
        return None
    address = os.environ.get("MASTER_ADDR") or socket.gethostname()
    port = int(os.environ.get("MASTER_PORT") or 29500)
    rank = os.environ.get("SLURM_PROCID", "0")
    return {
        "RANK": rank,
        "WORLD_SIZE": str(tasks),
        "LOCAL_RANK": os.environ.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": address,
        "MASTER_PORT": str(port),
        "KERAS_DISTRIBUTION_JOB_ADDRESSES": f"{address}:{port + 1}",
        "KERAS_DISTRIBUTION_NUM_PROCESSES": str(tasks),
        "KERAS_DISTRIBUTION_PROCESS_ID": rank,
    }
