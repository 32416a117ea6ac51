"""Small defects of issue 20 that need no host: what `%load_ext remote_magic` warms first."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from remote_magic import session
from remote_magic.magics import RemoteMagics


def _notebook(path: Path, *sources: str) -> str:
    cells = [{"cell_type": "markdown", "metadata": {}, "source": ["%%remote_train --host nothere\n"]}]
    cells += [
        {"cell_type": "code", "metadata": {}, "source": source.splitlines(keepends=True), "outputs": []}
        for source in sources
    ]
    path.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    return str(path)


@pytest.mark.parametrize(
    ("cells", "warmed"),
    [
        (["%%remote_train --host gpu1\nx = 1\n", "%%remote_train --host=gpu2 --sweep grid\ny = 2\n", "z = 3\n"],
         {"gpu1", "gpu2"}),
        (["%%remote_train --host gpu1\nx = 1\n", "\n%%remote_train --name plain\ny = 2\n"], {"gpu1", "local"}),
        (["print('no remote cell yet')\n"], {"local"}),
    ],
)  # fmt: skip
def test_loading_the_extension_warms_the_notebooks_hosts(ip, tmp_path, monkeypatch, cells, warmed) -> None:
    """Issue 20: the default host was warmed even when every `%%remote_train` cell named `--host`."""
    asked: list[str] = []
    lock = threading.Lock()

    def record(client, settings) -> None:  # type: ignore[no-untyped-def]
        with lock:
            asked.append(client.host)

    monkeypatch.setattr(session, "prewarm", record)
    ip.user_ns["__session__"] = _notebook(tmp_path / "train.ipynb", *cells)
    magics = RemoteMagics(ip, default_host="local", prewarm=True, warm_runner=True)
    magics.stop_background(timeout=10)
    magics.connections.close()
    assert sorted(asked) == sorted(warmed)


def test_an_unknown_or_unreadable_notebook_warms_the_default_host(ip, tmp_path, monkeypatch) -> None:
    asked: list[str] = []
    monkeypatch.setattr(session, "prewarm", lambda client, settings: asked.append(client.host))
    (tmp_path / "broken.ipynb").write_text("{not json")
    for path in (None, str(tmp_path / "broken.ipynb"), str(tmp_path / "missing.ipynb")):
        ip.user_ns["__session__"] = path
        monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
        magics = RemoteMagics(ip, default_host="local", prewarm=True, warm_runner=True)
        magics.stop_background(timeout=10)
        magics.connections.close()
    assert asked == ["local", "local", "local"]
