"""The agent's commands, run by the client over SSH (or locally): their names and arguments, and running one.

Usually through ``serve`` (agent/server.py): one long-lived agent process per
connection that runs each command in a thread, so a command costs no shell
or interpreter start.  Each command also runs alone from the command line.
Every command is short-lived except ``attach``, which streams a job's events
until the job ends.  Results go to stdout as JSON (or raw bytes for blobs);
a problem is one line on stderr and exit status 2.  The commands themselves
are in commands/, by concern.
"""

from __future__ import annotations

import argparse
from typing import Any

from . import disk, jobs, protocol
from .commands import host, job, store
from .commands.base import CommandIO
from .launch.host import SCHEDULERS

__all__ = ["EXIT_PROBLEM", "CommandIO", "run_command"]

EXIT_PROBLEM = 2

_JOB = ("job_id", {})
_FROM = ("--from", {"dest": "from_seq", "type": int, "default": 0})
# command -> (function, its arguments as (name, add_argument keywords))
_COMMANDS: dict[str, tuple[Any, list[tuple[str, dict[str, Any]]]]] = {
    "hello": (host.cmd_hello, [("--scheduler", {"choices": SCHEDULERS})]),
    "submit": (job.cmd_submit, []),
    "attach": (job.cmd_attach, [_JOB, _FROM]),
    "events": (job.cmd_events, [_JOB, _FROM, ("--limit", {"type": int, "default": 10000})]),
    "status": (job.cmd_status, [("job_id", {"nargs": "?"}), ("--lines", {"type": int, "default": 20})]),
    "cancel": (job.cmd_cancel, [_JOB, ("--grace", {"type": float, "default": job.CANCEL_GRACE_SECONDS})]),
    "stop": (job.cmd_stop, [_JOB]),
    "put-blob": (store.cmd_put_blob, [("digest", {}), ("size", {"type": int}), ("--zstd", {"action": "store_true"})]),
    "put-blobs": (store.cmd_put_blobs, []),
    "cat-blob": (store.cmd_cat_blob, [("digest", {})]),
    "cat-outputs": (store.cmd_cat_outputs, [_JOB]),
    "cat-checkpoint": (store.cmd_cat_checkpoint, [_JOB]),
    "fetch-files": (
        store.cmd_fetch_files,
        [
            _JOB,
            ("patterns", {"nargs": "+"}),
            ("--max-files", {"type": int, "default": protocol.FETCH_MAX_FILES}),
            ("--max-bytes", {"type": int, "default": protocol.FETCH_MAX_BYTES}),
        ],
    ),
    "versions": (store.cmd_versions, [("names", {"nargs": "*"}), ("--env", {})]),
    "env-ensure": (store.cmd_env_ensure, []),
    "gc": (
        store.cmd_gc,
        [
            ("--older-than", {"type": float, "default": 7 * 86400}),
            ("--include-unfetched", {"action": "store_true"}),
            ("--dry-run", {"action": "store_true"}),
        ],
    ),
    "gpus": (host.cmd_gpus, []),
    "dispatch": (host.cmd_dispatch, []),
    "run-job": (host.cmd_run_job, [_JOB]),
    "warm-runner": (host.cmd_warm_runner, []),
    "warm-up": (host.cmd_warm_up, [("--backend", {"default": ""})]),
    "warm-stop": (host.cmd_warm_stop, []),
}


class _ArgumentError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """Never prints and never exits: the server runs many commands on one stream."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(add_help=False, allow_abbrev=False, **kwargs)

    def error(self, message: str) -> Any:
        raise _ArgumentError(message)

    def exit(self, status: int = 0, message: str | None = None) -> Any:
        raise _ArgumentError(message or f"argument parsing ended with status {status}")

    def _print_message(self, message: str, file: Any = None) -> None:
        pass


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="remote_magic agent")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (function, arguments) in _COMMANDS.items():
        command = sub.add_parser(name)
        for flag, options in arguments:
            command.add_argument(flag, **options)
        command.set_defaults(fn=function)
    return parser


def run_command(root: str, agent_hash: str, argv: list[str], io: CommandIO) -> tuple[int, str]:
    """Run one command; returns (exit status, the problem in one line or "")."""
    try:
        args = _parser().parse_args(argv)
        if getattr(args, "job_id", None) is not None and not protocol.is_job_id(args.job_id):
            raise jobs.AgentError(protocol.job_id_problem(args.job_id) or "")
        disk.ensure_dir(root)
        return args.fn(root, agent_hash, args, io), ""
    except (jobs.AgentError, _ArgumentError) as exc:
        return EXIT_PROBLEM, str(exc)
    except BrokenPipeError:
        return 0, ""  # the client went away; the job itself is unaffected
