"""The embedded ``local`` host: the same agent, run as a subprocess here.

A first-class host, not a test double: users with a GPU in their own machine
use it to keep the notebook responsive while training runs in another
process, and jobs survive a kernel restart exactly as on a remote host.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from typing import IO

from ..paths import data_dir
from .base import CommandResult, Pipe, StdinData, Transport

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
        errors = tempfile.TemporaryFile()
        try:
            process = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, start_new_session=True
            )
        except FileNotFoundError as exc:
            errors.close()
            return _EndedPipe(127, str(exc).encode())
        return _ProcessPipe(process, errors)


class _ProcessPipe:
    def __init__(self, process: subprocess.Popen[bytes], errors: IO[bytes]) -> None:
        self.process = process
        self.errors = errors

    def write(self, data: bytes | memoryview) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(data)
        self.process.stdin.flush()

    def read(self, size: int) -> bytes:
        assert self.process.stdout is not None
        return self.process.stdout.read1(size)

    def close(self) -> None:
        assert self.process.stdin is not None
        try:
            self.process.stdin.close()  # the server ends at the end of its stdin
        except OSError:
            pass

    def exit_status(self) -> int | None:
        try:
            return self.process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            return None

    def stderr(self) -> bytes:
        self.errors.seek(0)
        return self.errors.read()


class _EndedPipe:
    """A process that could not even start."""

    def __init__(self, status: int, message: bytes) -> None:
        self.status, self.message = status, message

    def write(self, data: bytes | memoryview) -> None:
        raise BrokenPipeError("the process did not start")

    def read(self, size: int) -> bytes:
        return b""

    def close(self) -> None:
        """Nothing to close: the process never started."""

    def exit_status(self) -> int | None:
        return self.status

    def stderr(self) -> bytes:
        return self.message
