"""The client side of a job's life: submit, follow, reattach, stop, cancel, fetch, inject.

Works on any ``AgentClient``; knows nothing about widgets (a panel is
anything with ``handle(event)``, ``note(text)``, ``finish()``) and nothing
about IPython beyond a namespace to update.  What the user should type to do
something later is asked of a ``Hints`` object, so magic syntax stays in
magics.py and the REST API can phrase it its own way.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Protocol

from . import capture, payload
from .agent import protocol
from .cache import BlobCache
from .client import AgentClient
from .errors import ConnectionFailed, HostSetupError, JobLost, RemoteExecutionError, RemoteMagicError
from .transport import LOCAL_HOST, LocalTransport, SSHTransport

RECONNECT_TIMEOUT = 600.0
_BACKOFF = (0.5, 1, 2, 4, 8, 15, 30)


@dataclass
class HostSettings:
    python: str | None = None
    root: str | None = None
    ssh_config: str | None = None


HOST_SETTING_KEYS = frozenset({"python", "root"})


class Connections:
    """One agent client per host for the life of a kernel (or server), reopened after a drop.

    ``hosts`` holds per-host settings as in ``c.RemoteMagics.hosts``.
    """

    def __init__(self, hosts: dict[str, dict[str, str]] | None = None, ssh_config: str | None = None) -> None:
        self.hosts = hosts or {}
        self.ssh_config = ssh_config
        self._clients: dict[tuple[str, str | None, str | None], AgentClient] = {}
        self._lock = threading.Lock()

    def settings_for(self, host: str, python: str | None = None) -> HostSettings:
        settings = dict(self.hosts.get(host, {}))
        unknown = set(settings) - HOST_SETTING_KEYS
        if unknown:
            raise ValueError(
                f"the settings of host {host!r} have unknown keys {sorted(unknown)}; use 'python' and 'root'"
            )
        return HostSettings(
            python=python or settings.get("python"), root=settings.get("root"), ssh_config=self.ssh_config
        )

    def get(self, host: str, python: str | None = None) -> AgentClient:
        settings = self.settings_for(host, python)
        key = (host, settings.python, settings.root)
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                if host == LOCAL_HOST:
                    transport = LocalTransport(python=settings.python, root=settings.root)
                else:
                    transport = SSHTransport(
                        host, python=settings.python or "python3", root=settings.root, ssh_config=settings.ssh_config
                    )
                client = self._clients[key] = AgentClient(transport)
            return client

    def close(self) -> None:
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()


class Hints(Protocol):
    """How the front end tells the user to act on a job later (a magic, a button, a URL)."""

    def attach(self, job_id: str, host: str) -> str:
        """How to follow the job again and get its outputs."""

    def detail(self, job_id: str, host: str) -> str:
        """How to see the job's last output and error."""

    def checkpoint(self, job_id: str, host: str) -> str:
        """How to get the model of the job's last checkpoint."""


class PlainHints:
    """Hints without any front end's syntax."""

    def attach(self, job_id: str, host: str) -> str:
        return f"attach job {job_id} on host {host} again to follow it and fetch its outputs"

    def detail(self, job_id: str, host: str) -> str:
        return f"the status of job {job_id} on host {host} shows its last output"

    def checkpoint(self, job_id: str, host: str) -> str:
        return f"the checkpoint of job {job_id} on host {host} holds the model of its last checkpointed epoch"


@dataclass
class Submission:
    """What a cell asks for, worked out locally before anything is sent."""

    source: str
    inputs: list[str]
    outputs: list[str]
    payload: payload.Payload
    name: str | None = None
    checkpoint_every: int = 1
    warm: bool = True
    compress: str = "auto"

    def spec(self) -> dict[str, Any]:
        """The job's spec as the agent stores it (protocol.SPEC_KEYS)."""
        return {
            "source": self.source,
            "name": self.name,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "checkpoint_every": self.checkpoint_every,
            "warm": self.warm,
            "blobs": self.payload.blobs,
            "client": {"python": sys.version.split()[0], "agent_schema": protocol.SCHEMA_VERSION},
        }


def prepare(
    source: str,
    namespace: dict[str, Any],
    hidden: set[str] | frozenset[str] = frozenset(),
    outputs: list[str] | None = None,
    name: str | None = None,
) -> Submission:
    """Analyse the cell and pickle its inputs; raises before any I/O on a bad input."""
    names = capture.analyze(source)
    inputs = capture.select_inputs(names, namespace, set(hidden) | protocol.RUNNER_NAMES)
    packed = payload.pack({n: namespace[n] for n in inputs}, namespace)
    wanted = outputs if outputs is not None else capture.default_outputs(names, inputs)
    return Submission(source, inputs, wanted, packed, name)


