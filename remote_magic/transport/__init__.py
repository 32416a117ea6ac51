"""How the client reaches a host: SSH (paramiko, and OpenSSH for large blobs), the embedded local default, or
an in-process agent for tests (``fake``); ``deploy`` is the agent as shipped."""

from .base import CommandResult, Pipe, Transport
from .local import LOCAL_HOST, LocalTransport
from .ssh import SSHTransport

__all__ = ["LOCAL_HOST", "CommandResult", "LocalTransport", "Pipe", "SSHTransport", "Transport"]
