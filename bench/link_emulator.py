"""A link emulator for the bench: a userspace TCP proxy on 127.0.0.1 with a delay line, a shared rate cap and a cut switch.

Loopback is free and instant; users sit behind Wi-Fi, VPNs and long fat links (issue 22). Put this proxy
between a client and the test sshd and every byte that crosses it pays the link's one-way delay and shares
its bandwidth, so a figure and its baselines (scp, rsync) meet the same link in the same run.

    with LinkEmulator(sshd.port, PROFILES["vpn"]) as link:
        print(link.self_check())          # emulated link: RTT 20.2 ms, rate 99.9 Mbit/s
        ssh_config_through(sshd, link.port, tmp / "ssh_config")   # then ssh/scp/rsync -F it

    .venv/bin/python bench/link_emulator.py --profile lfn      # its own accuracy
    .venv/bin/python bench/link_emulator.py --max              # the highest rate it reaches here

Standard library only. One thread runs a selector loop for every connection: no locks on the data
path, and a stop closes everything from one place. What it models and what it does not: the delay
and the cap apply to the byte stream between two loopback TCP connections, so application-level
windows (an SSH channel's 2 MiB window) see the whole round trip, as on a real link; TCP's own
congestion control sees loopback (no slow start over the emulated RTT, no loss, no reordering).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import os
import selectors
import socket
import statistics
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

Direction = Literal["up", "down"]
MiB = 1024 * 1024
_SLACK = 0.002  # how far ahead of the bottleneck a pipe may read: the loop's wake-up latency
_CREDIT = 0.050  # how late the loop may wake (a busy machine) without the link losing that time
_UNCAPPED_QUEUE = 64 * MiB  # bytes one pipe holds in its delay line when the rate is not capped
_LINGER_RESET = struct.pack("ii", 1, 0)  # close() then sends RST: the peer sees a dropped link, not an EOF


@dataclasses.dataclass(frozen=True)
class Link:
    """A link as users have it: its rate (None: not capped) and its round trip (twice the one-way delay)."""

    name: str
    rate_mbit: float | None
    rtt_ms: float

    @property
    def rate_bytes(self) -> float | None:
        return None if self.rate_mbit is None else self.rate_mbit * 1e6 / 8

    @property
    def delay_s(self) -> float:
        return self.rtt_ms / 2000

    def limit_s(self, nbytes: int) -> float:
        """The link's own limit for nbytes: what no transfer over it can beat."""
        if self.rate_bytes is None:
            raise ValueError(f"{self.name} has no rate cap: no limit to compare with")
        return nbytes / self.rate_bytes

    def __str__(self) -> str:
        rate = "uncapped" if self.rate_mbit is None else f"{self.rate_mbit:g} Mbit/s"
        return f"{self.name} ({rate}, {self.rtt_ms:g} ms RTT)"


PROFILES: dict[str, Link] = {
    "lan": Link("LAN", 1000, 0.5),
    "vpn": Link("campus VPN", 100, 20),
    "lfn": Link("long fat link", 400, 80),
    "home": Link("home to cloud", 50, 40),
}
LOOPBACK = Link("loopback through the proxy", None, 0)


@dataclasses.dataclass(frozen=True)
class LinkCheck:
    """What the emulator measured of itself, to print beside the figures it shaped."""

    rtt_ms: float
    rate_mbit: float
    nbytes: int

    def __str__(self) -> str:
        return f"emulated link: RTT {self.rtt_ms:.1f} ms, rate {self.rate_mbit:.1f} Mbit/s"


class _Pacer:
    """One direction's bottleneck, shared by every connection: a FIFO that sends rate bytes a second.

    Touched only by the loop thread. ``free_at`` is when the bottleneck finishes what it was given, so
    all connections together never exceed the rate (counted from the first byte of a busy spell). A loop
    that wakes up to ``_CREDIT`` late while data waited for the bottleneck (``backlogged``) catches up
    instead of losing that time of the link; after an idle spell the link starts afresh, with no burst.
    """

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self.free_at = 0.0
        self.backlogged = False  # a pipe wanted to read and waited for the bottleneck

    def ready(self, now: float) -> bool:
        return self.rate is None or self.free_at <= now + _SLACK

    def take(self, nbytes: int, now: float) -> float:
        """Queue nbytes on the bottleneck; returns when its last byte has left it."""
        if self.rate is None:
            return now
        catch_up = self.backlogged and now - self.free_at <= _CREDIT
        self.free_at = (self.free_at if catch_up else max(self.free_at, now)) + nbytes / self.rate
        self.backlogged = False
        return self.free_at


