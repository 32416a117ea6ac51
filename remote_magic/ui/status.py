"""``%remote_status`` output: an HTML table in a notebook, text elsewhere."""

from __future__ import annotations

import html
import time
from typing import Any

from ..session.job_view import describe_device, format_seconds
from ..sweep import default_metric, default_mode

_COLUMNS = ("job", "name", "state", "epoch", "loss", "started", "duration")
# Columns of numbers: right-aligned (text columns read from the left).
_NUMERIC = frozenset({"epoch", "loss", "duration", "gpu", "memory", "utilization"})


def _cells(row: dict[str, Any]) -> list[str]:
    """The row's values under ``_COLUMNS``."""
    epoch = "" if row.get("epoch") is None else f"{row['epoch']}/{row.get('epochs') or '?'}"
    loss = row.get("logs", {}).get("loss")
    started = row.get("started") or row.get("submitted")
    end = row.get("ended") or (time.time() if row["state"] in ("running", "queued") else None)
    if row.get("trials"):  # a sweep's row: its best metric where a job's loss goes
        duration = format_seconds(end - row["started"]) if row.get("started") and end else ""
        return [row["job_id"], row["name"], row["state"], "", row["best"], _clock(started), duration]
    if row["state"] in ("unreachable", "gone"):
        return [row["job_id"], row.get("name") or "", f"{row['state']}: {row.get('message')}", "", "", "", ""]
    duration = format_seconds(end - row["started"]) if row.get("started") and end else ""
    state = row["state"]
    if state in ("queued", "requeued") and row.get("reason"):
        state = f"{state} #{row['position']}: {row['reason']}" if row.get("position") else f"{state}: {row['reason']}"
    elif state == "running" and str(row.get("launcher") or "").startswith("slurm") and row.get("where"):
        state = f"running on {row['where']}"  # a cluster's node
    return [
        row["job_id"],
        row.get("name") or row.get("title") or "",
        state,
        epoch,
        "" if loss is None else f"{loss:.4f}",
        _clock(started),
        duration,
    ]


def _clock(when: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when)) if when else ""


_GPU_COLUMNS = ("gpu", "model", "memory", "utilization", "held by")


def _gpu_cells(gpu: dict[str, Any]) -> list[str]:
    return [
        str(gpu["index"]),
        gpu["name"],
        f"{gpu['memory_used'] / 1024:.1f} / {gpu['memory_total'] / 1024:.1f} GiB",
        f"{gpu['utilization']}%",
        gpu.get("holder") or "free",
    ]


def _when(row: dict[str, Any]) -> float:
    return row.get("registered") or row.get("submitted") or row.get("started") or 0.0


def _sweep_of(row: dict[str, Any]) -> dict[str, Any]:
    sweep = row.get("sweep")
    return sweep if isinstance(sweep, dict) and sweep.get("id") else {}


