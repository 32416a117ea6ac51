"""The server extension app and its handlers."""

from __future__ import annotations

import asyncio
import json
import os
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
# JupyterLab 4.6 creates a kernel subshell for widget comms (and deletes it with the last one); the kernel's idle
# status for that request would read as the kernel's own, mid-cell. Statuses whose parent is one of these are
# not the user's activity: JupyterLab's page config tells the browser to ignore them.
SUBSHELL_MESSAGES = tuple(
    f"{verb}_subshell_{kind}" for verb in ("create", "delete", "list") for kind in ("request", "reply")
)


class JobService:
    """Jobs and GPUs of every host in the registry, through one connection per host, cached briefly."""

    def __init__(self, connections: session.Connections, registry: Registry, cache_seconds: float) -> None:
        self.connections = connections
        self.registry = registry
        self.cache_seconds = cache_seconds
        self._cached: tuple[float, str, list[dict[str, Any]]] | None = None
        self._cached_gpus: tuple[float, list[dict[str, Any]]] | None = None
        self._lock = asyncio.Lock()
        self._gpus_lock = asyncio.Lock()

    def _fresh(self, taken: float) -> bool:
        return time.monotonic() - taken < self.cache_seconds

    def registry_version(self) -> str:
        """Changes whenever a kernel records a job: a listing older than the registry is never reused."""
        try:
            info = os.stat(self.registry.path)
        except FileNotFoundError:
            return "none"
        return f"{info.st_ino}-{info.st_size}-{info.st_mtime_ns}"

    async def jobs(self) -> list[dict[str, Any]]:
        async with self._lock:
            version = await asyncio.to_thread(self.registry_version)
            if self._cached and self._cached[1] == version and self._fresh(self._cached[0]):
                return self._cached[2]
            rows = await asyncio.to_thread(self._list_jobs)
            self._cached = (time.monotonic(), version, rows)
            return rows

    def _list_jobs(self) -> list[dict[str, Any]]:
        records = self.registry.records()  # a file lock: in this worker thread, never on the event loop
        return _with_recorded_sweeps(session.registered_jobs(records, self.connections.get), records)

    async def gpus(self) -> list[dict[str, Any]]:
        """Each host with registered jobs and its GPUs now (``[]`` on a host without); ``error`` for one not reached.

        The hosts are asked at once, so one that does not answer delays the answer by its own timeout only.
        """
        async with self._gpus_lock:
            if self._cached_gpus and self._fresh(self._cached_gpus[0]):
                return self._cached_gpus[1]
            records = await asyncio.to_thread(self.registry.records)
            hosts = list(dict.fromkeys(record.host for record in records))
            listing = list(await asyncio.gather(*(self._host_gpus(host) for host in hosts)))
            self._cached_gpus = (time.monotonic(), listing)
            return listing

    async def _host_gpus(self, host: str) -> dict[str, Any]:
        try:
            gpus = await asyncio.to_thread(self._gpus_of, host)
        except (RemoteMagicError, ValueError) as exc:  # ValueError: the host's settings are wrong
            return {"host": host, "gpus": [], "error": str(exc) or type(exc).__name__}
        return {"host": host, "gpus": gpus, "error": None}

    def _gpus_of(self, host: str) -> list[dict[str, Any]]:
        return self.connections.get(host).gpus()  # get() may start the connection: in the worker thread too

    def forget_cache(self, jobs: bool = True, gpus: bool = True) -> None:
        if jobs:
            self._cached = None
        if gpus:
            self._cached_gpus = None

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


def _with_recorded_sweeps(rows: list[dict[str, Any]], records: list[Any]) -> list[dict[str, Any]]:
    """A trial's row keeps its sweep even when the host no longer knows the job (gone, unreachable).

    The registry's record of a trial carries its sweep (with how the sweep ranks
    its trials: ``metric``, ``mode``); the host's row, when there is one, wins
    field by field.
    """
    recorded = {(r.host, r.job_id): getattr(r, "sweep", None) for r in records}
    for row in rows:
        sweep = recorded.get((row["host"], row["job_id"]))
        if isinstance(sweep, dict):
            row["sweep"] = {**sweep, **(row.get("sweep") or {})}
    return rows


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
            self.service.forget_cache(gpus=False)
        # The sidebar's poll while nothing runs: the hosts are asked only once a kernel recorded a new job.
        known = self.get_argument("unless", "")
        version = await asyncio.to_thread(self.service.registry_version)
        if known and known == version:
            self.finish(json.dumps({"unchanged": True, "registry": version, "time": time.time()}))
            return

        async def listing() -> dict[str, Any]:
            return {"jobs": await self.service.jobs(), "registry": version, "time": time.time()}

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


class GpusHandler(_Handler):
    @tornado.web.authenticated
    @authorized  # GET: "read"
    async def get(self) -> None:
        if self.get_argument("fresh", "") == "1":
            self.service.forget_cache(jobs=False)

        async def listing() -> dict[str, Any]:
            return {"hosts": await self.service.gpus(), "time": time.time()}

        await self._run(listing())


class CancelHandler(_Handler):
    @tornado.web.authenticated
    @authorized  # POST: "write"
    async def post(self, host: str, job_id: str) -> None:
        await self._registered(host, job_id)
        await self._run(self.service.cancel(host, job_id))


class RemoteMagicApp(ExtensionApp):
    """Serves the jobs and GPUs API the JupyterLab sidebar uses."""

    name = "remote_magic"
    hosts = hosts_trait()
    ssh_config = ssh_config_trait()
    cache_seconds = Float(3.0, help="How long a job or GPU listing is reused before the hosts are asked again.").tag(
        config=True
    )

    def initialize_settings(self) -> None:
        self.connections = session.Connections(self.hosts, self.ssh_config)
        self.settings["remote_magic_service"] = JobService(self.connections, Registry(), self.cache_seconds)
        self._untrack_subshell_messages()

    def _untrack_subshell_messages(self) -> None:
        """Keep the kernel busy in the browser while a remote cell runs (see SUBSHELL_MESSAGES)."""
        manager = getattr(self.serverapp, "kernel_manager", None)
        untracked = getattr(manager, "untracked_message_types", None)
        if manager is None or untracked is None:
            return
        manager.untracked_message_types = [*untracked, *(m for m in SUBSHELL_MESSAGES if m not in untracked)]
        # JupyterLab's own extension may have copied the list into the page config already.
        web_app = getattr(self.serverapp, "web_app", None)
        page_config = web_app.settings.get("page_config_data", {}) if web_app is not None else {}
        if "untracked_message_types" in page_config:
            page_config["untracked_message_types"] = list(manager.untracked_message_types)

    def initialize_handlers(self) -> None:
        self.handlers.extend(
            [
                (URL_PREFIX + "/jobs", JobsHandler),
                (URL_PREFIX + "/gpus", GpusHandler),
                (_JOB_URL + "/events", EventsHandler),
                (_JOB_URL + "/cancel", CancelHandler),
            ]
        )

    async def stop_extension(self) -> None:
        self.connections.close()
