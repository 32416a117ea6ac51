"""The agent's commands, run by the client over SSH (or locally).

Usually through ``serve`` (agent/server.py): one long-lived agent process per
connection that runs each command in a thread, so a command costs no shell
or interpreter start.  Each command also runs alone from the command line.
Every command is short-lived except ``attach``, which streams a job's events
until the job ends.  Results go to stdout as JSON (or raw bytes for blobs);
a problem is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import socket
import sys
import threading
import time
from typing import IO, Any

from . import jobs, protocol
from .launch import gpu_queue, gpus, process, warm
from .store import blobs, disk, envs, layout

EXIT_PROBLEM = 2
POLL_SECONDS = 0.02
# How often ``attach`` asks the launcher whether a job whose log is quiet still runs.
LIVENESS_SECONDS = 0.25
CANCEL_GRACE_SECONDS = 5.0


class CommandIO:
    """A command's stdin and stdout (binary), and whether its client stopped listening."""

    def __init__(self, stdin: IO[bytes], stdout: IO[bytes]) -> None:
        self.stdin = stdin
        self.stdout = stdout
        self.cancelled = threading.Event()

    def print_json(self, value: Any) -> None:
        self.stdout.write((json.dumps(value) + "\n").encode())
        self.stdout.flush()

    def write_text(self, text: str) -> None:
        self.stdout.write(text.encode())


def cmd_hello(root: str, agent_hash: str, args: argparse.Namespace, io: CommandIO) -> int:
    """What the host offers: interpreter, packages (found, not imported), root."""
    from .runner import package_versions

    io.print_json(
        {
            "agent": agent_hash,
            "schema": protocol.SCHEMA_VERSION,
            "python": sys.executable,
            "python_version": platform.python_version(),
            "hostname": socket.gethostname(),
            "root": root,
            "packages": package_versions(),
            "gpus": [{"index": g.index, "name": g.name, "memory_total": g.memory_total} for g in gpus.inventory()],
        }
    )
    return 0


def cmd_submit(root: str, agent_hash: str, args: argparse.Namespace, io: CommandIO) -> int:
    """Create a job and start it through its launcher; answer at once.

    stdin: one JSON line (the spec, with ``blobs`` and ``inputs_size``), then
    the inputs pickle.  When blobs are missing, nothing is created and the
    answer lists them so the client can upload just those.  A spec that is
    not well formed, or fewer input bytes than declared, creates nothing.
    """
    stdin = io.stdin
    try:
        spec = json.loads(stdin.readline())
    except ValueError:
        raise jobs.AgentError("submit: the first line is not a JSON spec") from None
    problem = _spec_problem(spec, root)
    if problem:
        raise jobs.AgentError(f"submit: {problem}")
    size = spec.pop("inputs_size")
    inputs = stdin.read(size)
    if len(inputs) != size:
        raise jobs.AgentError(f"submit: the inputs ended after {len(inputs)} of {size} bytes; no job was created")
    with blobs.blob_lock(root, exclusive=False):  # gc cannot remove a blob between the check and the job naming it
        missing = blobs.missing_blobs(root, blobs.referenced_blobs(spec))
        if missing:
            io.print_json({"missing": missing})
            return 0
        path, spec = jobs.create_job(root, {**spec, "agent": agent_hash}, inputs)
    process.launcher_for(spec).start(root, agent_hash, path, spec)
    io.print_json({"job_id": spec["job_id"]})
    return 0


