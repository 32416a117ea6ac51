"""One digest format on both ends: ``sha256:<hex>`` is written, bare hex (what earlier versions wrote) still read.

A blob, a cached output or a hashed file stored by an earlier version under bare hex is found again for
the named digest, and the other way round; what is no sha256 digest is refused, never taken as a path.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from pathlib import Path

import pytest
from test_fake_pipe import real_agent

from remote_magic.agent import digest, protocol
from remote_magic.agent.store import blobs, fetch, layout
from remote_magic.errors import AgentCommandError
from remote_magic.project import HashCache
from remote_magic.project import files as project_files
from remote_magic.transport.base import CommandResult
from remote_magic.transport.fake import FakeTransport
from remote_magic.wire import upload
from remote_magic.wire.cache import BlobCache
from remote_magic.wire.client import AgentClient

DATA = b"the same bytes, whichever name they go by\n" * 100
HEX = hashlib.sha256(DATA).hexdigest()
NAMED = f"sha256:{HEX}"


@pytest.mark.parametrize("given", [HEX, NAMED])
def test_bare_and_named_digests_are_one_digest(given: str) -> None:
    assert digest.split(given) == ("sha256", HEX)
    assert digest.normal(given) == NAMED
    assert digest.file_name(given) == HEX
    assert digest.of(DATA) == NAMED


@pytest.mark.parametrize(
    "junk",
    [f"sha1:{HEX}", HEX[:63], f"sha256:{HEX[:63]}", f"{HEX}0", "../../etc/passwd", f"blobs/{HEX}", f":{HEX}",
     f"sha256:sha256:{HEX}", HEX.upper(), f"{HEX}\n", "", None, 7],
)  # fmt: skip
def test_what_is_no_sha256_digest_is_refused(junk: object) -> None:
    assert digest.split(junk) is None and not digest.is_digest(junk)
    with pytest.raises(ValueError, match="not a sha256 digest"):
        digest.normal(junk)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a sha256 digest"):
        digest.file_name(junk)  # type: ignore[arg-type]


def test_a_cache_entry_stored_under_bare_hex_is_read_for_the_named_digest(tmp_path: Path) -> None:
    folder = tmp_path / "blobs"
    BlobCache(str(folder)).put(HEX, bytearray(DATA))  # as an earlier version stored it
    assert os.listdir(folder) == [HEX]
    cache = BlobCache(str(folder))
    assert cache.get(NAMED, len(DATA)) == DATA
    with open(tmp_path / "out", "wb") as out:
        assert cache.copy_out(NAMED, len(DATA), out)
    assert (tmp_path / "out").read_bytes() == DATA

    cache.put(NAMED, bytearray(DATA))  # stored again under its named digest: still one file, bare hex
    assert os.listdir(folder) == [HEX]
    assert cache.get(HEX, len(DATA)) == DATA


def test_the_cache_never_takes_a_host_answer_that_is_no_digest_as_a_path(tmp_path: Path) -> None:
    cache = BlobCache(str(tmp_path / "blobs"))
    cache.put("../escaped", bytearray(DATA))
    assert not (tmp_path / "escaped").exists() and cache.get("../escaped", len(DATA)) is None


@pytest.mark.parametrize(("stored", "asked"), [(HEX, NAMED), (NAMED, HEX)])
def test_a_host_blob_in_either_form_satisfies_missing_blobs_in_the_other(tmp_path: Path, stored, asked) -> None:
    root = str(tmp_path)
    assert blobs.missing_blobs(root, [(asked, len(DATA))]) == [asked]
    blobs.write_blob(root, memoryview(DATA), stored)
    assert os.listdir(blobs.blobs_dir(root)) == [HEX]  # the file keeps its bare-hex name
    assert blobs.missing_blobs(root, [(asked, len(DATA))]) == []


def test_a_hash_cache_entry_an_earlier_version_stored_as_bare_hex_is_read_named(tmp_path: Path) -> None:
    data = tmp_path / "data.bin"
    data.write_bytes(DATA)
    st = os.stat(data)
    cache = HashCache(str(tmp_path / "hashes.sqlite"))
    fake = "0" * 64  # not the content's digest: only the database can have answered it
    conn = cache._connect()
    assert conn is not None
    with conn:
        key = project_files._key(st)
        conn.execute("INSERT INTO hashes VALUES (?, ?, ?, ?, ?, ?, ?)", (str(data), *key, fake))
    conn.close()
    assert cache.digest(str(data)) == f"sha256:{fake}"


def test_a_hash_cache_row_written_now_is_the_bare_hex_an_earlier_release_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An earlier release sharing the cache file sends a row's digest as it finds it, to its own agent, which takes
    bare hex only: the row stays bare hex, and this release names it when it reads it."""
    monkeypatch.setattr(project_files, "_RACY_NS", 0)  # cache a file written just now
    data = tmp_path / "data.bin"
    data.write_bytes(DATA)
    path = tmp_path / "hashes.sqlite"
    assert HashCache(str(path)).digest(str(data)) == NAMED
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT path, size, digest FROM hashes").fetchall() == [(str(data), len(DATA), HEX)]
    finally:
        conn.close()

    def never(*args: object) -> str:
        raise AssertionError("hashed again: the row was not used")

    monkeypatch.setattr(project_files, "_hash_file", never)
    assert HashCache(str(path)).digest(str(data)) == NAMED


