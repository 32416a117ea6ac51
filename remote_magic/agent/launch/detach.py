"""Starting a process that belongs to no connection: a job's runner, a warm runner."""

from __future__ import annotations

import os
import subprocess
import sys

from .. import bootstrap, jobs, procs


def spawn_detached(argv: list[str], log: str, cwd: str, env: dict[str, str]) -> procs.ProcessIdentity | None:
    """Start ``argv`` as an orphan in its own session; its identity (None if it ended at once).

    A launcher process starts it and exits at once, so the job is nobody's
    child here: it outlives this agent process and its SSH connection (even
    if every process of that connection is killed), and never lingers as a
    zombie of the long-lived ``serve``.  The launcher reads the child's start
    time while the child cannot have been reaped yet, so the identity is
    exact even if the child ends at once.
    """
    launched = subprocess.run(
        [sys.executable, "-I", "-c", bootstrap.LAUNCH, log, cwd, *argv],
        capture_output=True,
        cwd=cwd,  # never the caller's: a module planted there would run as us
        check=False,
        start_new_session=True,
        env=env,
    )
    if launched.returncode != 0:
        raise jobs.AgentError(f"could not start the job: {launched.stderr.decode(errors='replace').strip()}")
    pid, start_ticks = (int(part) for part in launched.stdout.split())
    return procs.ProcessIdentity(pid, start_ticks, procs.boot_id())


def untagged_environment() -> dict[str, str]:
    """This process's environment without a job tag: for runners that are not (yet) any job's."""
    env = dict(os.environ)
    env.pop(procs.TAG_VARIABLE, None)
    return env
