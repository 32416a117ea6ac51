"""A sweep submitted earlier, found again by its id: in this machine's registry, else on its host.

What ``%remote_attach``, ``%remote_status`` and ``%remote_cancel`` do with a
sweep's id (after a kernel restart the ``Sweep`` object is gone; its trials
are ordinary jobs that remember which sweep they belong to).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..registry import Registry
from ..session.job_view import JobView
from ..wire.client import AgentClient
from .trials import Sweep, SweepError, Trial


@dataclass(frozen=True)
class FoundTrial:
    """One trial as its job recorded it."""

    number: int
    params: dict[str, Any] | None  # as recorded: JSON values, reprs of the others
    job_id: str
    name: str | None


@dataclass(frozen=True)
class FoundSweep:
    """A sweep's host, its trials in order, and what it was run with (metric, mode, parallel, name)."""

    id: str
    client: AgentClient
    trials: list[FoundTrial]
    meta: dict[str, Any]

    @property
    def job_ids(self) -> list[str]:
        return [trial.job_id for trial in self.trials]

    def sweep(self, name: str | None = None) -> Sweep:
        """The ``Sweep`` object again (injected as ``name``, else as first named), its trials not yet followed."""
        host, meta = self.client.host, self.meta
        trials = [
            Trial(found.number, dict(found.params or {}), found.job_id, JobView(host, found.job_id, found.name))
            for found in self.trials
        ]
        return Sweep(
            self.id, host, trials, meta.get("metric"), meta.get("mode"), meta.get("parallel"), name or meta.get("name")
        )


def find_sweep(
    sweep_id: str, host: str | None, registry: Registry, connect: Callable[[str], AgentClient], magic: str
) -> FoundSweep:
    """From the registry when this machine submitted the sweep, else (with ``host``) from the host's status rows.

    ``magic`` is the command that asked, named in the hint when the sweep is not found here.
    """
    records = registry.sweep(sweep_id)
    if not records and not host:
        raise SweepError(
            f"sweep {sweep_id} was not submitted from this machine (it is not in {registry.path}); "
            f"`%{magic} {sweep_id} --host HOST` finds its trials on the host"
        )
    client = connect(host or records[0].host)
    found = [FoundTrial(r.sweep["trial"], r.sweep.get("params"), r.job_id, r.name) for r in records if r.sweep]
    meta = (records[0].sweep or {}) if records else {}
    if not found:  # submitted elsewhere: the host's status rows say which jobs are its trials
        rows = [row for row in client.status() if (row.get("sweep") or {}).get("id") == sweep_id]
        found = [FoundTrial(r["sweep"]["trial"], r["sweep"].get("params"), r["job_id"], r.get("name")) for r in rows]
        meta = rows[0]["sweep"] if rows else {}
    if not found:
        raise SweepError(f"host {client.host} has no trial of sweep {sweep_id} (collected by %remote_gc?)")
    return FoundSweep(sweep_id, client, sorted(found, key=lambda trial: trial.number), meta)
