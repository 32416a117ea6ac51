"""The client side of a job's life: submit, follow, reattach, cancel, fetch, inject.

Works on any ``Transport``; knows nothing about widgets (a panel is anything
with ``handle(event)``) and nothing about IPython beyond a namespace dict.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from . import capture, payload
from .agent import protocol
from .cache import BlobCache
from .errors import ConnectionFailed, HostSetupError, JobLost, RemoteExecutionError, RemoteMagicError
from .transport import LOCAL_HOST, LocalTransport, SSHTransport, Transport

RECONNECT_TIMEOUT = 600.0
_BACKOFF = (0.5, 1, 2, 4, 8, 15, 30)


@dataclass
class HostSettings:
    python: str | None = None
    root: str | None = None
    ssh_config: str | None = None


HOST_SETTING_KEYS = frozenset({"python", "root"})


class Connections:
    """One transport per host for the life of a kernel (or server), reopened after a drop.

    ``hosts`` holds per-host settings as in ``c.RemoteMagics.hosts``.
    """

    def __init__(self, hosts: dict[str, dict[str, str]] | None = None, ssh_config: str | None = None) -> None:
        self.hosts = hosts or {}
        self.ssh_config = ssh_config
        self._transports: dict[tuple[str, str | None, str | None], Transport] = {}
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

    def get(self, host: str, python: str | None = None) -> Transport:
        settings = self.settings_for(host, python)
        key = (host, settings.python, settings.root)
        with self._lock:
            transport = self._transports.get(key)
            if transport is None:
                if host == LOCAL_HOST:
                    transport = LocalTransport(python=settings.python, root=settings.root)
                else:
                    transport = SSHTransport(
                        host, python=settings.python or "python3", root=settings.root, ssh_config=settings.ssh_config
                    )
                self._transports[key] = transport
            return transport

    def close(self) -> None:
        with self._lock:
            for transport in self._transports.values():
                transport.close()
            self._transports.clear()


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


def check_host(transport: Transport, submission: Submission, namespace: dict[str, Any]) -> None:
    """Refuse to send what the host cannot load: a Keras model to a host without (the same major) Keras."""
    hello = transport.hello()
    uses_keras = any(type(namespace[n]).__module__.startswith("keras") for n in submission.inputs)
    if not uses_keras:
        return
    host_keras = hello["packages"].get("keras")
    local_keras = metadata.version("keras")
    if not host_keras:
        raise HostSetupError(
            f"the cell sends a Keras model but the Python on host {transport.host} ({hello['python']}) has no keras; "
            f"install it there with `{hello['python']} -m pip install keras=={local_keras} tensorflow`"
        )
    if host_keras.split(".")[0] != local_keras.split(".")[0]:
        raise HostSetupError(
            f"host {transport.host} has keras {host_keras} but this kernel has keras {local_keras}; a model saved by "
            f"one major version may not load in the other. Install keras=={local_keras} on the host."
        )


def submit(transport: Transport, submission: Submission) -> str:
    """Upload the blobs the host lacks, create the job, return its id."""
    spec = {
        "source": submission.source,
        "name": submission.name,
        "inputs": submission.inputs,
        "outputs": submission.outputs,
        "checkpoint_every": submission.checkpoint_every,
        "warm": submission.warm,
        "blobs": submission.payload.blobs,
        "inputs_size": len(submission.payload.data),
        "client": {"python": sys.version.split()[0], "agent_schema": protocol.SCHEMA_VERSION},
    }
    request = [json.dumps(spec).encode() + b"\n", submission.payload.data]
    for _attempt in range(3):
        answer = transport.agent_json("submit", stdin=request)
        if "job_id" in answer:
            return answer["job_id"]
        missing = set(answer["missing"])
        for (digest, _), buffer in zip(submission.payload.blobs, submission.payload.buffers, strict=True):
            if digest in missing:
                transport.upload_blob(digest, buffer, submission.compress)
                missing.discard(digest)
    raise RemoteMagicError(f"host {transport.host} kept asking for the same inputs; its disk may be full")


def follow(
    transport: Transport,
    job_id: str,
    on_event: Callable[[dict[str, Any]], None],
    from_seq: int = 0,
    reconnect_timeout: float = RECONNECT_TIMEOUT,
    on_reconnecting: Callable[[str], None] | None = None,
    keep_going: Callable[[], bool] | None = None,
) -> dict[str, Any] | None:
    """Feed every event from ``from_seq`` to ``on_event`` until the job ends.

    When the link drops, reconnect with backoff and resume at the next
    event, so none is missed and none is seen twice.  Returns the final
    event, or None as soon as ``keep_going()`` says to stop following (the
    job itself runs on).
    """
    next_seq = from_seq
    failures = 0
    give_up_at: float | None = None
    while True:
        try:
            with transport.agent_stream_lines("attach", job_id, "--from", str(next_seq)) as lines:
                for line in lines:
                    event = protocol.decode_event(line)
                    if event["seq"] < next_seq:
                        continue
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
            reason = f"the connection to host {transport.host} dropped"
        if keep_going is not None and not keep_going():
            return None
        now = time.monotonic()
        give_up_at = give_up_at or now + reconnect_timeout
        if now >= give_up_at:
            raise ConnectionFailed(
                f"{reason}; gave up reconnecting after {reconnect_timeout:.0f} s. The job keeps running: "
                f"`%remote_attach {job_id} --host {transport.host}` picks it up again"
            )
        if on_reconnecting is not None:
            on_reconnecting(reason)
        time.sleep(min(_BACKOFF[min(failures, len(_BACKOFF) - 1)], max(0.0, give_up_at - now)))
        failures += 1


class BackgroundFollower(threading.Thread):
    """Follows a detached job while the kernel is free, then hands its final event on.

    Daemon thread: it never keeps a kernel alive.  ``stop()`` ends the
    following (the job runs on) at the next event.
    """

    def __init__(
        self,
        transport: Transport,
        job_id: str,
        on_event: Callable[[dict[str, Any]], None],
        on_end: Callable[[dict[str, Any]], None],
        from_seq: int = 0,
        reconnect_timeout: float = RECONNECT_TIMEOUT,
    ) -> None:
        super().__init__(name=f"remote_magic follow {job_id}", daemon=True)
        self.transport, self.job_id = transport, job_id
        self.on_event, self.on_end = on_event, on_end
        self.from_seq, self.reconnect_timeout = from_seq, reconnect_timeout
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
                self.transport,
                self.job_id,
                self.on_event,
                from_seq=self.from_seq,
                reconnect_timeout=self.reconnect_timeout,
                keep_going=lambda: not self.stopped,
            )
            if final is not None and not self.stopped:
                self.on_end(final)
        except BaseException as exc:  # noqa: BLE001  (kept for whoever looks; a thread cannot raise to the user)
            self.error = exc


def fetch_outputs(
    transport: Transport, job_id: str, done: dict[str, Any], cache: BlobCache | None = None
) -> dict[str, Any]:
    """Load the job's outputs; each blob comes from the local cache when an earlier fetch stored it."""
    data = transport.agent("cat-outputs", job_id).stdout
    buffers = [fetch_blob(transport, digest, size, cache) for digest, size in done.get("blobs", [])]
    return payload.unpack(data, buffers)


