"""The jobs REST API of the jupyter_server extension, against a real server and real agents."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import tornado.httpclient
from conftest import PYTHON, run
from test_lifecycle import _submitted_job_id

from remote_magic.agent import protocol
from remote_magic.agent.jobs import process_alive
from remote_magic.config import hosts_trait, ssh_config_trait
from remote_magic.registry import Registry
from remote_magic.server.app import RemoteMagicApp


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
    assert by_name["api-ssh"]["host"] == "testhost" and by_name["api-ssh"]["state"] == protocol.STATE_DONE
    assert by_name["api-local"]["host"] == "local" and by_name["api-local"]["epoch"] == 1
    assert by_name["api-local"]["logs"] == {"loss": 0.5}
    dead = by_name["on-a-dead-host"]
    assert dead["state"] == protocol.STATE_UNREACHABLE and "cannot connect" in dead["message"]


async def test_events_from_a_sequence_number(jp_fetch, ip, capsys) -> None:
    assert run(ip, "%%remote_train --host testhost --detach\nz = 2\n").success
    job_id = _submitted_job_id(capsys.readouterr().out)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        events = (await _get_json(jp_fetch, "jobs", "testhost", job_id, "events"))["events"]
        if events and events[-1]["type"] == protocol.DONE:
            break
        time.sleep(0.2)
    assert events[0]["type"] == protocol.QUEUED and events[-1]["type"] == protocol.DONE
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
    assert next(r for r in rows if r["job_id"] == job_id)["state"] == protocol.STATE_CANCELLED


async def test_unknown_host_is_404(jp_fetch) -> None:
    with pytest.raises(tornado.httpclient.HTTPClientError) as missing:
        await jp_fetch("remote-magic", "api", "jobs", "nohost", "x", "events")
    assert missing.value.code == 404


def _running_job(ip, capsys, host: str) -> tuple[str, int]:
    """A detached job that sleeps on ``host``, and its runner's pid once it runs."""
    assert run(ip, f"%%remote_train --host {host} --detach\nimport time\ntime.sleep(300)\n").success
    job_id = _submitted_job_id(capsys.readouterr().out)
    pid = None
    deadline = time.monotonic() + 30
    while pid is None and time.monotonic() < deadline:
        pid = run(ip, f"%remote_status {job_id} --host {host}").result.row.get("pid")
        time.sleep(0.1)
    assert pid is not None
    return job_id, pid


async def _status_code(jp_fetch, *parts: str, **kwargs) -> int:
    """The answer's code, 30 s at most: a request that hangs the host's connection fails instead of hanging the test."""
    try:
        response = await asyncio.wait_for(jp_fetch("remote-magic", "api", *parts, **kwargs), 30)
    except tornado.httpclient.HTTPClientError as exc:
        return exc.code
    return response.code


async def test_cancel_and_events_need_the_exact_job_in_the_registry(jp_fetch, ip, capsys) -> None:
    job_id, pid = _running_job(ip, capsys, "testhost")
    registry = Registry()
    other = "20260101-000000-0000aa"
    registry.add("testhost", other)  # both hosts stay known: only the (host, job) pair is ever missing
    registry.add("local", other)
    try:
        registry.remove("testhost", {job_id})  # as if another machine had submitted it to this shared host
        assert await _status_code(jp_fetch, "jobs", "testhost", job_id, "cancel", method="POST", body=b"") == 404
        assert await _status_code(jp_fetch, "jobs", "testhost", job_id, "events") == 404
        registry.add("testhost", job_id)  # registered, but the request names another host
        assert await _status_code(jp_fetch, "jobs", "local", job_id, "cancel", method="POST", body=b"") == 404
        assert await _status_code(jp_fetch, "jobs", "local", job_id, "events") == 404
        assert process_alive(pid)  # no refused cancel reached a host
    finally:
        registry.remove("testhost", {other, job_id})
        registry.remove("local", {other})
        registry.add("testhost", job_id)

    result = await _get_json(jp_fetch, "jobs", "testhost", job_id, "cancel", method="POST", body=b"")
    assert result["cancelled"] is True and not process_alive(pid)


@pytest.mark.parametrize("bad_id", ["-h", "..", "20260101-000000-00000G", "20260101-000000-0000aa-x"])
async def test_a_malformed_job_id_never_reaches_the_agent(jp_fetch, ip, capsys, bad_id: str) -> None:
    assert run(ip, "%%remote_train --detach\ny = 1\n").success
    job_id = _submitted_job_id(capsys.readouterr().out)
    # Even a registry line that holds the bad id (hand-edited, or from an old version) lets nothing through.
    registry = Registry()
    with open(registry.path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"host": "local", "job_id": bad_id}) + "\n")
    try:
        started = time.monotonic()
        assert await _status_code(jp_fetch, "jobs", "local", bad_id, "events") == 404
        assert await _status_code(jp_fetch, "jobs", "local", bad_id, "cancel", method="POST", body=b"") == 404
        assert time.monotonic() - started < 10
        # The host's connection still answers: the bad request never wrote onto its frame stream.
        assert await _status_code(jp_fetch, "jobs", "local", job_id, "events") == 200
        rows = (await asyncio.wait_for(_get_json(jp_fetch, "jobs"), 30))["jobs"]
        assert any(r["job_id"] == job_id and r["host"] == "local" for r in rows)
    finally:
        registry.remove("local", {bad_id})


def test_the_server_reads_the_settings_the_magics_declare() -> None:
    traits = RemoteMagicApp.class_traits()
    for name, declared in (("hosts", hosts_trait()), ("ssh_config", ssh_config_trait())):
        assert traits[name].help == declared.help and traits[name].default_value == declared.default_value
