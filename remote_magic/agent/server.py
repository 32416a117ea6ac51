"""One long-lived agent process per connection, speaking framed messages on stdin/stdout.

A new SSH exec costs a login shell and a Python start (~0.2 s on the test
host); a request to this server costs a thread.  It listens on no port: it
is the stdin/stdout of one SSH channel (or one local subprocess) and ends
when that closes.

Every frame is a 4-byte big-endian length, a JSON header of that length,
then ``header["size"]`` bytes of body (0 when absent).

client -> server: ``{"id": n, "argv": [...]}`` starts a command;
``{"id": n, "size": k}`` + k bytes is stdin for it; ``{"id": n, "eof": 1}``
ends its stdin; ``{"id": n, "cancel": 1}`` says the client stopped listening.
server -> client: ``{"id": n, "out": 1, "size": k}`` + k bytes of stdout;
``{"id": n, "exit": rc, "error": "..."}`` ends it.
"""

from __future__ import annotations

import collections
import json
import queue
import struct
import sys
import threading
from typing import IO, Any

from .cli import CommandIO, run_command

_LENGTH = struct.Struct(">I")
# At most this much of one command's stdin is buffered here before the channel is read further.
STDIN_QUEUE_CHUNKS = 16
SHUTDOWN_GRACE_SECONDS = 15.0


def read_frame(stream: IO[bytes]) -> tuple[dict[str, Any], bytes] | None:
    """The next (header, body), or None at the end of the stream."""
    raw = _read_exactly(stream, _LENGTH.size)
    if raw is None:
        return None
    header_bytes = _read_exactly(stream, _LENGTH.unpack(raw)[0])
    if header_bytes is None:
        return None
    header = json.loads(header_bytes)
    body = _read_exactly(stream, header.get("size", 0)) if header.get("size") else b""
    if body is None:
        return None
    return header, body


def _read_exactly(stream: IO[bytes], size: int) -> bytes | None:
    parts, remaining = [], size
    while remaining:
        chunk = stream.read(remaining)
        if not chunk:
            return None
        parts.append(chunk)
        remaining -= len(chunk)
    return b"".join(parts)


def encode_frame(header: dict[str, Any], body_size: int = 0) -> bytes:
    if body_size:
        header = {**header, "size": body_size}
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    return _LENGTH.pack(len(header_bytes)) + header_bytes


class _RequestInput:
    """A command's stdin, fed chunk by chunk by the frame reader.

    Reads that line up with the frames (a blob upload reads 4 MiB at a time,
    the frames carry 4 MiB) hand the frame's bytes over without copying.
    """

    def __init__(self) -> None:
        self.chunks: queue.Queue[bytes | None] = queue.Queue(STDIN_QUEUE_CHUNKS)
        self.pending: collections.deque[bytes] = collections.deque()
        self.pending_size = 0
        self.ended = False

    def _fill(self) -> bool:
        if self.ended:
            return False
        chunk = self.chunks.get()
        if chunk is None:
            self.ended = True
            return False
        self.pending.append(chunk)
        self.pending_size += len(chunk)
        return True

    def _take(self, size: int) -> bytes:
        if size == 0:
            return b""
        self.pending_size -= size
        first = self.pending[0]
        if len(first) == size:  # a whole frame: no copy
            return self.pending.popleft()
        if len(first) > size:
            self.pending[0] = first[size:]
            return first[:size]
        parts, need = [], size
        while need:
            chunk = self.pending.popleft()
            if len(chunk) > need:
                self.pending.appendleft(chunk[need:])
                chunk = chunk[:need]
            parts.append(chunk)
            need -= len(chunk)
        return b"".join(parts)

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes, fewer only at the end of the input (as a file's read)."""
        if size < 0:
            while self._fill():
                pass
            return self._take(self.pending_size)
        while self.pending_size < size and self._fill():
            pass
        return self._take(min(size, self.pending_size))

    def readline(self) -> bytes:
        while not any(b"\n" in chunk for chunk in self.pending) and self._fill():
            pass
        joined = b"".join(self.pending)
        line, sep, rest = joined.partition(b"\n")
        self.pending.clear()
        if rest:
            self.pending.append(rest)
        self.pending_size = len(rest)
        return line + sep


class _RequestOutput:
    """A command's stdout: every write becomes one frame on the shared stream."""

    def __init__(self, request_id: int, stream: IO[bytes], lock: threading.Lock) -> None:
        self.request_id = request_id
        self.stream = stream
        self.lock = lock

    def write(self, data: bytes | bytearray | memoryview) -> int:
        size = memoryview(data).nbytes
        if size:
            with self.lock:
                self.stream.write(encode_frame({"id": self.request_id, "out": 1}, size))
                self.stream.write(data)
        return size

    def flush(self) -> None:
        with self.lock:
            self.stream.flush()


def serve(root: str, agent_hash: str) -> int:
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    lock = threading.Lock()
    requests: dict[int, tuple[_RequestInput, CommandIO]] = {}
    threads: list[threading.Thread] = []

    def run(request_id: int, argv: list[str], io: CommandIO) -> None:
        try:
            returncode, problem = run_command(root, agent_hash, argv, io)
        except Exception as exc:  # noqa: BLE001  (one failing command must not end the server)
            returncode, problem = 1, f"{type(exc).__name__}: {exc}"
        try:
            with lock:
                stdout.write(encode_frame({"id": request_id, "exit": returncode, "error": problem}))
                stdout.flush()
        except (BrokenPipeError, ValueError):
            pass
        requests.pop(request_id, None)

    while (frame := read_frame(stdin)) is not None:
        header, body = frame
        request_id = header["id"]
        if "argv" in header:
            request_input = _RequestInput()
            io = CommandIO(request_input, _RequestOutput(request_id, stdout, lock))  # type: ignore[arg-type]
            requests[request_id] = (request_input, io)
            thread = threading.Thread(target=run, args=(request_id, header["argv"], io), daemon=True)
            thread.start()
            threads.append(thread)
            threads[:] = [t for t in threads if t.is_alive()]
            continue
        entry = requests.get(request_id)
        if entry is None:
            continue
        request_input, io = entry
        if body:
            request_input.chunks.put(body)
        if header.get("eof"):
            request_input.chunks.put(None)
        if header.get("cancel"):
            _cancel(request_input, io)
    # The client is gone: stop streams, let commands that change state (cancel, submit) finish.
    for request_input, io in list(requests.values()):
        _cancel(request_input, io)
    for thread in threads:
        thread.join(SHUTDOWN_GRACE_SECONDS)
    return 0


def _cancel(request_input: _RequestInput, io: CommandIO) -> None:
    io.cancelled.set()
    try:
        request_input.chunks.put_nowait(None)
    except queue.Full:
        pass
