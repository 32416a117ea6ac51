"""The local job registry: shared by kernels that write at the same time."""

from __future__ import annotations

import multiprocessing

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
