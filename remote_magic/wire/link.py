"""The client end of ``agent serve``: many agent commands over one process's stdin/stdout.

One ``serve`` process per connection (SSH exec channel, or local
subprocess) answers every command of a kernel, so a command costs a frame
round trip instead of a login shell and a Python start.  A reader thread
routes the server's frames to the request they answer; streams (``attach``)
and short commands (``stop``) run side by side.  Each request buffers at
most ``INBOX_CHUNKS`` chunks: a slow reader slows its own stream (the SSH
window then slows the host), it never grows the kernel's memory.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from ..agent.frames import encode_frame, read_frame
from ..errors import ConnectionFailed
from ..transport.base import Pipe

FRAME_BYTES = 4 * 1024 * 1024
INBOX_CHUNKS = 64
_PUT_WAIT = 0.1


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
        self.inbox: queue.Queue[tuple[str, Any]] = queue.Queue(INBOX_CHUNKS)
        self.returncode: int | None = None
        self.error = ""
        self.answered = threading.Event()  # the exit frame arrived: stop sending stdin
        self.abandoned = threading.Event()  # nobody reads this request any more
        self.input_error: Exception | None = None  # producing the input failed (not the link)

    def deliver(self, item: tuple[str, Any]) -> None:
        """Called by the reader thread; waits while the inbox is full, unless the request is abandoned."""
        while not self.abandoned.is_set():
            try:
                self.inbox.put(item, timeout=_PUT_WAIT)
                return
            except queue.Full:
                continue

    def chunks(self) -> Iterator[bytes]:
        """stdout as it arrives; raises ConnectionFailed if the link dies first.

        A reader that stops before the end (Ctrl-C during a download) cancels the request: otherwise its full
        inbox would stop the link's reader, and every later command on the link would wait for good.
        """
        try:
            while self.returncode is None:
                kind, value = self.inbox.get()
                if kind == "out":
                    yield value
                elif kind == "exit":
                    self.returncode, self.error = value
                else:
                    raise ConnectionFailed(value)
        finally:
            if self.returncode is None:
                self.cancel()

    def reply(self) -> Reply:
        stdout = b"".join(self.chunks())
        assert self.returncode is not None
        return Reply(self.returncode, stdout, self.error)

    def cancel(self) -> None:
        """Stop listening: tell the server (ends an ``attach``) and drop what still arrives.  Once only."""
        if self.abandoned.is_set():
            return
        self.abandoned.set()
        self.link.forget(self.id)
        if self.returncode is None and not self.answered.is_set():
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
            while (frame := read_frame(self.pipe)) is not None:  # type: ignore[arg-type]
                header, body = frame
                self.on_bytes(0, len(body))
                request = self._requests.get(header["id"])
                if request is None:
                    continue  # a request we stopped listening to
                if "exit" in header:
                    self._requests.pop(header["id"], None)
                    request.answered.set()
                    request.deliver(("exit", (header["exit"], header.get("error", ""))))
                else:
                    request.deliver(("out", body))
        except Exception as exc:  # noqa: BLE001  (any failure of the pipe ends the link)
            reason = f"the agent's connection failed: {exc}"
        self.dead = reason
        for request in list(self._requests.values()):
            request.answered.set()
            request.deliver(("dead", reason))
        self._requests.clear()

    def forget(self, request_id: int) -> None:
        self._requests.pop(request_id, None)

    def _send(self, header: dict[str, Any], body: memoryview | None = None) -> None:
        size = body.nbytes if body is not None else 0
        with self._write_lock:
            try:
                self.pipe.write(encode_frame(header, size))
                if body is not None and size:
                    self.pipe.write(body)
            except BaseException as exc:
                if not isinstance(exc, Exception):  # a failed pipe is the caller's to mark dead
                    # Ctrl-C inside a frame: the stream may be out of step, so no other frame may follow on it.
                    # Decided here, before the lock lets another thread write.
                    self.dead = "the link was closed: an interrupt stopped it in the middle of a frame"
                    self.pipe.close()
                raise
        self.on_bytes(size, 0)

    def send_control(self, header: dict[str, Any]) -> None:
        try:
            self._send(header)
        except Exception:  # noqa: BLE001  (a control message to a dead link has nothing to stop)
            pass

    def request(self, argv: list[str], stdin: Iterable[bytes | memoryview] = ()) -> Request:
        """Start a command and send its stdin; stops sending as soon as the command has answered
        (a failed upload ends early: the rest would only be dropped by the server)."""
        if self.dead:
            raise ConnectionFailed(self.dead)
        request = Request(self, next(self._ids))
        self._requests[request.id] = request
        try:
            self._send({"id": request.id, "argv": argv})
            for part in _until_it_fails(stdin, request):
                view = memoryview(part).cast("B")
                for start in range(0, view.nbytes, FRAME_BYTES):
                    if request.answered.is_set():
                        break
                    self._send({"id": request.id}, view[start : start + FRAME_BYTES])
                if request.answered.is_set():
                    break
            if not request.answered.is_set():
                self._send({"id": request.id, "eof": 1})
        except Exception as exc:  # noqa: BLE001  (socket, paramiko or pipe errors all mean the link is gone)
            self._requests.pop(request.id, None)
            self.dead = self.dead or f"the agent's connection failed: {exc}"
            raise ConnectionFailed(self.dead) from None
        except BaseException:
            # Ctrl-C while the input was sent (a large upload): the host drops the command and what it received
            # (a partial blob included).  A frame cut half way has closed the link already (``_send``): the host
            # ends all of its commands, and the next command opens another link.
            request.cancel()
            raise
        if request.input_error is not None:
            # What was to be sent failed (a file changed as it was read): the command saw its input end early
            # and fails on its own; the link is fine.  The caller learns why.
            request.cancel()
            raise request.input_error
        if self.dead and not request.answered.is_set():  # the reader ended while this request was being sent
            request.deliver(("dead", self.dead))
        return request

    def close(self) -> None:
        self.pipe.close()


def _until_it_fails(parts: Iterable[bytes | memoryview], request: Request) -> Iterator[bytes | memoryview]:
    """The parts of a request's input; if producing them fails, that error is kept on the request, not taken
    for a failure of the link, and the input just ends there."""
    try:
        yield from parts
    except Exception as exc:  # noqa: BLE001  (re-raised by request() once the command's input is closed)
        request.input_error = exc
