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
import json
import os
import platform
import shutil
import signal
import socket
import sys
import threading
import time
from typing import IO, Any

from . import bootstrap, jobs, protocol, warm

EXIT_PROBLEM = 2
POLL_SECONDS = 0.02
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
        }
    )
    return 0


def cmd_submit(root: str, agent_hash: str, args: argparse.Namespace, io: CommandIO) -> int:
    """Create a job and start its runner detached; answer at once.

    stdin: one JSON line (the spec, with ``blobs`` and ``inputs_size``), then
    the inputs pickle.  When blobs are missing, nothing is created and the
    answer lists them so the client can upload just those.
    """
    stdin = io.stdin
    spec = json.loads(stdin.readline())
    inputs = stdin.read(spec.pop("inputs_size"))
    missing = jobs.missing_blobs(root, [(d, s) for d, s in spec.get("blobs", [])])
    if missing:
        io.print_json({"missing": missing})
        return 0
    job_id, path = jobs.create_job(root, spec, inputs)
    pid = warm.claim(root, agent_hash, job_id) if spec.get("warm", True) and warm.enabled() else None
    if pid is None:
        pid = warm.spawn_detached(
            [sys.executable, "-c", bootstrap.RUN, root, agent_hash, "run-job", job_id],
            log=os.path.join(path, protocol.RUNNER_LOG),
            cwd=os.path.expanduser(spec.get("workdir") or "~"),
        )
    jobs.atomic_write(os.path.join(path, protocol.PID_FILE), str(pid).encode())
    io.print_json({"job_id": job_id, "pid": pid})
    if spec.get("warm", True):
        warm.ensure(root, agent_hash)  # the next job's runner
    return 0


def cmd_put_blob(root: str, agent_hash: str, args: argparse.Namespace, io: CommandIO) -> int:
    jobs.receive_blob(root, args.digest, args.size, io.stdin, zstd=args.zstd)
    io.print_json({"stored": args.digest})
    return 0


def cmd_cat_blob(root: str, agent_hash: str, args: argparse.Namespace, io: CommandIO) -> int:
    path = jobs.blob_path(root, args.digest)
    if os.path.exists(path):
        jobs.check_blob_after_reboot(path, args.digest)  # what we send is what the digest names
    return _copy_file_to_stdout(path, io)


def cmd_cat_outputs(root: str, agent_hash: str, args: argparse.Namespace, io: CommandIO) -> int:
    path = jobs.job_dir(root, args.job_id)
    outputs = os.path.join(path, protocol.OUTPUTS_FILE)
    if not os.path.exists(outputs):
        raise jobs.AgentError(f"job {args.job_id} has no outputs (it did not finish successfully)")
    _copy_file_to_stdout(outputs, io)
    # The runner has finished (outputs exist), so writing into its folder is safe now.
    jobs.atomic_write(os.path.join(path, protocol.FETCHED_MARK), b"")
    return 0


def cmd_cat_checkpoint(root: str, agent_hash: str, args: argparse.Namespace, io: CommandIO) -> int:
    path = jobs.job_dir(root, args.job_id)
    checkpoint = os.path.join(path, protocol.CHECKPOINT_DIR, protocol.CHECKPOINT_FILE)
    if not os.path.exists(checkpoint):
        raise jobs.AgentError(f"job {args.job_id} has no checkpoint (no Keras epoch ended, or --checkpoint-every 0)")
    return _copy_file_to_stdout(checkpoint, io)


def cmd_gc(root: str, agent_hash: str, args: argparse.Namespace, io: CommandIO) -> int:
    """Remove finished jobs older than --older-than, then blobs no job references.

    A finished job whose outputs were never fetched is kept unless
    --include-unfetched; running jobs are never touched.
    """
    removed, kept_unfetched = [], []
    cutoff = time.time() - args.older_than
    for row in jobs.list_jobs(root):
        path = os.path.join(jobs.jobs_dir(root), row["job_id"])
        if row["state"] in (protocol.STATE_QUEUED, protocol.STATE_RUNNING):
            continue
        if (row.get("ended") or row.get("submitted") or 0) > cutoff:
            continue
        unfetched = row["state"] == protocol.STATE_DONE and not os.path.exists(
            os.path.join(path, protocol.FETCHED_MARK)
        )
        if unfetched and not args.include_unfetched:
            kept_unfetched.append(row["job_id"])
            continue
        if not args.dry_run:
            shutil.rmtree(path)
        removed.append(row["job_id"])
    blobs = jobs.unreferenced_blobs(root)
    freed = 0
    for digest in blobs:
        blob = os.path.join(jobs.blobs_dir(root), digest)
        freed += os.path.getsize(blob)
        if not args.dry_run:
            os.unlink(blob)
    io.print_json(
        {"removed_jobs": removed, "kept_unfetched": kept_unfetched, "removed_blobs": len(blobs), "freed_bytes": freed}
    )
    return 0


def _copy_file_to_stdout(path: str, io: CommandIO) -> int:
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise jobs.AgentError(f"{os.path.basename(path)} is not on the host any more") from None
    with f:
        while chunk := f.read(4 * 1024 * 1024):
            io.stdout.write(chunk)
        io.stdout.flush()
    return 0


