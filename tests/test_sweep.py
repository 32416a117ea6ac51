"""Sweeps: ``%%remote_train --sweep GRID``, its panel, the sweep object, detach and attach.

The Keras sweep runs on simulated GPUs (a fake ``nvidia-smi``, the
``gpu_host`` fixture of test_gpu_queue.py); the list-of-dicts sweep over the
test sshd on a host without GPUs.  Cells other than the Keras one log with
``remote_log`` so the file stays short.
"""

from __future__ import annotations

import _thread
import html
import json
import re
import sys
import time
import types
from pathlib import Path

import pytest
from conftest import run
from test_gpu_queue import _events, _root, gpu_host  # noqa: F401  (gpu_host is a fixture)

from remote_magic.registry import Registry
from remote_magic.sweep import Sweep, SweepRun, Trial, default_metric, default_mode, expand_grid
from remote_magic.ui import sweep_panel
from remote_magic.ui.sweep_panel import SweepWidgetPanel, render_sweep_html, render_sweep_text
from remote_magic.wire import upload

KERAS_SWEEP = """%%remote_train --sweep grid --parallel 3
import keras
if lr == 0.01 and units == 8:
    raise ValueError("diverged: lr=0.01 with units=8")
keras.utils.set_random_seed(units)
model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(units, activation="relu"),
                          keras.layers.Dense(1, activation="sigmoid")])
model.compile(optimizer=keras.optimizers.Adam(lr), loss="binary_crossentropy")
history = model.fit(x_train, y_train, epochs=2, batch_size=1000, validation_split=0.25, verbose=0)
final = history.history["val_loss"][-1]
"""
# 10,000 x 8 float32 is 320 kB: a blob, uploaded once for all six trials.
DATA = """
import numpy as np
rng = np.random.default_rng(0)
x_train = rng.random((10_000, 8), dtype=np.float32)
y_train = (x_train.sum(axis=1) > 4).astype("float32")
grid = {"lr": [0.01, 0.1], "units": [2, 4, 8]}
"""
LOG_CELL = (
    "import time\n"
    "began = time.time()\n"
    "for step in range(1, 4):\n"
    "    time.sleep({pause})\n"
    "    remote_log(step=step, total=3, score=scale * step + shift, loss=1 / (scale * step))\n"
    "ended = time.time()\n"
)


def _most_at_once(spans: list[tuple[float, float]]) -> int:
    return max(sum(1 for b, e in spans if b <= begin < e) for begin, _ in spans)


def _table_lines(out: str, sweep_id: str) -> list[str]:
    """The rows of the finished table the text panel printed (after its title line)."""
    lines = out.splitlines()
    title = max(i for i, line in enumerate(lines) if line.startswith("[remote_train] sweep ") and sweep_id in line)
    assert lines[title + 1].split()[:4] == ["#", "rank", "lr", "units"], lines[title + 1]
    return [line for line in lines[title + 2 :] if line[:1].isdigit()]


