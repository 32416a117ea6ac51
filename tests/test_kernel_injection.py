"""A detached job's outputs enter the namespace between cells, never in the middle of one (issue 20).

The injector is tested on the real IPython shell of the suite, called from threads; then a real
ipykernel runs a tiny detached job on the ``local`` host, once while a cell runs and once idle.
"""

from __future__ import annotations

import os
import queue
import re
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from kernel import Kernel
from notebooks import write_profile

from remote_magic.session import Injector


@pytest.fixture
def injector(shell) -> Iterator[Injector]:  # type: ignore[no-untyped-def]
    """An injector of its own following the suite's shell (beside the extension's), unregistered after."""
    made = Injector(shell)
    made.register()
    shell.user_ns["from_a_thread"] = _from_a_thread
    shell.user_ns["injector"] = made
    yield made
    made.unregister()
    for name in ("from_a_thread", "injector", "went_in", "seen", "late", "idle", "own", "parts"):
        shell.user_ns.pop(name, None)


def _from_a_thread(call: Any, *args: Any) -> Any:
    """``call(*args)`` in another thread (as a background follower does); its result."""
    results: list[Any] = []
    helper = threading.Thread(target=lambda: results.append(call(*args)))
    helper.start()
    helper.join(10)
    return results[0]


def _cell(shell, source: str) -> None:  # type: ignore[no-untyped-def]
    result = shell.run_cell(source, store_history=False)
    assert result.success, result.error_in_exec or result.error_before_exec


def test_values_from_a_thread_wait_for_the_running_cell_to_end(shell, injector) -> None:
    _cell(shell, "went_in = from_a_thread(injector, {'late': 1})\nseen = 'late' in globals()\n")
    assert shell.user_ns["went_in"] is False and shell.user_ns["seen"] is False
    assert shell.user_ns["late"] == 1  # post_run_cell: in before the next cell


def test_values_from_a_thread_go_in_at_once_when_no_cell_runs(shell, injector) -> None:
    assert _from_a_thread(injector, {"idle": 2}) is True
    assert shell.user_ns["idle"] == 2


def test_the_running_cell_injects_its_own_outputs_at_once(shell, injector) -> None:
    """A blocking %%remote_train brings its outputs back inside its own cell, as a local fit would."""
    _cell(shell, "went_in = injector({'own': 3})\nseen = own\n")
    assert shell.user_ns["went_in"] is True and shell.user_ns["seen"] == 3


def test_the_running_cell_s_own_outputs_win_over_older_values_waiting_for_its_end(shell, injector) -> None:
    """A detached job that ended during a blocking cell is older than that cell's result: ``own`` stays the cell's."""
    _cell(shell, "from_a_thread(injector, {'own': 'older job', 'late': 1})\ninjector({'own': 'this cell'})\n")
    assert shell.user_ns["own"] == "this cell" and shell.user_ns["late"] == 1


class _SlowValues(Mapping[str, int]):
    """Values that take a while to copy in: a cell starting meanwhile must wait for all of them."""

    def __init__(self, names: list[str], started: threading.Event) -> None:
        self.names, self.started = names, started

    def __getitem__(self, name: str) -> int:
        self.started.set()
        time.sleep(0.2)
        return self.names.index(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def test_a_cell_that_starts_during_an_injection_sees_all_of_it(shell, injector) -> None:
    names = ["part_a", "part_b", "part_c"]
    started = threading.Event()
    helper = threading.Thread(target=injector, args=(_SlowValues(names, started),))
    helper.start()
    try:
        assert started.wait(5)
        _cell(shell, f"parts = [name in globals() for name in {names!r}]\n")
        assert shell.user_ns["parts"] == [True, True, True]
    finally:
        helper.join(10)
        for name in names:
            shell.user_ns.pop(name, None)


def test_unloading_puts_in_what_still_waits(shell, injector) -> None:
    """``%unload_ext remote_magic`` in a cell: what came meanwhile goes in there, none is lost."""
    _cell(shell, "went_in = from_a_thread(injector, {'late': 4})\ninjector.unregister()\nseen = late\n")
    assert shell.user_ns["went_in"] is False and shell.user_ns["seen"] == 4


# ------------------------------------------------------------------ in a real kernel
@pytest.fixture(scope="module")
def kernel(tmp_path_factory) -> Iterator[Kernel]:
    """One kernel for the module, remote_magic loaded, jobs on the embedded ``local`` host."""
    ipython_dir = write_profile(tmp_path_factory.mktemp("ipython"), prewarm=False, warm_runner=False)
    started = Kernel({**os.environ, "IPYTHONDIR": str(ipython_dir), "REMOTE_MAGIC_PANEL": "text"})
    try:
        reply, text = started.execute("%load_ext remote_magic", timeout=60)
        assert reply["status"] == "ok", text
        yield started
    finally:
        started.shutdown()


DETACHED = "%%remote_train --detach\nimport time\ntime.sleep(2)\n{name} = 41 + 1\n"

# Polls globals() until the background follower (the last one started) ended, then a moment more.
POLL_UNTIL_THE_JOB_ENDED = """
import time
follower = get_ipython().magics_manager.registry["RemoteMagics"].background[-1]
seen, deadline = set(), time.monotonic() + 60
while follower.is_alive() and time.monotonic() < deadline:
    seen.add({name!r} in globals())
    time.sleep(0.02)
time.sleep(0.5)
seen.add({name!r} in globals())
print("follower ended", not follower.is_alive(), "seen during the cell", sorted(seen))
"""


def _streamed(kernel: Kernel) -> str:
    """Everything printed in the kernel so far, whichever cell (or none) it is attributed to."""
    return "".join(m["content"]["text"] for m in kernel.messages if m["msg_type"] == "stream")


def test_outputs_never_appear_while_a_cell_runs_and_do_right_after_it(kernel) -> None:
    reply, text = kernel.execute(DETACHED.format(name="while_busy"), timeout=60)
    assert reply["status"] == "ok" and "submitted to host local" in text, text
    reply, text = kernel.execute(POLL_UNTIL_THE_JOB_ENDED.format(name="while_busy"), timeout=90)
    assert reply["status"] == "ok", text
    assert "follower ended True seen during the cell [False]" in text
    reply, text = kernel.execute("print('next cell sees', while_busy)", timeout=30)
    assert text.strip() == "next cell sees 42", text
    assert "outputs ready: while_busy; they enter the namespace when the running cell ends" in _streamed(kernel)


def test_outputs_go_in_promptly_on_an_idle_kernel(kernel) -> None:
    reply, text = kernel.execute(DETACHED.format(name="while_idle"), timeout=60)
    assert reply["status"] == "ok" and "submitted to host local" in text, text
    deadline = time.monotonic() + 60
    while not re.search(r"injected: .*while_idle", _streamed(kernel)) and time.monotonic() < deadline:
        try:  # idle: no cell runs, the panel's notes come from the follower's thread
            kernel.messages.append(kernel.client.get_iopub_msg(timeout=0.5))
        except queue.Empty:
            continue
    assert re.search(r"injected: .*while_idle", _streamed(kernel)), _streamed(kernel)
    reply, text = kernel.execute("print('in before this cell', 'while_idle' in globals())", timeout=30)
    assert text.strip() == "in before this cell True", text