def _sweep_row(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """A sweep's trials as one row: its id, its grid, trial counts by state, its best metric so far."""
    sweep = _sweep_of(trials[0])
    names = list(dict.fromkeys(key for row in trials for key in (_sweep_of(row).get("params") or {})))
    counts: dict[str, int] = {}
    for row in trials:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    metric = sweep.get("metric") or default_metric(dict.fromkeys(n for row in trials for n in row.get("logs") or {}))
    mode = sweep.get("mode") or default_mode(metric)
    scored = [
        (row["logs"][metric], row) for row in trials if isinstance((row.get("logs") or {}).get(metric), int | float)
    ]
    best = (min if mode == "min" else max)(scored, key=lambda pair: pair[0]) if scored else None
    started = [row["started"] for row in trials if row.get("started")]
    ended = [row.get("ended") for row in trials]
    return {
        "job_id": sweep["id"],
        "host": trials[0].get("host"),
        "name": f"{sweep.get('name') or 'sweep'} {' × '.join(names)}".strip() + f" ({len(trials)} trials)",
        "state": ", ".join(f"{count} {state}" for state, count in counts.items()),
        "best": f"{metric} {best[0]:.4g} (trial {_sweep_of(best[1]).get('trial')})" if best else "",
        "started": min(started) if started else None,
        "ended": max(ended) if started and all(ended) else None,  # type: ignore[type-var]
        "registered": min(_when(row) for row in trials),
        "trials": True,
    }


def _display_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Newest first, each sweep one row (where it has its newest trial) unless the table is one sweep's trials."""
    sweeps = {_sweep_of(row).get("id") for row in rows}
    if len(sweeps) == 1 and None not in sweeps:  # ``%remote_status sweep-...``: its trials, in trial order
        return sorted(rows, key=lambda row: _sweep_of(row).get("trial", 0))
    shown: list[dict[str, Any]] = []
    grouped: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        sweep_id = _sweep_of(row).get("id")
        if sweep_id is None:
            shown.append(row)
        elif sweep_id not in grouped:
            grouped[sweep_id] = [row]
            shown.append(row)  # replaced by the sweep's row below, in this place
        else:
            grouped[sweep_id].append(row)
    shown = [_sweep_row(grouped[_sweep_of(row)["id"]]) if _sweep_of(row) else row for row in shown]
    return sorted(shown, key=_when, reverse=True)


class StatusTable:
    """Jobs of one host (``host`` given) or of every host this machine used (a host column).

    Shown newest first, a sweep as one row (``%remote_status SWEEP_ID`` lists
    its trials); ``rows`` keeps every job as listed, oldest first.
    ``gpus``: the host's GPUs and who holds each, shown above the jobs.
    """

    def __init__(self, host: str | None, rows: list[dict[str, Any]], gpus: list[dict[str, Any]] | None = None) -> None:
        self.host = host
        self.rows = rows
        self.gpus = gpus or []

    def _gpu_table(self) -> list[list[str]]:
        return [list(_GPU_COLUMNS), *(_gpu_cells(g) for g in self.gpus)]

    def _title(self) -> str:
        return f"Jobs on host {self.host}" if self.host else "Jobs submitted from this machine"

    def _table(self) -> list[list[str]]:
        header = list(_COLUMNS) if self.host else ["host", *_COLUMNS]
        shown = _display_rows(self.rows)
        rows = [_cells(row) if self.host else [row.get("host") or "", *_cells(row)] for row in shown]
        return [header, *rows]

    def _empty(self) -> str:
        return f"No jobs on host {self.host}." if self.host else "No jobs submitted from this machine yet."

    def _repr_html_(self) -> str:
        gpus = ""
        if self.gpus:
            gpus = f"<p><b>GPUs of host {html.escape(self.host or '')}</b></p>{_html_table(self._gpu_table())}"
        if not self.rows:
            return f"{gpus}<p>{html.escape(self._empty())}</p>"
        return f"{gpus}<p><b>{html.escape(self._title())}</b></p>{_html_table(self._table())}"

    def __repr__(self) -> str:
        gpus = f"GPUs of host {self.host}\n{_text_table(self._gpu_table())}\n" if self.gpus else ""
        if not self.rows:
            return gpus + self._empty()
        return f"{gpus}{self._title()}\n{_text_table(self._table())}"


def _html_table(table: list[list[str]]) -> str:
    """Text columns left-aligned, numbers right-aligned (JupyterLab right-aligns every cell otherwise)."""
    header, *rows = table
    aligns = ["right" if name in _NUMERIC else "left" for name in header]
    head = "".join(f"<th style='text-align:{a}'>{html.escape(c)}</th>" for c, a in zip(header, aligns, strict=True))
    body = "".join(
        "<tr>"
        + "".join(f"<td style='text-align:{a}'>{html.escape(c)}</td>" for c, a in zip(row, aligns, strict=True))
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _text_table(table: list[list[str]], right: list[bool] | None = None) -> str:
    """Columns padded to their widths: numbers (``right``, else by the header's name) right-aligned."""
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    right = right or [name in _NUMERIC for name in table[0]]
    return "\n".join(
        "  ".join(c.rjust(w) if r_ else c.ljust(w) for c, w, r_ in zip(r, widths, right, strict=True)).rstrip()
        for r in table
    )


class JobDetail:
    def __init__(self, host: str, row: dict[str, Any]) -> None:
        self.host = host
        self.row = row

    def _lines(self) -> list[str]:
        row = self.row
        cells = dict(zip(_COLUMNS, _cells(row), strict=True))
        lines = [f"job {row['job_id']} on host {self.host}: {row['state']}"]
        for key in ("name", "epoch", "loss", "started", "duration"):
            if cells[key]:
                lines.append(f"  {key}: {cells[key]}")
        lines.append(f"  device: {describe_device(row.get('device'))}")
        spec = row.get("spec", {})
        lines.append(
            f"  inputs: {', '.join(spec.get('inputs', [])) or '-'}; outputs: {', '.join(spec.get('outputs', [])) or '-'}"
        )
        if row.get("logs"):
            lines.append("  last metrics: " + ", ".join(f"{k}={v:.4f}" for k, v in row["logs"].items()))
        if row.get("message"):
            lines.append(f"  {row['message']}")
        if row.get("log_tail"):
            lines.append("  last output lines:")
            lines += ["    " + line.rstrip("\n") for line in row["log_tail"]]
        if row.get("traceback"):
            lines.append("  error:")
            lines += ["    " + line for line in row["traceback"].rstrip().splitlines()]
        return lines

    def __repr__(self) -> str:
        return "\n".join(self._lines())

    def _repr_html_(self) -> str:
        return "<pre>" + html.escape(repr(self)) + "</pre>"
