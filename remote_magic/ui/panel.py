"""Views of a job's events: an ipywidgets panel in Jupyter, plain text elsewhere.

Both are fed the same events through ``JobView``, so a replayed job and a
live one look the same.  No transport code here.
"""

from __future__ import annotations

import concurrent.futures
import html
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from ..agent import protocol
from ..session.job_view import JobView, format_seconds
from .chart import svg_charts

# A job may print without end: the panel keeps only a tail, and the full log stays in events.jsonl on the host.
_STDOUT_LINES_SHOWN = 12  # the live widget's log
_STATIC_LINES_SHOWN = 50  # the saved notebook's copy
_STATIC_CHARS_SHOWN = 20_000  # and at most this much of it, however long its lines


def format_epoch(row: dict[str, Any], epochs: int | None, unit: str = "epoch") -> str:
    """``Epoch 3/20 - loss: 0.4102 - 1.2s`` (``Step`` for a remote_log loop)."""
    metrics = " - ".join(f"{k}: {v:.4f}" for k, v in row["logs"].items())
    line = f"{unit.capitalize()} {row['epoch']}/{epochs or '?'}"
    if metrics:
        line += f" - {metrics}"
    if row.get("seconds") is not None:
        line += f" - {row['seconds']:.1f}s"
    return line


def render_text(view: JobView) -> str:
    """The whole panel as text: what a saved notebook or a terminal shows."""
    lines = [f"[remote_train] {view.title()}"]
    lines += [format_epoch(row, view.epochs, view.unit) for row in view.rows]
    tail, left_out = view.output_tail(_STATIC_LINES_SHOWN, _STATIC_CHARS_SHOWN)
    if left_out:
        lines.append(view.where_the_log_is(left_out))
    if tail:
        lines.append("".join(tail).rstrip("\n"))
    lines += [f"note: {note}" for note in view.notes]
    lines += view.gpu_lines()
    if view.files:
        lines.append(view.files_line())
    if view.error:
        lines.append(f"{view.state}: {view.error}")
    return "\n".join(lines)


TABLE_ROWS_SHOWN = 12  # the latest rows; the chart has them all
_TABLE_STYLE = (
    "<style>.remote-magic-metrics{border-collapse:collapse;font-size:12px}"
    ".remote-magic-metrics th,.remote-magic-metrics td{padding:1px 8px;text-align:right;"
    "border-bottom:1px solid #eee}.remote-magic-metrics th{border-bottom:1px solid #999}</style>"
)


