"""``%%remote_train`` on a Slurm host: a real single-node Slurm (tests/slurm_cluster.py), reached through a test sshd.

The agent runs on the "login node" over SSH and submits with sbatch; the
job runs on the cluster's one node.  The node's 4 GPUs are a SIMULATION
(device nodes in gres.conf), so Slurm hands out real CUDA_VISIBLE_DEVICES
on a machine without GPUs.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import MODEL_CELL, PYTHON, run
from notebooks import execute, texts, write_profile
from slurm_cluster import SlurmCluster
from sshd import Sshd, make_sshd

HOST = "cluster"


@pytest.fixture(scope="module")
def login_node(slurm_cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    """The cluster's login node: an sshd whose sessions find the cluster (SLURM_CONF)."""
    server = make_sshd(tmp_path_factory.mktemp("login"), alias=HOST)
    server.add_env(slurm_cluster.env())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def cluster_ip(ip, login_node: Sshd, slurm_cluster: SlurmCluster):  # type: ignore[no-untyped-def]
    """The kernel, with host ``cluster`` set up as a Slurm host; the cluster is idle before and after each test."""
    slurm_cluster.wait_idle()
    magics = ip.magics_manager.registry["RemoteMagics"]
    magics.ssh_config = str(login_node.ssh_config)
    magics.hosts = {HOST: {"python": PYTHON, "scheduler": "slurm", "signal_grace": 30}}
    yield ip
    magics.stop_background()
    magics.connections.close()
    slurm_cluster.cancel_all()


def _job_ids(ip) -> list[str]:  # type: ignore[no-untyped-def]
    return [r.job_id for r in ip.magics_manager.registry["RemoteMagics"].registry.records()]


def _submit(ip, options: str, cell: str) -> str:  # type: ignore[no-untyped-def]
    before = set(_job_ids(ip))
    result = run(ip, f"%%remote_train --host {HOST} {options}\n{cell}")
    assert result.success, result.error_in_exec
    [job] = [j for j in _job_ids(ip) if j not in before]
    return job


def _row(ip, job: str) -> dict:  # type: ignore[no-untyped-def]
    client = ip.magics_manager.registry["RemoteMagics"]._client(HOST)
    return next(r for r in client.status() if r["job_id"] == job)


def _wait_row(ip, job: str, ready, timeout: float = 60) -> dict:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    row = _row(ip, job)
    while time.monotonic() < deadline and not ready(row):
        time.sleep(0.3)
        row = _row(ip, job)
    assert ready(row), row
    return row


def _slurm_id(login_node: Sshd, job: str) -> str:
    return json.loads((login_node.host_root / "jobs" / job / "slurm.json").read_text())["id"]


GPU_CELL = "import os, time\nseen = os.environ.get('CUDA_VISIBLE_DEVICES')\ntime.sleep({s})\n"


def test_a_keras_fit_through_slurm_streams_every_epoch_and_brings_the_model_back(cluster_ip, capsys) -> None:
    ip = cluster_ip
    assert run(ip, MODEL_CELL).success
    capsys.readouterr()
    result = run(ip, f"%%remote_train --host {HOST}\nhistory = model.fit(x_train, y_train, epochs=3, verbose=0)\n")
    assert result.success, result.error_in_exec
    out = capsys.readouterr().out
    model = ip.user_ns["model"]
    changed = [not np.array_equal(a, b) for a, b in zip(model.get_weights(), ip.user_ns["weights_before"], strict=True)]
    assert all(changed) and model.predict(ip.user_ns["x_train"][:3], verbose=0).shape == (3, 1)
    epochs = [line.split(" - ")[0] for line in out.splitlines() if line.startswith("Epoch ")]
    assert epochs == [f"Epoch {i}/3" for i in range(1, 4)]
    assert (
        "(Slurm job " in out and "node " in out and "injected: history (assigned); model (changed by the cell)" in out
    )