def check_host(client: AgentClient, submission: Submission, namespace: dict[str, Any]) -> None:
    """Refuse to send what the host cannot load: a Keras model to a host without (the same major) Keras."""
    hello = client.hello()
    uses_keras = any(type(namespace[n]).__module__.startswith("keras") for n in submission.inputs)
    if not uses_keras:
        return
    host_keras = hello["packages"].get("keras")
    local_keras = metadata.version("keras")
    if not host_keras:
        raise HostSetupError(
            f"the cell sends a Keras model but the Python on host {client.host} ({hello['python']}) has no keras; "
            f"install it there with `{hello['python']} -m pip install keras=={local_keras} tensorflow`"
        )
    if host_keras.split(".")[0] != local_keras.split(".")[0]:
        raise HostSetupError(
            f"host {client.host} has keras {host_keras} but this kernel has keras {local_keras}; a model saved by "
            f"one major version may not load in the other. Install keras=={local_keras} on the host."
        )


def submit(client: AgentClient, submission: Submission) -> str:
    """Upload the blobs the host lacks, create the job, return its id."""
    spec = submission.spec()
    for _attempt in range(3):
        answer = client.submit(spec, submission.payload.data)
        if "job_id" in answer:
            return answer["job_id"]
        missing = set(answer["missing"])
        for (digest, _), buffer in zip(submission.payload.blobs, submission.payload.buffers, strict=True):
            if digest in missing:
                client.put_blob(digest, buffer, submission.compress)
                missing.discard(digest)
    raise RemoteMagicError(f"host {client.host} kept asking for the same inputs; its disk may be full")


def follow(
    client: AgentClient,
    job_id: str,
    on_event: Callable[[dict[str, Any]], None],
    from_seq: int = 0,
    reconnect_timeout: float = RECONNECT_TIMEOUT,
    on_reconnecting: Callable[[str], None] | None = None,
    keep_going: Callable[[], bool] | None = None,
    hints: Hints | None = None,
) -> dict[str, Any] | None:
    """Feed every event from ``from_seq`` to ``on_event`` until the job ends.

    When the link drops, reconnect with backoff and resume at the next
    event, so none is missed and none is seen twice.  Returns the final
    event, or None as soon as ``keep_going()`` says to stop following (the
    job itself runs on).  A job written by a newer agent schema is refused
    at its first event.
    """
    next_seq = from_seq
    failures = 0
    give_up_at: float | None = None
    while True:
        try:
            with client.attach(job_id, next_seq) as events:
                for event in events:
                    if event["seq"] < next_seq:
                        continue
                    problem = protocol.newer_schema_problem(event.get("schema"), job_id)
                    if problem:
                        raise RemoteMagicError(problem)
                    next_seq = event["seq"] + 1
                    failures, give_up_at = 0, None
                    on_event(event)
                    if event["type"] in protocol.TERMINAL:
                        return event
                    if keep_going is not None and not keep_going():
                        return None
        except ConnectionFailed as exc:
            reason = str(exc)
        else:
            reason = f"the connection to host {client.host} dropped"
        if keep_going is not None and not keep_going():
            return None
        now = time.monotonic()
        give_up_at = give_up_at or now + reconnect_timeout
        if now >= give_up_at:
            later = (hints or PlainHints()).attach(job_id, client.host)
            raise ConnectionFailed(
                f"{reason}; gave up reconnecting after {reconnect_timeout:.0f} s. The job keeps running: {later}"
            )
        if on_reconnecting is not None:
            on_reconnecting(reason)
        time.sleep(min(_BACKOFF[min(failures, len(_BACKOFF) - 1)], max(0.0, give_up_at - now)))
        failures += 1


class BackgroundFollower(threading.Thread):
    """Follows a detached job while the kernel is free, then hands its final event on.

    Daemon thread: it never keeps a kernel alive.  ``stop()`` ends the
    following (the job runs on) at the next event.  If following fails,
    ``on_error`` is told (there is no cell to raise into).
    """

    def __init__(
        self,
        client: AgentClient,
        job_id: str,
        on_event: Callable[[dict[str, Any]], None],
        on_end: Callable[[dict[str, Any]], None],
        on_error: Callable[[BaseException], None],
        from_seq: int = 0,
        reconnect_timeout: float = RECONNECT_TIMEOUT,
        hints: Hints | None = None,
    ) -> None:
        super().__init__(name=f"remote_magic follow {job_id}", daemon=True)
        self.client, self.job_id = client, job_id
        self.on_event, self.on_end, self.on_error = on_event, on_end, on_error
        self.from_seq, self.reconnect_timeout, self.hints = from_seq, reconnect_timeout, hints
        self._stop_requested = threading.Event()
        self.error: BaseException | None = None

    def stop(self) -> None:
        self._stop_requested.set()

    @property
    def stopped(self) -> bool:
        return self._stop_requested.is_set()

    def run(self) -> None:
        try:
            final = follow(
                self.client,
                self.job_id,
                self.on_event,
                from_seq=self.from_seq,
                reconnect_timeout=self.reconnect_timeout,
                keep_going=lambda: not self.stopped,
                hints=self.hints,
            )
            if final is not None and not self.stopped:
                self.on_end(final)
        except BaseException as exc:  # noqa: BLE001  (reported through on_error: a thread cannot raise to the user)
            self.error = exc
            self.on_error(exc)


