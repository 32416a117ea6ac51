"""Sweeps: one cell run once per set of parameters, each trial an ordinary job, ranked by one metric.

The grid is a kernel variable.  Each trial is the cell with its parameters
bound, submitted with ``sweep`` in its spec, so the host runs at most
``parallel`` trials of the sweep at once (agent/dispatch.py), with or without
a client connected.  Following is one thread per trial (``BackgroundFollower``
around ``session.follow``), each feeding the trial's ``JobView``; the
``Sweep`` object is what the user gets back.  No widgets here and no IPython:
a panel is anything with ``trial_event``, ``note``, ``set_actions`` and
``finish`` (ui/sweep_panel.py).
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import json
import math
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import session
from .agent import protocol
from .errors import RemoteMagicError
from .registry import Registry
from .session.job_view import JobView
from .wire import upload
from .wire.client import AgentClient

MODES = ("min", "max")
# Metric names where higher is better (matched inside the name, after any val_ prefix); the rest are minimised.
_HIGHER_IS_BETTER = ("acc", "auc", "precision", "recall", "f1", "iou", "dice", "r2", "score", "map")
# After a second interrupt cancels every trial, their final events are awaited this long.
CANCEL_WAIT_SECONDS = 15.0


class SweepError(ValueError):
    """A grid or a sweep option that cannot make a sweep; the message names it and says what works."""


def expand_grid(name: str, grid: object) -> list[dict[str, Any]]:
    """The trials' parameters: a dict of lists is their full product, a list of dicts is the trials themselves."""
    shape = (
        f"--sweep {name}: give a dict of lists (every combination: {{'lr': [0.01, 0.1], 'units': [8, 16]}}) "
        "or a list of dicts (one per trial: [{'lr': 0.01}, {'lr': 0.1, 'units': 32}])"
    )
    if isinstance(grid, dict):
        if not grid:
            raise SweepError(f"{shape}; {name} is an empty dict")
        _check_names(name, grid)
        values = []
        for key, options in grid.items():
            if not isinstance(options, list | tuple | range) or not options:
                raise SweepError(f"{shape}; {name}[{key!r}] is {_kind(options)}, not a non-empty list of values")
            values.append(list(options))
        return [dict(zip(grid, combination, strict=True)) for combination in itertools.product(*values)]
    if isinstance(grid, list | tuple) and grid:
        trials = []
        for number, trial in enumerate(grid):
            if not isinstance(trial, dict):
                raise SweepError(f"{shape}; {name}[{number}] is {_kind(trial)}, not a dict of parameters")
            _check_names(f"{name}[{number}]", trial)
            trials.append(dict(trial))
        return trials
    raise SweepError(f"{shape}; {name} is {_kind(grid)}")


def _check_names(where: str, params: dict[Any, Any]) -> None:
    bad = [key for key in params if not (isinstance(key, str) and key.isidentifier())]
    if bad:
        raise SweepError(
            f"--sweep: the keys of {where} are the names the cell reads, so each must be a variable name; "
            f"not one: {', '.join(map(repr, bad))}"
        )


def _kind(value: object) -> str:
    if isinstance(value, list | tuple | dict) and not value:
        return f"an empty {type(value).__name__}"
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def new_sweep_id() -> str:
    """``sweep-YYYYmmdd-HHMMSS-xxxxxx``, minted here: the sweep exists before any of its trials does."""
    sweep_id = f"sweep-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    assert protocol.is_sweep_id(sweep_id)
    return sweep_id


def default_metric(names: Iterable[str]) -> str | None:
    """The first validation metric (val_loss when there is one), else loss, else the first metric at all."""
    names = list(names)
    validation = [n for n in names if n.startswith("val_")]
    for choice in (["val_loss"] if "val_loss" in names else [], validation, ["loss"] if "loss" in names else [], names):
        if choice:
            return choice[0]
    return None


def default_mode(metric: str | None) -> str:
    """``max`` for accuracy-like names (accuracy, auc, f1, ...), ``min`` for losses and errors."""
    base = (metric or "").lower().removeprefix("val_")
    return "max" if any(word in base for word in _HIGHER_IS_BETTER) else "min"


