"""The event schema and file layout shared by the agent and the client.

events.jsonl is the single source of truth for a job: one JSON object per
line, each with a strictly increasing ``seq`` so a client can resume exactly
where it stopped (``attach --from SEQ``).
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from typing import Any, ClassVar

# The launchers a host reports at ``hello``; a job's spec and launch record name the one that runs it.
PROCESS_LAUNCHER, SLURM_LAUNCHER = "process", "slurm"

# Version of the event schema, the spec and the status row.  A client reads
# jobs of this version and older; a job written by a newer agent is refused
# with a message that says to upgrade (see ``newer_schema_problem``).
SCHEMA_VERSION = 2

# The exact form of the ids the agent mints (``jobs.new_job_id``): a job is
# ``YYYYmmdd-HHMMSS-xxxxxx`` (6 hex digits), a sweep the same with ``sweep-``
# in front.  Every place an id enters (magics, server URLs, the agent)
# checks it against these, so an id can never be an option or a path.
# One --fetch brings back at most this much, unless the kernel's environment raises it (both ends read these).
FETCH_MAX_FILES = 10_000
FETCH_MAX_BYTES = 20 << 30  # each file is copied into the host's store before it is sent
FETCH_MAX_FILES_SETTING = "REMOTE_MAGIC_FETCH_MAX_FILES"
FETCH_MAX_BYTES_SETTING = "REMOTE_MAGIC_FETCH_MAX_BYTES"

JOB_ID_PATTERN = r"[0-9]{8}-[0-9]{6}-[0-9a-f]{6}"
SWEEP_ID_PATTERN = r"sweep-[0-9]{8}-[0-9]{6}-[0-9a-f]{6}"
_JOB_ID = re.compile(JOB_ID_PATTERN)
_SWEEP_ID = re.compile(SWEEP_ID_PATTERN)


def is_job_id(text: object) -> bool:
    return isinstance(text, str) and _JOB_ID.fullmatch(text) is not None


def is_sweep_id(text: object) -> bool:
    return isinstance(text, str) and _SWEEP_ID.fullmatch(text) is not None


def job_id_problem(text: object) -> str | None:
    """Why ``text`` is not a job id (a sentence with the fix), or None when it is one."""
    if is_job_id(text):
        return None
    return f"{text!r} is not a job id; job ids look like 20261127-103000-1a2b3c (see `%remote_status`)"


# Event types, in roughly the order a job emits them.
QUEUED = "queued"
STARTED = "started"
STDOUT = "stdout"
STDERR = "stderr"
TRAIN_BEGIN = "train_begin"
BATCH = "batch"
EPOCH = "epoch"
TRAIN_END = "train_end"
WARNING = "warning"
GPU = "gpu"  # a sample of the job's GPUs: utilization and memory, every few seconds
DONE = "done"
ERROR = "error"
CANCELLED = "cancelled"
# A scheduler put the job back in its queue (preemption, node failure) and later ran it again.
REQUEUED = "requeued"
RESUMED = "resumed"
# Synthesised by the agent (never written) when the runner died without a
# terminal event: SIGKILL, out of memory, a host reboot.
LOST = "lost"

TERMINAL = frozenset({DONE, ERROR, CANCELLED, LOST})

# Job states as shown by ``status``.
STATE_QUEUED = "queued"
STATE_RUNNING = "running"
STATE_DONE = "done"
STATE_STOPPED = "stopped"  # done, after a graceful stop request (interrupt or Stop button)
STATE_ERROR = "error"
STATE_CANCELLED = "cancelled"
STATE_KILLED = "killed"
STATE_REQUEUED = "requeued"  # back in a scheduler's queue after preemption; resumes from its checkpoint
# Shown by the client only: the host could not be asked, or no longer has the job.
STATE_UNREACHABLE = "unreachable"
STATE_GONE = "gone"

ACTIVE_STATES = frozenset({STATE_QUEUED, STATE_RUNNING, STATE_REQUEUED})

TERMINAL_STATE = {DONE: STATE_DONE, ERROR: STATE_ERROR, CANCELLED: STATE_CANCELLED, LOST: STATE_KILLED}

# Files in a job directory.
SPEC_FILE = "spec.json"
INPUTS_FILE = "inputs.pkl"
OUTPUTS_FILE = "outputs.pkl"
EVENTS_FILE = "events.jsonl"
PID_FILE = "runner.pid"  # before schema 2: a bare pid, never trusted for signals (it may be reused)
ASSIGNED_FILE = "gpus.json"  # the GPUs the job holds, written before its runner starts
LAUNCH_FILE = "launch.json"  # how the launcher started the job (for processes: pid, start time, boot id)
SUMMARY_FILE = "summary.json"  # written by the runner when the job ends: listings need not read the log
OUTPUT_BLOBS_FILE = "outputs.blobs"  # the output blobs, listed before they are written (gc keeps them)
FETCHED_BLOBS_FILE = "fetched-files.blobs"  # blobs made of the job's files for --fetch (gc keeps them)
RUNNER_LOG = "runner.log"
CANCEL_MARK = "cancel-requested"  # written before a scheduler's cancel: the SIGTERM that follows is not a preemption
FETCHED_MARK = "fetched"  # written when the client fetched the outputs; gc keeps unfetched jobs
CHECKPOINT_DIR = "ckpt"
CHECKPOINT_FILE = "checkpoint.pkl"
CHECKPOINT_META = "checkpoint.json"

# Names the runner defines in every cell's namespace (never sent from the notebook).
RUNNER_NAMES = frozenset({"remote_log"})

# Exit code of the bootstrap when the agent version is not deployed yet.
EXIT_AGENT_MISSING = 75


def final_state(event: dict[str, Any]) -> str:
    """The job state a terminal event leaves: ``stopped`` for a done job that was asked to stop early."""
    if event["type"] == DONE and event.get("stopped"):
        return STATE_STOPPED
    return TERMINAL_STATE[event["type"]]


def newer_schema_problem(schema: object, job_id: str) -> str | None:
    """The refusal for a job written by a newer agent than this client understands, else None.

    Jobs of older schemas stay readable after an upgrade: nothing is lost.
    """
    if isinstance(schema, int) and schema > SCHEMA_VERSION:
        return (
            f"job {job_id} was written by a newer remote_magic (event schema {schema}, this kernel reads up to "
            f"{SCHEMA_VERSION}); upgrade remote_magic here (`pip install -U remote_magic`) to read it"
        )
    return None


# The spec (spec.json): what was asked.  The client sends these keys; the agent adds job_id, submitted, schema, agent,
# and launcher: the one the host chose at submit (an earlier client sent "slurm" itself), kept for the job's life.
# files/modules: [path, digest, size, mode] placed in the job's layout / on its sys.path; cwd: the kernel's
# working directory inside that layout; env: a built environment's key; backend: the job's KERAS_BACKEND;
# gpus: a count or "all", gpu_ids: exact GPUs (the host's queue gives them); busy_gpu_memory: MiB a foreign
# process may use on a GPU that still counts as free; queue: the host's GPU queue folder when its users share
# one (host setting); sweep: {"id", "trial", "parallel", "params"} of a sweep's
# trial (the host runs at most ``parallel`` trials of one sweep at once); cells: {label: [source, "name:first line"...]}
# of the notebook cells whose functions travel pickled, so a traceback through them reads ``Cell In[2], line 7``.
SPEC_KEYS = frozenset(
    {
        "source", "name", "inputs", "outputs", "checkpoint_every", "warm", "blobs", "client",
        "workdir", "files", "modules", "cwd", "env", "backend", "gpus", "gpu_ids", "busy_gpu_memory", "queue",
        "sweep", "slurm", "changed_inputs", "cells",
    }
)  # fmt: skip


def event_fields() -> dict[str, Any]:
    """The status fields a job's events decide, before any event: filled in by jobs.EventSummary.

    ``state`` stays None until the job started or ended: until then its launcher's phase decides.
    """
    return {
        "state": None,
        "reason": None,
        "where": None,
        "epoch": None,
        "epochs": None,
        "logs": {},
        "started": None,
        "ended": None,
        "message": None,
        "pid": None,
        "device": None,
    }


def status_row(spec: dict[str, Any]) -> dict[str, Any]:
    """A job's row in ``status`` before any event is read: every field a listing shows, with its default.

    ``launcher``: the launcher's own word for the job's phase (a scheduler's
    state name, ``process``); ``reason``/``position``: why and where a queued
    job waits; ``where``: the node or host it runs on; ``title``: the name,
    else the cell's first statement (a readable title for an unnamed job);
    ``sweep``: the sweep a trial belongs to, its number and parameters.
    """
    return {
        **event_fields(),
        "job_id": spec["job_id"],
        "name": spec.get("name"),
        "title": spec.get("name") or first_statement(spec.get("source") or ""),
        "sweep": spec.get("sweep"),
        "schema": spec.get("schema", 1),
        "submitted": spec.get("submitted"),
        "state": STATE_QUEUED,
        "launcher": None,
        "position": None,
        "checkpoint": None,
        "fetched": False,
    }


def first_statement(source: str, limit: int = 60) -> str:
    """The cell's first line of code (comments and magics skipped), cut to ``limit`` characters."""
    for line in source.splitlines():
        text = line.strip()
        if text and not text.startswith(("#", "%")):
            return text if len(text) <= limit else text[: limit - 1] + "…"
    return ""


