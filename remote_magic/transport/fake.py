"""A pipe to no host: agent commands answered in this process.

Client, link and session tests then run without sshd or subprocesses.  The
bytes still travel as the agent's frames (agent/frames.py) over a socket
pair, so the link's encoding is exercised.  The far end is served by a
plain function of the two streams (``Serve``): the real agent's own serve
loop (``agent.server.serve_streams``, tests/test_fake_pipe.py shows the few
lines), or, as httpx's ``MockTransport`` takes a handler, ``answering``:
``handler(argv, stdin)`` gets one agent command (``["hello"]``,
``["put-blob", digest, size]``...) and its whole input, and returns a
CommandResult (exit status, stdout, the problem on stderr).  The client side
may not import the agent's command modules itself (tests/test_layering.py):
a test hands them in.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
from collections.abc import Callable
from typing import IO

from ..agent.frames import encode_frame, read_frame
from .base import CommandResult, StdinData, Transport

Handler = Callable[[list[str], bytes], CommandResult]
# The agent's end of the pipe: reads frames from the first stream until it ends, writes frames to the second.
Serve = Callable[[IO[bytes], IO[bytes]], object]


class FakePipe:
    """What ``spawn`` hands back: the client's end of a socket pair; ``serve`` answers at the other end."""

    def __init__(self, serve: Serve) -> None:
        self._near, self._far = socket.socketpair()
        self._closed = False
        threading.Thread(target=self._serve, args=(serve,), name="remote_magic fake agent", daemon=True).start()

    # ---- the client's side (transport.base.Pipe)
    def write(self, data: bytes | memoryview) -> None:
        self._near.sendall(data)

    def read(self, size: int) -> bytes:
        return self._near.recv(size)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            with contextlib.suppress(OSError):  # the serving thread may have gone already
                self._near.shutdown(socket.SHUT_RDWR)  # wakes the link's reader, ends the serving thread
            self._near.close()

    def exit_status(self) -> int | None:
        return 0 if self._closed else None

    def stderr(self) -> bytes:
        return b""

    # ---- the fake agent's side
    def _serve(self, serve: Serve) -> None:
        with self._far, self._far.makefile("rb") as reader, self._far.makefile("wb") as writer:
            with contextlib.suppress(OSError, ValueError):  # the client closed the pipe meanwhile
                serve(reader, writer)


def answering(handler: Handler) -> Serve:
    """A scripted agent: each command is answered by ``handler`` once its input has ended, in a thread of its own."""
    write_lock = threading.Lock()

    def answer(writer: IO[bytes], request_id: int, argv: list[str], stdin: bytes) -> None:
        try:
            result = handler(argv, stdin)
        except Exception as exc:  # noqa: BLE001  (as the agent's server: one failing command answers, never hangs)
            result = CommandResult(1, b"", f"{type(exc).__name__}: {exc}".encode())
        error = result.stderr.decode(errors="replace").strip()
        out = encode_frame({"id": request_id, "out": 1}, len(result.stdout)) + result.stdout if result.stdout else b""
        with contextlib.suppress(OSError, ValueError), write_lock:  # the client closed the pipe meanwhile
            writer.write(out + encode_frame({"id": request_id, "exit": result.returncode, "error": error}))
            writer.flush()

    def serve(reader: IO[bytes], writer: IO[bytes]) -> None:
        inputs: dict[int, tuple[list[str], list[bytes]]] = {}
        while (frame := read_frame(reader)) is not None:
            header, body = frame
            if "argv" in header:
                inputs[header["id"]] = (header["argv"], [])
            elif header["id"] in inputs:
                inputs[header["id"]][1].append(body)
            if header.get("eof") and header["id"] in inputs:
                argv, parts = inputs.pop(header["id"])
                args = (writer, header["id"], argv, b"".join(parts))
                threading.Thread(target=answer, args=args, daemon=True).start()
            elif header.get("cancel"):
                inputs.pop(header["id"], None)

    return serve


class FakeTransport(Transport):
    """A host whose ``agent serve`` is ``serve`` (or a scripted ``handler``); every ``spawn`` gets a new FakePipe."""

    def __init__(
        self, handler: Handler | None = None, host: str = "fake", root: str | None = None, serve: Serve | None = None
    ) -> None:
        super().__init__(host, sys.executable, root)
        if (handler is None) == (serve is None):
            raise TypeError("FakeTransport takes a handler or a serve function, one of them")
        self.serve = serve or answering(handler)  # type: ignore[arg-type]

    def execute(self, argv: list[str], stdin: StdinData = None) -> CommandResult:
        """Nothing to deploy or run: the agent is the handler, in this process."""
        return CommandResult(0, b"", b"")

    def spawn(self, argv: list[str]) -> FakePipe:
        return FakePipe(self.serve)
