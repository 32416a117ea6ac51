"""JupyterLab in a real browser: the cell panel, the Remote training sidebar, cancel from the sidebar.

Debian's chromium driven by Playwright (no browser is downloaded: executable_path points at
/usr/bin/chromium). Screenshots are saved under the test's tmp dir; their paths are printed.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import run
from sshd import free_port
from test_lifecycle import _submitted_job_id

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
QUICKSTART = Path(__file__).resolve().parent.parent / "examples" / "notebooks" / "01_quickstart.ipynb"
# As the machine notes say: without the background-networking flags chromium keeps calling out.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip

LIVE_CELL = (
    "%%remote_train --name browser-live\n"
    "import time\n"
    "for step in range(1, 201):\n"
    "    time.sleep(0.2)\n"
    "    remote_log(step=step, total=200, loss=1.0 / step)\n"
)

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed")


@pytest.fixture
def lab(tmp_path):
    """`jupyter lab` on 127.0.0.1 with a token, serving a copy of the quickstart."""
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(QUICKSTART, root / QUICKSTART.name)
    port, token = free_port(), secrets.token_hex(16)
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")}
    env.pop("REMOTE_MAGIC_PANEL", None)
    log = open(tmp_path / "lab.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True",
         "--ServerApp.open_browser=False", "--allow-root", "--LabApp.news_url=None",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
            break
        except OSError:
            time.sleep(0.3)
    try:
        yield base, token
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.fixture
def page(tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        yield context.new_page()
        browser.close()


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
    page.goto(f"{base}/lab/tree/{QUICKSTART.name}?token={token}")
    page.wait_for_selector(".jp-Notebook", timeout=60_000)
    page.wait_for_function("window.jupyterapp && window.jupyterapp.shell.currentWidget", timeout=60_000)
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator, .jp-KernelStatus", timeout=60_000)
    time.sleep(2)  # the kernel connects
    news = page.locator(".jp-toast-button", has_text="No")  # JupyterLab asks about its news feed: no
    if news.count():
        news.first.click()
    page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
    # While it trains: the live ipywidgets panel (progress bars, Stop and Detach) under the cell.
    finished = page.locator(".remote-magic-panel", has_text="injected: history, model")
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
    stopped = page.locator(".remote-magic-panel", has_text="stopped at epoch")
    stopped.wait_for(timeout=60_000)
    assert "stopped" in stopped.inner_text()

    page.click("li[data-id='remote-magic-jobs']")
    sidebar = page.locator("#remote-magic-jobs")
    sidebar.locator(".jp-RemoteMagic-refresh").click()
    done = sidebar.locator(".jp-RemoteMagic-job[data-state='done']", has_text="quickstart")
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
