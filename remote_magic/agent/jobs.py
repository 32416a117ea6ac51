"""The job store on the host: job directories, the event log, the blob store.

Layout under the root (default ``~/.remote_magic``, mode 0700)::

    blobs/<sha256>            content-addressed buffers
    jobs/<job_id>/spec.json   what was asked
    jobs/<job_id>/inputs.pkl  the pickle that references blobs
    jobs/<job_id>/events.jsonl
    jobs/<job_id>/outputs.pkl

Every file others read is written atomically (tmp, fsync, rename); files are
0600 in 0700 folders because they hold the user's data and code.
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import secrets
import time
from collections.abc import Iterator
from typing import IO, Any

from . import protocol

DIR_MODE = 0o700
FILE_MODE = 0o600
_CHUNK = 4 * 1024 * 1024


class AgentError(Exception):
    """A problem the agent reports to the client as a one-line message."""


def default_root() -> str:
    return os.environ.get("REMOTE_MAGIC_ROOT") or os.path.join("~", ".remote_magic")


def ensure_dir(path: str) -> str:
    """Create ``path`` (and parents) as 0700; tighten an existing folder we own."""
    os.makedirs(path, mode=DIR_MODE, exist_ok=True)
    os.chmod(path, DIR_MODE)
    return path


def atomic_write(path: str, data: bytes | memoryview, durable: bool = True) -> None:
    """Write tmp, fsync (when ``durable``), rename: readers never see a partial file."""
    tmp = f"{path}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# --------------------------------------------------------------------- blobs
def blobs_dir(root: str) -> str:
    return ensure_dir(os.path.join(root, "blobs"))


def blob_path(root: str, digest: str) -> str:
    if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
        raise AgentError(f"not a sha256 digest: {digest!r}")
    return os.path.join(blobs_dir(root), digest)


def missing_blobs(root: str, blobs: list[tuple[str, int]]) -> list[str]:
    """The digests of ``blobs`` the store lacks (or holds with the wrong size)."""
    missing = []
    for digest, size in blobs:
        try:
            if os.path.getsize(blob_path(root, digest)) == size:
                continue
        except FileNotFoundError:
            pass
        missing.append(digest)
    return missing


def receive_blob(root: str, digest: str, size: int, stream: IO[bytes], zstd: bool = False) -> None:
    """Store exactly ``size`` bytes from ``stream`` under ``digest``, verified.

    ``zstd``: the stream is zstandard-compressed (needs the zstandard package
    here).  A short or corrupt upload never becomes visible under the digest.
    """
    if zstd:
        try:
            import zstandard
        except ImportError:
            raise AgentError("this host's Python has no zstandard package; upload without compression") from None
        stream = zstandard.ZstdDecompressor().stream_reader(stream, read_across_frames=True)
    path = blob_path(root, digest)
    tmp = f"{path}.part-{os.getpid()}-{secrets.token_hex(4)}"
    hasher = hashlib.sha256()
    remaining = size
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as f:
            while remaining:
                chunk = stream.read(min(_CHUNK, remaining))
                if not chunk:
                    raise AgentError(f"blob {digest[:12]}: upload ended after {size - remaining} of {size} bytes")
                hasher.update(chunk)
                f.write(chunk)
                remaining -= len(chunk)
        # No fsync: see check_blob_after_reboot for how a blob that a crash may have damaged is caught.
        if hasher.hexdigest() != digest:
            raise AgentError(f"blob {digest[:12]}: content does not match its sha256; it was not stored")
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def write_blob(root: str, data: memoryview) -> tuple[str, int]:
    """Store a buffer produced on the host (an output); returns (digest, size)."""
    digest = hashlib.sha256(data).hexdigest()
    path = blob_path(root, digest)
    if not (os.path.exists(path) and os.path.getsize(path) == data.nbytes):
        atomic_write(path, data, durable=False)
    return digest, data.nbytes


def boot_time() -> float | None:
    """When this host last booted (Linux), or None when unknown."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            for line in f:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def map_blob(root: str, digest: str) -> Any:
    """A blob as a private, writable memory map: an input array costs no read and no copy.

    Pages are read when touched; writes go to private copies, never to the file.
    """
    path = blob_path(root, digest)
    size = os.path.getsize(path)
    if size == 0:
        return bytearray()
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    check_blob_after_reboot(path, digest, mapped)
    return mapped


