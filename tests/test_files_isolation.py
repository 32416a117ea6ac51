"""What a job receives with --files is its own, and what --fetch brings back stays inside the job's folder.

Real jobs on the local host (the kernel's default in the tests): a sweep whose
two trials run at once, a cell that edits a shipped file and sets its mtime
back, a job that plants a link for ``--fetch``; and the client's own check of
whatever paths a host answers, with a scripted answer.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import run

from remote_magic import session
from remote_magic.agent.store import fetch
from remote_magic.errors import RemoteMagicError

ORIGINAL = '{"lr": 0.1}'
EDITED = '{"lr": 9.9}'  # the same size: only the bytes differ

SWEEP_CELL = """%%remote_train --host local --files config.json --sweep trials --parallel 2
import os, time


def wait_for(name):
    deadline = time.time() + 60
    while not os.path.exists(os.path.join(meeting, name)) and time.time() < deadline:
        time.sleep(0.05)
    return os.path.exists(os.path.join(meeting, name))


if role == "writer":
    met = wait_for("reader-started")  # both trials have placed their files
    with open("config.json", "r+") as f:  # in place: the same file, not a new one
        f.write(EDITED)
    open(os.path.join(meeting, "written"), "w").close()
else:
    open(os.path.join(meeting, "reader-started"), "w").close()
    met = wait_for("written")
seen = open("config.json").read()
"""


@pytest.fixture
def config(ip, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:  # type: ignore[no-untyped-def]
    """A notebook folder with config.json, the kernel in it."""
    folder = tmp_path / "nb"
    folder.mkdir()
    (folder / "config.json").write_text(ORIGINAL)
    monkeypatch.chdir(folder)
    return folder / "config.json"


def test_a_trial_that_writes_a_shipped_file_does_not_change_it_for_a_trial_running_beside_it(
    ip, config: Path, tmp_path: Path
) -> None:
    meeting = tmp_path / "meeting"
    meeting.mkdir()
    setup = f"trials = [{{'role': 'writer'}}, {{'role': 'reader'}}]\nmeeting = {str(meeting)!r}\nEDITED = {EDITED!r}\n"
    assert run(ip, setup).success
    result = run(ip, SWEEP_CELL)
    assert result.success, result.error_in_exec
    sweep = ip.user_ns["sweep"]
    writer, reader = (sweep.load(trial.number) for trial in sweep.trials)
    assert writer["seen"] == EDITED  # the writer's own copy changed
    assert writer["met"] and reader["met"], "the trials did not run at the same time"
    assert reader["seen"] == ORIGINAL
    assert config.read_text() == ORIGINAL


def test_an_edit_in_place_with_the_mtime_set_back_never_reaches_the_next_job(ip, config: Path) -> None:
    edit = (
        "%%remote_train --host local --files config.json\n"
        "import os\n"
        "st = os.stat('config.json')\n"
        "with open('config.json', 'r+') as f:\n"
        f"    f.write({EDITED!r})\n"
        "os.utime('config.json', ns=(st.st_atime_ns, st.st_mtime_ns))\n"
        "same_mtime = os.stat('config.json').st_mtime_ns == st.st_mtime_ns\n"
    )
    assert run(ip, edit).success
    assert ip.user_ns["same_mtime"]
    assert run(ip, "%%remote_train --host local --files config.json\ntext = open('config.json').read()\n").success
    assert ip.user_ns["text"] == ORIGINAL


def test_a_job_that_leaves_its_shipped_files_alone_keeps_no_copy_of_them(ip, config: Path) -> None:
    cell = "%%remote_train --host local --files config.json\nimport os\nhere = os.getcwd()\nopen('out.txt', 'w')\n"
    assert run(ip, cell).success
    here = Path(ip.user_ns["here"])
    assert (here / "out.txt").exists() and not (here / "config.json").exists()  # the disk is freed, its work kept


SECRET = b"-----BEGIN OPENSSH PRIVATE KEY----- not for the job\n"
PLANT = """%%remote_train --host local
import os
os.makedirs("a/b/c/d/.ssh")
open("a/b/c/d/.ssh/id_ed25519", "w").write("the job's own file")
os.symlink("a/b/c/d", "deep")
os.makedirs(".ssh")
open(".ssh/id_ed25519", "w").write("decoy: what the pattern names once the link is followed")
here = os.getcwd()
"""


def _everything_under(folder: Path) -> list[bytes]:
    return [path.read_bytes() for path in folder.rglob("*") if path.is_file() and not path.is_symlink()]


def test_fetch_through_a_link_and_dotdot_never_reads_outside_the_job_folder(ip, tmp_path: Path, monkeypatch) -> None:
    """``deep -> a/b/c/d``: ``deep/../../../..`` is the job's folder read by the kernel, far above it read as text."""
    kernel = tmp_path / "k1" / "k2" / "k3" / "nb"  # deep enough that a climb out of it stays in tmp_path
    kernel.mkdir(parents=True)
    monkeypatch.chdir(kernel)
    assert run(ip, PLANT).success
    pattern = "deep/../../../../.ssh/id_ed25519"
    secret = Path(os.path.normpath(os.path.join(ip.user_ns["here"], pattern)))  # where text-wise `..` leads
    assert not secret.is_relative_to(ip.user_ns["here"])
    secret.parent.mkdir(parents=True, exist_ok=True)
    secret.write_bytes(SECRET)
    job = ip.magics_manager.registry["RemoteMagics"].registry.records()[-1].job_id

    result = run(ip, f"%remote_fetch {job} {pattern}")
    assert not result.success
    assert "reaches outside the job's folder" in str(result.error_in_exec)
    assert SECRET not in _everything_under(tmp_path)
    blobs = Path(os.environ["REMOTE_MAGIC_DATA_DIR"])
    assert hashlib.sha256(SECRET).hexdigest() not in {p.name for p in blobs.rglob("*")}

    assert run(ip, f"%remote_fetch {job} deep/.ssh/id_ed25519").success  # through the link, inside: fine
    assert (kernel / "a/b/c/d/.ssh/id_ed25519").read_text() == "the job's own file"  # at its real path


