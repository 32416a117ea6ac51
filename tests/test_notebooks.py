"""The example notebooks, executed by nbclient in a real kernel."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import nbformat
import pytest
from conftest import PYTHON
from nbconvert import HTMLExporter
from notebooks import execute, texts, write_profile

QUICKSTART = Path(__file__).resolve().parent.parent / "examples" / "notebooks" / "01_quickstart.ipynb"


def _check_quickstart(nb: nbformat.NotebookNode, host: str) -> str:
    train = next(c for c in nb.cells if c.source.startswith("%%remote_train"))
    shown = texts(train)
    assert [f"Epoch {i}/5" for i in range(1, 6)] == re.findall(r"Epoch \d/5", shown)
    assert f"host {host}" in shown and "injected: history (assigned); model (changed by the cell)" in shown
    evaluate = next(
        c for c in nb.cells if "model.evaluate(x_test" in c.source and "accuracy" in c.source and "print(f" in c.source
    )
    text = texts(evaluate)
    assert "epochs trained: 5" in text
    accuracy = float(re.search(r"test accuracy of the injected model: ([0-9.]+)", text).group(1))
    assert accuracy > 0.8  # untrained it is about 0.5
    return shown


def test_quickstart_on_the_local_default_with_the_widget_panel(monkeypatch) -> None:
    """Live widgets while it runs; a static copy (chart included) in the saved notebook and HTML export."""
    monkeypatch.delenv("REMOTE_MAGIC_PANEL", raising=False)
    nb = execute(QUICKSTART)
    _check_quickstart(nb, "local")
    widget_models = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    assert any(m["model_name"] == "IntProgressModel" for m in widget_models.values())
    train = next(c for c in nb.cells if c.source.startswith("%%remote_train"))
    assert "application/vnd.jupyter.widget-view+json" not in train.outputs[-1]["data"]
    body, _ = HTMLExporter().from_notebook_node(nb)
    assert body.count('class="remote-magic-chart"') >= 2  # loss and accuracy
    assert "val_accuracy" in body and "injected: history (assigned); model (changed by the cell)" in body


def _configure_like_a_user(sshd, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The test sshd as the kernels' default host, set in an IPython profile as a user would."""
    hosts = {sshd.alias: {"python": PYTHON}}
    folder = write_profile(
        tmp_path / "ipython", default_host=sshd.alias, ssh_config=str(sshd.ssh_config), hosts=hosts, panel="text"
    )
    monkeypatch.setenv("IPYTHONDIR", str(folder))


def test_quickstart_over_ssh_configured_like_a_user_would(sshd, tmp_path, monkeypatch) -> None:
    _configure_like_a_user(sshd, tmp_path, monkeypatch)
    nb = execute(QUICKSTART)
    _check_quickstart(nb, sshd.alias)
    status = next(c for c in nb.cells if c.source.strip() == "%remote_status")
    rows = [line for line in texts(status).splitlines() if line.startswith(sshd.alias)]
    assert any({"quickstart", "done", "5/5"} <= set(row.split()) for row in rows)


@pytest.mark.parametrize("path", sorted(QUICKSTART.parent.glob("*.ipynb")))
def test_notebooks_are_saved_without_outputs(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")


LONG_TRAINING = QUICKSTART.parent / "02_long_training.ipynb"


def test_long_training_notebook_detaches_attaches_and_charts(monkeypatch) -> None:
    monkeypatch.delenv("REMOTE_MAGIC_PANEL", raising=False)
    nb = execute(LONG_TRAINING)
    by_source = {c.source.splitlines()[0]: c for c in nb.cells if c.cell_type == "code" and c.source}
    assert "submitted to host local" in texts(by_source["%%remote_train --detach --name long-run"])
    assert "long-run" in texts(by_source["jobs = %remote_status"])
    attached = texts(by_source["%remote_attach {jobs.rows[-1]['job_id']}"])
    assert re.findall(r"Epoch \d+/30", attached) == [f"Epoch {i}/30" for i in range(1, 31)]
    assert "epochs: 30" in texts(by_source['print("epochs:", len(history.history["loss"]))'])
    numpy_loop = texts(by_source["%%remote_train --name numpy-loop"])
    assert "Step 50/50 - loss:" in numpy_loop
    assert "w = 3.00, b = 0.50" in texts(by_source['print(f"w = {w:.2f}, b = {b:.2f}")'])
    body, _ = HTMLExporter().from_notebook_node(nb)
    assert body.count('class="remote-magic-chart"') >= 3  # loss and accuracy of the long run, loss of the loop


def _project_copy(tmp_path: Path) -> Path:
    """The project notebook with its package and data folder, copied: the fetched model file lands in the copy."""
    examples = QUICKSTART.parent.parent
    shutil.copytree(examples / "notebooks", tmp_path / "notebooks", ignore=shutil.ignore_patterns("*.keras"))
    shutil.copytree(examples / "data", tmp_path / "data")
    return tmp_path / "notebooks" / "03_project.ipynb"


def _check_project(nb: nbformat.NotebookNode, host: str) -> None:
    train = next(c for c in nb.cells if c.source.startswith("%%remote_train"))
    shown = texts(train)
    assert re.findall(r"Epoch \d/4", shown) == [f"Epoch {i}/4" for i in range(1, 5)]
    assert f"host {host}" in shown and "fetched: sensor_model.keras" in shown
    assert "history" in shown and "model" in shown.split("injected:")[-1]
    evaluate = next(c for c in nb.cells if "restored = keras.saving.load_model" in c.source)
    text = texts(evaluate)
    assert "epochs trained: 4" in text
    assert float(re.search(r"fetched model file: ([0-9.]+)", text).group(1)) > 0.85  # untrained: about 0.5


def test_project_notebook_ships_its_package_and_data_and_fetches_the_model_file(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("REMOTE_MAGIC_PANEL", "text")
    path = _project_copy(tmp_path)
    nb = execute(path)
    _check_project(nb, "local")
    assert (path.parent / "sensor_model.keras").stat().st_size > 0
    env = [line.split() for line in texts(nb.cells[-1]).splitlines() if line.strip()]
    assert env[1] == ["package", "here", "host", "fix"] and len(env) > 2  # %remote_env: always the table
    assert all(row[-1] == "matches" for row in env[2:]), env  # the same kernel on both sides


def test_project_notebook_over_ssh(sshd, tmp_path, monkeypatch) -> None:
    _configure_like_a_user(sshd, tmp_path, monkeypatch)
    nb = execute(_project_copy(tmp_path / "copy"))
    _check_project(nb, sshd.alias)
