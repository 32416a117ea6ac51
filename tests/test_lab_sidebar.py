"""The Remote training sidebar and status bar in a real browser: what they list while a cell blocks, the kernel's
busy state, the dark theme, the keyboard.

Debian's chromium driven by Playwright, against the session's shared JupyterLab (the ``lab`` fixture). The
screenshots of the sidebar in both themes are saved under the test's tmp dir and their paths printed
(docs/sidebar.png and docs/sidebar-dark.png are these).
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.request
from pathlib import Path

import pytest
from lab import needs_chromium
from playwright.sync_api import expect
from test_lab_browser import _sidebar_screenshot

from remote_magic.registry import Registry

pytestmark = needs_chromium

BLOCKING_CELL = (
    "%%remote_train --name sidebar-blocking\n"
    "import time\n"
    "for step in range(1, 31):\n"
    "    time.sleep(0.5)\n"
    "    remote_log(step=step, total=30, loss=1.0 / step)\n"
)


def _put_notebook(base: str, token: str, name: str, sources: list[str]) -> None:
    cells = [
        {"cell_type": "code", "source": s, "metadata": {}, "outputs": [], "execution_count": None} for s in sources
    ]
    notebook = {
        "cells": cells,
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    body = json.dumps({"type": "notebook", "format": "json", "content": notebook}).encode()
    request = urllib.request.Request(
        f"{base}/api/contents/{name}", data=body, method="PUT",
        headers={"Authorization": f"token {token}", "Content-Type": "application/json"},
    )  # fmt: skip
    urllib.request.urlopen(request, timeout=10).close()


def _open(page, url: str) -> None:  # type: ignore[no-untyped-def]
    # ``reset``: the session's one lab would otherwise restore an earlier test's notebook as the current tab.
    page.goto(url.replace("?", "?reset&", 1))
    page.wait_for_selector("li[data-id='remote-magic-jobs']", timeout=60_000)
    news = page.locator(".jp-toast-button", has_text="No")  # JupyterLab asks about its news feed: no
    if news.count():
        news.first.click()


def _run_cell(page, index: int) -> None:  # type: ignore[no-untyped-def]
    """Run cell ``index``; ``window.__cellDone`` turns true when it ends."""
    page.evaluate(
        """index => {
            window.__cellDone = false;
            window.jupyterapp.shell.currentWidget.content.activeCellIndex = index;
            window.jupyterapp.commands.execute('notebook:run-cell').then(() => { window.__cellDone = true; });
        }""",
        index,
    )


KERNEL_STATUS = "window.jupyterapp.shell.currentWidget?.sessionContext?.kernelDisplayStatus"


def test_blocking_cell_is_listed_at_once_and_the_kernel_stays_busy(lab, page) -> None:
    """The first remote cell of a fresh kernel, blocking: its job is in the sidebar and the status bar while it
    runs, and the kernel reads busy all along (the panel's first widget comm once made it read idle)."""
    base, token = lab
    _put_notebook(base, token, "sidebar-blocking.ipynb", ["%load_ext remote_magic", BLOCKING_CELL])
    _open(page, f"{base}/lab/tree/sidebar-blocking.ipynb?token={token}")
    page.wait_for_function(f"{KERNEL_STATUS} === 'idle'", timeout=60_000)
    page.click("li[data-id='remote-magic-jobs']")
    _run_cell(page, 0)
    page.wait_for_function(f"window.__cellDone && {KERNEL_STATUS} === 'idle'", timeout=60_000)

    registry = Registry()  # the lab's kernels share the tests' data folder: its registry is this one
    earlier = sum(record.name == "sidebar-blocking" for record in registry.records())
    _run_cell(page, 1)
    started = time.monotonic()
    row = page.locator("#remote-magic-jobs .jp-RemoteMagic-job[data-state='running']", has_text="sidebar-blocking")
    status_item = page.locator(".jp-RemoteMagic-statusitem")
    statuses, registered, listed, counted = [], None, None, None
    while not page.evaluate("window.__cellDone") and time.monotonic() - started < 60:
        statuses.append((time.monotonic() - started, page.evaluate(KERNEL_STATUS)))
        if registered is None and sum(r.name == "sidebar-blocking" for r in registry.records()) > earlier:
            registered = time.monotonic() - started
        if listed is None and row.count():
            listed = time.monotonic() - started
        if (
            counted is None
            and status_item.is_visible()
            and re.match(r"\d+ remote jobs? running", status_item.inner_text())
        ):
            counted = time.monotonic() - started
        time.sleep(0.25)
    ended = time.monotonic() - started
    assert ended > 12, f"the cell ended after {ended:.1f}s: it did not block"
    # Listed and counted within moments of the kernel recording the job (before: only once the cell ended).
    assert registered is not None and registered < ended - 8, (registered, ended)
    assert listed is not None and listed - registered < 3, (registered, listed, ended)
    assert counted is not None and counted - registered < 3, (registered, counted, ended)
    assert "running" in (status_item.get_attribute("title") or "") or not status_item.is_visible()
    # From the moment the kernel took the cell on to a second before the cell's end was seen (the kernel goes
    # idle just before the browser's promise for the cell resolves): busy all along.
    took = next(t for t, status in statuses if status == "busy")
    during = {status for t, status in statuses if took <= t < ended - 1.0}
    assert during == {"busy"}, f"the kernel read {sorted(during)} during the cell: {statuses}"


def test_jobs_api_answers_unchanged_until_a_kernel_records_a_job(lab) -> None:
    """The sidebar's poll while nothing runs costs the hosts nothing until the registry changes."""
    base, token = lab

    def jobs(query: str = "") -> dict:
        request = urllib.request.Request(
            f"{base}/remote-magic/api/jobs{query}", headers={"Authorization": f"token {token}"}
        )
        with urllib.request.urlopen(request, timeout=30) as reply:
            return json.loads(reply.read())

    path = Path(Registry().path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()  # an empty registry is a valid one
    version = jobs()["registry"]
    assert jobs(f"?unless={version}") == {
        "unchanged": True,
        "registry": version,
        "time": pytest.approx(time.time(), abs=30),
    }
    info = path.stat()
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000))  # as a kernel's append would
    listed = jobs(f"?unless={version}")
    assert "jobs" in listed and listed["registry"] != version