@pytest.mark.usefixtures("gpu_host")
def test_a_keras_grid_on_simulated_gpus_ranks_six_trials_and_one_error_does_not_stop_the_rest(
    ip, capsys, monkeypatch
) -> None:
    import keras

    assert run(ip, DATA).success
    uploads: list[int] = []
    send_missing = upload.send_missing

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        uploads.append(send_missing(*args, **kwargs))
        return uploads[-1]

    monkeypatch.setattr(upload, "send_missing", counted)
    capsys.readouterr()
    result = run(ip, KERAS_SWEEP)
    assert result.success, result.error_in_exec
    out = capsys.readouterr().out
    assert "lr" not in ip.user_ns and "units" not in ip.user_ns  # bound in the trials only
    sweep = ip.user_ns["sweep"]
    assert len(_table_lines(out, sweep.id)) == 6

    assert len(uploads) == 1 and uploads[0] >= 320_000  # the data went once; the other five trials sent no blob

    rows = sweep.results
    assert len(rows) == 6 and sweep.metric == "val_loss" and sweep.mode == "min"
    failed = [r for r in rows if r["state"] == "error"]
    assert [(r["lr"], r["units"]) for r in failed] == [(0.01, 8)]
    assert "diverged: lr=0.01 with units=8" in failed[0]["error"]
    assert "diverged" in out  # its row's error is shown
    done = [r for r in rows if r["state"] == "done"]
    assert len(done) == 5 and all(isinstance(r["val_loss"], float) for r in done)

    best = sweep.best()
    assert isinstance(best, dict) and isinstance(best["model"], keras.Model)
    assert best["final"] == pytest.approx(min(r["val_loss"] for r in done))
    assert sweep.load(0)["model"].layers[0].units == 2

    root = _root(ip)
    spans = []
    for trial in sweep.trials:
        events = _events(root, trial.job_id)
        started = next(e["t"] for e in events if e["type"] == "started")
        spans.append((started, events[-1]["t"]))
        spec = json.loads((root / "jobs" / trial.job_id / "spec.json").read_text())
        expected = {"id": sweep.id, "trial": trial.number, "trials": 6, "parallel": 3, "params": trial.params}
        assert spec["sweep"] == expected
        assert len(trial.gpus) == 1  # each trial held one simulated GPU
    assert _most_at_once(spans) <= 3
    records = [r for r in Registry().records() if r.sweep and r.sweep["id"] == sweep.id]
    assert sorted(r.sweep["trial"] for r in records) == list(range(6))


def test_a_list_of_trials_over_ssh_runs_two_at_a_time_and_ranks_by_the_chosen_metric(ip, capsys) -> None:
    assert run(ip, "shift = 0.0\ntrials = [{'scale': 1.0}, {'scale': 2.0, 'shift': 5.0}, {'scale': 0.5}]\n").success
    cell = "%%remote_train --host testhost --sweep trials --parallel 2 --metric score --mode max --as search\n"
    result = run(ip, cell + LOG_CELL.format(pause=0.4))
    assert result.success, result.error_in_exec
    search = ip.user_ns["search"]
    assert "sweep" not in ip.user_ns and search.parallel == 2
    rows = search.results
    assert [r["score"] for r in rows] == pytest.approx([3.0, 11.0, 1.5])
    assert search.best_trial().number == 1 and search.best()["ended"] > search.best()["began"]
    spans = [(search.load(t.number)["began"], search.load(t.number)["ended"]) for t in search.trials]
    assert _most_at_once(spans) <= 2
    assert "injected: search" in capsys.readouterr().out


def test_an_interrupt_stops_every_trial_and_still_injects_the_sweep(ip, monkeypatch) -> None:
    assert run(ip, DATA + "grid = {'units': [2, 3, 4]}\n").success
    handle = sweep_panel.SweepTextPanel.trial_event

    def interrupt_at_the_first_epoch(self, trial, event):  # type: ignore[no-untyped-def]
        handle(self, trial, event)
        if event["type"] == "epoch" and not getattr(self, "interrupted", False):
            self.interrupted = True
            _thread.interrupt_main()  # what a kernel interrupt does to the waiting cell

    monkeypatch.setattr(sweep_panel.SweepTextPanel, "trial_event", interrupt_at_the_first_epoch)
    cell = (
        "%%remote_train --sweep grid --parallel 2\n"
        "import keras\n"
        "model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(units), keras.layers.Dense(1)])\n"
        "model.compile(optimizer='adam', loss='mse')\n"
        "history = model.fit(x_train, y_train, epochs=500, batch_size=256, verbose=0)\n"
    )
    started = time.monotonic()
    result = run(ip, cell)
    assert result.success, result.error_in_exec
    assert time.monotonic() - started < 90
    sweep = ip.user_ns["sweep"]
    states = {t.number: t.state for t in sweep.trials}
    assert set(states.values()) <= {"stopped", "cancelled"} and "stopped" in states.values(), states
    assert all(t.view.epoch < 500 for t in sweep.trials)
    never_ran = [t for t in sweep.trials if t.state == "cancelled"]
    assert all(t.view.started is None for t in never_ran)  # the queued trial left the queue, it never started