def fetch_blob(transport: Transport, digest: str, size: int, cache: BlobCache | None = None) -> bytearray:
    # The local host's blobs are on this disk already: caching them would only store them twice.
    cache = None if transport.is_local else cache or BlobCache()
    buffer = cache.get(digest, size) if cache is not None else None
    if buffer is None:
        # SSH's MAC guards the transfer and the host checks blobs a crash may have damaged, so the
        # bytes are not hashed again here; the cache checks what it reads back.
        buffer = transport.agent_download(size, "cat-blob", digest)
        if cache is not None:
            cache.put_in_background(digest, buffer)
    return buffer


def fetch_checkpoint(transport: Transport, job_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model of the job's last checkpoint, and the checkpoint's epoch information."""
    meta = status(transport, job_id).get("checkpoint")
    if not meta:
        raise RemoteMagicError(
            f"job {job_id} on host {transport.host} has no checkpoint: no Keras epoch ended "
            "(or it ran with --checkpoint-every 0)"
        )
    data = transport.agent("cat-checkpoint", job_id).stdout
    return payload.unpack(data, []), meta


def collect_garbage(transport: Transport, older_than: float, include_unfetched: bool, dry_run: bool) -> dict[str, Any]:
    args = ["gc", "--older-than", str(older_than)]
    args += ["--include-unfetched"] if include_unfetched else []
    args += ["--dry-run"] if dry_run else []
    return transport.agent_json(*args)


def raise_for_final(final: dict[str, Any], job_id: str, host: str) -> None:
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
            f"its last output is in `%remote_status {job_id} --host {host}`, and "
            f"`%remote_attach {job_id} --host {host} --checkpoint` brings back the model of its last checkpoint"
        )


def status(transport: Transport, job_id: str | None = None) -> Any:
    return transport.agent_json("status", *([job_id] if job_id else []))


def cancel(transport: Transport, job_id: str) -> dict[str, Any]:
    return transport.agent_json("cancel", job_id)


def request_stop(transport: Transport, job_id: str) -> dict[str, Any]:
    return transport.agent_json("stop", job_id)


def registered_jobs(records: list[Any], transport_for: Callable[[str], Transport]) -> list[dict[str, Any]]:
    """Live rows for the jobs in the local registry, one status call per host.

    An unreachable host gives its jobs the state ``unreachable`` instead of
    failing the whole list.
    """
    rows: list[dict[str, Any]] = []
    hosts = list(dict.fromkeys(record.host for record in records))
    for host in hosts:
        try:
            live = {row["job_id"]: row for row in status(transport_for(host))}
            problem = None
        except RemoteMagicError as exc:
            live, problem = {}, str(exc)
        for record in (r for r in records if r.host == host):
            row = live.get(record.job_id)
            if row is None:
                row = {
                    "job_id": record.job_id,
                    "name": record.name,
                    "state": "unreachable" if problem else "gone",
                    "message": problem or "no longer on the host (collected)",
                    "submitted": record.submitted,
                }
            rows.append({**row, "host": host, "notebook": record.notebook, "registered": record.submitted})
    return sorted(rows, key=lambda row: row["registered"])  # oldest first, as submitted


def describe_injection(names: list[str]) -> str:
    return ", ".join(names) if names else "nothing"
