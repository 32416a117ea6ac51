"""The cell panel in JupyterLab: what a saved, reopened or exported notebook shows, the table, the dark theme.

Uses the session's shared JupyterLab (the ``lab`` fixture) and Debian's chromium; each test writes its own
notebook into the lab's root through the contents API, so the tests share nothing but the server.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request

from lab import SCREENSHOTS, needs_chromium

pytestmark = needs_chromium

# 20 steps of a plain loop; the learning rate is tiny, as real ones are (2.5e-04 must not read 0.0000).
DETACHED_CELL = (
    "%%remote_train --detach --name lab-detached\n"
    "import time\n"
    "for step in range(1, 21):\n"
    "    time.sleep(0.05)\n"
    "    remote_log(step=step, total=20, loss=1.0 / step, learning_rate=2.5e-4 / step)\n"
)
BLOCKING_CELL = (
    "%%remote_train --name lab-twenty\n"
    "import time\n"
    "for step in range(1, 21):\n"
    "    time.sleep(0.3)\n"
    "    remote_log(step=step, total=20, loss=1.0 / step, sparse_categorical_accuracy=1 - 1.0 / (step + 1))\n"
)


def _api(base: str, token: str, path: str, method: str = "GET", body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{base}/api/{path}?token={token}", data=data, method=method)
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read() or b"{}")


def _write_notebook(base: str, token: str, name: str, sources: list[str]) -> None:
    cells = [
        {"cell_type": "code", "metadata": {}, "source": s, "outputs": [], "execution_count": None} for s in sources
    ]
    kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook = {"cells": cells, "metadata": {"kernelspec": kernelspec}, "nbformat": 4, "nbformat_minor": 5}
    _api(base, token, f"contents/{name}", "PUT", {"type": "notebook", "format": "json", "content": notebook})


def _open(page, base: str, token: str, name: str) -> None:  # type: ignore[no-untyped-def]
    page.goto(f"{base}/lab/tree/{name}?reset&token={token}")
    page.wait_for_selector(".jp-Notebook", timeout=60_000)
    page.wait_for_function(
        "window.jupyterapp && window.jupyterapp.shell.currentWidget && "
        "window.jupyterapp.shell.currentWidget.sessionContext?.session?.kernel?.status === 'idle'",
        timeout=60_000,
    )
    news = page.locator(".jp-toast-button", has_text="No")  # JupyterLab asks about its news feed: no
    if news.count():
        news.first.click()


def _start(page, base: str, token: str, name: str, sources: list[str]) -> None:  # type: ignore[no-untyped-def]
    """Write the notebook into the lab's root, open it on a fresh workspace and run all its cells."""
    _write_notebook(base, token, name, sources)
    _open(page, base, token, name)
    _run_all(page)


def _run_all(page) -> None:  # type: ignore[no-untyped-def]
    page.evaluate("() => { void window.jupyterapp.commands.execute('notebook:run-all-cells'); }")  # not awaited


def _restart_kernel_and_save(page) -> None:  # type: ignore[no-untyped-def]
    page.evaluate(
        """async () => {
            const panel = window.jupyterapp.shell.currentWidget;
            await panel.sessionContext.session.kernel.restart();
            await panel.context.save();
        }"""
    )


STILL_RUNNING_CELL = (
    "%%remote_train --detach --name lab-still-running\n"
    "import time\n"
    "for step in range(1, 121):\n"
    "    time.sleep(0.5)\n"
    "    remote_log(step=step, total=120, loss=1.0 / step)\n"
)


def _cell_output(page, index: int) -> str:  # type: ignore[no-untyped-def]
    return page.locator(".jp-Notebook .jp-Cell").nth(index).locator(".jp-OutputArea").inner_text()