# ------------------------------------------------------------------ the sidebar over a faked jobs API
NOW = time.time()
JOBS = [
    {"host": "gpu1", "job_id": "job-20261207-100000-aaaa01", "name": "resnet-lr3", "state": "running", "epoch": 12,
     "epochs": 40, "logs": {"loss": 0.4123, "val_loss": 0.4671}, "started": NOW - 340, "submitted": NOW - 345},
    {"host": "gpu1", "job_id": "job-20261207-100500-aaaa02", "name": "resnet-lr4", "state": "running", "epoch": 3,
     "epochs": 40, "logs": {"loss": 0.9012}, "started": NOW - 60, "submitted": NOW - 65},
    {"host": "gpu1", "job_id": "job-20261207-101000-aaaa03", "name": "bert-base", "state": "queued",
     "reason": "waiting for a free GPU (2 of 2 busy)", "position": 1, "submitted": NOW - 30},
    {"host": "gpu1", "job_id": "job-20261207-101500-aaaa04", "name": "bert-large", "state": "requeued",
     "reason": "preempted: back in the queue", "position": 2, "submitted": NOW - 20},
    {"host": "gpu1", "job_id": "job-20261207-090000-aaaa05", "name": "prepare-data", "state": "done", "epoch": 5,
     "epochs": 5, "logs": {"loss": 0.25}, "started": NOW - 4000, "ended": NOW - 3900, "submitted": NOW - 4005},
    {"host": "gpu1", "job_id": "job-20261207-091000-aaaa06", "title": "model.fit(x, y, epochs=10)", "state": "error",
     "message": "FloatingPointError: the loss is nan at epoch 3", "started": NOW - 3000, "ended": NOW - 2950,
     "submitted": NOW - 3005},
]  # fmt: skip
GPUS = {"hosts": [{"host": "gpu1", "error": None, "gpus": [
    {"index": 0, "name": "NVIDIA A100 80GB", "memory_used": 61440, "memory_total": 81920, "utilization": 93,
     "job_id": "job-20261207-100000-aaaa01"},
    {"index": 1, "name": "NVIDIA A100 80GB", "memory_used": 20480, "memory_total": 81920, "utilization": 41,
     "job_id": "job-20261207-100500-aaaa02"},
]}]}  # fmt: skip
EVENTS = {
    "events": [{"seq": 0, "type": "stdout", "text": "loading data\n"}, {"seq": 1, "type": "stdout", "text": "ok\n"}]
}
FIRST = JOBS[0]["job_id"]
NEWEST = JOBS[3]["job_id"]  # the first row: newest first


