"""The widget panel, driven by a real job's events, and its static copy."""

from __future__ import annotations

import re

from conftest import run

from remote_magic import session
from remote_magic.transport import LocalTransport
from remote_magic.ui.chart import metric_groups
from remote_magic.ui.panel import WidgetPanel, format_epoch, render_html, render_text
from remote_magic.wire.client import AgentClient

CELL = """
import numpy as np
import keras
x = np.random.default_rng(1).random((128, 4), dtype=np.float32)
y = (x.sum(axis=1) > 2).astype("float32")
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, activation="sigmoid")])
model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
"""


def _snapshot(panel: WidgetPanel) -> dict:
    charts = re.findall(r'data-series="([^"]+)" points="([^"]*)"', panel.chart.value)
    return {
        "epoch_bar": (panel.epoch_bar.value, panel.epoch_bar.max),
        "batch_bar": (panel.batch_bar.value, panel.batch_bar.max),
        "table_rows": panel.table.value.count("<tr>") - 1,
        "chart_points": {name: len(points.split()) for name, points in charts},
        "state": panel.view.state,
    }


def test_widget_state_after_each_epoch_and_the_same_on_replay(ip) -> None:
    assert run(ip, CELL).success
    submission = session.prepare(
        "history = model.fit(x, y, epochs=4, batch_size=32, validation_split=0.25, verbose=0)\n", ip.user_ns
    )
    transport = AgentClient(LocalTransport())
    job_id = session.submit(transport, submission)

    live = WidgetPanel("local")
    live.start(job_id)
    after_each_epoch = []

    def on_event(event: dict) -> None:
        live.handle(event)
        if event["type"] == "epoch":
            after_each_epoch.append(_snapshot(live))

    final = session.follow(transport, job_id, on_event)
    assert final["type"] == "done"
    for number, snap in enumerate(after_each_epoch, start=1):
        assert snap["epoch_bar"] == (number, 4)
        assert snap["batch_bar"] == (3, 3)  # 96 training samples / 32 per batch
        assert snap["table_rows"] == number
        assert snap["chart_points"] == {"loss": number, "val_loss": number, "accuracy": number, "val_accuracy": number}
    assert len(after_each_epoch) == 4

    replay = WidgetPanel("local")
    replay.start(job_id)
    session.follow(transport, job_id, replay.handle)
    assert _snapshot(replay) == _snapshot(live)
    assert replay.table.value == live.table.value and replay.chart.value == live.chart.value


def test_static_copy_keeps_every_epoch_in_the_chart_the_text_and_a_labelled_scrolled_table() -> None:
    """Issue 21: the saved table cut the last epochs ("… 8 earlier epochs" for 20); now it holds every row,
    in full when short, else in a labelled scroll box that starts at the newest row."""
    from remote_magic.session.job_view import JobView

    view = JobView("gpu1", job_id="j1", state="done", epochs=250)
    view.rows = [{"epoch": e, "logs": {"loss": 1 / e, "val_loss": 1.2 / e}, "seconds": 0.1} for e in range(1, 251)]
    page = render_html(view)
    assert page.count("<polyline") == 2
    assert re.findall(r"<tr><td>(\d+)</td>", page) == [str(e) for e in range(1, 251)]
    assert "earlier epochs" not in page and "all 250 epochs, newest at the bottom" in page
    assert "flex-direction:column-reverse" in page  # the browser starts the box at its newest row
    assert len(re.search(r'data-series="loss" points="([^"]*)"', page).group(1).split()) == 250
    assert render_text(view).count("\nEpoch ") == 250
    assert set(metric_groups(view.rows)) == {"loss"}
    view.rows = view.rows[:20]
    page = render_html(view)
    assert re.findall(r"<tr><td>(\d+)</td>", page) == [str(e) for e in range(1, 21)]
    assert "remote-magic-scroll" not in page.split("</style>", 1)[1]  # 20 rows: the table in full


def _stdout(seq: int, text: str) -> dict:
    return {"seq": seq, "t": 1000.0 + seq, "type": "stdout", "text": text}


