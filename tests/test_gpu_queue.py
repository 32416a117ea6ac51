"""The GPU queue of a host, on simulated GPUs: a fake ``nvidia-smi`` (tests/fake_nvidia_smi.py) on the PATH.

Every test here runs on a host whose GPUs are simulated: nothing touches a
real GPU.  The embedded ``local`` host with a root of its own is the GPU host:
its agent, dispatcher and runners inherit this process's PATH, so they all
see the fake.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import fake_nvidia_smi as fake
import pytest
from conftest import run
from host_processes import kill_processes_under, processes_under

from remote_magic.agent.digest import file_name
from remote_magic.agent.launch import warm

SLEEP_CELL = (
    "import os, time\n"
    "seen = os.environ.get('CUDA_VISIBLE_DEVICES')\n"
    "began = time.time()\n"
    "time.sleep({seconds})\n"
    "ended = time.time()\n"
)


@pytest.fixture
def gpu_host(ip, tmp_path, monkeypatch) -> Iterator[Path]:  # type: ignore[no-untyped-def]
    """A host with 4 simulated GPUs: `--host gpuhost` is the local host with its own root; yields the state file."""
    state = fake.write_state(tmp_path / "gpus.json", gpus=4)
    fake.install(tmp_path / "bin", state)
    monkeypatch.setenv("PATH", fake.path_with(tmp_path / "bin"))
    monkeypatch.setenv("REMOTE_MAGIC_GPU_SAMPLE_SECONDS", "0.3")
    root = tmp_path / "hostroot"
    magics = ip.magics_manager.registry["RemoteMagics"]
    magics.hosts = {**magics.hosts, "local": {"root": str(root)}}
    magics.connections.close()
    yield state
    kill_processes_under(root)
    magics.connections.close()


def _root(ip) -> Path:  # type: ignore[no-untyped-def]
    return Path(ip.magics_manager.registry["RemoteMagics"].hosts["local"]["root"])


def _events(root: Path, job_id: str) -> list[dict]:
    path = root / "jobs" / job_id / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _final(root: Path, job_id: str) -> dict | None:
    events = _events(root, job_id)
    return events[-1] if events and events[-1]["type"] in ("done", "error", "cancelled") else None


def _wait_all_ended(root: Path, job_ids: list[str], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(_final(root, j) for j in job_ids):
            return
        time.sleep(0.2)
    raise AssertionError({j: (_events(root, j)[-1:] or [None])[0] for j in job_ids})


def _submitted(ip) -> list[str]:  # type: ignore[no-untyped-def]
    return [r.job_id for r in ip.magics_manager.registry["RemoteMagics"].registry.records()]


def _started(root: Path, job_id: str) -> dict:
    return next(e for e in _events(root, job_id) if e["type"] == "started")


def _outputs(root: Path, job_id: str) -> dict:
    """What the job assigned, loaded from its outputs on the host."""
    from remote_magic.project import payload

    path = root / "jobs" / job_id
    done = _final(root, job_id)
    assert done is not None and done["type"] == "done", done
    buffers = [(root / "blobs" / file_name(digest)).read_bytes() for digest, _ in done.get("blobs", [])]
    return payload.unpack((path / "outputs.pkl").read_bytes(), buffers)


def test_detached_jobs_run_in_queue_order_with_no_client_connected_simulated_gpus(ip, gpu_host) -> None:
    before = set(_submitted(ip))
    for i in range(3):
        assert run(ip, f"%%remote_train --gpus all --detach --name q{i}\n" + SLEEP_CELL.format(seconds=1)).success
    jobs = [j for j in _submitted(ip) if j not in before]
    root = _root(ip)
    # Every agent server and connection goes: only the host's dispatcher is left to start the rest.
    magics = ip.magics_manager.registry["RemoteMagics"]
    magics.stop_background()
    magics.connections.close()
    for pid in processes_under(root):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        if b"serve" in cmdline.split(b"\0"):
            os.kill(pid, signal.SIGKILL)
    _wait_all_ended(root, jobs)
    runs = [(_outputs(root, j)["began"], _outputs(root, j)["ended"]) for j in jobs]
    assert [b for b, _ in runs] == sorted(b for b, _ in runs)  # queue order
    assert all(runs[i][1] <= runs[i + 1][0] for i in range(2))  # one at a time: each holds all 4 GPUs
    assert all(_outputs(root, j)["seen"] == "0,1,2,3" for j in jobs)
    waited = [e for e in _events(root, jobs[2]) if e["type"] == "queued" and e.get("reason")]
    assert waited and waited[0]["reason"].startswith("waiting for 4 GPUs")


def test_six_jobs_from_two_kernels_never_share_a_gpu_simulated_gpus(ip, gpu_host, tmp_path) -> None:
    root = _root(ip)
    magics = ip.magics_manager.registry["RemoteMagics"]
    script = textwrap.dedent(
        f"""
        import os
        os.environ["REMOTE_MAGIC_PANEL"] = "text"
        from IPython.testing.globalipapp import start_ipython
        ip = start_ipython()
        ip.run_line_magic("load_ext", "remote_magic")
        magics = ip.magics_manager.registry["RemoteMagics"]
        magics.hosts = {{"local": {{"root": {str(root)!r}}}}}
        for i in range(3):
            result = ip.run_cell_magic("remote_train", "--gpus 2 --detach --no-inject", {SLEEP_CELL.format(seconds=1.5)!r})
        for record in magics.registry.records():
            print("JOB", record.job_id, flush=True)
        """
    )
    env = dict(os.environ, REMOTE_MAGIC_DATA_DIR=str(tmp_path / "other-kernel"))
    other = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
    before = set(_submitted(ip))
    for _ in range(3):
        assert run(ip, "%%remote_train --gpus 2 --detach --no-inject\n" + SLEEP_CELL.format(seconds=1.5)).success
    out, _ = other.communicate(timeout=120)
    theirs = [line.split()[1] for line in out.splitlines() if line.startswith("JOB ")]
    ours = [j for j in _submitted(ip) if j not in before]
    assert len(theirs) == 3 and len(ours) == 3
    jobs = ours + theirs
    shown = repr(ip.run_line_magic("remote_status", "--host local"))
    _wait_all_ended(root, jobs)
    assert magics is not None
    runs = [(o["began"], o["ended"], set(o["seen"].split(","))) for o in (_outputs(root, j) for j in jobs)]
    assert all(len(gpus) == 2 for _, _, gpus in runs)
    for began, _, _ in runs:  # at any moment at most two jobs run: 4 GPUs, 2 each
        assert sum(1 for b, e, _ in runs if b <= began < e) <= 2
    for i, (b1, e1, g1) in enumerate(runs):
        overlapping = [g2 for j, (b2, e2, g2) in enumerate(runs) if j != i and b2 < e1 and b1 < e2]
        assert all(not (g1 & g2) for g2 in overlapping)  # never the same GPU at the same time
    assert "queued #" in shown or all(_started(root, j) for j in jobs)


def test_a_foreign_process_holding_memory_makes_its_gpu_busy_simulated_gpus(ip, gpu_host) -> None:
    fake.save_state(gpu_host, {**fake.read_state(gpu_host), "processes": [{"gpu": 0, "pid": 4242, "memory": 20480}]})
    before = set(_submitted(ip))
    assert run(ip, "%%remote_train --gpu-ids 0 --detach --no-inject\n" + SLEEP_CELL.format(seconds=0)).success
    [job] = [j for j in _submitted(ip) if j not in before]
    root = _root(ip)
    time.sleep(1.0)
    assert _final(root, job) is None
    row = next(r for r in ip.magics_manager.registry["RemoteMagics"]._client("local").status() if r["job_id"] == job)
    assert row["state"] == "queued"
    assert row["reason"] == "waiting for GPU 0: 0 by another process (pid 4242)", row["reason"]
    fake.save_state(gpu_host, {**fake.read_state(gpu_host), "processes": []})  # it let go
    _wait_all_ended(root, [job])
    assert _outputs(root, job)["seen"] == "0"


def test_cancel_of_a_queued_job_and_a_killed_job_frees_its_gpus_simulated_gpus(ip, gpu_host) -> None:
    root = _root(ip)
    before = set(_submitted(ip))
    assert run(ip, "%%remote_train --gpus all --detach --no-inject\n" + SLEEP_CELL.format(seconds=60)).success
    assert run(ip, "%%remote_train --gpus 1 --detach --no-inject\n" + SLEEP_CELL.format(seconds=0)).success
    assert run(ip, "%%remote_train --gpus 1 --detach --no-inject\n" + SLEEP_CELL.format(seconds=0)).success
    holder, cancelled, waiting = [j for j in _submitted(ip) if j not in before]
    deadline = time.monotonic() + 30
    while not any(e["type"] == "started" for e in _events(root, holder)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert run(ip, f"%remote_cancel {cancelled}").success
    assert _final(root, cancelled)["type"] == "cancelled"
    assert not any(e["type"] == "started" for e in _events(root, cancelled))  # it never ran

    launch = json.loads((root / "jobs" / holder / "launch.json").read_text())
    os.kill(launch["identity"]["pid"], signal.SIGKILL)  # out of memory, say: its GPUs are free again
    _wait_all_ended(root, [waiting])
    assert _outputs(root, waiting)["seen"] == "0"


def test_gpu_samples_reach_the_panel_and_the_peak_is_shown_simulated_gpus(ip, gpu_host, capsys) -> None:
    fake.update_gpu(gpu_host, 0, utilization=87, memory_used=30720)
    assert run(ip, "%%remote_train --gpus 1\nimport time\ntime.sleep(1.5)\nx = 1\n").success
    shown = capsys.readouterr().out
    assert "GPU 0 of 4 × NVIDIA H100 80GB HBM3" in shown  # the GPU it holds, not every GPU of the host
    assert "peak GPU memory: GPU 0 30.0 GiB" in shown
    job = _submitted(ip)[-1]
    samples = [e for e in _events(_root(ip), job) if e["type"] == "gpu"]
    assert samples and samples[0]["gpus"][0]["utilization"] == 87  # a replay shows them too


def test_the_default_is_one_gpu_and_impossible_requests_are_refused_before_upload(ip, gpu_host, capsys) -> None:
    assert run(ip, "%%remote_train\nimport os\nseen = os.environ.get('CUDA_VISIBLE_DEVICES')\n").success
    assert ip.user_ns["seen"] == "0"
    assert "using 1 of 4 GPUs; --gpus all for all" in capsys.readouterr().out
    assert run(ip, "%%remote_train --gpus 0\nimport os\nseen = os.environ.get('CUDA_VISIBLE_DEVICES')\n").success
    assert ip.user_ns["seen"] == ""  # no GPU: none visible
    for option, said in [
        ("--gpus 5", "host local has 4 GPUs"),
        ("--gpu-ids 7", "host local has GPUs 0 to 3"),
        ("--gpus 2 --gpu-ids 1", "do not go together"),
        ("--gpus many", "takes a number of GPUs"),
    ]:
        result = run(ip, f"%%remote_train {option}\nx = 1\n")
        assert not result.success and said in str(result.error_in_exec), (option, result.error_in_exec)


def test_gpu_options_on_a_host_without_gpus_are_refused(ip) -> None:
    for option in ("--gpus 1", "--gpu-ids 0", "--gpus all"):
        result = run(ip, f"%%remote_train --host testhost {option}\nx = 1\n")
        assert not result.success and "has no GPUs" in str(result.error_in_exec), option


def test_a_warm_runner_that_loaded_the_cuda_driver_never_serves_a_gpu_job(tmp_path) -> None:
    """A runner whose imports loaded libcuda may have initialised every GPU: CUDA_VISIBLE_DEVICES set later
    would not hold, so such a runner is never claimed for a job on a GPU host."""
    root = str(tmp_path)
    kind = warm.RunnerKind.of_this_process()
    key = kind.key("agenthash")
    folder = tmp_path / "warm"
    folder.mkdir()
    (folder / f"{key}-1.ready").write_text(json.dumps({"pid": 1, "fifo": "/nonexistent", "cuda": True}))
    assert warm.claim(root, "agenthash", kind, "20261127-000000-abcdef", cuda_untouched=True) is None
    assert (folder / f"{key}-1.ready").exists()  # left for a CPU job


def test_busy_gpu_memory_is_a_host_setting_simulated_gpus(ip, gpu_host) -> None:
    """20 GiB used by someone else's process: busy under the default (1 GiB), free under a 32 GiB setting."""
    fake.save_state(gpu_host, {**fake.read_state(gpu_host), "processes": [{"gpu": 0, "pid": 4242, "memory": 20480}]})
    magics = ip.magics_manager.registry["RemoteMagics"]
    magics.hosts = {"local": {**magics.hosts["local"], "busy_gpu_memory": "32GiB"}}
    assert run(ip, "%%remote_train --gpu-ids 0\nimport os\nseen = os.environ['CUDA_VISIBLE_DEVICES']\n").success
    assert ip.user_ns["seen"] == "0"
    magics.hosts = {"local": {**magics.hosts["local"], "busy_gpu_memory": "lots"}}
    result = run(ip, "%%remote_train --gpu-ids 0\nx = 1\n")
    assert not result.success and "busy_gpu_memory" in str(result.error_in_exec)


