"""A real JupyterLab server and Debian's chromium, for the browser tests.

One server is shared by the whole test session (the ``lab`` fixture in conftest.py): starting one costs
seconds, and the tests that look at the lab need nothing of their own from it but a notebook file.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sshd import free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
QUICKSTART = Path(__file__).resolve().parent.parent / "examples" / "notebooks" / "01_quickstart.ipynb"
# Where browser tests save their screenshots: $REMOTE_MAGIC_SCREENSHOTS (``docs`` to refresh the README's
# pictures), else a temporary folder, so that a test run never changes the checkout.
SCREENSHOTS = Path(
    os.environ.get("REMOTE_MAGIC_SCREENSHOTS") or Path(tempfile.gettempdir()) / "remote_magic-screenshots"
)
# Every browser test file: ``pytestmark = needs_chromium``.
needs_chromium = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed")
# As the machine notes say: without the background-networking flags chromium keeps calling out.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip


@contextmanager
def jupyter_lab(tmp_path: Path, env: dict[str, str]) -> Iterator[tuple[str, str]]:
    """`jupyter lab` on 127.0.0.1 with a token, serving a copy of the quickstart; yields its URL and token."""
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(QUICKSTART, root / QUICKSTART.name)
    port, token = free_port(), secrets.token_hex(16)
    env = {**env, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")}
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
