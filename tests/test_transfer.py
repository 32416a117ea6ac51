"""Data moves once: dedup, corrupt blobs re-sent, multi-GiB round trips, warm runners."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import run
from host_processes import processes_under

from remote_magic import session
from remote_magic.wire.client import AgentClient

MiB = 1024 * 1024


def _transport(ip) -> AgentClient:
    return ip.magics_manager.registry["RemoteMagics"]._client("testhost")


def test_rerun_uploads_no_blob_bytes_and_a_changed_array_only_itself(ip) -> None:
    ip.user_ns["a"] = np.random.default_rng(1).random(2 * MiB // 8)
    ip.user_ns["b"] = np.random.default_rng(2).random(2 * MiB // 8)
    cell = "%%remote_train --host testhost\ntotal = float(a.sum() + b.sum())\n"
    assert run(ip, cell).success
    transport = _transport(ip)

    sent = transport.bytes_sent
    assert run(ip, cell).success
    assert transport.bytes_sent - sent < 64 * 1024  # the spec and small pickle only, no blob

    ip.user_ns["b"] = ip.user_ns["b"] + 1
    sent = transport.bytes_sent
    assert run(ip, cell).success
    assert 2 * MiB <= transport.bytes_sent - sent < 2 * MiB + 64 * 1024  # b only, not a


def test_a_truncated_blob_on_the_host_is_detected_and_sent_again(ip, sshd) -> None:
    data = np.random.default_rng(3).random(MiB // 8)
    digest = hashlib.sha256(memoryview(data).cast("B")).hexdigest()
    ip.user_ns["data"] = data
    assert run(ip, "%%remote_train --host testhost\ns = float(data.sum())\n").success
    blob = sshd.host_root / "blobs" / digest
    blob.write_bytes(blob.read_bytes()[: MiB // 2])  # a disk problem, a killed upload
    assert run(ip, "%%remote_train --host testhost\ns2 = float(data.sum())\n").success
    assert ip.user_ns["s2"] == pytest.approx(float(data.sum()))
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == digest


def test_a_blob_that_does_not_match_its_hash_is_never_stored(ip) -> None:
    transport = _transport(ip)
    payload = os.urandom(1000)
    wrong = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(Exception, match="does not match its sha256"):
        transport.call("put-blob", wrong, str(len(payload)), stdin=payload)
    assert wrong in transport.submit({"source": "", "outputs": [], "blobs": [[wrong, 1000]]}, b"")["missing"]


@pytest.mark.slow
def test_two_gib_round_trip_over_ssh_keeps_every_byte(ip) -> None:
    size = 2 * 1024 * MiB
    big = np.frombuffer(np.random.default_rng(4).bytes(size), dtype=np.uint8)
    expected = hashlib.sha256(big).hexdigest()
    ip.user_ns["big"] = big
    result = run(
        ip,
        "%%remote_train --host testhost\ndigest = __import__('hashlib').sha256(big).hexdigest()\nback = big[::-1].copy()\n",
    )
    assert result.success, result.error_in_exec
    assert ip.user_ns["digest"] == expected  # the host received every byte
    back = ip.user_ns["back"]
    assert back.nbytes == size and hashlib.sha256(back[::-1].copy()).hexdigest() == expected


def test_a_warm_runner_starts_the_next_job_and_shares_no_state(ip) -> None:
    transport = ip.magics_manager.registry["RemoteMagics"]._client("local")
    first = session.submit(transport, session.prepare("import json\njson.leaked_by_job_1 = True\n", {}))
    session.follow(transport, first, lambda event: None)
    events: list[dict] = []
    for _ in range(50):  # the warm runner needs a moment to start after the first job
        events.clear()
        job = session.submit(transport, session.prepare("import json\nleak = hasattr(json, 'leaked_by_job_1')\n", {}))
        final = session.follow(transport, job, events.append)
        if next(e for e in events if e["type"] == "started").get("warm"):
            break
    else:
        pytest.fail("no job started in a warm runner")
    assert session.fetch_outputs(transport, job, final)["leak"] is False


def test_jobs_forked_from_one_warm_runner_draw_their_own_random_numbers(ip) -> None:
    """Each job is a fork of the same warm runner, which imported torch (seeding its generator): without a
    reseed in the fork, every job would draw the same numbers."""
    transport = ip.magics_manager.registry["RemoteMagics"]._client("local")
    cell = "import numpy as np, torch\nr = (float(torch.rand(1)), float(np.random.rand()))\n"
    draws: dict[int, list] = {}
    for _ in range(50):
        events: list[dict] = []
        job = session.submit(transport, session.prepare(cell, {}))
        final = session.follow(transport, job, events.append)
        started = next(e for e in events if e["type"] == "started")
        if started.get("warm_runner"):  # after the first job, the warm runner imports torch too
            runner = draws.setdefault(started["warm_runner"], [])
            runner.append(session.fetch_outputs(transport, job, final)["r"])
            if len(runner) == 2:
                break
    pair = next((d for d in draws.values() if len(d) == 2), None)
    assert pair is not None, draws  # two forks of one warm runner that had imported torch
    assert pair[0][0] != pair[1][0] and pair[0][1] != pair[1][1], pair


def test_a_killed_warm_runner_is_replaced(ip) -> None:
    """Out of memory or kill -9: its ready file stays behind; the next jobs must not take it for a live runner."""
    transport = ip.magics_manager.registry["RemoteMagics"]._client("local")
    root = Path(transport.transport.root)

    def started_of_a_job() -> dict:
        events: list[dict] = []
        session.follow(transport, session.submit(transport, session.prepare("x = 1\n", {})), events.append)
        return next(e for e in events if e["type"] == "started")

    started_of_a_job()
    deadline = time.monotonic() + 60
    while not list((root / "warm").glob("*.ready")) and time.monotonic() < deadline:
        time.sleep(0.1)
    killed = [json.loads(p.read_text())["pid"] for p in (root / "warm").glob("*.ready")]
    assert killed
    for pid in killed:
        with contextlib.suppress(ProcessLookupError):  # one that ended meanwhile left its file too
            os.kill(pid, signal.SIGKILL)
    for _ in range(50):
        started = started_of_a_job()
        if started.get("warm"):
            break
    assert started.get("warm") and started["warm_runner"] not in killed, started


def _warm_runners(root: Path) -> list[int]:
    def is_warm_runner(pid: int) -> bool:
        with contextlib.suppress(OSError):
            return b"warm-runner" in Path(f"/proc/{pid}/cmdline").read_bytes()
        return False

    return [pid for pid in processes_under(root) if is_warm_runner(pid)]


def test_warm_stop_leaves_no_warm_runner_and_the_next_job_still_runs(ip) -> None:
    """A one-shot run (``make demo``) ends its warm runners: the one a job's end prepared, ready or still starting."""
    magics = ip.magics_manager.registry["RemoteMagics"]
    magics._background.join(60)  # the warm-up at %load_ext is over: it would start a runner after the stop
    client = magics._client("local")
    root = Path(client.transport.root)
    session.follow(client, session.submit(client, session.prepare("x = 1\n", {})), lambda event: None)
    deadline = time.monotonic() + 60
    while not _warm_runners(root) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _warm_runners(root), "the job's end prepares a warm runner"
    assert client.stop_warm_runners() >= 1
    deadline = time.monotonic() + 30
    while _warm_runners(root) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _warm_runners(root) == []
    assert not list((root / "warm").glob("*.ready")) and not list((root / "warm").glob("*.starting"))
    final = session.follow(client, session.submit(client, session.prepare("y = 2\n", {})), lambda event: None)
    assert final["type"] == "done"


