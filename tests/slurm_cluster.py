"""A private single-node Slurm for tests: munged, slurmctld and slurmd started here, stopped by pid.

Everything lives under one folder (config, state, spool, logs, pid files, the munge key and socket), so
each test session starts from fresh state and never reads or writes /etc/slurm, /etc/munge or /run/munge.
Client tools (sbatch, squeue, scancel, scontrol, sinfo, srun) find the cluster through ``SLURM_CONF``
(see ``SlurmCluster.env``); a process started through the test sshd needs it in that sshd's ``SetEnv``
(``Sshd.add_env(cluster.env())`` before it starts). The node's GPUs are a SIMULATION: character device
nodes (``mknod c 1 3``, an alias of /dev/null) listed in gres.conf, so Slurm assigns real
``CUDA_VISIBLE_DEVICES`` on a machine without GPUs. Recipe and timings: ../shared/slurm-notes.md.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sshd import free_port

APT_PACKAGES = "slurmctld slurmd slurm-client munge"
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin", "/sbin"])
_BINARIES = ("slurmctld", "slurmd", "slurmstepd", "sbatch", "squeue", "scancel", "scontrol", "sinfo", "munged")


def _which(name: str) -> str:
    path = shutil.which(name, path=_SEARCH_PATH)
    if path is None:
        raise RuntimeError(
            f"Slurm test cluster: `{name}` is missing: "
            f"apt-get install -y --no-install-recommends {APT_PACKAGES} (.ci/run and `make system-deps` do this)"
        )
    return path


def short_hostname() -> str:
    """The name ``hostname -s`` prints: slurmd and srun look the node up by it."""
    return socket.gethostname().split(".")[0]


@dataclass
class SlurmCluster:
    """A running single-node cluster; ``stop()`` ends every process it started."""

    dir: Path
    node: str
    conf: Path
    ctld_port: int
    slurmd_port: int
    gpu_devices: list[Path]
    munge_socket: Path
    log_dir: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        """The variables a client process needs (sbatch, squeue, ... and anything a job runs)."""
        return {"SLURM_CONF": str(self.conf)}

    def client_env(self) -> dict[str, str]:
        """This process's environment plus ``env()``: what subprocess calls of the client tools get."""
        return {**os.environ, **self.env()}

    def run(self, *args: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a client tool against this cluster; output as text; a hung tool fails after ``timeout``."""
        return subprocess.run(
            [_which(args[0]), *args[1:]],
            env=self.client_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )

    def sbatch(self, *args: str) -> int:
        """Submit with ``sbatch --parsable ARGS``; the job id."""
        out = self.run("sbatch", "--parsable", *args).stdout.strip()
        return int(out.split(";")[0])

    def squeue(self, job_id: int) -> dict[str, str] | None:
        """The job's row (``state``, ``reason``, ``nodes``), or None once squeue no longer knows it (MinJobAge)."""
        res = self.run("squeue", "-h", "-t", "all", "-j", str(job_id), "-o", "%T|%r|%N", check=False)
        line = res.stdout.strip()
        if res.returncode != 0 or not line:
            return None
        state, reason, nodes = line.splitlines()[0].split("|", 2)
        return {"state": state, "reason": reason, "nodes": nodes}

    def job(self, job_id: int) -> dict[str, str] | None:
        """``scontrol show job -o`` as a dict (``JobState``, ``Restarts``, ``BeginTime``, ...), or None."""
        res = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        if res.returncode != 0 or not res.stdout.strip():
            return None
        fields: dict[str, str] = {}
        for token in res.stdout.split():
            key, sep, value = token.partition("=")
            if sep:
                fields[key] = value
        return fields

    def wait_state(self, job_id: int, *states: str, timeout: float = 30) -> dict[str, str]:
        """Poll squeue until the job is in one of ``states``; its row. A TimeoutError names the last row seen."""
        deadline = time.monotonic() + timeout
        row = None
        while time.monotonic() < deadline:
            row = self.squeue(job_id)
            if row is not None and row["state"] in states:
                return row
            time.sleep(0.2)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout} s; last seen: {row}")

    def node_state(self) -> str:
        """sinfo's word for the node (``idle``, ``mixed``, ``allocated``, ``completing``, ...); "" if no answer."""
        try:
            return self.run("sinfo", "-h", "-n", self.node, "-o", "%T", timeout=5, check=False).stdout.strip()
        except subprocess.TimeoutExpired:  # e.g. a missing slurm.conf: the client tools retry it for 60 s
            return ""

    def wait_idle(self, timeout: float = 30) -> None:
        """Wait until no job is pending or running and the node is idle: a clean start for the next test."""
        deadline = time.monotonic() + timeout
        state, queue = "", ""
        while time.monotonic() < deadline:
            queue = self.run("squeue", "-h", "-o", "%i %T", check=False).stdout.strip()
            state = self.node_state()
            if not queue and state == "idle":
                return
            time.sleep(0.2)
        raise TimeoutError(f"Slurm not idle after {timeout} s: node {state!r}, queue {queue!r}")

    def release(self, job_id: int, timeout: float = 30) -> None:
        """Start a requeued job now instead of after its ~120 s BeginTime delay.

        Waits (bounded) until the job pends for ``BeginTime`` and its previous run has left the node, then
        into the next wall-clock second: slurmd revokes a killed job's credential with a 1 s resolution, and a
        restart allocated in the same second is refused ("Job credential revoked") and ends FAILED.
        """
        deadline = time.monotonic() + timeout
        row = None
        while time.monotonic() < deadline:
            row = self.squeue(job_id)
            if row == {"state": "PENDING", "reason": "BeginTime", "nodes": ""} and not self.job_processes(job_id):
                time.sleep(math.floor(time.time()) + 1.05 - time.time())
                self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
                return
            time.sleep(0.1)
        raise TimeoutError(f"job {job_id} not waiting for its BeginTime after {timeout} s; last seen: {row}")

    def job_processes(self, job_id: int) -> list[int]:
        """This cluster's processes of one job on the node: its slurmstepd and what the job runs."""
        return self._our_processes(
            lambda comm, cmdline, environ: (
                f"[{job_id}.".encode() in cmdline
                if comm == "slurmstepd"
                else f"SLURM_JOB_ID={job_id}".encode() in environ
            )
        )

    def cancel_all(self, timeout: float = 15) -> None:
        """Cancel every job and wait (bounded) until they are gone from the node."""
        ids = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
        if ids:
            self.run("scancel", *ids, check=False)
        deadline = time.monotonic() + timeout
        while ids and time.monotonic() < deadline:
            if not self.run("squeue", "-h", "-t", "PD,R,CG,S,CF", "-o", "%i", check=False).stdout.strip():
                break
            time.sleep(0.2)

    def log_tail(self, lines: int = 20) -> str:
        """The end of each daemon's log, for failure messages."""
        parts = []
        for path in sorted(self.log_dir.glob("*.log")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path}\n" + "\n".join(text))
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel the jobs, stop slurmd, slurmctld and munged by pid (TERM, bounded wait, then KILL),
        then kill any job step left behind (slurmstepd daemonizes, so it is no child of ours)."""
        if self.processes.get("slurmctld") is not None and self.processes["slurmctld"].poll() is None:
            try:
                self.cancel_all()
            except (OSError, subprocess.SubprocessError):
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.processes.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for pid in self.leftover_processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def leftover_processes(self) -> list[int]:
        """Job steps and job processes of this cluster still alive (slurmstepd daemonizes: no child of ours)."""
        return self._our_processes(
            lambda comm, cmdline, environ: comm == "slurmstepd" or any(v.startswith(b"SLURM_JOB_ID=") for v in environ)
        )

    def _our_processes(self, match: Callable[[str, bytes, list[bytes]], bool]) -> list[int]:
        """Live processes whose environment names this cluster's SLURM_CONF and that ``match`` (comm, cmdline, environ)."""
        marker = f"SLURM_CONF={self.conf}".encode()
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    environ = f.read().split(b"\0")
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read()
                with open(f"/proc/{entry}/comm") as f:
                    comm = f.read().strip()
            except OSError:
                continue
            if marker in environ and match(comm, cmdline, environ):
                found.append(int(entry))
        return found


