"""A pipe to no host: agent commands answered in this process by a plain function.

Client, link and session tests then run without sshd or subprocesses, as
httpx's ``MockTransport`` takes a handler: ``handler(argv, stdin)`` gets one
agent command (``["hello"]``, ``["put-blob", digest, size]``...) and its
whole input, and returns a CommandResult (exit status, stdout, the problem on
stderr).  The bytes still travel as the agent's frames (agent/frames.py) over
a socket pair, read by a thread here, so the link's encoding is exercised.
A handler that runs the real agent commands is a few lines over
``agent.cli.run_command`` (see tests/test_fake_pipe.py); the client side may
not import the agent's command modules itself (tests/test_layering.py).
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
from collections.abc import Callable

from ..agent.frames import encode_frame, read_frame
from .base import CommandResult, StdinData, Transport

Handler = Callable[[list[str], bytes], CommandResult]


class FakePipe:
    """What ``spawn`` hands back: the client's end of a socket pair; a thread here answers each command."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self._near, self._far = socket.socketpair()
        self._write_lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._serve, name="remote_magic fake agent", daemon=True).start()

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

    # ---- the fake agent's side: frames in, one handler call per command, frames out
    def _serve(self) -> None:
        inputs: dict[int, tuple[list[str], list[bytes]]] = {}
        with self._far, self._far.makefile("rb") as stream:
            while (frame := read_frame(stream)) is not None:
                header, body = frame
                if "argv" in header:
                    inputs[header["id"]] = (header["argv"], [])
                elif header["id"] in inputs:
                    inputs[header["id"]][1].append(body)
                if header.get("eof") and header["id"] in inputs:
                    argv, parts = inputs.pop(header["id"])
                    args = (header["id"], argv, b"".join(parts))
                    threading.Thread(target=self._answer, args=args, daemon=True).start()
                elif header.get("cancel"):
                    inputs.pop(header["id"], None)

    def _answer(self, request_id: int, argv: list[str], stdin: bytes) -> None:
        try:
            result = self.handler(argv, stdin)
        except Exception as exc:  # noqa: BLE001  (as the agent's server: one failing command answers, never hangs)
            result = CommandResult(1, b"", f"{type(exc).__name__}: {exc}".encode())
        error = result.stderr.decode(errors="replace").strip()
        out = encode_frame({"id": request_id, "out": 1}, len(result.stdout)) + result.stdout if result.stdout else b""
        frames = out + encode_frame({"id": request_id, "exit": result.returncode, "error": error})
        try:
            with self._write_lock:
                self._far.sendall(frames)
        except OSError:
            pass  # the client closed the pipe meanwhile


class FakeTransport(Transport):
    """A host whose ``agent serve`` is ``handler``; every ``spawn`` gets a new FakePipe over it."""

    def __init__(self, handler: Handler, host: str = "fake", root: str | None = None) -> None:
        super().__init__(host, sys.executable, root)
        self.handler = handler

    def execute(self, argv: list[str], stdin: StdinData = None) -> CommandResult:
        """Nothing to deploy or run: the agent is the handler, in this process."""
        return CommandResult(0, b"", b"")

    def spawn(self, argv: list[str]) -> FakePipe:
        return FakePipe(self.handler)