class _Pipe:
    """One direction of one connection: what was read from src, each chunk with the time it may reach dst."""

    def __init__(self, src: socket.socket, dst: socket.socket, direction: Direction) -> None:
        self.src, self.dst, self.direction = src, dst, direction
        self.queue: collections.deque[list[Any]] = collections.deque()  # [deliver_at, memoryview | None (EOF)]
        self.queued = 0
        self.eof_read = False
        self.eof_sent = False
        self.last_read = 0  # the loop's read count when this pipe last read: who goes first next time


class _Connection:
    def __init__(self, client: socket.socket, server: socket.socket, counted: bool) -> None:
        self.client, self.server, self.counted = client, server, counted
        self.up = _Pipe(client, server, "up")
        self.down = _Pipe(server, client, "down")
        self.closed = False

    def pipe_from(self, sock: socket.socket) -> _Pipe:
        return self.up if sock is self.client else self.down

    def pipe_to(self, sock: socket.socket) -> _Pipe:
        return self.down if sock is self.client else self.up


class LinkEmulator:
    """A TCP proxy from ``127.0.0.1:port`` to ``target`` that behaves like ``link``.

    Counters (``bytes_up``, ``bytes_down``: bytes delivered past the link; ``connections``: accepted;
    ``cuts``) may be read from any thread. ``cut_after`` and ``cut_now`` drop every open connection,
    as a lost Wi-Fi would; new connections work again at once.
    """

    def __init__(self, target_port: int, link: Link = LOOPBACK, target_host: str = "127.0.0.1") -> None:
        self.link = link
        self.target = (target_host, target_port)
        self.bytes_up = 0
        self.bytes_down = 0
        self.connections = 0
        self.cuts = 0
        rate = link.rate_bytes
        self._chunk = 256 * 1024 if rate is None else min(64 * 1024, max(4096, int(rate * 0.001)))
        # Room for what is on the wire (rate x delay) and what a late loop catches up, no more: beyond it
        # the pipe stops reading and the sender feels the link's back-pressure.
        in_flight = 2 * link.delay_s + _SLACK + 2 * _CREDIT
        self._queue_limit = _UNCAPPED_QUEUE if rate is None else int(rate * in_flight) + 4 * self._chunk
        self._pacers = {"up": _Pacer(rate), "down": _Pacer(rate)}
        self._conns: dict[socket.socket, _Connection] = {}
        self._routes: dict[socket.socket, tuple[tuple[str, int], bool]] = {}
        self._interest: dict[socket.socket, int] = {}
        self._commands: collections.deque[Callable[[], None]] = collections.deque()
        self._cut_at: tuple[Direction, int] | None = None  # armed: the direction and the bytes still to cross
        self._cut_event = threading.Event()
        self._stopping = False
        self._reads = 0
        self._thread: threading.Thread | None = None
        self._selector: selectors.BaseSelector | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._listener = self._listen()
        self._routes[self._listener] = (self.target, True)
        self.port: int = self._listener.getsockname()[1]

    # -- life ---------------------------------------------------------------------------------
    def start(self) -> LinkEmulator:
        # select(2) takes microsecond timeouts; epoll rounds each wait up to a whole millisecond,
        # which alone would add up to 2 ms to every round trip.
        self._selector = selectors.SelectSelector()
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._run, name=f"link-emulator-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the loop thread and close every socket it owns: listeners, connections, its wake-up pair."""
        if self._thread is not None:
            self._stopping = True
            self._wake()
            self._thread.join(10)
            if self._thread.is_alive():
                raise RuntimeError("the link emulator's thread did not stop")
            self._thread = None
        for conn in list(self._conns.values()):
            self._abort(conn)
        for listener in list(self._routes):
            listener.close()
        self._routes.clear()
        if self._selector is not None:
            self._selector.close()
            self._selector = None
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> LinkEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- controls (any thread) ----------------------------------------------------------------
    @property
    def open_connections(self) -> int:
        return int(self._call(lambda: len({id(conn) for conn in self._conns.values()})))

    def reset_counters(self) -> None:
        self._call(self._reset_counters)

    def cut_after(self, nbytes: int, direction: Direction = "up") -> None:
        """Drop every open connection once nbytes more have crossed in direction (exactly nbytes cross)."""
        if nbytes <= 0:
            raise ValueError("cut_after needs a positive byte count; use cut_now to cut at once")

        def arm() -> None:
            self._cut_event.clear()
            self._cut_at = (direction, nbytes)

        self._call(arm)

    def cut_now(self) -> None:
        """Drop every open connection now; returns once they are closed."""
        self._call(self._cut)

    def wait_cut(self, timeout: float) -> bool:
        """Wait for an armed ``cut_after`` to happen; False if it did not within timeout."""
        return self._cut_event.wait(timeout)

    def self_check(self, nbytes: int | None = None, pings: int = 20) -> LinkCheck:
        """Measure this link's RTT (1-byte round trips) and rate (one bulk transfer) through its own loop and caps.

        The probe traffic goes through a second listener of this emulator, to a probe server of its own:
        it shares the pacers and delay line, is not counted and does not advance an armed cut.
        """
        if self._thread is None:
            raise RuntimeError("start the emulator first (or use it as a context manager)")
        rate = self.link.rate_bytes
        if nbytes is None:
            nbytes = 64 * MiB if rate is None else int(min(64 * MiB, max(1 * MiB, rate * 0.5)))
        with ProbeServer() as server:
            port = self._call(lambda: self._add_route(("127.0.0.1", server.port), counted=False))
            try:
                rtt = probe_rtt(port, pings)
                measured = probe_rate(port, nbytes, one_way_s=rtt / 2)
            finally:
                self._call(lambda: self._remove_route(port))
        return LinkCheck(rtt_ms=rtt * 1000, rate_mbit=measured * 8 / 1e6, nbytes=nbytes)

    # -- the loop (its own thread) ------------------------------------------------------------
    def _listen(self) -> socket.socket:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        listener.setblocking(False)
        return listener

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"x")

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run fn in the loop thread (the only one that touches connections) and return its result."""
        if self._thread is None:
            return fn()
        done = threading.Event()
        result: list[Any] = []

        def command() -> None:
            try:
                result.append(fn())
            except BaseException as error:  # handed back to the caller's thread
                result.append(error)
                raise
            finally:
                done.set()

        self._commands.append(command)
        self._wake()
        if not done.wait(10):
            raise RuntimeError("the link emulator's loop did not answer")
        if isinstance(result[0], BaseException):
            raise result[0]
        return result[0]

    def _reset_counters(self) -> None:
        self.bytes_up = self.bytes_down = self.connections = self.cuts = 0

    def _add_route(self, target: tuple[str, int], counted: bool) -> int:
        listener = self._listen()
        self._routes[listener] = (target, counted)
        return listener.getsockname()[1]

    def _remove_route(self, port: int) -> None:
        for listener in list(self._routes):
            if listener.getsockname()[1] == port:
                self._set_interest(listener, 0)
                del self._routes[listener]
                listener.close()

    def _run(self) -> None:
        assert self._selector is not None
        while not self._stopping:
            now = time.monotonic()
            timeout = self._update_interest(now)
            events = self._selector.select(timeout)
            now = time.monotonic()
            readable: list[tuple[_Pipe, _Connection]] = []
            for key, mask in events:
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self._wake_r:
                    self._run_commands()
                elif sock in self._routes:
                    self._accept(sock)
                elif (conn := self._conns.get(sock)) is not None and not conn.closed:
                    if mask & selectors.EVENT_WRITE:
                        self._deliver(conn.pipe_to(sock), conn, now)
                    if mask & selectors.EVENT_READ:
                        readable.append((conn.pipe_from(sock), conn))
            # The pipe that read least recently reads first: connections sharing a bottleneck take turns.
            for pipe, conn in sorted(readable, key=lambda item: item[0].last_read):
                if not conn.closed:
                    self._read(pipe, conn, now)

    def _run_commands(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self._wake_r.recv(4096):
                pass
        while self._commands:
            with contextlib.suppress(Exception):  # the caller gets the error; the loop goes on
                self._commands.popleft()()

    def _update_interest(self, now: float) -> float | None:
        """Register what each socket waits for now; returns how long the loop may sleep."""
        wake_at = float("inf")
        wanted: dict[socket.socket, int] = {self._wake_r: selectors.EVENT_READ}
        for listener in self._routes:
            wanted[listener] = selectors.EVENT_READ
        for conn in {id(c): c for c in self._conns.values()}.values():
            for pipe in (conn.up, conn.down):
                if not pipe.eof_read and pipe.queued < self._queue_limit:
                    pacer = self._pacers[pipe.direction]
                    if pacer.ready(now):
                        wanted[pipe.src] = wanted.get(pipe.src, 0) | selectors.EVENT_READ
                    else:
                        pacer.backlogged = True
                        wake_at = min(wake_at, pacer.free_at - _SLACK)
                if pipe.queue:
                    if pipe.queue[0][0] <= now:
                        wanted[pipe.dst] = wanted.get(pipe.dst, 0) | selectors.EVENT_WRITE
                    else:
                        wake_at = min(wake_at, pipe.queue[0][0])
        for sock in list(self._interest):
            if sock not in wanted:
                self._set_interest(sock, 0)
        for sock, mask in wanted.items():
            if sock is not self._wake_r:
                self._set_interest(sock, mask)
        return None if wake_at == float("inf") else max(0.0, wake_at - time.monotonic())

    def _set_interest(self, sock: socket.socket, mask: int) -> None:
        assert self._selector is not None
        old = self._interest.get(sock, 0)
        if mask == old:
            return
        if old and mask:
            self._selector.modify(sock, mask)
        elif mask:
            self._selector.register(sock, mask)
        else:
            self._selector.unregister(sock)
        if mask:
            self._interest[sock] = mask
        else:
            self._interest.pop(sock, None)

    def _accept(self, listener: socket.socket) -> None:
        target, counted = self._routes[listener]
        try:
            client, _ = listener.accept()
        except BlockingIOError:
            return
        try:
            server = socket.create_connection(target, timeout=5)
        except OSError:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            client.close()
            return
        for sock in (client, server):
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # Nagle would add its own delay
        conn = _Connection(client, server, counted)
        self._conns[client] = self._conns[server] = conn
        if counted:
            self.connections += 1

    def _read(self, pipe: _Pipe, conn: _Connection, now: float) -> None:
        pacer = self._pacers[pipe.direction]
        if pipe.eof_read or pipe.queued >= self._queue_limit or not pacer.ready(now):
            return  # another connection took the bottleneck in this round
        try:
            data = pipe.src.recv(self._chunk)
        except BlockingIOError:
            return
        except OSError:
            self._abort(conn)
            return
        if not data:
            pipe.eof_read = True
            pipe.queue.append([now + self.link.delay_s, None])
            return
        sent_at = max(now, pacer.take(len(data), now))  # a catching-up link never delivers before it read
        pipe.queue.append([sent_at + self.link.delay_s, memoryview(data)])
        pipe.queued += len(data)
        self._reads += 1
        pipe.last_read = self._reads

    def _deliver(self, pipe: _Pipe, conn: _Connection, now: float) -> None:
        while pipe.queue and pipe.queue[0][0] <= now:
            head = pipe.queue[0]
            data: memoryview | None = head[1]
            if data is None:  # the EOF read from src reaches dst a delay later
                pipe.queue.popleft()
                pipe.eof_sent = True
                with contextlib.suppress(OSError):
                    pipe.dst.shutdown(socket.SHUT_WR)
                if conn.up.eof_sent and conn.down.eof_sent:
                    self._close(conn)
                return
            cut = self._cut_at if conn.counted else None
            if cut is not None and cut[0] == pipe.direction:
                data = data[: cut[1]]
            try:
                sent = pipe.dst.send(data)
            except BlockingIOError:
                return
            except OSError:
                self._abort(conn)
                return
            pipe.queued -= sent
            if conn.counted:
                if pipe.direction == "up":
                    self.bytes_up += sent
                else:
                    self.bytes_down += sent
            if sent < len(head[1]):
                head[1] = head[1][sent:]
            else:
                pipe.queue.popleft()
            if cut is not None and cut[0] == pipe.direction:
                self._cut_at = (cut[0], cut[1] - sent)
                if cut[1] - sent <= 0:
                    self._cut()
                    return
            if sent < len(data):
                return  # dst's buffer is full: wait until it is writable

    def _cut(self) -> None:
        self._cut_at = None
        self.cuts += 1  # before the resets: a client that sees its connection drop already sees the count
        for conn in {id(c): c for c in self._conns.values()}.values():
            self._abort(conn)
        self._cut_event.set()

    def _abort(self, conn: _Connection) -> None:
        """Drop a connection as a lost link does: both ends get a reset, nothing queued is delivered."""
        for sock in (conn.client, conn.server):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        self._close(conn)

    def _close(self, conn: _Connection) -> None:
        conn.closed = True
        for sock in (conn.client, conn.server):
            if self._selector is not None:
                self._set_interest(sock, 0)
            self._conns.pop(sock, None)
            sock.close()


# -- probes: a tiny server and clients that measure a link ------------------------------------
class ProbeServer:
    """A server to measure a link with: a connection that starts with b"e" is echoed; one that starts with
    b"s" and an 8-byte length is a sink that reads that many bytes, logs when they arrived and answers
    with when the last one did (``time.monotonic``: one clock for every process of the machine). Threads and sockets end with ``stop``.
    """

    def __init__(self) -> None:
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.settimeout(0.05)
        self.port: int = self._listener.getsockname()[1]
        self.arrivals: list[tuple[float, int]] = []  # (time, bytes) of every sink read, all connections
        self._lock = threading.Lock()
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._socks: set[socket.socket] = set()
        self._thread = threading.Thread(target=self._serve, name=f"probe-server-{self.port}", daemon=True)

    def start(self) -> ProbeServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping = True
        self._thread.join(10)
        with self._lock:
            for sock in self._socks:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(10)
        self._listener.close()

    def __enter__(self) -> ProbeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def rate(self) -> float:
        """Bytes per second over every sink read so far (all connections together)."""
        with self._lock:
            arrivals = sorted(self.arrivals)
        if len(arrivals) < 2:
            raise ValueError("too few reads to measure a rate")
        return sum(n for _, n in arrivals[1:]) / (arrivals[-1][0] - arrivals[0][0])

    def _serve(self) -> None:
        while not self._stopping:
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._socks.add(sock)
            thread = threading.Thread(target=self._handle, args=(sock,), name=f"probe-conn-{self.port}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def _handle(self, sock: socket.socket) -> None:
        try:
            mode = sock.recv(1)
            if mode == b"e":
                while data := sock.recv(65536):
                    sock.sendall(data)
            elif mode == b"s":
                header = _recv_exactly(sock, 8)
                remaining = struct.unpack("!Q", header)[0]
                log: list[tuple[float, int]] = []
                while remaining > 0:
                    data = sock.recv(min(remaining, 256 * 1024))
                    if not data:
                        return
                    log.append((time.monotonic(), len(data)))
                    remaining -= len(data)
                with self._lock:
                    self.arrivals += log
                sock.sendall(struct.pack("!d", log[-1][0] if log else time.monotonic()))
        except OSError:
            pass
        finally:
            with self._lock:
                self._socks.discard(sock)
            sock.close()


def _recv_exactly(sock: socket.socket, nbytes: int) -> bytes:
    data = b""
    while len(data) < nbytes:
        more = sock.recv(nbytes - len(data))
        if not more:
            raise ConnectionError("closed early")
        data += more
    return data


def probe_rtt(port: int, pings: int = 20) -> float:
    """Median seconds of a 1-byte round trip to a ProbeServer's echo through ``port``."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(b"e")
        times = []
        for _ in range(pings):
            start = time.perf_counter()
            sock.sendall(b"x")
            _recv_exactly(sock, 1)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def probe_rate(port: int, nbytes: int, one_way_s: float = 0.0) -> float:
    """Bytes per second of nbytes sent through ``port`` to a ProbeServer's sink: from the first byte sent to
    the last one received, less the one-way delay. Timed from the sender, so a late start of the receiver or
    a link catching up after a stall cannot make a short transfer look faster than the link is."""
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        start = time.monotonic()
        sock.sendall(b"s" + struct.pack("!Q", nbytes))
        block = memoryview(os.urandom(min(nbytes, MiB)))
        left = nbytes
        while left:
            sock.sendall(block[: min(left, len(block))])
            left -= min(left, len(block))
        last = struct.unpack("!d", _recv_exactly(sock, 8))[0]
    return nbytes / (last - start - one_way_s)


