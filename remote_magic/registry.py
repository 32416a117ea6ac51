"""The local record of every job this machine submitted, across hosts.

One JSON line per job in ``<data dir>/jobs.jsonl``, so ``%remote_status``
can list jobs on every host and ``%remote_attach JOB`` finds the job's host
after a kernel restart.  Several kernels may write at once: every change
holds an exclusive ``flock`` and appends a single line.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import IO

from .paths import data_dir


@dataclass
class JobRecord:
    host: str
    job_id: str
    name: str | None = None
    notebook: str | None = None
    submitted: float = 0.0


class Registry:
    def __init__(self, path: str | None = None) -> None:
        self.path = path or os.path.join(data_dir(), "jobs.jsonl")

    @contextmanager
    def _locked(self, mode: str) -> Iterator[IO[str]]:
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, mode, encoding="utf-8") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield f
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def add(self, host: str, job_id: str, name: str | None = None, notebook: str | None = None) -> JobRecord:
        record = JobRecord(host, job_id, name, notebook, time.time())
        with self._locked("a") as f:
            f.write(json.dumps(asdict(record)) + "\n")
        return record

    def records(self) -> list[JobRecord]:
        if not os.path.exists(self.path):
            return []
        with self._locked("r") as f:
            f.seek(0)
            lines = f.read().splitlines()
        records = []
        for line in lines:
            try:
                records.append(JobRecord(**json.loads(line)))
            except (ValueError, TypeError):
                continue  # a line from a newer or broken writer: skip, never fail the listing
        return records

    def find(self, job_id: str) -> JobRecord | None:
        matches = [r for r in self.records() if r.job_id == job_id]
        return matches[-1] if matches else None

    def remove(self, host: str, job_ids: set[str]) -> None:
        """Forget jobs (after ``gc`` removed them from the host)."""
        with self._locked("r+") as f:
            f.seek(0)
            kept = [line for line in f.read().splitlines() if not _matches(line, host, job_ids)]
            f.seek(0)
            f.truncate()
            f.write("".join(line + "\n" for line in kept))


def _matches(line: str, host: str, job_ids: set[str]) -> bool:
    try:
        entry = json.loads(line)
    except ValueError:
        return False
    return entry.get("host") == host and entry.get("job_id") in job_ids
