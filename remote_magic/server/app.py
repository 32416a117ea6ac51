"""The server extension app and its handlers."""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

import tornado.web
from jupyter_server.base.handlers import APIHandler
from jupyter_server.extension.application import ExtensionApp
from jupyter_server.extension.handler import ExtensionHandlerMixin
from traitlets import Dict, Float, Unicode

from .. import session
from ..agent import protocol
from ..errors import RemoteMagicError
from ..registry import Registry

URL_PREFIX = "/remote-magic/api"
_JOB_URL = URL_PREFIX + r"/jobs/(?P<host>[^/]+)/(?P<job_id>[A-Za-z0-9_.-]+)"


class JobService:
    """Jobs of every host in the registry, through one connection per host, cached briefly."""

    def __init__(self, connections: session.Connections, registry: Registry, cache_seconds: float) -> None:
        self.connections = connections
        self.registry = registry
        self.cache_seconds = cache_seconds
        self._cached: tuple[float, list[dict[str, Any]]] | None = None
        self._lock = asyncio.Lock()

    async def jobs(self) -> list[dict[str, Any]]:
        async with self._lock:
            if self._cached and time.monotonic() - self._cached[0] < self.cache_seconds:
                return self._cached[1]
            rows = await asyncio.to_thread(session.registered_jobs, self.registry.records(), self.connections.get)
            self._cached = (time.monotonic(), rows)
            return rows

    def forget_cache(self) -> None:
        self._cached = None

    async def events(self, host: str, job_id: str, from_seq: int) -> list[dict[str, Any]]:
        transport = self.connections.get(host)
        reply = await asyncio.to_thread(transport.agent, "events", job_id, "--from", str(from_seq))
        return [protocol.decode_event(line) for line in reply.stdout.splitlines() if line]

    async def cancel(self, host: str, job_id: str) -> dict[str, Any]:
        result = await asyncio.to_thread(session.cancel, self.connections.get(host), job_id)
        self.forget_cache()
        return result


class _Handler(ExtensionHandlerMixin, APIHandler):
    @property
    def service(self) -> JobService:
        return self.settings["remote_magic_service"]

    def _known_host(self, host: str) -> None:
        if not any(r.host == host for r in self.service.registry.records()):
            raise tornado.web.HTTPError(404, f"no job of host {host} was submitted from this machine")

    async def _run(self, work: Any) -> None:
        try:
            self.finish(json.dumps(await work))
        except RemoteMagicError as exc:
            raise tornado.web.HTTPError(502, str(exc)) from None


class JobsHandler(_Handler):
    @tornado.web.authenticated
    async def get(self) -> None:
        if self.get_argument("fresh", "") == "1":  # the Refresh button: ask the hosts now
            self.service.forget_cache()

        async def listing() -> dict[str, Any]:
            return {"jobs": await self.service.jobs(), "time": time.time()}

        await self._run(listing())


class EventsHandler(_Handler):
    @tornado.web.authenticated
    async def get(self, host: str, job_id: str) -> None:
        self._known_host(host)
        try:
            from_seq = int(self.get_argument("from", "0"))
        except ValueError:
            raise tornado.web.HTTPError(400, "from must be an event number") from None

        async def events() -> dict[str, Any]:
            return {"host": host, "job_id": job_id, "events": await self.service.events(host, job_id, from_seq)}

        await self._run(events())


class CancelHandler(_Handler):
    @tornado.web.authenticated
    async def post(self, host: str, job_id: str) -> None:
        self._known_host(host)
        await self._run(self.service.cancel(host, job_id))


class RemoteMagicApp(ExtensionApp):
    """Serves the jobs API the JupyterLab sidebar uses."""

    name = "remote_magic"
    hosts = Dict(help="Per-host settings, as c.RemoteMagics.hosts: {'gpu1': {'python': ..., 'root': ...}}.").tag(
        config=True
    )
    ssh_config = Unicode(
        os.environ.get("REMOTE_MAGIC_SSH_CONFIG", os.path.join("~", ".ssh", "config")),
        help="The OpenSSH client config to read host aliases from ($REMOTE_MAGIC_SSH_CONFIG).",
    ).tag(config=True)
    cache_seconds = Float(3.0, help="How long a job listing is reused before the hosts are asked again.").tag(
        config=True
    )

    def initialize_settings(self) -> None:
        self.connections = session.Connections(self.hosts, self.ssh_config)
        self.settings["remote_magic_service"] = JobService(self.connections, Registry(), self.cache_seconds)

    def initialize_handlers(self) -> None:
        self.handlers.extend(
            [
                (URL_PREFIX + "/jobs", JobsHandler),
                (_JOB_URL + "/events", EventsHandler),
                (_JOB_URL + "/cancel", CancelHandler),
            ]
        )

    async def stop_extension(self) -> None:
        self.connections.close()
