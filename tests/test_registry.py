"""The local job registry: shared by kernels that write at the same time."""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import signal
import sys

from remote_magic.registry import Registry


def _add_many(path: str, host: str, count: int) -> None:
    registry = Registry(path)
    for number in range(count):
        registry.add(host, f"{host}-{number}", name="x" * 200)


def test_two_writers_at_once_lose_no_record(tmp_path) -> None:
    path = str(tmp_path / "jobs.jsonl")
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_add_many, args=(path, host, 300)) for host in ("a", "b")]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(60)
    records = Registry(path).records()
    assert len(records) == 600
    assert {r.job_id for r in records} == {f"{h}-{n}" for h in ("a", "b") for n in range(300)}


def test_remove_forgets_only_the_named_jobs_of_that_host(tmp_path) -> None:
    registry = Registry(str(tmp_path / "jobs.jsonl"))
    for host, job in (("a", "1"), ("a", "2"), ("b", "1")):
        registry.add(host, job)
    registry.remove("a", {"1"})
    assert [(r.host, r.job_id) for r in registry.records()] == [("a", "2"), ("b", "1")]
    assert registry.find("1").host == "b"


def _line(host: str, job_id: str) -> bytes:
    return (
        json.dumps({"host": host, "job_id": job_id, "name": None, "notebook": None, "submitted": 1.0}).encode() + b"\n"
    )


_NOT_UTF8 = b'{"host": "a", "job_id": "\xff\xfe"}\n'
_NOT_JOBS = [b"[1, 2]\n", b'"x"\n', b"3\n", b"null\n", b"\n", b'{"host": "a"}\n', b'{"host": 7, "job_id": "n"}\n']
_NOT_JOBS += [b'{"host": "a", "job_id": "s", "submitted": "yesterday"}\n', b'{"host": "a", "job_id": "1", "name": 2}\n']
_CUT = b'{"host": "a", "job_id": "cut-he'  # a writer killed mid-line: no newline at the end


def test_a_line_that_is_not_utf8_is_skipped_and_kept(tmp_path) -> None:
    path = tmp_path / "jobs.jsonl"
    path.write_bytes(_line("a", "1") + _NOT_UTF8 + _line("b", "2"))
    registry = Registry(str(path))
    assert [(r.host, r.job_id) for r in registry.records()] == [("a", "1"), ("b", "2")]
    registry.remove("a", {"1"})
    assert path.read_bytes() == _NOT_UTF8 + _line("b", "2")


def test_lines_that_are_not_job_objects_are_skipped_and_kept(tmp_path) -> None:
    path = tmp_path / "jobs.jsonl"
    path.write_bytes(_line("a", "1") + b"".join(_NOT_JOBS) + _line("b", "2"))
    registry = Registry(str(path))
    assert [(r.host, r.job_id) for r in registry.records()] == [("a", "1"), ("b", "2")]
    registry.remove("a", {"1", "s"})
    assert path.read_bytes() == b"".join(_NOT_JOBS) + _line("b", "2")


def test_an_add_after_a_cut_line_starts_a_line_of_its_own(tmp_path) -> None:
    path = tmp_path / "jobs.jsonl"
    path.write_bytes(_line("a", "1") + _CUT)
    registry = Registry(str(path))
    registry.add("c", "3")
    registry.add("c", "4")
    assert [(r.host, r.job_id) for r in registry.records()] == [("a", "1"), ("c", "3"), ("c", "4")]
    assert path.read_bytes().startswith(_line("a", "1") + _CUT + b"\n{")


def test_a_damaged_registry_loses_no_record(tmp_path) -> None:
    """Lines this version cannot read may come from a newer one: forgetting a job must not drop them."""
    path = tmp_path / "jobs.jsonl"
    damaged = _line("a", "1") + _NOT_UTF8 + b"[1, 2]\n" + _line("b", "2") + _CUT
    path.write_bytes(damaged)
    registry = Registry(str(path))
    registry.add("c", "3")
    added = path.read_bytes()[len(damaged) :]
    assert [(r.host, r.job_id) for r in registry.records()] == [("a", "1"), ("b", "2"), ("c", "3")]
    registry.remove("b", {"2"})
    assert [(r.host, r.job_id) for r in registry.records()] == [("a", "1"), ("c", "3")]
    assert path.read_bytes() == _line("a", "1") + _NOT_UTF8 + b"[1, 2]\n" + _CUT + added
    registry.remove("a", {"1", "cut-he"})
    assert [(r.host, r.job_id) for r in registry.records()] == [("c", "3")]
    assert registry.find("3").host == "c"


def test_a_record_with_fields_of_a_newer_version_is_listed(tmp_path) -> None:
    path = tmp_path / "jobs.jsonl"
    path.write_bytes(b'{"host": "a", "job_id": "1", "submitted": 5, "sweep": "s1"}\n')
    registry = Registry(str(path))
    assert [(r.host, r.job_id, r.submitted) for r in registry.records()] == [("a", "1", 5)]
    registry.remove("a", {"1"})
    assert registry.records() == []


def _remove_with_a_full_disk(path: str) -> None:
    """Simulates running out of space (or being killed) halfway through rewriting the file."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails with EFBIG instead of a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (100, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    try:
        Registry(path).remove("a", {"0"})
    except OSError:
        sys.exit(3)


def test_a_rewrite_that_fails_halfway_loses_no_record(tmp_path) -> None:
    path = tmp_path / "jobs.jsonl"
    registry = Registry(str(path))
    for number in range(20):
        registry.add("a", str(number))
    before = path.read_bytes()
    remover = multiprocessing.get_context("spawn").Process(target=_remove_with_a_full_disk, args=(str(path),))
    remover.start()
    remover.join(60)
    assert remover.exitcode == 3
    assert path.read_bytes() == before
    assert [name for name in os.listdir(tmp_path) if name.startswith("jobs.jsonl")] == ["jobs.jsonl"]
    registry.remove("a", {"0"})
    assert [r.job_id for r in registry.records()] == [str(n) for n in range(1, 20)]


def _remove_repeatedly(path: str, count: int) -> None:
    registry = Registry(path)
    for number in range(count):
        registry.add("r", f"r-{number}")
        registry.remove("r", {f"r-{number}"})


def test_adds_racing_with_removes_lose_no_record(tmp_path) -> None:
    """``remove`` rewrites the file; an ``add`` in another kernel meanwhile must land in the new one."""
    path = str(tmp_path / "jobs.jsonl")
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_add_many, args=(path, host, 300)) for host in ("a", "b")]
    workers.append(context.Process(target=_remove_repeatedly, args=(path, 300)))
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert [worker.exitcode for worker in workers] == [0, 0, 0]
    records = Registry(path).records()
    assert sorted(r.job_id for r in records) == sorted(f"{h}-{n}" for h in ("a", "b") for n in range(300))
