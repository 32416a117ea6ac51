"""A job on the host: its folder, its spec, its launch record and its event log (the single source of truth).

Layout under the root (default ``~/.remote_magic``, mode 0700); blobs are ``store/blobs.py``'s::

    jobs/<job_id>/spec.json   what was asked
    jobs/<job_id>/inputs.pkl  the pickle that references blobs
    jobs/<job_id>/events.jsonl
    jobs/<job_id>/outputs.pkl

Every file others read is written atomically (``disk.py``); files are
0600 in 0700 folders because they hold the user's data and code.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from typing import IO, Any

from . import disk, protocol


class AgentError(Exception):
    """A problem the agent reports to the client as a one-line message."""


def read_launch(path: str) -> dict[str, Any] | None:
    """The job's launch record (``launch.json``): how its runner was started, and which process it is."""
    try:
        with open(os.path.join(path, protocol.LAUNCH_FILE), encoding="utf-8") as f:
            record = json.load(f)
        return record if isinstance(record, dict) else None
    except (OSError, ValueError):
        return None


def write_launch(path: str, launcher: str, identity: dict[str, Any] | None = None, **extra: Any) -> None:
    """Record how the job's runner was started (``identity``: its process, as ``ProcessIdentity.to_json``)."""
    record = {"launcher": launcher, "identity": identity, "host": socket.gethostname(), **extra}
    disk.atomic_write(os.path.join(path, protocol.LAUNCH_FILE), json.dumps(record).encode())


def jobs_dir(root: str) -> str:
    return disk.ensure_dir(os.path.join(root, "jobs"))


def job_dir(root: str, job_id: str) -> str:
    problem = protocol.job_id_problem(job_id)
    if problem:
        raise AgentError(problem)
    path = os.path.join(jobs_dir(root), job_id)
    if not os.path.isdir(path):
        raise AgentError(f"no job {job_id} on this host (see `%remote_status`)")
    return path


def new_job_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def create_job(root: str, spec: dict[str, Any], inputs: bytes) -> tuple[str, dict[str, Any]]:
    """Make the job directory with its spec, inputs and first event; its path and the spec as stored."""
    parent = jobs_dir(root)
    for _ in range(10):
        job_id = new_job_id()
        path = os.path.join(parent, job_id)
        try:
            os.mkdir(path, disk.DIR_MODE)
            break
        except FileExistsError:
            continue
    else:
        raise AgentError("could not allocate a job id")
    spec = {**spec, "job_id": job_id, "submitted": time.time(), "schema": protocol.SCHEMA_VERSION}
    disk.atomic_write(os.path.join(path, protocol.SPEC_FILE), json.dumps(spec).encode())
    disk.atomic_write(os.path.join(path, protocol.INPUTS_FILE), inputs)
    log = EventLog(path)
    log.append(protocol.QUEUED, name=spec.get("name"), schema=protocol.SCHEMA_VERSION)
    log.close()
    return path, spec


def read_spec(path: str) -> dict[str, Any]:
    with open(os.path.join(path, protocol.SPEC_FILE), encoding="utf-8") as f:
        return json.load(f)


class EventLog:
    """Appends events to a job's events.jsonl with consecutive ``seq`` numbers.

    Only one process writes a job's log at a time: ``submit`` writes the
    first event, then the runner owns it; ``cancel`` writes only after the
    runner is gone.  The runner also keeps the job's summary as it goes and
    writes it beside the log when the job ends, so listings never re-read a
    finished job's whole log.
    """

    def __init__(self, path: str) -> None:
        self.folder = path
        self.path = os.path.join(path, protocol.EVENTS_FILE)
        last = last_event(path)
        self.next_seq = 0 if last is None else last["seq"] + 1
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, disk.FILE_MODE)
        self._file = os.fdopen(fd, "a", encoding="utf-8")
        self.summary: EventSummary | None = None

    def append(self, type_: str, **fields: Any) -> dict[str, Any]:
        event = protocol.make_event(self.next_seq, type_, **fields)
        self._file.write(protocol.encode_event(event))
        self._file.flush()
        if type_ in protocol.TERMINAL:
            os.fsync(self._file.fileno())
        self.next_seq += 1
        if self.summary is not None:
            self.summary.feed(event)
        return event

    def write_summary(self) -> None:
        """Leave the summary of an ended job beside its log (only once its final event is written)."""
        if self.summary is not None and self.summary.ended:
            disk.atomic_write(
                os.path.join(self.folder, protocol.SUMMARY_FILE), json.dumps(self.summary.fields).encode()
            )

    def close(self) -> None:
        self._file.close()


