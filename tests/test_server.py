"""The jobs REST API of the jupyter_server extension, against a real server and real agents."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import fake_nvidia_smi as fake
import pytest
import tornado.httpclient
from conftest import PYTHON, run
from host_processes import kill_processes_under
from jupyter_server.auth.authorizer import Authorizer
from test_lifecycle import _submitted_job_id

from remote_magic import session
from remote_magic.agent import protocol
from remote_magic.agent.procs import process_alive
from remote_magic.config import hosts_trait, ssh_config_trait
from remote_magic.errors import RemoteMagicError
from remote_magic.registry import Registry
from remote_magic.server.app import JobService, RemoteMagicApp, _with_recorded_sweeps

DEAD_HOST = "root@127.0.0.1:1"  # nothing listens on port 1: "cannot connect" at once


@pytest.fixture
def server_hosts(sshd) -> dict[str, dict[str, str]]:
    """The server's host settings: the test sshd; its local host is the magics' local host."""
    return {sshd.alias: {"python": PYTHON}}


@pytest.fixture
def jp_server_config(sshd, server_hosts):
    return {
        "ServerApp": {"jpserver_extensions": {"remote_magic": True}},
        "RemoteMagicApp": {
            "hosts": server_hosts,
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


# ----------------------------------------------------------------- GPUs (simulated: a fake nvidia-smi)
@dataclass
class GpuHost:
    state: Path  # the fake nvidia-smi's state file (fake_nvidia_smi.write_state)
    root: Path  # the local host's root, for the magics and the server alike


@pytest.fixture
def gpu_host(tmp_path, monkeypatch) -> Iterator[GpuHost]:
    """A local host with 4 simulated GPUs (the fake nvidia-smi first on PATH) and a root of its own."""
    state = fake.write_state(tmp_path / "gpus.json", gpus=4)
    fake.install(tmp_path / "bin", state)
    monkeypatch.setenv("PATH", fake.path_with(tmp_path / "bin"))
    root = tmp_path / "hostroot"
    yield GpuHost(state, root)
    kill_processes_under(root)  # the runners, warm runners and dispatcher the jobs left


def submit_job(
    connections: session.Connections,
    registry: Registry,
    host: str,
    source: str,
    name: str | None = None,
    gpus: int = 0,
    sweep: dict[str, Any] | None = None,
) -> str:
    """Submit a cell without inputs through the session layer, as the magics do (a sweep's trial too); register it."""
    submission = session.prepare(source, {}, name=name)
    submission.gpus = protocol.GpuRequest(gpus)
    spec = submission.spec()
    if sweep is not None:
        spec["sweep"] = sweep
    answer = connections.get(host).submit(spec, submission.payload.data)
    assert "job_id" in answer, answer  # no inputs: no blob to upload first
    registry.add(host, answer["job_id"], name=name)
    return answer["job_id"]


def wait_for_state(client, job_id: str, states: set[str], timeout: float = 60) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = client.status(job_id)
        if row["state"] in states:
            return row
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} is still {row['state']}, not {states}")


class TestGpusOfSimulatedGpuHost:
    @pytest.fixture
    def server_hosts(self, sshd, gpu_host: GpuHost) -> dict[str, dict[str, str]]:
        return {sshd.alias: {"python": PYTHON}, "local": {"root": str(gpu_host.root)}}

    async def test_gpus_of_every_host_with_jobs_and_who_holds_each_simulated_gpus(
        self, jp_fetch, gpu_host: GpuHost
    ) -> None:
        fake.write_state(gpu_host.state, gpus=4, processes=[{"gpu": 3, "pid": 4242, "memory": 20480}])
        fake.update_gpu(gpu_host.state, 1, utilization=87, memory_used=1000)
        connections = session.Connections({"local": {"root": str(gpu_host.root)}})
        registry = Registry()
        job_id = submit_job(connections, registry, "local", "import time\ntime.sleep(60)\n", gpus=1)
        registry.add(DEAD_HOST, "20260101-000000-0000bb")
        registry.add("testhost", "20260101-000000-0000bb")  # a host without GPUs
        try:
            wait_for_state(connections.get("local"), job_id, {protocol.STATE_RUNNING})
            started = time.monotonic()
            reply = await _get_json(jp_fetch, "gpus")
            took = time.monotonic() - started
            hosts = {entry["host"]: entry for entry in reply["hosts"]}

            local = hosts["local"]
            assert local["error"] is None and [g["index"] for g in local["gpus"]] == [0, 1, 2, 3]
            assert all(
                g["name"] == fake.DEFAULT_NAME and g["memory_total"] == fake.DEFAULT_MEMORY for g in local["gpus"]
            )
            held = [g for g in local["gpus"] if g["job_id"] == job_id]
            assert len(held) == 1 and held[0]["holder"] == f"job {job_id}"  # the job got one GPU: --gpus 1
            assert local["gpus"][1]["utilization"] == 87 and local["gpus"][1]["memory_used"] == 1000
            assert "pid 4242" in local["gpus"][3]["holder"] and local["gpus"][3]["job_id"] is None
            free = [g for g in local["gpus"] if g["index"] not in (held[0]["index"], 3)]
            assert all(g["holder"] is None for g in free)

            assert hosts["testhost"]["error"] is None  # reached (its GPUs, if any, are real ones)
            assert hosts[DEAD_HOST]["gpus"] == [] and "cannot connect" in hosts[DEAD_HOST]["error"]
            assert took < 30  # the dead host answers at once, and delays no other
        finally:
            connections.get("local").cancel(job_id)
            connections.close()
            registry.remove(DEAD_HOST, {"20260101-000000-0000bb"})
            registry.remove("testhost", {"20260101-000000-0000bb"})