def describe_params(params: dict[str, Any]) -> str:
    """``lr=0.01, units=8``: a trial as the panel and the job's name show it."""
    return ", ".join(f"{key}={value!r}" for key, value in params.items())


def json_params(params: dict[str, Any]) -> dict[str, Any]:
    """The parameters as the spec and the registry store them: JSON values as they are, anything else as its repr.

    The values themselves travel pickled with the trial's inputs; this copy
    is for listings and for rebuilding the sweep after a kernel restart.
    """
    shown: dict[str, Any] = {}
    for key, value in params.items():
        try:
            json.dumps(value, allow_nan=False)
            shown[key] = value
        except (TypeError, ValueError):
            shown[key] = repr(value)
    return shown


@dataclass
class Trial:
    """One trial: its parameters, its job, and everything its events said (``view``)."""

    number: int
    params: dict[str, Any]
    job_id: str = ""
    view: JobView = field(default_factory=lambda: JobView(""))
    gpus: list[int] = field(default_factory=list)  # the GPUs it holds, from its started event
    final: dict[str, Any] | None = None  # its terminal event
    follow_error: str | None = None  # following it failed (the job may run on)
    outputs: dict[str, Any] | None = None  # loaded on demand, then kept

    @property
    def label(self) -> str:
        return describe_params(self.params)

    @property
    def state(self) -> str:
        return self.view.state

    @property
    def ended(self) -> bool:
        return self.final is not None or self.follow_error is not None

    @property
    def error(self) -> str | None:
        return self.view.error or self.follow_error

    def apply(self, event: dict[str, Any]) -> None:
        self.view.apply(event)
        if event["type"] == protocol.STARTED:
            self.gpus = list((event.get("device") or {}).get("indices") or [])
        elif event["type"] in protocol.TERMINAL:
            self.final = event

    def curve(self, metric: str | None) -> list[tuple[int, float]]:
        """(epoch, value) of ``metric``, finite values only."""
        points = []
        for row in self.view.rows:
            value = row["logs"].get(metric) if metric else None
            if isinstance(value, int | float) and math.isfinite(value):
                points.append((row["epoch"], float(value)))
        return points

    def last(self, metric: str | None) -> float | None:
        """The metric's last value: what ranks the trial (the outputs are the model of its last epoch)."""
        points = self.curve(metric)
        return points[-1][1] if points else None

    def best(self, metric: str | None, mode: str) -> float | None:
        values = [value for _, value in self.curve(metric)]
        return (min if mode == "min" else max)(values) if values else None


