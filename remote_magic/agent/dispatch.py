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

The queue belongs to the host root (``<root>/queue``) unless the host setting
``queue`` names a folder shared by the host's users (group-writable, setgid):
``<root>/queue`` is then a link to it, every file in it is group-readable,
and each entry and held record says whose it is (uid, user, root).  Each
user's dispatcher starts only that user's jobs (it cannot start anyone
else's) but decides in the one global order: a job of another user at the
head of the queue has its GPUs set aside as if started, and its own
dispatcher starts it.  Another user's job counts as alive while its runner
process does (``/proc``, readable across users); an entry whose owner has no
dispatcher left stops counting after a grace period, so one user's crashed
dispatcher never blocks the others.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import pwd
import shutil
import sys
import time
from collections.abc import Iterator
from typing import Any

from . import bootstrap, gpus, jobs, procs, runners
from .detach import spawn_detached, untagged_environment

QUEUE_DIR = "queue"
HELD_DIR = "held"
ROUND_SECONDS = 0.25
DEFAULT_BUSY_MIB = 1024
SHARED_DIR_MODE = 0o2770  # group-writable; setgid keeps the folder's group on what is created in it
SHARED_FILE_MODE = 0o640  # what another user's dispatcher reads; only the owner changes or removes it


def _queue(root: str) -> str:
    folder = os.path.join(root, QUEUE_DIR)
    if os.path.islink(folder):  # the host's shared queue: never chmod it through the link
        if not os.path.isdir(folder):
            raise jobs.AgentError(_shared_missing(os.readlink(folder)))
        return folder
    return jobs.ensure_dir(folder)


def _shared(root: str) -> bool:
    return os.path.islink(os.path.join(root, QUEUE_DIR))


def _file_mode(root: str) -> int:
    return SHARED_FILE_MODE if _shared(root) else jobs.FILE_MODE


def _held(root: str) -> str:
    folder = os.path.join(_queue(root), HELD_DIR)
    if not _shared(root):
        return jobs.ensure_dir(folder)
    with contextlib.suppress(FileExistsError):
        os.mkdir(folder)
        os.chmod(folder, SHARED_DIR_MODE)
    return folder


def _shared_missing(folder: str) -> str:
    return (
        f"the shared GPU queue folder {folder} (host setting 'queue') does not exist or you cannot write to it; "
        f"ask the host's admin to create it for your group: sudo install -d -m 2770 -g GROUP {folder}"
    )


def use_queue(root: str, folder: str | None) -> None:
    """Make ``<root>/queue`` the queue the host setting names: a link to a shared folder, or our own folder.

    Switching is refused while jobs of ours wait or run in the queue being left.
    """
    link = os.path.join(root, QUEUE_DIR)
    target = os.path.realpath(os.path.expanduser(folder)) if folder else None
    current = os.path.realpath(link) if os.path.islink(link) else None
    if target == current:
        return
    if target is not None and not (os.path.isdir(target) and os.access(target, os.W_OK | os.X_OK)):
        raise jobs.AgentError(_shared_missing(folder or ""))
    if os.path.lexists(link):
        with _queue_lock(root):
            mine = [e for _, e in _entries(root) if _is_mine(e, root)]
            busy = [r for r in _held_records(root) if _is_mine(r, root)]
            if mine or busy:
                raise jobs.AgentError(
                    f"the host setting 'queue' changed while {len(mine)} of your jobs wait and {len(busy)} run "
                    f"in the queue at {os.path.realpath(link)}; let them end (or cancel them) first"
                )
        if os.path.islink(link):
            os.unlink(link)
        else:
            shutil.rmtree(link, ignore_errors=True)
    if target is None:
        jobs.ensure_dir(link)
        return
    with contextlib.suppress(FileExistsError):  # another submit of ours made the same link meanwhile
        os.symlink(target, link)


def _me(root: str) -> dict[str, Any]:
    """Whose an entry or held record is: this user, from this host root."""
    try:
        user = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        user = str(os.getuid())
    return {"uid": os.getuid(), "user": user, "root": os.path.realpath(root)}


def _is_mine(record: dict[str, Any], root: str) -> bool:
    """Records without an owner come from a private queue, which only ever held ours."""
    if "uid" not in record:
        return True
    return record["uid"] == os.getuid() and record.get("root") == os.path.realpath(root)


def _owner_key(record: dict[str, Any]) -> str:
    digest = hashlib.sha256(str(record.get("root")).encode()).hexdigest()[:12]
    return f"{record.get('uid')}-{digest}"


def _dispatcher_file(root: str, record: dict[str, Any] | None = None, suffix: str = ".lock") -> str:
    """Each owner's dispatcher holds its own lock (``.lock``) and says who it is (``.id``), so other users'
    dispatchers can tell whether it still runs."""
    return os.path.join(_queue(root), f"dispatcher-{_owner_key(record or _me(root))}{suffix}")


def _open_lock(root: str, path: str) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, jobs.FILE_MODE)  # flock needs no write access
    if _shared(root):
        with contextlib.suppress(PermissionError):  # made by another user, who set its mode
            os.fchmod(fd, SHARED_FILE_MODE)
    return fd