def check_blob_after_reboot(path: str, digest: str, data: bytes | bytearray | None = None) -> None:
    """Verify a blob written before the last boot (once), then make it durable.

    Blobs are written without fsync (it cost more than the upload itself).
    Within one boot the page cache makes every completed write visible, so
    only a blob written before the last boot can have been damaged by a
    crash: such a blob is checked against its hash once, then fsynced and
    re-dated.  A damaged one is removed, and the next submit sends it again.
    """
    booted = boot_time()
    if booted is not None and os.path.getmtime(path) >= booted:
        return
    hasher = hashlib.sha256()
    if data is None:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                hasher.update(chunk)
    else:
        hasher.update(data)
    if hasher.hexdigest() != digest:
        _unlink_quietly(path)
        raise AgentError(f"blob {digest[:12]} was damaged on the host (a crash?); run the cell again to resend it")
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    os.utime(path)


# ---------------------------------------------------------------------- jobs
def jobs_dir(root: str) -> str:
    return ensure_dir(os.path.join(root, "jobs"))


def job_dir(root: str, job_id: str) -> str:
    if not job_id or "/" in job_id or job_id.startswith("."):
        raise AgentError(f"not a job id: {job_id!r}")
    path = os.path.join(jobs_dir(root), job_id)
    if not os.path.isdir(path):
        raise AgentError(f"no job {job_id} on this host (see `%remote_status`)")
    return path


def new_job_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def create_job(root: str, spec: dict[str, Any], inputs: bytes) -> tuple[str, str]:
    """Make the job directory with its spec, inputs and first event."""
    parent = jobs_dir(root)
    for _ in range(10):
        job_id = new_job_id()
        path = os.path.join(parent, job_id)
        try:
            os.mkdir(path, DIR_MODE)
            break
        except FileExistsError:
            continue
    else:
        raise AgentError("could not allocate a job id")
    spec = {**spec, "job_id": job_id, "submitted": time.time()}
    atomic_write(os.path.join(path, protocol.SPEC_FILE), json.dumps(spec).encode())
    atomic_write(os.path.join(path, protocol.INPUTS_FILE), inputs)
    EventLog(path).append(protocol.QUEUED, name=spec.get("name"))
    return job_id, path


def read_spec(path: str) -> dict[str, Any]:
    with open(os.path.join(path, protocol.SPEC_FILE), encoding="utf-8") as f:
        return json.load(f)


class EventLog:
    """Appends events to a job's events.jsonl with consecutive ``seq`` numbers.

    Only one process writes a job's log at a time: ``submit`` writes the
    first event, then the runner owns it; ``cancel`` writes only after the
    runner is gone.
    """

    def __init__(self, path: str) -> None:
        self.path = os.path.join(path, protocol.EVENTS_FILE)
        last = last_event(path)
        self.next_seq = 0 if last is None else last["seq"] + 1
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE)
        self._file = os.fdopen(fd, "a", encoding="utf-8")

    def append(self, type_: str, **fields: Any) -> dict[str, Any]:
        event = protocol.make_event(self.next_seq, type_, **fields)
        self._file.write(protocol.encode_event(event))
        self._file.flush()
        if type_ in protocol.TERMINAL:
            os.fsync(self._file.fileno())
        self.next_seq += 1
        return event

    def close(self) -> None:
        self._file.close()


def iter_event_lines(path: str, from_seq: int = 0) -> Iterator[tuple[int, str]]:
    """(seq, raw line) of the complete lines in a job's log, from ``from_seq``."""
    try:
        f = open(os.path.join(path, protocol.EVENTS_FILE), encoding="utf-8")
    except FileNotFoundError:
        return
    with f:
        for line in f:
            if not line.endswith("\n"):
                break  # a line being written right now; the next read gets it whole
            seq = json.loads(line)["seq"]
            if seq >= from_seq:
                yield seq, line


