"""The embedded ``local`` host: the same agent, run as a subprocess here.

A first-class host, not a test double: users with a GPU in their own machine
use it to keep the notebook responsive while training runs in another
process, and jobs survive a kernel restart exactly as on a remote host.
"""

from __future__ import annotations

import os
import subprocess
import sys

from ..paths import data_dir
from .base import CommandResult, Pipe, StdinData, Transport
from .process import spawn_process

LOCAL_HOST = "local"


def default_local_root() -> str:
    """Its own job root, apart from any ``~/.remote_magic`` of an SSH host on this machine."""
    if os.environ.get("REMOTE_MAGIC_LOCAL_ROOT"):
        return os.environ["REMOTE_MAGIC_LOCAL_ROOT"]
    return os.path.join(data_dir(), "local")


class LocalTransport(Transport):
    is_local = True

    def __init__(self, python: str | None = None, root: str | None = None) -> None:
        super().__init__(LOCAL_HOST, python or sys.executable, root or default_local_root())

    def _start(self, argv: list[str]) -> subprocess.Popen[bytes]:
        # Own session: a kernel interrupt (SIGINT to the kernel's group) must not reach agent commands.
        return subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
        )

    def execute(self, argv: list[str], stdin: StdinData = None) -> CommandResult:
        """Stream ``stdin`` part by part (array buffers are written as they are, never joined)."""
        try:
            process = self._start(argv)
        except FileNotFoundError as exc:
            return CommandResult(127, b"", str(exc).encode())
        assert process.stdin is not None
        try:
            for part in [] if stdin is None else [stdin] if isinstance(stdin, bytes) else stdin:
                process.stdin.write(part)
                self.bytes_sent += memoryview(part).nbytes
        except BrokenPipeError:
            pass  # the command ended early; its exit status and stderr say why
        finally:
            try:
                process.stdin.close()
            except BrokenPipeError:
                pass
            process.stdin = None  # already fed: communicate() must only collect the output
        stdout, stderr = process.communicate()
        self.bytes_received += len(stdout)
        return CommandResult(process.returncode, stdout, stderr)

    def spawn(self, argv: list[str]) -> Pipe:
        return spawn_process(argv)