def test_detached_jobs_after_a_kernel_restart_reopened_and_exported(lab, page, tmp_path) -> None:
    """Issue 21: a detached cell reopened after a kernel restart said "Error displaying widget: model not found",
    and its HTML export "job · queued" with no job id although every epoch had finished."""
    base, token = lab
    name = "detached-restart.ipynb"
    _start(page, base, token, name, ["%load_ext remote_magic", DETACHED_CELL, STILL_RUNNING_CELL])
    page.locator(".jp-Cell").nth(1).locator(".jp-OutputArea", has_text="injected:").wait_for(timeout=90_000)
    page.locator(".jp-Cell").nth(2).locator(".jp-OutputArea", has_text="/120 steps").wait_for(timeout=60_000)
    _restart_kernel_and_save(page)  # the first job has ended; the second runs on, followed by no kernel now

    _open(page, base, token, name)
    page.locator(".jp-Cell").nth(2).locator(".remote-magic-panel").wait_for(timeout=30_000)
    time.sleep(1)  # a widget that cannot come back would say so by now
    finished, running = _cell_output(page, 1), _cell_output(page, 2)
    assert "model not found" not in finished + running
    job_id = re.search(r"job (\d{8}-\d{6}-\w+) on host local", finished).group(1)
    assert f"job {job_id} on host local: done, 20/20 steps; `%remote_attach {job_id} --host local` shows it" in finished
    assert "injected: step (assigned)" in finished
    assert page.locator(".jp-Cell").nth(1).locator("table.remote-magic-metrics tbody tr").count() == 20
    assert re.search(
        r"job \S+ on host local: running, \d+/120 steps at [\d:]+, followed by the kernel session", running
    )
    assert "%remote_attach" in running

    path = tmp_path / name
    path.write_text(json.dumps(_api(base, token, f"contents/{name}")["content"]))
    exported = subprocess.run(
        [sys.executable, "-m", "nbconvert", "--to", "html", "--stdout", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"job {job_id}" in exported and "· done ·" in exported
    first = exported[exported.index(f"job {job_id}") :]
    first = first[: first.index("</table>")]
    assert re.findall(r"<tr><td>(\d+)</td>", first) == [str(i) for i in range(1, 21)]
    assert "earlier steps" not in exported and "job · queued" not in exported


def _rgb(css: str) -> tuple[float, ...]:
    return tuple(float(v) for v in re.findall(r"[\d.]+", css)[:3])


def _luminance(css: str) -> float:
    r, g, b = _rgb(css)
    return (0.2126 * r + 0.7152 * g + 0.0722 * b) / 255


_COLORS = """panel => {
    const chart = panel.querySelector('svg.remote-magic-chart'), table = panel.querySelector('table.remote-magic-metrics');
    const cell = table.querySelector('td'), grid = chart.querySelector('line');
    let node = table, background = 'rgba(0, 0, 0, 0)';
    while (node && /rgba\\(0, 0, 0, 0\\)|transparent/.test(background)) {
        background = getComputedStyle(node).backgroundColor; node = node.parentElement;
    }
    return {chartText: getComputedStyle(chart).color, tableText: getComputedStyle(cell).color,
            grid: getComputedStyle(grid).stroke, background};
}"""


def test_a_twenty_step_table_in_full_and_the_dark_theme(lab, page) -> None:
    """Issue 21: the table was a 16em box that hid the newest rows; charts were white boxes in the dark theme."""
    base, token = lab
    name = "twenty-steps.ipynb"
    _start(page, base, token, name, ["%load_ext remote_magic", BLOCKING_CELL])
    live = page.locator(".jp-OutputArea .widget-vbox", has=page.locator("button", has_text="Detach"))
    live.first.wait_for(timeout=60_000)
    page.wait_for_function(
        "[...document.querySelectorAll('.widget-label')].some(l => /^1[0-9]\\/20$/.test(l.textContent))",
        timeout=60_000,
    )
    bars = live.first.locator(".widget-progress, .widget-hprogress")
    assert sum(bar.is_visible() for bar in bars.all()) == 1  # no empty batch bar for a remote_log loop
    assert "epoch" not in live.first.locator(".remote-magic-epochs").inner_text()
    live.first.screenshot(path=str(SCREENSHOTS / "live-panel.png"))
    panel = page.locator(".remote-magic-panel", has_text="injected:")
    panel.wait_for(timeout=60_000)
    rows = panel.locator("table.remote-magic-metrics tbody tr")
    assert rows.count() == 20
    rows.last.scroll_into_view_if_needed()
    assert rows.last.is_visible() and rows.last.locator("td").first.inner_text() == "20"
    legend = panel.locator("svg[data-metric='sparse_categorical_accuracy'] .remote-magic-legend")
    title = panel.locator("svg[data-metric='sparse_categorical_accuracy'] text[font-weight='bold']")
    assert legend.count() == 0 or legend.first.bounding_box()["y"] >= title.bounding_box()["y"] + 8
    panel.screenshot(path=str(SCREENSHOTS / "panel.png"))

    light = panel.evaluate(_COLORS)
    page.evaluate("window.jupyterapp.commands.execute('apputils:change-theme', {theme: 'JupyterLab Dark'})")
    page.wait_for_function("document.body.dataset.jpThemeLight === 'false'", timeout=30_000)
    time.sleep(1)
    dark = panel.evaluate(_COLORS)
    assert _luminance(light["background"]) > 0.8 and _luminance(light["chartText"]) < 0.4, light
    assert _luminance(dark["background"]) < 0.3, dark
    assert _luminance(dark["chartText"]) > 0.6 and _luminance(dark["tableText"]) > 0.6, dark
    assert _luminance(dark["grid"]) < 0.5, dark  # separators, not white lines
    panel.screenshot(path=str(SCREENSHOTS / "panel-dark.png"))
    page.evaluate("window.jupyterapp.commands.execute('apputils:change-theme', {theme: 'JupyterLab Light'})")