def _spec_problem(spec: Any, root: str) -> str | None:
    """What is wrong with a submitted spec, or None."""
    if not isinstance(spec, dict):
        return "the spec is not a JSON object"
    unknown = set(spec) - protocol.SPEC_KEYS - {"inputs_size", "launcher"}
    if unknown:
        return f"unknown spec keys {sorted(unknown)} (a newer client? deploy its agent)"
    if not isinstance(spec.get("source"), str):
        return "the spec has no cell source"
    if not isinstance(spec.get("inputs_size"), int) or spec["inputs_size"] < 0:
        return "the spec does not say how many input bytes follow"
    every = spec.get("checkpoint_every", 1)
    if not isinstance(every, int) or every < 0:
        return f"checkpoint_every must be a whole number of epochs, 0 or more, not {every!r}"
    for key in ("inputs", "outputs"):
        names = spec.get(key, [])
        if not isinstance(names, list) or not all(isinstance(n, str) and n.isidentifier() for n in names):
            return f"{key} must be a list of variable names"
    blobs = spec.get("blobs", [])
    if not isinstance(blobs, list) or not all(
        isinstance(b, list) and len(b) == 2 and isinstance(b[0], str) and isinstance(b[1], int) for b in blobs
    ):
        return "blobs must be a list of [sha256, size] pairs"
    for key in ("files", "modules"):
        problem = layout.entries_problem(spec.get(key, []), key)
        if problem:
            return problem
    if spec.get("cwd") and layout.safe_relative(spec["cwd"]):
        return f"cwd: {layout.safe_relative(spec['cwd'])}"
    if spec.get("workdir") is not None and not isinstance(spec["workdir"], str):
        return "workdir must be a path on the host"
    if spec.get("env") is not None and not (isinstance(spec["env"], str) and envs.env_python(root, spec["env"])):
        return f"environment {spec['env']!r} is not built on this host (build it first: env-ensure)"
    count = spec.get("gpus", 0)
    if not (count == "all" or (isinstance(count, int) and not isinstance(count, bool) and count >= 0)):
        return f"gpus must be a number of GPUs, 0 or more, or 'all', not {count!r}"
    ids = spec.get("gpu_ids")
    if ids is not None and not (isinstance(ids, list) and ids and all(isinstance(i, int) and i >= 0 for i in ids)):
        return f"gpu_ids must be a list of GPU indices, not {ids!r}"
    busy = spec.get("busy_gpu_memory")
    if busy is not None and not (isinstance(busy, int) and busy >= 0):
        return f"busy_gpu_memory must be MiB, 0 or more, not {busy!r}"
    queue = spec.get("queue")
    if queue is not None and not (isinstance(queue, str) and queue.startswith(("/", "~"))):
        return f"queue must be an absolute folder on the host (the host setting 'queue'), not {queue!r}"
    sweep = spec.get("sweep")
    if sweep is not None:
        if not (
            isinstance(sweep, dict) and protocol.is_sweep_id(sweep.get("id")) and isinstance(sweep.get("trial"), int)
        ):
            return "sweep must say its id (sweep-...) and the trial's number"
        trials = sweep.get("trials")
        if trials is not None and not (isinstance(trials, int) and 0 <= sweep["trial"] < trials):
            return f"a sweep's trials must count its trials, trial {sweep['trial']} among them, not {trials!r}"
        parallel = sweep.get("parallel")
        if parallel is not None and not (isinstance(parallel, int) and parallel >= 1):
            return f"a sweep's parallel must be 1 or more, not {parallel!r}"
    backend = spec.get("backend")
    if backend is not None and not (isinstance(backend, str) and backend.isidentifier()):
        return f"backend must be a Keras backend name, not {backend!r}"
    return None


def cmd_put_blob(root: str, agent_hash: str, args: argparse.Namespace, io: CommandIO) -> int:
    blobs.receive_blob(root, args.digest, args.size, io.stdin, zstd=args.zstd)
    io.print_json({"stored": args.digest})
    return 0


def cmd_put_blobs(root: str, agent_hash: str, args: argparse.Namespace, io: CommandIO) -> int:
    """Many small blobs in one request: a JSON line of [sha256, size] pairs, then their bytes back to back.

    100k small files in one round trip each would take minutes over SSH; in
    batches they take as long as their bytes.
    """
    try:
        pairs = json.loads(io.stdin.readline())
    except ValueError:
        raise jobs.AgentError("put-blobs: the first line is not a JSON list of [sha256, size]") from None
    if not isinstance(pairs, list) or not all(
        isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], int) for p in pairs
    ):
        raise jobs.AgentError("put-blobs: the first line must list [sha256, size] pairs")
    for digest, size in pairs:
        blobs.receive_blob(root, digest, size, io.stdin)
    io.print_json({"stored": len(pairs)})
    return 0


