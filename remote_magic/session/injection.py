"""When a job's outputs may enter the user's namespace: between cells, never in the middle of one.

A detached job ends in a background thread, at any moment.  Writing its outputs into ``user_ns``
then could change names under a cell that is reading them, so values from the background wait for
the running cell to end (IPython's ``post_run_cell``, in the cell's thread, before the next cell).
With no cell running they go in at once, under a lock that ``pre_run_cell`` takes too: a cell that
starts meanwhile waits, and never sees half of them.  The shell is duck-typed (``user_ns`` and
``events``), so nothing here imports IPython.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any


class Injector:
    """Puts values into ``shell.user_ns`` now, or when the running cell ends.

    Called as ``injector(values)``; it returns whether they went in now.  A cell that injects its
    own outputs (a blocking ``%%remote_train``) does so at once, as a local ``fit`` would.  Until
    ``register()`` (the extension loads), every call injects at once: no cell is known to run.
    """

    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self._lock = threading.Lock()
        self._cells: dict[int, int] = {}  # thread id -> cells it runs now (a subshell runs its own; nested cells)
        self._waiting: list[Mapping[str, Any]] = []  # values that came while a cell ran, in order
        self._registered = False

    def register(self) -> None:
        """Follow the shell's cells, so that values from the background wait for the end of the running one."""
        if not self._registered:
            self.shell.events.register("pre_run_cell", self._cell_starts)
            self.shell.events.register("post_run_cell", self._cell_ends)
            self._registered = True

    def unregister(self) -> None:
        """Stop following cells (the extension unloads); values still waiting go in now, none is lost."""
        if self._registered:
            self.shell.events.unregister("pre_run_cell", self._cell_starts)
            self.shell.events.unregister("post_run_cell", self._cell_ends)
            self._registered = False
        with self._lock:
            self._cells.clear()
            self._apply_waiting()

    def __call__(self, values: Mapping[str, Any]) -> bool:
        """Inject ``values``; True if they went in now, False if they wait for the running cell to end."""
        with self._lock:
            here = threading.get_ident()
            if values and self._cells and here not in self._cells:
                self._waiting.append(values)
                return False
            self.shell.user_ns.update(values)
            if self._waiting:  # what waits came earlier: the names given now win over it at the cell's end
                self._waiting = [{k: v for k, v in older.items() if k not in values} for older in self._waiting]
            return True

    def _cell_starts(self, info: Any = None) -> None:
        with self._lock:  # waits for an injection under way: the cell sees all of it or none
            here = threading.get_ident()
            self._cells[here] = self._cells.get(here, 0) + 1

    def _cell_ends(self, result: Any = None) -> None:
        with self._lock:
            here = threading.get_ident()
            left = self._cells.pop(here, 0) - 1
            if left > 0:
                self._cells[here] = left  # a cell run from inside a cell: the outer one still runs
            if not self._cells:
                self._apply_waiting()

    def _apply_waiting(self) -> None:
        """With the lock held and no cell running: what came meanwhile goes in, oldest first."""
        for values in self._waiting:
            self.shell.user_ns.update(values)
        self._waiting.clear()
