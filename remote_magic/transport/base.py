"""What every transport offers: the byte pipe to one host, nothing more.

A transport runs a command on the host (``execute``: deploying the agent)
and starts one long-lived process whose stdin and stdout it hands back
(``spawn``: ``agent serve``).  What travels over that pipe (the agent's
frames and commands) is the agent client's business (remote_magic/wire/client.py),
so SSH hosts and the embedded ``local`` host behave the same.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

StdinData = bytes | Iterable[bytes | memoryview] | None


@dataclass
class CommandResult:
    returncode: int
    stdout: bytes
    stderr: bytes


class Pipe(Protocol):
    """A process a transport started: its stdin and stdout, then its exit status."""

    def write(self, data: bytes | memoryview) -> None: ...

    def read(self, size: int) -> bytes: ...

    def close(self) -> None: ...

    def exit_status(self) -> int | None:
        """The exit status once the process ended (None while it runs or when unknown)."""

    def stderr(self) -> bytes: ...


class Transport(ABC):
    """One host reached one way; reused for every command of a kernel."""

    # True when the host is this machine: its files are already on this disk, the link is a pipe.
    is_local = False

    def __init__(self, host: str, python: str, root: str | None) -> None:
        self.host = host
        self.python = python
        self.root = root
        self.bytes_sent = 0
        self.bytes_received = 0

    @abstractmethod
    def execute(self, argv: list[str], stdin: StdinData = None) -> CommandResult:
        """Run ``argv`` on the host, feed it ``stdin``, collect its output."""

    @abstractmethod
    def spawn(self, argv: list[str]) -> Pipe:
        """Start ``argv`` on the host and hand back its stdin/stdout."""

    @property
    def has_bulk_path(self) -> bool:
        """Whether ``spawn_bulk`` can start anything (checked without connecting)."""
        return False

    def spawn_bulk(self, argv: list[str]) -> Pipe | None:
        """Start ``argv`` on a second path made for large blobs; None where this transport has none."""
        return None

    def bulk_refusal(self, stderr: bytes) -> Exception | None:
        """The error that must stop a transfer, from the stderr of a bulk path that failed to start."""
        return None

    def close(self) -> None:  # noqa: B027  (a transport without a lasting connection has nothing to close)
        """Close the connection; the next command opens a new one."""

    def count(self, sent: int, received: int) -> None:
        self.bytes_sent += sent
        self.bytes_received += received
