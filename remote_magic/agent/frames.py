"""The wire format between the client and ``agent serve``; imported by both ends.

Every frame is a 4-byte big-endian length, a JSON header of that length,
then ``header["size"]`` bytes of body (0 when absent).

client -> server: ``{"id": n, "argv": [...]}`` starts a command;
``{"id": n, "size": k}`` + k bytes is stdin for it; ``{"id": n, "eof": 1}``
ends its stdin; ``{"id": n, "cancel": 1}`` says the client stopped listening.
server -> client: ``{"id": n, "out": 1, "size": k}`` + k bytes of stdout;
``{"id": n, "exit": rc, "error": "..."}`` ends it.  After the exit frame the
server drops whatever else arrives for that id, and the client stops sending it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import struct
from typing import IO, Any

_LENGTH = struct.Struct(">I")
# A header is a few hundred bytes; anything this big means the stream is out of step.
MAX_HEADER_BYTES = 1024 * 1024
# Linux pipes hold 64 KiB by default: a 4 MiB frame then costs 64 wake-ups of each side. 1 MiB is the most an
# unprivileged process may ask for (/proc/sys/fs/pipe-max-size).
PIPE_BYTES = 1024 * 1024


class FrameError(Exception):
    """The stream does not hold frames (something else wrote into it)."""


def read_frame(stream: IO[bytes]) -> tuple[dict[str, Any], bytes] | None:
    """The next (header, body), or None at the end of the stream."""
    raw = _read_exactly(stream, _LENGTH.size)
    if raw is None:
        return None
    length = _LENGTH.unpack(raw)[0]
    if length > MAX_HEADER_BYTES:
        raise FrameError(f"a frame header of {length} bytes: the stream is not in frames")
    header_bytes = _read_exactly(stream, length)
    if header_bytes is None:
        return None
    try:
        header = json.loads(header_bytes)
    except ValueError:
        raise FrameError("a frame header that is not JSON: the stream is not in frames") from None
    if not isinstance(header, dict) or not isinstance(header.get("id"), int):
        raise FrameError("a frame header without a request id")
    size = header.get("size", 0)
    body = _read_exactly(stream, size) if size else b""
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
    """The length and header of a frame; its body (``body_size`` bytes) is written after it."""
    if body_size:
        header = {**header, "size": body_size}
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    return _LENGTH.pack(len(header_bytes)) + header_bytes


def widen_pipe(fd: int) -> None:
    """Give the pipe frames travel through room for PIPE_BYTES; a socket or an older kernel keeps what it has."""
    with contextlib.suppress(OSError, AttributeError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