class EventTail:
    """Reads a job's events.jsonl incrementally, complete lines only."""

    def __init__(self, path: str) -> None:
        self.path = os.path.join(path, protocol.EVENTS_FILE)
        self._file: IO[bytes] | None = None
        self._partial = b""

    def __enter__(self) -> EventTail:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()

    def _open(self) -> IO[bytes] | None:
        if self._file is None:
            try:
                self._file = open(self.path, "rb")
            except FileNotFoundError:
                return None
        return self._file

    def has_unread(self) -> bool:
        f = self._open()
        if f is None:
            return False
        position = f.tell()
        more = f.read(1)
        f.seek(position)
        return bool(more)

    def read_lines(self) -> list[str]:
        """The complete lines written since the last call."""
        f = self._open()
        if f is None:
            return []
        data = self._partial + f.read()
        *lines, self._partial = data.split(b"\n")
        return [line.decode("utf-8") + "\n" for line in lines]


def last_event(path: str) -> dict[str, Any] | None:
    last = None
    for _, line in iter_event_lines(path):
        last = line
    return None if last is None else json.loads(last)


def read_pid(path: str) -> int | None:
    try:
        with open(os.path.join(path, protocol.PID_FILE), encoding="utf-8") as f:
            return int(f.read().strip())
    except (FileNotFoundError, ValueError):
        return None


def process_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    # A zombie (exited, not yet reaped) counts as gone.
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return True


def summarize(path: str) -> dict[str, Any]:
    """One job's row for ``status``: state, progress, last metrics, timing."""
    spec = read_spec(path)
    row: dict[str, Any] = {
        "job_id": spec["job_id"],
        "name": spec.get("name"),
        "submitted": spec.get("submitted"),
        "state": protocol.STATE_QUEUED,
        "epoch": None,
        "epochs": None,
        "logs": {},
        "started": None,
        "ended": None,
        "message": None,
        "pid": None,
        "device": None,
        "checkpoint": read_checkpoint_meta(path),
        "fetched": os.path.exists(os.path.join(path, protocol.FETCHED_MARK)),
    }
    for _, line in iter_event_lines(path):
        event = json.loads(line)
        kind = event["type"]
        if kind == protocol.STARTED:
            row.update(
                state=protocol.STATE_RUNNING, started=event["t"], pid=event.get("pid"), device=event.get("device")
            )
        elif kind == protocol.TRAIN_BEGIN:
            row["epochs"] = event.get("epochs")
        elif kind == protocol.EPOCH:
            row.update(epoch=event.get("epoch"), logs=event.get("logs", {}))
        elif kind in protocol.TERMINAL:
            row.update(state=protocol.final_state(event), ended=event["t"], message=event.get("message"))
    pid = read_pid(path)
    just_submitted = pid is None and time.time() - (spec.get("submitted") or 0) < 30
    if (
        row["state"] in (protocol.STATE_QUEUED, protocol.STATE_RUNNING)
        and not just_submitted
        and not process_alive(pid)
    ):
        row.update(
            state=protocol.STATE_KILLED,
            message="the runner process ended without a final event (killed, out of memory, or the host rebooted)",
        )
    return row


def unreferenced_blobs(root: str) -> list[str]:
    """Blobs that no job's inputs or outputs name (partial uploads included once stale)."""
    referenced: set[str] = set()
    parent = jobs_dir(root)
    for job_id in os.listdir(parent):
        path = os.path.join(parent, job_id)
        try:
            referenced.update(digest for digest, _ in read_spec(path).get("blobs", []))
        except (OSError, ValueError):
            continue
        last = last_event(path)
        if last is not None and last["type"] == protocol.DONE:
            referenced.update(digest for digest, _ in last.get("blobs", []))
    stale = time.time() - 3600
    unreferenced = []
    for name in os.listdir(blobs_dir(root)):
        digest = name.split(".", 1)[0]
        if digest in referenced:
            continue
        if "." in name and os.path.getmtime(os.path.join(blobs_dir(root), name)) > stale:
            continue  # an upload in progress right now
        unreferenced.append(name)
    return unreferenced


def read_checkpoint_meta(path: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(path, protocol.CHECKPOINT_DIR, protocol.CHECKPOINT_META), encoding="utf-8") as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return None


def list_jobs(root: str) -> list[dict[str, Any]]:
    rows = []
    parent = jobs_dir(root)
    for job_id in sorted(os.listdir(parent)):
        path = os.path.join(parent, job_id)
        if os.path.isfile(os.path.join(path, protocol.SPEC_FILE)):
            rows.append(summarize(path))
    return rows