def test_detach_follows_in_the_background_and_attach_after_a_restart_injects_the_sweep(
    ip, capsys, monkeypatch, tmp_path
) -> None:
    magics = ip.magics_manager.registry["RemoteMagics"]
    assert run(ip, "scale, shift = 1.0, 0.0\nsteps = {'scale': [1.0, 3.0]}\n").success
    magics.follow_detached = True  # as in a Jupyter kernel
    try:
        result = run(ip, "%%remote_train --sweep steps --detach --as bg\n" + LOG_CELL.format(pause=0.1))
        assert result.success, result.error_in_exec
        out = capsys.readouterr().out
        sweep_id = re.search(r"sweep (sweep-\S+): 2 trials submitted", out).group(1)
        assert "1 at a time" in out  # a CPU host: one at a time
        # Plain text like a single job's --detach message (issue 21: it showed literal Markdown backticks).
        assert f"\n  to list its trials:        %remote_status {sweep_id} --host local\n" in out
        assert f"\n  to follow the sweep again: %remote_attach {sweep_id} --host local  (brings back bg)\n" in out
        assert "`" not in out
        for follower in list(magics.background):
            follower.join(60)
    finally:
        magics.follow_detached = False
    assert [r["score"] for r in ip.user_ns["bg"].results] == [3.0, 9.0]

    # A fresh kernel: nothing followed, nothing in the namespace, new connections.
    magics.stop_background()
    magics.connections.close()
    del ip.user_ns["bg"]
    capsys.readouterr()
    assert run(ip, f"%remote_attach {sweep_id}").success
    again = ip.user_ns["bg"]  # the name the sweep was given
    assert again.id == sweep_id and [t.params for t in again.trials] == [{"scale": 1.0}, {"scale": 3.0}]
    assert [r["score"] for r in again.results] == [3.0, 9.0]
    assert again.best()["began"] > 0 and again.best_trial().number == 1  # loss is the metric: lowest wins
    assert "injected: bg" in capsys.readouterr().out

    # Another machine (no record of the sweep): the host's status rows name its trials.
    monkeypatch.setattr(magics, "registry", Registry(str(tmp_path / "elsewhere.jsonl")))
    refused = run(ip, f"%remote_attach {sweep_id}")
    assert not refused.success and f"%remote_attach {sweep_id} --host HOST" in str(refused.error_in_exec)
    assert run(ip, f"%remote_attach {sweep_id} --host local --as found").success
    assert [r["score"] for r in ip.user_ns["found"].results] == [3.0, 9.0]


def test_the_detach_button_returns_at_once_and_the_sweep_comes_when_its_trials_end(ip, monkeypatch) -> None:
    magics = ip.magics_manager.registry["RemoteMagics"]
    actions = {}
    monkeypatch.setattr(sweep_panel.SweepTextPanel, "set_actions", lambda self, *given: actions.update(now=given))
    handle = sweep_panel.SweepTextPanel.trial_event

    def detach_at_the_first_epoch(self, trial, event):  # type: ignore[no-untyped-def]
        handle(self, trial, event)
        if event["type"] == "epoch" and actions["now"][1] is not None:
            actions["now"][1]()  # what a click on Detach does

    monkeypatch.setattr(sweep_panel.SweepTextPanel, "trial_event", detach_at_the_first_epoch)
    assert run(ip, "scale, shift = 1.0, 0.0\nsteps = {'scale': [1.0, 2.0]}\n").success
    result = run(ip, "%%remote_train --sweep steps\n" + LOG_CELL.format(pause=0.3))
    assert result.success, result.error_in_exec
    assert "sweep" not in ip.user_ns and actions["now"][1] is None  # returned at once; Detach is off now
    for follower in list(magics.background):
        follower.join(60)
    assert [r["state"] for r in ip.user_ns["sweep"].results] == ["done", "done"]