def cmd_fetch_files(root: str, agent_hash: str, args: argparse.Namespace, io: CommandIO) -> int:
    """Store the job's files that match the patterns as blobs (within the request's bounds); list
    [path, sha256, size] for each, and the cell's working folder inside its layout."""
    path = jobs.job_dir(root, args.job_id)
    spec = jobs.read_spec(path)
    if jobs.event_summary(path)["ended"] is None:
        raise jobs.AgentError(
            f"job {args.job_id} is still running: fetch its files once it ended (a file being "
            "written now could arrive half written)"
        )
    if not os.path.isdir(layout.job_cwd(path, spec)):
        raise jobs.AgentError(f"job {args.job_id} has no working folder on the host any more")
    problem = layout.fetch_limit_problem(args.max_files, args.max_bytes)
    if problem:
        raise jobs.AgentError(problem)
    files = layout.store_files(root, path, spec, args.patterns, args.max_files, args.max_bytes)
    # where the cell ran inside its layout: the client writes only inside its own copy of that layout
    io.print_json({"files": files, "cwd": "" if spec.get("workdir") else spec.get("cwd") or ""})
    return 0


def cmd_versions(root: str, agent_hash: str, args: argparse.Namespace, io: CommandIO) -> int:
    """Installed versions of distributions, in this interpreter or in a built environment."""
    python = None
    if args.env:
        python = envs.env_python(root, args.env)
        if python is None:
            raise jobs.AgentError(f"environment {args.env!r} is not built on this host")
    version = envs.env_python_version(python) if python else platform.python_version()
    io.print_json({"python": version, "versions": envs.installed_versions(args.names, python)})
    return 0


def cmd_env_ensure(root: str, agent_hash: str, args: argparse.Namespace, io: CommandIO) -> int:
    """Build (once) the environment of the requirements on stdin; streams the build's output, then the result.

    Each line is JSON: ``{"line": text}`` while building, ``{"env": {...}}`` at the end.
    """
    text = io.stdin.read().decode("utf-8", errors="replace")

    def show(line: str) -> None:
        io.print_json({"line": line})

    result = envs.ensure(root, text, show)
    io.print_json(
        {"env": {"key": result.key, "python": result.python, "built": result.built, "seconds": result.seconds}}
    )
    return 0


def cmd_cat_blob(root: str, agent_hash: str, args: argparse.Namespace, io: CommandIO) -> int:
    path = blobs.blob_path(root, args.digest)
    if os.path.exists(path):
        blobs.check_blob_after_reboot(path, args.digest)  # what we send is what the digest names
    return _copy_file_to_stdout(path, io)


def cmd_cat_outputs(root: str, agent_hash: str, args: argparse.Namespace, io: CommandIO) -> int:
    path = jobs.job_dir(root, args.job_id)
    outputs = os.path.join(path, protocol.OUTPUTS_FILE)
    if not os.path.exists(outputs):
        raise jobs.AgentError(f"job {args.job_id} has no outputs (it did not finish successfully)")
    _copy_file_to_stdout(outputs, io)
    # The runner has finished (outputs exist), so writing into its folder is safe now.
    disk.atomic_write(os.path.join(path, protocol.FETCHED_MARK), b"")
    return 0


def cmd_cat_checkpoint(root: str, agent_hash: str, args: argparse.Namespace, io: CommandIO) -> int:
    path = jobs.job_dir(root, args.job_id)
    checkpoint = os.path.join(path, protocol.CHECKPOINT_DIR, protocol.CHECKPOINT_FILE)
    if not os.path.exists(checkpoint):
        raise jobs.AgentError(f"job {args.job_id} has no checkpoint (no Keras epoch ended, or --checkpoint-every 0)")
    return _copy_file_to_stdout(checkpoint, io)


