"""``%remote_status`` output: an HTML table in a notebook, text elsewhere."""

from __future__ import annotations

import html
import time
from typing import Any

from ..session.job_view import describe_device, format_seconds

_COLUMNS = ("job", "name", "state", "epoch", "loss", "started", "duration")


def _cells(row: dict[str, Any]) -> list[str]:
    """The row's values under ``_COLUMNS``."""
    epoch = "" if row.get("epoch") is None else f"{row['epoch']}/{row.get('epochs') or '?'}"
    loss = row.get("logs", {}).get("loss")
    started = row.get("started") or row.get("submitted")
    end = row.get("ended") or (time.time() if row["state"] in ("running", "queued") else None)
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
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "",
        duration,
    ]


_GPU_COLUMNS = ("gpu", "model", "memory", "utilization", "held by")


def _gpu_cells(gpu: dict[str, Any]) -> list[str]:
    return [
        str(gpu["index"]),
        gpu["name"],
        f"{gpu['memory_used'] / 1024:.1f} / {gpu['memory_total'] / 1024:.1f} GiB",
        f"{gpu['utilization']}%",
        gpu.get("holder") or "free",
    ]


class StatusTable:
    """Jobs of one host (``host`` given) or of every host this machine used (a host column).

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
        rows = [_cells(row) if self.host else [row["host"], *_cells(row)] for row in self.rows]
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
    header, *rows = table
    head = "".join(f"<th>{html.escape(c)}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _text_table(table: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table)


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
