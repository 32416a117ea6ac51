"""Views of a job's events: an ipywidgets panel in Jupyter, plain text elsewhere.

Both are fed the same events through ``JobView``, so a replayed job and a
live one look the same.  No transport code here.
"""

from __future__ import annotations

import html
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..agent import protocol

_STDOUT_LINES_SHOWN = 12


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
    output: list[str] = field(default_factory=list)
    started: float | None = None
    ended: float | None = None
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    next_seq: int = 0

    def apply(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        self.next_seq = event["seq"] + 1
        if kind == protocol.STARTED:
            self.state = protocol.STATE_RUNNING
            self.started = event["t"]
            self.device = describe_device(event.get("device"))
        elif kind == protocol.TRAIN_BEGIN:
            self.epochs, self.steps, self.epoch, self.batch = event.get("epochs"), event.get("steps"), 0, 0
        elif kind == protocol.BATCH:
            self.batch = event.get("batch", 0)
        elif kind == protocol.EPOCH:
            self.epoch = event["epoch"]
            self.epochs = event.get("epochs") or self.epochs
            self.batch = self.steps or self.batch
            self.rows.append({"epoch": event["epoch"], "logs": event.get("logs", {}), "seconds": event.get("seconds")})
        elif kind in (protocol.STDOUT, protocol.STDERR):
            self.output.append(event["text"])
        elif kind == protocol.WARNING:
            self.notes.append(event["message"])
        elif kind in protocol.TERMINAL:
            self.state = protocol.final_state(event)
            self.ended = event["t"]
            if kind != protocol.DONE:
                self.error = event.get("message")

    @property
    def elapsed(self) -> float | None:
        if self.started is None:
            return None
        return (self.ended or time.time()) - self.started

    def title(self) -> str:
        parts = [f"host {self.host}", f"job {self.job_id}"]
        if self.name:
            parts.append(self.name)
        if self.device:
            parts.append(self.device)
        parts.append(self.state)
        if self.elapsed is not None:
            parts.append(format_seconds(self.elapsed))
        return " · ".join(parts)

    def metric_names(self) -> list[str]:
        names: list[str] = []
        for row in self.rows:
            names += [k for k in row["logs"] if k not in names]
        return names


def describe_device(device: dict[str, Any] | None) -> str:
    if not device or device.get("kind") != "GPU":
        return "CPU"
    return ", ".join(device.get("gpus", [])) or "GPU"


def format_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def format_epoch(row: dict[str, Any], epochs: int | None) -> str:
    metrics = " - ".join(f"{k}: {v:.4f}" for k, v in row["logs"].items())
    line = f"Epoch {row['epoch']}/{epochs or '?'}"
    if metrics:
        line += f" - {metrics}"
    if row.get("seconds") is not None:
        line += f" - {row['seconds']:.1f}s"
    return line


def render_text(view: JobView) -> str:
    """The whole panel as text: what a saved notebook or a terminal shows."""
    lines = [f"[remote_train] {view.title()}"]
    lines += [format_epoch(row, view.epochs) for row in view.rows]
    lines += [f"note: {note}" for note in view.notes]
    if view.error:
        lines.append(f"{view.state}: {view.error}")
    return "\n".join(lines)


def render_table_html(view: JobView) -> str:
    names = view.metric_names()
    head = "".join(f"<th>{html.escape(n)}</th>" for n in ["epoch", *names, "time"])
    body = ""
    for row in view.rows:
        cells = (
            [str(row["epoch"])]
            + [f"{row['logs'][n]:.4f}" if n in row["logs"] else "" for n in names]
            + [format_seconds(row["seconds"]) if row.get("seconds") is not None else ""]
        )
        body += "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"
    return f"<table class='remote-magic-metrics'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(view: JobView) -> str:
    notes = "".join(f"<div>note: {html.escape(n)}</div>" for n in view.notes)
    error = f"<div><b>{html.escape(view.state)}</b>: {html.escape(view.error)}</div>" if view.error else ""
    return f"<div><b>{html.escape(view.title())}</b>{render_table_html(view)}{notes}{error}</div>"


class TextPanel:
    """One line per epoch, printed as it arrives; for terminals and plain IPython."""

    def __init__(self, host: str, write: Callable[[str], Any] | None = None) -> None:
        self.view = JobView(host)
        self._write = write or (lambda text: (sys.stdout.write(text), sys.stdout.flush()))

    def start(self, job_id: str, name: str | None = None) -> None:
        self.view.job_id, self.view.name = job_id, name

    def handle(self, event: dict[str, Any]) -> None:
        view = self.view
        view.apply(event)
        kind = event["type"]
        if kind == protocol.STARTED:
            self._write(f"[remote_train] {view.title()}\n")
        elif kind == protocol.EPOCH:
            self._write(format_epoch(view.rows[-1], view.epochs) + "\n")
        elif kind in (protocol.STDOUT, protocol.STDERR):
            self._write(event["text"])
        elif kind == protocol.WARNING:
            self._write(f"[remote_train] note: {event['message']}\n")
        elif kind == protocol.DONE:
            self._write(f"[remote_train] {view.title()}\n")

    def note(self, text: str) -> None:
        self.view.notes.append(text)
        self._write(f"[remote_train] {text}\n")

    def close(self) -> None:
        pass


class WidgetPanel(TextPanel):
    """The live ipywidgets panel under the cell.

    Its display carries text/plain and text/html fallbacks, refreshed when the
    job ends, so a saved notebook or a headless run still shows every epoch.
    """

    def __init__(self, host: str) -> None:
        import ipywidgets as widgets
        from IPython.display import display

        super().__init__(host, write=lambda text: None)
        self.header = widgets.HTML()
        self.epoch_bar = widgets.IntProgress(value=0, min=0, max=1, description="epoch", bar_style="info")
        self.epoch_label = widgets.Label()
        self.table = widgets.HTML()
        self.log = widgets.Textarea(layout=widgets.Layout(width="100%", height="8em"), disabled=True)
        self.log.layout.display = "none"
        self.box = widgets.VBox([self.header, widgets.HBox([self.epoch_bar, self.epoch_label]), self.table, self.log])
        self._refresh()
        self.handle_display = display(_Bundle(self), display_id=True)

    def handle(self, event: dict[str, Any]) -> None:
        super().handle(event)
        if event["type"] != protocol.BATCH or time.monotonic() - getattr(self, "_last", 0.0) > 0.5:
            self._last = time.monotonic()
            self._refresh()
        if event["type"] in protocol.TERMINAL and self.handle_display is not None:
            self.handle_display.update(_Bundle(self))

    def note(self, text: str) -> None:
        self.view.notes.append(text)
        self._refresh()
        if self.handle_display is not None:
            self.handle_display.update(_Bundle(self))

    def _refresh(self) -> None:
        view = self.view
        self.header.value = f"<b>{html.escape(view.title())}</b>" + "".join(
            f"<div>{html.escape(n)}</div>" for n in view.notes
        )
        self.epoch_bar.max = max(view.epochs or 1, 1)
        self.epoch_bar.value = min(view.epoch, self.epoch_bar.max)
        self.epoch_bar.bar_style = {"done": "success", "error": "danger", "killed": "danger"}.get(view.state, "info")
        batch = f" · batch {view.batch}/{view.steps}" if view.steps and view.state == "running" else ""
        self.epoch_label.value = f"{view.epoch}/{view.epochs or '?'}{batch}"
        self.table.value = render_table_html(view) if view.rows else ""
        if view.output:
            self.log.layout.display = None
            self.log.value = "".join(view.output[-_STDOUT_LINES_SHOWN:])


class _Bundle:
    """The panel widget plus text and HTML fallbacks, in one display."""

    def __init__(self, panel: WidgetPanel) -> None:
        self.panel = panel

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        bundle = dict(self.panel.box._repr_mimebundle_(**kwargs) or {})
        bundle["text/plain"] = render_text(self.panel.view)
        bundle["text/html"] = render_html(self.panel.view)
        return bundle


def make_panel(host: str, mode: str = "auto") -> TextPanel:
    if mode == "widget" or (mode == "auto" and _in_kernel_with_widgets()):
        return WidgetPanel(host)
    return TextPanel(host)


def _in_kernel_with_widgets() -> bool:
    try:
        from IPython import get_ipython

        shell = get_ipython()
        if shell is None or getattr(shell, "kernel", None) is None:
            return False
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True