def test_gpus_come_from_slurm_two_jobs_get_disjoint_devices_and_a_third_waits_simulated_gpus(
    cluster_ip, login_node: Sshd
) -> None:
    ip = cluster_ip
    jobs = [_submit(ip, "--gpus 2 --detach --no-inject", GPU_CELL.format(s=4)) for _ in range(3)]
    waiting = _wait_row(ip, jobs[2], lambda r: r["state"] == "queued" and r.get("reason") == "Resources", 30)
    assert waiting["launcher"] == "slurm: PENDING"
    rows = [_wait_row(ip, j, lambda r: r["state"] == "done", 90) for j in jobs]
    assert all(r["state"] == "done" for r in rows)
    seen = []
    for job in jobs:
        events = [json.loads(line) for line in (login_node.host_root / "jobs" / job / "events.jsonl").open()]
        started = next(e for e in events if e["type"] == "started")
        seen.append(set(map(int, started["device"].get("indices", []))))
        assert started["slurm"]["id"] == _slurm_id(login_node, job)
    assert len(seen[0]) == len(seen[1]) == 2 and not seen[0] & seen[1]
    queued = [e for e in map(json.loads, (login_node.host_root / "jobs" / jobs[2] / "events.jsonl").open())]
    assert any(e["type"] == "queued" and e.get("reason") == "Resources" for e in queued)


def test_cancel_while_pending_and_while_running(cluster_ip, slurm_cluster: SlurmCluster, login_node: Sshd) -> None:
    ip = cluster_ip
    hold = _submit(ip, "--gpus 4 --detach --no-inject", GPU_CELL.format(s=60))
    _wait_row(ip, hold, lambda r: r["state"] == "running", 30)
    pending = _submit(ip, "--gpus 1 --detach --no-inject", GPU_CELL.format(s=0))
    _wait_row(ip, pending, lambda r: r["state"] == "queued", 30)
    ip.run_line_magic("remote_cancel", f"{pending} --host {HOST}")
    assert _row(ip, pending)["state"] == "cancelled"
    assert slurm_cluster.squeue(int(_slurm_id(login_node, pending)))["state"] == "CANCELLED"
    ip.run_line_magic("remote_cancel", f"{hold} --host {HOST}")
    row = _row(ip, hold)
    assert row["state"] == "cancelled", row
    slurm_cluster.wait_state(int(_slurm_id(login_node, hold)), "CANCELLED", "COMPLETED", "FAILED", timeout=40)


def test_slurm_options_are_checked_before_anything_is_sent(cluster_ip) -> None:
    ip = cluster_ip
    for options, words in [
        ("--gpus all", "Slurm picks the GPUs"),
        ("--gpu-ids 0", "Slurm picks the GPUs"),
        ("--partition nosuchpartition", "Slurm refused the job"),
    ]:
        before = set(_job_ids(ip))
        result = run(ip, f"%%remote_train --host {HOST} {options}\nx = 1\n")
        assert not result.success and words in str(result.error_in_exec), (options, result.error_in_exec)
        assert "x" not in ip.user_ns
        for job in set(_job_ids(ip)) - before:  # a refused job is over, never left waiting
            assert _row(ip, job)["state"] == "error"
    result = run(ip, "%%remote_train --host local --time 1:00\nx = 1\n")
    assert not result.success and "not a Slurm host" in str(result.error_in_exec)


def test_a_login_node_without_sbatch_is_a_clear_error(ip, tmp_path: Path) -> None:
    """A host set as Slurm whose agent finds no sbatch (its PATH has no Slurm): the error says what to do."""
    server = make_sshd(tmp_path / "nosbatch", alias=HOST)
    server.add_env({"PATH": str(tmp_path / "empty")})
    server.start()
    magics = ip.magics_manager.registry["RemoteMagics"]
    try:
        magics.ssh_config = str(server.ssh_config)
        magics.hosts = {HOST: {"python": PYTHON, "scheduler": "slurm"}}
        before = set(_job_ids(ip))
        result = run(ip, f"%%remote_train --host {HOST}\nx = 1\n")
        assert not result.success
        message = str(result.error_in_exec)
        assert "sbatch is not on the PATH" in message and "'setup'" in message, message
        assert all(_row(ip, job)["state"] == "error" for job in set(_job_ids(ip)) - before)
    finally:
        magics.connections.close()
        server.stop()


SLOW_FIT = """
import time
import keras

class Slow(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        time.sleep(0.7)

history = model.fit(x_train, y_train, epochs=8, batch_size=32, verbose=0, callbacks=[Slow()])
"""


def _log(login_node: Sshd, job: str) -> list[dict]:
    path = login_node.host_root / "jobs" / job / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _wait_event(login_node: Sshd, job: str, ready, timeout: float = 60) -> list[dict]:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = _log(login_node, job)
        if ready(events):
            return events
        time.sleep(0.2)
    raise AssertionError(_log(login_node, job)[-5:])


