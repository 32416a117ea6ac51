"""The GPU queue of a host: jobs wait for free GPUs, first come first served, with no client connected.

A job that asks for GPUs is written into our queue folder as an entry
(queue_folder.py: where the queue lives; queue_records.py: how other users'
records are read).  Whoever holds the queue's lock decides: ``submit`` runs one round at
once (a job whose GPUs are free starts without delay), and a small detached
dispatcher (``agent dispatch``) runs rounds while anything of ours waits,
then exits, like a warm runner.  A round starts the head of the queue while
its GPUs are free (strict FIFO: a large job is never starved by small ones
behind it), records which GPUs each started job holds (``held/<job>.json``),
and tells each waiting job why it waits and where it stands, as ``queued``
events in its own log.  A GPU is free when no live job holds it and
processes that are not ours use less than our ``busy_gpu_memory`` of it.
The trials of a sweep go through the same queue, on any host, so that no
more than its ``parallel`` run at once, also with no client connected.

In a queue shared by a host's users, each user's dispatcher starts only that
user's jobs, from the private spec in that user's root (nothing read from
the shared folder is run or used as a path), but decides in the one global
order: another user's entry at the head has its GPUs set aside, and its own
dispatcher starts it.  That order cannot be gamed (``Order``): an entry is
placed by its ctime, never earlier than this root's previous look at the
queue, and one that stopped counting and counts again goes to the back.  An
entry counts while its owner's dispatcher runs, or for the grace period
after it was written; a user whose entries had GPUs set aside for the grace
period without any of them starting stops counting until one does.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from .. import bootstrap, disk, jobs, procs, protocol
from ..protocol import PROCESS_LAUNCHER, GpuRequest
from . import gpus, queue_folder, queue_records, start
from .detach import spawn_detached, untagged_environment
from .queue_records import Entry, Held, Member

DISPATCHER_LOCK = "dispatcher.lock"  # in the private root: nobody else can open it, so nobody can hold it
ORDER_FILE = "queue.order.json"  # in the private root: what this root saw of other users' entries
ROUND_SECONDS = 0.25
DEFAULT_BUSY_MIB = 1024
MAX_FAILED_ROUNDS = 20
WAITING_EVENT_SECONDS = 10.0  # a waiting job's reason is logged at most this often, unless it moved up
_AGENT_HASH = re.compile(r"[0-9a-f]{8,64}")


def enqueue(root: str, agent_hash: str, path: str, spec: dict[str, Any]) -> None:
    """Put a job in the host's GPU queue, start what can start now, and keep a dispatcher for the rest.

    The entry says only what other users may know: the job, the GPUs it wants, its sweep.
    """
    queue_folder.use_queue(root, spec.get("queue"))
    sweep = _sweep_of(spec)
    entry = {
        "job_id": spec["job_id"],
        "wanted": queue_records.wanted_record(GpuRequest.from_spec(spec)),
        "sweep": {"id": sweep[0], "parallel": sweep[1]} if sweep else None,
        "uid": os.getuid(),
        "user": queue_records.user_name(os.getuid()),
    }
    name = f"{time.time_ns():020d}-{spec['job_id']}.json"
    with queue_folder.queue_lock(root):
        file = os.path.join(queue_folder.own(root), name)
        disk.atomic_write(file, json.dumps(entry).encode(), mode=queue_folder.file_mode(root))
        waiting = _round(root, agent_hash)
    if waiting:
        _ensure_dispatcher(root, agent_hash)


def is_queued(root: str, job_id: str) -> bool:
    return any(entry.job_id == job_id for entry in queue_folder.own_entries(root))


def remove(root: str, job_id: str) -> bool:
    """Take a job out of the queue (cancel or stop before it started); whether it was there."""
    with queue_folder.queue_lock(root):
        for entry in queue_folder.own_entries(root):
            if entry.job_id == job_id:
                disk.unlink_quietly(entry.file)
                return True
    return False


def holdings(root: str) -> dict[int, Held]:
    """GPU index -> the held record of the live job that holds it (ours, or another user's)."""
    records = queue_folder.held_records(root, queue_folder.members(root))
    return {index: record for record in records for index in record.gpus}


def holder(record: Held, root: str) -> str:
    """``job <id>`` for ours; ``a job of <user>`` (the record file's owner) for another user's.

    Another user's job id is left out: it is theirs to change, and a waiting job's reason is logged each time it
    changes.
    """
    return f"job {record.job_id}" if record.mine else f"a job of {queue_records.user_name(record.uid)}"


# -- the order of other users' entries -------------------------------------------------------------------------


@dataclass
class Order:
    """What this root saw of other users' entries, kept between rounds (and processes) in ``ORDER_FILE``.

    ``placed``: entry key -> [time it is ordered by, whether it counted when last seen].  A key never seen is
    placed at its ctime but never before ``last_look`` (an entry written earlier would have been seen then:
    one renamed in later cannot claim an old place); one seen not counting that counts now goes to the back.
    ``set_aside``: uid -> [when GPUs were first set aside for one of its entries, that entry's key]; cleared
    once that entry has left its owner's folder (started, or taken back).  While it stays past the grace
    period, none of that user's entries count: a held record cannot vouch for it, only its leaving.
    """

    last_look: float = 0.0
    placed: dict[str, list[Any]] = field(default_factory=dict)
    set_aside: dict[str, list[Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, root: str) -> Order:
        try:
            with open(os.path.join(root, ORDER_FILE), encoding="utf-8") as f:
                data = json.load(f)
            return cls(float(data["last_look"]), dict(data["placed"]), dict(data["set_aside"]))
        except (OSError, ValueError, KeyError, TypeError):
            return cls()

    def save(self, root: str) -> None:
        data = {"last_look": self.last_look, "placed": self.placed, "set_aside": self.set_aside}
        disk.atomic_write(os.path.join(root, ORDER_FILE), json.dumps(data).encode(), durable=False)

    def place(self, members: list[Member], now: float) -> list[tuple[float, Entry]]:
        """The entries of other users that count now, each with the time it is ordered by."""
        by_user: dict[int, list[Member]] = {}
        for member in members:
            by_user.setdefault(member.uid, []).append(member)
        self.set_aside = {uid: aside for uid, aside in self.set_aside.items() if int(uid) in by_user}
        placed: dict[str, list[Any]] = {}
        found = []
        for uid, folders in by_user.items():
            no_show = self._no_show(uid, folders, now)
            for owner, entry in ((member, entry) for member in folders for entry in member.entries):
                key = _key(entry)
                counting = not no_show and (owner.dispatcher_alive or queue_folder.recent(entry.written_ns))
                before = self.placed.get(key)
                if before is None:
                    at = max(entry.written_ns / 1e9, self.last_look)
                elif counting and not before[1]:
                    at = now  # it stopped counting, and counts again: behind everyone who waited meanwhile
                else:
                    at = before[0]
                placed[key] = [at, counting]
                if counting:
                    found.append((at, entry))
        self.placed, self.last_look = placed, now
        return found

    def _no_show(self, uid: int, folders: list[Member], now: float) -> bool:
        """Whether a user's entries had GPUs set aside for the grace period, and the one they were set aside for
        did not start (a user with nothing waiting starts afresh)."""
        aside = self.set_aside.get(str(uid))
        if aside is None:
            return False
        if all(_key(entry) != aside[1] for member in folders for entry in member.entries):
            del self.set_aside[str(uid)]  # it left: started, or taken back
            return False
        return now - aside[0] > queue_folder.stale_seconds()

    def setting_aside(self, entry: Entry, now: float) -> None:
        self.set_aside.setdefault(str(entry.uid), [now, _key(entry)])


def _key(entry: Entry) -> str:
    """One written entry: a rewrite (new inode or ctime) is another, placed anew."""
    return f"{entry.uid}:{entry.inode}:{entry.written_ns}"


def _possible(wanted: GpuRequest, inventory: list[gpus.Gpu]) -> bool:
    """Whether another user's entry could ever start on this host: one that cannot must not block anyone."""
    if wanted.ids:
        return all(index < len(inventory) for index in wanted.ids)
    return wanted.count <= len(inventory)


# -- a round --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Waiting:
    """An entry in a round's order, with what it asks: ours from our private spec (``job``: its folder and
    spec), another user's from its record (``job`` None)."""

    entry: Entry
    wanted: GpuRequest
    sweep: tuple[str, int] | None
    job: tuple[str, dict[str, Any]] | None = None


@dataclass
class _Gpus:
    """The host's GPUs as a round sees them: the free ones, who holds the others, and each sweep's running trials."""

    inventory: list[gpus.Gpu]
    held: dict[int, str]  # GPU index -> its holder, in words
    foreign: dict[int, list[gpus.GpuProcess]]
    free: list[int]
    running: dict[tuple[str, str], int]

    @classmethod
    def now(cls, root: str, members: list[Member], busy_mib: int) -> _Gpus:
        inventory = gpus.inventory()
        records = queue_folder.held_records(root, members)
        held = {index: holder(record, root) for record in records for index in record.gpus}
        foreign = others_on_gpus(inventory, busy_mib)
        free = [g.index for g in inventory if g.index not in held and g.index not in foreign]
        return cls(inventory, held, foreign, free, _running_trials(records))

    def sweep_full(self, job: _Waiting) -> bool:
        """The sweep's own limit: its later trials wait, others go on."""
        sweep = job.sweep
        return sweep is not None and sweep[1] > 0 and self.running.get((job.entry.owner, sweep[0]), 0) >= sweep[1]

    def take(self, job: _Waiting) -> list[int] | None:
        """The GPUs the job gets now (no longer free, its sweep's trial counted), or None while they are busy."""
        chosen = _choose(job.wanted if self.inventory else GpuRequest(), self.free, len(self.inventory))
        if chosen is not None:
            self.free = [i for i in self.free if i not in chosen]
            if job.sweep:
                key = (job.entry.owner, job.sweep[0])
                self.running[key] = self.running.get(key, 0) + 1
        return chosen


def _round(root: str, agent_hash: str) -> int:
    """Start the head of the queue while its GPUs are free; tell the others why they wait. Call under the lock.

    Goes through every user's entries in the one order, starting only ours, each from its private spec.
    Returns how many of ours still wait.
    """
    ours = _our_entries(root)
    if not ours:
        return 0
    now, members, order = time.time(), queue_folder.members(root), Order.load(root)
    theirs = [(at, _Waiting(entry, entry.wanted, entry.sweep)) for at, entry in order.place(members, now)]
    state = _Gpus.now(root, members, _busy_mib([job.job[1] for _, job in ours if job.job]))
    waiting: list[_Waiting] = []
    for _, job in sorted(ours + theirs, key=lambda item: (item[0], item[1].entry.uid, item[1].entry.job_id)):
        if job.job is None and not _possible(job.wanted, state.inventory):
            continue
        # Strict FIFO for GPUs: a job waiting for GPUs holds back every job behind it; one waiting only for
        # its sweep's limit does not.
        blocked = state.sweep_full(job) or any(not state.sweep_full(other) for other in waiting)
        chosen = None if blocked else state.take(job)
        if chosen is None:
            waiting.append(job)
        elif job.job is not None:
            disk.unlink_quietly(job.entry.file)
            _start_waiting(root, agent_hash, job.job, chosen if state.inventory else None)
        else:
            order.setting_aside(job.entry, now)  # for its own dispatcher, which should start it within a round
    if members or order.placed:
        order.save(root)
    for position, job in enumerate(waiting, 1):
        if job.job is not None:
            jobs.tell_waiting(job.job[0], _why(job, state, position), position, every=WAITING_EVENT_SECONDS)
    return sum(job.job is not None for job in waiting)


def _our_entries(root: str) -> list[tuple[float, _Waiting]]:
    """Our waiting entries, each with the time it is ordered by; those of jobs collected or ended meanwhile go."""
    found = []
    for entry in queue_folder.own_entries(root):
        try:
            path = jobs.job_dir(root, entry.job_id)
            spec = jobs.read_spec(path)
        except (OSError, ValueError, jobs.AgentError):
            disk.unlink_quietly(entry.file)  # collected meanwhile
            continue
        if jobs.event_summary(path)["ended"] is not None:
            disk.unlink_quietly(entry.file)  # cancelled while it waited
            continue
        try:
            wanted = GpuRequest.from_spec(spec)
        except ValueError as exc:  # an earlier agent's spec this one would refuse: it must not stop the queue
            disk.unlink_quietly(entry.file)
            _never_started(path, f"the GPU queue cannot read the job's GPU request: {exc}")
            continue
        found.append((entry.written_ns / 1e9, _Waiting(entry, wanted, _sweep_of(spec), (path, spec))))
    return found


def _start_waiting(root: str, agent_hash: str, job: tuple[str, dict[str, Any]], chosen: list[int] | None) -> None:
    """Start a job that left the queue; one that cannot start ends here, saying why, not silently."""
    path, spec = job
    try:
        _start(root, _agent_of(spec, agent_hash), path, spec, chosen)
    except (OSError, jobs.AgentError) as e:
        _never_started(path, f"the GPU queue could not start the job: {e}")


def _never_started(path: str, message: str) -> None:
    """A job that left the queue without starting ends with why."""
    jobs.append_event(path, protocol.ERROR, message=message, exc_type="StartError", traceback="", phase="start")


def _agent_of(spec: dict[str, Any], fallback: str) -> str:
    """The agent version that took the job (our private spec says it); the dispatcher's own otherwise."""
    agent = spec.get("agent")
    return agent if isinstance(agent, str) and _AGENT_HASH.fullmatch(agent) else fallback


def _sweep_of(spec: dict[str, Any]) -> tuple[str, int] | None:
    sweep = spec.get("sweep") or {}
    return (sweep["id"], int(sweep.get("parallel") or 0)) if sweep else None


def _running_trials(records: list[Held]) -> dict[tuple[str, str], int]:
    """(owner's folder, sweep id) -> how many of its trials run now: one user's records never count for another's."""
    counts: dict[tuple[str, str], int] = {}
    for record in records:
        if record.sweep:
            counts[(record.owner, record.sweep)] = counts.get((record.owner, record.sweep), 0) + 1
    return counts


def others_on_gpus(inventory: list[gpus.Gpu], busy_mib: int) -> dict[int, list[gpus.GpuProcess]]:
    """GPUs where processes that belong to no job of ours use more than ``busy_mib``: not ours to give."""
    found = gpus.processes(inventory)
    ours = {p.pid for p in found if gpus.job_of(p.pid)}
    return gpus.busy_by_others(inventory, found, ours, busy_mib)


def _busy_mib(specs: list[dict[str, Any]]) -> int:
    """Our own ``busy_gpu_memory`` (a host setting: our first waiting job's), never another user's."""
    for spec in specs:
        if type(spec.get("busy_gpu_memory")) is int:
            return int(spec["busy_gpu_memory"])
    return DEFAULT_BUSY_MIB


def _choose(wanted: GpuRequest, free: list[int], total: int) -> list[int] | None:
    """The GPUs to give the job from ``free``, or None when they are not free (yet)."""
    if wanted.ids:
        return list(wanted.ids) if all(i in free for i in wanted.ids) else None
    count = total if wanted.count == GpuRequest.ALL else wanted.count
    return sorted(free)[:count] if len(free) >= count else None


def _why(job: _Waiting, state: _Gpus, position: int) -> str:
    """`waiting for 2 GPUs: 0 by job 20261127-..., 1 by another process (pid 4242)`.

    No memory figures: the reason is logged each time it changes, and another process's memory moves all the time.
    """
    if state.sweep_full(job):
        return f"waiting for a trial of {job.sweep[0]} to end: it runs {job.sweep[1]} at a time"  # type: ignore[index]
    wanted, inventory = job.wanted, state.inventory
    if wanted.ids:
        what, relevant = f"GPU {','.join(map(str, wanted.ids))}", list(wanted.ids)
    else:
        count = len(inventory) if wanted.count == GpuRequest.ALL else wanted.count
        what, relevant = f"{count} GPU{'s' * (count != 1)}", [g.index for g in inventory]
    by: dict[str, list[int]] = {}  # holder -> the GPUs it holds, so a job holding two is named once
    for index in relevant:
        if index in state.held:
            by.setdefault(state.held[index], []).append(index)
        elif index in state.foreign:
            holders = ", ".join(gpus.describe_holder(p, memory=False) for p in state.foreign[index])
            by.setdefault(holders, []).append(index)
    busy = [f"{','.join(map(str, indices))} by {holder}" for holder, indices in by.items()]
    ahead = f" (behind {position - 1} earlier job{'s' * (position != 2)})" if position > 1 else ""
    return f"waiting for {what}{ahead}" + (f": {', '.join(busy)}" if busy else "")


def _start(root: str, agent_hash: str, path: str, spec: dict[str, Any], chosen: list[int] | None) -> None:
    """Start the job's runner and record the GPUs it holds, with the runner's identity, by which other users'
    dispatchers tell whether it still holds them (a record without one counts for nobody else).

    In a private queue the record is written first, so a runner that dies at once still frees its GPUs; in a
    shared one after the start, still under the queue's lock, so no one else decides in between.
    """
    held = {
        "job_id": spec["job_id"],
        "gpus": chosen or [],
        "sweep": (spec.get("sweep") or {}).get("id"),
        "uid": os.getuid(),
        "user": queue_records.user_name(os.getuid()),
    }
    file, mode = os.path.join(queue_folder.held_folder(root), f"{spec['job_id']}.json"), queue_folder.file_mode(root)
    shared = queue_folder.shared_top(root) is not None
    if not shared:
        disk.atomic_write(file, json.dumps(held).encode(), mode=mode)
    identity = start.start_runner(root, agent_hash, path, spec, chosen, spec.get("launcher") or PROCESS_LAUNCHER)
    if shared:
        record = {**held, "identity": identity.to_json()} if identity is not None else held
        disk.atomic_write(file, json.dumps(record).encode(), mode=mode)


def _ensure_dispatcher(root: str, agent_hash: str) -> None:
    """Start our dispatcher unless one runs (it holds ``<root>/dispatcher.lock`` for its life).

    Isolated (``python -I``: no PYTHONPATH, no user site-packages, no working folder on ``sys.path``) and in our
    private root: nothing a member drops into the shared folder is ever imported.
    """
    with queue_folder.locked(os.path.join(root, DISPATCHER_LOCK), blocking=False) as free:
        if not free:
            return
    spawn_detached(
        [sys.executable, "-I", "-c", bootstrap.RUN, root, agent_hash, "dispatch"],
        log=os.path.join(root, "dispatcher.log"),
        cwd=root,
        env=untagged_environment(),
    )


def serve(root: str, agent_hash: str) -> int:
    """The dispatcher: rounds until nothing of ours waits.

    It gives up its own lock while it still holds the queue's: a submit that
    queues a job right after this one decided to exit then always finds the
    dispatcher lock free, and starts a new dispatcher.  A round that fails
    (a queue folder removed under it) is logged and tried again, a bounded
    number of times in a row.
    """
    mine = os.open(os.path.join(root, DISPATCHER_LOCK), os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, disk.FILE_MODE)
    try:
        fcntl.flock(mine, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(mine)
        return 0  # another one runs
    failures = 0
    try:
        identity = procs.identity_of(os.getpid())
        if identity is not None:
            record = json.dumps(identity.to_json()).encode()
            file = os.path.join(queue_folder.own(root), queue_records.DISPATCHER_ID)
            disk.atomic_write(file, record, mode=queue_folder.file_mode(root))
        while True:
            try:
                with queue_folder.queue_lock(root):
                    if _round(root, agent_hash) == 0:
                        os.close(mine)
                        mine = -1
                        return 0
                failures = 0
            except Exception as e:  # noqa: BLE001  (logged; a dispatcher that dies leaves jobs waiting)
                failures += 1
                jobs.log_problem(root, f"the GPU queue's dispatcher: {e}")
                if failures >= MAX_FAILED_ROUNDS:
                    return 1
                time.sleep(1.0)
            time.sleep(ROUND_SECONDS)
    finally:
        if mine >= 0:
            os.close(mine)
