"""The event schema and file layout shared by the agent and the client.

events.jsonl is the single source of truth for a job: one JSON object per
line, each with a strictly increasing ``seq`` so a client can resume exactly
where it stopped (``attach --from SEQ``).
"""

from __future__ import annotations

import json
import time
from typing import Any

SCHEMA_VERSION = 1

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
DONE = "done"
ERROR = "error"
CANCELLED = "cancelled"
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

TERMINAL_STATE = {DONE: STATE_DONE, ERROR: STATE_ERROR, CANCELLED: STATE_CANCELLED, LOST: STATE_KILLED}

# Files in a job directory.
SPEC_FILE = "spec.json"
INPUTS_FILE = "inputs.pkl"
OUTPUTS_FILE = "outputs.pkl"
EVENTS_FILE = "events.jsonl"
PID_FILE = "runner.pid"
RUNNER_LOG = "runner.log"
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
