"""What every transport offers, and the agent protocol built on it.

A transport only knows how to run a command on the host with some stdin and
collect or stream its stdout.  Everything about the agent (deploying it,
calling its commands, checking the host's Python) is written once here on top
of that, so SSH hosts and the embedded ``local`` host behave the same.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from ..agent import bootstrap, protocol
from ..errors import AgentCommandError, HostSetupError
from .deploy import agent_hash, agent_tarball

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

    def __init__(self, host: str, python: str, root: str | None) -> None:
        self.host = host
        self.python = python
        self.root = root
        self.bytes_sent = 0
        self.bytes_received = 0
        self._hello: dict[str, Any] | None = None

    # ---- what a concrete transport implements
    @abstractmethod
    def execute(self, argv: list[str], stdin: StdinData = None) -> CommandResult:
        """Run ``argv`` on the host, feed it ``stdin``, collect its output."""

    @abstractmethod
    def stream_lines(self, argv: list[str]) -> AbstractContextManager[Iterator[bytes]]:
        """Run ``argv`` and yield its stdout line by line while it runs.

        The iterator ends when the command ends; if the link drops first it
        ends too (without error), and the caller resumes where it stopped.
        """

    @abstractmethod
    def download(self, argv: list[str], size: int) -> bytearray:
        """Run ``argv`` and read exactly ``size`` bytes of its stdout into one buffer."""

    @abstractmethod
    def close(self) -> None: ...

    def is_alive(self) -> bool:
        return True

    # ---- the agent
    def agent_argv(self, *args: str) -> list[str]:
        return [self.python, "-c", bootstrap.RUN, self.root or "", agent_hash(), *args]

    def agent(self, *args: str, stdin: StdinData = None) -> CommandResult:
        """Run an agent command, deploying the agent first if the host lacks it."""
        result = self.execute(self.agent_argv(*args), stdin)
        if result.returncode == protocol.EXIT_AGENT_MISSING:
            self.deploy()
            result = self.execute(self.agent_argv(*args), stdin)
        if result.returncode != 0:
            raise self._command_error(args[0], result)
        return result

    def agent_download(self, size: int, *args: str) -> bytearray:
        """An agent command whose stdout is ``size`` bytes of data (a blob), read without extra copies."""
        return self.download(self.agent_argv(*args), size)

    def agent_json(self, *args: str, stdin: StdinData = None) -> Any:
        return json.loads(self.agent(*args, stdin=stdin).stdout)

    def deploy(self) -> None:
        argv = [self.python, "-c", bootstrap.INSTALL, self.root or "", agent_hash()]
        result = self.execute(argv, agent_tarball())
        if result.returncode != 0:
            raise self._command_error("deploy", result)

    def hello(self) -> dict[str, Any]:
        """The host's interpreter and packages, checked once per connection."""
        if self._hello is None:
            hello = self.agent_json("hello")
            missing = [name for name in REQUIRED_PACKAGES if not hello["packages"].get(name)]
            if missing:
                raise HostSetupError(
                    f"the Python on host {self.host} ({hello['python']}, {hello['python_version']}) lacks "
                    f"{', '.join(missing)}; install it there with `{hello['python']} -m pip install {' '.join(missing)}`, "
                    "or point --python (or c.RemoteMagics.hosts) at an interpreter that has it"
                )
            self._hello = hello
        return self._hello

    def raise_for_stream(self, argv: list[str], returncode: int | None, stderr: bytes) -> None:
        """After a streamed command ended: raise if the agent reported a problem."""
        if returncode:
            raise self._command_error(argv[5] if len(argv) > 5 else argv[0], CommandResult(returncode, b"", stderr))

    def _command_error(self, command: str, result: CommandResult) -> Exception:
        stderr = result.stderr.decode(errors="replace").strip()
        if result.returncode == 127 or ("No such file" in stderr and self.python in stderr):
            return HostSetupError(
                f"host {self.host} has no Python at `{self.python}`; pass --python PATH "
                f"(or set c.RemoteMagics.hosts = {{{self.host!r}: {{'python': PATH}}}})"
            )
        last = stderr.splitlines()[-1] if stderr else f"exit status {result.returncode}"
        return AgentCommandError(f"the agent on host {self.host} failed to {command}: {last}")
