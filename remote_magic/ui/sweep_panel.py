"""The panel of a sweep: one row per trial, ranked by the sweep's metric, and every trial's curve on one chart.

Like the job panel (panel.py): ipywidgets in Jupyter, plain text elsewhere,
and a static HTML and text copy once the sweep ended, so a saved notebook
shows the finished table and chart.  Everything shown is derived from the
``Sweep`` and its trials' events.
"""

from __future__ import annotations

import html
import sys
import time
from collections.abc import Callable
from typing import Any

from ..agent import protocol
from ..session.job_view import format_seconds
from ..sweep import Action, Pick, Sweep, Trial
from .chart import PALETTE, WIDTH, svg_chart
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
    """``sweep sweep-... · host gpu1 · 6 trials, 3 at a time · ranked by val_loss (min) · 2 running, 4 done · 41.0s``"""
    parts = [f"sweep {sweep.id}", f"host {sweep.host}"]
    at_once = f", {sweep.parallel} at a time" if sweep.parallel else ""
    parts.append(f"{len(sweep.trials)} trials{at_once}")
    parts.append(metric_text(sweep))
    parts.append(", ".join(f"{count} {state}" for state, count in sweep.counts().items()))
    started = [t.view.started for t in sweep.trials if t.view.started is not None]
    if started:
        ends = [t.view.ended for t in sweep.trials]
        end = max(e for e in ends if e is not None) if all(e is not None for e in ends) else None
        parts.append(format_seconds((end or time.time()) - min(started)))
    return " · ".join(parts)


def state_text(sweep: Sweep, trial: Trial) -> str:
    """The trial's state, with why a queued trial waits (its sweep's id shortened: the panel names it once)."""
    waiting = trial.view.waiting_line()
    if waiting:
        return waiting.replace(f"a trial of {sweep.id}", "a trial of this sweep")
    return trial.state


class Columns:
    """The table's columns: the trial, its parameters, state, GPU, epoch, every metric logged, time."""

    def __init__(self, sweep: Sweep) -> None:
        self.params = list(dict.fromkeys(key for trial in sweep.trials for key in trial.params))
        self.metrics = sweep.metric_names()
        self.names = ["trial", *self.params, "state", "GPU", "epoch", *self.metrics, "time"]


def cells(sweep: Sweep, trial: Trial, columns: Columns) -> list[str]:
    """The trial's row under ``columns.names``."""
    view = trial.view
    last = view.rows[-1]["logs"] if view.rows else {}
    gpu = ",".join(map(str, trial.gpus)) if trial.gpus else ("CPU" if view.device == "CPU" else "")
    epoch = f"{view.epoch}/{view.epochs or '?'}" if view.epoch or view.epochs else ""
    return [
        str(trial.number),
        *(repr(trial.params[k]) if k in trial.params else "" for k in columns.params),
        state_text(sweep, trial),
        gpu,
        epoch,
        *(f"{last[m]:.4f}" if isinstance(last.get(m), int | float) else "" for m in columns.metrics),
        format_seconds(view.elapsed) if view.elapsed is not None else "",
    ]


def overlay_chart(sweep: Sweep) -> str:
    """Every trial's curve of the sweep's metric on one chart, each in its row's color."""
    metric = sweep.metric
    with sweep.lock:
        series = {f"#{t.number}": t.curve(metric) for t in sweep.trials}
    series = {name: points for name, points in series.items() if points}
    colors = {f"#{t.number}": color_of(t) for t in sweep.trials}
    return svg_chart(metric or "", series, colors, width=OVERLAY_WIDTH) if series else ""


def errors(sweep: Sweep) -> list[str]:
    """One line per trial that failed, was cancelled or killed, or could not be followed: why."""
    return [f"trial {t.number} ({t.label}) {t.state}: {t.error}" for t in sweep.trials if t.error]


def render_sweep_text(sweep: Sweep, notes: list[str] | None = None) -> str:
    """The whole sweep as text: the finished panel in a terminal and in a saved notebook."""
    columns = Columns(sweep)
    with sweep.lock:
        table = [columns.names, *(cells(sweep, t, columns) for t in sweep.ranked())]
    lines = [f"[remote_train] {sweep_title(sweep)}", _text_table(table), *errors(sweep)]
    lines += [f"note: {note}" for note in notes or []]
    return "\n".join(lines)