PREWARM_SCRIPT = """
import sys, time
from IPython.testing.globalipapp import start_ipython
ip = start_ipython()
ip.run_line_magic("config", f"RemoteMagics.prewarm = {sys.argv[1]}")
ip.run_line_magic("load_ext", "remote_magic")
time.sleep(float(sys.argv[2]))  # a user reading, or building a model: no cell has asked for the host
"""


@pytest.mark.parametrize("prewarm", [True, False])
def test_loading_the_extension_starts_the_default_hosts_warm_runner_before_any_cell(tmp_path, prewarm) -> None:
    env = {**os.environ, "REMOTE_MAGIC_DATA_DIR": str(tmp_path / "data"), "KERAS_BACKEND": "tensorflow"}
    kernel = subprocess.Popen([sys.executable, "-c", PREWARM_SCRIPT, str(prewarm), "60"], env=env)
    warm = tmp_path / "data" / "local" / "warm"
    try:
        deadline = time.monotonic() + (60 if prewarm else 8)
        while time.monotonic() < deadline and not list(warm.glob("*.ready")):
            time.sleep(0.1)
        ready = list(warm.glob("*.ready"))
        assert bool(ready) is prewarm, ready
    finally:
        kernel.kill()
        kernel.wait()
        for file in warm.glob("*.ready"):
            with contextlib.suppress(OSError, ValueError, KeyError):
                os.kill(json.loads(file.read_text())["pid"], signal.SIGTERM)