def _click_when_trial_0_ended(kernel, data: Path, flag: Path) -> None:  # type: ignore[no-untyped-def]
    """Click trial 0's row until the kernel injects it (it must have seen the trial end), then let trial 1 end.

    Runs beside ``kernel.execute``, which reads every message into ``kernel.messages``.
    """
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            time.sleep(0.2)
            records = Registry(str(data / "jobs.jsonl")).records()
            if not records or not any(data.glob(f"**/jobs/{records[0].job_id}/summary.json")):
                continue
            seen = len(kernel.messages)
            button = _row_button(kernel, 0)
            if button is None:
                continue  # the panel draws trial 0's row at its next redraw: look again
            kernel.click(button)
            while time.monotonic() < deadline:
                said = " ".join(json.dumps(m["content"]) for m in kernel.messages[seen:])
                if "injected trial 0" in said or "outputs ready: picked" in said:
                    return  # injected, or waiting for the cell's end (values from a click never land mid-cell)
                if "has not ended" in said:
                    break
                time.sleep(0.05)
    finally:
        flag.write_text("go")  # only now may trial 1 end: a click served while the cell still ran


def _row_button(kernel, number: int) -> str | None:  # type: ignore[no-untyped-def]
    """The comm id of the newest button that is trial ``number``'s row (its hover text names the trial)."""
    for msg in reversed(kernel.messages):
        state = msg["content"].get("data", {}).get("state", {}) if msg["msg_type"] == "comm_open" else {}
        if state.get("_model_name") == "ButtonModel" and state.get("tooltip", "").startswith(f"trial {number} ("):
            return msg["content"]["comm_id"]
    return None


def test_in_a_jupyter_kernel_a_click_on_a_row_injects_that_trial_while_the_others_run(tmp_path) -> None:
    import os
    import threading

    from kernel import Kernel

    flag, data = tmp_path / "go", tmp_path / "data"
    kernel = Kernel({**os.environ, "REMOTE_MAGIC_PANEL": "widget", "REMOTE_MAGIC_DATA_DIR": str(data)})
    try:
        setup = f"%load_ext remote_magic\nflag = {str(flag)!r}\ngrid = [{{'scale': 1.0}}, {{'scale': 2.0}}]\n"
        assert kernel.execute(setup)[0]["status"] == "ok"
        clicker = threading.Thread(target=_click_when_trial_0_ended, args=(kernel, data, flag))
        clicker.start()
        reply, text = kernel.execute(
            "%%remote_train --sweep grid\nimport os, time\nwhile scale > 1 and not os.path.exists(flag):\n"
            "    time.sleep(0.05)\nremote_log(loss=1 / scale)\npicked = scale\n"
        )
        clicker.join()
        assert reply["status"] == "ok", text
        assert "1.0" in kernel.execute("print(picked)")[1]
        final = [m for m in kernel.messages if m["msg_type"] == "update_display_data"][-1]["content"]["data"]
        assert "application/vnd.jupyter.widget-view+json" not in final  # the static copy, no widget
        assert final["text/html"].count('data-series="#') == 2
        assert "outputs ready: picked; they enter the namespace when the running cell ends" in final["text/html"]
    finally:
        kernel.shutdown()


@pytest.mark.parametrize(
    ("setup", "line", "said"),
    [
        ("", "--sweep nowhere", "this kernel has no variable nowhere"),
        ("grid = 3", "--sweep grid", "grid is an int"),
        ("grid = {}", "--sweep grid", "grid is an empty dict"),
        ("grid = {'lr': 0.1}", "--sweep grid", "grid['lr'] is a float, not a non-empty list"),
        ("grid = [1, 2]", "--sweep grid", "grid[0] is an int, not a dict"),
        ("grid = [{'2x': 1}]", "--sweep grid", "not one: '2x'"),
        ("grid = {'lr': [1]}", "--sweep grid --parallel 0", "--parallel takes"),
        ("grid = {'lr': [1]}", "--sweep grid --as 'a b'", "--as takes a variable name"),
        ("grid = {'lr': [1]}", "--sweep grid --fetch out.txt", "--fetch does not go with --sweep"),
        ("", "--metric loss", "--metric goes with --sweep"),
    ],
)
def test_a_bad_grid_is_refused_before_anything_is_sent(ip, setup, line, said) -> None:
    assert run(ip, setup).success
    before = len(Registry().records())
    result = run(ip, f"%%remote_train --host nosuchhost.invalid {line}\nx = lr\n")
    assert not result.success and said in str(result.error_in_exec), result.error_in_exec
    assert len(Registry().records()) == before


