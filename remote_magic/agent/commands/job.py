"""The commands of one job's life: submit it, follow its events, ask how it is, stop or cancel it.

Each asks the job's launcher (launch/process.py's ``launcher_for``) where
the job is, never a pid directly: a job waiting in a GPU queue or running on
a Slurm node has no process here.
"""

from __future__ import annotations

import argparse
import json
import time

from .. import jobs, protocol
from ..launch import process
from ..store import blobs, layout
from .base import CommandIO
from .spec import spec_problem

POLL_SECONDS = 0.02
# How often ``attach`` asks the launcher whether a job whose log is quiet still runs.
LIVENESS_SECONDS = 0.25
CANCEL_GRACE_SECONDS = 5.0


def cmd_submit(root: str, agent_hash: str, args: argparse.Namespace, io: CommandIO) -> int:
    """Create a job and start it through its launcher; answer at once.

    stdin: one JSON line (the spec, with ``blobs`` and ``inputs_size``), then
    the inputs pickle.  When blobs are missing, nothing is created and the
    answer lists them so the client can upload just those.  A spec that is
    not well formed, or fewer input bytes than declared, creates nothing.
    The host picks the job's launcher, and the spec records it.
    """
    try:
        spec = json.loads(io.stdin.readline())
    except ValueError:
        raise jobs.AgentError("submit: the first line is not a JSON spec") from None
    problem = spec_problem(spec, root)
    if problem:
        raise jobs.AgentError(f"submit: {problem}")
    size = spec.pop("inputs_size")
    inputs = io.stdin.read(size)
    if len(inputs) != size:
        raise jobs.AgentError(f"submit: the inputs ended after {len(inputs)} of {size} bytes; no job was created")
    with blobs.blob_lock(root, exclusive=False):  # gc cannot remove a blob between the check and the job naming it
        missing = blobs.missing_blobs(root, blobs.referenced_blobs(spec))
        if missing:
            io.print_json({"missing": missing})
            return 0
        launcher = process.launcher_for(root, spec)
        path, spec = jobs.create_job(root, {**spec, "agent": agent_hash, "launcher": launcher.name}, inputs)
    launcher.start(root, agent_hash, path, spec)
    io.print_json({"job_id": spec["job_id"]})
    return 0


def cmd_attach(root: str, agent_hash: str, args: argparse.Namespace, io: CommandIO) -> int:
    """Stream events from ``--from`` until the job's final event.

    Tails the log from where it last read, a bounded chunk at a time (a long
    job's log is never read twice, nor held whole).  If the launcher says the
    job ended without a final event (SIGKILL, OOM, reboot) a ``lost`` event
    is printed, not stored, so the client always sees an end.
    """
    path = jobs.job_dir(root, args.job_id)
    spec = jobs.read_spec(path)
    launcher = process.launcher_for(root, spec)
    next_seq = args.from_seq
    checked = 0.0
    with jobs.EventTail(path) as tail:
        while not io.cancelled.is_set():
            events = tail.read_events()
            for event, line in events:
                if event["seq"] < next_seq:
                    continue
                io.write_text(line)
                next_seq = event["seq"] + 1
                if event["type"] in protocol.TERMINAL:
                    io.stdout.flush()
                    return 0
            io.stdout.flush()
            if events or tail.has_unread():
                continue
            if time.monotonic() - checked >= LIVENESS_SECONDS:
                checked = time.monotonic()
                phase = launcher.poll(path, spec)
                if not phase.active:
                    if tail.has_unread():
                        continue  # the runner wrote its last events just before exiting
                    message = phase.message or process.LOST_MESSAGE  # e.g. a scheduler's word for what happened
                    io.write_text(protocol.encode_event(protocol.make_event(next_seq, protocol.LOST, message=message)))
                    io.stdout.flush()
                    return 0
            time.sleep(POLL_SECONDS)
    return 0  # the client stopped following


def cmd_events(root: str, agent_hash: str, args: argparse.Namespace, io: CommandIO) -> int:
    """The events logged so far, from ``--from`` (at most ``--limit``), without following."""
    path = jobs.job_dir(root, args.job_id)
    count = 0
    for _, line in jobs.iter_events(path, args.from_seq):
        if count >= args.limit:
            break
        io.write_text(line)
        count += 1
    io.stdout.flush()
    return 0


def cmd_status(root: str, agent_hash: str, args: argparse.Namespace, io: CommandIO) -> int:
    """Every job's row; for one job, its row with its spec, its last lines of output and its traceback."""
    if args.job_id is None:
        io.print_json([process.job_row(root, path) for path in jobs.job_paths(root)])
        return 0
    path = jobs.job_dir(root, args.job_id)
    spec = jobs.read_spec(path)
    row = process.job_row(root, path, spec)
    tail: list[str] = []
    error = None
    for event, _ in jobs.iter_events(path):
        if event["type"] in (protocol.STDOUT, protocol.STDERR):
            tail.append(event.get("text", ""))
            del tail[: -args.lines]
        elif event["type"] == protocol.ERROR:
            error = event.get("traceback")
    row.update(source=spec.pop("source", None), spec=spec, log_tail=tail, traceback=error)
    io.print_json(row)
    return 0


def cmd_cancel(root: str, agent_hash: str, args: argparse.Namespace, io: CommandIO) -> int:
    """End the job and every process it started (SIGTERM, SIGKILL after a grace period).

    A job whose log has ended is never signalled; a killed job's leftover
    processes (children adopted by init) are still ended.
    """
    path = jobs.job_dir(root, args.job_id)
    spec = jobs.read_spec(path)
    row = process.job_row(root, path, spec)
    launcher = process.launcher_for(root, spec)
    if row["state"] not in protocol.ACTIVE_STATES:
        leftovers = {}
        if row["state"] == protocol.STATE_KILLED:
            leftovers = launcher.cancel(path, spec, args.grace)
        io.print_json({"job_id": args.job_id, "cancelled": False, "state": row["state"], **leftovers})
        return 0
    ended = launcher.cancel(path, spec, args.grace)
    layout.release_copies(root, path)  # a runner killed before its own wind-up left them
    last = jobs.last_event(path)
    if last is None or last["type"] not in protocol.TERMINAL:
        jobs.append_event(path, protocol.CANCELLED, message="cancelled on request (killed after the grace period)")
    jobs.forget_summary(path)
    io.print_json({"job_id": args.job_id, "cancelled": True, "killed": bool(ended.get("killed")), **ended})
    return 0


def cmd_stop(root: str, agent_hash: str, args: argparse.Namespace, io: CommandIO) -> int:
    """Ask the job to stop training at the end of the current batch (the runner turns SIGINT into that)."""
    path = jobs.job_dir(root, args.job_id)
    spec = jobs.read_spec(path)
    requested = False
    if jobs.event_summary(path)["ended"] is None:  # a job whose log has ended is never signalled
        requested = process.launcher_for(root, spec).stop(path, spec)
    io.print_json({"job_id": args.job_id, "stop_requested": requested})
    return 0
