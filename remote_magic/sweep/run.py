"""A sweep's trials as jobs: submitted together (``submit_trials``), then followed into one panel (``SweepRun``).

Each trial is the cell with its parameters bound, submitted with ``sweep`` in
its spec, so the host runs at most ``parallel`` trials of the sweep at once,
with or without a client connected.  Following is one thread per trial
(``BackgroundFollower`` around ``session.follow``), each feeding the trial's
``JobView``.  No widgets here and no IPython: a panel is anything with
``trial_event``, ``note``, ``set_actions`` and ``finish`` (ui/sweep_panel.py).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from .. import session
from ..agent import protocol
from ..errors import RemoteMagicError
from ..registry import Registry
from ..session.job_view import JobView
from ..wire import upload
from ..wire.client import AgentClient
from .trials import Sweep, Trial, json_params

# After a second interrupt cancels every trial, their final events are awaited this long.
CANCEL_WAIT_SECONDS = 15.0


def submit_trials(
    client: AgentClient,
    sweep: Sweep,
    submissions: list[session.Submission],
    registry: Registry,
    job_name: str | None = None,
    notebook: str | None = None,
    progress: upload.Progress | None = None,
    say: Callable[[str], None] = print,
) -> None:
    """Submit every trial at once (the host keeps to ``sweep.parallel``), each recorded as it goes.

    Half a sweep is not what was asked: a failure cancels the trials already submitted, and ``say`` tells so.
    """
    submitted: list[str] = []
    try:
        for trial, submission in zip(sweep.trials, submissions, strict=True):
            submission.sweep = {
                "id": sweep.id,
                "trial": trial.number,
                "trials": len(sweep.trials),
                "parallel": sweep.parallel,
                "params": json_params(trial.params),
            }
            given = {"metric": sweep._metric, "mode": sweep._mode, "name": job_name}
            submission.sweep.update({k: v for k, v in given.items() if v})  # the sidebar ranks by them too
            # Unnamed, the grid and start time tell this sweep's jobs from another's (the sidebar titles by them).
            submission.name = f"{job_name or sweep.title()} #{trial.number}: {trial.label}"[:120]
            trial.job_id = session.submit(client, submission, progress=progress)
            submitted.append(trial.job_id)
            trial.view = JobView(client.host, job_id=trial.job_id, name=submission.name)
            record = {**submission.sweep, **given, "name": sweep.name}
            registry.add(client.host, trial.job_id, submission.name, notebook, sweep=record)
    except BaseException:
        for job_id in submitted:
            with contextlib.suppress(RemoteMagicError):
                client.cancel(job_id)
        if submitted:
            say(f"sweep {sweep.id}: the {len(submitted)} trials submitted before this failure were cancelled")
        raise


Action = Callable[[], Any] | None  # what a button does (None: the button is off)
Pick = Callable[["Trial"], Any] | None  # what a click on a trial's row does


def _namespace(lifecycle: Any) -> dict[str, Any]:
    """The kernel's namespace behind the lifecycle's injector, to say which names a click replaces ({} if unknown)."""
    names = getattr(getattr(lifecycle.inject, "shell", None), "user_ns", None)
    return names if isinstance(names, dict) else {}


class SweepPanel(Protocol):
    """What following a sweep needs of its panel (ui.sweep_panel)."""

    def trial_event(self, trial: Trial, event: dict[str, Any]) -> None: ...

    def note(self, text: str) -> None: ...

    def set_actions(self, on_stop: Action, on_detach: Action, on_pick: Pick) -> None: ...

    def finish(self) -> None: ...


class SweepRun:
    """Follows every trial of a sweep into one panel, then injects the sweep object.

    One thread per trial follows its events.  Blocking (``wait``), the cell
    returns when every trial ended; Detach (or ``--detach``) leaves the
    threads running and the last one to see its trial end injects.  The
    first interrupt, or Stop, stops every trial gracefully (queued ones
    leave the queue first, so none starts in a freed place); a second
    interrupt cancels them.  A failed trial only fails its row.
    """

    def __init__(
        self,
        client: AgentClient,
        sweep: Sweep,
        panel: SweepPanel,
        lifecycle: session.JobLifecycle,
        inject: bool = True,
    ) -> None:
        self.client, self.sweep, self.panel, self.lifecycle = client, sweep, panel, lifecycle
        self.inject = inject
        self.stopping = False
        self._lock = threading.Lock()
        self._detached = False
        self._detach = threading.Event()
        self._all_ended = threading.Event()
        self._left = 0  # trials still followed
        sweep._loader = self._load

    @property
    def name(self) -> str:
        return self.sweep.name or "sweep"

    def start(self, detached: bool = False) -> None:
        """Start following every trial that has not ended; ``detached``: nobody waits, the last thread injects."""
        self._detached = detached
        self.panel.set_actions(self.stop, None if detached else self.detach, self.pick)
        waiting = [trial for trial in self.sweep.trials if not trial.ended]
        self._left = len(waiting)
        if not waiting:
            self._all_ended.set()
            if detached:
                self._finish()
            return
        for trial in waiting:
            follower = session.BackgroundFollower(
                self.client,
                trial.job_id,
                lambda event, trial=trial: self._on_event(trial, event),
                lambda _final: self._trial_ended(),
                lambda exc, trial=trial: self._on_error(trial, exc),
                reconnect_timeout=self.lifecycle.reconnect_timeout,
                hints=self.lifecycle.hints,
            )
            self.lifecycle.background.append(follower)  # stop_background() ends the following, not the trials
            follower.start()

    def wait(self) -> None:
        """Block until every trial ended or the panel's Detach; an interrupt stops the trials, a second cancels them."""
        try:
            self._wait_for_the_end()
        except KeyboardInterrupt:
            try:
                self.panel.note(
                    "interrupted: every trial stops after its current batch and queued trials do not start "
                    "(interrupt again to cancel them all)"
                )
                self.stop()
                self._wait_for_the_end()
            except KeyboardInterrupt:
                self.cancel()
                self._wait_for_the_end(CANCEL_WAIT_SECONDS)
        with self._lock:
            detached = self._detached
        if detached:
            self.panel.note("detached: the trials run on; this panel keeps updating while the kernel is idle")
            return
        self._finish()

    def _wait_for_the_end(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        # Short waits: a kernel interrupt lands between them.
        while not self._all_ended.wait(0.2):
            if self._detach.is_set() or (deadline is not None and time.monotonic() >= deadline):
                return

    # ------------------------------------------------------------ actions
    def stop(self) -> None:
        """Stop every trial that has not ended: queued ones leave the queue, running ones stop after their batch."""
        self.stopping = True
        with self.sweep.lock:
            pending = [t for t in self.sweep.trials if not t.ended]
        pending.sort(key=lambda t: t.state != protocol.STATE_QUEUED)  # queued first
        for trial in pending:
            self._ask(self.client.stop, trial)

    def cancel(self) -> None:
        with self.sweep.lock:
            pending = [t for t in self.sweep.trials if not t.ended]
        for trial in pending:
            self._ask(self.client.cancel, trial)
        self.panel.note(f"cancelled {len(pending)} trials")

    def detach(self) -> None:
        with self._lock:
            if self._all_ended.is_set():
                return  # ended meanwhile: the waiting cell injects now
            self._detached = True
        self.panel.set_actions(self.stop, None, self.pick)
        self._detach.set()

    def pick(self, trial: Trial) -> None:
        """A click on a trial's row: its outputs into the kernel's namespace."""
        try:
            values = self.sweep.load(trial.number)
        except RemoteMagicError as exc:
            self.panel.note(f"trial {trial.number}: {exc}")
            return
        who = f"trial {trial.number} ({trial.label})"
        replaced = ", ".join(name for name in values if name in _namespace(self.lifecycle))
        # Said whether the values go in now or wait for the sweep's cell to end: which trial, and what it replaces.
        waits = self.lifecycle.inject(values) is False
        for line in getattr(values, "notes", []):  # e.g. tensors that were on a GPU there are on the CPU here
            self.panel.note(line)
        if waits:
            then = f", replacing the kernel's {replaced}" if replaced else ""
            self.panel.note(
                f"{who} outputs ready: {', '.join(values)}; they enter the namespace when the running cell ends{then}"
            )
            return
        shown = session.describe_injection(list(values), (trial.final or {}).get("why"))
        effect = f"replaced the kernel's {replaced}" if replaced else "new names in the kernel"
        self.panel.note(f"injected {who}: {shown} ({effect})")

    def _ask(self, action: Callable[[str], Any], trial: Trial) -> None:
        try:
            action(trial.job_id)
        except RemoteMagicError as exc:
            self.panel.note(f"trial {trial.number} ({trial.job_id}): {exc}")

    # ------------------------------------------------------------ from the followers
    def _on_event(self, trial: Trial, event: dict[str, Any]) -> None:
        with self.sweep.lock:
            trial.apply(event)
        if event["type"] == protocol.STARTED and self.stopping:
            self._ask(self.client.stop, trial)  # it left the queue as the stop was asked: stop it too
        self.panel.trial_event(trial, event)

    def _on_error(self, trial: Trial, exc: BaseException) -> None:
        with self.sweep.lock:
            trial.follow_error = f"stopped following it: {type(exc).__name__}: {exc}"
        self.panel.note(f"trial {trial.number} ({trial.job_id}): {trial.follow_error}")
        self._trial_ended()

    def _trial_ended(self) -> None:
        with self._lock:
            self._left -= 1
            if self._left > 0:
                return
            self._all_ended.set()
            finish_here = self._detached  # else the waiting cell finishes
        if finish_here:
            self._finish()

    def _finish(self) -> None:
        try:
            if self.inject:
                self.lifecycle.inject_noting(
                    {self.name: self.sweep},
                    self.panel.note,
                    f"injected: {self.name} ({self.sweep.summary()}); {self.name}.best() brings back the best trial's outputs",
                )
            else:
                later = self.lifecycle.hints.attach(self.sweep.id, self.client.host)
                self.panel.note(f"finished; {self.name} not injected, as asked: {later}")
        finally:
            self.panel.finish()

    def _load(self, trial: Trial) -> dict[str, Any]:
        assert trial.final is not None
        session.raise_for_final(trial.final, trial.job_id, self.client.host, self.lifecycle.hints)
        return session.fetch_outputs(self.client, trial.job_id, trial.final, self.lifecycle.cache())