def _config(
    base: Path, node: str, ctld_port: int, slurmd_port: int, munge_socket: Path, cpus: int, gpus: int, min_job_age: int
) -> str:
    return f"""\
# Generated by tests/slurm_cluster.py for one test session; GPUs are simulated (see gres.conf).
ClusterName=remote_magic_tests
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={base / "state"}
SlurmdSpoolDir={base / "spool"}
SlurmctldPidFile={base / "run" / "slurmctld.pid"}
SlurmdPidFile={base / "run" / "slurmd.pid"}
SlurmctldLogFile={base / "log" / "slurmctld.log"}
SlurmdLogFile={base / "log" / "slurmd.log"}
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
# Lets the node declare {cpus} CPUs on a smaller machine, so several jobs run at once.
SlurmdParameters=config_overrides
# squeue forgets a finished job this long after it ended (plus up to a minute, the purge interval).
MinJobAge={min_job_age}
JobRequeue=1
# Schedule a submitted batch job at once (default: up to 3 s later): about 1 s from sbatch to running.
SchedulerParameters=batch_sched_delay=0
GresTypes=gpu
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=2000 Gres=gpu:{gpus} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def _fresh_dir(path: Path, mode: int = 0o755) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, mode)
    return path


def start_cluster(
    base: Path, *, cpus: int = 8, gpus: int = 4, min_job_age: int = 30, timeout: float = 30
) -> SlurmCluster:
    """Write a fresh config under ``base``, start munged, slurmctld and slurmd, and wait until the node is idle.

    ``gpus`` fake GPUs are SIMULATED by character device nodes; ports are free ones, so two test sessions
    on one machine do not meet. Needs root (mknod, slurmd). Raises RuntimeError naming the fix if the
    binaries are missing or the node does not come up.
    """
    for name in _BINARIES:
        _which(name)
    if os.geteuid() != 0:
        raise RuntimeError("Slurm test cluster: needs root (slurmd runs jobs as their user, mknod for fake GPUs)")
    base = _fresh_dir(base.resolve())
    for sub in ("state", "spool", "log", "run", "dev"):
        _fresh_dir(base / sub)
    munge_dir = _fresh_dir(base / "munge", 0o700)
    node = short_hostname()

    # A private munged with its own key and socket: nothing shared with a system munged, stopped with us.
    # munged refuses a socket folder whose parents others cannot search (pytest's tmp folders are 0700)
    # unless --force, which turns that check into a warning.
    key = munge_dir / "munge.key"
    key.write_bytes(os.urandom(128))
    os.chmod(key, 0o600)
    munge_socket = munge_dir / "munge.socket"

    gpu_devices = []
    for i in range(gpus):
        dev = base / "dev" / f"nvidia{i}"
        if not dev.exists():
            os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # /dev/null's numbers: a simulated GPU
        gpu_devices.append(dev)

    conf = base / "slurm.conf"
    ctld_port, slurmd_port = free_port(), free_port()
    while slurmd_port == ctld_port:
        slurmd_port = free_port()
    conf.write_text(_config(base, node, ctld_port, slurmd_port, munge_socket, cpus, gpus, min_job_age))
    # gres.conf is read from slurm.conf's folder.
    files = f"{base / 'dev'}/nvidia[0-{gpus - 1}]" if gpus > 1 else str(base / "dev" / "nvidia0")
    (base / "gres.conf").write_text(
        "# SIMULATED GPUs: character devices aliasing /dev/null\n"
        + (f"NodeName={node} Name=gpu File={files}\n" if gpus else "")
    )

    cluster = SlurmCluster(
        dir=base,
        node=node,
        conf=conf,
        ctld_port=ctld_port,
        slurmd_port=slurmd_port,
        gpu_devices=gpu_devices,
        munge_socket=munge_socket,
        log_dir=base / "log",
    )
    env = cluster.client_env()

    def spawn(name: str, argv: list[str]) -> None:
        with open(base / "log" / f"{name}.out.log", "wb") as out:
            cluster.processes[name] = subprocess.Popen(
                argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    try:
        spawn(
            "munged",
            [
                _which("munged"),
                "--foreground",
                "--force",
                f"--socket={munge_socket}",
                f"--key-file={key}",
                f"--log-file={base / 'log' / 'munged.log'}",
                f"--pid-file={munge_dir / 'munged.pid'}",
                f"--seed-file={munge_dir / 'munged.seed'}",
            ],
        )
        _wait_for(lambda: munge_socket.exists(), timeout, "munged did not create its socket", cluster)
        spawn("slurmctld", [_which("slurmctld"), "-D", "-c", "-f", str(conf)])
        spawn("slurmd", [_which("slurmd"), "-D", "-f", str(conf), "-N", node])
        _wait_for(lambda: cluster.node_state() == "idle", timeout, f"node {node} not idle", cluster)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _wait_for(ready: Callable[[], bool], timeout: float, what: str, cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, proc in cluster.processes.items():
            if proc.poll() is not None:
                raise RuntimeError(f"Slurm test cluster: {name} exited ({proc.returncode})\n{cluster.log_tail()}")
        if ready():
            return
        time.sleep(0.1)
    raise RuntimeError(f"Slurm test cluster: {what} after {timeout} s\n{cluster.log_tail()}")
