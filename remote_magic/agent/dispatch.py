"""The GPU queue of a host: jobs wait for free GPUs, first come first served, with no client connected.

A job that asks for GPUs is written into ``queue/`` as an entry (its place
is its file name: submit time, then job id).  Whoever holds ``queue/.lock``
decides: ``submit`` runs one round at once (a job whose GPUs are free starts
without delay), and a small detached dispatcher (``agent dispatch``) runs
rounds while anything waits, then exits, like a warm runner.  A round starts
the head of the queue while its GPUs are free (strict FIFO: a large job is
never starved by small ones behind it), records which GPUs each started job
holds (``queue/held/<job>.json``), and tells each waiting job why it waits
and where it stands, as ``queued`` events in its own log (so the panel and a
replay show it).  A GPU is free when no live job of ours holds it and
processes that are not ours use less than ``busy_gpu_memory`` of it.  A job
that ended, or whose runner died, holds nothing.  The trials of a sweep go
through the same queue, on any host, so that no more than its ``parallel``
run at once, also with no client connected.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

from . import bootstrap, gpus, jobs, protocol, runners
from .detach import spawn_detached, untagged_environment

QUEUE_DIR = "queue"
HELD_DIR = "held"
ROUND_SECONDS = 0.25
DEFAULT_BUSY_MIB = 1024


def _queue(root: str) -> str:
    return jobs.ensure_dir(os.path.join(root, QUEUE_DIR))


def _held(root: str) -> str:
    return jobs.ensure_dir(os.path.join(_queue(root), HELD_DIR))


@contextlib.contextmanager
def _locked(path: str, blocking: bool = True) -> Iterator[bool]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, jobs.FILE_MODE)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def _queue_lock(root: str) -> contextlib.AbstractContextManager[bool]:
    return _locked(os.path.join(_queue(root), ".lock"))


def wanted_gpus(spec: dict[str, Any]) -> int | list[int] | None:
    """What the job asks for: a count, ``all`` (-1), exact ids, or None (no GPU wanted)."""
    if spec.get("gpu_ids"):
        return [int(i) for i in spec["gpu_ids"]]
    count = spec.get("gpus")
    if count in (None, 0):
        return None
    return -1 if count == "all" else int(count)


def enqueue(root: str, agent_hash: str, path: str, spec: dict[str, Any]) -> None:
    """Put a job in the host's GPU queue, start what can start now, and keep a dispatcher for the rest."""
    entry = {"job_id": spec["job_id"], "agent": agent_hash, "t": time.time()}
    name = f"{time.time_ns():020d}-{spec['job_id']}.json"
    with _queue_lock(root):
        jobs.atomic_write(os.path.join(_queue(root), name), json.dumps(entry).encode())
        waiting = _round(root)
        if waiting:
            _ensure_dispatcher(root, agent_hash)


def _entries(root: str) -> list[tuple[str, dict[str, Any]]]:
    folder = _queue(root)
    found = []
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                found.append((os.path.join(folder, name), json.load(f)))
        except (OSError, ValueError):
            continue
    return found


def is_queued(root: str, job_id: str) -> bool:
    return any(entry["job_id"] == job_id for _, entry in _entries(root))


def remove(root: str, job_id: str) -> bool:
    """Take a job out of the queue (cancel or stop before it started); whether it was there."""
    with _queue_lock(root):
        for file, entry in _entries(root):
            if entry["job_id"] == job_id:
                jobs.unlink_quietly(file)
                return True
    return False


def _held_records(root: str) -> list[dict[str, Any]]:
    """What the queue started and still runs: job id, its GPUs, its sweep (ended or dead jobs are pruned)."""
    records = []
    folder = _held(root)
    for name in os.listdir(folder):
        file = os.path.join(folder, name)
        try:
            with open(file, encoding="utf-8") as f:
                record = json.load(f)
        except (OSError, ValueError):
            continue
        if not _still_running(root, record):
            jobs.unlink_quietly(file)
            continue
        records.append(record)
    return records


def holdings(root: str) -> dict[int, str]:
    """GPU index -> the id of the live job of ours that holds it."""
    return {int(index): record["job_id"] for record in _held_records(root) for index in record["gpus"]}


