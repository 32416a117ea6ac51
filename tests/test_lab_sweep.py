"""The sweep panel in JupyterLab at a narrow (900 px) window: what a user checks while a sweep runs.

Uses the session's shared JupyterLab (the ``lab`` fixture) and Debian's chromium; the test writes its own
notebook into the lab's root, so it shares nothing with the other browser tests but the server.
"""

from __future__ import annotations

import time

from lab import SCREENSHOTS, needs_chromium
from test_lab_panel import _luminance, _open, _run_all, _write_notebook

pytestmark = needs_chromium

# Four trials, two at a time; the best and the worst trial's losses are 900x apart (a log axis). The last two
# run longer: there is time to click a finished trial's row, and to look at the live panel in the dark theme.
SETUP_CELL = "grid = {'lr': [0.3, 0.1, 0.03, 0.01]}\npicked = None\n"
SWEEP_CELL = (
    "%%remote_train --sweep grid --parallel 2\n"
    "import time\n"
    "for s in range(1, 6):\n"
    "    remote_log(step=s, total=5, loss=100 * lr**2 / s, val_loss=120 * lr**2 / s)\n"
    "    time.sleep(0.4 if lr > 0.05 else 2.0)\n"
    "picked = lr\n"
)
PRINT_CELL = "print(f'picked lr={picked}')\n"

# The live panel's rows: one button per trial, its hover text "trial N (lr=...): state; click to ...".
_ROWS = """() => [...document.querySelectorAll('button[title^="trial "]')].map(b => ({
    number: +b.title.match(/^trial (\\d+)/)[1], title: b.title, text: b.innerText.replace(/\\u00a0/g, ' ')}))"""
_TABLE = """document.querySelector('button[title^="trial "]').parentElement"""
# What the line above the table says (a click's result), or that the live table has gone (the sweep ended).
_PICK_LINE = f"""(document.querySelector('button[title^="trial "]') ? {_TABLE}.previousElementSibling.innerText
    : 'the sweep ended before the panel said what the click did')"""
# Where the table's heading ends on screen: the right end of its "time".
_TIME_HEADING_END = f"""(() => {{ const words = document.createRange();
    words.selectNodeContents({_TABLE}.firstElementChild.querySelector('div').firstChild);
    return words.getBoundingClientRect().right; }})()"""
# What scrolls sideways in the panel or the output around it (scrollWidth beyond clientWidth, in px).
_SIDEWAYS = """panel => [panel.closest('.jp-OutputArea-output'), panel, ...panel.querySelectorAll('*')]
    .filter(e => e && ['auto', 'scroll'].includes(getComputedStyle(e).overflowX) && e.scrollWidth > e.clientWidth + 1)
    .map(e => `${e.className}: ${e.scrollWidth - e.clientWidth} px`)"""
# Backgrounds larger than a legend's swatch drawn in the panel, with what draws them.
_BACKGROUNDS = """panel => [panel, ...panel.querySelectorAll('*')]
    .filter(e => e.getBoundingClientRect().width > 16 && !/rgba\\(0, 0, 0, 0\\)|transparent/.test(getComputedStyle(e).backgroundColor))
    .map(e => [`${e.tagName}.${e.className.baseVal ?? e.className}`, getComputedStyle(e).backgroundColor])"""


def _rank(row: dict) -> str:
    """The row's rank ("" before its trial logged; the grid's values are never whole numbers)."""
    return row["text"].split()[1] if "best" in row["text"] or row["text"].split()[1].isdigit() else ""


def _light(panel) -> list:  # type: ignore[no-untyped-def]
    return [(what, color) for what, color in panel.evaluate(_BACKGROUNDS) if _luminance(color) > 0.5]


def _to_theme(page, theme: str) -> None:  # type: ignore[no-untyped-def]
    page.evaluate(f"window.jupyterapp.commands.execute('apputils:change-theme', {{theme: 'JupyterLab {theme}'}})")
    page.wait_for_function(f"document.body.dataset.jpThemeLight === '{str(theme == 'Light').lower()}'")
    time.sleep(0.5)  # the theme's stylesheet applies after the flag


