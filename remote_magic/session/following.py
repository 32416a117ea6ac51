"""Following a job's events to its end, across dropped links, and what its final event means.

Works on any ``AgentClient`` and knows nothing about widgets: events go to a callback.  What the
user should type to act on a job later is asked of a ``Hints`` object, so magic syntax stays with
the magics (``magic_options.MagicHints``) and the REST API can phrase it its own way.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from .. import project
from ..agent import protocol
from ..errors import ConnectionFailed, JobLost, RemoteExecutionError, RemoteMagicError
from ..wire.client import AgentClient

RECONNECT_TIMEOUT = 600.0
_BACKOFF = (0.5, 1, 2, 4, 8, 15, 30)


class Hints(Protocol):
    """How the front end tells the user to act on a job later (a magic, a button, a URL)."""

    def attach(self, job_id: str, host: str) -> str:
        """How to follow the job again and get its outputs."""

    def detail(self, job_id: str, host: str) -> str:
        """How to see the job's last output and error."""

    def checkpoint(self, job_id: str, host: str) -> str:
        """How to get the model of the job's last checkpoint."""

    def fetch(self, job_id: str, host: str, patterns: list[str]) -> str:
        """How to bring the job's files back later."""


class PlainHints:
    """Hints without any front end's syntax."""

    def attach(self, job_id: str, host: str) -> str:
        return f"attach job {job_id} on host {host} again to follow it and fetch its outputs"

    def detail(self, job_id: str, host: str) -> str:
        return f"the status of job {job_id} on host {host} shows its last output"

    def checkpoint(self, job_id: str, host: str) -> str:
        return f"the checkpoint of job {job_id} on host {host} holds the model of its last checkpointed epoch"

    def fetch(self, job_id: str, host: str, patterns: list[str]) -> str:
        return f"the files stay with job {job_id} on host {host} until it is collected"


class _Backoff:
    """Waits between reconnects, longer each time, until ``timeout`` seconds pass without an event."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.failures = 0
        self.give_up_at: float | None = None

    def reset(self) -> None:
        """An event arrived: the link works again."""
        self.failures, self.give_up_at = 0, None

    def expired(self) -> bool:
        now = time.monotonic()
        self.give_up_at = self.give_up_at or now + self.timeout
        return now >= self.give_up_at

    def wait(self) -> None:
        left = max(0.0, (self.give_up_at or 0.0) - time.monotonic())
        time.sleep(min(_BACKOFF[min(self.failures, len(_BACKOFF) - 1)], left))
        self.failures += 1


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
    backoff = _Backoff(reconnect_timeout)

    def stopped() -> bool:
        return keep_going is not None and not keep_going()

    while True:
        try:
            with client.attach(job_id, next_seq) as events:
                for event in events:
                    if event["seq"] < next_seq:
                        continue
                    _refuse_a_newer_schema(event, job_id)
                    next_seq = event["seq"] + 1
                    backoff.reset()
                    on_event(event)
                    if event["type"] in protocol.TERMINAL:
                        return event
                    if stopped():
                        return None
        except ConnectionFailed as exc:
            reason = str(exc)
        else:
            reason = f"the connection to host {client.host} dropped"
        if stopped():
            return None
        if backoff.expired():
            later = (hints or PlainHints()).attach(job_id, client.host)
            raise ConnectionFailed(
                f"{reason}; gave up reconnecting after {reconnect_timeout:.0f} s. The job keeps running: {later}"
            )
        if on_reconnecting is not None:
            on_reconnecting(reason)
        backoff.wait()


def _refuse_a_newer_schema(event: dict[str, Any], job_id: str) -> None:
    problem = protocol.newer_schema_problem(event.get("schema"), job_id)
    if problem:
        raise RemoteMagicError(problem)


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


def missing_module_hint(module: str) -> str:
    """What to do when the host lacks a module: ship it when it is local here, else install it there."""
    origin = project.local_origin(module)
    if origin:
        return (
            f"module {module!r} is {origin} here, and it was not sent: add `--modules {module.split('.')[0]}` "
            "to the cell (or set c.RemoteMagics.ship_modules = 'auto')"
        )
    return f"module {module!r} is not installed on the host: install it there, or run the cell with `--env auto`"


def raise_for_final(final: dict[str, Any], job_id: str, host: str, hints: Hints | None = None) -> None:
    """Raise what a job that did not finish means for the user; return when it did (outputs to fetch)."""
    hints = hints or PlainHints()
    kind = final["type"]
    if kind == protocol.ERROR:
        missing = final.get("missing_module")
        raise RemoteExecutionError(
            final.get("message", ""),
            final.get("traceback", ""),
            final.get("exc_type", ""),
            final.get("cell_line"),
            hint=missing_module_hint(missing) if missing else "",
        )
    if kind == protocol.CANCELLED:
        raise RemoteMagicError(f"job {job_id} on host {host} was cancelled; nothing was injected")
    if kind == protocol.LOST:
        raise JobLost(
            f"job {job_id} on host {host} ended without finishing ({final.get('message')}); "
            f"{hints.detail(job_id, host)}, and {hints.checkpoint(job_id, host)}"
        )


# Why a name came back (the host's ``why``), as the panel says it.
_WHY = {"assigned": "assigned", "changed": "changed by the cell", "shared": "held by what came back", "--out": "--out"}


def describe_injection(names: list[str], why: dict[str, str] | None = None) -> str:
    """The names injected, grouped by why each came back: ``history (assigned); model (changed by the cell)``."""
    if not names:
        return "nothing"
    if not why:
        return ", ".join(names)
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(why.get(name, "assigned"), []).append(name)
    return "; ".join(f"{', '.join(group)} ({_WHY.get(reason, reason)})" for reason, group in groups.items())


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
