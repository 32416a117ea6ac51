"""The agent's entry point (bootstrap.RUN calls ``main``): ``serve``, or one command."""

from __future__ import annotations

import sys

from .cli import CommandIO, run_command
from .server import serve


def main(root: str, agent_hash: str, argv: list[str]) -> int:
    if argv[:1] == ["serve"]:
        return serve(root, agent_hash)
    returncode, problem = run_command(root, agent_hash, argv, CommandIO(sys.stdin.buffer, sys.stdout.buffer))
    if problem:
        sys.stderr.write(problem + "\n")
    return returncode
