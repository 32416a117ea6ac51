"""Shared fixtures: a real sshd on loopback, a real IPython shell, tiny Keras data."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# Keep every job root of the tests in a throw-away folder, never the user's.
_TMP = Path(tempfile.mkdtemp(prefix="remote_magic-tests-"))
os.environ["REMOTE_MAGIC_DATA_DIR"] = str(_TMP / "data")  # registry and the local host's root
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ["REMOTE_MAGIC_WARM_IDLE"] = "120"  # warm runners the tests leave behind exit soon

from slurm_cluster import SlurmCluster, start_cluster  # noqa: E402
from sshd import Sshd, make_sshd  # noqa: E402

pytest_plugins = ("pytest_jupyter.jupyter_server",)  # jp_fetch and a real Jupyter server, for test_server.py

PYTHON = sys.executable


@pytest.fixture(scope="session")
def sshd() -> Iterator[Sshd]:
    server = make_sshd(_TMP / "sshd")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session", autouse=True)
def _clean_up_after_the_session() -> Iterator[None]:
    """Every process the tests started ends with them (warm runners wait for jobs that never come),
    and their throw-away folder goes too."""
    yield
    import json
    import signal

    for ready in _TMP.rglob("warm/*.ready"):
        try:
            os.kill(json.loads(ready.read_text())["pid"], signal.SIGTERM)
        except (OSError, ValueError, KeyError):
            pass
    # Job roots, blob stores and caches hold several GiB after the 2 GiB round trip: leave no trace.
    shutil.rmtree(_TMP, ignore_errors=True)


@pytest.fixture(scope="session")
def shell():  # type: ignore[no-untyped-def]
    from IPython.testing.globalipapp import start_ipython

    ip = start_ipython()
    ip.run_line_magic("load_ext", "remote_magic")
    return ip


@pytest.fixture
def ip(shell, sshd: Sshd):  # type: ignore[no-untyped-def]
    """The IPython shell with a clean namespace, pointed at the test sshd."""
    shell.reset(new_session=False)
    magics = shell.magics_manager.registry["RemoteMagics"]
    magics.ssh_config = str(sshd.ssh_config)
    magics.hosts = {sshd.alias: {"python": PYTHON}}
    magics.default_host = "local"
    magics.panel = "text"
    yield shell
    magics.stop_background()
    magics.connections.close()


def run(shell, source: str):  # type: ignore[no-untyped-def]
    """Run a cell; return IPython's ExecutionResult (errors are in it, not raised)."""
    return shell.run_cell(source, store_history=False)


MODEL_CELL = """
import numpy as np
import keras

rng = np.random.default_rng(0)
x_train = rng.random((256, 8), dtype=np.float32)
y_train = (x_train.sum(axis=1) > 4).astype("float32")
model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1, activation="sigmoid")])
model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
weights_before = [w.copy() for w in model.get_weights()]
"""


@pytest.fixture(scope="session")
def lab(tmp_path_factory):  # type: ignore[no-untyped-def]
    """One JupyterLab for the session, whose server and kernels reach the hosts with the tests' settings;
    yields its URL and token (its root folder holds a copy of the quickstart notebook)."""
    from lab import jupyter_lab

    with jupyter_lab(tmp_path_factory.mktemp("lab"), dict(os.environ)) as started:
        yield started


@pytest.fixture
def page():  # type: ignore[no-untyped-def]
    """A fresh page in Debian's chromium (headless, 1400 x 1000), closed after the test."""
    from lab import CHROMIUM, CHROMIUM_ARGS
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        yield context.new_page()
        browser.close()


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A real single-node Slurm (4 SIMULATED GPUs) with fresh state and spool, once per session, stopped by pid.

    Client tools and jobs find it through ``slurm_cluster.env()`` (``SLURM_CONF``); over the test sshd,
    add it with ``sshd.add_env(slurm_cluster.env())`` before that sshd starts.
    """
    cluster = start_cluster(_TMP / "slurm")
    try:
        yield cluster
    finally:
        cluster.stop()