POOL_SCRIPT = """
import json, sys, time
from pathlib import Path
from IPython.testing.globalipapp import start_ipython
ip = start_ipython()
ip.run_line_magic("load_ext", "remote_magic")
warm = Path(sys.argv[1])
deadline = time.monotonic() + 60
while not list(warm.glob("*.ready")) and time.monotonic() < deadline:
    time.sleep(0.1)
for n in range(4):  # back to back, no pause
    assert ip.run_cell(f"%%remote_train\\ny = {n} + 1\\n", store_history=False).success
    assert ip.user_ns["y"] == n + 1
print(json.dumps([json.loads(p.read_text())["pid"] for p in warm.glob("*.ready")]))
"""


def test_warm_runners_stay_one_per_kind_and_exit_when_idle(tmp_path) -> None:
    """Cells back to back are served by forks of one waiting runner (the pool never grows), and a runner
    that no job claims for REMOTE_MAGIC_WARM_IDLE seconds exits and leaves no file behind."""
    env = {**os.environ, "REMOTE_MAGIC_DATA_DIR": str(tmp_path / "data"), "REMOTE_MAGIC_WARM_IDLE": "4"}
    warm = tmp_path / "data" / "local" / "warm"
    out = subprocess.run(
        [sys.executable, "-c", POOL_SCRIPT, str(warm)], env=env, capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stderr[-3000:]
    waiting = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(waiting) == 1, waiting  # one kind (this kernel's backend): one runner
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (Path(f"/proc/{waiting[0]}").exists() or list(warm.glob("*.fifo"))):
        time.sleep(0.2)
    assert not Path(f"/proc/{waiting[0]}").exists(), "the idle warm runner did not exit"
    left = sorted(p.suffix for p in warm.iterdir())
    assert left == [".lock", ".log"], left  # no ready file, no FIFO: only the kind's start lock and its log


def test_zstd_upload_sends_fewer_bytes_and_the_host_gets_the_same_array(ip) -> None:
    ip.user_ns["sparse"] = np.zeros(8 * MiB // 8)
    ip.user_ns["sparse"][::1000] = 1.0
    transport = _transport(ip)
    sent = transport.bytes_sent
    cell = "%%remote_train --host testhost --compress zstd\ncount = int(sparse.sum())\n"
    assert run(ip, cell).success
    assert transport.bytes_sent - sent < MiB  # 8 MiB of mostly zeros
    assert ip.user_ns["count"] == 1049


def test_auto_never_compresses_for_the_local_host(ip) -> None:
    ip.user_ns["zeros"] = np.zeros(4 * MiB // 8)
    transport = ip.magics_manager.registry["RemoteMagics"]._client("local")
    sent = transport.bytes_sent
    assert run(ip, "%%remote_train --compress auto\nn = zeros.size\n").success
    assert transport.bytes_sent - sent >= 4 * MiB


def test_a_sweeps_trials_hash_a_shared_array_once_and_each_other_array_by_itself(monkeypatch) -> None:
    from remote_magic.project import payload

    shared = np.random.default_rng(3).random(MiB // 8)
    own = [np.full(MiB // 8, float(i)) for i in range(2)]
    packed = [payload.pack({"data": shared, "mine": own[i], "p": i}, {}, hash_buffers=False) for i in range(2)]
    hashed = []
    real_of = payload.digests.of
    monkeypatch.setattr(payload.digests, "of", lambda data: hashed.append(len(data)) or real_of(data))
    seen: dict = {}
    for p in packed:
        p.hash(seen)

    assert len(hashed) == 3  # the shared array once, each trial's own array once
    for p, mine in zip(packed, own, strict=True):
        digests = dict(zip([b.obj is shared for b in p.buffers], [d for d, _ in p.blobs], strict=True))
        assert digests[True] == real_of(memoryview(shared).cast("B"))
        assert digests[False] == real_of(memoryview(mine).cast("B"))