def test_a_sweep_at_900_px_stable_rows_whole_row_click_log_chart_and_dark_theme(lab, page) -> None:
    """Issue 21: at 900 px the sweep panel scrolled sideways twice, rows re-ranked under the pointer, only ``#n``
    took a click and a click replaced names silently and moved the panel, the legend said ``#0…#5``, the axis was
    linear over 900x, a queued reason pushed the metric columns away, and the dark theme kept light boxes."""
    base, token = lab
    name = "sweep-narrow.ipynb"
    _write_notebook(base, token, name, ["%load_ext remote_magic", SETUP_CELL, SWEEP_CELL, PRINT_CELL])
    page.set_viewport_size({"width": 900, "height": 1000})
    _open(page, base, token, name)
    if page.evaluate("document.body.dataset.jpThemeLight") != "true":  # the theme a failed test left (a setting)
        _to_theme(page, "Light")
    try:
        _run_all(page)
        live = page.locator(".widget-vbox", has=page.locator("button", has_text="Detach")).last

        # While trials 2 and 3 wait for a place: a short state in the row, the full reason on hover.
        page.wait_for_function(f"({_ROWS})().some(r => / queued #/.test(r.text))", timeout=60_000)
        early = page.evaluate(_ROWS)
        queued = next(r for r in early if " queued #" in r["text"])
        assert "waiting" not in queued["text"] and len(queued["text"].split("queued")[0]) < 40, queued
        assert "waiting for a trial of this sweep to end: it runs 2 at a time" in queued["title"], queued

        # Trial 3 ranks first once it logs: the rows stay in trial order, the rank column changes.
        page.wait_for_function(f"({_ROWS})().some(r => r.number === 3 && r.text.includes('1 best'))", timeout=60_000)
        later = page.evaluate(_ROWS)
        assert [r["number"] for r in early] == [r["number"] for r in later] == [0, 1, 2, 3], (early, later)
        assert [_rank(r) for r in early] != [_rank(r) for r in later], (early, later)

        chart = live.locator("svg.remote-magic-chart")
        assert chart.get_attribute("data-scale") == "log"
        assert chart.locator(".remote-magic-legend").all_text_contents() == [
            "#0 lr=0.3", "#1 lr=0.1", "#2 lr=0.03", "#3 lr=0.01",
        ]  # fmt: skip
        assert live.evaluate(_SIDEWAYS) == []  # neither the panel nor its table scrolls sideways at 900 px

        # A click at the row's far end (its time, not its "#n") injects trial 0 once the cell ends, and says so.
        page.wait_for_function(f"({_ROWS})()[0].text.includes(' done ')", timeout=30_000)
        table_before = page.evaluate(f"{_TABLE}.getBoundingClientRect().toJSON()")
        row = page.locator('button[title^="trial 0 "]').bounding_box()
        page.mouse.click(page.evaluate(_TIME_HEADING_END) - 8, row["y"] + row["height"] / 2)  # under "time"
        page.wait_for_function(f"!/loading|click a/.test({_PICK_LINE})", timeout=30_000)
        said = page.evaluate(_PICK_LINE)
        assert said.startswith("trial 0 (lr=0.3) outputs ready:") and "replacing the kernel's picked" in said, said
        assert page.evaluate(f"{_TABLE}.getBoundingClientRect().toJSON()") == table_before  # nothing moved
        assert live.evaluate(_SIDEWAYS) == []
        live.screenshot(path=str(SCREENSHOTS / "sweep-panel.png"))

        # The dark theme while the last trials run, then on the finished panel: no light box anywhere.
        # The light theme's buttons: what the check below would see with colours that ignore the theme.
        assert _light(live), live.evaluate(_BACKGROUNDS)
        _to_theme(page, "Dark")
        assert page.locator('button[title^="trial 3 "]').count() == 1, "the sweep ended before the dark theme"
        assert _light(live) == []
        live.screenshot(path=str(SCREENSHOTS / "sweep-panel-dark.png"))
        printed = page.locator(".jp-Notebook .jp-Cell").nth(3).locator(".jp-OutputArea", has_text="picked lr=")
        printed.wait_for(timeout=60_000)
        assert printed.inner_text().strip() == "picked lr=0.3"  # the clicked trial's outputs, not the last trial's
        finished = page.locator(".jp-Notebook .jp-Cell").nth(2).locator(".remote-magic-panel")
        assert _light(finished) == [] and finished.evaluate(_SIDEWAYS) == []
    finally:
        _to_theme(page, "Light")  # a lab setting: the next test and the next session start light
    print(f"saved {SCREENSHOTS / 'sweep-panel.png'} and {SCREENSHOTS / 'sweep-panel-dark.png'}")
