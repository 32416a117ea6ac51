"""The agent client over a FakePipe: no sshd, no subprocess, the agent's frames all the same.

The real-agent handler runs ``agent.cli.run_command`` on a tmp host root in this process; a scripted
handler is a plain function, as with httpx's MockTransport.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from remote_magic.agent import cli
from remote_magic.errors import AgentCommandError
from remote_magic.transport.base import CommandResult
from remote_magic.transport.deploy import agent_hash
from remote_magic.transport.fake import FakeTransport, Handler
from remote_magic.wire.client import AgentClient
from remote_magic.wire.link import FRAME_BYTES

JOB = "20261127-103000-1a2b3c"


def real_agent(root: str) -> Handler:
    """The agent's own commands, run here on ``root``: what ``agent serve`` runs for each request."""

    def handle(argv: list[str], stdin: bytes) -> CommandResult:
        out = io.BytesIO()
        returncode, problem = cli.run_command(root, agent_hash(), argv, cli.CommandIO(io.BytesIO(stdin), out))
        return CommandResult(returncode, out.getvalue(), problem.encode())

    return handle


@pytest.fixture
def root(tmp_path: Path) -> str:
    return str(tmp_path / "host")


@pytest.fixture
def client(root: str) -> Iterator[AgentClient]:
    agent = AgentClient(FakeTransport(real_agent(root), root=root))
    yield agent
    agent.close(final=True)


def test_hello_comes_from_the_real_agent_through_frames(client: AgentClient, root: str) -> None:
    hello = client.hello()
    assert (hello["root"], hello["agent"], hello["python"]) == (root, agent_hash(), sys.executable)
    assert hello["packages"]["numpy"] and hello["packages"]["cloudpickle"]
    assert client.bytes_received == len(json.dumps(hello)) + 1  # its JSON line came as frame bodies, counted
    assert os.path.isdir(root)  # the agent made its root, as on a host


def test_a_blob_put_then_got_back_is_the_same_bytes(client: AgentClient) -> None:
    data = os.urandom(FRAME_BYTES + 4099)  # two frames on the way up
    digest = hashlib.sha256(data).hexdigest()
    client.put_blob(digest, memoryview(data), compress="none")
    assert client.get_blob(digest, len(data)) == data


def test_the_real_agents_refusal_is_an_agent_command_error(client: AgentClient) -> None:
    with pytest.raises(AgentCommandError, match=f"failed to status: no job {JOB} on this host"):
        client.status(JOB)
    assert client.hello()["root"]  # one refused command leaves the link working


def test_a_scripted_host_error_reaches_the_caller_with_the_hosts_message() -> None:
    seen: list[list[str]] = []

    def handler(argv: list[str], stdin: bytes) -> CommandResult:
        seen.append(argv)
        if argv == ["hello"]:
            return CommandResult(0, json.dumps({"packages": {}}).encode(), b"")
        return CommandResult(2, b"", b"squeue: error: Invalid user\n")

    client = AgentClient(FakeTransport(handler, host="gpu-box"))
    try:
        with pytest.raises(AgentCommandError) as raised:
            client.cancel(JOB)
    finally:
        client.close(final=True)
    assert str(raised.value) == "the agent on host gpu-box failed to cancel: squeue: error: Invalid user"
    assert seen == [["hello"], ["cancel", JOB]]