def test_a_large_output_keeps_a_bounded_tail_and_the_static_copy_says_where_the_rest_is() -> None:
    from remote_magic.session.job_view import OUTPUT_LINE_CHARS, OUTPUT_LINES_KEPT
    from remote_magic.ui.panel import TextPanel

    written: list[int] = []
    panel = TextPanel("gpu1", write=lambda text: written.append(len(text)))
    panel.start("j1")
    panel.handle({"seq": 0, "t": 1000.0, "type": "started", "device": None})
    huge = "x" * 1_000_000 + "\n"
    for i in range(1, 100_001):
        panel.handle(_stdout(i, huge if i % 10_000 == 1 else f"line {i}\n"))
    view = panel.view

    assert len(view.output) <= OUTPUT_LINES_KEPT
    assert view.output_dropped == 100_000 - len(view.output)
    assert all(len(line) <= OUTPUT_LINE_CHARS + 100 for line in view.output)
    assert list(view.output)[-1] == "line 100000\n"
    # The terminal still gets every line as it arrives, a huge one cut short.
    assert len(written) == 1 + 100_000 and max(written) <= OUTPUT_LINE_CHARS + 100

    page = render_html(view)
    assert len(page) < 100_000
    assert "line 100000" in page and "line 99950" not in page
    assert "99,950 earlier lines are on the host" in page and "%remote_status j1 --host gpu1" in page
    text = render_text(view)
    assert len(text) < 100_000 and "line 100000" in text and "99,950 earlier lines" in text


def test_the_static_copy_of_long_lines_stays_small() -> None:
    from remote_magic.session.job_view import OUTPUT_LINE_CHARS, JobView

    view = JobView("gpu1", job_id="j1")
    for i in range(300):
        view.apply(_stdout(i, f"{i}:" + "y" * 50_000 + "\n"))
    assert all(len(line) <= OUTPUT_LINE_CHARS + 100 for line in view.output)
    assert "more characters" in view.output[-1] and view.output[-1].endswith("\n")
    page = render_html(view)
    assert len(page) < 100_000 and "299:" in page and "earlier lines are on the host" in page


def test_the_widget_redraws_a_flood_of_output_seldom_and_structure_at_once() -> None:
    panel = WidgetPanel("gpu1")
    panel.start("j1")
    refreshes: list[float] = []
    draw = panel._refresh

    def counted() -> None:
        refreshes.append(1)
        draw()

    panel._refresh = counted  # type: ignore[method-assign]
    panel.handle({"seq": 0, "t": 1000.0, "type": "started", "device": None})
    panel.handle({"seq": 1, "t": 1000.0, "type": "train_begin", "epochs": 2, "steps": 10})
    assert len(refreshes) == 2

    for i in range(2, 10_002):
        panel.handle(_stdout(i, f"line {i}\n"))
    assert len(refreshes) < 50

    before = len(refreshes)
    panel.handle({"seq": 10_002, "t": 1001.0, "type": "epoch", "epoch": 1, "logs": {"loss": 0.5}, "seconds": 1.0})
    assert len(refreshes) == before + 1
    assert panel.table.value.count("<tr>") == 2 and panel.epoch_bar.value == 1
    assert "line 10001\n" in panel.log.value

    panel.handle(_stdout(10_003, "the last line\n"))
    panel.handle({"seq": 10_004, "t": 1002.0, "type": "done"})
    assert panel.log.value.endswith("the last line\n") and panel.view.state == "done"
    assert len(panel.log.value.splitlines()) <= 13
    panel.finish()


def test_the_widget_draws_a_pending_line_soon_without_another_event() -> None:
    import time

    panel = WidgetPanel("gpu1")
    panel.refresh_interval = 1.0
    panel.start("j1")
    panel.handle({"seq": 0, "t": 1000.0, "type": "started", "device": None})
    panel.handle(_stdout(1, "first\n"))
    assert "first" not in panel.log.value  # within the interval: drawn later, not now
    deadline = time.monotonic() + 5
    while "first" not in panel.log.value and time.monotonic() < deadline:
        time.sleep(0.05)
    assert panel.log.value.endswith("first\n")
    panel.finish()


def test_a_remote_log_loop_of_50_steps_shows_steps_the_latest_rows_and_no_empty_column(ip) -> None:
    """As a new user saw it in JupyterLab: the finished table showed rows 1-7 with an empty `time` column and
    the chart's axis said `epoch`."""
    cell = "for step in range(1, 51):\n    remote_log(step=step, total=50, loss=1.0 / step)\n"
    client = AgentClient(LocalTransport())
    job_id = session.submit(client, session.prepare(cell, {}))
    from remote_magic.session.job_view import JobView

    view = JobView("local")
    session.follow(client, job_id, view.apply)
    page = render_html(view)
    table = page[page.index("<table") :]
    assert "<th>step</th>" in table and "<th>time</th>" not in table
    rows = re.findall(r"<tr><td>(\d+)</td>", table)
    assert rows == [str(i) for i in range(1, 51)]  # every row, the box scrolled to the latest
    assert "all 50 steps, newest at the bottom" in page
    assert ">step</text>" in page and ">epoch</text>" not in page  # the chart's axis
    assert 'fill="#1f77b4">loss</text>' not in page  # a lone series needs no legend: the title says it
    assert "Step 50/50 - loss: 0.0200" in render_text(view)
    client.close()


