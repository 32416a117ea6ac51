"""What a project re-sends over SSH: the bytes and time of a cell with a package, a helper and 50 MB of data.

    .venv/bin/python bench/project_resend.py

Starts its own sshd on 127.0.0.1 (as the tests do) and runs the project cell of
tests/test_project.py four times: first, unchanged, after editing the helper
module, after changing one 1 MiB data file.  Each line gives the bytes the
client sent (all traffic) and the wall time.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
MiB = 1024 * 1024


def main() -> int:
    import numpy as np
    from sshd import make_sshd

    tmp = Path(tempfile.mkdtemp(prefix="remote_magic-resend-"))
    os.environ["REMOTE_MAGIC_DATA_DIR"] = str(tmp / "data")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ["REMOTE_MAGIC_PANEL"] = "text"
    import test_project as project

    server = make_sshd(tmp / "sshd")
    server.start()
    try:
        root = project.write_project(tmp / "proj")
        data = root / "data"
        os.chdir(root / "notebooks")
        sys.path[:0] = [str(root / "notebooks"), str(root)]
        from IPython.testing.globalipapp import start_ipython

        ip = start_ipython()
        ip.run_line_magic("load_ext", "remote_magic")
        magics = ip.magics_manager.registry["RemoteMagics"]
        magics.ssh_config = str(server.ssh_config)
        magics.hosts = {server.alias: {"python": sys.executable}}
        ip.run_cell("from helpers import normalize")
        cell = project.TRAIN_CELL.replace("testhost", server.alias)
        client = magics._client(server.alias)

        def step(label: str) -> None:
            sent, start = client.bytes_sent, time.perf_counter()
            result = ip.run_cell(cell)
            if not result.success:
                raise RuntimeError(result.error_in_exec)
            print(f"{label}: {client.bytes_sent - sent:,} bytes sent, {time.perf_counter() - start:.2f} s", flush=True)

        step("first run (50 MB data + package + helper)")
        step("re-run, nothing changed")
        helpers = root / "notebooks" / "helpers.py"
        helpers.write_text(project.HELPERS + "\n# tuned\n")
        step(f"after editing helpers.py ({helpers.stat().st_size} bytes)")
        np.save(data / "extra" / "part.npy", np.random.default_rng(9).random(MiB // 8))
        step("after changing data/extra/part.npy (1 MiB)")
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
