"""Execute a notebook headless in a real kernel and print what a user would see.

Used by `make demo`: cell by cell, the source and then its outputs (text),
each output printed as it arrives, so epochs appear live.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
from typing import Any

import nbformat
from nbclient import NotebookClient


class PrintingClient(NotebookClient):
    def output(self, outs: list[Any], msg: dict[str, Any], display_id: str | None, cell_index: int) -> Any:
        content = msg.get("content", {})
        kind = msg.get("msg_type")
        if kind == "stream":
            sys.stdout.write(content.get("text", ""))
        elif kind in ("display_data", "execute_result"):
            sys.stdout.write(content.get("data", {}).get("text/plain", "") + "\n")
        elif kind == "error":
            sys.stdout.write("\n".join(content.get("traceback", [])) + "\n")
        sys.stdout.flush()
        return super().output(outs, msg, display_id, cell_index)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("notebook")
    parser.add_argument("--timeout", type=int, default=600)
    args = parser.parse_args()
    os.environ.setdefault("REMOTE_MAGIC_PANEL", "text")  # headless: one plain line per epoch
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # A one-shot run: the warm runner it leaves for a next job need not wait the usual 30 minutes.
    os.environ.setdefault("REMOTE_MAGIC_WARM_IDLE", "60")
    nb = nbformat.read(args.notebook, as_version=4)
    client = PrintingClient(nb, timeout=args.timeout, kernel_name="python3", allow_errors=False)

    def announce(cell: Any, cell_index: int, **_: Any) -> None:
        if cell.cell_type == "code":
            first, *rest = cell.source.splitlines() or [""]
            print(f"\n>>> {first}" + (f"  (+{len(rest)} lines)" if rest else ""), flush=True)

    client.on_cell_start = announce
    client.execute(stderr=subprocess.DEVNULL)  # the kernel's own fd 2 (native library noise)
    print(f"\n{args.notebook}: all cells ran")
    # A one-shot run leaves no process behind: the warm runner the notebook's last job prepared ends with it.
    from remote_magic.transport import LocalTransport
    from remote_magic.wire.client import AgentClient

    with contextlib.closing(AgentClient(LocalTransport())) as local:
        local.stop_warm_runners()
    return 0


if __name__ == "__main__":
    sys.exit(main())
