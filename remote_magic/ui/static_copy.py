"""A job's panel as text and static HTML: what a terminal prints, and what a saved notebook, nbconvert's
export and a notebook opened without a kernel show.  The live panels (``panel.py``) draw the same pieces.
"""

from __future__ import annotations

import html
import time
from typing import Any

from ..agent import protocol
from ..session.job_view import JobView, format_seconds
from .chart import BACKGROUND, FRAME, GRID, TEXT, format_number, svg_charts

# A job may print without end: the copy keeps only a tail, and the full log stays in events.jsonl on the host.
_STATIC_LINES_SHOWN = 50  # the saved notebook's copy
_STATIC_CHARS_SHOWN = 20_000  # and at most this much of it, however long its lines


def format_epoch(row: dict[str, Any], epochs: int | None, unit: str = "epoch") -> str:
    """``Epoch 3/20 - loss: 0.4102 - 1.2s`` (``Step`` for a remote_log loop)."""
    metrics = " - ".join(f"{k}: {format_number(v)}" for k, v in row["logs"].items())
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


TABLE_ROWS_IN_FULL = 30  # a longer table is a scroll box holding every row, scrolled to the newest
# Theme colors through JupyterLab's CSS variables (readable fallbacks for nbconvert's page).  The scroll box is
# a reversed flex column: a browser starts it at its bottom end and keeps it there as rows arrive, without script.
_TABLE_STYLE = (
    f"<style>.remote-magic-metrics{{border-collapse:collapse;font-size:12px;color:{TEXT};background:{BACKGROUND}}}"
    f".remote-magic-metrics th,.remote-magic-metrics td{{padding:1px 8px;text-align:right;border-bottom:1px solid {GRID}}}"
    f".remote-magic-metrics th{{border-bottom:1px solid {FRAME};position:sticky;top:0;"
    "background:var(--jp-layout-color1, Canvas)}"
    ".remote-magic-scroll{display:inline-flex;flex-direction:column-reverse;max-height:20em;overflow:auto;"
    "max-width:100%}.remote-magic-caption{font-size:11px;color:var(--jp-ui-font-color2, #616161)}</style>"
)


def render_table_html(view: JobView, in_full: int = TABLE_ROWS_IN_FULL) -> str:
    """Every row, the newest at the bottom; a long table is a labelled scroll box that starts at the newest row.
    A column none of the rows has is left out, and no table at all before the first row."""
    if not view.rows:
        return ""
    names = view.metric_names()
    timed = any(row.get("seconds") is not None for row in view.rows)
    head = "".join(f"<th>{html.escape(n)}</th>" for n in [view.unit, *names, *(["time"] if timed else [])])
    body = ""
    for row in view.rows:
        cells = [str(row["epoch"])] + [format_number(row["logs"][n]) if n in row["logs"] else "" for n in names]
        if timed:
            cells.append(format_seconds(row["seconds"]) if row.get("seconds") is not None else "")
        body += "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"
    table = f"<table class='remote-magic-metrics'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    if len(view.rows) <= in_full:
        return _TABLE_STYLE + table
    caption = f"all {len(view.rows):,} {view.unit}s, newest at the bottom (scroll up for earlier ones)"
    return (
        f"{_TABLE_STYLE}<div class='remote-magic-caption'>{caption}</div>"
        f"<div class='remote-magic-scroll'><div>{table}</div></div>"
    )


def progress_line(view: JobView) -> str:
    """``12/20 steps`` (and the batch within the epoch where Keras reports batches); "" before the first."""
    if not view.epoch and not view.epochs:
        return ""
    line = f"{view.epoch}/{view.epochs or '?'} {view.unit}s"
    if view.steps and view.state == protocol.STATE_RUNNING:
        line += f" · batch {view.batch}/{view.steps}"
    return line


_ENDED = frozenset(protocol.TERMINAL_STATE.values()) | {protocol.STATE_STOPPED}


def where_it_was_followed(view: JobView, live: bool = False) -> str:
    """What a copy of the panel is, in words: it outlives the kernel session that drew it (a restart, a notebook
    opened later, an export), and then only ``%remote_attach`` shows the job again.

    ``live``: the copy is the panel this kernel keeps redrawing (a detached job's); else it stands where the live
    widget cannot be shown, so another kernel session (or none) followed the job.
    """
    if not view.job_id:
        return ""
    attach = f"`%remote_attach {view.job_id} --host {view.host}`"
    done = progress_line(view) or f"no {view.unit}s"
    if view.ended is not None or view.state in _ENDED:
        return f"job {view.job_id} on host {view.host}: {view.state}, {done}; {attach} shows it again"
    when = time.strftime("%H:%M:%S")
    if live:
        return (
            f"job {view.job_id} on host {view.host}: {view.shown_state()}, {done} at {when}, followed by the kernel "
            f"session that ran this cell; if that session has ended, {attach} shows the job again"
        )
    return (
        f"job {view.job_id} on host {view.host}: {view.shown_state()}, {done} at {when} "
        f"(followed in another kernel session; {attach} shows it again)"
    )


def render_html(view: JobView, live: bool = False) -> str:
    """The static panel: what a saved notebook and nbconvert's HTML export show, the job's last state.

    ``live``: a detached job's panel, redrawn while this kernel follows it.
    """
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
    waiting = view.waiting_line() or view.progress
    top = "".join(f"<div>{html.escape(line)}</div>" for line in (progress_line(view), waiting) if line)
    where = where_it_was_followed(view, live)
    where = (
        f"<div class='remote-magic-where' style='color:var(--jp-ui-font-color2, #616161)'>{html.escape(where)}</div>"
    )
    return (
        f"<div class='remote-magic-panel' data-state='{html.escape(view.state)}' "
        f"style='color:{TEXT};background:{BACKGROUND}'><b>{html.escape(view.title())}</b>{top}"
        f"{svg_charts(view.rows, view.unit)}{render_table_html(view)}{output}{notes}{error}{where}</div>"
    )