def _preempted_fit_resumes(  # type: ignore[no-untyped-def]
    ip, login_node: Sshd, slurm_cluster: SlurmCluster, preempt, capsys, release: bool = True
) -> list[dict]:
    """Run SLOW_FIT detached, preempt it at epoch 3, let Slurm start it again, follow it to the end.

    ``release``: start the requeued job at once rather than after Slurm's own delay (~2 min).
    """
    assert run(ip, MODEL_CELL).success
    job = _submit(ip, "--detach", SLOW_FIT)
    _wait_event(login_node, job, lambda events: any(e["type"] == "epoch" and e["epoch"] >= 3 for e in events))
    slurm_id = _slurm_id(login_node, job)
    preempt(slurm_id)
    _wait_event(login_node, job, lambda events: any(e["type"] == "requeued" for e in events))
    slurm_cluster.wait_state(int(slurm_id), "PENDING", timeout=60)
    assert _row(ip, job)["state"] == "requeued"
    if release:
        slurm_cluster.release(int(slurm_id))
    capsys.readouterr()
    ip.run_line_magic("remote_attach", f"{job} --host {HOST}")
    out = capsys.readouterr().out
    events = _log(login_node, job)
    assert [e["epoch"] for e in events if e["type"] == "epoch"] == list(range(1, 9))  # each epoch once
    assert [e["slurm"]["restarts"] for e in events if e["type"] == "started"] == [0, 1]
    assert "requeued at epoch" in out and "resumed from its checkpoint at epoch" in out and "lost" not in out
    epochs = [line.split(" - ")[0] for line in out.splitlines() if line.startswith("Epoch ")]
    assert epochs == [f"Epoch {i}/8" for i in range(1, 9)], out
    model, history = ip.user_ns["model"], ip.user_ns["history"]
    changed = [not np.array_equal(a, b) for a, b in zip(model.get_weights(), ip.user_ns["weights_before"], strict=True)]
    assert all(changed) and model.predict(ip.user_ns["x_train"][:3], verbose=0).shape == (3, 1)
    assert len(history.history["loss"]) == 8 and history.epoch == list(range(8))
    assert int(model.optimizer.iterations.numpy()) >= 8 * 8  # 256 samples / 32: the optimizer went on, not anew
    return events


@pytest.mark.timeout(420)
def test_a_time_limit_warning_usr2_checkpoints_requeues_and_resumes_after_slurms_own_delay(
    cluster_ip, login_node: Sshd, slurm_cluster: SlurmCluster, capsys
) -> None:
    """The one test that waits out Slurm's requeue delay (BeginTime, ~2 min): the panel follows the job through it."""

    def usr2(slurm_id: str) -> None:
        slurm_cluster.run("scancel", "--signal=USR2", "--batch", slurm_id)

    started = time.monotonic()
    events = _preempted_fit_resumes(cluster_ip, login_node, slurm_cluster, usr2, capsys, release=False)
    print(f"requeue cycle with Slurm's own delay: {time.monotonic() - started:.0f} s")
    [requeued] = [e for e in events if e["type"] == "requeued"]
    assert requeued["reason"].startswith("time limit") and requeued["epoch"] >= 3


def test_a_preemption_by_sigterm_that_slurm_requeues_resumes(
    cluster_ip, login_node: Sshd, slurm_cluster: SlurmCluster, capsys
) -> None:
    def preempt(slurm_id: str) -> None:  # as PreemptMode=REQUEUE does: SIGTERM, then Slurm requeues the job
        slurm_cluster.run("scontrol", "requeue", slurm_id)

    events = _preempted_fit_resumes(cluster_ip, login_node, slurm_cluster, preempt, capsys)
    [requeued] = [e for e in events if e["type"] == "requeued"]
    assert requeued["reason"].startswith("preempted")


SWEEP_CELL = (
    "import time\n"
    "began = time.time()\n"
    "for step in range(1, 4):\n"
    "    time.sleep(0.5)\n"
    "    remote_log(step=step, total=3, score=lr * units * step, loss=1 / (lr * units * step))\n"
    "ended = time.time()\n"
)