def test_keras_verbose_1_shows_each_epoch_once_and_keeps_what_the_cell_prints(ip, capsys) -> None:
    """Issue 20: with Keras's own progress bar on, the text panel showed every epoch twice (ours and Keras's)."""
    assert run(ip, CELL).success
    capsys.readouterr()
    cell = (
        "%%remote_train\n"
        "print('before the fit')\n"
        "said = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: print(f'my callback {epoch + 1}'))\n"
        "history = model.fit(x, y, epochs=3, batch_size=32, verbose=1, callbacks=[said])\n"
        "print('after the fit')\n"
        "model.evaluate(x, y, verbose=2)\n"
    )
    assert run(ip, cell).success
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert [line.split(" - ")[0] for line in lines if line.startswith("Epoch")] == [
        "Epoch 1/3",
        "Epoch 2/3",
        "Epoch 3/3",
    ]
    assert sum(line.startswith("Epoch 2/3") for line in lines) == 1
    assert "4/4 ━" not in out  # Keras's bar of the fit, whose numbers are the epoch lines'
    for said in ("before the fit", "my callback 1", "my callback 3", "after the fit"):
        assert said in lines, (said, out)
    assert any(line.startswith("4/4 - ") and "loss:" in line for line in lines), out  # evaluate's line stays

    # The widget's log and the saved copy show the same: the cell's prints, not Keras's epoch lines.
    job_id = re.search(r"job (\S+) ·", out).group(1)
    client = AgentClient(LocalTransport())
    replay = WidgetPanel("local")
    replay.start(job_id)
    session.follow(client, job_id, replay.handle)
    client.close()
    assert "my callback 2" in replay.log.value and "Epoch 2/3" not in replay.log.value
    assert render_text(replay.view).count("Epoch 2/3") == 1


# ----------------------------------------------------------------- issue 21: numbers, scales, units, theme, states
def test_numbers_keep_their_significant_digits() -> None:
    from remote_magic.ui.chart import format_number

    assert format_number(2.5e-4) == "2.5e-04"  # a learning rate read 0.0000 in the table
    assert format_number(0.6192) == "0.6192" and format_number(12.0) == "12.0000"
    assert format_number(1.23456e7) == "1.23e+07" and format_number(0.0) == "0.0000" and format_number(3) == "3"
    row = {"epoch": 1, "logs": {"loss": 0.5, "learning_rate": 2.5e-4}, "seconds": None}
    assert format_epoch(row, 2) == "Epoch 1/2 - loss: 0.5000 - learning_rate: 2.5e-04"
    from remote_magic.session.job_view import JobView

    view = JobView("gpu1", job_id="j1")
    view.rows = [row]
    assert "<td>2.5e-04</td>" in render_html(view) and "0.0000" not in render_html(view)


def test_a_series_spanning_more_than_100_times_gets_a_log_scale() -> None:
    from remote_magic.ui.chart import svg_chart, wants_log_scale

    assert wants_log_scale([13.0, 0.02]) and not wants_log_scale([1.0, 0.5]) and not wants_log_scale([5, 0, 0.001])
    log = svg_chart("loss", {"loss": [(e, 10.0 / e**3) for e in range(1, 21)]})
    assert 'data-scale="log"' in log and "(log scale)" in log and ">0.01<" in log and ">10<" in log
    assert 'data-scale="linear"' in svg_chart("loss", {"loss": [(1, 1.0), (2, 0.5)]})
    assert 'data-scale="linear"' in svg_chart("loss", {"loss": [(1, 100.0), (2, 0.01)]}, log=False)