# ---------------------------------------------------------------- without a host
def _fake_sweep(values: dict[int, list[float]], metric: str | None = None) -> Sweep:
    trials = []
    for number, losses in values.items():
        trial = Trial(number, {"lr": 10.0**-number}, job_id=f"job{number}")
        trial.view.host = "gpu1"
        trial.apply({"seq": 0, "t": 100.0, "type": "started", "device": {"kind": "GPU", "indices": [number]}})
        for epoch, loss in enumerate(losses, 1):
            trial.apply({"seq": epoch, "t": 100.0 + epoch, "type": "epoch", "epoch": epoch, "epochs": 3,
                         "logs": {"loss": loss + 0.1, "val_loss": loss, "val_accuracy": 1 - loss}})  # fmt: skip
        trials.append(trial)
    return Sweep("sweep-20261127-120000-abcdef", "gpu1", trials, metric, parallel=2, name="sweep")


def test_grids_metrics_and_modes() -> None:
    assert expand_grid("g", {"lr": [1, 2], "units": (8, 16, 32)}) == [
        {"lr": lr, "units": units} for lr in (1, 2) for units in (8, 16, 32)
    ]
    assert expand_grid("g", [{"lr": 1}, {"lr": 2, "units": 4}]) == [{"lr": 1}, {"lr": 2, "units": 4}]
    assert default_metric(["loss", "accuracy", "val_accuracy", "val_loss"]) == "val_loss"
    assert default_metric(["loss", "val_accuracy"]) == "val_accuracy"
    assert default_metric(["loss", "mae"]) == "loss"
    assert default_metric([]) is None
    assert [default_mode(m) for m in ("val_loss", "val_accuracy", "auc", "mse", "val_f1")] == [
        "min", "max", "max", "min", "max",
    ]  # fmt: skip


def test_ranking_results_with_pandas_and_the_static_panel(monkeypatch) -> None:
    sweep = _fake_sweep({0: [0.9, 0.5, 0.4], 1: [0.8, 0.3, 0.2], 2: [0.7]})
    assert [t.number for t in sweep.ranked()] == [1, 0, 2]
    accuracy = _fake_sweep({0: [0.9, 0.5, 0.4], 1: [0.8, 0.3, 0.2]}, metric="val_accuracy")
    assert accuracy.mode == "max" and accuracy.best_trial().number == 1

    frames = []
    monkeypatch.setitem(sys.modules, "pandas", types.SimpleNamespace(DataFrame=lambda rows: frames.append(rows)))
    monkeypatch.setattr("importlib.util.find_spec", lambda name: object())
    sweep.results  # noqa: B018  (the property builds the frame)
    [rows] = frames
    assert rows[1]["val_loss"] == 0.2 and rows[0]["best_val_loss"] == 0.4 and rows[2]["epochs"] == 1

    text = render_sweep_text(sweep)
    table = [line.split() for line in text.splitlines()[2:]]
    assert [row[:2] for row in table] == [["0", "2"], ["1", "1"], ["2", "3"]]  # trial order, the rank a column
    assert table[1][2] == "best"
    page = render_sweep_html(sweep, ["a note"])
    assert page.count("<tr") == 4 and "a note" in page
    assert len(re_series(page)) == 3 and "font-weight:bold" in page


def re_series(page: str) -> list[str]:
    return re.findall(r'data-series="(#\d+)[^"]*"', page)


class _Injector:
    """What ``SweepRun.pick`` needs of the session: an injector into a kernel's namespace (no cell runs: at once)."""

    def __init__(self, namespace: dict) -> None:
        self.shell = types.SimpleNamespace(user_ns=namespace)

    def __call__(self, values: dict) -> bool:
        self.shell.user_ns.update(values)
        return True


class _Lifecycle:
    def __init__(self, namespace: dict) -> None:
        self.inject = _Injector(namespace)


def _row_texts(panel: SweepWidgetPanel) -> list[str]:
    return [button.description.replace("\u00a0", " ") for button in panel.table.children[1:]]