def render_table_html(view: JobView, shown: int = TABLE_ROWS_SHOWN) -> str:
    """The latest rows (a line says how many earlier ones the chart holds); a column none of them has is left out."""
    names = view.metric_names()
    timed = any(row.get("seconds") is not None for row in view.rows)
    head = "".join(f"<th>{html.escape(n)}</th>" for n in [view.unit, *names, *(["time"] if timed else [])])
    earlier = max(len(view.rows) - shown, 0)
    body = ""
    if earlier:
        body += f"<tr><td colspan='{len(names) + 1 + timed}'>… {earlier} earlier {view.unit}s in the chart</td></tr>"
    for row in view.rows[earlier:]:
        cells = [str(row["epoch"])] + [f"{row['logs'][n]:.4f}" if n in row["logs"] else "" for n in names]
        if timed:
            cells.append(format_seconds(row["seconds"]) if row.get("seconds") is not None else "")
        body += "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"
    return (
        f"{_TABLE_STYLE}<table class='remote-magic-metrics'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    )


def render_html(view: JobView) -> str:
    """The static panel: what a saved notebook and nbconvert's HTML export show."""
    notes = "".join(f"<div>note: {html.escape(n)}</div>" for n in view.notes)
    error = f"<div><b>{html.escape(view.state)}</b>: {html.escape(view.error)}</div>" if view.error else ""
    error = (f"<div>{html.escape(view.files_line())}</div>" if view.files else "") + error
    error = "".join(f"<div>{html.escape(line)}</div>" for line in view.gpu_lines()) + error
    tail, left_out = view.output_tail(_STATIC_LINES_SHOWN, _STATIC_CHARS_SHOWN)
    output = ""
    if left_out:
        output = f"<div>{html.escape(view.where_the_log_is(left_out))}</div>"
    if tail:
        output += "<pre style='max-height:12em;overflow:auto'>" + html.escape("".join(tail)) + "</pre>"
    return (
        f"<div class='remote-magic-panel'><b>{html.escape(view.title())}</b>{svg_charts(view.rows, view.unit)}"
        f"<div style='max-height:16em;overflow:auto'>{render_table_html(view)}</div>{output}{notes}{error}</div>"
    )


class TextPanel:
    """One line per epoch, printed as it arrives; for terminals and plain IPython."""

    def __init__(self, host: str, write: Callable[[str], Any] | None = None) -> None:
        self.view = JobView(host)
        self._write = write or (lambda text: (sys.stdout.write(text), sys.stdout.flush()))

    def start(self, job_id: str, name: str | None = None) -> None:
        self.view.job_id, self.view.name = job_id, name

    def set_actions(self, on_stop: Callable[[], Any] | None, on_detach: Callable[[], Any] | None) -> None:
        """What the Stop and Detach buttons do; a text panel has none (interrupt stops)."""

    def handle(self, event: dict[str, Any]) -> None:
        if is_keras_progress(event):
            return
        view = self.view
        view.apply(event)
        kind = event["type"]
        if kind == protocol.STARTED:
            self._write(f"[remote_train] {view.title()}\n")
        elif kind == protocol.EPOCH:
            eta = view.eta()
            suffix = f" - ETA {format_seconds(eta)}" if eta else ""
            self._write(format_epoch(view.rows[-1], view.epochs, view.unit) + suffix + "\n")
        elif kind in (protocol.STDOUT, protocol.STDERR):
            self._write(view.output[-1])  # every line, as a terminal scrolls; a huge one cut as the view keeps it
        elif kind in (protocol.WARNING, protocol.REQUEUED, protocol.RESUMED):
            self._write(f"[remote_train] note: {view.notes[-1]}\n")
        elif kind == protocol.QUEUED and view.reason:
            self._write(f"[remote_train] {view.waiting_line()}\n")
        elif kind in protocol.TERMINAL:
            self._write(f"[remote_train] {view.title()}\n")
            for line in [*view.gpu_lines(), view.files_line()]:
                if line:
                    self._write(f"[remote_train] {line}\n")

    def note(self, text: str) -> None:
        self.view.notes.append(text)
        self._write(f"[remote_train] {text}\n")

    def progress(self, text: str) -> None:
        """Work before the job starts (an upload, an environment build); the caller keeps it to a line a second or so."""
        self.view.progress = text
        self._write(f"[remote_train] {text}\n")

    def finish(self) -> None:
        """The job ended and its outputs are handled: nothing more will be shown."""


def is_keras_progress(event: dict[str, Any]) -> bool:
    """A line of Keras's own fit progress bar: its epoch header and bar repeat the panel's epoch rows, so neither
    panel shows it (the job's log on the host keeps it)."""
    return bool(event.get("progress")) and event["type"] in (protocol.STDOUT, protocol.STDERR)


class ThrottledRedraw:
    """Redraws a widget at once for what matters, at most every ``refresh_interval`` seconds for floods.

    A redraw sends the whole widget to the frontend, so a flood of output or
    batches is drawn at most every ``refresh_interval`` seconds, the last
    change by a timer; other changes are drawn at once.  Events arrive in
    followers' threads, the timer in its own and clicks in a subshell's: one
    lock keeps what is drawn still while it is drawn.  Subclasses draw in
    ``_refresh``, which starts with ``_drawn()``.
    """

    refresh_interval = 0.5

    def _init_redraw(self) -> None:
        self._lock = threading.RLock()
        self._last_refresh = 0.0
        self._stale = False
        self._timer: threading.Timer | None = None
        self._finished = False

    def _refresh(self) -> None:
        raise NotImplementedError

    def _drawn(self) -> None:
        self._last_refresh = time.monotonic()
        self._stale = False

    def _redraw(self, throttled: bool) -> None:
        """Draw now, or (``throttled`` and drawn within the interval) soon."""
        if not throttled or time.monotonic() - self._last_refresh >= self.refresh_interval:
            self._refresh()
        else:
            self._refresh_later()

    def _refresh_later(self) -> None:
        """Mark the widget behind the view; one timer draws it when the interval is up, so nothing stays unseen."""
        self._stale = True
        if self._timer is None and not self._finished:
            delay = max(self.refresh_interval - (time.monotonic() - self._last_refresh), 0.0)
            self._timer = threading.Timer(delay, self._refresh_pending)
            self._timer.daemon = True
            self._timer.start()

    def _refresh_pending(self) -> None:
        with self._lock:
            self._timer = None
            if self._stale and not self._finished:
                self._refresh()

    def _stop_redrawing(self) -> None:
        """Draw what is pending, and nothing after it."""
        with self._lock:
            self._finished = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._stale:
                self._refresh()


class WidgetPanel(ThrottledRedraw, TextPanel):
    """The live ipywidgets panel under the cell.

    When the job ends, the display is replaced by its static HTML and text
    copy (chart included), so a saved notebook, nbconvert's HTML export or a
    notebook opened without a kernel show the finished panel.  Output,
    batches and GPU samples are redrawn at most every ``refresh_interval``.
    """

    _THROTTLED = frozenset({protocol.STDOUT, protocol.STDERR, protocol.BATCH, protocol.GPU})

    def __init__(self, host: str) -> None:
        import ipywidgets as widgets
        from IPython.display import display

        super().__init__(host, write=lambda text: None)
        self.header = widgets.HTML()
        self.epoch_bar = widgets.IntProgress(value=0, min=0, max=1, description="epoch", bar_style="info")
        self.epoch_label = widgets.Label()
        self.batch_bar = widgets.IntProgress(value=0, min=0, max=1, description="batch")
        self.batch_label = widgets.Label()
        self.stop_button = widgets.Button(description="Stop", tooltip="stop after the current batch; keep the model")
        self.detach_button = widgets.Button(description="Detach", tooltip="return now; the job runs on")
        self.chart = widgets.HTML()
        self.table = widgets.HTML()
        self.log = widgets.Textarea(layout=widgets.Layout(width="100%", height="8em"), disabled=True)
        self.log.layout.display = "none"
        self.box = widgets.VBox(
            [
                self.header,
                widgets.HBox([self.epoch_bar, self.epoch_label]),
                widgets.HBox([self.batch_bar, self.batch_label]),
                widgets.HBox([self.stop_button, self.detach_button]),
                self.chart,
                self.table,
                self.log,
            ]
        )
        self._click_handlers: dict[str, Callable[[Any], None]] = {}
        self._init_redraw()
        self._refresh()
        self.display_handle = display(LiveBundle(self.box, StaticBundle(self.view)), display_id=True)

    def set_actions(self, on_stop: Callable[[], Any] | None, on_detach: Callable[[], Any] | None) -> None:
        for button, action in ((self.stop_button, on_stop), (self.detach_button, on_detach)):
            previous = self._click_handlers.pop(button.description, None)
            if previous is not None:
                button.on_click(previous, remove=True)
            button.disabled = action is None
            if action is not None:
                handler = self._click_handlers[button.description] = lambda _button, act=action: self._act(act)
                button.on_click(handler)
        # Set last: changing ``disabled`` above routes the buttons' messages back to the main shell.
        serve_clicks_while_busy([self.stop_button, self.detach_button])

    def _act(self, action: Callable[[], Any]) -> None:
        try:
            action()
        except Exception as exc:  # noqa: BLE001  (a click has no cell to raise into)
            self.note(f"{type(exc).__name__}: {exc}")

    def handle(self, event: dict[str, Any]) -> None:
        with self._lock:
            super().handle(event)
            kind = event["type"]
            if kind in protocol.TERMINAL:
                self.stop_button.disabled = self.detach_button.disabled = True
            self._redraw(kind in self._THROTTLED)

    def note(self, text: str) -> None:
        with self._lock:
            self.view.notes.append(text)
            self._refresh()

    def progress(self, text: str) -> None:
        with self._lock:
            self.view.progress = text
            self._refresh_later()

    def finish(self) -> None:
        """Draw what is pending, then swap the live widget for the static copy of the finished panel."""
        self._stop_redrawing()
        if self.display_handle is not None:
            self.display_handle.update(StaticBundle(self.view))

    def _refresh(self) -> None:
        self._drawn()
        view = self.view
        shown = [
            view.waiting_line(),
            *view.notes[-3:],
            *([view.progress] if view.progress else []),
            *view.gpu_lines(),
            view.files_line(),
        ]
        self.header.value = f"<b>{html.escape(view.title())}</b>" + "".join(
            f"<div>{html.escape(n)}</div>" for n in shown if n
        )
        self.epoch_bar.max = max(view.epochs or 1, 1)
        self.epoch_bar.value = min(view.epoch, self.epoch_bar.max)
        self.epoch_bar.bar_style = {"done": "success", "stopped": "warning"}.get(
            view.state, "danger" if view.state in ("error", "killed", "cancelled") else "info"
        )
        self.epoch_label.value = f"{view.epoch}/{view.epochs or '?'}"
        self.batch_bar.max = max(view.steps or 1, 1)
        self.batch_bar.value = min(view.batch, self.batch_bar.max)
        self.batch_label.value = f"{view.batch}/{view.steps}" if view.steps else ""
        self.chart.value = svg_charts(view.rows, view.unit)
        self.table.value = (
            f"<div style='max-height:16em;overflow:auto'>{render_table_html(view)}</div>" if view.rows else ""
        )
        if view.output:
            tail, left_out = view.output_tail(_STDOUT_LINES_SHOWN)
            self.log.layout.display = None
            self.log.value = (view.where_the_log_is(left_out) + "\n" if left_out else "") + "".join(tail)


class StaticBundle:
    """A finished panel as text and HTML; anything with ``render_text`` and ``render_html`` renderers works."""

    def __init__(self, view: Any, text: Callable[[Any], str] = render_text, page: Callable[[Any], str] = render_html):
        self.view, self.text, self.page = view, text, page

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        return {"text/plain": self.text(self.view), "text/html": self.page(self.view)}


class LiveBundle:
    """The widget, with text and HTML copies for frontends that cannot show widgets."""

    def __init__(self, box: Any, static: StaticBundle) -> None:
        self.box, self.static = box, static

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        bundle = dict(self.box._repr_mimebundle_(**kwargs) or {})
        bundle.update(self.static._repr_mimebundle_())
        return bundle


_SUBSHELL: dict[str, str] = {}


def serve_clicks_while_busy(buttons: list[Any]) -> bool:
    """Have these widgets' messages handled in a kernel subshell, beside the busy cell.

    While ``%%remote_train`` blocks, the kernel's main shell handles no widget
    message, so a Stop click would wait for the cell to end.  ipykernel 7
    runs subshells in their own threads and routes a comm's messages to the
    subshell its ``_reply_subshell_id`` names.  These are ipykernel internals:
    anywhere they are missing this returns False and the buttons act once the
    kernel is idle (kernel interrupt still stops a blocking cell).
    """
    try:
        from IPython import get_ipython

        kernel = get_ipython().kernel
        if not getattr(kernel, "_supports_kernel_subshells", False):
            return False
        subshell_id = _SUBSHELL.get("id")
        if subshell_id is None:
            thread = kernel.shell_channel_thread
            created: concurrent.futures.Future[str] = concurrent.futures.Future()

            def create() -> None:
                try:
                    created.set_result(thread.manager._create_subshell())
                except Exception as exc:  # noqa: BLE001
                    created.set_exception(exc)

            thread.io_loop.add_callback(create)
            subshell_id = _SUBSHELL["id"] = created.result(timeout=5)
        for button in buttons:
            button.comm._reply_subshell_id = subshell_id
        return True
    except Exception:  # noqa: BLE001  (any change in those internals: fall back quietly)
        return False


def make_panel(host: str, mode: str = "auto") -> TextPanel:
    return WidgetPanel(host) if wants_widgets(mode) else TextPanel(host)


def wants_widgets(mode: str) -> bool:
    """Whether a panel in ``mode`` ('auto', 'widget', 'text') is drawn with widgets here."""
    return mode == "widget" or (mode == "auto" and _in_kernel_with_widgets())


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


class PanelWhenNeeded:
    """The job's panel, shown only once there is something to show (a build, an upload, the job itself)."""

    def __init__(self, make: Any) -> None:
        self._make = make
        self._panel: Any = None

    def get(self) -> Any:
        if self._panel is None:
            self._panel = self._make()
        return self._panel

    def note(self, text: str) -> None:
        self.get().note(text)

    def progress(self, text: str) -> None:
        self.get().progress(text)