def cmd_gc(root: str, agent_hash: str, args: argparse.Namespace, io: CommandIO) -> int:
    """Remove finished jobs older than --older-than, then blobs no job references, old agents, envs and logs.

    A finished job whose outputs were never fetched is kept unless
    --include-unfetched; a job its launcher still runs or queues is never
    touched, nor an agent version that a live job or warm runner uses, nor
    an env such a job or runner uses or one a job used within --older-than.
    """
    removed, kept_unfetched = [], []
    cutoff = time.time() - args.older_than
    agents_in_use = {agent_hash} | warm.agent_versions_in_use(root)
    envs_in_use: set[str] = set()
    for path in jobs.job_paths(root):
        spec = jobs.read_spec(path)
        row = process.job_row(path, spec)
        if row["state"] in protocol.ACTIVE_STATES:
            agents_in_use.add(spec.get("agent") or "")
            envs_in_use.add(spec.get("env") or "")
            continue
        if (row.get("ended") or row.get("submitted") or 0) > cutoff:
            continue
        unfetched = row["state"] in (protocol.STATE_DONE, protocol.STATE_STOPPED) and not row["fetched"]
        if unfetched and not args.include_unfetched:
            kept_unfetched.append(row["job_id"])
            continue
        if not args.dry_run:
            shutil.rmtree(path, onerror=_make_writable_and_retry)
            jobs.forget_summary(path)
        removed.append(row["job_id"])
    freed = 0
    with blobs.blob_lock(root, exclusive=True):
        unreferenced = blobs.unreferenced_blobs(root)
        for digest in unreferenced:
            blob = os.path.join(blobs.blobs_dir(root), digest)
            try:
                freed += os.path.getsize(blob)
                if args.dry_run:
                    continue
                if "." in digest:  # a stale partial upload
                    os.unlink(blob)
                else:
                    layout.drop_blob(root, digest)
            except FileNotFoundError:
                continue  # dropped meanwhile (a damaged blob found by a job's placement)
    agents, agent_bytes = _old_agents(root, agents_in_use, args.dry_run)
    unused_envs, env_bytes = envs.collect(root, args.older_than, envs_in_use, args.dry_run)
    io.print_json(
        {
            "removed_jobs": removed,
            "kept_unfetched": kept_unfetched,
            "removed_blobs": len(blobs),
            "removed_agents": agents,
            "removed_envs": unused_envs,
            "freed_bytes": freed + agent_bytes + env_bytes,
        }
    )
    return 0


def _make_writable_and_retry(function: Any, path: str, _exc_info: Any) -> None:
    """A folder the cell made read-only (a copied tree, a tool's cache) must not stop gc for good."""
    os.chmod(os.path.dirname(path), 0o700)
    if os.path.isdir(path) and not os.path.islink(path):
        os.chmod(path, 0o700)
    function(path)


def _old_agents(root: str, in_use: set[str], dry_run: bool) -> tuple[list[str], int]:
    """Deployed agent versions nothing uses any more (nor a job that may run again), and their size."""
    folder = os.path.join(root, "agent")
    removed, freed = [], 0
    if not os.path.isdir(folder):
        return removed, freed
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name in in_use or not os.path.isdir(path):
            continue
        if time.time() - os.path.getmtime(path) < 3600:
            continue  # just deployed by another client, which may be about to start a job with it
        for parent, _, files in os.walk(path):
            freed += sum(os.path.getsize(os.path.join(parent, f)) for f in files)
        if not dry_run:
            shutil.rmtree(path, ignore_errors=True)
        removed.append(name)
    return removed, freed


def _copy_file_to_stdout(path: str, io: CommandIO) -> int:
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise jobs.AgentError(f"{os.path.basename(path)} is not on the host any more") from None
    with f:
        while chunk := f.read(4 * 1024 * 1024):
            if io.cancelled.is_set():  # the client stopped reading (Ctrl-C during a download): send no more
                return 1
            io.stdout.write(chunk)
        io.stdout.flush()
    return 0


def cmd_attach(root: str, agent_hash: str, args: argparse.Namespace, io: CommandIO) -> int:
    """Stream events from ``--from`` until the job's final event.

    Tails the log from where it last read, a bounded chunk at a time (a long
    job's log is never read twice, nor held whole).  If the launcher says the
    job ended without a final event (SIGKILL, OOM, reboot) a ``lost`` event
    is printed, not stored, so the client always sees an end.
    """
    path = jobs.job_dir(root, args.job_id)
    spec = jobs.read_spec(path)
    job_launcher = process.launcher_for(spec)
    next_seq = args.from_seq
    checked = 0.0
    with jobs.EventTail(path) as tail:
        while not io.cancelled.is_set():
            events = tail.read_events()
            for event, line in events:
                if event["seq"] < next_seq:
                    continue
                io.write_text(line)
                next_seq = event["seq"] + 1
                if event["type"] in protocol.TERMINAL:
                    io.stdout.flush()
                    return 0
            io.stdout.flush()
            if events or tail.has_unread():
                continue
            if time.monotonic() - checked >= LIVENESS_SECONDS:
                checked = time.monotonic()
                phase = job_launcher.poll(path, spec)
                if not phase.active:
                    if tail.has_unread():
                        continue  # the runner wrote its last events just before exiting
                    message = phase.message or process.LOST_MESSAGE  # e.g. a scheduler's word for what happened
                    lost = protocol.make_event(next_seq, protocol.LOST, message=message)
                    io.write_text(protocol.encode_event(lost))
                    io.stdout.flush()
                    return 0
            time.sleep(POLL_SECONDS)
    return 0  # the client stopped following