def _still_running(root: str, record: dict[str, Any]) -> bool:
    try:
        return runners.still_running(jobs.job_dir(root, record["job_id"]), float(record.get("t") or 0))
    except (OSError, ValueError, jobs.AgentError):
        return False


def _round(root: str) -> int:
    """Start the head of the queue while its GPUs are free; tell the others why they wait. Call under the lock.

    Returns how many jobs still wait.
    """
    entries = _entries(root)
    if not entries:
        return 0
    inventory = gpus.inventory()
    held = holdings(root)
    running = _running_trials(root)
    foreign = others_on_gpus(inventory, _busy_mib(root, entries))
    free = [g.index for g in inventory if g.index not in held and g.index not in foreign]
    waiting = []
    for file, entry in entries:
        path = jobs.job_dir(root, entry["job_id"])
        try:
            spec = jobs.read_spec(path)
        except (OSError, ValueError):
            jobs.unlink_quietly(file)  # collected meanwhile
            continue
        if jobs.event_summary(path)["ended"] is not None:
            jobs.unlink_quietly(file)  # cancelled while it waited
            continue
        sweep = spec.get("sweep") or {}
        full = bool(sweep.get("parallel")) and running.get(sweep["id"], 0) >= sweep["parallel"]
        if full:  # the sweep's own limit: its later trials wait, other jobs go on
            waiting.append((path, spec, entry))
            continue
        wanted = wanted_gpus(spec) if inventory else None
        # Strict FIFO for GPUs: a job waiting for GPUs holds back every job behind it; one waiting only for
        # its sweep's limit does not.
        blocked = any(not _sweep_full(waiting_spec, running) for _, waiting_spec, _ in waiting)
        chosen = None if blocked else _choose(wanted, free, len(inventory))
        if chosen is None:
            waiting.append((path, spec, entry))
            continue
        jobs.unlink_quietly(file)
        free = [i for i in free if i not in chosen]
        if sweep:
            running[sweep["id"]] = running.get(sweep["id"], 0) + 1
        _start(root, entry["agent"], path, spec, chosen if inventory else None)
    for position, (path, spec, _entry) in enumerate(waiting, 1):
        if _sweep_full(spec, running):
            sweep = spec["sweep"]
            reason = f"waiting for a trial of {sweep['id']} to end: it runs {sweep['parallel']} at a time"
        else:
            reason = _why(wanted_gpus(spec), inventory, held, foreign, position)
        _tell(path, reason, position)
    return len(waiting)


def _sweep_full(spec: dict[str, Any], running: dict[str, int]) -> bool:
    sweep = spec.get("sweep") or {}
    return bool(sweep.get("parallel")) and running.get(sweep["id"], 0) >= sweep["parallel"]


def _running_trials(root: str) -> dict[str, int]:
    """Sweep id -> how many of its trials run now (started through the queue and not ended)."""
    counts: dict[str, int] = {}
    for record in _held_records(root):
        if record.get("sweep"):
            counts[record["sweep"]] = counts.get(record["sweep"], 0) + 1
    return counts


def others_on_gpus(inventory: list[gpus.Gpu], busy_mib: int) -> dict[int, list[gpus.GpuProcess]]:
    """GPUs where processes that belong to no job of ours use more than ``busy_mib``: not ours to give."""
    found = gpus.processes(inventory)
    ours = {p.pid for p in found if gpus.job_of(p.pid)}
    return gpus.busy_by_others(inventory, found, ours, busy_mib)


def _busy_mib(root: str, entries: list[tuple[str, dict[str, Any]]]) -> int:
    for _, entry in entries:
        try:
            return int(jobs.read_spec(jobs.job_dir(root, entry["job_id"])).get("busy_gpu_memory") or DEFAULT_BUSY_MIB)
        except (OSError, ValueError, jobs.AgentError):
            continue
    return DEFAULT_BUSY_MIB


