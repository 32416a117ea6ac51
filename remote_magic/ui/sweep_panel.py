"""The panel of a sweep: one row per trial, ranked by the sweep's metric, and every trial's curve on one chart.

Like the job panel (panel.py): ipywidgets in Jupyter, plain text elsewhere,
and a static HTML and text copy once the sweep ended, so a saved notebook
shows the finished table and chart.  Everything shown is derived from the
``Sweep`` and its trials' events.
"""

from __future__ import annotations

import html
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from ..agent import protocol
from ..session.job_view import format_seconds
from ..sweep import Action, Pick, Sweep, Trial
from ..sweep.trials import short_params, short_value
from .chart import PALETTE, WIDTH, format_number, svg_chart
from .panel import (
    LiveBundle,
    StaticBundle,
    ThrottledRedraw,
    format_epoch,
    serve_clicks_while_busy,
    wants_widgets,
)
from .status import _text_table

OVERLAY_WIDTH = 2 * WIDTH


def color_of(trial: Trial) -> str:
    return PALETTE[trial.number % len(PALETTE)]


def metric_text(sweep: Sweep) -> str:
    """``ranked by val_loss (min)``; before any trial logged an epoch (and without --metric), what it will be."""
    metric = sweep.metric
    if metric:
        return f"ranked by {metric} ({sweep.mode})"
    return f"ranked by val_loss ({sweep.direction('val_loss')}) once logged, else loss ({sweep.direction('loss')})"


def sweep_title(sweep: Sweep) -> str:
    """``sweep lr × units · 6 trials · 14:05 · host gpu1 · 3 at a time · ranked by val_loss (min) · 2 running, 4 done · 41.0s · sweep-...``

    Named by its grid and start time (two sweeps of one notebook differ there), its id last: attach and cancel take it.
    """
    what, progress = title_parts(sweep)
    return " · ".join(what + progress)


def title_parts(sweep: Sweep) -> tuple[list[str], list[str]]:
    """The title in two parts: what the sweep is (fixed once its metric is known), and how far it got."""
    what = [sweep.title(), f"host {sweep.host}"]
    if sweep.parallel:
        what.append(f"{sweep.parallel} at a time")
    what.append(metric_text(sweep))
    progress = [", ".join(f"{count} {state}" for state, count in sweep.counts().items())]
    started = [t.view.started for t in sweep.trials if t.view.started is not None]
    if started:
        ends = [t.view.ended for t in sweep.trials]
        end = max(e for e in ends if e is not None) if all(e is not None for e in ends) else None
        progress.append(format_seconds((end or time.time()) - min(started)))
    progress.append(sweep.id)
    return what, progress


def state_text(sweep: Sweep, trial: Trial) -> str:
    """The trial's state, with why a queued trial waits (its sweep's id shortened: the panel names it once)."""
    waiting = trial.view.waiting_line()
    if waiting:
        return waiting.replace(f"a trial of {sweep.id}", "a trial of this sweep")
    return trial.state


def short_state(sweep: Sweep, trial: Trial) -> str:
    """``queued #2``: short enough to keep the metric columns in view; the full reason is the cell's hover text."""
    full = state_text(sweep, trial)
    if trial.view.waiting_line() and trial.view.position:
        return f"{trial.state} #{trial.view.position}"
    return full if len(full) <= STATE_WIDTH else full[: STATE_WIDTH - 1] + "…"


STATE_WIDTH = 24
# Columns whose values are numbers: right-aligned, as in a spreadsheet.
_NUMERIC = frozenset({"rank", "epoch", "step", "time"})


def ranks(sweep: Sweep) -> dict[int, int]:
    """Each trial's place by the metric (1 is best); trials without a value have none."""
    metric = sweep.metric
    return {t.number: i for i, t in enumerate((t for t in sweep.ranked() if t.last(metric) is not None), 1)}


class Columns:
    """The table's columns: the trial, its rank, its parameters, state, GPU, epoch, every metric logged, time.

    Narrow enough for a cell beside JupyterLab's sidebar in a 900 px window: the trial's number under ``#`` (as
    the legend names it), a GPU column only once a trial holds a GPU (on a CPU host it says "CPU" on every row),
    the epoch column named by the unit the trials log (``step`` for a ``remote_log`` loop).
    """

    def __init__(self, sweep: Sweep) -> None:
        self.params = list(dict.fromkeys(key for trial in sweep.trials for key in trial.params))
        self.metrics = sweep.metric_names()
        self.gpu = any(trial.gpus for trial in sweep.trials)
        self.unit = next((t.view.unit for t in sweep.trials if t.view.rows and t.view.unit), "epoch")
        gpu = ["GPU"] if self.gpu else []
        self.names = ["#", "rank", *self.params, "state", *gpu, self.unit, *self.metrics, "time"]
        self.numeric = [name in _NUMERIC or name in self.metrics for name in self.names]