def cmd_events(root: str, agent_hash: str, args: argparse.Namespace, io: CommandIO) -> int:
    """The events logged so far, from ``--from`` (at most ``--limit``), without following."""
    path = jobs.job_dir(root, args.job_id)
    count = 0
    for _, line in jobs.iter_events(path, args.from_seq):
        if count >= args.limit:
            break
        io.write_text(line)
        count += 1
    io.stdout.flush()
    return 0


def cmd_status(root: str, agent_hash: str, args: argparse.Namespace, io: CommandIO) -> int:
    if args.job_id is None:
        io.print_json([process.job_row(path) for path in jobs.job_paths(root)])
        return 0
    path = jobs.job_dir(root, args.job_id)
    spec = jobs.read_spec(path)
    row = process.job_row(path, spec)
    tail: list[str] = []
    error = None
    for event, _ in jobs.iter_events(path):
        if event["type"] in (protocol.STDOUT, protocol.STDERR):
            tail.append(event.get("text", ""))
            del tail[: -args.lines]
        elif event["type"] == protocol.ERROR:
            error = event.get("traceback")
    row.update(source=spec.pop("source", None), spec=spec, log_tail=tail, traceback=error)
    io.print_json(row)
    return 0


def cmd_cancel(root: str, agent_hash: str, args: argparse.Namespace, io: CommandIO) -> int:
    """End the job and every process it started (SIGTERM, SIGKILL after a grace period).

    A job whose log has ended is never signalled; a killed job's leftover
    processes (children adopted by init) are still ended.
    """
    path = jobs.job_dir(root, args.job_id)
    spec = jobs.read_spec(path)
    row = process.job_row(path, spec)
    job_launcher = process.launcher_for(spec)
    if row["state"] not in protocol.ACTIVE_STATES:
        leftovers = {}
        if row["state"] == protocol.STATE_KILLED:
            leftovers = job_launcher.cancel(path, spec, args.grace)
        io.print_json({"job_id": args.job_id, "cancelled": False, "state": row["state"], **leftovers})
        return 0
    ended = job_launcher.cancel(path, spec, args.grace)
    layout.release_copies(root, path)  # a runner killed before its own wind-up left them
    last = jobs.last_event(path)
    if last is None or last["type"] not in protocol.TERMINAL:
        jobs.append_event(path, protocol.CANCELLED, message="cancelled on request (killed after the grace period)")
    jobs.forget_summary(path)
    io.print_json({"job_id": args.job_id, "cancelled": True, "killed": bool(ended.get("killed")), **ended})
    return 0


def cmd_stop(root: str, agent_hash: str, args: argparse.Namespace, io: CommandIO) -> int:
    """Ask the job to stop training at the end of the current batch (the runner turns SIGINT into that)."""
    path = jobs.job_dir(root, args.job_id)
    spec = jobs.read_spec(path)
    requested = False
    if jobs.event_summary(path)["ended"] is None:  # a job whose log has ended is never signalled
        requested = process.launcher_for(spec).stop(path, spec)
    io.print_json({"job_id": args.job_id, "stop_requested": requested})
    return 0


def cmd_gpus(root: str, agent_hash: str, args: argparse.Namespace, io: CommandIO) -> int:
    """The host's GPUs now: model, memory, utilization, and who holds each (a job of ours, or others' processes)."""
    inventory = gpus.inventory()
    held = gpu_queue.holdings(root) if inventory else {}
    foreign = gpu_queue.others_on_gpus(inventory, 0) if inventory else {}
    rows = []
    for g in inventory:
        record = held.get(g.index)
        holder = gpu_queue.holder(record, root) if record else None
        if holder is None and g.index in foreign:
            holder = ", ".join(gpus.describe_holder(p) for p in foreign[g.index])
        rows.append({**dataclasses.asdict(g), "holder": holder, "job_id": record.job_id if record else None})
    io.print_json(rows)
    return 0


def cmd_dispatch(root: str, agent_hash: str, args: argparse.Namespace, io: CommandIO) -> int:
    return gpu_queue.serve(root, agent_hash)


def cmd_run_job(root: str, agent_hash: str, args: argparse.Namespace, io: CommandIO) -> int:
    from . import runner

    path = jobs.job_dir(root, args.job_id)
    kind = warm.RunnerKind.of_this_process()  # as started: the cell may change KERAS_BACKEND
    return runner.run_job(root, path, after=lambda: warm.prepare_next(root, agent_hash, kind))


