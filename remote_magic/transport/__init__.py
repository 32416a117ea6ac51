"""How the client reaches a host: SSH, or the embedded local default."""

from .base import CommandResult, Pipe, Transport
from .local import LOCAL_HOST, LocalTransport
from .ssh import SSHTransport

__all__ = ["LOCAL_HOST", "CommandResult", "LocalTransport", "Pipe", "SSHTransport", "Transport"]