def test_the_legend_never_covers_the_title() -> None:
    from remote_magic.ui.chart import svg_chart

    name = "sparse_categorical_accuracy"
    chart = svg_chart(name, {name: [(1, 0.5), (2, 0.6)], f"val_{name}": [(1, 0.4), (2, 0.5)]})
    title_y = float(re.search(r'<text x="4" y="([\d.]+)" font-weight="bold"', chart).group(1))
    legend = [
        (float(x), float(y)) for x, y in re.findall(r'class="remote-magic-legend" x="([\d.]+)" y="([\d.]+)"', chart)
    ]
    assert len(legend) == 2 and all(y >= title_y + 10 for _, y in legend)  # on lines of their own
    assert legend[1][1] > legend[0][1]  # too long for one line: wrapped, not drawn over each other


def test_charts_and_tables_follow_the_lab_theme_with_no_fixed_light_colors() -> None:
    from remote_magic.session.job_view import JobView
    from remote_magic.ui.chart import svg_chart

    view = JobView("gpu1", job_id="j1", state="done", epochs=3)
    view.rows = [{"epoch": e, "logs": {"loss": 1 / e, "val_loss": 1.2 / e}, "seconds": 0.1} for e in range(1, 4)]
    panel = WidgetPanel("gpu1")
    for event in (
        {"seq": 0, "t": 1.0, "type": "started", "device": None},
        *({"seq": e, "t": 1.0 + e, "type": "epoch", "epoch": e, "logs": {"loss": 1 / e}} for e in (1, 2, 3)),
    ):
        panel.handle(event)
    for page in (render_html(view), svg_chart("loss", {"loss": [(1, 1.0)]}), panel.chart.value + panel.table.value):
        assert (
            "var(--jp-ui-font-color1" in page and "var(--jp-border-color2" in page and "var(--jp-layout-color1" in page
        )
        assert not re.search(r"#eee\b|\bwhite\b|#fff\b", page, re.I), page
    panel.finish()


def test_a_remote_log_loop_says_steps_and_shows_no_batch_bar_and_runner_start_is_named() -> None:
    panel = WidgetPanel("gpu1")
    panel.start("j1")
    panel.handle({"seq": 0, "t": 1000.0, "type": "started", "device": None})
    assert "starting runner" in panel.header.value and "starting runner" in render_text(panel.view)
    panel.handle({"seq": 1, "t": 1001.0, "type": "train_begin", "epochs": 400, "steps": None})
    panel.handle(
        {"seq": 2, "t": 1002.0, "type": "epoch", "epoch": 1, "epochs": 400, "logs": {"loss": 1.0}, "unit": "step"}
    )
    assert "· running ·" in panel.header.value
    assert panel.epoch_bar.description == "step" and panel.batch_row.layout.display == "none"
    assert "1/400 steps" in render_html(panel.view) and "epoch" not in render_html(panel.view)
    panel.finish()


def test_the_header_clock_ticks_between_epochs() -> None:
    import time

    panel = WidgetPanel("gpu1")
    panel.start("j1")
    panel.handle({"seq": 0, "t": time.time(), "type": "started", "device": None})
    first = panel.header.value
    time.sleep(2.2)
    assert panel.header.value != first and re.search(r"· [12]\.\ds", panel.header.value)
    panel.finish()


def test_no_empty_table_above_an_error_and_copies_say_what_they_are() -> None:
    from remote_magic.session.job_view import JobView
    from remote_magic.ui.panel import StaticBundle

    view = JobView("gpu1", job_id="j1")
    view.apply({"seq": 0, "t": 1.0, "type": "started", "device": None})
    view.apply({"seq": 1, "t": 2.0, "type": "error", "message": "ValueError: bad"})
    page = render_html(view)
    assert "<table" not in page and "ValueError: bad" in page
    view = JobView("gpu1", job_id="j2", epochs=20)
    view.apply({"seq": 0, "t": 1.0, "type": "started", "device": None})
    view.apply({"seq": 1, "t": 2.0, "type": "epoch", "epoch": 12, "epochs": 20, "logs": {"loss": 1.0}})
    fallback = StaticBundle(view)._repr_mimebundle_()
    assert "followed in another kernel session; `%remote_attach j2 --host gpu1` shows it again" in fallback["text/html"]
    assert "12/20 epochs" in fallback["text/plain"]
    live = StaticBundle(view, live=True)._repr_mimebundle_()["text/html"]
    assert "followed by the kernel session that ran this cell" in live
    view.apply({"seq": 2, "t": 3.0, "type": "done"})
    final = StaticBundle(view)._repr_mimebundle_()["text/html"]
    assert "job j2 on host gpu1: done, 12/20 epochs; `%remote_attach j2 --host gpu1` shows it again" in final
