"""Errors a user sees, each with the fix in its message.

IPython shows ``_render_traceback_`` instead of a local traceback, which for
these would only show our own internals.
"""

from __future__ import annotations


class RemoteMagicError(Exception):
    """Base class: a problem explained in plain words, no local traceback."""

    def _render_traceback_(self) -> list[str]:
        return [f"{type(self).__name__}: {self}"]


class HostKeyError(RemoteMagicError):
    """The host's key is unknown or changed; nothing was sent."""


class AuthenticationError(RemoteMagicError):
    """The host refused every key we offered."""


class ConnectionFailed(RemoteMagicError):
    """The host could not be reached (name, port, network)."""


class HostSetupError(RemoteMagicError):
    """The host's Python lacks something the agent needs."""


class AgentCommandError(RemoteMagicError):
    """The agent on the host reported a problem."""


class RemoteExecutionError(RemoteMagicError):
    """The cell raised on the host (or its inputs or files could not be set up there); carries the remote traceback.

    ``hint`` is what to do about it, when we know (a module to ship or install).
    """

    def __init__(
        self,
        message: str,
        remote_traceback: str = "",
        exc_type: str = "",
        cell_line: int | None = None,
        hint: str = "",
    ):
        super().__init__(message)
        self.message = message
        self.remote_traceback = remote_traceback
        self.exc_type = exc_type
        self.cell_line = cell_line
        self.hint = hint

    def _render_traceback_(self) -> list[str]:
        if not self.remote_traceback:  # failed before the cell ran: the agent's own frames would not help
            lines = [f"RemoteExecutionError: {self.message}; the local namespace is unchanged."]
        else:
            header = f"RemoteExecutionError: the cell raised {self.exc_type} on the host"
            if self.cell_line:
                header += f" (cell line {self.cell_line})"
            lines = [header + "; the local namespace is unchanged.", ""]
            lines += self.remote_traceback.rstrip("\n").splitlines()
        if self.hint:
            lines += ["", self.hint]
        return lines

    def __str__(self) -> str:
        return "\n".join(self._render_traceback_())


class JobLost(RemoteMagicError):
    """The runner died without finishing (killed, out of memory, reboot)."""