def cmd_attach(root: str, agent_hash: str, args: argparse.Namespace, io: CommandIO) -> int:
    """Stream events from ``--from`` until the job's final event.

    Tails the log from where it last read (a long job's log is never read
    twice).  If the runner died without a final event (SIGKILL, OOM, reboot)
    a ``lost`` event is printed, not stored, so the client always sees an end.
    """
    path = jobs.job_dir(root, args.job_id)
    next_seq = args.from_seq
    with jobs.EventTail(path) as tail:
        while not io.cancelled.is_set():
            ended = False
            for line in tail.read_lines():
                event = json.loads(line)
                if event["seq"] < next_seq:
                    continue
                io.write_text(line)
                next_seq = event["seq"] + 1
                ended = ended or event["type"] in protocol.TERMINAL
            io.stdout.flush()
            if ended:
                return 0
            pid = jobs.read_pid(path)
            if pid is not None and not jobs.process_alive(pid):
                if tail.has_unread():
                    continue  # the runner wrote its last events just before exiting
                lost = protocol.make_event(
                    next_seq, protocol.LOST, message="the runner process ended without a final event"
                )
                io.write_text(protocol.encode_event(lost))
                io.stdout.flush()
                return 0
            time.sleep(POLL_SECONDS)
    return 0  # the client stopped following


def cmd_events(root: str, agent_hash: str, args: argparse.Namespace, io: CommandIO) -> int:
    """The events logged so far, from ``--from`` (at most ``--limit``), without following."""
    path = jobs.job_dir(root, args.job_id)
    count = 0
    for _, line in jobs.iter_event_lines(path, args.from_seq):
        if count >= args.limit:
            break
        io.write_text(line)
        count += 1
    io.stdout.flush()
    return 0


def cmd_status(root: str, agent_hash: str, args: argparse.Namespace, io: CommandIO) -> int:
    if args.job_id is None:
        io.print_json(jobs.list_jobs(root))
        return 0
    path = jobs.job_dir(root, args.job_id)
    row = jobs.summarize(path)
    tail: list[str] = []
    error = None
    for _, line in jobs.iter_event_lines(path):
        event = json.loads(line)
        if event["type"] in (protocol.STDOUT, protocol.STDERR):
            tail.append(event["text"])
            del tail[: -args.lines]
        elif event["type"] == protocol.ERROR:
            error = event.get("traceback")
    spec = jobs.read_spec(path)
    row.update(source=spec.pop("source", None), spec=spec, log_tail=tail, traceback=error)
    io.print_json(row)
    return 0


def cmd_cancel(root: str, agent_hash: str, args: argparse.Namespace, io: CommandIO) -> int:
    """SIGTERM to the job's process group, SIGKILL after a grace period."""
    path = jobs.job_dir(root, args.job_id)
    pid = jobs.read_pid(path)
    if not jobs.process_alive(pid):
        io.print_json({"job_id": args.job_id, "cancelled": False, "state": jobs.summarize(path)["state"]})
        return 0
    assert pid is not None
    _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + args.grace
    while jobs.process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    killed = jobs.process_alive(pid)
    if killed:
        _signal_group(pid, signal.SIGKILL)
        while jobs.process_alive(pid) and time.monotonic() < deadline + 5:
            time.sleep(0.05)
    # Children the cell started are in the same group: make sure they are gone too.
    _signal_group(pid, signal.SIGKILL)
    last = jobs.last_event(path)
    if last is None or last["type"] not in protocol.TERMINAL:
        log = jobs.EventLog(path)
        log.append(protocol.CANCELLED, message="cancelled on request (killed after the grace period)")
        log.close()
    io.print_json({"job_id": args.job_id, "cancelled": True, "killed": killed})
    return 0


def cmd_stop(root: str, agent_hash: str, args: argparse.Namespace, io: CommandIO) -> int:
    """Ask the runner to stop training at the end of the current batch (SIGINT)."""
    path = jobs.job_dir(root, args.job_id)
    pid = jobs.read_pid(path)
    alive = jobs.process_alive(pid)
    if alive:
        assert pid is not None
        os.kill(pid, signal.SIGINT)
    io.print_json({"job_id": args.job_id, "stop_requested": alive})
    return 0


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def cmd_run_job(root: str, agent_hash: str, args: argparse.Namespace, io: CommandIO) -> int:
    from . import runner

    return runner.run_job(root, jobs.job_dir(root, args.job_id), agent_hash)


def cmd_warm_runner(root: str, agent_hash: str, args: argparse.Namespace, io: CommandIO) -> int:
    return warm.serve_one_job(root, agent_hash)


_JOB = ("job_id", {})
# command -> (function, its arguments as (name, add_argument keywords))
_COMMANDS: dict[str, tuple[Any, list[tuple[str, dict[str, Any]]]]] = {
    "hello": (cmd_hello, []),
    "submit": (cmd_submit, []),
    "put-blob": (cmd_put_blob, [("digest", {}), ("size", {"type": int}), ("--zstd", {"action": "store_true"})]),
    "cat-blob": (cmd_cat_blob, [("digest", {})]),
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
    "run-job": (cmd_run_job, [_JOB]),
    "warm-runner": (cmd_warm_runner, []),
}


class _ArgumentError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # never exit: the server runs many commands
        raise _ArgumentError(message)


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
        jobs.ensure_dir(root)
        return args.fn(root, agent_hash, args, io), ""
    except (jobs.AgentError, _ArgumentError) as exc:
        return EXIT_PROBLEM, str(exc)
    except BrokenPipeError:
        return 0, ""  # the client went away; the job itself is unaffected


def main(root: str, agent_hash: str, argv: list[str]) -> int:
    if argv[:1] == ["serve"]:
        from .server import serve

        return serve(root, agent_hash)
    returncode, problem = run_command(root, agent_hash, argv, CommandIO(sys.stdin.buffer, sys.stdout.buffer))
    if problem:
        sys.stderr.write(problem + "\n")
    return returncode
