"""Jobs on a Slurm cluster: the agent on the login node submits with ``sbatch``, and asks ``squeue`` how they are.

The login node cannot see compute-node processes, so everything the process
launcher reads from ``/proc`` comes from Slurm here: pending with Slurm's
reason, running on a node, or one of Slurm's end states.  Clusters without
``slurmdbd`` forget a job ``MinJobAge`` after it ends, so the last state
seen is kept in the job folder (``slurm.json``); once the job has run, its
own event log is the truth.  A job that Slurm no longer knows and whose log
has no end was killed; it is never silently dropped.

The job script runs the same runner as on a plain host, from the host root,
which must be on a filesystem that the login and compute nodes share: the
script checks that it sees the job folder and says so when it does not.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
from typing import Any

from .. import bootstrap, disk, jobs, protocol
from . import start, warm
from .base import ENDED, InJob, Launcher, Phase
from .detach import untagged_environment
from .slurm_job import EARLY_USR2, SlurmJob

STATE_FILE = "slurm.json"  # the Slurm job id and the last state seen: squeue forgets ended jobs
SCRIPT_FILE = "slurm.sh"
ARRAYS_DIR = "slurm-arrays"  # <sweep id>/<trial>: each trial's job id, until the last one submits the array
ARRAY_GRACE_SECONDS = 600.0  # a sweep's trial may wait this long for its last trial to submit the array
COMMAND_SECONDS = 60.0
POLL_SECONDS = 2.0  # squeue is asked at most this often per job (attach polls much more often)
DEFAULT_SIGNAL_GRACE = 120  # seconds before the time limit that USR2 comes (checkpoint, requeue)
NOT_SHARED_EXIT = 97  # the script's exit status when the compute node cannot see the job folder
PENDING = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SUSPENDED"}
RUNNING = {"RUNNING", "CONFIGURING", "COMPLETING", "STAGE_OUT", "SIGNALING", "RESIZING"}

# A first USR2 can come before the runner is imported: remember it rather than die of it.
RUN = f"import signal,sys\nsignal.signal(signal.SIGUSR2,lambda *a:setattr(sys,'{EARLY_USR2}',1))\n" + bootstrap.RUN

_seen: dict[str, tuple[float, dict[str, str] | None]] = {}  # Slurm job id -> (when asked, squeue's row)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class SlurmError(jobs.AgentError):
    """Slurm refused or failed a command: its own words, with what to do."""


def _command(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    if shutil.which(argv[0], path=(env or os.environ).get("PATH")) is None:
        raise SlurmError(
            f"{argv[0]} is not on the PATH of the agent on this login node ({os.uname().nodename}); "
            "is this a Slurm login node? If Slurm comes from a module, add `module load slurm` to the host "
            "setting 'setup', or put Slurm's bin folder on PATH in ~/.bashrc"
        )
    return subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_SECONDS, env=env, check=False)


def read_state(path: str) -> dict[str, Any]:
    try:
        with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
            record = json.load(f)
        return record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_state(path: str, record: dict[str, Any]) -> None:
    disk.atomic_write(os.path.join(path, STATE_FILE), json.dumps(record).encode(), durable=False)


def script_value(value: Any, what: str) -> str:
    """``value`` as text, refused when it would add lines to the batch script or sbatch's arguments.

    sbatch reads ``#SBATCH`` lines only up to the first other line: a line break in a job's name would end them
    there, and the ``--requeue`` and ``--signal`` after it would be dropped without a word.  The client refuses
    these values before anything is sent; this is the agent's own check.
    """
    text = str(value)
    if _CONTROL.search(text):
        raise SlurmError(
            f"{what} {text!r} has a line break or another control character in it, which would add lines to the "
            "job's batch script (sbatch then drops the #SBATCH lines after it); give it on one line"
        )
    return text


def job_script(root: str, agent_hash: str, spec: dict[str, Any], job_ids: list[str]) -> str:
    """The batch script: Slurm's options, the host's setup lines, a check that the node sees the job, the runner.

    With several jobs (a sweep's trials) it is a job array: task i runs ``job_ids[i]``.  Every value that goes
    into the script is checked to stay on its line (SlurmError otherwise).
    """
    options = spec.get("slurm") or {}
    lines = ["#!/bin/bash", *_directives(root, spec, job_ids)]
    lines += [script_value(line, "the host setting 'setup' line") for line in options.get("setup") or []]
    kind = warm.RunnerKind.for_job(root, spec)
    script_value(kind.python, "the interpreter")
    command = [kind.python, "-c", RUN, root, agent_hash, "run-job"]
    lines += [
        f"JOBS=({' '.join(shlex.quote(job_id) for job_id in job_ids)})",
        'JOB="${JOBS[${SLURM_ARRAY_TASK_ID:-0}]}"',
        f'FOLDER={shlex.quote(os.path.join(root, "jobs"))}/"$JOB"',
        'if [ ! -r "$FOLDER/spec.json" ]; then',
        '  echo "remote_magic: node $(hostname) cannot see the job folder $FOLDER: the host root must be on a '
        'filesystem that the login and compute nodes share (set the host setting root to a folder there)" >&2',
        f"  exit {NOT_SHARED_EXIT}",
        "fi",
        'cd "$FOLDER"',
    ]
    launch = "exec "
    if _tasks(options) is not None:  # every task runs the runner; task 0 writes the events and outputs
        lines += [
            'MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
            # This script runs on the first node, the master's: a port (and the next one, Keras's) free there
            f"MASTER_PORT=$({shlex.quote(kind.python)} -c {shlex.quote(FREE_PORTS)} $((20000 + SLURM_JOB_ID % 20000)))",
            "export MASTER_ADDR MASTER_PORT",
        ]
        launch = "exec srun --unbuffered --kill-on-bad-exit=1 "
    lines.append(launch + " ".join(shlex.quote(part) for part in command) + ' "$JOB"')
    return "\n".join(lines) + "\n"


def _directives(root: str, spec: dict[str, Any], job_ids: list[str]) -> list[str]:
    """The ``#SBATCH`` lines, from typed options.  A sweep's job is named by the sweep's id (its trials' names
    hold their parameters, whose reprs may span lines)."""
    options = spec.get("slurm") or {}
    name = script_value(
        (spec.get("sweep") or {}).get("id") or spec.get("name") or spec["job_id"], "the job's name (--name)"
    )
    home = script_value(jobs.job_dir(root, job_ids[-1]), "the host root")  # the submitting job's: script, output
    log = "slurm-%A_%a.out" if len(job_ids) > 1 else "slurm-%j.out"
    lines = [
        f"#SBATCH --job-name={shlex.quote('rm-' + name)}",
        f"#SBATCH --output={shlex.quote(os.path.join(home, log))}",
        "#SBATCH --open-mode=append",
        "#SBATCH --requeue",
        # B: to the batch shell, which is the runner (exec): without it only srun steps get the signal
        f"#SBATCH --signal=B:USR2@{int(options.get('signal_grace') or DEFAULT_SIGNAL_GRACE)}",
    ]
    for key in ("partition", "account", "qos", "time"):
        if options.get(key):
            lines.append(f"#SBATCH --{key}={shlex.quote(script_value(options[key], f'--{key}'))}")
    count = gpu_count(spec)
    if count:
        lines.append(f"#SBATCH --gres=gpu:{count}")
    several = _tasks(options)
    if several is not None:
        lines += [f"#SBATCH --ntasks={several[0]}", f"#SBATCH --nodes={several[1]}"]
    if len(job_ids) > 1:
        parallel = int((spec.get("sweep") or {}).get("parallel") or len(job_ids))
        lines.append(f"#SBATCH --array=0-{len(job_ids) - 1}%{min(parallel, len(job_ids))}")
    return lines


def gpu_count(spec: dict[str, Any]) -> int:
    """The GPUs a job asks Slurm for: its GPU request, as on any launcher; an earlier client's spec says it in
    its Slurm options instead (``slurm.gpus``, its ``gpus`` then 0)."""
    try:
        request = protocol.GpuRequest.from_spec(spec)
    except ValueError as exc:
        raise SlurmError(str(exc)) from None
    if request.count == request.ALL or request.ids:
        raise SlurmError(f"{request.describe()}: on Slurm, Slurm picks the GPUs; ask for a number of them")
    return request.count or int((spec.get("slurm") or {}).get("gpus") or 0)


def _tasks(options: dict[str, Any]) -> tuple[int, int] | None:
    """(tasks, nodes) of a job that runs as several tasks (``--tasks``), None for a job of one."""
    tasks, nodes = int(options.get("tasks") or 1), int(options.get("nodes") or 1)
    return (tasks, nodes) if tasks > 1 or nodes > 1 else None


# argv: FIRST. Prints the first even port from FIRST on where it and the next one can be bound (DDP's store
# and Keras's coordinator listen there); FIRST when none of 100 is free. A fixed port collides with any
# service or lingering job on the node (EADDRINUSE in init_process_group).
FREE_PORTS = """
import socket, sys
first = int(sys.argv[1])
def free(port):
    try:
        with socket.socket() as s:
            s.bind(("", port))
        return True
    except OSError:
        return False