class _CountingClient:
    calls: ClassVar[list[str]] = []

    def __init__(self, host: str) -> None:
        self.host = host

    def gpus(self) -> list[dict[str, Any]]:
        self.calls.append(self.host)
        if self.host == "down":
            raise RemoteMagicError("cannot connect to host down")
        return [{"index": 0, "name": "GPU", "memory_used": 0, "memory_total": 1024, "utilization": 0}]


async def test_gpus_ask_each_host_once_and_are_cached_like_the_jobs(tmp_path) -> None:
    registry = Registry(str(tmp_path / "jobs.jsonl"))
    for host, job_id in (
        ("a", "20260101-000000-000001"),
        ("a", "20260101-000000-000002"),
        ("down", "20260101-000000-000003"),
    ):
        registry.add(host, job_id)
    service = JobService(SimpleNamespace(get=_CountingClient), registry, cache_seconds=60)  # type: ignore[arg-type]
    _CountingClient.calls = []
    first = await service.gpus()
    assert sorted(_CountingClient.calls) == ["a", "down"]  # one call per host, not per job
    assert [entry["host"] for entry in first] == ["a", "down"]
    assert first[0]["error"] is None and len(first[0]["gpus"]) == 1
    assert first[1] == {"host": "down", "gpus": [], "error": "cannot connect to host down"}
    assert await service.gpus() == first and len(_CountingClient.calls) == 2  # cached
    service.forget_cache(gpus=False)  # the jobs list's Refresh leaves the GPUs cached
    await service.gpus()
    assert len(_CountingClient.calls) == 2
    service.forget_cache(jobs=False)
    await service.gpus()
    assert len(_CountingClient.calls) == 4


def test_a_trial_keeps_its_sweep_when_the_host_no_longer_knows_it() -> None:
    sweep = {"id": "sweep-20260101-000000-00000a", "trial": 1, "params": {"lr": 0.1}, "metric": "val_loss"}
    records = [
        SimpleNamespace(host="h", job_id="20260101-000000-000001", sweep=sweep),
        SimpleNamespace(host="h", job_id="20260101-000000-000002"),  # a record from before sweeps
    ]
    rows = [
        {"host": "h", "job_id": "20260101-000000-000001", "state": "gone"},
        {"host": "h", "job_id": "20260101-000000-000002", "state": "done", "sweep": None},
    ]
    assert _with_recorded_sweeps(rows, records)[0]["sweep"] == sweep
    assert rows[1]["sweep"] is None
    live = [{"host": "h", "job_id": "20260101-000000-000001", "sweep": {**sweep, "parallel": 2, "metric": None}}]
    assert _with_recorded_sweeps(live, records)[0]["sweep"]["parallel"] == 2  # the host's row wins field by field


class _ReadOnly(Authorizer):
    """Reads of the remote_magic API only; remembers every question."""

    asked: ClassVar[list[tuple[str, str]]] = []

    def is_authorized(self, handler: Any, user: Any, action: str, resource: str) -> bool:
        self.asked.append((action, resource))
        return not (resource == "remote_magic" and action == "write")


class TestGpusForAReadOnlyUser:
    @pytest.fixture
    def jp_server_config(self, sshd, server_hosts):
        return {
            "ServerApp": {"jpserver_extensions": {"remote_magic": True}, "authorizer_class": _ReadOnly},
            "RemoteMagicApp": {"hosts": server_hosts, "ssh_config": str(sshd.ssh_config), "cache_seconds": 0},
        }

    async def test_a_read_only_user_reads_the_gpus_and_no_one_unauthenticated(
        self, jp_fetch, jp_http_port, jp_base_url
    ) -> None:
        registry = Registry()
        registry.add("testhost", "20260101-000000-0000cc")
        try:
            _ReadOnly.asked.clear()
            reply = await _get_json(jp_fetch, "gpus")
            assert _ReadOnly.asked == [("read", "remote_magic")]
            assert any(entry["host"] == "testhost" and entry["error"] is None for entry in reply["hosts"])
            url = f"http://127.0.0.1:{jp_http_port}{jp_base_url}remote-magic/api/gpus"
            with pytest.raises(tornado.httpclient.HTTPClientError) as refused:
                await tornado.httpclient.AsyncHTTPClient().fetch(url)  # no token
            assert refused.value.code == 403
        finally:
            registry.remove("testhost", {"20260101-000000-0000cc"})