@contextlib.contextmanager
def _locked(root: str, path: str, blocking: bool = True) -> Iterator[bool]:
    fd = _open_lock(root, path)
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
    return _locked(root, os.path.join(_queue(root), ".lock"))


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
    use_queue(root, spec.get("queue"))
    entry = {
        "job_id": spec["job_id"],
        "agent": agent_hash,
        "t": time.time(),
        "wanted": wanted_gpus(spec),
        "sweep": _sweep_of(spec),
        "busy_mib": spec.get("busy_gpu_memory"),
        **_me(root),
    }
    name = f"{time.time_ns():020d}-{spec['job_id']}.json"
    with _queue_lock(root):
        jobs.atomic_write(os.path.join(_queue(root), name), json.dumps(entry).encode(), mode=_file_mode(root))
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
    return any(entry["job_id"] == job_id and _is_mine(entry, root) for _, entry in _entries(root))


def remove(root: str, job_id: str) -> bool:
    """Take a job out of the queue (cancel or stop before it started); whether it was there."""
    with _queue_lock(root):
        for file, entry in _entries(root):
            if entry["job_id"] == job_id and _is_mine(entry, root):
                jobs.unlink_quietly(file)
                return True
    return False


def _held_records(root: str) -> list[dict[str, Any]]:
    """What the queue started and still runs: job id, its GPUs, its sweep, whose (our ended jobs are pruned)."""
    records = []
    folder = _held(root)
    for name in os.listdir(folder):
        file = os.path.join(folder, name)
        try:
            with open(file, encoding="utf-8") as f:
                record = json.load(f)
        except (OSError, ValueError):
            continue
        if not _is_mine(record, root):
            if _runs_elsewhere(record):
                records.append(record)
            continue  # its owner prunes it
        if not _still_running(root, record):
            jobs.unlink_quietly(file)
            continue
        records.append(record)
    return records


def holdings(root: str) -> dict[int, dict[str, Any]]:
    """GPU index -> the held record of the live job that holds it (ours, or another user's)."""
    return {int(index): record for record in _held_records(root) for index in record["gpus"]}


def holder(record: dict[str, Any], root: str) -> str:
    """``job <id>``, with the user for another user's job."""
    return f"job {record['job_id']}" + ("" if _is_mine(record, root) else f" of {record.get('user')}")


def _still_running(root: str, record: dict[str, Any]) -> bool:
    try:
        return runners.still_running(jobs.job_dir(root, record["job_id"]), float(record.get("t") or 0))
    except (OSError, ValueError, jobs.AgentError):
        return False


