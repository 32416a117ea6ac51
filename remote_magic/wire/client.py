"""Typed calls to the agent on one host, over the byte pipe of a transport.

The transport only moves bytes; this is where the agent is deployed,
started (``agent serve``, one per connection) and asked things: submit,
attach, events, status, cancel, stop, outputs, checkpoint, blobs, gc.  The
same client works over SSH and for the embedded ``local`` host, and over a
fake pipe in unit tests.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO, TypeVar

from ..agent import bootstrap, protocol
from ..agent import digest as digests
from ..errors import AgentCommandError, ConnectionFailed, HostSetupError
from ..transport.base import CommandResult, Transport
from ..transport.deploy import agent_hash, agent_tarball
from . import compression
from .link import FRAME_BYTES, AgentLink, Reply

# Packages the host's Python needs for every job (the agent itself is stdlib only).
REQUIRED_PACKAGES = ("cloudpickle", "numpy")
_T = TypeVar("_T")

# A blob this large travels over the transport's bulk path (OpenSSH), where it has one.
BULK_MIN_BYTES = 8 * 1024 * 1024
# Seconds close() waits for a bulk path still starting (a login takes ~0.4 s; ssh's own timeout is longer).
BULK_START_WAIT = 15.0


class AgentClient:
    """The agent on one host, reached through ``transport``; one per host for the life of a kernel."""

    def __init__(self, transport: Transport, *, scheduler: str | None = None) -> None:
        self.transport = transport
        self.scheduler = scheduler  # the host's setting, handed to the agent at hello (it picks the launcher)
        self._hello: dict[str, Any] | None = None
        self._link: AgentLink | None = None
        self._link_lock = threading.Lock()
        self._bulk: AgentLink | None = None
        self._bulk_lock = threading.Lock()
        self._bulk_starter: threading.Thread | None = None
        self.bulk_unavailable: str | None = None  # why large blobs go over the control link instead
        self.bulk_failure: str | None = None  # `ssh` exists but failed (the user may want to fix that): its last line
        self._bulk_refusal: Exception | None = None  # the bulk path reached a host with another key: never use it
        self.upload_rate: float | None = None  # bytes/s of the last large uncompressed upload
        self._dropped = False  # closed for good (Connections.close): no thread may connect it again

    # ---- what the transport says about the host
    @property
    def host(self) -> str:
        return self.transport.host

    @property
    def is_local(self) -> bool:
        return self.transport.is_local

    @property
    def bytes_sent(self) -> int:
        return self.transport.bytes_sent

    @property
    def bytes_received(self) -> int:
        return self.transport.bytes_received

    def close(self, final: bool = False) -> None:
        """Close the connections; the next command opens them again, unless ``final`` (the client is dropped:
        a connect still under way in another thread, a prewarm, must not log in again after this)."""
        if final:
            self._dropped = True
        starter = self._bulk_starter
        if starter is not None:
            starter.join(BULK_START_WAIT)  # one under way would otherwise log in again after this
        with self._bulk_lock:
            if self._bulk is not None:
                self._bulk.close()
                self._bulk = None
            self.bulk_unavailable = self.bulk_failure = None  # tried again on the next connection (not a refusal)
        with self._link_lock:
            if self._link is not None:
                self._link.close()
                self._link = None
        self.transport.close()

    # ---- the agent process
    def _agent_argv(self, *args: str) -> list[str]:
        t = self.transport
        return [t.python, "-c", bootstrap.RUN, t.root or "", agent_hash(), *args]

    def deploy(self) -> None:
        t = self.transport
        result = t.execute([t.python, "-c", bootstrap.INSTALL, t.root or "", agent_hash()], agent_tarball())
        if result.returncode != 0:
            raise self._command_error("deploy", result)

    def link(self) -> AgentLink:
        """The agent server of this connection, started (and deployed) when needed."""
        with self._link_lock:
            if self._link is not None and not self._link.dead:
                return self._link
            self._refuse_if_dropped()
            for attempt in range(2):
                link = AgentLink(self.transport.spawn(self._agent_argv("serve")), self.transport.count)
                try:
                    # The first answer proves the server runs (and caches what the host offers).
                    self._hello = json.loads(self._checked(link.request(self._hello_argv()).reply(), "hello"))
                    self._link = link
                    return link
                except ConnectionFailed:
                    status = link.pipe.exit_status()  # before closing: closing may drop it
                    link.close()
                    if status == protocol.EXIT_AGENT_MISSING and attempt == 0:
                        self.deploy()
                        continue
                    if status is None:
                        raise
                    raise self._command_error("start", CommandResult(status, b"", link.pipe.stderr())) from None
            raise AssertionError("the agent was deployed but still reports missing")

    def bulk_link(self) -> AgentLink:
        """The agent server for large blobs: a second one through OpenSSH where the transport offers it, else
        the control link.  A host key other than the one the control link verified stops here (HostKeyError)."""
        control = self.link()  # first: it deploys the agent and verifies the host key the bulk path is pinned to
        with self._bulk_lock:
            if self._bulk_refusal is not None:
                raise self._bulk_refusal
            if self._bulk is not None and not self._bulk.dead:
                return self._bulk
            if self.bulk_unavailable is not None:
                return control
            self._refuse_if_dropped()
            pipe = self.transport.spawn_bulk(self._agent_argv("serve"))
            if pipe is None:
                self.bulk_unavailable = "this host has no bulk path (no OpenSSH client, or bulk_ssh is off)"
                return control
            link = AgentLink(pipe, self.transport.count)
            try:
                self._checked(link.request(self._hello_argv()).reply(), "hello")
            except (ConnectionFailed, AgentCommandError):
                link.close()
                pipe.exit_status()  # its stderr is whole once it ended
                stderr = pipe.stderr()
                refusal = self.transport.bulk_refusal(stderr)
                if refusal is not None:
                    self._bulk_refusal = refusal
                    raise refusal from None
                lines = stderr.decode(errors="replace").strip().splitlines()
                self.bulk_failure = lines[-1] if lines else f"exit status {pipe.exit_status()}"
                self.bulk_unavailable = f"the OpenSSH client failed: {self.bulk_failure}"
                return control
            self._bulk = link
            return link

    def _refuse_if_dropped(self) -> None:
        if self._dropped:
            raise ConnectionFailed(f"the connection to host {self.host} was closed (the extension was unloaded)")

    def start_bulk(self) -> None:
        """Bring the bulk path up in the background (a second login: ~0.4 s), so that a cell's large blobs,
        hashed meanwhile, find it ready.  Quiet: a failure shows when a blob needs the path."""
        if not self.transport.has_bulk_path or self.bulk_unavailable is not None or self._dropped:
            return
        if self._bulk is not None and not self._bulk.dead:
            return

        def start() -> None:
            try:
                self.bulk_link()
            except Exception:  # noqa: BLE001  (raised again, refusal included, where a blob needs the path)
                pass

        self._bulk_starter = threading.Thread(target=start, name="remote_magic bulk path", daemon=True)
        self._bulk_starter.start()

    def _link_for(self, size: int) -> AgentLink:
        return self.bulk_link() if size >= BULK_MIN_BYTES else self.link()

    def _hello_argv(self) -> list[str]:
        """``hello``, with the host's settings the agent keeps (``<root>/host.json``) to choose its launcher."""
        return ["hello", "--scheduler", "slurm"] if self.scheduler == "slurm" else ["hello"]

    def hello(self) -> dict[str, Any]:
        """The host's interpreter and packages (and the launcher it chose), checked once per connection."""
        self.link()
        hello = self._hello
        assert hello is not None
        missing = [name for name in REQUIRED_PACKAGES if not hello["packages"].get(name)]
        if missing:
            raise HostSetupError(
                f"the Python on host {self.host} ({hello['python']}, {hello['python_version']}) lacks "
                f"{', '.join(missing)}; install it there with `{hello['python']} -m pip install {' '.join(missing)}`, "
                "or point --python (or c.RemoteMagics.hosts) at an interpreter that has it"
            )
        return hello

    # ---- raw calls (one place for errors)
    def call(
        self, *args: str, stdin: bytes | Iterable[bytes | memoryview] | None = None, link: AgentLink | None = None
    ) -> Reply:
        """Run an agent command and wait for its whole answer (on ``link``: by default the control link)."""
        parts = () if stdin is None else [stdin] if isinstance(stdin, bytes) else stdin
        reply = (link or self.link()).request(list(args), parts).reply()
        self._checked(reply, args[0])
        return reply

    def call_json(self, *args: str, stdin: bytes | Iterable[bytes | memoryview] | None = None) -> Any:
        return json.loads(self.call(*args, stdin=stdin).stdout)

    def _checked(self, reply: Reply, command: str) -> bytes:
        if reply.returncode != 0:
            raise self._command_error(command, CommandResult(reply.returncode, b"", reply.error.encode()))
        return reply.stdout

    def _command_error(self, command: str, result: CommandResult) -> Exception:
        stderr = result.stderr.decode(errors="replace").strip()
        python = self.transport.python
        if result.returncode == 127 or ("No such file" in stderr and python in stderr):
            return HostSetupError(
                f"host {self.host} has no Python at `{python}`; pass --python PATH "
                f"(or set c.RemoteMagics.hosts = {{{self.host!r}: {{'python': PATH}}}})"
            )
        last = stderr.splitlines()[-1] if stderr else f"exit status {result.returncode}"
        return AgentCommandError(f"the agent on host {self.host} failed to {command}: {last}")

    # ---- typed commands
    def submit(self, spec: dict[str, Any], inputs: bytes) -> dict[str, Any]:
        """Create a job: ``{"job_id": ...}``, or ``{"missing": [digests]}`` when blobs must be uploaded first."""
        body = json.dumps({**spec, "inputs_size": len(inputs)}).encode() + b"\n"
        return self.call_json("submit", stdin=[body, inputs])

    @contextmanager
    def attach(self, job_id: str, from_seq: int = 0) -> Iterator[Iterator[dict[str, Any]]]:
        """The job's events from ``from_seq`` while it runs, until its final one.

        Raises ConnectionFailed when the link drops, so the caller can resume.
        """
        request = self.link().request(["attach", job_id, "--from", str(from_seq)])

        def events() -> Iterator[dict[str, Any]]:
            pending = b""
            for chunk in request.chunks():
                pending += chunk
                *complete, pending = pending.split(b"\n")
                for line in complete:
                    yield protocol.decode_event(line)
            self._checked(Reply(request.returncode or 0, b"", request.error), "attach")

        try:
            yield events()
        finally:
            request.cancel()

    def events(self, job_id: str, from_seq: int = 0) -> list[dict[str, Any]]:
        reply = self.call("events", job_id, "--from", str(from_seq))
        return [protocol.decode_event(line) for line in reply.stdout.splitlines() if line]

    def status(self, job_id: str | None = None) -> Any:
        """Every job's row (no ``job_id``), or one job's detail."""
        return self.call_json("status", *([job_id] if job_id else []))

    def warm_up(self, backend: str) -> None:
        """Start a warm runner for ``backend`` on the host now, so the first job finds it ready."""
        self.call_json("warm-up", "--backend", backend)

    def stop_warm_runners(self) -> int:
        """End the host's warm runners of this root (waiting or starting); how many there were."""
        return int(self.call_json("warm-stop")["stopped"])

    def gpus(self) -> list[dict[str, Any]]:
        """The host's GPUs now (model, memory, utilization) and who holds each; [] on a host without."""
        return self.call_json("gpus")

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self.call_json("cancel", job_id)

    def stop(self, job_id: str) -> dict[str, Any]:
        return self.call_json("stop", job_id)

    def outputs(self, job_id: str) -> bytes:
        return self.call("cat-outputs", job_id).stdout

    def checkpoint(self, job_id: str) -> bytes:
        return self.call("cat-checkpoint", job_id).stdout

    def gc(self, older_than: float, include_unfetched: bool, dry_run: bool) -> dict[str, Any]:
        args = ["gc", "--older-than", str(older_than)]
        args += ["--include-unfetched"] if include_unfetched else []
        args += ["--dry-run"] if dry_run else []
        return self.call_json(*args)

    def put_blob(
        self, digest: str, buffer: memoryview, compress: str = "auto", progress: Callable[[int], None] | None = None
    ) -> None:
        """Send one blob; ``compress``: "none", "zstd", or "auto" (only where it pays, see compression.py);
        ``progress`` gets the bytes sent so far (uncompressed uploads)."""
        size = buffer.nbytes
        host_has_zstd = bool(self.hello()["packages"].get("zstandard"))
        if compression.should_compress(buffer, compress, self.host, host_has_zstd, self.is_local, self.upload_rate):
            self._transfer(size, lambda link: self.call("put-blob", digest, str(size), "--zstd",
                                                        stdin=compression.zstd_chunks(buffer), link=link))  # fmt: skip
            return
        start = time.perf_counter()
        self._transfer(size, lambda link: self.call("put-blob", digest, str(size), stdin=_slices(buffer, progress),
                                                    link=link))  # fmt: skip
        self.upload_rate = compression.measured_rate(size, time.perf_counter() - start, self.upload_rate)

    def put_blob_stream(self, digest: str, size: int, chunks: Callable[[], Iterable[bytes | memoryview]]) -> None:
        """Send one blob from pieces produced as it goes (a large file read while it is sent); ``chunks`` makes
        them anew for a second attempt."""
        self._transfer(size, lambda link: self.call("put-blob", digest, str(size), stdin=chunks(), link=link))

    def _transfer(self, size: int, attempt: Callable[[AgentLink], _T]) -> _T:
        """``attempt`` on the link for a blob of ``size``; if the bulk path breaks on the way, once more over the
        control link.  Every blob transfer can start over: a put stores under the digest only a whole, verified
        blob, and a get rewrites from byte 0."""
        link = self._link_for(size)
        try:
            return attempt(link)
        except ConnectionFailed:
            if link is self._link:
                raise  # the control link itself: the caller decides (a cell says the connection was lost)
            return attempt(self.link())

    def put_blobs(self, blobs: list[tuple[str, memoryview]]) -> None:
        """Send many small blobs in one request (no compression: they are small)."""
        header = json.dumps([[digest, buffer.nbytes] for digest, buffer in blobs]).encode() + b"\n"
        self.call("put-blobs", stdin=[header, *(buffer for _, buffer in blobs)])

    def fetch_files(self, job_id: str, patterns: list[str], max_files: int, max_bytes: int) -> Any:
        """The host's answer, unchecked: the job's files that match ``patterns`` (at most this many and this
        large), stored as blobs there (``files``: [path, digest, size]), and the cell's folder in its layout."""
        bounds = ["--max-files", str(max_files), "--max-bytes", str(max_bytes)]
        return self.call_json("fetch-files", job_id, *bounds, "--", *patterns)

    def versions(self, distributions: list[str], env: str | None = None) -> dict[str, Any]:
        """``{"python": version, "versions": {distribution: version or None}}`` on the host (or in an env)."""
        return self.call_json("versions", *distributions, *(["--env", env] if env else []))

    def ensure_env(self, requirements: str, on_line: Callable[[str], None]) -> dict[str, Any]:
        """Build the environment of ``requirements`` on the host once; each line of the build goes to ``on_line``."""
        request = self.link().request(["env-ensure"], [requirements.encode()])
        result: dict[str, Any] | None = None
        pending = b""
        for chunk in request.chunks():
            pending += chunk
            *complete, pending = pending.split(b"\n")
            for line in complete:
                message = json.loads(line)
                if "line" in message:
                    on_line(message["line"])
                else:
                    result = message.get("env")
        if request.returncode:  # pip's own lines are the message: all of them, not only the last
            raise AgentCommandError(f"the agent on host {self.host} failed to build the environment: {request.error}")
        if result is None:
            raise AgentCommandError(f"host {self.host} ended the environment build without a result")
        return result

    def get_blob(self, digest: str, size: int, progress: Callable[[int], None] | None = None) -> bytearray:
        """A blob, copied once into one buffer and hashed as it arrives (no second pass over the bytes);
        ``progress`` gets the bytes received so far."""
        buffer = bytearray(size)
        view = memoryview(buffer)

        def put(chunk: bytes, at: int) -> None:
            view[at : at + len(chunk)] = chunk
            if progress is not None:
                progress(at + len(chunk))

        self._receive_blob(digest, size, put)
        return buffer

    def get_blob_into(self, digest: str, size: int, out: BinaryIO) -> None:
        """A blob written to ``out`` as it arrives, hashed on the way: a large file never sits in memory."""
        start = out.tell()

        def put(chunk: bytes, at: int) -> None:
            if at == 0 and out.tell() != start:  # a second attempt: start over
                out.seek(start)
                out.truncate(start)
            out.write(chunk)

        self._receive_blob(digest, size, put)

    def _receive_blob(self, digest: str, size: int, put: Callable[[bytes, int], object]) -> None:
        self._transfer(size, lambda link: self._receive_blob_on(link, digest, size, put))

    def _receive_blob_on(self, link: AgentLink, digest: str, size: int, put: Callable[[bytes, int], object]) -> None:
        request = link.request(["cat-blob", digest])
        hasher = digests.new()
        received = 0
        for chunk in request.chunks():
            end = received + len(chunk)
            if end > size:
                request.cancel()
                raise AgentCommandError(
                    f"host {self.host} sent more than the {size} bytes of blob {digests.short(digest)}"
                )
            put(chunk, received)
            hasher.update(chunk)
            received = end
        self._checked(Reply(request.returncode or 0, b"", request.error), "cat-blob")
        if received != size:
            raise AgentCommandError(f"host {self.host} sent {received} of {size} bytes of blob {digests.short(digest)}")
        if not digests.matches(hasher, digest):
            raise AgentCommandError(
                f"blob {digests.short(digest)} from host {self.host} does not match its sha256 "
                "(damaged on the host's disk?); nothing was loaded. Run the job again to produce it anew"
            )


def _slices(buffer: memoryview, progress: Callable[[int], None] | None) -> Iterator[memoryview]:
    """``buffer`` in frame-sized views (no copy), telling ``progress`` how far it has gone."""
    view = buffer.cast("B")
    for start in range(0, view.nbytes, FRAME_BYTES):
        yield view[start : start + FRAME_BYTES]
        if progress is not None:
            progress(min(start + FRAME_BYTES, view.nbytes))
