"""What a job's panel shows, derived only from its events: a model with no widget, for the panels, sweeps and
the session alike (a replayed job and a live one look the same)."""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ..agent import protocol

OUTPUT_LINES_KEPT = 200
# Events that only a cell already running sends (the runner has imported what it needs).
_SIGNS_OF_LIFE = frozenset(
    {protocol.TRAIN_BEGIN, protocol.BATCH, protocol.EPOCH, protocol.STDOUT, protocol.STDERR, protocol.WARNING}
)
OUTPUT_LINE_CHARS = 10_000  # one line longer than this is cut, so a few huge lines cannot fill the kernel
FILES_SHOWN = 20


@dataclass
class JobView:
    """Everything a panel shows, derived only from events."""

    host: str
    job_id: str = ""
    name: str | None = None
    state: str = protocol.STATE_QUEUED
    device: str = ""
    epochs: int | None = None
    epoch: int = 0
    steps: int | None = None
    batch: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)  # {"epoch", "logs", "seconds"}
    output: deque[str] = field(default_factory=lambda: deque(maxlen=OUTPUT_LINES_KEPT))
    output_dropped: int = 0  # lines that fell out of ``output``
    started: float | None = None
    ended: float | None = None
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    next_seq: int = 0
    unit: str = "epoch"  # "step" for a remote_log loop
    progress: str = ""  # one line that replaces itself: an upload or an environment build before the job starts
    files: list[list[Any]] = field(default_factory=list)  # [path, size] of what the cell wrote, newest first
    files_total: int = 0
    reason: str = ""  # why a queued job waits (GPUs held by whom), and its place in the queue
    position: int | None = None
    gpu_now: list[dict[str, Any]] = field(default_factory=list)  # the last sample of the job's GPUs
    gpu_peak: dict[str, int] = field(default_factory=dict)  # GPU index -> peak MiB used, when the job ended
    # Whether the cell has shown a sign of life since ``started``: until then the host's runner is still starting
    # (importing TensorFlow can take seconds), and the panel says so rather than "running" with nothing.
    runner_ready: bool = False

    def apply(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        self.next_seq = event["seq"] + 1
        if kind in _SIGNS_OF_LIFE:
            self.runner_ready = True
        if kind == protocol.QUEUED:
            self.reason, self.position = event.get("reason") or "", event.get("position")
        elif kind == protocol.GPU:
            self.gpu_now = event.get("gpus") or []
        elif kind == protocol.STARTED:
            self.progress, self.reason = "", ""
            self.state = protocol.STATE_RUNNING
            self.started = event["t"]
            self.runner_ready = False
            self.device = describe_device(event.get("device"))
            slurm = event.get("slurm")
            if slurm:  # where Slurm put it: the node, and the cluster's own job id
                where = f"node {slurm.get('node')} (Slurm job {slurm.get('id')})"
                self.device = f"{where} · {self.device}" if self.device else where
        elif kind == protocol.TRAIN_BEGIN:
            self.epochs, self.steps, self.epoch, self.batch = event.get("epochs"), event.get("steps"), 0, 0
        elif kind == protocol.BATCH:
            self.batch = event.get("batch", 0)
        elif kind == protocol.EPOCH:
            self.unit = event.get("unit") or self.unit
            self.epoch = event["epoch"]
            self.epochs = event.get("epochs") or self.epochs
            self.batch = self.steps or self.batch
            self.rows.append({"epoch": event["epoch"], "logs": event.get("logs", {}), "seconds": event.get("seconds")})
        elif kind in (protocol.STDOUT, protocol.STDERR):
            if len(self.output) == self.output.maxlen:
                self.output_dropped += 1
            self.output.append(cap_line(event["text"]))
        elif kind == protocol.WARNING:
            self.notes.append(event["message"])
        elif kind == protocol.REQUEUED:
            self.state, self.reason = protocol.STATE_REQUEUED, ""
            self.notes.append(f"requeued at epoch {event.get('epoch') or 0}: {event.get('reason')}")
        elif kind == protocol.RESUMED:
            self.notes.append(f"resumed from its checkpoint at epoch {event.get('epoch')}")
        elif kind in protocol.TERMINAL:
            self.state = protocol.final_state(event)
            self.ended = event["t"]
            self.files, self.files_total = event.get("files") or [], event.get("files_total") or 0
            self.gpu_peak = event.get("gpu_peak") or {}
            if kind != protocol.DONE:
                self.error = event.get("message")

    @property
    def elapsed(self) -> float | None:
        if self.started is None:
            return None
        return (self.ended or time.time()) - self.started

    def eta(self) -> float | None:
        """Seconds left, from the mean of the last five epochs; None when unknown or finished."""
        if self.state != protocol.STATE_RUNNING or not self.epochs or not self.rows:
            return None
        recent = [row["seconds"] for row in self.rows[-5:] if row.get("seconds") is not None]
        if not recent:
            return None
        return max(self.epochs - self.epoch, 0) * sum(recent) / len(recent)

    def title(self) -> str:
        parts = [f"host {self.host}", f"job {self.job_id}"]
        if self.name:
            parts.append(self.name)
        if self.device:
            parts.append(self.device)
        parts.append(self.shown_state())
        if self.elapsed is not None:
            parts.append(format_seconds(self.elapsed))
        eta = self.eta()
        if eta is not None:
            parts.append(f"ETA {format_seconds(eta)}")
        return " · ".join(parts)

    def shown_state(self) -> str:
        """The state as the header says it: "starting runner" between ``started`` and the cell's first sign of life."""
        if self.state == protocol.STATE_RUNNING and not self.runner_ready:
            return "starting runner"
        return self.state

    def output_tail(self, lines: int, chars: int | None = None) -> tuple[list[str], int]:
        """The last ``lines`` output lines (no more than ``chars`` of them), and how many earlier ones are not in it."""
        tail = list(itertools.islice(self.output, max(len(self.output) - lines, 0), None))
        if chars is not None:
            size, start = 0, len(tail)
            while start > 0 and (start == len(tail) or size + len(tail[start - 1]) <= chars):
                start -= 1
                size += len(tail[start])
            tail = tail[start:]
        return tail, self.output_dropped + len(self.output) - len(tail)

    def where_the_log_is(self, left_out: int) -> str:
        """The line that says the panel shows only a tail, and how to read the rest."""
        command = (
            f"%remote_status {self.job_id} --host {self.host}" if self.job_id else f"%remote_status --host {self.host}"
        )
        lines = "1 earlier line is" if left_out == 1 else f"{left_out:,} earlier lines are"
        return f"… {lines} on the host: `{command}`"

    def waiting_line(self) -> str:
        """``queued #2: waiting for 2 GPUs: 0 by job ...`` while the job waits in the host's queue."""
        if self.state not in (protocol.STATE_QUEUED, protocol.STATE_REQUEUED) or not self.reason:
            return ""
        return f"{self.state} #{self.position}: {self.reason}" if self.position else f"{self.state}: {self.reason}"

    def gpu_lines(self) -> list[str]:
        """One line per GPU of the job: utilization and memory now, or the peak memory once it ended."""
        if self.gpu_peak:
            peaks = ", ".join(f"GPU {i} {mib / 1024:.1f} GiB" for i, mib in sorted(self.gpu_peak.items()))
            return [f"peak GPU memory: {peaks}"]
        return [
            f"GPU {g['index']}: {g['utilization']}% · {g['memory_used'] / 1024:.1f} / {g['memory_total'] / 1024:.1f} GiB"
            for g in self.gpu_now
        ]

    def files_line(self, shown: int = FILES_SHOWN) -> str:
        """The files the cell wrote in its working folder, with sizes ("" when none)."""
        if not self.files:
            return ""
        listed = ", ".join(f"{path} ({format_size(size)})" for path, size in self.files[:shown])
        more = self.files_total - min(len(self.files), shown)
        return f"files written: {listed}" + (f" and {more:,} more" if more > 0 else "")

    def metric_names(self) -> list[str]:
        names: list[str] = []
        for row in self.rows:
            names += [k for k in row["logs"] if k not in names]
        return names


def cap_line(text: str, limit: int = OUTPUT_LINE_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying how much was cut; its line end is kept."""
    if len(text) <= limit:
        return text
    end = "\n" if text.endswith("\n") else ""
    body = text[: len(text) - len(end)]
    return f"{body[:limit]} … [{len(body) - limit:,} more characters]{end}"


def format_size(size: float) -> str:
    """1234567 -> '1.2 MB' (decimal units, as file managers show)."""
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def describe_device(device: dict[str, Any] | None) -> str:
    if not device or device.get("kind") != "GPU":
        return "CPU"
    return device.get("label") or ", ".join(device.get("gpus", [])) or "GPU"


def format_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