def test_a_link_out_of_the_job_folder_is_refused_by_name(ip, tmp_path: Path, monkeypatch) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "key").write_bytes(SECRET)
    monkeypatch.chdir(tmp_path)
    assert run(ip, f"%%remote_train --host local\nimport os\nos.symlink({str(outside)!r}, 'out')\n").success
    job = ip.magics_manager.registry["RemoteMagics"].registry.records()[-1].job_id
    result = run(ip, f"%remote_fetch {job} 'out/*'")
    assert not result.success and "reaches outside the job's folder" in str(result.error_in_exec)
    assert [p for p in tmp_path.rglob("key")] == [outside / "key"]


def test_fetch_bounds_name_the_bound_what_matched_and_how_to_raise_it(ip, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cell = (
        "%%remote_train --host local\n"
        "import os\n"
        "os.makedirs('logs')\n"
        "for i in range(3):\n"
        "    open(f'logs/{i}.txt', 'wb').write(b'x' * (1 << 20))\n"
    )
    assert run(ip, cell).success
    job = ip.magics_manager.registry["RemoteMagics"].registry.records()[-1].job_id
    refusals = [
        ({"FILES": "2"}, "more than 2 files match", "%env REMOTE_MAGIC_FETCH_MAX_FILES="),
        ({"FILES": "3", "BYTES": "2MiB"}, "3 files match, 3.0 MiB in all, more than the 2.0 MiB", "MAX_BYTES=3MiB"),
    ]
    for settings, said, fix in refusals:
        for name, value in settings.items():
            monkeypatch.setenv(f"REMOTE_MAGIC_FETCH_MAX_{name}", value)
        result = run(ip, f"%remote_fetch {job} 'logs/*'")
        message = str(result.error_in_exec)
        assert not result.success and said in message and fix in message
        assert not (tmp_path / "logs").exists()

    monkeypatch.setenv("REMOTE_MAGIC_FETCH_MAX_BYTES", "3MiB")
    assert run(ip, f"%remote_fetch {job} 'logs/*'").success
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["0.txt", "1.txt", "2.txt"]


LOOPS = """%%remote_train --host local
import os
os.makedirs("logs")
open("logs/run.txt", "w").write("the job's log")
os.symlink(".", "a")
os.symlink(".", "b")
"""
FETCH_DEADLINE = 30  # seconds; a fetch of one file takes well under one


@pytest.mark.timeout(120)
def test_links_that_loop_never_hang_a_fetch_and_each_file_comes_back_once(ip, tmp_path: Path, monkeypatch) -> None:
    """``a -> .`` and ``b -> .``: a glob that follows them walks 2^40 paths before the bound is checked."""
    monkeypatch.chdir(tmp_path)
    assert run(ip, LOOPS).success
    job = ip.magics_manager.registry["RemoteMagics"].registry.records()[-1].job_id
    agent = ip.magics_manager.registry["RemoteMagics"].connections.get("local").link().pipe.process
    stopped = threading.Timer(FETCH_DEADLINE, agent.kill)  # the host's process ends with the wait, whatever it does
    stopped.start()
    try:
        started = time.monotonic()
        result = run(ip, f"%remote_fetch {job} '**/*.txt'")
        took = time.monotonic() - started
    finally:
        stopped.cancel()
        hung = agent.poll() is not None
    assert not hung and took < FETCH_DEADLINE, f"the fetch did not end within {FETCH_DEADLINE} s"
    assert result.success, result.error_in_exec
    fetched = [path for path in tmp_path.rglob("*.txt") if not path.is_symlink()]
    assert fetched == [tmp_path / "logs" / "run.txt"]
    assert fetched[0].read_text() == "the job's log"


def test_fetch_bounds_default_to_ten_thousand_files_and_twenty_gib() -> None:
    assert session.fetch_bounds(session.FileFetch(["x"], ".")) == (10_000, 20 << 30)
    assert session.fetch_bounds(session.FileFetch(["x"], ".", max_files=5, max_bytes=7)) == (5, 7)


# -- the client's own check of the host's answer ------------------------------------------------------


class ScriptedHost:
    """Answers fetch-files with the given paths (each file holds ``data``); records what was asked."""

    is_local = True
    host = "scripted"

    def __init__(self, rels: list[str], cwd: str, data: bytes = b"payload") -> None:
        self.data = data
        digest = hashlib.sha256(data).hexdigest()
        self.answer = {"files": [[rel, digest, len(data)] for rel in rels], "cwd": cwd}
        self.asked: list[tuple[str, ...]] = []

    def call_json(self, *args: str) -> dict[str, Any]:
        self.asked.append(args)
        return json.loads(json.dumps(self.answer))

    def fetch_files(self, job_id: str, patterns: list[str], max_files: int, max_bytes: int) -> dict[str, Any]:
        """What the typed call asks, answered with the script."""
        return self.call_json(
            "fetch-files", job_id, "--max-files", str(max_files), "--max-bytes", str(max_bytes), "--", *patterns
        )

    def get_blob_into(self, digest: str, size: int, f: Any) -> None:
        f.write(self.data)


def _snapshot(folder: Path) -> set[Path]:
    return {path for path in folder.rglob("*")}


@pytest.mark.parametrize(
    ("rel", "said"),
    [
        ("../../etc/x", "would land outside"),
        ("../../../../x", "would land outside"),
        ("/tmp/x", "absolute"),
        ("ok/../../../x", "would land outside"),
        ("a\x00b", "control characters"),
        ("a\nb", "control characters"),
        ("", "empty"),
    ],
)
def test_a_path_the_host_answers_outside_the_local_layout_is_refused(tmp_path: Path, rel: str, said: str) -> None:
    kernel = tmp_path / "a" / "b" / "c" / "proj" / "notebooks"  # a climb out of it stays in tmp_path
    kernel.mkdir(parents=True)
    before = _snapshot(tmp_path)
    host = ScriptedHost(["fine.txt", rel], cwd="notebooks")
    with pytest.raises(RemoteMagicError, match=said) as error:
        session.fetch_files(host, "20261127-103000-1a2b3c", session.FileFetch(["*"], str(kernel)))  # type: ignore[arg-type]
    assert "nothing was written" in str(error.value)
    assert _snapshot(tmp_path) == before  # not even the good file: every path is checked first


def test_the_local_layout_reaches_a_sibling_folder_and_no_further(tmp_path: Path) -> None:
    kernel = tmp_path / "proj" / "notebooks"
    kernel.mkdir(parents=True)
    request = session.FileFetch(["../models/*.keras"], str(kernel))
    host = ScriptedHost(["../models/m.keras"], cwd="notebooks")
    assert session.fetch_files(host, "20261127-103000-1a2b3c", request) == ["fetched: ../models/m.keras (7 bytes)"]  # type: ignore[arg-type]
    assert (tmp_path / "proj" / "models" / "m.keras").read_bytes() == b"payload"
    assert host.asked[0][:6] == (
        "fetch-files",
        "20261127-103000-1a2b3c",
        "--max-files",
        "10000",
        "--max-bytes",
        str(20 << 30),
    )
    assert host.asked[0][6:] == ("--", "../models/*.keras")

    # A host that claims the job ran deeper than this folder is: its word does not widen what may be written.
    deeper = ScriptedHost(["../../../x.keras"], cwd="tmp/proj/notebooks")
    with pytest.raises(RemoteMagicError, match="would land outside"):
        session.fetch_files(deeper, "20261127-103000-1a2b3c", request)  # type: ignore[arg-type]
    # The caller's own knowledge of the layout (the submission's cwd) is not second-guessed.
    known = session.FileFetch(["../models/*.keras"], str(kernel), layout_cwd="notebooks")
    assert session.fetch_files(ScriptedHost(["../models/n.keras"], cwd="x/y/z"), "20261127-103000-1a2b3c", known)  # type: ignore[arg-type]
    assert (tmp_path / "proj" / "models" / "n.keras").exists()


@pytest.mark.parametrize("rel", ["data/f", "data/sub/f", "deep/data/f"])
def test_a_local_link_out_of_the_layout_is_never_written_through(tmp_path: Path, rel: str) -> None:
    """``data -> <outside>`` in the local layout: the host's ``data/f`` is inside by name, outside in fact."""
    kernel, outside = tmp_path / "proj" / "notebooks", tmp_path / "outside"
    (kernel / "deep").mkdir(parents=True)
    outside.mkdir()
    for link in (kernel / "data", kernel / "deep" / "data"):
        link.symlink_to(outside)
    before = _snapshot(tmp_path)
    host = ScriptedHost(["fine.txt", rel], cwd="notebooks")
    with pytest.raises(RemoteMagicError, match="through a link") as error:
        session.fetch_files(host, "20261127-103000-1a2b3c", session.FileFetch(["*"], str(kernel)))  # type: ignore[arg-type]
    assert "nothing was written" in str(error.value)
    assert _snapshot(tmp_path) == before  # not even the good file: every path is checked first
    assert not list(outside.iterdir())


def test_a_link_planted_at_the_temporary_name_is_not_followed(tmp_path: Path, monkeypatch) -> None:
    kernel, outside = tmp_path / "nb", tmp_path / "outside"
    kernel.mkdir()
    outside.mkdir()
    monkeypatch.setattr(secrets, "token_hex", lambda nbytes=None: "0000")
    for name in (f"f.txt.part-{os.getpid()}", f"f.txt.part-{os.getpid()}-0000"):
        (kernel / name).symlink_to(outside / "planted")
    request = session.FileFetch(["*"], str(kernel))
    with contextlib.suppress(RemoteMagicError, OSError):  # refused, or written elsewhere: never through the link
        session.fetch_files(ScriptedHost(["f.txt"], cwd=""), "20261127-103000-1a2b3c", request)  # type: ignore[arg-type]
    assert not list(outside.iterdir())
    assert not (kernel / "f.txt").is_symlink()


@pytest.mark.parametrize(
    "answer",
    [
        {"files": [["a.txt", "../../etc/passwd", 3]]},
        {"files": [["a.txt", "0" * 64, -1]]},
        {"files": "a.txt"},
        [],
    ],
)
def test_a_malformed_answer_writes_nothing(tmp_path: Path, answer: object) -> None:
    host = ScriptedHost([], cwd="")
    host.answer = answer  # type: ignore[assignment]
    with pytest.raises(RemoteMagicError, match="not a list of"):
        session.fetch_files(host, "20261127-103000-1a2b3c", session.FileFetch(["*"], str(tmp_path)))  # type: ignore[arg-type]
    assert not list(tmp_path.iterdir())


def test_the_agent_refuses_bounds_below_one(tmp_path: Path) -> None:
    assert fetch.fetch_limit_problem(0, 5) and fetch.fetch_limit_problem(5, 0)
    assert fetch.fetch_limit_problem(1, 1) is None


@pytest.mark.parametrize("swap", ["file", "folder"])
def test_the_agent_reads_exactly_the_file_it_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, swap: str
) -> None:
    """Between the match and the read, the file (or a folder above it) becomes a link out of the job's folder."""
    root, job = tmp_path / "root", tmp_path / "root" / "jobs" / "j"
    (job / "work" / "logs").mkdir(parents=True)
    (job / "work" / "logs" / "run.txt").write_text("the job's log")
    outside = tmp_path / "outside"
    (outside / "logs").mkdir(parents=True)
    (outside / "logs" / "run.txt").write_bytes(SECRET)
    matching = fetch.matching_files

    def swapped_after_matching(*args: Any, **kwargs: Any) -> dict[str, str]:
        found = matching(*args, **kwargs)
        if swap == "file":
            (job / "work" / "logs" / "run.txt").unlink()
            (job / "work" / "logs" / "run.txt").symlink_to(outside / "logs" / "run.txt")
        else:
            (job / "work" / "logs" / "run.txt").unlink()
            (job / "work" / "logs").rmdir()
            (job / "work" / "logs").symlink_to(outside / "logs")
        return found

    monkeypatch.setattr(fetch, "matching_files", swapped_after_matching)
    with pytest.raises(fetch.jobs.AgentError, match="nothing was fetched"):
        fetch.store_files(str(root), str(job), {"cwd": ""}, ["logs/run.txt"])
    stored = [p.read_bytes() for p in (root / "blobs").iterdir() if p.is_file()]
    assert SECRET not in stored