def test_rows_keep_their_place_as_the_ranking_changes_and_a_click_says_what_it_replaced() -> None:
    """Issue 21: rows re-ranked under the pointer, only a small ``#n`` button took a click, and the click
    silently replaced ``model`` and pushed the panel down by a line."""
    sweep = _fake_sweep({0: [0.9], 1: [0.1]})
    panel = SweepWidgetPanel(sweep)
    picked: list[Trial] = []
    panel.set_actions(lambda: None, lambda: None, picked.append)
    panel.trial_event(sweep.trials[0], {"type": "epoch"})
    rows = list(panel.table.children[1:])
    assert [r.split()[:2] for r in _row_texts(panel)] == [["0", "2"], ["1", "1"]]  # trial order; trial 1 ranks first
    assert [b.style.font_weight for b in rows] == ["normal", "bold"]  # the best row stands out

    sweep.trials[0].apply({"seq": 2, "t": 102.0, "type": "epoch", "epoch": 2, "epochs": 3,
                           "logs": {"loss": 0.1, "val_loss": 0.01, "val_accuracy": 0.99}})  # fmt: skip
    panel.trial_event(sweep.trials[0], {"type": "epoch"})
    assert list(panel.table.children[1:]) == rows  # the same row widgets in the same places
    assert [r.split()[:3] for r in _row_texts(panel)] == [["0", "1", "best"], ["1", "2", "0.1"]]
    assert [b.style.font_weight for b in rows] == ["bold", "normal"]

    rows[1].click()  # anywhere on the row: the row is the button
    assert picked == [sweep.trials[1]]

    sweep.trials[1].final = {"type": "done"}
    sweep.trials[1].outputs = {"model": "trained", "history": "its history"}
    layout = (list(panel.box.children), panel.header.value, panel.pick_line.layout.height)
    run = SweepRun(None, sweep, panel, _Lifecycle({"model": "mine"}))  # type: ignore[arg-type]
    panel.set_actions(lambda: None, lambda: None, run.pick)
    rows[1].click()
    said = "injected trial 1 (lr=0.1): model, history (replaced the kernel's model)"
    assert said in html.unescape(panel.pick_line.value) and said in panel.notes[-1]
    assert (list(panel.box.children), panel.header.value, panel.pick_line.layout.height) == layout  # nothing moved
    panel.finish()


def test_the_legend_names_parameters_the_chart_spreads_a_wide_range_and_long_reasons_wait_for_hover() -> None:
    """Issue 21: a linear axis from 13 to 0.02 flattened the best trials, the legend said ``#0…#2``, and a
    long queued reason pushed the metric columns off screen."""
    sweep = _fake_sweep({0: [13.0, 6.0], 1: [0.5, 0.02], 2: [0.9, 0.3]})
    chart = sweep_panel.overlay_chart(sweep)
    assert re.findall(r'data-series="([^"]+)"', chart) == ["#0 lr=1", "#1 lr=0.1", "#2 lr=0.01"]
    assert all(f">#{n} lr={lr}<" in chart for n, lr in ((0, "1"), (1, "0.1"), (2, "0.01")))  # drawn in the legend

    def last_y(name: str) -> float:
        points = re.search(rf'data-series="{name} [^"]*" points="([^"]+)"', chart).group(1)
        return float(points.split()[-1].split(",")[1])

    assert abs(last_y("#2") - last_y("#1")) > 30  # 0.3 and 0.02: apart on screen (a linear axis puts them 3 px apart)

    reason = "waiting for 2 GPUs: 0,1 by job 20261127-103000-1a2b3c, 3 by another process (pid 4242)"
    waiting = Trial(3, {"lr": 0.5}, job_id="job3")
    waiting.apply({"seq": 0, "t": 100.0, "type": "queued", "reason": reason, "position": 2})
    sweep.trials.append(waiting)
    page = render_sweep_html(sweep)
    assert ">queued #2</td>" in page and f"title='queued #2: {reason}'" in page
    panel = SweepWidgetPanel(sweep)
    row = panel.pick_buttons[3]
    assert "queued #2" in row.description.replace("\u00a0", " ") and reason not in row.description
    assert reason in row.tooltip
    assert len(_row_texts(panel)[-1]) < 100  # the metric columns stay in view
    panel.finish()