class Sweep:
    """A sweep's trials and how they rank; injected as ``sweep`` (``--as NAME``) when the sweep ends.

    ``results``: one row per trial (a pandas DataFrame when pandas is
    installed, else a list of dicts): its parameters, the last value of every
    metric, the best value of the sweep's metric, state, epochs, seconds, job
    id and error.  ``best()`` and ``load(i)`` bring a trial's outputs back as
    a dict of name -> value (``{"model": ..., "history": ...}``), fetched
    when first asked and kept.  Trials rank by the metric's last value: the
    outputs are what the cell held at its end.
    """

    def __init__(
        self,
        sweep_id: str,
        host: str,
        trials: list[Trial],
        metric: str | None = None,
        mode: str | None = None,
        parallel: int | None = None,
        name: str | None = None,
        loader: Callable[[Trial], dict[str, Any]] | None = None,
    ) -> None:
        self.id, self.host, self.trials = sweep_id, host, trials
        self.parallel, self.name = parallel, name
        self._metric, self._mode = metric, mode
        self._loader = loader
        self.lock = threading.RLock()  # followers apply events while a panel draws

    @property
    def metric(self) -> str | None:
        """As given by --metric, else the first validation metric any trial logged."""
        return self._metric or default_metric(self.metric_names())

    @property
    def mode(self) -> str:
        return self._mode or default_mode(self.metric)

    def metric_names(self) -> list[str]:
        names: list[str] = []
        for trial in self.trials:
            names += [n for n in trial.view.metric_names() if n not in names]
        return names

    def ranked(self) -> list[Trial]:
        """Best first by the metric's last value; trials without it after them, in trial order."""
        metric, sign = self.metric, 1 if self.mode == "min" else -1
        with self.lock:
            scored = [(t.last(metric), t) for t in self.trials]
        with_value = sorted((p for p in scored if p[0] is not None), key=lambda p: (sign * p[0], p[1].number))
        return [t for _, t in with_value] + [t for value, t in scored if value is None]

    @property
    def ended(self) -> bool:
        return all(trial.ended for trial in self.trials)

    def counts(self) -> dict[str, int]:
        """How many trials are in each state, in the order states come."""
        found: dict[str, int] = {}
        for trial in self.trials:
            found[trial.state] = found.get(trial.state, 0) + 1
        return found

    # ------------------------------------------------------------ for the user
    @property
    def results(self) -> Any:
        """One row per trial, in trial order (a DataFrame when pandas is installed)."""
        rows = self.rows()
        if importlib.util.find_spec("pandas") is not None:
            import pandas

            return pandas.DataFrame(rows)
        return rows

    def rows(self) -> list[dict[str, Any]]:
        metric, mode = self.metric, self.mode
        names = self.metric_names()
        rows = []
        with self.lock:
            for trial in self.trials:
                view = trial.view
                last = {name: _last_value(view, name) for name in names}
                rows.append(
                    {
                        "trial": trial.number,
                        **trial.params,
                        **last,
                        **({f"best_{metric}": trial.best(metric, mode)} if metric else {}),
                        "state": trial.state,
                        "epochs": view.epoch,
                        "seconds": round(view.elapsed, 3) if view.elapsed is not None else None,
                        "job_id": trial.job_id,
                        "error": trial.error,
                    }
                )
        return rows

    def best_trial(self) -> Trial:
        ranked = [t for t in self.ranked() if t.last(self.metric) is not None]
        if not ranked:
            raise RemoteMagicError(
                f"no trial of {self.id} logged {self.metric or 'a metric'} yet, so none is best; "
                f"`{self.name or 'sweep'}.load(i)` brings back trial i"
            )
        return ranked[0]

    def best(self) -> dict[str, Any]:
        """The outputs of the best trial by the metric, as a dict (even when the trial brought back one name)."""
        return self.load(self.best_trial().number)

    def load(self, trial: int) -> dict[str, Any]:
        """The outputs of trial ``trial`` (its number in ``results``), as a dict; fetched once, then kept."""
        chosen = next((t for t in self.trials if t.number == trial), None)
        if chosen is None:
            raise IndexError(f"{self.id} has trials {', '.join(str(t.number) for t in self.trials)}, not {trial}")
        with self.lock:
            if chosen.outputs is not None:
                return chosen.outputs
            if chosen.final is None:
                raise RemoteMagicError(
                    f"trial {trial} ({chosen.label}) of {self.id} has not ended (state: {chosen.state}); "
                    "its outputs can be loaded once it ends"
                )
        if self._loader is None:
            raise RemoteMagicError(f"this copy of {self.id} cannot reach host {self.host}")
        outputs = self._loader(chosen)
        with self.lock:
            chosen.outputs = outputs
        return outputs

    def summary(self) -> str:
        """``6 trials: 5 done, 1 error; best: trial 2 (lr=0.01, units=8), val_loss 0.4123``"""
        states = ", ".join(f"{count} {state}" for state, count in self.counts().items())
        line = f"{len(self.trials)} trials: {states}"
        try:
            best = self.best_trial()
        except RemoteMagicError:
            return line
        return f"{line}; best: trial {best.number} ({best.label}), {self.metric} {best.last(self.metric):.4f}"

    def __repr__(self) -> str:
        return f"<Sweep {self.id} on host {self.host}: {self.summary()}>"


def _last_value(view: JobView, name: str) -> float | None:
    for row in reversed(view.rows):
        if name in row["logs"]:
            return row["logs"][name]
    return None


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
            submission.name = f"{job_name or 'sweep'} #{trial.number}: {trial.label}"[:120]
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
        self.lifecycle.inject(values)
        shown = session.describe_injection(list(values))
        self.panel.note(f"injected trial {trial.number} ({trial.label}): {shown}")

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
                self.lifecycle.inject({self.name: self.sweep})
                self.panel.note(
                    f"injected: {self.name} ({self.sweep.summary()}); "
                    f"{self.name}.best() brings back the best trial's outputs"
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