def _fake_api(page) -> None:  # type: ignore[no-untyped-def]
    """The sidebar's REST API answered by the page itself: four active jobs (2 running, 2 queued), two ended."""

    def answer(route) -> None:  # type: ignore[no-untyped-def]
        url = route.request.url
        body = EVENTS if "/events" in url else GPUS if "/api/gpus" in url else {"jobs": JOBS, "registry": "1"}
        route.fulfill(status=200, content_type="application/json", body=json.dumps(body))

    page.route(re.compile(r".*/remote-magic/api/.*"), answer)


def _open_faked_sidebar(page, base: str, token: str):  # type: ignore[no-untyped-def]
    _fake_api(page)
    _open(page, f"{base}/lab?token={token}")
    page.click("li[data-id='remote-magic-jobs']")
    sidebar = page.locator("#remote-magic-jobs")
    sidebar.locator(f".jp-RemoteMagic-job[data-job-id='{FIRST}']").wait_for(timeout=30_000)
    sidebar.locator(".jp-RemoteMagic-finishedcount").click()
    return sidebar


# The background each element is drawn on: its own, else its nearest ancestor's that is not transparent.
_BACKGROUNDS = """nodes => nodes.map(node => {
    let bg = 'rgba(0, 0, 0, 0)';
    for (let n = node; n && /rgba\\(.*, 0\\)$|transparent/.test(bg); n = n.parentElement) {
        bg = getComputedStyle(n).backgroundColor;
    }
    const luminance = colour => {
        const [r, g, b] = colour.match(/[\\d.]+/g).map(Number);
        return (0.2126 * r + 0.7152 * g + 0.0722 * b) / 255;
    };
    const text = getComputedStyle(node).color;
    return {cls: node.className, bg, light: luminance(bg), text, textLight: luminance(text)};
})"""


def test_status_bar_counts_running_and_queued_and_both_themes_read(lab, page, tmp_path) -> None:
    base, token = lab
    sidebar = _open_faked_sidebar(page, base, token)
    item = page.locator(".jp-RemoteMagic-statusitem")
    assert item.inner_text() == "2 remote jobs running, 2 queued"
    assert item.get_attribute("title") == "2 running, 2 queued remote jobs; click to open the sidebar"
    # JupyterLab's own text item: on the same line as its neighbours' text, and a hover state.
    text = item.locator(".jp-StatusBar-TextItem")
    neighbour = page.locator(".jp-StatusBar-Left .jp-StatusBar-TextItem").filter(has_not_text="remote job")
    centre = lambda box: box["y"] + box["height"] / 2  # noqa: E731
    assert abs(centre(text.bounding_box()) - centre(neighbour.first.bounding_box())) < 1, "off its neighbours' line"
    before = item.evaluate("node => getComputedStyle(node).backgroundColor")
    item.hover()
    assert item.evaluate("node => getComputedStyle(node).backgroundColor") != before, "no hover state"

    # A row's actions sit beside its title, never over its metrics, also while the pointer is on the row.
    row = sidebar.locator(f".jp-RemoteMagic-job[data-job-id='{FIRST}']")
    row.hover()
    actions = row.locator(".jp-RemoteMagic-buttons").bounding_box()
    for line in row.locator(".jp-RemoteMagic-jobtitle, .jp-RemoteMagic-details, .jp-RemoteMagic-progress").all():
        box = line.bounding_box()
        apart = box["x"] + box["width"] <= actions["x"] or box["y"] >= actions["y"] + actions["height"]
        assert apart, (line.get_attribute("class"), box, actions)
    _sidebar_screenshot(page, sidebar, tmp_path / "sidebar.png")

    page.evaluate("window.jupyterapp.commands.execute('apputils:change-theme', {theme: 'JupyterLab Dark'})")
    try:
        _dark_theme_reads(page, sidebar, item, tmp_path)
    finally:  # the theme is a user setting of the shared server: back to light for the other tests
        page.evaluate("window.jupyterapp.commands.execute('apputils:change-theme', {theme: 'JupyterLab Light'})")
        page.wait_for_function("document.body.dataset.jpThemeLight === 'true'", timeout=30_000)


