"""The test Slurm itself, with plain sbatch: jobs run, simulated GPUs are shared out, signals and requeue work.

These prove the infrastructure the Slurm launcher's tests stand on; they use no remote_magic code.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from slurm_cluster import SlurmCluster
from sshd import make_sshd


@pytest.fixture
def cluster(slurm_cluster: SlurmCluster) -> Iterator[SlurmCluster]:
    """The session's cluster, idle before each test and with nothing of the test left queued after it."""
    slurm_cluster.wait_idle()
    yield slurm_cluster
    slurm_cluster.cancel_all()


def wait_file(path: Path, timeout: float = 20, text: str = "") -> str:
    """Poll until ``path`` exists (and contains ``text``); its content."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in (content := path.read_text()):
            return content
        time.sleep(0.1)
    raise TimeoutError(f"{path} (with {text!r}) not there after {timeout} s")


def test_a_job_runs_and_writes_a_file(cluster: SlurmCluster, tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    job = cluster.sbatch("-o", str(tmp_path / "log-%j"), "--wrap", f"echo ran on $SLURMD_NODENAME > {out}")
    assert cluster.wait_state(job, "COMPLETED")["nodes"] == cluster.node
    assert out.read_text() == f"ran on {cluster.node}\n"


def test_simulated_gpus_are_disjoint_and_a_third_job_waits_for_resources(cluster: SlurmCluster, tmp_path: Path) -> None:
    """GPUs here are character devices aliasing /dev/null (a SIMULATION), but Slurm's bookkeeping is real."""

    def submit(name: str) -> int:
        # Record the devices, then hold the GPUs until the test creates the go file (at most 30 s).
        script = (
            f"echo $CUDA_VISIBLE_DEVICES > {tmp_path / name}.gpus; "
            f"for i in $(seq 300); do [ -e {tmp_path / name}.go ] && exit 0; sleep 0.1; done; exit 1"
        )
        return cluster.sbatch("--gres=gpu:2", "-o", str(tmp_path / f"{name}.log"), "--wrap", script)

    first, second = submit("first"), submit("second")
    gpus_first = wait_file(tmp_path / "first.gpus", text="\n").split()
    gpus_second = wait_file(tmp_path / "second.gpus", text="\n").split()
    assert {gpus_first[0], gpus_second[0]} == {"0,1", "2,3"}

    third = submit("third")
    assert cluster.wait_state(third, "PENDING")["state"] == "PENDING"
    deadline = time.monotonic() + 15
    while (row := cluster.squeue(third)) is not None and row["reason"] != "Resources" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert row is not None and row == {"state": "PENDING", "reason": "Resources", "nodes": ""}

    (tmp_path / "first.go").touch()
    assert cluster.wait_state(first, "COMPLETED")
    assert wait_file(tmp_path / "third.gpus", text="\n").split() == gpus_first
    for name in ("second", "third"):
        (tmp_path / f"{name}.go").touch()
    cluster.wait_state(second, "COMPLETED")
    cluster.wait_state(third, "COMPLETED")


HANDLER = """
import signal, sys, time

def on_usr2(signum, frame):
    print("USR2 handled", flush=True)
    sys.exit(0)

signal.signal(signal.SIGUSR2, on_usr2)  # first thing: the signal may come at any time
open(sys.argv[1], "w").write("ready")
time.sleep(30)
print("no signal came", flush=True)
sys.exit(3)
"""


def test_scancel_usr2_reaches_a_python_handler(cluster: SlurmCluster, tmp_path: Path) -> None:
    """Python runs as the batch step (``exec``): ``scancel --signal`` reaches the batch step only with
    ``--full`` (or ``--batch``); without it only srun steps get the signal."""
    (tmp_path / "handler.py").write_text(HANDLER)
    log = tmp_path / "job.log"
    job = cluster.sbatch(
        "-o", str(log), "--wrap", f"exec {sys.executable} -u {tmp_path / 'handler.py'} {tmp_path / 'ready'}"
    )
    wait_file(tmp_path / "ready")
    cluster.run("scancel", "--signal=USR2", "--full", str(job))
    assert cluster.wait_state(job, "COMPLETED", "FAILED", "CANCELLED")["state"] == "COMPLETED"
    assert log.read_text() == "USR2 handled\n"


def test_a_requeued_job_restarts_after_release_with_restart_count_1(cluster: SlurmCluster, tmp_path: Path) -> None:
    """Slurm holds a requeued job back ~120 s (BeginTime); ``release()`` lets it start at once."""
    runs = tmp_path / "runs"
    script = (
        f"echo $SLURM_RESTART_COUNT >> {runs}; "
        '[ "${SLURM_RESTART_COUNT:-0}" -ge 1 ] && exit 0; '
        "for i in $(seq 300); do sleep 0.1; done; exit 1"
    )
    job = cluster.sbatch("--requeue", "--open-mode=append", "-o", str(tmp_path / "log"), "--wrap", script)
    assert wait_file(runs, text="\n") == "\n"  # the first run has no SLURM_RESTART_COUNT
    cluster.wait_state(job, "RUNNING")
    cluster.run("scontrol", "requeue", str(job))
    assert cluster.wait_state(job, "PENDING")["reason"] in ("BeginTime", "None")
    assert int(cluster.job(job)["Restarts"]) == 1  # type: ignore[index]
    cluster.release(job)
    end = cluster.wait_state(job, "COMPLETED", "FAILED")
    assert end["state"] == "COMPLETED", f"{end}, runs {runs.read_text()!r}\n{cluster.log_tail()}"
    assert runs.read_text() == "\n1\n"


def test_sbatch_over_the_test_sshd_needs_slurm_conf_in_its_setenv(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """The agent runs sbatch over SSH: SLURM_CONF must come from the sshd's SetEnv (no /etc/slurm here);
    the job inherits it, so scontrol inside the job reaches the same cluster."""
    if not Path("/etc/slurm/slurm.conf").exists():  # else a plain sshd would reach the machine's own Slurm
        plain = make_sshd(tmp_path / "plain")
        plain.start()
        try:
            res = subprocess.run(
                ["ssh", "-F", str(plain.ssh_config), plain.alias, "sbatch --parsable --wrap true"],
                capture_output=True,
                text=True,
                timeout=30,
            )
        finally:
            plain.stop()
        assert res.returncode != 0 and "configuration" in res.stderr

    server = make_sshd(tmp_path / "with_env")
    server.add_env(slurm_cluster.env())
    server.start()
    out = tmp_path / "state"
    try:
        res = subprocess.run(
            [
                "ssh", "-F", str(server.ssh_config), server.alias,
                f"sbatch --parsable -o /dev/null --wrap 'scontrol show job $SLURM_JOB_ID -o | grep -o JobState=RUNNING > {out}'",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )  # fmt: skip
    finally:
        server.stop()
    job = int(res.stdout.strip())
    assert slurm_cluster.wait_state(job, "COMPLETED")
    assert out.read_text() == "JobState=RUNNING\n"