def _runs_elsewhere(record: dict[str, Any]) -> bool:
    """Another user's job: its job folder is closed to us, its runner process is not."""
    identity = procs.ProcessIdentity.from_json(record.get("identity"))
    if identity is None:
        return time.time() - float(record.get("t") or 0) < runners.START_GRACE_SECONDS
    return procs.is_running(identity)


def _counts(root: str, entry: dict[str, Any]) -> bool:
    """Whether another user's entry still takes its place: its dispatcher runs, or it was queued just now.

    Read from the dispatcher's record, never by trying its lock: holding that lock even for a moment could
    make the owner's dispatcher, starting at that moment, believe another one runs and exit.
    """
    if time.time() - float(entry.get("t") or 0) < runners.START_GRACE_SECONDS:
        return True
    try:
        with open(_dispatcher_file(root, entry, ".id"), encoding="utf-8") as f:
            identity = procs.ProcessIdentity.from_json(json.load(f))
    except (OSError, ValueError):
        return False
    return identity is not None and procs.is_running(identity)


def _round(root: str) -> int:
    """Start the head of the queue while its GPUs are free; tell the others why they wait. Call under the lock.

    Goes through every user's entries in the one order, starting only ours.
    Returns how many of ours still wait.
    """
    entries = [(file, entry) for file, entry in _entries(root) if _is_mine(entry, root) or _counts(root, entry)]
    if not any(_is_mine(entry, root) for _, entry in entries):
        return 0
    inventory = gpus.inventory()
    records = _held_records(root)
    held = {int(index): holder(record, root) for record in records for index in record["gpus"]}
    running = _running_trials(records)
    foreign = others_on_gpus(inventory, _busy_mib(entries))
    free = [g.index for g in inventory if g.index not in held and g.index not in foreign]
    waiting: list[tuple[str | None, dict[str, Any]]] = []  # (our job's folder, entry); None: another user's
    for file, entry in entries:
        path = None
        if _is_mine(entry, root):
            path = jobs.job_dir(root, entry["job_id"])
            try:
                spec = jobs.read_spec(path)
            except (OSError, ValueError):
                jobs.unlink_quietly(file)  # collected meanwhile
                continue
            if jobs.event_summary(path)["ended"] is not None:
                jobs.unlink_quietly(file)  # cancelled while it waited
                continue
            if "wanted" not in entry:  # queued by an agent before entries said what they want
                entry = {**entry, "wanted": wanted_gpus(spec), "sweep": _sweep_of(spec)}
        if _sweep_full(entry, running):  # the sweep's own limit: its later trials wait, other jobs go on
            waiting.append((path, entry))
            continue
        wanted = entry["wanted"] if inventory else None
        # Strict FIFO for GPUs: a job waiting for GPUs holds back every job behind it; one waiting only for
        # its sweep's limit does not.
        blocked = any(not _sweep_full(waiting_entry, running) for _, waiting_entry in waiting)
        chosen = None if blocked else _choose(wanted, free, len(inventory))
        if chosen is None:
            waiting.append((path, entry))
            continue
        free = [i for i in free if i not in chosen]  # another user's job: set aside for its own dispatcher
        if entry.get("sweep"):
            running[entry["sweep"]["id"]] = running.get(entry["sweep"]["id"], 0) + 1
        if path is not None:
            jobs.unlink_quietly(file)
            _start(root, entry["agent"], path, spec, chosen if inventory else None)
    for position, (path, entry) in enumerate(waiting, 1):
        if path is None:
            continue
        if _sweep_full(entry, running):
            sweep = entry["sweep"]
            reason = f"waiting for a trial of {sweep['id']} to end: it runs {sweep['parallel']} at a time"
        else:
            reason = _why(entry["wanted"], inventory, held, foreign, position)
        jobs.tell_waiting(path, reason, position)
    return sum(path is not None for path, _ in waiting)


def _sweep_of(spec: dict[str, Any]) -> dict[str, Any] | None:
    sweep = spec.get("sweep") or {}
    return {"id": sweep["id"], "parallel": sweep.get("parallel")} if sweep else None