def test_a_2x2_sweep_is_one_job_array_with_two_tasks_at_a_time(cluster_ip, login_node: Sshd, capsys) -> None:
    ip = cluster_ip
    ip.user_ns["grid"] = {"lr": [1.0, 2.0], "units": [1, 3]}
    result = run(ip, f"%%remote_train --host {HOST} --sweep grid --parallel 2\n" + SWEEP_CELL)
    assert result.success, result.error_in_exec
    sweep = ip.user_ns["sweep"]
    rows = sweep.results
    assert len(rows) == 4 and all(r["state"] == "done" for r in rows)
    assert sorted(r["score"] for r in rows) == pytest.approx([3.0, 6.0, 9.0, 18.0])
    assert sweep.best_trial().params == {"lr": 2.0, "units": 3}  # loss is the metric: lowest wins
    ids = [_slurm_id(login_node, t.job_id) for t in sweep.trials]
    arrays = {i.split("_")[0] for i in ids}
    assert len(arrays) == 1 and sorted(int(i.split("_")[1]) for i in ids) == [0, 1, 2, 3]  # one array
    spans = [(sweep.load(t.number)["began"], sweep.load(t.number)["ended"]) for t in sweep.trials]
    assert max(sum(1 for b, e in spans if b <= begin < e) for begin, _ in spans) <= 2


def test_a_root_the_compute_node_cannot_see_is_a_clear_error_simulated(cluster_ip, login_node: Sshd) -> None:
    """SIMULATED unshared root: the job's setup line re-runs its script in a private mount namespace where a
    tmpfs hides the host root, as on a compute node that lacks the login node's filesystem."""
    ip = cluster_ip
    root = login_node.host_root
    hide = (
        f'[ -n "$HIDDEN" ] || HIDDEN=1 exec unshare -m --propagation private '
        f'sh -c "mount -t tmpfs none {root} && exec bash $0"'
    )
    magics = ip.magics_manager.registry["RemoteMagics"]
    magics.hosts = {HOST: {**magics.hosts[HOST], "setup": [hide]}}
    before = set(_job_ids(ip))
    result = run(ip, f"%%remote_train --host {HOST}\nx = 1\n")
    assert not result.success
    message = str(result.error_in_exec)
    assert "never started" in message and "filesystem they share" in message, message
    assert "x" not in ip.user_ns
    [job] = set(_job_ids(ip)) - before
    row = _row(ip, job)
    assert row["state"] == "killed" and "host root" in row["message"]
    output = next((root / "jobs" / job).glob("slurm-*.out")).read_text()
    assert "cannot see the job folder" in output


DDP_CELL = """
import os
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
net = torch.nn.Linear(4, 1)
ddp = torch.nn.parallel.DistributedDataParallel(net)
optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05)
data = torch.Generator().manual_seed(100 + rank)  # each task its own batches: DDP averages the gradients
for step in range(1, 6):
    x = torch.randn(16, 4, generator=data)
    loss = ((ddp(x) - x.sum(1, keepdim=True)) ** 2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    remote_log(step=step, total=5, loss=loss.item())
torch.save(net.state_dict(), f"weights-{rank}.pt")
dist.destroy_process_group()
"""


def test_two_tasks_train_pytorch_ddp_to_identical_weights(cluster_ip, login_node: Sshd, capsys) -> None:
    import torch

    ip = cluster_ip
    capsys.readouterr()
    before = set(_job_ids(ip))
    result = run(ip, f"%%remote_train --host {HOST} --tasks 2\n" + DDP_CELL)
    assert result.success, result.error_in_exec
    [job] = set(_job_ids(ip)) - before
    out = capsys.readouterr().out
    assert [line.split(" - ")[0] for line in out.splitlines() if line.startswith("Step ")] == [
        f"Step {i}/5" for i in range(1, 6)
    ], out  # task 0's rows, each once
    assert ip.user_ns["rank"] == 0 and ip.user_ns["world"] == 2
    saved = {p.name: torch.load(p) for p in (login_node.host_root / "jobs" / job / "work").rglob("weights-*.pt")}
    assert sorted(saved) == ["weights-0.pt", "weights-1.pt"]
    for name, tensor in saved["weights-0.pt"].items():
        assert torch.equal(tensor, saved["weights-1.pt"][name])  # both ranks: the same weights
    returned = ip.user_ns["net"].state_dict()
    assert all(torch.equal(returned[name], tensor) for name, tensor in saved["weights-0.pt"].items())
    torch.manual_seed(0)
    assert not torch.equal(returned["weight"], torch.nn.Linear(4, 1).weight)  # it trained from the same start