def cells(sweep: Sweep, trial: Trial, columns: Columns, rank: int | None = None) -> list[str]:
    """The trial's row under ``columns.names``; ``rank`` 1 reads ``1 best``."""
    view = trial.view
    last = view.rows[-1]["logs"] if view.rows else {}
    gpu = ",".join(map(str, trial.gpus)) if trial.gpus else ("CPU" if view.device == "CPU" else "")
    epoch = f"{view.epoch}/{view.epochs or '?'}" if view.epoch or view.epochs else ""
    return [
        str(trial.number),
        "" if rank is None else ("1 best" if rank == 1 else str(rank)),
        *(short_value(trial.params[k]) if k in trial.params else "" for k in columns.params),
        short_state(sweep, trial),
        *([gpu] if columns.gpu else []),
        epoch,
        *(format_number(last[m]) if isinstance(last.get(m), int | float) else "" for m in columns.metrics),
        format_seconds(view.elapsed) if view.elapsed is not None else "",
    ]


def table_rows(sweep: Sweep, columns: Columns) -> list[tuple[Trial, list[str]]]:
    """Every trial's row in trial order: rows stay put as the ranking changes (the rank is a column)."""
    with sweep.lock:
        placed = ranks(sweep)
        return [(t, cells(sweep, t, columns, placed.get(t.number))) for t in sweep.trials]


def legend_label(trial: Trial) -> str:
    """``#3 lr=0.01 units=8``: the curve's trial and its parameters, shortened."""
    return f"#{trial.number} {short_params(trial.params)}".rstrip()


def overlay_chart(sweep: Sweep) -> str:
    """Every trial's curve of the sweep's metric on one chart, each in its row's color, named with its parameters.

    chart.py picks a log axis when the values span more than 100x: the best trials' curves stay apart.
    """
    metric = sweep.metric
    with sweep.lock:
        curves = {legend_label(t): (t, t.curve(metric)) for t in sweep.trials}
    series = {name: points for name, (_, points) in curves.items() if points}
    if not series:
        return ""
    colors = {name: color_of(trial) for name, (trial, _) in curves.items()}
    unit = next((t.view.unit for t, points in curves.values() if points and t.view.unit), "epoch")
    chart = svg_chart(metric or "", series, colors, width=OVERLAY_WIDTH, unit=unit)
    # As wide as the cell allows and no wider (a 900 px window leaves a cell about 470 px): never a scrollbar.
    return chart.replace(' style="', ' style="max-width: 100%; height: auto; ', 1)


def errors(sweep: Sweep) -> list[str]:
    """One line per trial that failed, was cancelled or killed, or could not be followed: why."""
    return [f"trial {t.number} ({t.label}) {t.state}: {t.error}" for t in sweep.trials if t.error]


def render_sweep_text(sweep: Sweep, notes: list[str] | None = None) -> str:
    """The whole sweep as text: the finished panel in a terminal and in a saved notebook."""
    columns = Columns(sweep)
    table = [columns.names, *(row for _, row in table_rows(sweep, columns))]
    lines = [f"[remote_train] {sweep_title(sweep)}", *_text_table(table, columns.numeric).splitlines(), *errors(sweep)]
    lines += [f"note: {note}" for note in notes or []]
    return "\n".join(lines)


def render_sweep_html(sweep: Sweep, notes: list[str] | None = None) -> str:
    """The static panel: title, overlay chart, the table in trial order (best row bold), errors, notes."""
    columns = Columns(sweep)
    align = ["right" if right else "left" for right in columns.numeric]
    head = "".join(
        f"<th style='text-align:{a}'>{html.escape(n)}</th>" for n, a in zip(columns.names, align, strict=True)
    )
    body = ""
    state_at = columns.names.index("state")
    for trial, row in table_rows(sweep, columns):
        style = " style='font-weight:bold'" if row[1] == "1 best" else ""
        body += f"<tr{style}><td>{_swatch(trial)}{html.escape(row[0])}</td>"
        for i, cell in enumerate(row[1:], 1):
            full = state_text(sweep, trial) if i == state_at else cell
            title = f" title='{html.escape(full)}'" if full != cell else ""
            body += f"<td style='text-align:{align[i]}'{title}>{html.escape(cell)}</td>"
        body += "</tr>"
    table = f"<table class='remote-magic-sweep'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    extra = "".join(f"<div>{html.escape(line)}</div>" for line in errors(sweep))
    extra += "".join(f"<div>note: {html.escape(n)}</div>" for n in notes or [])
    return (
        f"<div class='remote-magic-panel'>{_CELL_PADDING}<div><b>{html.escape(sweep_title(sweep))}</b></div>"
        f"{overlay_chart(sweep)}<div style='max-height:24em;overflow:auto'>{table}</div>{extra}</div>"
    )


