"""One long-lived agent process per connection, speaking framed messages on stdin/stdout.

A new SSH exec costs a login shell and a Python start (~0.2 s on the test
host); a request to this server costs a thread.  It listens on no port: it
is the stdin/stdout of one SSH channel (or one local subprocess) and ends
when that closes.  The wire format is in frames.py.
"""

from __future__ import annotations

import collections
import contextlib
import os
import queue
import sys
import threading
from typing import IO, Any

from .cli import CommandIO, run_command
from .frames import FrameError, encode_frame, read_frame, widen_pipe

# At most this much of one command's stdin is buffered here before the channel is read further.
STDIN_QUEUE_CHUNKS = 16
SHUTDOWN_GRACE_SECONDS = 15.0
_FEED_WAIT = 0.1


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
        # Set when the command has ended: what still arrives for it is dropped, never queued.
        self.closed = threading.Event()
        self.cancelled = False  # the client stopped sending: the input ends after what is queued

    def cancel(self) -> None:
        """End the input where it is (the command sees a short input and fails: a partial blob is deleted)."""
        self.cancelled = True
        with contextlib.suppress(queue.Full):  # full: the reader is not waiting, it sees ``cancelled`` when empty
            self.chunks.put_nowait(None)

    def feed(self, chunk: bytes | None) -> None:
        """Queue a chunk (None: end of input) unless the command has ended meanwhile.

        The frame reader must never block for good on a command that stopped
        reading (a failed upload): every other request of the connection waits
        behind it.
        """
        while not self.closed.is_set():
            try:
                self.chunks.put(chunk, timeout=_FEED_WAIT)
                return
            except queue.Full:
                continue

    def _fill(self) -> bool:
        if self.ended or (self.cancelled and self.chunks.empty()):
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
    """``agent serve``: this process's stdin and stdout become the connection's frame streams."""
    for fd in (0, 1):
        widen_pipe(fd)  # sshd hands us 64 KiB pipes
    # The frames get their own copy of stdout; fd 1 then goes to stderr, so a stray print anywhere
    # (a library, a warning, argparse) can never corrupt the frame stream.
    stdout = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    return serve_streams(root, agent_hash, sys.stdin.buffer, stdout)


def serve_streams(root: str, agent_hash: str, stdin: IO[bytes], stdout: IO[bytes]) -> int:
    """Run each command that arrives on ``stdin`` in a thread of its own, its output framed onto ``stdout``, until
    ``stdin`` ends; then let the commands that change state finish.  Any pair of binary streams will do (a test's
    socket pair, in-process)."""
    server = _Server(root, agent_hash, stdout)
    try:
        while (frame := read_frame(stdin)) is not None:
            server.dispatch(*frame)
    except FrameError as exc:
        sys.stderr.write(f"remote_magic agent: {exc}; closing the connection\n")
    server.close()
    return 0


class _Server:
    """The commands of one connection, by request id, and the lock that keeps their frames whole."""

    def __init__(self, root: str, agent_hash: str, stdout: IO[bytes]) -> None:
        self.root, self.agent_hash, self.stdout = root, agent_hash, stdout
        self.lock = threading.Lock()
        self.requests: dict[int, tuple[_RequestInput, CommandIO]] = {}
        self.threads: list[threading.Thread] = []

    def dispatch(self, header: dict[str, Any], body: bytes) -> None:
        """A new command, or input (or its end, or a cancel) for one that runs."""
        request_id = header["id"]
        if "argv" in header:
            request_input = _RequestInput()
            io = CommandIO(request_input, _RequestOutput(request_id, self.stdout, self.lock))  # type: ignore[arg-type]
            self.requests[request_id] = (request_input, io)
            thread = threading.Thread(
                target=self._run, args=(request_id, header["argv"], request_input, io), daemon=True
            )
            thread.start()
            self.threads[:] = [t for t in self.threads if t.is_alive()] + [thread]
            return
        entry = self.requests.get(request_id)
        if entry is None:
            return  # the command has ended: drop the rest of its input
        request_input, io = entry
        if body:
            request_input.feed(body)
        if header.get("eof"):
            request_input.feed(None)
        if header.get("cancel"):
            _cancel(request_input, io)

    def _run(self, request_id: int, argv: list[str], request_input: _RequestInput, io: CommandIO) -> None:
        try:
            returncode, problem = run_command(self.root, self.agent_hash, argv, io)
        except BaseException as exc:  # noqa: BLE001  (one failing command, SystemExit too, must not end the server)
            returncode, problem = 1, f"{type(exc).__name__}: {exc}"
        self.requests.pop(request_id, None)
        request_input.closed.set()
        try:
            with self.lock:
                self.stdout.write(encode_frame({"id": request_id, "exit": returncode, "error": problem}))
                self.stdout.flush()
        except (BrokenPipeError, ValueError, OSError):
            pass

    def close(self) -> None:
        """The client is gone: stop streams, let commands that change state (cancel, submit) finish."""
        for request_input, io in list(self.requests.values()):
            _cancel(request_input, io)
        for thread in self.threads:
            thread.join(SHUTDOWN_GRACE_SECONDS)


def _cancel(request_input: _RequestInput, io: CommandIO) -> None:
    io.cancelled.set()
    request_input.cancel()
