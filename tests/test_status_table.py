"""``%remote_status``'s table as a user reads it: newest first, text left and numbers right, a sweep in one row."""

from __future__ import annotations

import re

from remote_magic.ui.status import StatusTable


def _job(job_id: str, submitted: float, state: str = "done", sweep: dict | None = None, **fields) -> dict:  # type: ignore[no-untyped-def]
    return {"job_id": job_id, "name": None, "title": "model.fit(x, y)", "state": state, "submitted": submitted,
            "started": submitted + 1, "ended": submitted + 9 if state == "done" else None, "epoch": 2, "epochs": 2,
            "logs": {"loss": 0.5}, "sweep": sweep, **fields}  # fmt: skip


def _trial(number: int, state: str, val_loss: float | None) -> dict:
    sweep = {"id": "sweep-20261127-140500-abcdef", "trial": number, "params": {"lr": 10.0**-number, "units": 8}}
    logs = {"loss": 1.0} if val_loss is None else {"loss": 1.0, "val_loss": val_loss}
    return _job(f"20261127-1405{number:02d}-00000{number}", 1000.0 + number, state, sweep, logs=logs)


def test_newest_first_with_a_sweep_in_one_row_of_counts_and_its_best_metric() -> None:
    """Issue 21: oldest first, and one sweep spread over 12 rows."""
    rows = [
        _job("20261127-100000-aaaaaa", 900.0, name="oldest"),
        *(_trial(n, state, value) for n, state, value in [(0, "done", 0.4), (1, "done", 0.02), (2, "running", None)]),
        _job("20261127-120000-bbbbbb", 2000.0, "running", name="newest"),
    ]
    table = StatusTable("gpu1", rows)
    lines = repr(table).splitlines()[2:]
    assert [line.split()[0] for line in lines] == [
        "20261127-120000-bbbbbb", "sweep-20261127-140500-abcdef", "20261127-100000-aaaaaa",
    ]  # fmt: skip
    sweep_line = lines[1]
    assert "lr × units (3 trials)" in sweep_line and "2 done, 1 running" in sweep_line
    assert "val_loss 0.02 (trial 1)" in sweep_line
    assert table.rows == rows  # ``jobs.rows`` keeps every job, as listed

    trials = StatusTable("gpu1", rows[1:4])  # what ``%remote_status sweep-...`` shows: its trials
    assert [line.split()[0] for line in repr(trials).splitlines()[2:]] == [r["job_id"] for r in rows[1:4]]


def test_text_columns_read_from_the_left_and_numbers_from_the_right() -> None:
    """JupyterLab right-aligns table cells unless told: names and states were ragged on the left."""
    page = StatusTable("gpu1", [_job("20261127-100000-aaaaaa", 900.0, name="a long job name")])._repr_html_()
    header = re.findall(r"<th style='text-align:(\w+)'>(\w+)</th>", page)
    assert dict((name, side) for side, name in header) == {
        "job": "left", "name": "left", "state": "left", "epoch": "right", "loss": "right", "started": "left",
        "duration": "right",
    }  # fmt: skip
    assert "<td style='text-align:left'>a long job name</td>" in page
    assert "<td style='text-align:right'>0.5000</td>" in page
    text = repr(
        StatusTable(
            "gpu1",
            [
                _job("20261127-100000-aaaaaa", 900.0, name="x"),
                _job("20261127-100000-cccccc", 950.0, name="longer name"),
            ],
        )
    )
    name_at = [line.index("x") if " x " in line else line.index("longer") for line in text.splitlines()[2:]]
    assert len(set(name_at)) == 1  # the names start in one column
