"""The commands over what the host stores: blobs in and out, a job's outputs, checkpoint and files, built
environments, and ``gc``, which removes what no job needs any more."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from typing import Any

from .. import disk, jobs, protocol
from ..launch import process, warm
from ..store import blobs, envs, fetch, layout, versions
from .base import CommandIO

AGENT_DEPLOY_SECONDS = 3600  # an agent version younger than this may be about to start a job: gc spares it


def cmd_put_blob(root: str, agent_hash: str, args: argparse.Namespace, io: CommandIO) -> int:
    blobs.receive_blob(root, args.digest, args.size, io.stdin, zstd=args.zstd)
    io.print_json({"stored": args.digest})
    return 0


def cmd_put_blobs(root: str, agent_hash: str, args: argparse.Namespace, io: CommandIO) -> int:
    """Many small blobs in one request: a JSON line of [digest, size] pairs, then their bytes back to back.

    100k small files in one round trip each would take minutes over SSH; in
    batches they take as long as their bytes.
    """
    try:
        pairs = json.loads(io.stdin.readline())
    except ValueError:
        raise jobs.AgentError("put-blobs: the first line is not a JSON list of [digest, size]") from None
    if not isinstance(pairs, list) or not all(
        isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], int) for p in pairs
    ):
        raise jobs.AgentError("put-blobs: the first line must list [digest, size] pairs")
    for digest, size in pairs:
        blobs.receive_blob(root, digest, size, io.stdin)
    io.print_json({"stored": len(pairs)})
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


def cmd_fetch_files(root: str, agent_hash: str, args: argparse.Namespace, io: CommandIO) -> int:
    """Store the job's files that match the patterns as blobs (within the request's bounds); list
    [path, digest, size] for each, and the cell's working folder inside its layout."""
    path = jobs.job_dir(root, args.job_id)
    spec = jobs.read_spec(path)
    if jobs.event_summary(path)["ended"] is None:
        raise jobs.AgentError(
            f"job {args.job_id} is still running: fetch its files once it ended (a file being "
            "written now could arrive half written)"
        )
    if not os.path.isdir(layout.job_cwd(path, spec)):
        raise jobs.AgentError(f"job {args.job_id} has no working folder on the host any more")
    problem = fetch.fetch_limit_problem(args.max_files, args.max_bytes)
    if problem:
        raise jobs.AgentError(problem)
    files = fetch.store_files(root, path, spec, args.patterns, args.max_files, args.max_bytes)
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
    version = versions.env_python_version(python) if python else platform.python_version()
    io.print_json({"python": version, "versions": versions.installed_versions(args.names, python)})
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


def cmd_gc(root: str, agent_hash: str, args: argparse.Namespace, io: CommandIO) -> int:
    """Remove finished jobs older than --older-than, then blobs no job references, old agents, envs and logs.

    A finished job whose outputs were never fetched is kept unless
    --include-unfetched; a job its launcher still runs or queues is never
    touched, nor an agent version that a live job or warm runner uses, nor
    an env such a job or runner uses or one a job used within --older-than.
    """
    agents_in_use = {agent_hash} | warm.agent_versions_in_use(root)
    envs_in_use: set[str] = set()
    removed, kept_unfetched = _collect_jobs(root, args, agents_in_use, envs_in_use)
    removed_blobs, freed = _collect_blobs(root, args.dry_run)
    agents, agent_bytes = _old_agents(root, agents_in_use, args.dry_run)
    unused_envs, env_bytes = envs.collect(root, args.older_than, envs_in_use, args.dry_run)
    io.print_json(
        {
            "removed_jobs": removed,
            "kept_unfetched": kept_unfetched,
            "removed_blobs": removed_blobs,
            "removed_agents": agents,
            "removed_envs": unused_envs,
            "freed_bytes": freed + agent_bytes + env_bytes,
        }
    )
    return 0


def _collect_jobs(
    root: str, args: argparse.Namespace, agents_in_use: set[str], envs_in_use: set[str]
) -> tuple[list[str], list[str]]:
    """The jobs removed and those kept unfetched; what the jobs still going use is added to the ``in_use`` sets."""
    removed, kept_unfetched = [], []
    cutoff = time.time() - args.older_than
    for path in jobs.job_paths(root):
        spec = jobs.read_spec(path)
        row = process.job_row(root, path, spec)
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
    return removed, kept_unfetched


def _collect_blobs(root: str, dry_run: bool) -> tuple[int, int]:
    """How many blobs no job references any more, and their bytes; removed unless ``dry_run``."""
    freed = 0
    with blobs.blob_lock(root, exclusive=True):
        unreferenced = blobs.unreferenced_blobs(root)
        for digest in unreferenced:
            blob = os.path.join(blobs.blobs_dir(root), digest)
            try:
                freed += os.path.getsize(blob)
                if dry_run:
                    continue
                if "." in digest:  # a stale partial upload
                    os.unlink(blob)
                else:
                    layout.drop_blob(root, digest)
            except FileNotFoundError:
                continue  # dropped meanwhile (a damaged blob found by a job's placement)
    return len(unreferenced), freed


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
        if time.time() - os.path.getmtime(path) < AGENT_DEPLOY_SECONDS:
            continue  # just deployed by another client, which may be about to start a job with it
        for parent, _, files in os.walk(path):
            freed += sum(os.path.getsize(os.path.join(parent, f)) for f in files)
        if not dry_run:
            shutil.rmtree(path, ignore_errors=True)
        removed.append(name)
    return removed, freed