def test_a_junk_hash_cache_entry_is_hashed_again(tmp_path: Path) -> None:
    data = tmp_path / "data.bin"
    data.write_bytes(DATA)
    st = os.stat(data)
    path = tmp_path / "hashes.sqlite"
    HashCache(str(path)).digest(str(data))  # creates the table
    with sqlite3.connect(path) as conn:
        key = project_files._key(st)
        conn.execute("INSERT OR REPLACE INTO hashes VALUES (?, ?, ?, ?, ?, ?, ?)", (str(data), *key, "../x"))
    assert HashCache(str(path)).digest(str(data)) == NAMED


def test_fetched_files_are_listed_named_and_the_record_keeps_one_form(tmp_path: Path) -> None:
    root, job = tmp_path / "root", tmp_path / "root" / "jobs" / "j1"
    (job / layout.WORK_DIR).mkdir(parents=True)
    (job / layout.WORK_DIR / "out.bin").write_bytes(DATA)
    record = job / protocol.FETCHED_BLOBS_FILE
    record.write_text(f'["{HEX}"]')  # an earlier agent's record, bare hex
    assert fetch.store_files(str(root), str(job), {}, ["out.bin"]) == [["out.bin", NAMED, len(DATA)]]
    assert blobs.read_digests(str(record)) == [NAMED]
    assert os.path.exists(os.path.join(blobs.blobs_dir(str(root)), HEX))


def test_a_spec_entry_whose_digest_is_no_digest_is_refused() -> None:
    assert layout.entries_problem([["a.txt", NAMED, 3, 0o644], ["b.txt", HEX, 3, 0o644]], "files") is None
    assert "must be a list of [path, digest, size, mode]" in (
        layout.entries_problem([["a.txt", "../../etc/passwd", 3, 0o644]], "files") or ""
    )


class _Recorder:
    """What ``send_missing`` hands the client: small blobs go in one batch."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    def put_blobs(self, blobs: list[tuple[str, memoryview]]) -> None:
        self.sent += [name for name, _ in blobs]


@pytest.mark.parametrize(("listed", "missing"), [(NAMED, HEX), (HEX, NAMED)])
def test_a_blob_the_host_lacks_is_sent_whichever_form_it_names_it_in(listed: str, missing: str) -> None:
    client = _Recorder()
    source = upload.BlobSource(listed, len(DATA), buffer=memoryview(DATA))
    assert upload.send_missing(client, [source, source], {missing}) == len(DATA)  # type: ignore[arg-type]
    assert client.sent == [listed]


@pytest.mark.parametrize(("sent", "asked"), [(NAMED, HEX), (HEX, NAMED), (NAMED, NAMED)])
def test_a_blob_put_under_one_form_is_got_back_verified_under_the_other(tmp_path: Path, sent, asked) -> None:
    root = str(tmp_path / "host")
    client = AgentClient(FakeTransport(serve=real_agent(root), root=root))
    try:
        client.put_blob(sent, memoryview(DATA), compress="none")
        assert client.get_blob(asked, len(DATA)) == DATA
        other = DATA[::-1]
        blobs.write_blob(root, memoryview(other), f"sha256:{'1' * 64}")  # bytes that are not what the name says
        with pytest.raises(AgentCommandError, match=r"blob 111111111111 from host .* does not match its sha256"):
            client.get_blob(f"sha256:{'1' * 64}", len(other))
    finally:
        client.close(final=True)


@pytest.mark.parametrize(("scheduler", "argv"), [(None, ["hello"]), ("slurm", ["hello", "--scheduler", "slurm"])])
def test_hello_hands_the_host_its_scheduler(scheduler: str | None, argv: list[str]) -> None:
    seen: list[list[str]] = []

    def handler(command: list[str], stdin: bytes) -> CommandResult:
        seen.append(command)
        said = "slurm" if command[-2:] == ["--scheduler", "slurm"] else "process"  # the host answers what it heard
        hello = {"packages": {"numpy": "2", "cloudpickle": "3"}, "launcher": said}
        return CommandResult(0, json.dumps(hello).encode(), b"")

    client = AgentClient(FakeTransport(handler), scheduler=scheduler)
    try:
        assert client.hello()["launcher"] == ("slurm" if scheduler else "process")
        assert [command[-len(argv) :] for command in seen if "hello" in command] == [argv], seen
    finally:
        client.close(final=True)
    assert seen == [argv]