def _choose(wanted: int | list[int] | None, free: list[int], total: int) -> list[int] | None:
    """The GPUs to give the job from ``free``, or None when they are not free (yet)."""
    if wanted is None:
        return []
    if isinstance(wanted, list):
        return wanted if all(i in free for i in wanted) else None
    count = total if wanted == -1 else wanted
    return sorted(free)[:count] if len(free) >= count else None


def _why(
    wanted: int | list[int] | None,
    inventory: list[gpus.Gpu],
    held: dict[int, str],
    foreign: dict[int, list[gpus.GpuProcess]],
    position: int,
) -> str:
    """`waiting for 2 GPUs: 0 by job 20261127-..., 1 by another process (pid 4242, 20 GiB)`."""
    if isinstance(wanted, list):
        what, relevant = f"GPU {','.join(map(str, wanted))}", wanted
    else:
        count = len(inventory) if wanted == -1 else wanted or 0
        what, relevant = f"{count} GPU{'s' * (count != 1)}", [g.index for g in inventory]
    by: dict[str, list[int]] = {}  # holder -> the GPUs it holds, so a job holding two is named once
    for index in relevant:
        if index in held:
            by.setdefault(f"job {held[index]}", []).append(index)
        elif index in foreign:
            by.setdefault(", ".join(gpus.describe_holder(p) for p in foreign[index]), []).append(index)
    busy = [f"{','.join(map(str, indices))} by {holder}" for holder, indices in by.items()]
    ahead = f" (behind {position - 1} earlier job{'s' * (position != 2)})" if position > 1 else ""
    return f"waiting for {what}{ahead}" + (f": {', '.join(busy)}" if busy else "")


def _tell(path: str, reason: str, position: int) -> None:
    """A ``queued`` event with why the job waits, when that changed (the job's log is ours until it starts)."""
    last = jobs.last_event(path)
    if last is not None and last.get("reason") == reason and last.get("position") == position:
        return
    if last is not None and last["type"] not in (protocol.QUEUED,):
        return  # it started meanwhile: its runner owns the log now
    log = jobs.EventLog(path)
    try:
        log.append(protocol.QUEUED, reason=reason, position=position)
    finally:
        log.close()
    jobs.forget_summary(path)


def _start(root: str, agent_hash: str, path: str, spec: dict[str, Any], chosen: list[int] | None) -> None:
    held = {
        "job_id": spec["job_id"],
        "gpus": chosen or [],
        "t": time.time(),
        "sweep": (spec.get("sweep") or {}).get("id"),
    }
    jobs.atomic_write(os.path.join(_held(root), f"{spec['job_id']}.json"), json.dumps(held).encode())
    runners.start_runner(root, agent_hash, path, spec, chosen, spec.get("launcher") or "process")


def _ensure_dispatcher(root: str, agent_hash: str) -> None:
    """Start the host's dispatcher unless one runs (it holds ``queue/dispatcher.lock`` for its life)."""
    with _locked(os.path.join(_queue(root), "dispatcher.lock"), blocking=False) as free:
        if not free:
            return
    spawn_detached(
        [sys.executable, "-c", bootstrap.RUN, root, agent_hash, "dispatch"],
        log=os.path.join(_queue(root), "dispatcher.log"),
        cwd=_queue(root),
        env=untagged_environment(),
    )


def serve(root: str) -> int:
    """The dispatcher: rounds until nothing waits.

    It gives up its own lock while it still holds the queue's: a submit that
    queues a job right after this one decided to exit then always finds the
    dispatcher lock free, and starts a new dispatcher.
    """
    mine = os.open(os.path.join(_queue(root), "dispatcher.lock"), os.O_RDWR | os.O_CREAT, jobs.FILE_MODE)
    try:
        fcntl.flock(mine, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(mine)
        return 0  # another one runs
    try:
        while True:
            queue_lock = os.open(os.path.join(_queue(root), ".lock"), os.O_RDWR | os.O_CREAT, jobs.FILE_MODE)
            try:
                fcntl.flock(queue_lock, fcntl.LOCK_EX)
                if _round(root) == 0:
                    os.close(mine)
                    mine = -1
                    return 0
            finally:
                os.close(queue_lock)
            time.sleep(ROUND_SECONDS)
    finally:
        if mine >= 0:
            os.close(mine)
