"""The client end of ``agent serve``: many agent commands over one process's stdin/stdout.

One ``serve`` process per connection (SSH exec channel, or local
subprocess) answers every command of a kernel, so a command costs a frame
round trip instead of a login shell and a Python start.  A reader thread
routes the server's frames to the request they answer; streams (``attach``)
and short commands (``stop``) run side by side.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from ..agent.server import encode_frame, read_frame
from ..errors import ConnectionFailed

FRAME_BYTES = 4 * 1024 * 1024


class Pipe(Protocol):
    """The serve process as a transport started it."""

    def write(self, data: bytes | memoryview) -> None: ...

    def read(self, size: int) -> bytes: ...

    def close(self) -> None: ...

    def exit_status(self) -> int | None:
        """The exit status once the process ended (None while it runs or when unknown)."""

    def stderr(self) -> bytes: ...


@dataclass
class Reply:
    returncode: int
    stdout: bytes
    error: str


class Request:
    """One command in flight: its stdout arrives as chunks, then its exit status."""

    def __init__(self, link: AgentLink, request_id: int) -> None:
        self.link = link
        self.id = request_id
        self.inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.returncode: int | None = None
        self.error = ""

    def chunks(self) -> Iterator[bytes]:
        """stdout as it arrives; raises ConnectionFailed if the link dies first."""
        while self.returncode is None:
            kind, value = self.inbox.get()
            if kind == "out":
                yield value
            elif kind == "exit":
                self.returncode, self.error = value
            else:
                raise ConnectionFailed(value)

    def reply(self) -> Reply:
        stdout = b"".join(self.chunks())
        assert self.returncode is not None
        return Reply(self.returncode, stdout, self.error)

    def cancel(self) -> None:
        """Tell the server we stopped listening (ends an ``attach``)."""
        if self.returncode is None:
            self.link.send_control({"id": self.id, "cancel": 1})


class AgentLink:
    def __init__(self, pipe: Pipe, on_bytes: Callable[[int, int], None] | None = None) -> None:
        self.pipe = pipe
        self.on_bytes = on_bytes or (lambda sent, received: None)
        self._ids = itertools.count(1)
        self._requests: dict[int, Request] = {}
        self._write_lock = threading.Lock()
        self.dead: str | None = None
        self._reader = threading.Thread(target=self._read_frames, name="remote_magic agent link", daemon=True)
        self._reader.start()

    def _read_frames(self) -> None:
        reason = "the agent's connection closed"
        try:
            while (frame := read_frame(self.pipe)) is not None:
                header, body = frame
                self.on_bytes(0, len(body))
                request = self._requests.get(header["id"])
                if request is None:
                    continue
                if "exit" in header:
                    self._requests.pop(header["id"], None)
                    request.inbox.put(("exit", (header["exit"], header.get("error", ""))))
                else:
                    request.inbox.put(("out", body))
        except Exception as exc:  # noqa: BLE001  (any failure of the pipe ends the link)
            reason = f"the agent's connection failed: {exc}"
        self.dead = reason
        for request in list(self._requests.values()):
            request.inbox.put(("dead", reason))
        self._requests.clear()

    def _send(self, header: dict[str, Any], body: memoryview | None = None) -> None:
        size = body.nbytes if body is not None else 0
        with self._write_lock:
            self.pipe.write(encode_frame(header, size))
            if body is not None and size:
                self.pipe.write(body)
        self.on_bytes(size, 0)

    def send_control(self, header: dict[str, Any]) -> None:
        try:
            self._send(header)
        except Exception:  # noqa: BLE001  (a control message to a dead link has nothing to stop)
            pass

    def request(self, argv: list[str], stdin: Iterable[bytes | memoryview] = ()) -> Request:
        if self.dead:
            raise ConnectionFailed(self.dead)
        request = Request(self, next(self._ids))
        self._requests[request.id] = request
        try:
            self._send({"id": request.id, "argv": argv})
            for part in stdin:
                view = memoryview(part).cast("B")
                for start in range(0, view.nbytes, FRAME_BYTES):
                    self._send({"id": request.id}, view[start : start + FRAME_BYTES])
            self._send({"id": request.id, "eof": 1})
        except Exception as exc:  # noqa: BLE001  (socket, paramiko or pipe errors all mean the link is gone)
            self._requests.pop(request.id, None)
            self.dead = self.dead or f"the agent's connection failed: {exc}"
            raise ConnectionFailed(self.dead) from None
        if self.dead:  # the reader ended while this request was being sent
            request.inbox.put(("dead", self.dead))
        return request

    def close(self) -> None:
        self.pipe.close()
