"""The jobs REST API of the jupyter_server extension, against a real server and real agents."""

from __future__ import annotations

import json
import time

import pytest
import tornado.httpclient
from conftest import PYTHON, run
from test_lifecycle import _submitted_job_id

from remote_magic.agent.jobs import process_alive
from remote_magic.registry import Registry


@pytest.fixture
def jp_server_config(sshd):
    return {
        "ServerApp": {"jpserver_extensions": {"remote_magic": True}},
        "RemoteMagicApp": {
            "hosts": {sshd.alias: {"python": PYTHON}},
            "ssh_config": str(sshd.ssh_config),
            "cache_seconds": 0,
        },
    }


async def _get_json(jp_fetch, *parts: str, **kwargs) -> dict:
    response = await jp_fetch("remote-magic", "api", *parts, **kwargs)
    assert response.code == 200
    return json.loads(response.body)


async def test_jobs_lists_every_registered_job_with_its_live_state(jp_fetch, ip, capsys) -> None:
    assert run(ip, "%%remote_train --host testhost --name api-ssh\ny = 1\n").success
    assert run(ip, "%%remote_train --name api-local\nremote_log(step=1, total=1, loss=0.5)\n").success
    Registry().add("root@127.0.0.1:1", "20260101-000000-000000", name="on-a-dead-host")

    rows = (await _get_json(jp_fetch, "jobs"))["jobs"]
    by_name = {row.get("name"): row for row in rows}
    assert by_name["api-ssh"]["host"] == "testhost" and by_name["api-ssh"]["state"] == "done"
    assert by_name["api-local"]["host"] == "local" and by_name["api-local"]["epoch"] == 1
    assert by_name["api-local"]["logs"] == {"loss": 0.5}
    dead = by_name["on-a-dead-host"]
    assert dead["state"] == "unreachable" and "cannot connect" in dead["message"]


async def test_events_from_a_sequence_number(jp_fetch, ip, capsys) -> None:
    assert run(ip, "%%remote_train --host testhost --detach\nz = 2\n").success
    job_id = _submitted_job_id(capsys.readouterr().out)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        events = (await _get_json(jp_fetch, "jobs", "testhost", job_id, "events"))["events"]
        if events and events[-1]["type"] == "done":
            break
        time.sleep(0.2)
    assert events[0]["type"] == "queued" and events[-1]["type"] == "done"
    later = (await _get_json(jp_fetch, "jobs", "testhost", job_id, "events", params={"from": "2"}))["events"]
    assert [e["seq"] for e in later] == [e["seq"] for e in events if e["seq"] >= 2]


async def test_cancel_needs_authentication_and_then_ends_the_job(
    jp_fetch, jp_http_port, jp_base_url, ip, capsys
) -> None:
    assert run(ip, "%%remote_train --host testhost --detach\nimport time\ntime.sleep(300)\n").success
    job_id = _submitted_job_id(capsys.readouterr().out)
    pid = None
    deadline = time.monotonic() + 30
    while pid is None and time.monotonic() < deadline:
        pid = run(ip, f"%remote_status {job_id} --host testhost").result.row.get("pid")
        time.sleep(0.1)

    client = tornado.httpclient.AsyncHTTPClient()
    base = f"http://127.0.0.1:{jp_http_port}{jp_base_url}remote-magic/api/jobs"
    for method, url, body in (("POST", f"{base}/testhost/{job_id}/cancel", b""), ("GET", base, None)):
        with pytest.raises(tornado.httpclient.HTTPClientError) as refused:
            await client.fetch(url, method=method, body=body)
        assert refused.value.code == 403
    assert process_alive(pid)  # the refused request changed nothing

    result = await _get_json(jp_fetch, "jobs", "testhost", job_id, "cancel", method="POST", body=b"")
    assert result["cancelled"] is True
    assert not process_alive(pid)
    rows = (await _get_json(jp_fetch, "jobs"))["jobs"]
    assert next(r for r in rows if r["job_id"] == job_id)["state"] == "cancelled"


async def test_unknown_host_is_404(jp_fetch) -> None:
    with pytest.raises(tornado.httpclient.HTTPClientError) as missing:
        await jp_fetch("remote-magic", "api", "jobs", "nohost", "x", "events")
    assert missing.value.code == 404
