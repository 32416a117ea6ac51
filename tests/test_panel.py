"""The widget panel, driven by a real job's events, and its static copy."""

from __future__ import annotations

import re

from conftest import run

from remote_magic import session
from remote_magic.transport import LocalTransport
from remote_magic.ui.chart import metric_groups
from remote_magic.ui.panel import WidgetPanel, render_html, render_text

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
    transport = LocalTransport()
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


def test_static_copy_keeps_every_epoch_and_the_chart() -> None:
    from remote_magic.ui.panel import JobView

    view = JobView("gpu1", job_id="j1", state="done", epochs=250)
    view.rows = [{"epoch": e, "logs": {"loss": 1 / e, "val_loss": 1.2 / e}, "seconds": 0.1} for e in range(1, 251)]
    page = render_html(view)
    assert page.count("<tr>") == 251 and page.count("<polyline") == 2
    assert len(re.search(r'data-series="loss" points="([^"]*)"', page).group(1).split()) == 250
    assert render_text(view).count("\nEpoch ") == 250
    assert set(metric_groups(view.rows)) == {"loss"}