def _sweep_full(entry: dict[str, Any], running: dict[str, int]) -> bool:
    sweep = entry.get("sweep") or {}
    return bool(sweep.get("parallel")) and running.get(sweep["id"], 0) >= sweep["parallel"]


def _running_trials(records: list[dict[str, Any]]) -> dict[str, int]:
    """Sweep id -> how many of its trials run now (started through the queue and not ended)."""
    counts: dict[str, int] = {}
    for record in records:
        if record.get("sweep"):
            counts[record["sweep"]] = counts.get(record["sweep"], 0) + 1
    return counts


def others_on_gpus(inventory: list[gpus.Gpu], busy_mib: int) -> dict[int, list[gpus.GpuProcess]]:
    """GPUs where processes that belong to no job of ours use more than ``busy_mib``: not ours to give."""
    found = gpus.processes(inventory)
    ours = {p.pid for p in found if gpus.job_of(p.pid)}
    return gpus.busy_by_others(inventory, found, ours, busy_mib)


def _busy_mib(entries: list[tuple[str, dict[str, Any]]]) -> int:
    """The head job's ``busy_gpu_memory`` (a host setting, so every job of a host normally says the same)."""
    for _, entry in entries:
        if entry.get("busy_mib") is not None:
            return int(entry["busy_mib"])
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
            by.setdefault(held[index], []).append(index)
        elif index in foreign:
            by.setdefault(", ".join(gpus.describe_holder(p) for p in foreign[index]), []).append(index)
    busy = [f"{','.join(map(str, indices))} by {holder}" for holder, indices in by.items()]
    ahead = f" (behind {position - 1} earlier job{'s' * (position != 2)})" if position > 1 else ""
    return f"waiting for {what}{ahead}" + (f": {', '.join(busy)}" if busy else "")


def _start(root: str, agent_hash: str, path: str, spec: dict[str, Any], chosen: list[int] | None) -> None:
    """Record the GPUs as held before the runner starts; then add the runner's identity, by which other
    users' dispatchers tell whether it still holds them."""
    held = {
        "job_id": spec["job_id"],
        "gpus": chosen or [],
        "t": time.time(),
        "sweep": (spec.get("sweep") or {}).get("id"),
        **_me(root),
    }
    file, mode = os.path.join(_held(root), f"{spec['job_id']}.json"), _file_mode(root)
    jobs.atomic_write(file, json.dumps(held).encode(), mode=mode)
    identity = runners.start_runner(root, agent_hash, path, spec, chosen, spec.get("launcher") or "process")
    if _shared(root) and identity is not None:
        jobs.atomic_write(file, json.dumps({**held, "identity": identity.to_json()}).encode(), mode=mode)


def _ensure_dispatcher(root: str, agent_hash: str) -> None:
    """Start the host's dispatcher unless one runs (it holds ``queue/dispatcher-<owner>.lock`` for its life)."""
    with _locked(root, _dispatcher_file(root), blocking=False) as free:
        if not free:
            return
    spawn_detached(
        [sys.executable, "-c", bootstrap.RUN, root, agent_hash, "dispatch"],
        log=os.path.join(root, "dispatcher.log"),  # ours alone, also with a shared queue
        cwd=_queue(root),
        env=untagged_environment(),
    )


def serve(root: str) -> int:
    """The dispatcher: rounds until nothing waits.

    It gives up its own lock while it still holds the queue's: a submit that
    queues a job right after this one decided to exit then always finds the
    dispatcher lock free, and starts a new dispatcher.
    """
    mine = _open_lock(root, _dispatcher_file(root))
    try:
        fcntl.flock(mine, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(mine)
        return 0  # another one runs
    identity = procs.identity_of(os.getpid())
    if identity is not None:
        record = json.dumps(identity.to_json()).encode()
        jobs.atomic_write(_dispatcher_file(root, suffix=".id"), record, mode=_file_mode(root))
    try:
        while True:
            queue_lock = _open_lock(root, os.path.join(_queue(root), ".lock"))
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