def render_sweep_html(sweep: Sweep, notes: list[str] | None = None) -> str:
    """The static panel: title, overlay chart, ranked table (best row bold), errors, notes."""
    columns = Columns(sweep)
    head = "".join(f"<th>{html.escape(n)}</th>" for n in columns.names)
    body = ""
    with sweep.lock:
        ranked = sweep.ranked()
        best = ranked[0] if ranked and ranked[0].last(sweep.metric) is not None else None
        for trial in ranked:
            row = cells(sweep, trial, columns)
            swatch = _swatch(trial)
            style = " style='font-weight:bold'" if trial is best else ""
            body += f"<tr{style}><td>{swatch}{html.escape(row[0])}</td>"
            body += "".join(f"<td>{html.escape(c)}</td>" for c in row[1:]) + "</tr>"
    table = f"<table class='remote-magic-sweep'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    extra = "".join(f"<div>{html.escape(line)}</div>" for line in errors(sweep))
    extra += "".join(f"<div>note: {html.escape(n)}</div>" for n in notes or [])
    return (
        f"<div class='remote-magic-panel'><b>{html.escape(sweep_title(sweep))}</b>{overlay_chart(sweep)}"
        f"<div style='max-height:24em;overflow:auto'>{table}</div>{extra}</div>"
    )


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

    Each row starts with a button: a click injects that trial's outputs.
    Rows are widgets (a grid), re-ordered as the ranking changes.
    """

    _THROTTLED = frozenset({protocol.STDOUT, protocol.STDERR, protocol.BATCH, protocol.GPU, protocol.QUEUED})

    def __init__(self, sweep: Sweep) -> None:
        import ipywidgets as widgets
        from IPython.display import display

        super().__init__(sweep, write=lambda text: None)
        self._widgets = widgets
        self.header = widgets.HTML()
        self.stop_button = widgets.Button(description="Stop", tooltip="stop every trial after its current batch")
        self.detach_button = widgets.Button(description="Detach", tooltip="return now; the trials run on")
        self.chart = widgets.HTML()
        self.grid = widgets.GridBox(layout=widgets.Layout(max_height="24em", overflow="auto", grid_gap="0 12px"))
        self.pick_buttons = {
            t.number: widgets.Button(
                description=f"#{t.number}",
                tooltip=f"inject the outputs of trial {t.number} ({t.label})",
                layout=widgets.Layout(width="auto", border_left=f"6px solid {color_of(t)}"),
            )
            for t in sweep.trials
        }
        self._cells: dict[int, list[Any]] = {}
        self._columns: list[str] = []
        self._head: list[Any] = []
        self._on_pick: Callable[[Trial], Any] | None = None
        self._actions: dict[str, Action] = {}
        for trial in sweep.trials:
            self.pick_buttons[trial.number].on_click(lambda _b, trial=trial: self._pick(trial))
        self.stop_button.on_click(lambda _b: self._act("stop"))
        self.detach_button.on_click(lambda _b: self._act("detach"))
        self.box = widgets.VBox(
            [self.header, widgets.HBox([self.stop_button, self.detach_button]), self.chart, self.grid]
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
        serve_clicks_while_busy([self.stop_button, self.detach_button, *self.pick_buttons.values()])

    def _act(self, name: str) -> None:
        action = self._actions.get(name)
        if action is not None:
            self._run(action)

    def _pick(self, trial: Trial) -> None:
        on_pick = self._on_pick
        if on_pick is not None:
            self._run(lambda: on_pick(trial))

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
            self._refresh()

    def progress(self, text: str) -> None:
        with self._lock:
            self.header.value = f"<b>{html.escape(sweep_title(self.sweep))}</b><div>{html.escape(text)}</div>"

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
        lines = [*self.notes[-3:], *errors(sweep)]
        self.header.value = f"<b>{html.escape(sweep_title(sweep))}</b>" + "".join(
            f"<div>{html.escape(line)}</div>" for line in lines
        )
        self.chart.value = overlay_chart(sweep)
        columns = Columns(sweep)
        names = columns.names
        widgets = self._widgets
        if names != self._columns:  # a new metric appeared: one more cell per row
            self._columns = names
            self._cells = {t.number: [widgets.HTML() for _ in names[1:]] for t in sweep.trials}
            self.grid.layout.grid_template_columns = " ".join(["max-content"] * len(names))
            self._head = [widgets.HTML(f"<b>{html.escape(n)}</b>") for n in names]
        children: list[Any] = list(self._head)
        with sweep.lock:
            ranked = sweep.ranked()
            for trial in ranked:
                row = cells(sweep, trial, columns)
                for widget, text in zip(self._cells[trial.number], row[1:], strict=True):
                    if widget.value != html.escape(text):
                        widget.value = html.escape(text)
                children += [self.pick_buttons[trial.number], *self._cells[trial.number]]
        if tuple(children) != tuple(self.grid.children):
            self.grid.children = tuple(children)


def make_sweep_panel(sweep: Sweep, mode: str = "auto") -> SweepTextPanel:
    return SweepWidgetPanel(sweep) if wants_widgets(mode) else SweepTextPanel(sweep)
