"""The server extension app and its handlers."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import tornado.web
from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from jupyter_server.extension.application import ExtensionApp
from jupyter_server.extension.handler import ExtensionHandlerMixin
from traitlets import Float

from .. import session
from ..agent import protocol
from ..config import hosts_trait, ssh_config_trait
from ..errors import RemoteMagicError
from ..registry import Registry

URL_PREFIX = "/remote-magic/api"
# Only a well-formed job id matches (tornado answers 404 otherwise), so an id can never reach the agent as an
# option (``-h``) or a path (``..``).
_JOB_URL = URL_PREFIX + r"/jobs/(?P<host>[^/]+)/(?P<job_id>" + protocol.JOB_ID_PATTERN + ")"
# What a deployment's Authorizer is asked about: reading jobs (GET) and changing them (POST cancel).
AUTH_RESOURCE = "remote_magic"


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

    async def is_registered(self, host: str, job_id: str) -> bool:
        """Whether this machine submitted ``job_id`` to ``host``: the API reaches no other job of a shared host."""
        records = await asyncio.to_thread(self.registry.records)  # a file lock: never on the event loop
        return any(r.host == host and r.job_id == job_id for r in records)

    async def events(self, host: str, job_id: str, from_seq: int) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self.connections.get(host).events, job_id, from_seq)

    async def cancel(self, host: str, job_id: str) -> dict[str, Any]:
        result = await asyncio.to_thread(self.connections.get(host).cancel, job_id)
        self.forget_cache()
        return result


class _Handler(ExtensionHandlerMixin, APIHandler):
    auth_resource = AUTH_RESOURCE

    @property
    def service(self) -> JobService:
        return self.settings["remote_magic_service"]

    async def _registered(self, host: str, job_id: str) -> None:
        if not await self.service.is_registered(host, job_id):
            raise tornado.web.HTTPError(404, f"job {job_id} on host {host} was not submitted from this machine")

    async def _run(self, work: Any) -> None:
        try:
            self.finish(json.dumps(await work))
        except RemoteMagicError as exc:
            raise tornado.web.HTTPError(502, str(exc)) from None


class JobsHandler(_Handler):
    @tornado.web.authenticated
    @authorized  # GET: "read"
    async def get(self) -> None:
        if self.get_argument("fresh", "") == "1":  # the Refresh button: ask the hosts now
            self.service.forget_cache()

        async def listing() -> dict[str, Any]:
            return {"jobs": await self.service.jobs(), "time": time.time()}

        await self._run(listing())


class EventsHandler(_Handler):
    @tornado.web.authenticated
    @authorized  # GET: "read"
    async def get(self, host: str, job_id: str) -> None:
        try:
            from_seq = int(self.get_argument("from", "0"))
        except ValueError:
            raise tornado.web.HTTPError(400, "from must be an event number") from None
        await self._registered(host, job_id)

        async def events() -> dict[str, Any]:
            return {"host": host, "job_id": job_id, "events": await self.service.events(host, job_id, from_seq)}

        await self._run(events())


class CancelHandler(_Handler):
    @tornado.web.authenticated
    @authorized  # POST: "write"
    async def post(self, host: str, job_id: str) -> None:
        await self._registered(host, job_id)
        await self._run(self.service.cancel(host, job_id))


class RemoteMagicApp(ExtensionApp):
    """Serves the jobs API the JupyterLab sidebar uses."""

    name = "remote_magic"
    hosts = hosts_trait()
    ssh_config = ssh_config_trait()
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
