"""The agent client over a FakePipe: no sshd, no subprocess, the agent's frames all the same.

The real agent is its own serve loop (``agent.server.serve_streams``) on a tmp host root in this process; a
scripted handler is a plain function, as with httpx's MockTransport.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from remote_magic.agent import server
from remote_magic.agent.launch import process
from remote_magic.errors import AgentCommandError
from remote_magic.transport.base import CommandResult
from remote_magic.transport.deploy import agent_hash
from remote_magic.transport.fake import FakeTransport, Serve
from remote_magic.wire.client import AgentClient
from remote_magic.wire.link import FRAME_BYTES

JOB = "20261127-103000-1a2b3c"


def real_agent(root: str) -> Serve:
    """``agent serve`` itself, on ``root``, over the pipe's streams instead of its stdin and stdout."""

    def serve(stdin: IO[bytes], stdout: IO[bytes]) -> int:
        return server.serve_streams(root, agent_hash(), stdin, stdout)

    return serve


@pytest.fixture
def root(tmp_path: Path) -> str:
    return str(tmp_path / "host")


@pytest.fixture
def client(root: str) -> Iterator[AgentClient]:
    agent = AgentClient(FakeTransport(serve=real_agent(root), root=root))
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


def test_the_host_decides_the_launcher_at_hello_and_an_old_slurm_spec_keeps_its_own(root: str) -> None:
    """hello --scheduler slurm records it in host.json (0600, rewritten only when it changes) and answers the
    launcher; a spec that names none then goes to Slurm, and one an earlier client wrote (launcher: slurm) still
    does on a plain host."""
    plain_spec = {"source": "x = 1", "gpus": 1}
    old_spec = {**plain_spec, "launcher": "slurm", "slurm": {"gpus": 1}}
    client = AgentClient(FakeTransport(serve=real_agent(root), root=root))
    try:
        assert client.hello()["launcher"] == "process"
        assert process.launcher_for(root, plain_spec).name in ("process", "queue")
        assert process.launcher_for(root, old_spec).name == "slurm"
        reply = client.link().request(["hello", "--scheduler", "slurm"]).reply()
    finally:
        client.close(final=True)
    assert reply.returncode == 0 and json.loads(reply.stdout)["launcher"] == "slurm"
    host_file = Path(root) / "host.json"
    assert json.loads(host_file.read_text()) == {"scheduler": "slurm"}
    assert stat.S_IMODE(host_file.stat().st_mode) == 0o600
    assert process.launcher_for(root, plain_spec).name == "slurm"
    assert process.launcher_for(root, old_spec).name == "slurm"
    written = host_file.stat().st_ino
    client = AgentClient(FakeTransport(serve=real_agent(root), root=root))
    try:
        client.link().request(["hello", "--scheduler", "slurm"]).reply()
    finally:
        client.close(final=True)
    assert host_file.stat().st_ino == written  # unchanged: not written again