# ------------------------------------------------------------ reading events
_BAD_LINES_LOGGED: set[tuple[str, str]] = set()
_BAD_LINES_LOCK = threading.Lock()
AGENT_LOG = "agent.log"
AGENT_LOG_LIMIT = 1024 * 1024


def parse_event(line: str | bytes, path: str) -> dict[str, Any] | None:
    """One event of a job's log, or None (logged once) for a line that is not an event.

    A damaged line (a disk error, a hand edit) must not make the whole job,
    or the whole host's listing, unreadable.
    """
    try:
        event = protocol.decode_event(line)
        if isinstance(event, dict) and isinstance(event.get("seq"), int) and isinstance(event.get("type"), str):
            return event
    except ValueError:
        pass
    text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
    key = (path, text[:200])
    with _BAD_LINES_LOCK:
        if key in _BAD_LINES_LOGGED or len(_BAD_LINES_LOGGED) > 1000:
            return None
        _BAD_LINES_LOGGED.add(key)
    log_problem(
        os.path.dirname(os.path.dirname(path)), f"skipped a line that is not an event in {path}: {text[:200]!r}"
    )
    return None


def log_problem(root: str, message: str) -> None:
    """One line in the host root's agent.log (kept under about a megabyte)."""
    log = os.path.join(root, AGENT_LOG)
    with contextlib.suppress(OSError):
        if os.path.exists(log) and os.path.getsize(log) > AGENT_LOG_LIMIT:
            os.replace(log, log + ".1")
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, disk.FILE_MODE)
        with os.fdopen(fd, "a", encoding="utf-8") as f:
            f.write(time.strftime("%Y-%m-%d %H:%M:%S ") + message + "\n")


def iter_events(path: str, from_seq: int = 0) -> Iterator[tuple[dict[str, Any], str]]:
    """(event, raw line) of the complete lines in a job's log, from ``from_seq``; bad lines skipped.

    Reads line by line: a log of any size costs one line of memory.
    """
    try:
        f = open(os.path.join(path, protocol.EVENTS_FILE), "rb")
    except FileNotFoundError:
        return
    with f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break  # a line being written right now; the next read gets it whole
            event = parse_event(raw, path)
            if event is not None and event["seq"] >= from_seq:
                yield event, raw.decode("utf-8", "replace")


class EventTail:
    """Reads a job's events.jsonl incrementally, complete lines only, a bounded chunk at a time."""

    CHUNK = 1024 * 1024

    def __init__(self, path: str) -> None:
        self.folder = path
        self.path = os.path.join(path, protocol.EVENTS_FILE)
        self._file: IO[bytes] | None = None
        self._partial = b""

    def __enter__(self) -> EventTail:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()

    def _open(self) -> IO[bytes] | None:
        if self._file is None:
            try:
                self._file = open(self.path, "rb")
            except FileNotFoundError:
                return None
        return self._file

    def has_unread(self) -> bool:
        f = self._open()
        if f is None:
            return False
        return os.fstat(f.fileno()).st_size > f.tell()

    def read_events(self) -> list[tuple[dict[str, Any], str]]:
        """The complete events written since the last call (at most about ``CHUNK`` bytes of them)."""
        f = self._open()
        if f is None:
            return []
        data = self._partial + f.read(self.CHUNK)
        *lines, self._partial = data.split(b"\n")
        events = []
        for raw in lines:
            event = parse_event(raw, self.folder)
            if event is not None:
                events.append((event, raw.decode("utf-8", "replace") + "\n"))
        return events


def last_event(path: str) -> dict[str, Any] | None:
    """The last event of a job's log, read from its end (a long log is not read whole)."""
    try:
        f = open(os.path.join(path, protocol.EVENTS_FILE), "rb")
    except FileNotFoundError:
        return None
    with f:
        end = f.seek(0, os.SEEK_END)
        block, tail = 64 * 1024, b""
        position = end
        while position > 0:
            step = min(block, position)
            position -= step
            f.seek(position)
            tail = f.read(step) + tail
            lines = tail.split(b"\n")
            complete = lines[1:-1] if position > 0 else lines[:-1]  # the first may be cut, the last unfinished
            for raw in reversed(complete):
                event = parse_event(raw, path) if raw.strip() else None
                if event is not None:
                    return event
            tail = lines[0] if position > 0 else b""
            if len(tail) > 64 * 1024 * 1024:
                break  # one absurd line: give up rather than hold it all
    return None


