"""A job's life in a panel: blocking until it ends, stopped by an interrupt, detached into the background.

The escalation follows a local ``fit``: the first interrupt (or the Stop button) asks the host to
stop after the current batch and still returns the partly trained outputs; a second one cancels
and injects the last checkpoint.  A panel is anything with the few methods of ``Panel``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol

from ..errors import RemoteMagicError
from ..wire.cache import BlobCache
from ..wire.client import AgentClient
from .fetch import FileFetch, fetch_checkpoint, fetch_files, fetch_outputs, shown_progress
from .following import RECONNECT_TIMEOUT, BackgroundFollower, Hints, describe_injection, follow, raise_for_final


class Panel(Protocol):
    """What the lifecycle needs of a panel (ui.panel.TextPanel and WidgetPanel)."""

    view: Any

    def handle(self, event: dict[str, Any]) -> None: ...

    def note(self, text: str) -> None: ...

    def finish(self) -> None: ...

    def progress(self, text: str) -> None: ...

    def set_actions(self, on_stop: Callable[[], Any] | None, on_detach: Callable[[], Any] | None) -> None: ...


class JobLifecycle:
    """Follows jobs into panels and injects their outputs: blocking, after a detach, after an interrupt.

    ``inject`` puts values into the user's namespace (``injection.Injector``); it returns False when
    they wait for the running cell to end, and the panel says so.  Detach returns at
    once and follows in the background, for as long as the kernel lives.
    """

    def __init__(
        self, inject: Callable[[dict[str, Any]], bool | None], hints: Hints, cache_limit: int | None = None
    ) -> None:
        self.inject = inject
        self.hints = hints
        self.reconnect_timeout = RECONNECT_TIMEOUT
        self.cache_limit = cache_limit
        self.background: list[BackgroundFollower] = []

    def cache(self) -> BlobCache:
        return BlobCache(limit=self.cache_limit)

    def run(
        self, client: AgentClient, job_id: str, panel: Panel, inject: bool = True, fetch: FileFetch | None = None
    ) -> None:
        """Show the job until it ends (or is detached), then inject its outputs (and fetch its files)."""
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
            self.follow_in_background(client, job_id, panel, inject, from_seq=panel.view.next_seq, fetch=fetch)
            return
        try:
            self.end_job(client, job_id, panel, final, inject, fetch)
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
            self.inject(values)  # in the blocking cell itself: it goes in now
            for note in values.notes:
                panel.note(note)
            panel.note(
                f"job {job_id} cancelled; injected {', '.join(values)} from the checkpoint of epoch "
                f"{meta['epoch']} of {meta.get('epochs') or '?'}"
            )
        finally:
            panel.finish()

    def end_job(
        self,
        client: AgentClient,
        job_id: str,
        panel: Panel,
        final: dict[str, Any],
        inject: bool,
        fetch: FileFetch | None = None,
    ) -> None:
        """The job ended: raise what went wrong, or inject its outputs; its files come back in either case."""
        raise_for_final(final, job_id, client.host, self.hints)
        if final.get("stopped"):
            panel.note(f"stopped at {panel.view.unit} {panel.view.epoch} of {panel.view.epochs or '?'}")
        try:
            if not inject:
                panel.note(f"finished; outputs not injected, as asked: {self.hints.attach(job_id, client.host)}")
                return
            try:
                progress = shown_progress(panel.progress, "downloading outputs")
                values = fetch_outputs(client, job_id, final, self.cache(), progress)
            except KeyboardInterrupt:
                later = f"; {self.hints.fetch(job_id, client.host, fetch.patterns)}" if fetch is not None else ""
                fetch = None  # stopped: no GiBs of files either
                panel.note(
                    "interrupted while downloading the outputs: nothing was injected; the job finished and keeps "
                    f"them on the host: {self.hints.attach(job_id, client.host)}{later}"
                )
                raise
            self.inject_noting(values, panel.note, f"injected: {describe_injection(list(values), final.get('why'))}")
        finally:
            if fetch is not None:  # after the outputs: a file that cannot be fetched never costs the model
                self._fetch_into_panel(client, job_id, fetch, panel)

    def inject_noting(self, values: dict[str, Any], note: Callable[[str], None], injected: str) -> None:
        """Inject ``values`` and say so: ``injected`` when they went in now, else that they wait for the running
        cell to end (a background job's outputs never land in the middle of one); their loading notes first."""
        now = self.inject(values) is not False
        for line in getattr(values, "notes", []):  # e.g. tensors that were on a GPU there are on the CPU here
            note(line)
        note(
            injected
            if now
            else f"outputs ready: {', '.join(values)}; they enter the namespace when the running cell ends"
        )

    def _fetch_into_panel(self, client: AgentClient, job_id: str, fetch: FileFetch, panel: Panel) -> None:
        try:
            for line in fetch_files(client, job_id, fetch, self.cache()):
                panel.note(line)
        except (RemoteMagicError, OSError) as exc:
            panel.note(f"--fetch failed: {exc}; {self.hints.fetch(job_id, client.host, fetch.patterns)}")

    def follow_in_background(
        self,
        client: AgentClient,
        job_id: str,
        panel: Panel,
        inject: bool,
        from_seq: int = 0,
        fetch: FileFetch | None = None,
    ) -> BackgroundFollower:
        """Keep the panel live while the kernel is idle; inject the outputs when the job ends."""

        def on_end(final: dict[str, Any]) -> None:
            try:
                self.end_job(client, job_id, panel, final, inject, fetch)
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
