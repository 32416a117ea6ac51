"""The jobs API asks the server's Authorizer, so a deployment that grants read-only access gets read-only access."""

from __future__ import annotations

import json
from typing import Any, ClassVar

import pytest
import tornado.httpclient
from conftest import PYTHON, run
from jupyter_server.auth.authorizer import Authorizer
from test_server import _running_job

from remote_magic.agent import protocol
from remote_magic.agent.procs import process_alive

# The resource name deployments write into their Authorizer: part of the API, so spelled out here.
AUTH_RESOURCE = "remote_magic"


class ReadOnlyJobs(Authorizer):
    """Lets anyone read the jobs API but no one write to it; remembers every question it was asked."""

    asked: ClassVar[list[tuple[str, str]]] = []

    def is_authorized(self, handler: Any, user: Any, action: str, resource: str) -> bool:
        self.asked.append((action, resource))
        return not (resource == AUTH_RESOURCE and action == "write")


@pytest.fixture
def jp_server_config(sshd):
    return {
        "ServerApp": {"jpserver_extensions": {"remote_magic": True}, "authorizer_class": ReadOnlyJobs},
        "RemoteMagicApp": {
            "hosts": {sshd.alias: {"python": PYTHON}},
            "ssh_config": str(sshd.ssh_config),
            "cache_seconds": 0,
        },
    }


async def test_a_read_only_user_lists_and_follows_jobs_but_cannot_cancel_them(jp_fetch, ip, capsys) -> None:
    job_id, pid = _running_job(ip, capsys, "testhost")
    ReadOnlyJobs.asked.clear()
    try:
        listing = json.loads((await jp_fetch("remote-magic", "api", "jobs")).body)
        assert _state(listing, job_id) == protocol.STATE_RUNNING
        events = json.loads((await jp_fetch("remote-magic", "api", "jobs", "testhost", job_id, "events")).body)
        assert events["events"][0]["type"] == protocol.QUEUED
        with pytest.raises(tornado.httpclient.HTTPClientError) as refused:
            await jp_fetch("remote-magic", "api", "jobs", "testhost", job_id, "cancel", method="POST", body=b"")
        assert refused.value.code == 403

        assert ReadOnlyJobs.asked == [("read", AUTH_RESOURCE), ("read", AUTH_RESOURCE), ("write", AUTH_RESOURCE)]
        assert process_alive(pid)  # the refused cancel changed nothing
        listing = json.loads((await jp_fetch("remote-magic", "api", "jobs", params={"fresh": "1"})).body)
        assert _state(listing, job_id) == protocol.STATE_RUNNING
    finally:
        assert run(ip, f"%remote_cancel {job_id} --host testhost").success  # no sleeper outlives the test


def _state(listing: dict[str, Any], job_id: str) -> str:
    return next(row for row in listing["jobs"] if row["job_id"] == job_id)["state"]