def ssh_config_through(sshd: Any, proxy_port: int, path: Path) -> Path:
    """An ssh config whose ``sshd.alias`` goes through the proxy; HostKeyAlias keeps its known_hosts line valid."""
    return sshd.write_client_config(path, sshd.alias, Port=str(proxy_port), HostKeyAlias=f"[127.0.0.1]:{sshd.port}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), action="append", help="check these profiles")
    parser.add_argument("--rate", type=float, help="a custom rate cap, Mbit/s")
    parser.add_argument("--rtt", type=float, default=0.0, help="a custom round trip, ms")
    parser.add_argument("--max", action="store_true", help="no cap, no delay: the highest rate it reaches here")
    parser.add_argument("--mib", type=int, help="bytes of the rate probe, MiB (default: half a second's worth)")
    args = parser.parse_args()
    links = [PROFILES[name] for name in args.profile or []]
    if args.rate is not None or args.rtt:
        links.append(Link("custom", args.rate, args.rtt))
    if args.max:
        links.append(LOOPBACK)
    for link in links or list(PROFILES.values()):
        with ProbeServer() as server, LinkEmulator(server.port, link) as emulator:
            check = emulator.self_check(None if args.mib is None else args.mib * MiB)
        rate = "" if link.rate_mbit is None else f", {check.rate_mbit / link.rate_mbit:.3f} x the setting"
        print(f"{link}: {check} (RTT {check.rtt_ms - link.rtt_ms:+.2f} ms off{rate}; {check.nbytes // MiB} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