# One line per cell ("1 best" never wraps), padding narrow enough for a cell beside the sidebar at 900 px.
_CELL_PADDING = "<style>.remote-magic-sweep th,.remote-magic-sweep td{padding:1px 6px;white-space:nowrap}</style>"


def _swatch(trial: Trial) -> str:
    """A small box in the trial's curve color (a styled element, not a glyph: every font shows it)."""
    return (
        f"<span style='display:inline-block;width:0.8em;height:0.8em;margin-right:0.3em;"
        f"background:{color_of(trial)}'></span>"
    )


class SweepTextPanel:
    """The sweep as lines of text: each trial's start, epochs and end as they come, the ranked table at the end."""

    def __init__(self, sweep: Sweep, write: Callable[[str], Any] | None = None) -> None:
        self.sweep = sweep
        self.notes: list[str] = []
        self._said: dict[int, str] = {}  # the last reason to wait printed per trial
        self._metric_said = ""  # what the text last said ranks the trials
        self._write = write or (lambda text: (sys.stdout.write(text), sys.stdout.flush()))

    def set_actions(self, on_stop: Action, on_detach: Action, on_pick: Pick) -> None:
        """What the buttons and rows do; text has none (an interrupt stops the sweep)."""

    def trial_event(self, trial: Trial, event: dict[str, Any]) -> None:
        view, kind = trial.view, event["type"]
        who = f"trial {trial.number} ({trial.label})"
        if kind == protocol.STARTED:
            self._write(f"[remote_train] {who}: running · job {trial.job_id} · {view.device}\n")
        elif kind == protocol.EPOCH:
            self._say_metric()
            self._write(
                f"[remote_train] trial {trial.number} · {format_epoch(view.rows[-1], view.epochs, view.unit)}\n"
            )
        elif kind == protocol.QUEUED and view.reason and self._said.get(trial.number) != view.reason:
            self._said[trial.number] = view.reason  # once per reason: its place in the queue changes often
            self._write(f"[remote_train] {who}: {state_text(self.sweep, trial)}\n")
        elif kind == protocol.WARNING:
            self._write(f"[remote_train] {who} note: {event['message']}\n")
        elif kind in protocol.TERMINAL:
            metric = self.sweep.metric
            value = trial.last(metric)
            shown = f" · {metric} {value:.4f}" if value is not None else ""
            error = f": {view.error}" if view.error else ""
            self._write(f"[remote_train] {who}: {view.state}{shown}{error}\n")

    def note(self, text: str) -> None:
        self.notes.append(text)
        self._write(f"[remote_train] {text}\n")

    def progress(self, text: str) -> None:
        """Work before the trials start (an upload, an environment build)."""
        self._write(f"[remote_train] {text}\n")

    def _say_metric(self) -> None:
        """Name the metric once the first epoch shows which it is (or when a validation metric first appears)."""
        said = metric_text(self.sweep)
        if said != self._metric_said:
            self._metric_said = said
            self._write(f"[remote_train] {said}\n")

    def start(self) -> None:
        self._metric_said = metric_text(self.sweep)
        self._write(f"[remote_train] {sweep_title(self.sweep)}\n")

    def finish(self) -> None:
        self._write(render_sweep_text(self.sweep) + "\n")