def _dark_theme_reads(page, sidebar, item, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    page.wait_for_function("document.body.dataset.jpThemeLight === 'false'", timeout=30_000)
    time.sleep(0.5)  # the theme's stylesheet applies
    page.mouse.move(700, 500)
    nodes = sidebar.locator(
        ".jp-RemoteMagic-job, .jp-RemoteMagic-action, .jp-RemoteMagic-progress, .jp-RemoteMagic-gpus, "
        ".jp-RemoteMagic-details, .jp-RemoteMagic-name, .jp-RemoteMagic-refresh, .jp-RemoteMagic-icon"
    )
    colours = nodes.evaluate_all(_BACKGROUNDS) + item.evaluate_all(_BACKGROUNDS)
    assert len(colours) > 20
    assert all(c["light"] < 0.5 for c in colours), [c for c in colours if c["light"] >= 0.5]
    assert all(c["textLight"] > 0.5 for c in colours if "name" in c["cls"] or "details" in c["cls"]), colours
    _sidebar_screenshot(page, sidebar, tmp_path / "sidebar-dark.png")


def test_rows_and_their_actions_work_from_the_keyboard(lab, page) -> None:
    base, token = lab
    sidebar = _open_faked_sidebar(page, base, token)
    # JupyterLab hands the focus to its launcher once its layout is restored: let that be done first.
    page.evaluate("async () => { await window.jupyterapp.restored; }")
    page.wait_for_function("window.jupyterapp.shell.currentWidget", timeout=30_000)
    time.sleep(0.5)
    sidebar.locator(".jp-RemoteMagic-refresh").focus()
    focused = []
    for _ in range(4):
        page.keyboard.press("Tab")
        focused.append(page.evaluate("document.activeElement.dataset.focusKey || document.activeElement.className"))
    key = f"gpu1/{NEWEST}"
    assert focused[:4] == [f"row:{key}", f"copy:{key}", f"log:{key}", f"cancel:{key}"], focused
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("Shift+Tab")  # back to Copy attach
    page.keyboard.press("Enter")
    row = sidebar.locator(f".jp-RemoteMagic-job[data-job-id='{NEWEST}']")
    copied = row.locator(".jp-RemoteMagic-copied")
    copied.wait_for(timeout=2_000)
    assert copied.inner_text() == "Copied"
    # The list is rebuilt on every poll (3 s while jobs run): the focus stays on the same button.
    time.sleep(3.5)
    assert page.evaluate("document.activeElement.dataset.focusKey") == f"copy:{key}"
    assert copied.count() == 0, "Copied stays longer than 1.5 s"
    # Space on a focused row opens its log.
    page.keyboard.press("Shift+Tab")
    assert page.evaluate("document.activeElement.dataset.focusKey") == f"row:{key}"
    page.keyboard.press(" ")
    log = row.locator(".jp-RemoteMagic-log")
    log.wait_for(timeout=5_000)
    expect(log).to_contain_text("loading data", timeout=10_000)  # "loading…" until the events arrive
