"""The embedded ``local`` host: the same agent, run as a subprocess here.

A first-class host, not a test double: users with a GPU in their own machine
use it to keep the notebook responsive while training runs in another
process, and jobs survive a kernel restart exactly as on a remote host.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from ..paths import data_dir
from .base import CommandResult, StdinData, Transport

LOCAL_HOST = "local"


def default_local_root() -> str:
    """Its own job root, apart from any ``~/.remote_magic`` of an SSH host on this machine."""
    if os.environ.get("REMOTE_MAGIC_LOCAL_ROOT"):
        return os.environ["REMOTE_MAGIC_LOCAL_ROOT"]
    return os.path.join(data_dir(), "local")


class LocalTransport(Transport):
    def __init__(self, python: str | None = None, root: str | None = None) -> None:
        super().__init__(LOCAL_HOST, python or sys.executable, root or default_local_root())

    def execute(self, argv: list[str], stdin: StdinData = None) -> CommandResult:
        data = stdin if stdin is None or isinstance(stdin, bytes) else b"".join(bytes(part) for part in stdin)
        try:
            # Own session: a kernel interrupt (SIGINT to the kernel's group) must not reach agent commands.
            done = subprocess.run(argv, input=data, capture_output=True, check=False, start_new_session=True)
        except FileNotFoundError as exc:
            return CommandResult(127, b"", str(exc).encode())
        self.bytes_sent += len(data or b"")
        self.bytes_received += len(done.stdout)
        return CommandResult(done.returncode, done.stdout, done.stderr)

    @contextmanager
    def stream_lines(self, argv: list[str]) -> Iterator[Iterator[bytes]]:
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
        )
        assert process.stdout is not None and process.stderr is not None

        def lines() -> Iterator[bytes]:
            yield from iter(process.stdout.readline, b"")
            self.raise_for_stream(argv, process.wait(), process.stderr.read())

        try:
            yield lines()
        finally:
            if process.poll() is None:
                process.terminate()
            process.stdout.close()
            process.stderr.close()
            process.wait()

    def close(self) -> None:
        pass