class SweepWidgetPanel(ThrottledRedraw, SweepTextPanel):
    """The live sweep panel: header, Stop and Detach, the overlay chart, and the trials' table.

    Each row is one button (the whole row is the click target) whose text is
    the row's cells in a monospaced font.  Rows keep the trials' order, so the
    row under the pointer never changes as the ranking does; the rank is a
    column and the best row is bold.  What a click did is said on a line of
    fixed height, so nothing moves.
    """

    _THROTTLED = frozenset({protocol.STDOUT, protocol.STDERR, protocol.BATCH, protocol.GPU, protocol.QUEUED})
    _PICK_HINT = "click a trial's row to bring its outputs into the kernel"
    _LINE = "font-family:monospace;white-space:pre;font-size:var(--jp-widgets-font-size)"
    # A widget's HTML has the line height of a button (28 px): text that wraps would take a button's height a line.
    _TEXT = "line-height:1.4em"
    _ROW_PADDING = "0 4px"  # the rows' side padding (a button's is 10 px): the metric columns keep in view

    def __init__(self, sweep: Sweep) -> None:
        import ipywidgets as widgets
        from IPython.display import display

        super().__init__(sweep, write=lambda text: None)
        self.header = widgets.HTML()
        self.stop_button = widgets.Button(description="Stop", tooltip="stop every trial after its current batch")
        self.detach_button = widgets.Button(description="Detach", tooltip="return now; the trials run on")
        self.chart = widgets.HTML()
        # One line, always there: a click's result replaces its text and never pushes the table down.
        self.pick_line = widgets.HTML(
            self._pick_text(f"<i>{self._PICK_HINT}</i>"), layout=widgets.Layout(height="2.8em", overflow="hidden")
        )
        self.head = widgets.HTML(layout=widgets.Layout(margin="0"))
        self.pick_buttons = {
            t.number: widgets.Button(
                tooltip=f"trial {t.number} ({t.label}): click to inject its outputs",
                layout=widgets.Layout(
                    width="max-content", margin="0", padding=self._ROW_PADDING, border_left=f"6px solid {color_of(t)}"
                ),
                style={"font_family": "monospace", "button_color": "transparent"},
            )
            for t in sweep.trials
        }
        self.table = widgets.VBox(
            [self.head, *self.pick_buttons.values()], layout=widgets.Layout(max_height="24em", overflow="auto")
        )
        self.footer = widgets.HTML()
        self._on_pick: Callable[[Trial], Any] | None = None
        self._picking: int | None = None  # the thread running a click's injection: its notes go on the pick line
        self._actions: dict[str, Action] = {}
        self._shown_notes: list[str] = []  # notes for the footer (a click's are on the pick line)
        for trial in sweep.trials:
            self.pick_buttons[trial.number].on_click(lambda _b, trial=trial: self._pick(trial))
        self.stop_button.on_click(lambda _b: self._act("stop"))
        self.detach_button.on_click(lambda _b: self._act("detach"))
        self.box = widgets.VBox(
            [
                self.header,
                widgets.HBox([self.stop_button, self.detach_button]),
                self.chart,
                self.pick_line,
                self.table,
                self.footer,
            ]
        )
        self._init_redraw()
        self._refresh()
        static = StaticBundle(sweep, self._static_text, self._static_html)
        self.display_handle = display(LiveBundle(self.box, static), display_id=True)

    def set_actions(self, on_stop: Action, on_detach: Action, on_pick: Pick) -> None:
        self._actions = {"stop": on_stop, "detach": on_detach}
        self._on_pick = on_pick
        self.stop_button.disabled, self.detach_button.disabled = on_stop is None, on_detach is None
        # Set last: changing ``disabled`` routes the buttons' messages back to the main shell.
        if serve_clicks_while_busy([self.stop_button, self.detach_button, *self.pick_buttons.values()]):
            _keep_in_subshell(list(self.pick_buttons.values()))

    def _act(self, name: str) -> None:
        action = self._actions.get(name)
        if action is not None:
            self._run(action)

    def _pick(self, trial: Trial) -> None:
        on_pick = self._on_pick
        if on_pick is None:
            return
        with self._lock:
            self.pick_line.value = self._pick_text(
                html.escape(f"loading the outputs of trial {trial.number} ({trial.label})…")
            )
        self._picking = threading.get_ident()
        try:
            self._run(lambda: on_pick(trial))
        finally:
            self._picking = None

    def _header(self) -> str:
        """The title on two lines that never wrap (cut short, all of it on hover): as the counts and the clock
        change, the header keeps its height and the rows below stay under the pointer.  ``contain: inline-size``:
        a line's full length never widens the panel (it would scroll sideways in a narrow window)."""
        full = html.escape(sweep_title(self.sweep))
        line = (
            f"{self._TEXT};white-space:nowrap;overflow:hidden;text-overflow:ellipsis;font-weight:bold;"
            "contain:inline-size"
        )
        return "".join(f"<div style='{line}' title='{full}'>{html.escape(' · '.join(part))}</div>"
                       for part in title_parts(self.sweep))  # fmt: skip

    def _pick_text(self, shown: str, full: str = "") -> str:
        """The pick line's text: two lines at most (its height is fixed: nothing below moves), all of it on hover."""
        title = f" title='{html.escape(full)}'" if full else ""
        return f"<div style='{self._TEXT};max-height:2.8em;overflow:hidden'{title}>{shown}</div>"

    def _run(self, action: Callable[[], Any]) -> None:
        try:
            action()
        except Exception as exc:  # noqa: BLE001  (a click has no cell to raise into)
            self.note(f"{type(exc).__name__}: {exc}")

    def trial_event(self, trial: Trial, event: dict[str, Any]) -> None:
        with self._lock:
            self._redraw(event["type"] in self._THROTTLED)

    def note(self, text: str) -> None:
        with self._lock:
            self.notes.append(text)
            if self._picking == threading.get_ident():
                self.pick_line.value = self._pick_text(html.escape(text), text)
            else:
                self._shown_notes.append(text)
            self._refresh()

    def progress(self, text: str) -> None:
        with self._lock:
            self.header.value = self._header() + f"<div style='{self._TEXT}'>{html.escape(text)}</div>"

    def start(self) -> None:
        with self._lock:
            self._refresh()

    def finish(self) -> None:
        """Draw what is pending, then swap the live widget for the static copy of the finished sweep."""
        self._stop_redrawing()
        self.stop_button.disabled = self.detach_button.disabled = True
        if self.display_handle is not None:
            self.display_handle.update(StaticBundle(self.sweep, self._static_text, self._static_html))

    def _static_text(self, sweep: Sweep) -> str:
        return render_sweep_text(sweep, self.notes)

    def _static_html(self, sweep: Sweep) -> str:
        return render_sweep_html(sweep, self.notes)

    def _refresh(self) -> None:
        self._drawn()
        sweep = self.sweep
        _set(self.header, self._header())
        _set(self.chart, overlay_chart(sweep))
        lines = [*errors(sweep), *(f"note: {n}" for n in self._shown_notes[-3:])]
        _set(self.footer, "".join(f"<div>{html.escape(line)}</div>" for line in lines))
        columns = Columns(sweep)
        rows = table_rows(sweep, columns)
        head, *texts = _text_table([columns.names, *(row for _, row in rows)], columns.numeric).splitlines()
        _set(self.head, f"<div style='{self._LINE};font-weight:bold;padding:{self._ROW_PADDING};"
             f"border-left:6px solid transparent'>{html.escape(head)}</div>")  # fmt: skip
        for (trial, row), text in zip(rows, texts, strict=True):
            button = self.pick_buttons[trial.number]
            # every row as wide as the widest; a button collapses runs of spaces, these keep the columns
            description = text.ljust(max(map(len, texts))).replace(" ", "\u00a0")
            tooltip = f"trial {trial.number} ({trial.label}): {state_text(sweep, trial)}; click to inject its outputs"
            if (button.description, button.tooltip) != (description, tooltip):
                with button.hold_sync():
                    button.description, button.tooltip = description, tooltip
            weight = "bold" if row[1] == "1 best" else "normal"
            if button.style.font_weight != weight:
                button.style.font_weight = weight


def _keep_in_subshell(buttons: list[Any]) -> None:
    """Serve these buttons' clicks in the subshell ``serve_clicks_while_busy`` gave them, whatever is sent later.

    ipykernel 7 routes a comm's messages to the subshell that last sent on it;
    a row's text changes with every epoch, sent from the cell's threads, so
    without this a click lands in the busy main shell and waits for the cell
    to end.  Another ipykernel internal (``_reply_subshell_for``): where it
    is missing nothing changes.
    """
    for button in buttons:
        comm = getattr(button, "comm", None)
        subshell = getattr(comm, "_reply_subshell_id", None)
        if comm is not None and subshell is not None and hasattr(comm, "_reply_subshell_for"):
            comm._reply_subshell_for = lambda data, default, subshell=subshell: subshell


def _set(widget: Any, value: str) -> None:
    """Send a widget's new value only when it changed: every change is a message to the browser."""
    if widget.value != value:
        widget.value = value


def make_sweep_panel(sweep: Sweep, mode: str = "auto") -> SweepTextPanel:
    return SweepWidgetPanel(sweep) if wants_widgets(mode) else SweepTextPanel(sweep)
