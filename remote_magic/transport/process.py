"""A local process as a Pipe: the embedded ``local`` host's agent, and the OpenSSH client of the bulk path."""

from __future__ import annotations

import subprocess
import tempfile
from typing import IO

from ..agent.frames import widen_pipe
from .base import Pipe


def spawn_process(argv: list[str]) -> Pipe:
    """Start ``argv`` in its own session (a kernel interrupt, SIGINT to the kernel's group, must not reach it)."""
    errors = tempfile.TemporaryFile()
    try:
        process = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, start_new_session=True
        )
    except OSError as exc:
        errors.close()
        return EndedPipe(127, str(exc).encode())
    for stream in (process.stdin, process.stdout):
        if stream is not None:
            widen_pipe(stream.fileno())
    return ProcessPipe(process, errors)


class ProcessPipe:
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


class EndedPipe:
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
