"""The launcher seam itself: where a job is (``Phase``) and what every launcher does (``Launcher``).

Its own module so that each launcher (launcher.py's process launcher,
slurm.py) builds on it without importing the others.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

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
