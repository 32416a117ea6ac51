"""Work done beside the user's cells: connecting to a host while a cell's inputs are pickled, prewarming.

Each piece runs in a thread of its own; its result, or its error, comes out
where the cell waits for it.  The threads are waited for when the extension
unloads, so that none logs in after the connections close.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from ..agent.protocol import SLURM_LAUNCHER
from ..wire.client import AgentClient
from .environment import expected_kernel_backend
from .hosts import HostSettings
from .request import host_launcher

_T = TypeVar("_T")


class BackgroundWork:
    """The threads of work started beside the cells, still running or not yet waited for."""

    def __init__(self) -> None:
        self._threads: list[threading.Thread] = []

    def start(self, work: Callable[[], _T]) -> concurrent.futures.Future[_T]:
        """``work()`` in a thread of its own; its result, or its error, is raised where the cell waits for it.

        A cell that fails before it waits (an undefined name) leaves the connect running: the next cell
        finds the host ready.
        """
        future: concurrent.futures.Future[_T] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(work())
            except BaseException as exc:  # noqa: BLE001  (handed to the cell's thread, which raises it)
                future.set_exception(exc)

        helper = threading.Thread(target=run, name="remote_magic cell", daemon=True)
        self._threads = [thread for thread in self._threads if thread.is_alive()] + [helper]
        helper.start()
        return future

    def join(self, timeout: float) -> None:
        """Let the work still under way finish (each thread waited for at most ``timeout`` seconds)."""
        for helper in self._threads:
            helper.join(timeout)
        self._threads.clear()


def connected(client: AgentClient) -> dict[str, Any]:
    """The host's hello, once connected; then the bulk path comes up in the background."""
    hello = client.hello()
    client.start_bulk()
    return hello


def prewarm(client: AgentClient, settings: HostSettings) -> None:
    """Connect, check the agent and start the host's warm runner (none on a Slurm login node)."""
    hello = connected(client)
    if host_launcher(settings, hello) == SLURM_LAUNCHER:
        return  # no warm runners on a login node
    client.warm_up(expected_kernel_backend())
