"""The shared GPU queue's rules as plain functions: the order of other users' entries and their no-shows, and the
wait for a lock a member keeps taking.  No GPU, no user, no job: the agent's own functions on temporary folders."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

from remote_magic.agent.launch import gpu_queue, queue_folder
from remote_magic.agent.launch.queue_records import Entry, Member
from remote_magic.agent.protocol import GpuRequest

UID = 4321


def _entry(job: str, inode: int, written: float) -> Entry:
    return Entry(
        f"/q/u{UID}-x/{job}.json", job, UID, int(written * 1e9), inode, GpuRequest(GpuRequest.ALL), None, f"/q/u{UID}-x"
    )


def _member(*entries: Entry, alive: bool = True) -> Member:
    return Member(f"/q/u{UID}-x", UID, list(entries), [], alive)


def test_an_honest_user_whose_set_aside_job_ended_at_once_keeps_counting(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A job set aside for its owner that ends before anyone looks again (it failed at once) is not a no-show."""
    monkeypatch.setenv("REMOTE_MAGIC_QUEUE_STALE_SECONDS", "30")
    order, t0 = gpu_queue.Order(), 1000.0
    first, second, third = (
        _entry("20261207-000000-000001", 1, t0),
        _entry("20261207-000000-000002", 2, t0 + 1),
        _entry("20261207-000000-000003", 3, t0 + 2),
    )
    assert len(order.place([_member(first, second, third)], t0 + 3)) == 3
    order.setting_aside(first, t0 + 3)
    assert len(order.place([_member(second, third)], t0 + 4)) == 2  # it left: started, or ended
    order.setting_aside(second, t0 + 4)
    assert len(order.place([_member(third)], t0 + 40)) == 1  # long after: still counting
    assert len(order.place([_member(third)], t0 + 700)) == 1


def test_a_no_show_stops_counting_after_the_grace_and_a_dormant_entry_goes_to_the_back(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("REMOTE_MAGIC_QUEUE_STALE_SECONDS", "30")
    order, t0 = gpu_queue.Order(), 1000.0
    stuck = _entry("20261207-000000-000001", 1, t0)
    assert order.place([_member(stuck)], t0 + 1) == [(t0, stuck)]
    order.setting_aside(stuck, t0 + 1)
    assert order.place([_member(stuck)], t0 + 20) != []  # within the grace period
    assert order.place([_member(stuck)], t0 + 40) == []  # a no-show: none of its owner's entries count
    dormant = _entry("20261207-000000-000002", 2, t0 + 50)
    later = gpu_queue.Order(last_look=t0 + 60)
    assert later.place([_member(dormant, alive=False)], t0 + 200) == []  # not counting: no dispatcher, not recent
    assert later.place([_member(dormant)], t0 + 300) == [(t0 + 300, dormant)]  # counts again: at the back
    renamed = gpu_queue.Order(last_look=t0 + 500)
    assert renamed.place([_member(_entry("20261207-000000-000003", 3, t0))], t0 + 501)[0][0] == t0 + 500


def test_a_member_who_keeps_taking_the_lock_gets_waited_for_briefly_after_once(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Held 2.8 s at a time with a 3 s grace: the first wait is that long, later ones at most half the grace."""
    monkeypatch.setenv("REMOTE_MAGIC_QUEUE_STALE_SECONDS", "3")
    shared = tmp_path / "shared"
    shared.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\nfd = os.open(sys.argv[1], os.O_RDONLY)\n"
         "print('go', flush=True)\nwhile True:\n    fcntl.flock(fd, fcntl.LOCK_EX)\n    time.sleep(2.8)\n"
         "    fcntl.flock(fd, fcntl.LOCK_UN)\n    time.sleep(0.05)\n", str(shared)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "go"
        time.sleep(0.1)
        waits = []
        for _ in range(3):
            time.sleep(0.3)  # the member has the lock again by now
            fd = os.open(shared, os.O_RDONLY | os.O_DIRECTORY)
            began = time.monotonic()
            queue_folder._flock_shared(str(tmp_path), fd, str(shared))
            waits.append(time.monotonic() - began)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        assert waits[0] > 1.5 and max(waits[1:]) < 1.8, waits  # then half the grace, not the member's 2.8 s
    finally:
        holder.kill()
        holder.wait()
