"""A blocking cell whose kernel restarts while it runs: the saved notebook keeps the live widget's output, whose
model died with that kernel. Reopened, the lab shows the output's HTML copy of the panel (the job's last state)
instead of "Error displaying widget: model not found" (issue 21; labextension/src/widgetfallback.ts).
"""

from __future__ import annotations

import re
import time

from lab import needs_chromium
from test_lab_panel import _api, _open, _restart_kernel_and_save, _start

pytestmark = needs_chromium

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
BLOCKING_CELL = (
    "%%remote_train --name lab-restarted\n"
    "import time\n"
    "for step in range(1, 31):\n"
    "    time.sleep(0.3)\n"
    "    remote_log(step=step, total=30, loss=1.0 / step)\n"
)
# The epoch label of the live widget: "12/30".
_STEP = """() => {
    const label = [...document.querySelectorAll('.jp-Notebook .widget-label')].find(l => /^\\d+\\/30$/.test(l.textContent));
    return label ? parseInt(label.textContent) : 0;
}"""


def test_a_blocking_cell_restarted_while_it_runs_reopens_as_its_last_state(lab, page) -> None:
    base, token = lab
    name = "blocking-restart.ipynb"
    _start(page, base, token, name, ["%load_ext remote_magic", BLOCKING_CELL])
    cell = page.locator(".jp-Notebook .jp-Cell").nth(1)
    # A live widget is still drawn as one: its buttons, not the copy.
    live = cell.locator(".widget-vbox", has=page.locator("button", has_text="Detach"))
    live.wait_for(timeout=60_000)
    assert cell.locator("button", has_text="Stop").is_visible()
    assert cell.locator(".jp-RemoteMagic-showCopy").count() == 0
    page.wait_for_function(f"({_STEP})() >= 3", timeout=60_000)
    # An update of the fallback by display id (every 2 s while the job moves) leaves the view in place.
    live.evaluate("node => { node.dataset.remoteMagicMark = 'kept'; }")
    page.wait_for_function(f"({_STEP})() >= 12", timeout=30_000)
    assert cell.locator(".widget-vbox[data-remote-magic-mark='kept']").is_visible()
    step = page.evaluate(_STEP)
    job_id = re.search(r"job (\d{8}-\d{6}-\w+)", live.inner_text()).group(1)

    _restart_kernel_and_save(page)  # the cell never ended: the saved output is the live widget and its fallback
    cell.locator(".jp-RemoteMagic-showCopy .remote-magic-panel").wait_for(timeout=10_000)  # this tab too
    saved = _api(base, token, f"contents/{name}")["content"]["cells"][1]["outputs"]
    data = next(output["data"] for output in saved if WIDGET_MIME in output.get("data", {}))
    assert job_id in data["text/html"]

    _open(page, base, token, name)
    cell = page.locator(".jp-Notebook .jp-Cell").nth(1)
    panel = cell.locator(".remote-magic-panel")
    panel.wait_for(timeout=30_000)
    time.sleep(1)  # ipywidgets would have said "model not found" by now
    assert "model not found" not in page.locator(".jp-Notebook").inner_text()
    text = panel.inner_text()
    assert f"job {job_id}" in text and "lab-restarted" in text
    # The last state the kernel drew, at most ~3 s (10 steps) behind the widget it replaced.
    rows = panel.locator("table.remote-magic-metrics tbody tr").count()
    assert step - 10 <= rows <= step + 6, (rows, step)
    assert cell.locator("button", has_text="Detach").count() == 0
