"""The commands about the host itself: what it offers (``hello``, which also records its settings), its GPUs
now, and the processes the agent starts on its own (the GPU queue's dispatcher, a job's runner, a warm runner)."""

from __future__ import annotations

import argparse
import dataclasses
import platform
import socket
import sys

from .. import jobs, protocol
from ..launch import gpu_queue, gpus, local, process, warm
from ..launch.host import HostFile
from .base import CommandIO


def cmd_hello(root: str, agent_hash: str, args: argparse.Namespace, io: CommandIO) -> int:
    """What the host offers: interpreter, packages (found, not imported), root, GPUs, and the launcher its jobs
    go to, which its settings (``--scheduler``) decide from now on."""
    from ..runner import package_versions

    settings = HostFile(args.scheduler)
    settings.write(root)
    io.print_json(
        {
            "agent": agent_hash,
            "schema": protocol.SCHEMA_VERSION,
            "python": sys.executable,
            "python_version": platform.python_version(),
            "hostname": socket.gethostname(),
            "root": root,
            "packages": package_versions(),
            "gpus": [{"index": g.index, "name": g.name, "memory_total": g.memory_total} for g in gpus.inventory()],
            "launcher": settings.launcher,
        }
    )
    return 0


def cmd_gpus(root: str, agent_hash: str, args: argparse.Namespace, io: CommandIO) -> int:
    """The host's GPUs now: model, memory, utilization, and who holds each (a job of ours, or others' processes)."""
    inventory = gpus.inventory()
    held = gpu_queue.holdings(root) if inventory else {}
    foreign = gpu_queue.others_on_gpus(inventory, 0) if inventory else {}
    rows = []
    for g in inventory:
        record = held.get(g.index)
        holder = gpu_queue.holder(record, root) if record else None
        if holder is None and g.index in foreign:
            holder = ", ".join(gpus.describe_holder(p) for p in foreign[g.index])
        rows.append({**dataclasses.asdict(g), "holder": holder, "job_id": record.job_id if record else None})
    io.print_json(rows)
    return 0


def cmd_dispatch(root: str, agent_hash: str, args: argparse.Namespace, io: CommandIO) -> int:
    return gpu_queue.serve(root, agent_hash)


def cmd_run_job(root: str, agent_hash: str, args: argparse.Namespace, io: CommandIO) -> int:
    """Run the job here, as its launcher's runner (a process its launcher started, or a Slurm batch step)."""
    from .. import runner

    path = jobs.job_dir(root, args.job_id)
    job = process.launcher_for(root, jobs.read_spec(path)).in_job(root, agent_hash)
    return runner.run_job(root, path, job)


def cmd_warm_runner(root: str, agent_hash: str, args: argparse.Namespace, io: CommandIO) -> int:
    """Wait, imported, for jobs to fork a runner for: the runner is imported here once, not in every job."""
    from .. import runner

    def run(path: str, warm_runner: int) -> int:
        return runner.run_job(root, path, local.ProcessJob(root, agent_hash, warm_runner))

    return warm.serve(root, agent_hash, run)


def cmd_warm_up(root: str, agent_hash: str, args: argparse.Namespace, io: CommandIO) -> int:
    """Have a warm runner of this interpreter and backend ready or starting (a kernel that just loaded us)."""
    warm.ensure(root, agent_hash, warm.RunnerKind.of(sys.executable, args.backend))
    io.print_json({"warm": warm.enabled()})
    return 0


def cmd_warm_stop(root: str, agent_hash: str, args: argparse.Namespace, io: CommandIO) -> int:
    """End the warm runners of this root: a one-shot run leaves nothing behind."""
    io.print_json({"stopped": warm.stop_all(root)})
    return 0