def test_a_waiting_jobs_log_grows_by_its_state_changes_not_by_another_process_memory_simulated_gpus(
    ip, gpu_host
) -> None:
    """The reason names the process holding the GPU, not its memory, which moves all the time."""
    fake.save_state(gpu_host, {**fake.read_state(gpu_host), "processes": [{"gpu": 0, "pid": 4242, "memory": 20480}]})
    before = set(_submitted(ip))
    assert run(ip, "%%remote_train --gpu-ids 0 --detach --no-inject\n" + SLEEP_CELL.format(seconds=0)).success
    [job] = [j for j in _submitted(ip) if j not in before]
    root = _root(ip)
    for memory in range(2048, 2048 + 12 * 512, 512):  # a training process's memory, moving every half second
        fake.save_state(
            gpu_host, {**fake.read_state(gpu_host), "processes": [{"gpu": 0, "pid": 4242, "memory": memory}]}
        )
        time.sleep(0.5)
    waited = [e["reason"] for e in _events(root, job) if e["type"] == "queued" and e.get("reason")]
    assert waited == ["waiting for GPU 0: 0 by another process (pid 4242)"], waited
    fake.save_state(gpu_host, {**fake.read_state(gpu_host), "processes": []})
    _wait_all_ended(root, [job])


def test_a_record_an_older_agent_wrote_still_starts_from_the_private_spec_simulated_gpus(ip, gpu_host) -> None:
    """An entry in the old format (with the agent version and root it named) is started, and what it names
    is never used: the agent comes from the job's own spec."""
    before = set(_submitted(ip))
    assert run(ip, "%%remote_train --gpus all --detach --no-inject\n" + SLEEP_CELL.format(seconds=2)).success
    assert run(ip, "%%remote_train --gpus all --detach --no-inject\n" + SLEEP_CELL.format(seconds=0)).success
    holder, waiting = [j for j in _submitted(ip) if j not in before]
    root = _root(ip)
    [entry] = [p for p in (root / "queue").glob("*.json") if waiting in p.name]
    old = {"job_id": waiting, "agent": "/nonexistent/agent", "t": time.time() + 10**6, "busy_mib": 1}
    entry.write_text(json.dumps(old | {"uid": os.getuid(), "user": "x", "root": str(root), "sweep": None}))
    _wait_all_ended(root, [holder, waiting])
    assert _outputs(root, waiting)["seen"] == "0,1,2,3"
    assert _started(root, waiting)["t"] >= _outputs(root, holder)["ended"]