def fetch_outputs(
    client: AgentClient, job_id: str, done: dict[str, Any], cache: BlobCache | None = None
) -> dict[str, Any]:
    """Load the job's outputs; each blob comes from the local cache when an earlier fetch stored it."""
    data = client.outputs(job_id)
    buffers = [fetch_blob(client, digest, size, cache) for digest, size in done.get("blobs", [])]
    return payload.unpack(data, buffers)


def fetch_blob(client: AgentClient, digest: str, size: int, cache: BlobCache | None = None) -> bytearray:
    # The local host's blobs are on this disk already: caching them would only store them twice.
    cache = None if client.is_local else cache or BlobCache()
    buffer = cache.get(digest, size) if cache is not None else None
    if buffer is None:
        buffer = client.get_blob(digest, size)  # verified against its sha256 while it arrives
        if cache is not None:
            cache.put_in_background(digest, buffer)
    return buffer


def fetch_checkpoint(client: AgentClient, job_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model of the job's last checkpoint, and the checkpoint's epoch information."""
    meta = client.status(job_id).get("checkpoint")
    if not meta:
        raise RemoteMagicError(
            f"job {job_id} on host {client.host} has no checkpoint: no Keras epoch ended "
            "(or it ran with --checkpoint-every 0)"
        )
    return payload.unpack(client.checkpoint(job_id), []), meta


def raise_for_final(final: dict[str, Any], job_id: str, host: str, hints: Hints | None = None) -> None:
    hints = hints or PlainHints()
    kind = final["type"]
    if kind == protocol.ERROR:
        raise RemoteExecutionError(
            final.get("message", ""), final.get("traceback", ""), final.get("exc_type", ""), final.get("cell_line")
        )
    if kind == protocol.CANCELLED:
        raise RemoteMagicError(f"job {job_id} on host {host} was cancelled; nothing was injected")
    if kind == protocol.LOST:
        raise JobLost(
            f"job {job_id} on host {host} ended without finishing ({final.get('message')}); "
            f"{hints.detail(job_id, host)}, and {hints.checkpoint(job_id, host)}"
        )


def registered_jobs(records: list[Any], client_for: Callable[[str], AgentClient]) -> list[dict[str, Any]]:
    """Live rows for the jobs in the local registry, one status call per host.

    An unreachable host gives its jobs the state ``unreachable`` instead of
    failing the whole list.
    """
    rows: list[dict[str, Any]] = []
    hosts = list(dict.fromkeys(record.host for record in records))
    for host in hosts:
        try:
            live = {row["job_id"]: row for row in client_for(host).status()}
            problem = None
        except RemoteMagicError as exc:
            live, problem = {}, str(exc)
        for record in (r for r in records if r.host == host):
            row = live.get(record.job_id)
            if row is None:
                row = {
                    "job_id": record.job_id,
                    "name": record.name,
                    "state": protocol.STATE_UNREACHABLE if problem else protocol.STATE_GONE,
                    "message": problem or "no longer on the host (collected)",
                    "submitted": record.submitted,
                }
            rows.append({**row, "host": host, "notebook": record.notebook, "registered": record.submitted})
    return sorted(rows, key=lambda row: row["registered"])  # oldest first, as submitted


def describe_injection(names: list[str]) -> str:
    return ", ".join(names) if names else "nothing"


class Panel(Protocol):
    """What the lifecycle needs of a panel (ui.panel.TextPanel and WidgetPanel)."""

    view: Any

    def handle(self, event: dict[str, Any]) -> None: ...

    def note(self, text: str) -> None: ...

    def finish(self) -> None: ...

    def set_actions(self, on_stop: Callable[[], Any] | None, on_detach: Callable[[], Any] | None) -> None: ...


class JobLifecycle:
    """Follows jobs into panels and injects their outputs: blocking, after a detach, after an interrupt.

    ``inject`` puts values into the user's namespace.  The first interrupt
    (or the Stop button) asks the host to stop after the current batch and
    still returns the partly trained outputs; a second interrupt cancels and
    injects the last checkpoint.  Detach returns at once and follows in the
    background.
    """

    def __init__(self, inject: Callable[[dict[str, Any]], None], hints: Hints, cache_limit: int | None = None) -> None:
        self.inject = inject
        self.hints = hints
        self.reconnect_timeout = RECONNECT_TIMEOUT
        self.cache_limit = cache_limit
        self.background: list[BackgroundFollower] = []

    def _cache(self) -> BlobCache:
        return BlobCache(limit=self.cache_limit)

    def run(self, client: AgentClient, job_id: str, panel: Panel, inject: bool = True) -> None:
        """Show the job until it ends (or is detached), then inject its outputs."""
        detach = threading.Event()
        panel.set_actions(on_stop=lambda: client.stop(job_id), on_detach=detach.set)

        def follow_from(from_seq: int) -> dict[str, Any] | None:
            return follow(
                client, job_id, panel.handle, from_seq=from_seq, reconnect_timeout=self.reconnect_timeout,
                on_reconnecting=lambda reason: panel.note(f"reconnecting: {reason}"),
                keep_going=lambda: not detach.is_set(), hints=self.hints,
            )  # fmt: skip

        try:
            final = follow_from(0)
        except KeyboardInterrupt:
            try:
                panel.note("interrupted: the host stops training after the current batch (interrupt again to cancel)")
                client.stop(job_id)
                final = follow_from(panel.view.next_seq)
            except KeyboardInterrupt:
                self.cancel_and_fall_back_to_checkpoint(client, job_id, panel)
                return
        if final is None:
            panel.note("detached: the job runs on; this panel keeps updating while the kernel is idle")
            self.follow_in_background(client, job_id, panel, inject, from_seq=panel.view.next_seq)
            return
        try:
            self.end_job(client, job_id, panel, final, inject)
        finally:
            panel.finish()

    def cancel_and_fall_back_to_checkpoint(self, client: AgentClient, job_id: str, panel: Panel) -> None:
        """A second interrupt: kill the job, and inject the model of its last checkpoint if it has one."""
        try:
            client.cancel(job_id)
            try:
                values, meta = fetch_checkpoint(client, job_id)
            except RemoteMagicError:
                panel.note(f"job {job_id} cancelled; it had no checkpoint, nothing was injected")
                raise KeyboardInterrupt from None
            self.inject(values)
            panel.note(
                f"job {job_id} cancelled; injected {', '.join(values)} from the checkpoint of epoch "
                f"{meta['epoch']} of {meta.get('epochs') or '?'}"
            )
        finally:
            panel.finish()

    def end_job(self, client: AgentClient, job_id: str, panel: Panel, final: dict[str, Any], inject: bool) -> None:
        raise_for_final(final, job_id, client.host, self.hints)
        if final.get("stopped"):
            panel.note(f"stopped at epoch {panel.view.epoch} of {panel.view.epochs or '?'}")
        if not inject:
            panel.note(f"finished; outputs not injected, as asked: {self.hints.attach(job_id, client.host)}")
            return
        values = fetch_outputs(client, job_id, final, self._cache())
        self.inject(values)
        panel.note(f"injected: {describe_injection(list(values))}")

    def follow_in_background(
        self, client: AgentClient, job_id: str, panel: Panel, inject: bool, from_seq: int = 0
    ) -> BackgroundFollower:
        """Keep the panel live while the kernel is idle; inject the outputs when the job ends."""

        def on_end(final: dict[str, Any]) -> None:
            try:
                self.end_job(client, job_id, panel, final, inject)
            except Exception as exc:  # noqa: BLE001  (shown in the panel: there is no cell to raise into)
                panel.note(f"{type(exc).__name__}: {exc}")
            finally:
                panel.finish()

        def on_error(exc: BaseException) -> None:
            panel.note(f"stopped following job {job_id}: {type(exc).__name__}: {exc}")
            panel.finish()

        follower = BackgroundFollower(
            client, job_id, panel.handle, on_end, on_error, from_seq=from_seq,
            reconnect_timeout=self.reconnect_timeout, hints=self.hints,
        )  # fmt: skip
        panel.set_actions(on_stop=lambda: client.stop(job_id), on_detach=None)
        self.background.append(follower)
        follower.start()
        return follower

    def stop_background(self, timeout: float = 5.0) -> None:
        """Stop following detached jobs (they run on); used when the extension unloads."""
        for follower in self.background:
            follower.stop()
        for follower in self.background:
            follower.join(timeout)
        self.background.clear()