def make_event(seq: int, type_: str, **fields: Any) -> dict[str, Any]:
    """Build an event with the mandatory header fields first."""
    return {"seq": seq, "t": round(time.time(), 3), "type": type_, **fields}


def encode_event(event: dict[str, Any]) -> str:
    """One line of events.jsonl; non-JSON values (numpy floats) become floats or text."""
    return json.dumps(event, default=_json_default, separators=(",", ":")) + "\n"


def decode_event(line: str | bytes) -> dict[str, Any]:
    return json.loads(line)


def _json_default(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def default_backend() -> str:
    """The Keras backend a process here gets without importing keras (both ends: a host's runner kinds, a
    kernel's warm-up): $KERAS_BACKEND, else keras.json's ($KERAS_HOME or ~/.keras), else
    tensorflow."""
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    try:
        with open(os.path.join(home, "keras.json")) as f:
            return str(json.load(f).get("backend") or "tensorflow")
    except (OSError, ValueError, AttributeError):
        return "tensorflow"


@dataclass(frozen=True)
class GpuRequest:
    """What a job asks of its host's GPUs: parsed once, where the user typed it, and carried as is.

    ``count``: how many GPUs (0: none, ``ALL``: every GPU of the host); ``ids``: exactly these GPUs
    instead.  In a job's spec it is ``gpus`` (a count or ``"all"``) and ``gpu_ids``, the same two keys
    every launcher reads (a Slurm job's count too), so job folders of earlier agents read the same.
    """

    count: int = 0
    ids: tuple[int, ...] = ()
    ALL: ClassVar[int] = -1

    @property
    def wanted(self) -> bool:
        return bool(self.ids) or self.count != 0

    def spec(self) -> dict[str, Any]:
        """The spec's keys for this request (``gpu_ids`` only when given)."""
        fields: dict[str, Any] = {"gpus": "all" if self.count == self.ALL else self.count}
        if self.ids:
            fields["gpu_ids"] = list(self.ids)
        return fields

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> GpuRequest:
        """The request a spec carries; ``ValueError`` saying which key is wrong (a spec from another client)."""
        count, ids = spec.get("gpus", 0), spec.get("gpu_ids")
        if count is None:
            count = 0
        if not (count == "all" or (isinstance(count, int) and not isinstance(count, bool) and count >= 0)):
            raise ValueError(f"gpus must be a number of GPUs, 0 or more, or 'all', not {count!r}")
        if ids is not None and not (
            isinstance(ids, list)
            and ids
            and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)
        ):
            raise ValueError(f"gpu_ids must be a list of GPU indices, not {ids!r}")
        return cls(cls.ALL if count == "all" else count, tuple(ids or ()))

    def describe(self) -> str:
        if self.ids:
            return "GPUs " + ",".join(map(str, self.ids))
        if self.count == self.ALL:
            return "all GPUs"
        return f"{self.count} GPU{'s' if self.count != 1 else ''}" if self.count else "no GPU"
