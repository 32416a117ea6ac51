"""What every transport offers, and the agent protocol built on it.

A transport only knows how to run a command on the host (``execute``, for
deploying the agent) and how to start one long-lived process whose stdin
and stdout it hands back (``spawn``, for ``agent serve``).  Everything about
the agent (deploying it, calling its commands over one ``AgentLink``,
checking the host's Python) is written once here, so SSH hosts and the
embedded ``local`` host behave the same.
"""

from __future__ import annotations

import json
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ..agent import bootstrap, protocol
from ..errors import AgentCommandError, ConnectionFailed, HostSetupError
from . import compression
from .deploy import agent_hash, agent_tarball
from .link import AgentLink, Pipe, Reply

StdinData = bytes | Iterable[bytes | memoryview] | None

# Packages the host's Python needs for every job (the agent itself is stdlib only).
REQUIRED_PACKAGES = ("cloudpickle", "numpy")


@dataclass
class CommandResult:
    returncode: int
    stdout: bytes
    stderr: bytes


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
        self._hello: dict[str, Any] | None = None
        self._link: AgentLink | None = None
        self._link_lock = threading.Lock()
        self.upload_rate: float | None = None  # bytes/s of the last large uncompressed upload

    # ---- what a concrete transport implements
    @abstractmethod
    def execute(self, argv: list[str], stdin: StdinData = None) -> CommandResult:
        """Run ``argv`` on the host, feed it ``stdin``, collect its output."""

    @abstractmethod
    def spawn(self, argv: list[str]) -> Pipe:
        """Start ``argv`` on the host and hand back its stdin/stdout."""

    def close(self) -> None:
        with self._link_lock:
            if self._link is not None:
                self._link.close()
                self._link = None

    # ---- the agent
    def agent_argv(self, *args: str) -> list[str]:
        return [self.python, "-c", bootstrap.RUN, self.root or "", agent_hash(), *args]

    def deploy(self) -> None:
        argv = [self.python, "-c", bootstrap.INSTALL, self.root or "", agent_hash()]
        result = self.execute(argv, agent_tarball())
        if result.returncode != 0:
            raise self._command_error("deploy", result)

    def _count(self, sent: int, received: int) -> None:
        self.bytes_sent += sent
        self.bytes_received += received

    def link(self) -> AgentLink:
        """The agent server of this connection, started (and deployed) when needed."""
        with self._link_lock:
            if self._link is not None and not self._link.dead:
                return self._link
            for attempt in range(2):
                link = AgentLink(self.spawn(self.agent_argv("serve")), self._count)
                try:
                    # The first answer proves the server runs (and caches what the host offers).
                    self._hello = json.loads(_checked(link.request(["hello"]).reply(), "hello", self))
                    self._link = link
                    return link
                except ConnectionFailed:
                    status = link.pipe.exit_status()  # before closing: closing may drop it
                    link.close()
                    if status == protocol.EXIT_AGENT_MISSING and attempt == 0:
                        self.deploy()
                        continue
                    if status is None:
                        raise
                    raise self._command_error("start", CommandResult(status, b"", link.pipe.stderr())) from None
            raise AssertionError("unreachable")

    def agent(self, *args: str, stdin: StdinData = None) -> Reply:
        """Run an agent command and wait for its whole answer."""
        parts = () if stdin is None else [stdin] if isinstance(stdin, bytes) else stdin
        reply = self.link().request(list(args), parts).reply()
        _checked(reply, args[0], self)
        return reply

    def agent_json(self, *args: str, stdin: StdinData = None) -> Any:
        return json.loads(self.agent(*args, stdin=stdin).stdout)

    def upload_blob(self, digest: str, buffer: memoryview, compress: str = "auto") -> None:
        """Send one blob; ``compress``: "none", "zstd", or "auto" (only where it pays, see compression.py)."""
        size = buffer.nbytes
        if compression.should_compress(self, buffer, compress):
            self.agent("put-blob", digest, str(size), "--zstd", stdin=compression.zstd_chunks(buffer))
            return
        start = time.perf_counter()
        self.agent("put-blob", digest, str(size), stdin=[buffer])
        self.upload_rate = compression.measured_rate(size, time.perf_counter() - start, self.upload_rate)

    def agent_download(self, size: int, *args: str) -> bytearray:
        """An agent command whose stdout is ``size`` bytes of data, copied once into one buffer."""
        request = self.link().request(list(args))
        buffer = bytearray(size)
        view = memoryview(buffer)
        received = 0
        for chunk in request.chunks():
            end = received + len(chunk)
            if end > size:
                raise AgentCommandError(f"host {self.host} sent more than the {size} bytes expected for `{args[0]}`")
            view[received:end] = chunk
            received = end
        _checked(Reply(request.returncode or 0, b"", request.error), args[0], self)
        if received != size:
            raise AgentCommandError(f"host {self.host} sent {received} of {size} bytes for `{args[0]}`")
        return buffer

    @contextmanager
    def agent_stream_lines(self, *args: str) -> Iterator[Iterator[bytes]]:
        """stdout of a long-running agent command (``attach``), line by line while it runs.

        Raises ConnectionFailed when the link drops, so the caller can resume.
        """
        request = self.link().request(list(args))

        def lines() -> Iterator[bytes]:
            pending = b""
            for chunk in request.chunks():
                pending += chunk
                *complete, pending = pending.split(b"\n")
                for line in complete:
                    yield line + b"\n"
            _checked(Reply(request.returncode or 0, b"", request.error), args[0], self)

        try:
            yield lines()
        finally:
            request.cancel()

    def hello(self) -> dict[str, Any]:
        """The host's interpreter and packages, checked once per connection."""
        self.link()
        hello = self._hello
        assert hello is not None
        missing = [name for name in REQUIRED_PACKAGES if not hello["packages"].get(name)]
        if missing:
            raise HostSetupError(
                f"the Python on host {self.host} ({hello['python']}, {hello['python_version']}) lacks "
                f"{', '.join(missing)}; install it there with `{hello['python']} -m pip install {' '.join(missing)}`, "
                "or point --python (or c.RemoteMagics.hosts) at an interpreter that has it"
            )
        return hello

    def _command_error(self, command: str, result: CommandResult) -> Exception:
        stderr = result.stderr.decode(errors="replace").strip()
        if result.returncode == 127 or ("No such file" in stderr and self.python in stderr):
            return HostSetupError(
                f"host {self.host} has no Python at `{self.python}`; pass --python PATH "
                f"(or set c.RemoteMagics.hosts = {{{self.host!r}: {{'python': PATH}}}})"
            )
        last = stderr.splitlines()[-1] if stderr else f"exit status {result.returncode}"
        return AgentCommandError(f"the agent on host {self.host} failed to {command}: {last}")


def _checked(reply: Reply, command: str, transport: Transport) -> bytes:
    if reply.returncode != 0:
        raise transport._command_error(command, CommandResult(reply.returncode, b"", reply.error.encode()))
    return reply.stdout
