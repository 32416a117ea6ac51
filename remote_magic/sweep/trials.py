"""A sweep's trials and how they rank: the grid expanded, each trial's events, the ``Sweep`` the user gets back.

No connection here: ``run`` submits and follows the trials, ``find`` finds a
sweep submitted earlier.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..agent import protocol
from ..errors import RemoteMagicError
from ..session.job_view import JobView

MODES = ("min", "max")
# Metric names where higher is better (matched inside the name, after any val_ prefix); the rest are minimised.
_HIGHER_IS_BETTER = ("acc", "auc", "precision", "recall", "f1", "iou", "dice", "r2", "score", "map")


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


def short_value(value: Any, width: int = 12) -> str:
    """A parameter's value in a table cell or a legend: floats to 3 significant digits, long reprs cut."""
    text = f"{value:.3g}" if isinstance(value, float) else repr(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def short_params(params: dict[str, Any], width: int = 40) -> str:
    """``lr=0.01 units=8``: a trial's parameters short enough for a chart's legend."""
    text = " ".join(f"{key}={short_value(value)}" for key, value in params.items())
    return text if len(text) <= width else text[: width - 1] + "…"


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
        return self.direction(self.metric)

    def direction(self, metric: str | None) -> str:
        """``min`` or ``max`` for ``metric``: as given by --mode, else by its name (before the metric is known too)."""
        return self._mode or default_mode(metric)

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

    def title(self) -> str:
        """``sweep lr × units · 6 trials · 14:05``: tells two sweeps of one notebook apart (their ids do not, at a glance)."""
        names = list(dict.fromkeys(key for trial in self.trials for key in trial.params))
        parts = [
            f"{self.name or 'sweep'} {' × '.join(names)}".rstrip(),
            f"{len(self.trials)} trial{'' if len(self.trials) == 1 else 's'}",
        ]
        stamp = self.id.split("-")[2:3]  # sweep-YYYYmmdd-HHMMSS-xxxxxx: minted when the sweep was submitted
        if stamp and len(stamp[0]) == 6 and stamp[0].isdigit():
            parts.append(f"{stamp[0][:2]}:{stamp[0][2:4]}")
        return " · ".join(parts)

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


def new_sweep(
    host: str,
    grid: list[dict[str, Any]],
    parallel: int | None,
    metric: str | None = None,
    mode: str | None = None,
    name: str | None = None,
) -> Sweep:
    """A sweep about to be submitted: a fresh id, one trial per set of parameters of ``grid``."""
    trials = [Trial(number, params) for number, params in enumerate(grid)]
    return Sweep(new_sweep_id(), host, trials, metric, mode, parallel, name)
