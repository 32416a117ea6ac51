"""The host's environment made ready for a cell's jobs: the --env environment built, the imports checked.

Both happen before anything is uploaded; a host that could not load the job
refuses it here (``HostSetupError``), and what only differs becomes a note.
The answers are kept for the kernel's life (``EnvironmentChecks``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import HostSetupError
from ..wire.client import AgentClient
from .environment import ensure_environment, environment_report, needed_imports
from .submission import Submission

if TYPE_CHECKING:
    from ..project.envcheck import EnvReport


def build_environment(
    client: AgentClient, env: str, submission: Submission, progress: Callable[[str], None], note: Callable[[str], None]
) -> str:
    """Build the --env environment on the host (once), showing its build; its key ("" when nothing is needed)."""
    key, built = ensure_environment(client, env, submission, lambda text: progress(f"environment: {text}"))
    if built.get("empty"):
        note("--env auto: the host has every package the job needs; no environment was built")
    elif built["built"]:
        note(f"built environment {key} on host {client.host} in {built['seconds']:.1f} s")
    return key


class EnvironmentChecks:
    """The hosts' answers to environment checks, kept for the kernel's life.

    Keyed by host, interpreter, root, environment and set of imports: a cell
    with the same imports as an earlier one costs no round trip.
    """

    def __init__(self) -> None:
        self._passed: dict[tuple[Any, ...], EnvReport] = {}
        self.last_imports: dict[str, list[str]] = {}  # per host: what %remote_env compares, refused or not

    def clear(self) -> None:
        self._passed.clear()
        self.last_imports.clear()

    def check(self, client: AgentClient, submission: Submission) -> list[str]:
        """Refuse before upload (``HostSetupError``) what could not load on the host; notes on what only differs."""
        needed = needed_imports(submission)
        self.last_imports[client.host] = needed
        key = (client.host, client.transport.python, client.transport.root, submission.env, tuple(needed))
        if key in self._passed:
            return []
        report = environment_report(client, needed, submission.env, submission.module_imports)
        if report.blocking():
            raise HostSetupError(report.refusal())
        self._passed[key] = report
        return [
            f"{row.package} is {row.here} here but {row.host or 'missing'} on host {client.host}; {row.fix}"
            for row in report.warnings()
        ]

    def prepare(
        self,
        client: AgentClient,
        env: str | None,
        submissions: list[Submission],
        progress: Callable[[str], None],
        note: Callable[[str], None],
    ) -> None:
        """Build the --env environment (once for every trial), then refuse what could not load there, before upload."""
        if env:
            key = build_environment(client, env, submissions[0], progress, note) or None
            for submission in submissions:
                submission.env = key
        for submission in submissions:  # checked once per set of imports: the trials' are the same
            for text in self.check(client, submission):
                note(text)