print(next((p for p in range(first, first + 200, 2) if free(p) and free(p + 1)), first))
"""


def sbatch_argv(spec: dict[str, Any], script: str) -> list[str]:
    """``sbatch --parsable`` with the host's and the cell's extra arguments (they override the script's)."""
    options = spec.get("slurm") or {}
    extra = [*options.get("sbatch_args", []), *options.get("extra_args", [])]
    return [
        "sbatch",
        "--parsable",
        *(script_value(arg, "the sbatch argument (--slurm, or sbatch_args)") for arg in extra),
        script,
    ]


def _array_trials(root: str, spec: dict[str, Any]) -> list[str] | None:
    """A sweep's trials go as one job array, submitted by the last: their job ids once all are in, else None."""
    sweep = spec["sweep"]
    folder = disk.ensure_dir(os.path.join(root, ARRAYS_DIR, sweep["id"]))
    disk.atomic_write(os.path.join(folder, str(sweep["trial"])), spec["job_id"].encode(), durable=False)
    if sweep["trial"] != sweep["trials"] - 1:
        return None
    found = []
    for number in range(sweep["trials"]):
        try:
            with open(os.path.join(folder, str(number)), encoding="utf-8") as f:
                found.append(f.read().strip())
        except OSError:
            raise SlurmError(
                f"sweep {sweep['id']}: trial {number} never reached the host; submit the sweep again"
            ) from None
    return found


class SlurmLauncher(Launcher):
    """The job is a Slurm batch job; its runner runs on a compute node (never a warm runner's fork)."""

    name = protocol.SLURM_LAUNCHER

    def in_job(self, root: str, agent_hash: str) -> InJob:
        return SlurmJob()

    def start(self, root: str, agent_hash: str, path: str, spec: dict[str, Any]) -> None:
        job_ids = [spec["job_id"]]
        if (spec.get("sweep") or {}).get("trials"):
            _write_state(path, {"array": spec["sweep"]["id"], "t": time.time()})
            try:
                found = _array_trials(root, spec)
            except SlurmError as exc:
                _refused(path, str(exc))
                raise
            if found is None:
                return  # submitted with the sweep's last trial
            job_ids = found
        paths = [jobs.job_dir(root, job_id) for job_id in job_ids]
        script = os.path.join(path, SCRIPT_FILE)
        kind = warm.RunnerKind.for_job(root, spec)
        env = kind.environment(untagged_environment())  # each runner tags itself with its own job id
        try:
            disk.atomic_write(script, job_script(root, agent_hash, spec, job_ids).encode())
            done = _command(sbatch_argv(spec, script), env)
            if done.returncode != 0:
                raise SlurmError(f"Slurm refused the job: {_one_line(done.stderr or done.stdout, 'sbatch')}")
        except (SlurmError, OSError, subprocess.TimeoutExpired) as exc:
            message = str(exc) if isinstance(exc, SlurmError) else f"sbatch failed: {exc}"
            for each in paths:
                _refused(each, message)
            raise SlurmError(message) from None
        slurm_id = done.stdout.strip().split(";")[0]
        for index, each in enumerate(paths):
            task_id = f"{slurm_id}_{index}" if len(paths) > 1 else slurm_id
            _write_state(each, {"id": task_id, "state": "PENDING", "t": time.time()})
            jobs.write_launch(each, self.name, slurm_id=task_id)
        if len(paths) > 1:
            shutil.rmtree(os.path.join(root, ARRAYS_DIR, spec["sweep"]["id"]), ignore_errors=True)

    def poll(self, path: str, spec: dict[str, Any]) -> Phase:
        state = read_state(path)
        slurm_id = state.get("id")
        if not slurm_id:
            grace = ARRAY_GRACE_SECONDS if state.get("array") else start.START_GRACE_SECONDS
            if time.time() - (spec.get("submitted") or 0) < grace:
                reason = "submitting the sweep as one job array" if state.get("array") else "submitting"
                return Phase(protocol.STATE_QUEUED, "submitting", reason=reason)
            return Phase(ENDED, "never submitted", final=protocol.STATE_KILLED, message="it never reached Slurm")
        row = _squeue(slurm_id)
        if row is None:  # Slurm forgot it: what was seen last decides
            word = state.get("state", "")
            if not word or word in PENDING or word in RUNNING:
                word = "unknown to squeue"
            return _ended(path, word, state.get("node"), slurm_id)
        word, reason, node = row["state"], row["reason"], row["node"]
        if word != state.get("state") or (node and node != state.get("node")):
            _write_state(path, {**state, "state": word, "node": node or state.get("node"), "t": time.time()})
        if word in PENDING:
            shown = reason if reason and reason != "None" else "waiting for Slurm's scheduler"
            jobs.tell_waiting(path, shown, None)
            return Phase(protocol.STATE_QUEUED, word, reason=shown)
        if word in RUNNING:
            return Phase(protocol.STATE_RUNNING, word, where=node or None)
        return _ended(path, word, node or state.get("node"), slurm_id)

    def stop(self, path: str, spec: dict[str, Any]) -> bool:
        """SIGINT to the batch step: the runner finishes the batch and brings back what it has."""
        slurm_id = read_state(path).get("id")
        if not slurm_id:
            return False
        if not _runs(path):
            self._cancel_waiting(path, slurm_id, "stopped before it started: it had nothing to return yet")
            return True
        return self._scancel(slurm_id, "--signal=INT", "--batch")

    def cancel(self, path: str, spec: dict[str, Any], grace: float) -> dict[str, Any]:
        """``scancel``; a running job's runner gets SIGTERM from Slurm (SIGKILL after the cluster's KillWait).

        The log decides whether the runner runs (squeue may lag behind a start): a job
        that waits gets its final event here, a running one writes its own.
        """
        slurm_id = read_state(path).get("id")
        if not slurm_id:
            return {}
        if not _runs(path):
            self._cancel_waiting(path, slurm_id, "cancelled while it waited in Slurm's queue")
            return {"queued": True, "slurm_id": slurm_id}
        disk.atomic_write(os.path.join(path, protocol.CANCEL_MARK), b"", durable=False)
        self._scancel(slurm_id)
        deadline = time.monotonic() + grace + 5
        while time.monotonic() < deadline and jobs.event_summary(path)["ended"] is None:
            _seen.pop(slurm_id, None)
            if not self.poll(path, spec).active:
                break
            time.sleep(0.2)
        return {"slurm_id": slurm_id}

    def _cancel_waiting(self, path: str, slurm_id: str, message: str) -> None:
        """A job in Slurm's queue: the mark first, so a runner that starts meanwhile exits before the cell."""
        disk.atomic_write(os.path.join(path, protocol.CANCEL_MARK), b"", durable=False)
        self._scancel(slurm_id)
        _end(path, protocol.CANCELLED, message=message)

    def _scancel(self, slurm_id: str, *options: str) -> bool:
        _seen.pop(slurm_id, None)
        done = _command(["scancel", *options, slurm_id])
        if done.returncode != 0:
            raise SlurmError(f"scancel {slurm_id} failed: {_one_line(done.stderr or done.stdout, 'scancel')}")
        return True


_END_WORDS = {
    "CANCELLED": (protocol.STATE_CANCELLED, "cancelled in Slurm (scancel, or by an admin)"),
    "TIMEOUT": (protocol.STATE_KILLED, "Slurm ended it at its time limit (TIMEOUT) before it could checkpoint"),
    "PREEMPTED": (protocol.STATE_KILLED, "preempted by Slurm and not requeued (PREEMPTED)"),
    "NODE_FAIL": (protocol.STATE_KILLED, "its node failed (NODE_FAIL)"),
    "BOOT_FAIL": (protocol.STATE_KILLED, "its node failed to boot (BOOT_FAIL)"),
    "DEADLINE": (protocol.STATE_KILLED, "Slurm ended it at its deadline (DEADLINE)"),
    "OUT_OF_MEMORY": (
        protocol.STATE_KILLED,
        'it ran out of memory (OUT_OF_MEMORY); ask for more with --slurm "--mem=16G" or the host setting sbatch_args',
    ),
    "unknown to squeue": (
        protocol.STATE_KILLED,
        "Slurm no longer knows the job and its log has no end: killed, or lost with its node",
    ),
}


def _ended(path: str, word: str, node: str | None, slurm_id: str) -> Phase:
    """A job Slurm says has ended; for one whose log has no end, Slurm's word for what happened."""
    final, message = _END_WORDS.get(word, (protocol.STATE_KILLED, None))
    if word in ("FAILED", "COMPLETED") and not _ever_started(path):
        message = (
            f"Slurm says {word}, but the job never started: if the compute nodes cannot see the host root, "
            f"put it on a filesystem they share (host setting root); Slurm's output is in "
            f"{os.path.join(path, f'slurm-{slurm_id}.out')} on the node"
        )
    elif message is None:
        message = f"Slurm says {word}, and the runner ended without a final event (killed, or out of memory)"
    return Phase(ENDED, word, where=node, final=final, message=message)


def _runs(path: str) -> bool:
    """Whether the job's runner has started (and not been requeued since): its log says so before squeue does."""
    return jobs.event_summary(path)["state"] == protocol.STATE_RUNNING


def _ever_started(path: str) -> bool:
    return any(event["type"] == protocol.STARTED for event, _ in jobs.iter_events(path))


def _one_line(text: str, tool: str) -> str:
    """A Slurm tool's error lines as one line (the client shows one), without the tool's own prefix."""
    lines = [line.strip().removeprefix(f"{tool}: error: ").removeprefix(f"{tool}: ") for line in text.splitlines()]
    return "; ".join(line for line in lines if line) or "no message"


def _squeue(slurm_id: str) -> dict[str, str] | None:
    """squeue's row for the job (state, reason, node), or None when Slurm no longer knows it; cached briefly.

    One squeue call answers for all of this user's jobs, so a status of many jobs (a sweep, a day of cells)
    asks the controller once, not once per job.
    """
    now = time.monotonic()
    cached = _seen.get(slurm_id)
    if cached is not None and now - cached[0] < POLL_SECONDS:
        return cached[1]
    done = _command(["squeue", "-h", "-r", "-t", "all", "--me", "-o", "%i|%T|%r|%N"])
    if done.returncode != 0:
        raise SlurmError(f"squeue failed: {_one_line(done.stderr, 'squeue')}")
    rows: dict[str, dict[str, str]] = {}
    for line in done.stdout.splitlines():
        if line.strip():
            job, state, reason, node = ([*line.split("|"), "", "", ""])[:4]
            rows[job.strip()] = {"state": state.strip(), "reason": reason.strip(), "node": node.strip()}
    for job, row in rows.items():
        _seen[job] = (now, row)
    if slurm_id not in rows:
        _seen[slurm_id] = (now, None)  # not listed: Slurm has forgotten it
    return rows.get(slurm_id)


def _refused(path: str, message: str) -> None:
    """The job ends here: Slurm (or our preparation for it) refused it."""
    _end(path, protocol.ERROR, message=message, exc_type="SlurmError", traceback="", phase="submit")


def _end(path: str, type_: str, **fields: Any) -> None:
    if jobs.event_summary(path)["ended"] is None:
        jobs.append_event(path, type_, **fields)
