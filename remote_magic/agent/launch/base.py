"""The launcher seam itself: where a job is (``Phase``), what every launcher does (``Launcher``), and what it
does inside the job's own runner (``InJob``).

Its own module so that each launcher (local.py's runner processes, the GPU
queue, Slurm) builds on it without importing the others.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from ..callbacks import EmitFn, TrainingHooks

ENDED = "ended"


@dataclass
class Phase:
    """Where a job is, as its launcher sees it.

    ``state``: ``queued``, ``running`` or ``ended`` (the event log then says
    how).  ``word``: the launcher's own name for it.  ``reason`` and
    ``position``: why and where a queued job waits.  ``where``: the host or
    node it runs on.  ``final`` and ``message``: for a job that ended with
    no final event in its log, the state and words its launcher knows for it
    (a scheduler's cancel or time limit), instead of plain ``killed``.
    """

    state: str
    word: str
    reason: str | None = None
    position: int | None = None
    where: str | None = None
    final: str | None = None
    message: str | None = None

    @property
    def active(self) -> bool:
        return self.state != ENDED


class InJob(ABC):
    """A launcher's part inside the job's own runner (submitit's JobEnvironment): what the launcher gave the job,
    and what its signals mean there.  The runner runs every job the same way and asks this for the rest.

    ``leads``: this runner writes the job's events and outputs (a job of several tasks has one leader; the
    others run the same cell quietly).  ``restarts``: how often a scheduler requeued the job; after one, its
    training goes on from its checkpoint.
    """

    leads: bool = True
    restarts: int = 0

    def begin(self, path: str) -> bool:
        """Before anything else in the runner; False: this runner must not run the job (it was cancelled)."""
        return True

    @abstractmethod
    def gpus(self, path: str) -> list[int] | None:
        """The GPUs the job holds ([]: none), visible to the cell from here on; None where the host has none."""

    @abstractmethod
    def handle_signals(self, path: str, hooks: TrainingHooks) -> None:
        """Turn the launcher's signals (a cancel, a scheduler's warning) into what the runner does about them."""

    def started(self) -> dict[str, Any]:
        """The launcher's fields of the job's ``started`` event."""
        return {"warm": False, "warm_runner": None}

    def files_placed(self, path: str) -> None:
        """The leader placed the job's files (the other tasks may go on)."""
        return None

    def wait_for_files(self, path: str) -> bool:
        """A task that does not lead: wait until the leader placed the job's files; whether it did in time."""
        return True

    def requeued(self, reason: str, emit: EmitFn) -> None:
        """The job checkpointed and ended to come back later (``reason``): have it put back in the queue."""
        return None

    def ended(self, spec: dict[str, Any]) -> None:
        """The job's end is recorded; the runner exits after this."""
        return None


class Launcher(ABC):
    name: str

    @abstractmethod
    def start(self, root: str, agent_hash: str, path: str, spec: dict[str, Any]) -> None:
        """Start (or queue) the job in ``path``; record how, in the job folder."""

    @abstractmethod
    def poll(self, path: str, spec: dict[str, Any]) -> Phase:
        """Where the job is now."""

    @abstractmethod
    def stop(self, path: str, spec: dict[str, Any]) -> bool:
        """Ask the job to finish its current batch and return what it has; whether it was asked."""

    @abstractmethod
    def cancel(self, path: str, spec: dict[str, Any], grace: float) -> dict[str, Any]:
        """End the job and everything it started; SIGKILL (or the like) after ``grace`` seconds."""

    @abstractmethod
    def in_job(self, root: str, agent_hash: str) -> InJob:
        """This launcher's part inside a runner of its job (``agent run-job``)."""