def test_the_slurm_example_notebook_runs_on_the_test_cluster(
    login_node: Sshd, slurm_cluster, tmp_path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """examples/notebooks/04_slurm.ipynb in a real kernel, its host ``cluster`` configured as its first cell says."""
    slurm_cluster.wait_idle()
    hosts = {HOST: {"python": PYTHON, "scheduler": "slurm", "time": "0:30:00"}}
    folder = write_profile(tmp_path / "ipython", ssh_config=str(login_node.ssh_config), hosts=hosts, panel="text")
    monkeypatch.setenv("IPYTHONDIR", str(folder))
    nb = execute(Path(__file__).resolve().parent.parent / "examples" / "notebooks" / "04_slurm.ipynb")
    shown = {cell.source.splitlines()[0]: texts(cell) for cell in nb.cells if cell.cell_type == "code"}
    fit = shown["%%remote_train --host cluster --time 0:10:00 --name slurm-fit"]
    assert re.findall(r"Epoch \d/5", fit) == [f"Epoch {i}/5" for i in range(1, 6)] and "(Slurm job " in fit
    evaluated = next(text for source, text in shown.items() if source.startswith("loss, accuracy"))
    assert "epochs trained: 5" in evaluated and float(evaluated.rsplit(": ", 1)[1]) > 0.7
    assert "4 trials; best: {" in shown["best = sweep.best_trial()"]
    assert "injected: net, world" in shown["%%remote_train --host cluster --tasks 2 --out net,world"]
    assert "trained with 2 tasks" in next(
        text for source, text in shown.items() if source.startswith('print(f"trained')
    )
    status = shown["%remote_status --host cluster"]
    assert "slurm-fit" in status and "done" in status


def test_stop_ends_the_fit_after_the_batch_and_the_partial_model_comes_back(
    cluster_ip, login_node: Sshd, capsys
) -> None:
    ip = cluster_ip
    assert run(ip, MODEL_CELL).success
    job = _submit(ip, "--detach", SLOW_FIT)
    _wait_event(login_node, job, lambda events: any(e["type"] == "epoch" and e["epoch"] >= 2 for e in events))
    assert ip.magics_manager.registry["RemoteMagics"]._client(HOST).stop(job)["stop_requested"]
    ip.run_line_magic("remote_attach", f"{job} --host {HOST}")
    done = _log(login_node, job)[-1]
    assert done["type"] == "done" and done["stopped"]
    epochs = len(ip.user_ns["history"].history["loss"])
    assert 2 <= epochs < 8  # stopped early, with what it had
    model = ip.user_ns["model"]
    assert not np.array_equal(model.get_weights()[0], ip.user_ns["weights_before"][0])


def test_a_runner_killed_on_its_node_shows_as_killed_with_slurms_word(
    cluster_ip, login_node: Sshd, slurm_cluster: SlurmCluster
) -> None:
    """SIGKILL on the node (out of memory, say): no final event; the row says what Slurm saw, never a silent drop."""
    ip = cluster_ip
    job = _submit(ip, "--detach --no-inject", GPU_CELL.format(s=60))
    _wait_row(ip, job, lambda r: r["state"] == "running", 30)
    slurm_cluster.run("scancel", "--signal=KILL", "--batch", _slurm_id(login_node, job))
    row = _wait_row(ip, job, lambda r: r["state"] not in ("running", "queued", "requeued"), 60)
    assert row["state"] == "killed" and "Slurm says FAILED" in row["message"], row
    assert [e["type"] for e in _log(login_node, job)][-1] == "started"  # nothing was written after: it was killed


def test_two_tasks_initialise_keras_distribution_on_jax(cluster_ip) -> None:
    ip = cluster_ip
    cell = "import keras\nkeras.distribution.initialize()\nimport jax\nprocesses, index = jax.process_count(), jax.process_index()\n"
    result = run(ip, f"%%remote_train --host {HOST} --tasks 2 --backend jax --out processes,index\n" + cell)
    assert result.success, result.error_in_exec
    assert ip.user_ns["processes"] == 2 and ip.user_ns["index"] == 0


def test_the_master_port_of_a_multi_task_job_skips_a_port_in_use() -> None:
    """The batch script picks DDP's port on the first node: one a service (or a lingering job) holds is skipped."""
    import socket
    import subprocess

    from remote_magic.agent.launch.slurm import FREE_PORTS

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        chosen = int(
            subprocess.run([PYTHON, "-c", FREE_PORTS, str(port)], capture_output=True, text=True, check=True).stdout
        )
        assert chosen != port and chosen % 2 == port % 2
        for candidate in (chosen, chosen + 1):
            with socket.socket() as probe:
                probe.bind(("", candidate))  # free, as init_process_group needs it