class EventSummary:
    """A job's status fields from its events, fed one event at a time (never the whole log twice)."""

    def __init__(self) -> None:
        self.fields: dict[str, Any] = {**protocol.event_fields(), "last_seq": -1}

    @property
    def ended(self) -> bool:
        return self.fields["ended"] is not None

    def feed(self, event: dict[str, Any]) -> None:
        f, kind = self.fields, event["type"]
        f["last_seq"] = event["seq"]
        if kind == protocol.QUEUED:
            f["reason"] = event.get("reason")
        elif kind in (protocol.STARTED, protocol.RESUMED):
            f.update(state=protocol.STATE_RUNNING, started=event["t"], pid=event.get("pid"), reason=None)
            f.update(device=event.get("device"), where=event.get("host"))
        elif kind == protocol.REQUEUED:
            f.update(state=protocol.STATE_REQUEUED, reason=event.get("reason"))
        elif kind == protocol.TRAIN_BEGIN:
            f["epochs"] = event.get("epochs")
        elif kind == protocol.EPOCH:
            f.update(epoch=event.get("epoch"), logs=event.get("logs", {}))
        elif kind in protocol.TERMINAL:
            f.update(state=protocol.final_state(event), ended=event["t"], message=event.get("message"))


_SUMMARIES: dict[str, tuple[int, int, EventSummary]] = {}
_SUMMARIES_LOCK = threading.Lock()


def event_summary(path: str) -> dict[str, Any]:
    """The summary of a job's events so far.

    A finished job's runner left ``summary.json``; otherwise this process
    remembers how far it read each log and reads only what was appended
    since (the sidebar asks every few seconds).
    """
    try:
        with open(os.path.join(path, protocol.SUMMARY_FILE), encoding="utf-8") as f:
            fields = json.load(f)
        if isinstance(fields, dict):
            return fields
    except (OSError, ValueError):
        pass
    events = os.path.join(path, protocol.EVENTS_FILE)
    try:
        inode = os.stat(events).st_ino
    except FileNotFoundError:
        return EventSummary().fields
    with _SUMMARIES_LOCK:
        cached = _SUMMARIES.get(path)
    offset, summary = (cached[1], cached[2]) if cached and cached[0] == inode else (0, EventSummary())
    if os.path.getsize(events) < offset:  # the log is append-only; a shorter one was replaced: read it anew
        offset, summary = 0, EventSummary()
    with open(events, "rb") as f:
        f.seek(offset)
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            offset += len(raw)
            event = parse_event(raw, path)
            if event is not None:
                summary.feed(event)
    with _SUMMARIES_LOCK:
        _SUMMARIES[path] = (inode, offset, summary)
    return dict(summary.fields)


def forget_summary(path: str) -> None:
    with _SUMMARIES_LOCK:
        _SUMMARIES.pop(path, None)


def append_event(path: str, type_: str, **fields: Any) -> None:
    """One event from outside the runner (a launcher, the queue, a cancel): only while no runner writes the log."""
    log = EventLog(path)
    try:
        log.append(type_, **fields)
    finally:
        log.close()
    forget_summary(path)


def tell_waiting(path: str, reason: str, position: int | None, every: float = 0.0) -> None:
    """A ``queued`` event saying why the job waits, when that changed; never once the job started or ended.

    ``every``: a reason that keeps changing (in a shared queue, other users'
    jobs come and go) adds at most one line this often, so the log grows
    with the job's state, not with noise; moving up the queue is told at once.
    """
    last = last_event(path)
    if last is not None and last["type"] not in (protocol.QUEUED, protocol.REQUEUED):
        return  # it started meanwhile: its runner owns the log now
    if last is not None and last.get("reason") == reason and last.get("position") == position:
        return
    if last is not None and last.get("reason") and time.time() - float(last.get("t") or 0) < every:
        moved_up = position is not None and isinstance(last.get("position"), int) and position < last["position"]
        if not moved_up:
            return
    append_event(path, protocol.QUEUED, reason=reason, position=position)


def read_checkpoint_meta(path: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(path, protocol.CHECKPOINT_DIR, protocol.CHECKPOINT_META), encoding="utf-8") as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return None


def job_paths(root: str) -> list[str]:
    """Every job folder with a spec, oldest id first."""
    parent = jobs_dir(root)
    paths = (os.path.join(parent, name) for name in sorted(os.listdir(parent)) if protocol.is_job_id(name))
    return [p for p in paths if os.path.isfile(os.path.join(p, protocol.SPEC_FILE))]
