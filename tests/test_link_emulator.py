"""The bench's link emulator (bench/link_emulator.py): the figures of issue 22 are only as true as its RTT, its
rate cap and its cut switch, so each is measured here, through real sockets, and so is its clean stop."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sshd import Sshd

_PATH = Path(__file__).resolve().parent.parent / "bench" / "link_emulator.py"
_spec = importlib.util.spec_from_file_location("link_emulator", _PATH)
assert _spec is not None and _spec.loader is not None
le: Any = importlib.util.module_from_spec(_spec)
sys.modules["link_emulator"] = le  # its dataclasses look their module up by name
_spec.loader.exec_module(le)

MiB = 1024 * 1024


def _socket_fds() -> set[str]:
    fds = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                fds.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue
    return fds


@pytest.fixture
def no_leaks() -> Iterator[Callable[[], None]]:
    """Every emulator and probe server a test starts is stopped by it: no thread, no socket is left.

    Tests call the check while their emulator is still referenced (garbage collection would close a
    forgotten socket for them); it runs again at teardown."""
    threads, sockets = set(threading.enumerate()), _socket_fds()

    def check() -> None:
        assert set(threading.enumerate()) <= threads, "threads left running"
        assert _socket_fds() <= sockets, "sockets left open"

    yield check
    check()


def test_rtt_and_rate_match_the_setting(no_leaks: Callable[[], None]) -> None:
    link = le.Link("test", 20, 10)
    with le.ProbeServer() as server, le.LinkEmulator(server.port, link) as emulator:
        check = emulator.self_check(nbytes=2 * MiB)
    assert abs(check.rtt_ms - link.rtt_ms) <= max(2.0, 0.1 * link.rtt_ms), check
    assert abs(check.rate_mbit - link.rate_mbit) <= 0.1 * link.rate_mbit, check
    assert str(check).startswith("emulated link: RTT 1")
    no_leaks()


def test_two_connections_share_the_cap(no_leaks: Callable[[], None]) -> None:
    link = le.Link("test", 20, 2)
    rates: list[float] = []
    with le.ProbeServer() as server, le.LinkEmulator(server.port, link) as emulator:
        senders = [threading.Thread(target=lambda: rates.append(le.probe_rate(emulator.port, MiB))) for _ in range(2)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(30)
        together = server.rate() * 8 / 1e6
        assert emulator.connections == 2 and emulator.bytes_up >= 2 * MiB
    assert len(rates) == 2
    assert abs(together - link.rate_mbit) <= 0.1 * link.rate_mbit, (together, rates)
    assert all(rate * 8 / 1e6 < 0.9 * link.rate_mbit for rate in rates), rates  # each got a share, not all of it
    no_leaks()


def _dropped(sock: socket.socket) -> bool:
    sock.settimeout(5)
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def test_cut_closes_open_connections_and_new_ones_work(no_leaks: Callable[[], None]) -> None:
    with le.ProbeServer() as server, le.LinkEmulator(server.port, le.Link("test", 50, 2)) as emulator:
        idle = socket.create_connection(("127.0.0.1", emulator.port))
        busy = socket.create_connection(("127.0.0.1", emulator.port))
        with idle, busy:
            idle.sendall(b"e")
            busy.sendall(b"s" + (64 * MiB).to_bytes(8, "big"))
            le.probe_rtt(emulator.port, 2)  # both are through the proxy by now
            before = emulator.bytes_up
            emulator.cut_after(300_000, "up")
            with pytest.raises(OSError):
                for _ in range(1024):  # blocks on the capped link until the cut resets it
                    busy.sendall(bytes(64 * 1024))
            assert emulator.wait_cut(5)
            assert _dropped(idle) and _dropped(busy)
        assert emulator.bytes_up - before == 300_000  # exactly N crossed, then the cut
        assert emulator.cuts == 1 and emulator.open_connections == 0
        assert le.probe_rtt(emulator.port, 2) < 0.1  # a new connection works again

        again = socket.create_connection(("127.0.0.1", emulator.port))
        with again:
            again.sendall(b"e")
            le.probe_rtt(emulator.port, 1)
            emulator.cut_now()
            assert _dropped(again)
        assert emulator.cuts == 2 and emulator.open_connections == 0
    no_leaks()


def test_ssh_through_the_link_and_a_cut_mid_transfer(sshd: Sshd, tmp_path: Path, no_leaks: Callable[[], None]) -> None:
    with le.LinkEmulator(sshd.port, le.Link("test", 200, 2)) as emulator:
        config = le.ssh_config_through(sshd, emulator.port, tmp_path / "ssh_config")

        def ssh(command: str) -> subprocess.CompletedProcess[bytes]:
            return subprocess.run(["ssh", "-F", str(config), sshd.alias, command], capture_output=True, timeout=60)

        assert ssh("echo through").stdout == b"through\n"
        assert emulator.connections == 1 and emulator.bytes_down > 0
        emulator.cut_after(MiB, "down")
        cut = ssh("head -c 8388608 /dev/zero")
        assert cut.returncode != 0 and len(cut.stdout) < MiB, (cut.returncode, len(cut.stdout))
        assert emulator.cuts == 1
        assert ssh("true").returncode == 0
    no_leaks()
