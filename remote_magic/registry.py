"""The local record of every job this machine submitted, across hosts.

One JSON line per job in ``<data dir>/jobs.jsonl``, so ``%remote_status``
can list jobs on every host and ``%remote_attach JOB`` finds the job's host
after a kernel restart.  Several kernels may write at once: every access holds
a ``flock`` on ``jobs.lock`` beside it.  The lock lives in its own file because
``remove`` replaces ``jobs.jsonl`` with a new file (a new inode): a lock on the
old one would let a waiting writer append to a file that is already gone.

A sweep's trials are ordinary job records that also carry ``sweep`` (its id,
the trial's number and parameters, and how the sweep ranks its trials), so
``%remote_attach sweep-...`` finds every trial after a kernel restart.
Records without it (every job before sweeps) read as they always did.

The file is read leniently and rewritten conservatively: a line that is not a
job record (damaged, cut short by a killed writer, or written by a newer
version) is skipped when listing and kept byte for byte when rewriting.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

from .paths import data_dir


@dataclass
class JobRecord:
    host: str
    job_id: str
    name: str | None = None
    notebook: str | None = None
    submitted: float = 0.0
    sweep: dict[str, Any] | None = None  # {"id", "trial", "params", "metric", "mode", "name"} for a sweep's trial


class Registry:
    def __init__(self, path: str | None = None) -> None:
        self.path = path or os.path.join(data_dir(), "jobs.jsonl")
        self.lock_path = os.path.splitext(self.path)[0] + ".lock"

    @contextmanager
    def _locked(self, exclusive: bool) -> Iterator[None]:
        os.makedirs(os.path.dirname(self.path) or ".", mode=0o700, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield  # closing the descriptor releases the lock
        finally:
            os.close(fd)

    def add(
        self,
        host: str,
        job_id: str,
        name: str | None = None,
        notebook: str | None = None,
        sweep: dict[str, Any] | None = None,
    ) -> JobRecord:
        record = JobRecord(host, job_id, name, notebook, time.time(), sweep)
        fields = asdict(record)
        if sweep is None:
            del fields["sweep"]  # a plain job's line stays as before sweeps
        line = json.dumps(fields).encode() + b"\n"
        with self._locked(exclusive=True):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                if not _ends_a_line(fd):
                    line = b"\n" + line  # a killed writer left half a line: never glue this record onto it
                _write_all(fd, line)
            finally:
                os.close(fd)
        return record

    def records(self) -> list[JobRecord]:
        if not os.path.exists(self.path):
            return []
        with self._locked(exclusive=False):
            lines = self._read_lines()
        return [record for record in map(_parse, lines) if record is not None]

    def find(self, job_id: str) -> JobRecord | None:
        matches = [r for r in self.records() if r.job_id == job_id]
        return matches[-1] if matches else None

    def sweep(self, sweep_id: str) -> list[JobRecord]:
        """The trials of a sweep, in trial order."""
        trials = [r for r in self.records() if r.sweep and r.sweep.get("id") == sweep_id]
        return sorted(trials, key=lambda r: r.sweep["trial"] if r.sweep else 0)

    def remove(self, host: str, job_ids: set[str]) -> None:
        """Forget jobs (after ``gc`` removed them from the host).

        The rest goes to a new file that replaces the old one only once it is complete, so a
        crash or a full disk halfway leaves the old file as it was.
        """
        if not os.path.exists(self.path):
            return
        with self._locked(exclusive=True):
            lines = self._read_lines()
            kept = [line for line in lines if not _matches(line, host, job_ids)]
            if len(kept) == len(lines):
                return
            tmp = f"{self.path}.tmp-{secrets.token_hex(4)}"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    _write_all(fd, b"".join(kept))
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, self.path)
            except BaseException:
                _unlink_quietly(tmp)
                raise

    def _read_lines(self) -> list[bytes]:
        """The file's lines as bytes, each with its newline (the last one may lack it)."""
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return []
        lines = data.split(b"\n")
        return [line + b"\n" for line in lines[:-1]] + ([lines[-1]] if lines[-1] else [])


def _parse(line: bytes) -> JobRecord | None:
    """The record a line holds, or None for anything else; unknown fields (a newer version's) are ignored."""
    try:
        entry: Any = json.loads(line.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError is one too
        return None
    if not isinstance(entry, dict):
        return None
    host, job_id = entry.get("host"), entry.get("job_id")
    name, notebook = entry.get("name"), entry.get("notebook")
    submitted = entry.get("submitted", 0.0)
    if not (isinstance(host, str) and isinstance(job_id, str)):
        return None
    if not all(value is None or isinstance(value, str) for value in (name, notebook)):
        return None
    if isinstance(submitted, bool) or not isinstance(submitted, int | float):
        return None
    sweep = entry.get("sweep")
    if not (isinstance(sweep, dict) and isinstance(sweep.get("id"), str) and isinstance(sweep.get("trial"), int)):
        sweep = None  # a damaged sweep part leaves a plain job record
    return JobRecord(host, job_id, name, notebook, submitted, sweep)


def _matches(line: bytes, host: str, job_ids: set[str]) -> bool:
    record = _parse(line)
    return record is not None and record.host == host and record.job_id in job_ids


def _ends_a_line(fd: int) -> bool:
    size = os.fstat(fd).st_size
    return size == 0 or os.pread(fd, 1, size - 1) == b"\n"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