def cmd_warm_runner(root: str, agent_hash: str, args: argparse.Namespace, io: CommandIO) -> int:
    return warm.serve(root, agent_hash)


def cmd_warm_up(root: str, agent_hash: str, args: argparse.Namespace, io: CommandIO) -> int:
    """Have a warm runner of this interpreter and backend ready or starting (a kernel that just loaded us)."""
    warm.ensure(root, agent_hash, warm.RunnerKind.of(sys.executable, args.backend))
    io.print_json({"warm": warm.enabled()})
    return 0


_JOB = ("job_id", {})
# command -> (function, its arguments as (name, add_argument keywords))
_COMMANDS: dict[str, tuple[Any, list[tuple[str, dict[str, Any]]]]] = {
    "hello": (cmd_hello, []),
    "submit": (cmd_submit, []),
    "put-blob": (cmd_put_blob, [("digest", {}), ("size", {"type": int}), ("--zstd", {"action": "store_true"})]),
    "put-blobs": (cmd_put_blobs, []),
    "cat-blob": (cmd_cat_blob, [("digest", {})]),
    "fetch-files": (
        cmd_fetch_files,
        [
            _JOB,
            ("patterns", {"nargs": "+"}),
            ("--max-files", {"type": int, "default": protocol.FETCH_MAX_FILES}),
            ("--max-bytes", {"type": int, "default": protocol.FETCH_MAX_BYTES}),
        ],
    ),
    "versions": (cmd_versions, [("names", {"nargs": "*"}), ("--env", {})]),
    "env-ensure": (cmd_env_ensure, []),
    "cat-outputs": (cmd_cat_outputs, [_JOB]),
    "attach": (cmd_attach, [_JOB, ("--from", {"dest": "from_seq", "type": int, "default": 0})]),
    "events": (
        cmd_events,
        [
            _JOB,
            ("--from", {"dest": "from_seq", "type": int, "default": 0}),
            ("--limit", {"type": int, "default": 10000}),
        ],
    ),
    "status": (cmd_status, [("job_id", {"nargs": "?"}), ("--lines", {"type": int, "default": 20})]),
    "cancel": (cmd_cancel, [_JOB, ("--grace", {"type": float, "default": CANCEL_GRACE_SECONDS})]),
    "stop": (cmd_stop, [_JOB]),
    "cat-checkpoint": (cmd_cat_checkpoint, [_JOB]),
    "gc": (
        cmd_gc,
        [
            ("--older-than", {"type": float, "default": 7 * 86400}),
            ("--include-unfetched", {"action": "store_true"}),
            ("--dry-run", {"action": "store_true"}),
        ],
    ),
    "gpus": (cmd_gpus, []),
    "dispatch": (cmd_dispatch, []),
    "run-job": (cmd_run_job, [_JOB]),
    "warm-runner": (cmd_warm_runner, []),
    "warm-up": (cmd_warm_up, [("--backend", {"default": ""})]),
}


class _ArgumentError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """Never prints and never exits: the server runs many commands on one stream."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(add_help=False, allow_abbrev=False, **kwargs)

    def error(self, message: str) -> Any:
        raise _ArgumentError(message)

    def exit(self, status: int = 0, message: str | None = None) -> Any:
        raise _ArgumentError(message or f"argument parsing ended with status {status}")

    def _print_message(self, message: str, file: Any = None) -> None:
        pass


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="remote_magic agent")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (function, arguments) in _COMMANDS.items():
        command = sub.add_parser(name)
        for flag, options in arguments:
            command.add_argument(flag, **options)
        command.set_defaults(fn=function)
    return parser


def run_command(root: str, agent_hash: str, argv: list[str], io: CommandIO) -> tuple[int, str]:
    """Run one command; returns (exit status, the problem in one line or "")."""
    try:
        args = _parser().parse_args(argv)
        if getattr(args, "job_id", None) is not None and not protocol.is_job_id(args.job_id):
            raise jobs.AgentError(protocol.job_id_problem(args.job_id) or "")
        disk.ensure_dir(root)
        return args.fn(root, agent_hash, args, io), ""
    except (jobs.AgentError, _ArgumentError) as exc:
        return EXIT_PROBLEM, str(exc)
    except BrokenPipeError:
        return 0, ""  # the client went away; the job itself is unaffected