def test_two_unnamed_sweeps_are_titled_by_their_grid_and_start_time() -> None:
    early = Sweep("sweep-20261127-140500-abcdef", "gpu1", [Trial(0, {"lr": 0.1, "batch": 8})])
    late = Sweep("sweep-20261127-161000-fedcba", "gpu1", [Trial(i, {"units": i}) for i in range(12)])
    assert sweep_panel.sweep_title(early).startswith("sweep lr × batch · 1 trial · 14:05 · host gpu1")
    assert sweep_panel.sweep_title(late).startswith("sweep units · 12 trials · 16:10 · ")


def test_registry_records_carry_the_sweep_and_old_records_still_read(tmp_path: Path) -> None:
    registry = Registry(str(tmp_path / "jobs.jsonl"))
    registry.add("a", "20261127-000000-000001")
    for trial in (1, 0):
        registry.add("a", f"20261127-000000-00001{trial}", sweep={"id": "sweep-x", "trial": trial, "params": {}})
    assert "sweep" not in (tmp_path / "jobs.jsonl").read_text().splitlines()[0]  # a plain job's line as before
    assert [r.sweep["trial"] for r in registry.sweep("sweep-x")] == [0, 1]
    assert registry.find("20261127-000000-000001").sweep is None


def test_status_and_cancel_take_a_sweep_id(ip, capsys) -> None:
    """`%remote_status sweep-...` lists its trials (one waits: 1 at a time on a CPU host), `%remote_cancel
    sweep-...` ends them all, the waiting one without it ever starting."""
    assert run(ip, "steps = {'pause': [30, 30]}\n").success
    cell = "%%remote_train --sweep steps --detach --no-inject\nimport time\ntime.sleep(pause)\nslept = pause\n"
    assert run(ip, cell).success
    sweep_id = re.search(r"sweep (sweep-\S+): 2 trials submitted", capsys.readouterr().out).group(1)
    table = ip.run_line_magic("remote_status", sweep_id)
    assert len(table.rows) == 2 and {row["state"] for row in table.rows} <= {"queued", "running"}
    assert any(row["state"] == "queued" for row in table.rows)
    assert run(ip, f"%remote_cancel {sweep_id}").success
    assert f"sweep {sweep_id} on host local: cancelled 2 of its 2 trials" in capsys.readouterr().out
    states = {row["state"] for row in ip.run_line_magic("remote_status", sweep_id).rows}
    assert states == {"cancelled"}


def test_the_header_says_what_ranks_the_trials_before_and_after_the_first_epoch() -> None:
    """Issue 20: the header said "metric: the first validation metric logged" until the end."""
    written: list[str] = []
    sweep = _fake_sweep({0: [], 1: []})
    text = sweep_panel.SweepTextPanel(sweep, written.append)
    widget = SweepWidgetPanel(sweep)
    text.start()
    assert "ranked by val_loss (min) once logged, else loss (min)" in written[0]
    assert "ranked by val_loss (min) once logged" in widget.header.value

    epoch = {"seq": 1, "t": 101.0, "type": "epoch", "epoch": 1, "epochs": 3, "logs": {"loss": 0.5, "val_loss": 0.4}}
    for trial in sweep.trials:
        trial.apply(epoch)
        text.trial_event(trial, epoch)
        widget.trial_event(trial, epoch)
    assert written[1:].count("[remote_train] ranked by val_loss (min)\n") == 1  # said once, before the epoch lines
    assert written[1] == "[remote_train] ranked by val_loss (min)\n" and "Epoch 1/3" in written[2]
    assert " · ranked by val_loss (min) · " in widget.header.value
    widget.finish()

    given = Sweep("sweep-20261127-120000-abcdef", "gpu1", [Trial(0, {"lr": 0.1})], "score", "max")
    assert " · ranked by score (max) · " in sweep_panel.sweep_title(given)  # --metric and --mode: known at once
