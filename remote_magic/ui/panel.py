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
from .static_copy import (
    format_epoch,
    render_html,
    render_table_html,
    render_text,
    where_it_was_followed,
)

# A job may print without end: the panel keeps only a tail, and the full log stays in events.jsonl on the host.
_STDOUT_LINES_SHOWN = 12  # the live widget's log


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
    # The widget's fallback, what a notebook saved after its kernel died shows: its progress at most this old.
    FALLBACK_EVERY = 2.0
    FALLBACK_IDLE = 30.0  # without progress (the clock only)

    def __init__(self, host: str) -> None:
        import ipywidgets as widgets
        from IPython.display import display

        super().__init__(host, write=lambda text: None)
        self.header = widgets.HTML()
        self.epoch_bar = widgets.IntProgress(value=0, min=0, max=1, description="epoch", bar_style="info")
        self.epoch_bar.add_class("remote-magic-epochs")
        self.epoch_label = widgets.Label()
        self.batch_bar = widgets.IntProgress(value=0, min=0, max=1, description="batch")
        self.batch_label = widgets.Label()
        self.batch_row = widgets.HBox([self.batch_bar, self.batch_label])
        self.batch_row.layout.display = "none"  # until Keras reports batches: a remote_log loop has none
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
                self.batch_row,
                widgets.HBox([self.stop_button, self.detach_button]),
                self.chart,
                self.table,
                self.log,
            ]
        )
        self._click_handlers: dict[str, Callable[[Any], None]] = {}
        self._detached = False  # the cell returned: the display is a static copy redrawn while this kernel follows
        self._fallback_drawn: tuple[Any, ...] = ()
        self._fallback_progress: tuple[Any, ...] = ()
        self._fallback_at = 0.0
        self._init_redraw()
        self.display_handle = None
        self._refresh()
        self.display_handle = display(LiveBundle(self.box, StaticBundle(self.view)), display_id=True)
        self._fallback_at = time.monotonic()
        self._ticker = threading.Thread(target=self._tick, name="remote-magic-panel-clock", daemon=True)
        self._ticker.start()

    def start(self, job_id: str, name: str | None = None) -> None:
        with self._lock:
            super().start(job_id, name)
            self._refresh()

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
        if on_stop is not None and on_detach is None:
            self._detach_display()

    def _detach_display(self) -> None:
        """The cell has returned and this kernel follows the job in the background: show a static copy, redrawn
        as the job goes on, instead of the widget.  A widget cannot outlive its kernel session (a restarted one
        leaves "model not found" in the saved notebook); the copy stays true and says how to follow it again."""
        with self._lock:
            if self._finished or self.view.ended is not None or self._detached:
                return
            self._detached = True
            self._refresh()

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
        with self._lock:
            if self.display_handle is not None:
                self.display_handle.update(StaticBundle(self.view))

    def _tick(self) -> None:
        """Advance the header's elapsed time every second while the job runs, also between epochs."""
        while not self._finished and self.view.ended is None:
            time.sleep(1.0)
            with self._lock:
                if self._finished or self.view.started is None or self.view.ended is not None:
                    continue
                if self._detached:
                    self._refresh()
                else:
                    self.header.value = self._header_html()
                    self._update_display()  # progress drawn since the last fallback reaches it even if the job stalls

    def _header_html(self) -> str:
        view = self.view
        shown = [
            view.waiting_line(),
            *view.notes[-3:],
            *([view.progress] if view.progress else []),
            *view.gpu_lines(),
            view.files_line(),
        ]
        return f"<b>{html.escape(view.title())}</b>" + "".join(f"<div>{html.escape(n)}</div>" for n in shown if n)

    def _update_display(self) -> None:
        """Keep what the notebook saves true: the detached copy on every redraw; the widget's fallback (shown where
        the widget cannot be, as after a kernel restart) when the state changes, every ``FALLBACK_EVERY`` seconds
        while the job progresses, else every ``FALLBACK_IDLE`` (an update may redraw the widget in frontends
        without this package's lab extension, so not more often)."""
        if self.display_handle is None or self._finished:
            return
        view = self.view
        if self._detached:
            self.display_handle.update(StaticBundle(view, live=True))
            return
        key = (view.job_id, view.shown_state(), len(view.notes), view.error)
        progress = (len(view.rows), view.epoch, view.batch)
        every = self.FALLBACK_EVERY if progress != self._fallback_progress else self.FALLBACK_IDLE
        due = view.rows and time.monotonic() - self._fallback_at >= every
        if key != self._fallback_drawn or due:
            self._fallback_drawn, self._fallback_progress, self._fallback_at = key, progress, time.monotonic()
            self.display_handle.update(LiveBundle(self.box, StaticBundle(view)))

    def _refresh(self) -> None:
        self._drawn()
        view = self.view
        self.header.value = self._header_html()
        self.epoch_bar.description = view.unit
        self.epoch_bar.max = max(view.epochs or 1, 1)
        self.epoch_bar.value = min(view.epoch, self.epoch_bar.max)
        self.epoch_bar.bar_style = {"done": "success", "stopped": "warning"}.get(
            view.state, "danger" if view.state in ("error", "killed", "cancelled") else "info"
        )
        self.epoch_label.value = f"{view.epoch}/{view.epochs or '?'}"
        self.batch_bar.max = max(view.steps or 1, 1)
        self.batch_bar.value = min(view.batch, self.batch_bar.max)
        self.batch_label.value = f"{view.batch}/{view.steps}" if view.steps else ""
        self.batch_row.layout.display = None if view.steps else "none"
        self.chart.value = svg_charts(view.rows, view.unit)
        self.table.value = render_table_html(view)
        if view.output:
            tail, left_out = view.output_tail(_STDOUT_LINES_SHOWN)
            self.log.layout.display = None
            self.log.value = (view.where_the_log_is(left_out) + "\n" if left_out else "") + "".join(tail)
        self._update_display()


class StaticBundle:
    """A finished panel as text and HTML; anything with ``render_text`` and ``render_html`` renderers works."""

    def __init__(
        self,
        view: Any,
        text: Callable[[Any], str] = render_text,
        page: Callable[..., str] = render_html,
        live: bool = False,
    ) -> None:
        self.view, self.text, self.page, self.live = view, text, page, live

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        page = self.page(self.view, live=True) if self.live else self.page(self.view)
        text = self.text(self.view)
        where = where_it_was_followed(self.view, self.live) if isinstance(self.view, JobView) else ""
        return {"text/plain": f"{text}\n{where}" if where else text, "text/html": page}


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
