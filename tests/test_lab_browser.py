"""JupyterLab in a real browser: the cell panel, the Remote training sidebar, cancel from the sidebar.

Debian's chromium driven by Playwright (no browser is downloaded: executable_path points at
/usr/bin/chromium). Screenshots are saved under the test's tmp dir; their paths are printed
(docs/*.png are these screenshots). The extension under test is the one installed in the venv:
after changing labextension/, rebuild it (`cd labextension && jlpm build`; installed with
`jupyter labextension develop --overwrite .` it is picked up at once).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import fake_nvidia_smi as fake
import pytest
from conftest import run
from host_processes import kill_processes_under
from lab import QUICKSTART, jupyter_lab, needs_chromium
from test_lifecycle import _submitted_job_id
from test_server import submit_job, wait_for_state

from remote_magic import session
from remote_magic.registry import Registry

LIVE_CELL = (
    "%%remote_train --name browser-live\n"
    "import time\n"
    "for step in range(1, 201):\n"
    "    time.sleep(0.2)\n"
    "    remote_log(step=step, total=200, loss=1.0 / step)\n"
)

pytestmark = needs_chromium


def test_pip_install_enables_the_lab_and_server_extensions() -> None:
    jupyter = Path(sys.executable).parent / "jupyter"
    labextensions = subprocess.run([jupyter, "labextension", "list"], capture_output=True, text=True, check=True)
    listing = labextensions.stdout + labextensions.stderr
    assert re.search(r"remote-magic-labextension v[\d.]+ .*enabled.*OK", listing), listing
    server = subprocess.run([jupyter, "server", "extension", "list"], capture_output=True, text=True, check=True)
    assert re.search(r"remote_magic .*enabled", server.stdout + server.stderr)


def _screenshot(page, locator, path: Path) -> None:
    locator.screenshot(path=str(path))
    print(f"screenshot: {path}")


def test_quickstart_panel_and_sidebar_in_jupyterlab(lab, page, ip, tmp_path, capsys) -> None:
    base, token = lab
    page.goto(f"{base}/lab/tree/{QUICKSTART.name}?reset&token={token}")  # not an earlier test's tabs
    page.wait_for_selector(".jp-Notebook", timeout=60_000)
    page.wait_for_function("window.jupyterapp && window.jupyterapp.shell.currentWidget", timeout=60_000)
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator, .jp-KernelStatus", timeout=60_000)
    time.sleep(2)  # the kernel connects
    news = page.locator(".jp-toast-button", has_text="No")  # JupyterLab asks about its news feed: no
    if news.count():
        news.first.click()
    page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
    # While it trains: the live ipywidgets panel (progress bars, Stop and Detach) under the cell.
    finished = page.locator(".remote-magic-panel", has_text="injected: history (assigned); model (changed by the cell)")
    finished.wait_for(timeout=180_000)
    text = finished.inner_text()
    assert re.search(r"done", text)
    assert finished.locator("table.remote-magic-metrics tbody tr").count() == 5  # every epoch
    assert finished.locator("svg.remote-magic-chart").count() >= 2
    _screenshot(page, finished, tmp_path / "panel.png")

    # A longer cell shows the live ipywidgets panel; its Stop button works while the cell runs.
    page.evaluate(
        """async (source) => {
            const notebook = window.jupyterapp.shell.currentWidget.content;
            const model = notebook.model;
            model.sharedModel.insertCell(model.cells.length, {cell_type: 'code', source});
            notebook.activeCellIndex = model.cells.length - 1;
            void window.jupyterapp.commands.execute('notebook:run-cell');  // resolves only when the cell ends
        }""",
        LIVE_CELL,
    )
    live = page.locator(".jp-OutputArea .widget-vbox", has=page.locator("button", has_text="Detach"))
    live.first.wait_for(timeout=60_000)
    page.wait_for_function(
        "[...document.querySelectorAll('.widget-label')].some(label => /^([3-9]|[1-9][0-9])\\/200$/.test(label.textContent))",
        timeout=60_000,
    )
    assert live.first.locator(".widget-progress, .widget-hprogress").count() >= 2
    _screenshot(page, live.first, tmp_path / "live-panel.png")
    live.first.locator("button", has_text="Stop").click()
    stopped = page.locator(".remote-magic-panel", has_text="stopped at step")
    stopped.wait_for(timeout=60_000)
    assert "stopped" in stopped.inner_text()

    page.click("li[data-id='remote-magic-jobs']")
    sidebar = page.locator("#remote-magic-jobs")
    sidebar.locator(".jp-RemoteMagic-refresh").click()
    local = sidebar.locator("section[data-host='local']")
    local.locator(".jp-RemoteMagic-finishedcount").click()  # finished jobs are folded under their count
    done = local.locator(".jp-RemoteMagic-job[data-state='done']", has_text="quickstart")
    done.first.wait_for(timeout=30_000)
    assert "epoch 5/5" in done.first.inner_text()

    # A long job started elsewhere on this machine appears, runs, and is cancelled from the sidebar.
    assert run(ip, "%%remote_train --detach --name browser-long\nimport time\nfor step in range(1, 600):\n"
                   "    time.sleep(0.5)\n    remote_log(step=step, total=600, loss=1.0 / step)\n").success  # fmt: skip
    job_id = _submitted_job_id(capsys.readouterr().out)
    sidebar.locator(".jp-RemoteMagic-refresh").click()
    running = sidebar.locator(f".jp-RemoteMagic-job[data-job-id='{job_id}']")
    running.wait_for(timeout=30_000)
    page.wait_for_function(
        f"document.querySelector(\".jp-RemoteMagic-job[data-job-id='{job_id}']\").dataset.state === 'running'",
        timeout=30_000,
    )
    status_item = page.locator(".jp-RemoteMagic-statusitem")
    assert re.match(r"\d+ remote jobs? running", status_item.inner_text())
    _screenshot(page, sidebar, tmp_path / "sidebar.png")
    running.locator(".jp-RemoteMagic-cancel").click()
    page.locator(".jp-Dialog button", has_text="Cancel job").click()
    page.wait_for_function(
        f"document.querySelector(\".jp-RemoteMagic-job[data-job-id='{job_id}']\").dataset.state === 'cancelled'",
        timeout=60_000,
    )


# ----------------------------------------------------------------- the sidebar over simulated GPUs
SWEEP_ID = "sweep-20261127-120000-5ca1ab"
# An unnamed job whose first statement is longer than the sidebar is wide: its title is cut, never wrapped.
LONG_CELL = (
    'history = [remote_log(step=s, total=600, loss=1 / s) or __import__("time").sleep(0.5) for s in range(1, 601)]\n'
)
# Stopped while it runs (a plain loop, not a fit, ends its 30 steps first: 3 s).
STOPPED_CELL = "for step in range(1, 31):\n    remote_log(step=step, total=30, loss=1.0 / step)\n    __import__('time').sleep(0.1)\n"
TRIALS = [  # the trials of one sweep, ranked by val_loss (min): the first is the best, the second fails
    (0.1, "import time\nremote_log(step=1, total=1, loss=0.3, val_loss=0.2)\n"),
    (0.01, "import time\nraise FloatingPointError('the loss is nan at step 3')\n"),
    (0.001, "import time\nfor step in range(1, 601):\n    remote_log(step=step, total=600, loss=0.5, val_loss=0.4)\n"
            "    time.sleep(0.5)\n"),
]  # fmt: skip


@dataclass
class GpuLab:
    base: str
    token: str
    connections: session.Connections  # to the lab's local host, as the magics would reach it


@pytest.fixture
def gpu_lab(tmp_path, monkeypatch) -> Iterator[GpuLab]:
    """JupyterLab over a local host with 4 simulated GPUs (a fake nvidia-smi) and a registry of its own.

    GPU 0 is busy (87%), another process holds 20 GiB of GPU 2.
    """
    state = fake.write_state(tmp_path / "gpus.json", gpus=4, processes=[{"gpu": 2, "pid": 4242, "memory": 20480}])
    fake.update_gpu(state, 0, utilization=87, memory_used=12288)
    fake.install(tmp_path / "bin", state)
    monkeypatch.setenv("PATH", fake.path_with(tmp_path / "bin"))
    monkeypatch.setenv("REMOTE_MAGIC_DATA_DIR", str(tmp_path / "data"))  # only this test's jobs are listed
    root = tmp_path / "hostroot"
    config = tmp_path / "config"
    config.mkdir()
    settings = {"RemoteMagicApp": {"hosts": {"local": {"root": str(root)}}, "cache_seconds": 0}}
    (config / "jupyter_server_config.json").write_text(json.dumps(settings))
    extra = os.environ.get("JUPYTER_CONFIG_PATH")
    env = {**os.environ, "JUPYTER_CONFIG_PATH": os.pathsep.join([str(config), *([extra] if extra else [])])}
    connections = session.Connections({"local": {"root": str(root)}})
    try:
        with jupyter_lab(tmp_path, env) as (base, token):
            yield GpuLab(base, token, connections)
    finally:
        connections.close()
        kill_processes_under(root)


def _open_sidebar(page, base: str, token: str):  # type: ignore[no-untyped-def]
    page.goto(f"{base}/lab?token={token}")
    page.wait_for_selector("li[data-id='remote-magic-jobs']", timeout=60_000)
    news = page.locator(".jp-toast-button", has_text="No")  # JupyterLab asks about its news feed: no
    if news.count():
        news.first.click()
    page.click("li[data-id='remote-magic-jobs']")
    sidebar = page.locator("#remote-magic-jobs")
    sidebar.locator(".jp-RemoteMagic-refresh").click()
    return sidebar


# Every job title and sweep summary of the sidebar: is it one line (title and state side by side)?
_ONE_LINE = """sidebar => [...sidebar.querySelectorAll('.jp-RemoteMagic-jobtitle')]
    .filter(line => line.offsetParent !== null)
    .map(line => {
        const name = line.querySelector('.jp-RemoteMagic-name'), state = line.querySelector('.jp-RemoteMagic-state');
        const size = parseFloat(getComputedStyle(name).fontSize);
        return {text: name.textContent, height: line.getBoundingClientRect().height, size,
                sameLine: Math.abs(name.getBoundingClientRect().top - state.getBoundingClientRect().top) < 3,
                cut: name.scrollWidth > name.clientWidth};
    })"""


def test_sidebar_gpus_sweep_titles_and_finished_jobs_simulated_gpus(gpu_lab: GpuLab, page, tmp_path) -> None:
    connections, registry = gpu_lab.connections, Registry()
    client = connections.get("local")
    done = submit_job(connections, registry, "local", "remote_log(step=1, total=1, loss=0.25)\n", name="prepare-data")
    stopped = submit_job(connections, registry, "local", STOPPED_CELL)
    trials = [
        submit_job(connections, registry, "local", source,
                   sweep={"id": SWEEP_ID, "trial": i, "params": {"lr": lr}, "parallel": 3, "metric": "val_loss",
                          "mode": "min", "name": "lr-search"})
        for i, (lr, source) in enumerate(TRIALS)
    ]  # fmt: skip
    running = submit_job(connections, registry, "local", LONG_CELL, gpus=1)
    wait_for_state(client, stopped, {"running"})
    client.stop(stopped)
    for job_id, state in ((done, "done"), (stopped, "stopped"), (trials[0], "done"), (trials[1], "error"),
                          (trials[2], "running"), (running, "running")):  # fmt: skip
        wait_for_state(client, job_id, {state})

    sidebar = _open_sidebar(page, gpu_lab.base, gpu_lab.token)
    host = sidebar.locator("section[data-host='local']")
    # The host's GPUs, one line each: the job's title holds one, another process holds GPU 2, two are free.
    gpus = host.locator(".jp-RemoteMagic-gpu")
    gpus.first.wait_for(timeout=30_000)
    assert gpus.count() == 4
    assert "4 × NVIDIA H100 80GB HBM3" in host.locator(".jp-RemoteMagic-gpuhead").inner_text()
    assert "87%" in host.locator(".jp-RemoteMagic-gpu[data-gpu='0']").inner_text()
    page.wait_for_function(
        'document.querySelectorAll(".jp-RemoteMagic-gpuholder").length === 4 && [...document.querySelectorAll('
        "'.jp-RemoteMagic-gpuholder')].some(h => h.textContent.startsWith('history = [remote_log('))",
        timeout=30_000,
    )
    holders = [h.inner_text() for h in host.locator(".jp-RemoteMagic-gpuholder").all()]
    assert sum(h.startswith("history = [remote_log(") for h in holders) == 1  # --gpus 1
    assert "pid 4242" in holders[2] and holders.count("free") == 2

    # An unnamed job is titled by its first statement, cut to one line with its state beside it.
    row = host.locator(f".jp-RemoteMagic-job[data-job-id='{running}']")
    assert row.locator(".jp-RemoteMagic-name").inner_text().startswith("history = [remote_log(step=s")
    assert row.locator(".jp-RemoteMagic-state").inner_text() == "running"

    # The sweep is one entry: its trials, their states and the best of them; the trials inside it only.
    sweep = host.locator(f".jp-RemoteMagic-sweep[data-sweep-id='{SWEEP_ID}']")
    assert sweep.count() == 1
    summary = sweep.locator(".jp-RemoteMagic-sweepsummary")
    assert summary.locator(".jp-RemoteMagic-name").inner_text() == "lr-search"
    assert summary.locator(".jp-RemoteMagic-state").inner_text() == "3 trials"
    assert summary.locator(".jp-RemoteMagic-sweepid").inner_text() == SWEEP_ID
    assert summary.locator(".jp-RemoteMagic-sweepcounts").inner_text() == "1 running · 1 done · 1 failed"
    assert summary.locator(".jp-RemoteMagic-sweepbest").inner_text() == "best val_loss 0.2000 (#0 lr=0.1)"
    assert all(sidebar.locator(f".jp-RemoteMagic-job[data-job-id='{t}']").count() == 1 for t in trials)
    assert all(sweep.locator(f".jp-RemoteMagic-job[data-job-id='{t}']").count() == 1 for t in trials)
    assert not sweep.locator(".jp-RemoteMagic-job").first.is_visible()
    sweep.locator(".jp-RemoteMagic-sweepsummary").click()
    trial_rows = sweep.locator(".jp-RemoteMagic-trials .jp-RemoteMagic-job")
    trial_rows.first.wait_for(timeout=10_000)
    ranked = [r.get_attribute("data-job-id") for r in trial_rows.all()]
    assert ranked == [trials[0], trials[2], trials[1]]  # by val_loss; the failed trial, without one, last
    assert trial_rows.first.locator(".jp-RemoteMagic-name").inner_text() == "#0 lr=0.1"
    assert sweep.locator(f"[data-job-id='{trials[1]}']").get_attribute("data-state") == "error"

    # Finished jobs fold under their count.
    fold = host.locator(".jp-RemoteMagic-finished")
    assert fold.locator(".jp-RemoteMagic-finishedcount").inner_text() == "2 finished"
    stopped_row = fold.locator(f".jp-RemoteMagic-job[data-job-id='{stopped}']")
    assert not stopped_row.is_visible()
    fold.locator(".jp-RemoteMagic-finishedcount").click()
    stopped_row.wait_for(state="visible", timeout=10_000)
    assert stopped_row.locator(".jp-RemoteMagic-name").inner_text() == "for step in range(1, 31):"
    assert (
        fold.locator(f".jp-RemoteMagic-job[data-job-id='{done}'] .jp-RemoteMagic-name").inner_text() == "prepare-data"
    )

    # Icons are drawn (SVG), never glyphs a font may lack; every row is one line.
    icons = sidebar.locator(".jp-RemoteMagic-icon")  # the running job, the sweep and its 3 trials, 2 finished
    assert icons.count() == 7 and all(i.locator("svg").count() == 1 and i.inner_text() == "" for i in icons.all())
    assert not re.search(r"[\u2190-\u21ff\u2300-\u27bf\u2b00-\u2bff\U0001f000-\U0001faff]", sidebar.inner_text())
    lines = sidebar.evaluate(_ONE_LINE)
    assert len(lines) == 7, lines  # the running job, the sweep and its 3 trials, 2 finished jobs
    assert all(line["sameLine"] and line["height"] < 2 * line["size"] for line in lines), lines
    assert next(line for line in lines if line["text"].startswith("history = "))["cut"]
    _sidebar_screenshot(page, sidebar, tmp_path / "sidebar.png")

    # Clear finished hides them in this browser, also after a reload; the hosts and the registry keep them.
    fold.locator(".jp-RemoteMagic-clear").click()
    fold.wait_for(state="detached", timeout=10_000)
    assert sidebar.locator(".jp-RemoteMagic-footer").inner_text().startswith("2 cleared jobs hidden")
    cleared = page.evaluate("JSON.parse(window.localStorage.getItem('remote-magic:cleared-jobs'))")
    assert sorted(cleared) == sorted([f"local/{done}", f"local/{stopped}"])
    sidebar = _open_sidebar(page, gpu_lab.base, gpu_lab.token)
    host = sidebar.locator("section[data-host='local']")
    host.locator(f".jp-RemoteMagic-sweep[data-sweep-id='{SWEEP_ID}']").wait_for(timeout=30_000)
    assert host.locator(".jp-RemoteMagic-finished").count() == 0
    assert sidebar.locator(f"[data-job-id='{done}']").count() == 0
    assert client.status(done)["state"] == "done" and client.status(stopped)["state"] == "stopped"
    assert {done, stopped} <= {r.job_id for r in Registry().records()}
    sidebar.locator(".jp-RemoteMagic-restore").click()  # Show again
    assert host.locator(".jp-RemoteMagic-finishedcount").inner_text() == "2 finished"

    # Cancel sweep ends the trials still running; the whole sweep then folds with the finished jobs.
    sweep = host.locator(f".jp-RemoteMagic-sweep[data-sweep-id='{SWEEP_ID}']")
    sweep.locator(".jp-RemoteMagic-sweepsummary").click()
    sweep.locator(".jp-RemoteMagic-cancelsweep").click()
    page.locator(".jp-Dialog button", has_text="Cancel sweep").click()
    wait_for_state(client, trials[2], {"cancelled"})
    host.locator(".jp-RemoteMagic-finished .jp-RemoteMagic-sweep").wait_for(state="attached", timeout=30_000)
    assert host.locator(".jp-RemoteMagic-finishedcount").inner_text() == "3 finished"
    assert client.status(running)["state"] == "running"  # a job outside the sweep runs on


def _sidebar_screenshot(page, sidebar, path: Path) -> None:  # type: ignore[no-untyped-def]
    """The sidebar down to its last line (not the empty panel below it)."""
    box = sidebar.bounding_box()
    bottom = sidebar.evaluate(
        "panel => Math.max(...[...panel.children].map(child => child.getBoundingClientRect().bottom))"
    )
    page.screenshot(path=str(path), clip={"x": box["x"], "y": box["y"], "width": box["width"],
                                          "height": min(box["height"], bottom - box["y"] + 8)})  # fmt: skip
    print(f"screenshot: {path}")
