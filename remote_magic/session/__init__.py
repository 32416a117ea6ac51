"""The client side of a job's life: submit, follow, reattach, stop, cancel, fetch, inject.

Works on any ``AgentClient``; knows nothing about widgets (a panel is
anything with ``handle(event)``, ``note(text)``, ``finish()``) and nothing
about IPython beyond a namespace to update.  What the user should type to do
something later is asked of a ``Hints`` object, so magic syntax stays in
magics.py and the REST API can phrase it its own way.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import platform
import re
import secrets
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .. import project
from ..agent import codec, protocol
from ..errors import ConnectionFailed, JobLost, RemoteExecutionError, RemoteMagicError
from ..project import ProjectFile, capture, envcheck, payload
from ..transport import LOCAL_HOST, LocalTransport, SSHTransport
from ..wire import upload
from ..wire.cache import BlobCache
from ..wire.client import AgentClient

RECONNECT_TIMEOUT = 600.0
_BACKOFF = (0.5, 1, 2, 4, 8, 15, 30)


@dataclass
class SlurmSettings:
    """A Slurm host's defaults for its jobs (``scheduler: "slurm"`` in the host's settings)."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None  # Slurm's --time, e.g. "2:00:00"
    sbatch_args: list[str] = field(default_factory=list)
    setup: list[str] = field(default_factory=list)  # shell lines before Python in the job, e.g. module load
    gpus: int = 0  # a login node has no nvidia-smi to count from: the default GPU request
    signal_grace: int = 120  # seconds before the time limit that the job checkpoints and requeues itself

    def job_options(self, gpus: int, overrides: dict[str, Any]) -> dict[str, Any]:
        """The job's ``slurm`` spec: these settings, ``overrides`` from the cell's options on top."""
        options = {key: getattr(self, key) for key in SLURM_SETTING_KEYS if key != "gpus"}
        options.update({key: value for key, value in overrides.items() if value})
        return {**options, "gpus": gpus}


SLURM_SETTING_KEYS = ("partition", "account", "qos", "time", "sbatch_args", "setup", "gpus", "signal_grace")


@dataclass
class HostSettings:
    python: str | None = None
    root: str | None = None
    ssh_config: str | None = None
    busy_gpu_memory: int = 1024  # MiB that others' processes may use on a GPU the queue still counts as free
    queue: str | None = None  # a GPU queue folder shared by the host's users (default: one per host root)
    slurm: SlurmSettings | None = None  # scheduler: "slurm": jobs go through the cluster's queue
    bulk_ssh: str | None = "ssh"  # the OpenSSH client for large blobs (name on PATH or path); None: paramiko only


HOST_SETTING_KEYS = frozenset(
    {"python", "root", "busy_gpu_memory", "queue", "bulk_ssh", "scheduler", *SLURM_SETTING_KEYS}
)
_UNITS_MIB = {"kib": 1 / 1024, "k": 1 / 1024, "mib": 1, "m": 1, "gib": 1024, "g": 1024}


def memory_mib(value: object, setting: str) -> int:
    """A memory size as a setting gives it: a number of bytes, or text such as '1GiB', '512MiB', '2G'."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value // (1024 * 1024)
    text = str(value).strip().lower().replace(" ", "")
    number = text.rstrip("kmgib")
    unit = text[len(number) :]
    try:
        mib = float(number) * _UNITS_MIB[unit or "mib"] if unit else float(number) / (1024 * 1024)
    except (KeyError, ValueError):
        mib = -1
    if not mib >= 0:
        raise ValueError(f"{setting} takes a size such as '1GiB' or '512MiB' (or bytes), not {value!r}")
    return int(mib)


def _slurm_settings(host: str, settings: dict[str, Any]) -> SlurmSettings | None:
    """The Slurm part of a host's settings, checked: its keys mean nothing without ``scheduler: "slurm"``."""
    scheduler = settings.get("scheduler")
    given = sorted(key for key in SLURM_SETTING_KEYS if key in settings)
    if scheduler is None:
        if given:
            raise ValueError(f"the settings of host {host!r} have {given}, which only apply with 'scheduler': 'slurm'")
        return None
    if scheduler != "slurm":
        raise ValueError(f"host {host!r}: 'scheduler' can be 'slurm' (or left out for a plain host), not {scheduler!r}")
    slurm = SlurmSettings(**{key: settings[key] for key in given})
    for key in ("sbatch_args", "setup"):
        value = getattr(slurm, key)
        if isinstance(value, str) or not all(isinstance(item, str) for item in value):
            raise ValueError(f"host {host!r}: {key!r} takes a list of strings, not {value!r}")
    for key in ("gpus", "signal_grace"):
        value = getattr(slurm, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"host {host!r}: {key!r} takes a whole number, 0 or more, not {value!r}")
    return slurm


def _bulk_ssh(host: str, settings: dict[str, Any]) -> str | None:
    value = settings.get("bulk_ssh", "ssh")
    if value is None or value is False or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError(
            f"host {host!r}: 'bulk_ssh' takes the OpenSSH client to use ('ssh', a path) or None, not {value!r}"
        )
    return value


class Connections:
    """One agent client per host for the life of a kernel (or server), reopened after a drop.

    ``hosts`` holds per-host settings as in ``c.RemoteMagics.hosts``.
    """

    def __init__(self, hosts: dict[str, dict[str, str]] | None = None, ssh_config: str | None = None) -> None:
        self.hosts = hosts or {}
        self.ssh_config = ssh_config
        self._clients: dict[tuple[str, str | None, str | None], AgentClient] = {}
        self._lock = threading.Lock()

    def settings_for(self, host: str, python: str | None = None) -> HostSettings:
        settings = dict(self.hosts.get(host, {}))
        unknown = set(settings) - HOST_SETTING_KEYS
        if unknown:
            raise ValueError(
                f"the settings of host {host!r} have unknown keys {sorted(unknown)}; "
                f"use {', '.join(repr(k) for k in sorted(HOST_SETTING_KEYS))}"
            )
        busy = settings.get("busy_gpu_memory")
        return HostSettings(
            python=python or settings.get("python"),
            root=settings.get("root"),
            ssh_config=self.ssh_config,
            busy_gpu_memory=memory_mib(busy, f"the busy_gpu_memory of host {host!r}") if busy is not None else 1024,
            queue=settings.get("queue"),
            slurm=_slurm_settings(host, settings),
            bulk_ssh=_bulk_ssh(host, settings),
        )

    def get(self, host: str, python: str | None = None) -> AgentClient:
        settings = self.settings_for(host, python)
        key = (host, settings.python, settings.root)
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                if host == LOCAL_HOST:
                    transport = LocalTransport(python=settings.python, root=settings.root)
                else:
                    transport = SSHTransport(
                        host,
                        python=settings.python or "python3",
                        root=settings.root,
                        ssh_config=settings.ssh_config,
                        bulk_ssh=settings.bulk_ssh,
                    )
                client = self._clients[key] = AgentClient(transport)
            return client

    def close(self) -> None:
        with self._lock:
            for client in self._clients.values():
                client.close(final=True)
            self._clients.clear()


class Hints(Protocol):
    """How the front end tells the user to act on a job later (a magic, a button, a URL)."""

    def attach(self, job_id: str, host: str) -> str:
        """How to follow the job again and get its outputs."""

    def detail(self, job_id: str, host: str) -> str:
        """How to see the job's last output and error."""

    def checkpoint(self, job_id: str, host: str) -> str:
        """How to get the model of the job's last checkpoint."""

    def fetch(self, job_id: str, host: str, patterns: list[str]) -> str:
        """How to bring the job's files back later."""


class PlainHints:
    """Hints without any front end's syntax."""

    def attach(self, job_id: str, host: str) -> str:
        return f"attach job {job_id} on host {host} again to follow it and fetch its outputs"

    def detail(self, job_id: str, host: str) -> str:
        return f"the status of job {job_id} on host {host} shows its last output"

    def checkpoint(self, job_id: str, host: str) -> str:
        return f"the checkpoint of job {job_id} on host {host} holds the model of its last checkpointed epoch"

    def fetch(self, job_id: str, host: str, patterns: list[str]) -> str:
        return f"the files stay with job {job_id} on host {host} until it is collected"


@dataclass
class Submission:
    """What a cell asks for, worked out locally before anything is sent."""

    source: str
    inputs: list[str]
    outputs: list[str]
    payload: payload.Payload
    name: str | None = None
    checkpoint_every: int = 1
    warm: bool = True
    compress: str = "auto"
    files: list[ProjectFile] = field(default_factory=list)  # the --files layout
    cwd: str = ""  # the kernel's working folder inside that layout
    modules: list[ProjectFile] = field(default_factory=list)  # local modules, relative to their sys.path entry
    workdir: str | None = None  # --workdir: a folder on the host to run in instead
    env: str | None = None  # a built environment's key on the host
    backend: str | None = None  # the job's KERAS_BACKEND
    gpus: int | str = 0  # how many GPUs the job holds, or "all" (the host's queue gives them)
    gpu_ids: list[int] | None = None  # exactly these GPUs instead
    busy_gpu_memory: int | None = None  # MiB: see HostSettings
    queue: str | None = None  # the host's shared queue folder: see HostSettings
    slurm: dict[str, Any] | None = None  # on a Slurm host: the job's sbatch options (SlurmSettings.job_options)
    sweep: dict[str, Any] | None = None  # a sweep's trial: {"id", "trial", "parallel", "params"} (protocol.SPEC_KEYS)
    imports: list[str] = field(default_factory=list)  # top-level modules the cell and the pickle need
    # imported only somewhere in the local modules sent (maybe optional, or in a file the cell never uses)
    module_imports: list[str] = field(default_factory=list)

    def spec(self) -> dict[str, Any]:
        """The job's spec as the agent stores it (protocol.SPEC_KEYS)."""
        self.payload.hash()  # where the caller did not already (a no-op then)
        spec: dict[str, Any] = {
            "source": self.source,
            "name": self.name,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "checkpoint_every": self.checkpoint_every,
            "warm": self.warm,
            "blobs": self.payload.blobs,
            "client": {"python": sys.version.split()[0], "agent_schema": protocol.SCHEMA_VERSION},
            "files": [[f.rel, f.digest, f.size, f.mode] for f in self.files],
            "modules": [[f.rel, f.digest, f.size, f.mode] for f in self.modules],
            "cwd": self.cwd,
        }
        spec["gpus"] = self.gpus
        optional = {
            "workdir": self.workdir,
            "env": self.env,
            "backend": self.backend,
            "gpu_ids": self.gpu_ids,
            "busy_gpu_memory": self.busy_gpu_memory,
            "queue": self.queue,
            "sweep": self.sweep,
            "slurm": self.slurm,
        }
        spec.update({key: value for key, value in optional.items() if value is not None})
        if self.slurm is not None:
            spec["launcher"] = "slurm"
        return spec

    def blob_sources(self) -> list[upload.BlobSource]:
        """Every blob the job needs, and where its bytes are."""
        self.payload.hash()
        sources = [
            upload.BlobSource(digest, size, buffer=buffer)
            for (digest, size), buffer in zip(self.payload.blobs, self.payload.buffers, strict=True)
        ]
        sources += [upload.BlobSource(f.digest, f.size, path=f.local) for f in self.files + self.modules]
        return sources


def prepare(
    source: str,
    namespace: dict[str, Any],
    hidden: set[str] | frozenset[str] = frozenset(),
    outputs: list[str] | None = None,
    name: str | None = None,
    files: str | None = None,
    ship_modules: bool = True,
    extra_modules: list[str] | None = None,
    hashes: project.HashCache | None = None,
    hash_buffers: bool = True,
) -> Submission:
    """Analyse the cell, pickle its inputs, list the local files and modules it needs.

    Raises CaptureError, PayloadError or ProjectError, before any I/O with a host.
    ``hash_buffers=False``: the caller runs ``submission.payload.hash()`` before submitting.
    """
    names = capture.analyze(source)
    inputs = capture.select_inputs(names, namespace, set(hidden) | protocol.RUNNER_NAMES)
    packed = payload.pack({n: namespace[n] for n in inputs}, namespace, hash_buffers)
    wanted = outputs if outputs is not None else capture.default_outputs(names, inputs)
    if outputs is None:
        wanted += [n for n in _trained_together(wanted, inputs, namespace) if n not in wanted]
    submission = Submission(source, inputs, wanted, packed, name)
    if files or ship_modules or extra_modules:
        hashes = hashes or project.HashCache()
    if files:
        file_set = project.collect_files(files, cache=hashes)
        submission.files, submission.cwd = file_set.files, file_set.cwd
    local: list[project.LocalModule] = []
    if ship_modules or extra_modules:
        found_in = (source, packed.modules) if ship_modules else ("", set())
        local = project.find_local_modules(found_in[0], found_in[1], extra_modules or ())
        submission.modules = project.module_files(local, hashes)
    submission.imports = _imports_of_the_job(source, packed.modules, [], local)
    submission.module_imports = [
        n for n in _imports_of_the_job("", set(), submission.modules, local) if n not in submission.imports
    ]
    return submission


def _trained_together(wanted: list[str], inputs: list[str], namespace: dict[str, Any]) -> list[str]:
    """Inputs that must come back with a wanted one: a PyTorch optimizer and the modules whose parameters it steps.

    Brought back apart, the kernel's optimizer would go on stepping the old,
    untrained parameters; in one pickle they stay the same objects.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        return []
    optimizers = {n: namespace[n] for n in inputs if isinstance(namespace[n], torch.optim.Optimizer)}
    modules = {n: namespace[n] for n in inputs if isinstance(namespace[n], torch.nn.Module)}
    extra: list[str] = []
    for opt_name, optimizer in optimizers.items():
        stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for mod_name, module in modules.items():
            if not any(id(p) in stepped for p in module.parameters()):
                continue
            if opt_name in wanted and mod_name not in wanted:
                extra.append(mod_name)
            if mod_name in wanted and opt_name not in wanted:
                extra.append(opt_name)
    return list(dict.fromkeys(extra))


def _imports_of_the_job(
    source: str, referenced: set[str], module_files: list[ProjectFile], local: list[project.LocalModule]
) -> list[str]:
    """Top-level modules the job needs on the host: the cell's imports, its local modules' and the pickle's."""
    names = capture.imported_modules(source)
    for file in module_files:
        if file.rel.endswith(".py"):
            with open(file.local, encoding="utf-8", errors="replace") as f:
                names += capture.imported_modules(f.read())
    names += [name.split(".")[0] for name in referenced]
    # Our own rebuild functions are named by the pickle too: the agent brings them, nothing to install.
    ours = {"__main__", __name__.split(".")[0]}
    shipped = {module.name for module in local} | ours
    return sorted({n for n in names if n and n not in shipped and n not in sys.stdlib_module_names})


def submit(client: AgentClient, submission: Submission, progress: upload.Progress | None = None) -> str:
    """Upload the blobs the host lacks (inputs, files, modules), create the job, return its id."""
    spec = submission.spec()
    sources = submission.blob_sources()
    for _attempt in range(3):
        answer = client.submit(spec, submission.payload.data)
        if "job_id" in answer:
            return answer["job_id"]
        upload.send_missing(client, sources, set(answer["missing"]), submission.compress, progress)
    raise RemoteMagicError(f"host {client.host} kept asking for the same inputs; its disk may be full")


def follow(
    client: AgentClient,
    job_id: str,
    on_event: Callable[[dict[str, Any]], None],
    from_seq: int = 0,
    reconnect_timeout: float = RECONNECT_TIMEOUT,
    on_reconnecting: Callable[[str], None] | None = None,
    keep_going: Callable[[], bool] | None = None,
    hints: Hints | None = None,
) -> dict[str, Any] | None:
    """Feed every event from ``from_seq`` to ``on_event`` until the job ends.

    When the link drops, reconnect with backoff and resume at the next
    event, so none is missed and none is seen twice.  Returns the final
    event, or None as soon as ``keep_going()`` says to stop following (the
    job itself runs on).  A job written by a newer agent schema is refused
    at its first event.
    """
    next_seq = from_seq
    failures = 0
    give_up_at: float | None = None
    while True:
        try:
            with client.attach(job_id, next_seq) as events:
                for event in events:
                    if event["seq"] < next_seq:
                        continue
                    problem = protocol.newer_schema_problem(event.get("schema"), job_id)
                    if problem:
                        raise RemoteMagicError(problem)
                    next_seq = event["seq"] + 1
                    failures, give_up_at = 0, None
                    on_event(event)
                    if event["type"] in protocol.TERMINAL:
                        return event
                    if keep_going is not None and not keep_going():
                        return None
        except ConnectionFailed as exc:
            reason = str(exc)
        else:
            reason = f"the connection to host {client.host} dropped"
        if keep_going is not None and not keep_going():
            return None
        now = time.monotonic()
        give_up_at = give_up_at or now + reconnect_timeout
        if now >= give_up_at:
            later = (hints or PlainHints()).attach(job_id, client.host)
            raise ConnectionFailed(
                f"{reason}; gave up reconnecting after {reconnect_timeout:.0f} s. The job keeps running: {later}"
            )
        if on_reconnecting is not None:
            on_reconnecting(reason)
        time.sleep(min(_BACKOFF[min(failures, len(_BACKOFF) - 1)], max(0.0, give_up_at - now)))
        failures += 1


class BackgroundFollower(threading.Thread):
    """Follows a detached job while the kernel is free, then hands its final event on.

    Daemon thread: it never keeps a kernel alive.  ``stop()`` ends the
    following (the job runs on) at the next event.  If following fails,
    ``on_error`` is told (there is no cell to raise into).
    """

    def __init__(
        self,
        client: AgentClient,
        job_id: str,
        on_event: Callable[[dict[str, Any]], None],
        on_end: Callable[[dict[str, Any]], None],
        on_error: Callable[[BaseException], None],
        from_seq: int = 0,
        reconnect_timeout: float = RECONNECT_TIMEOUT,
        hints: Hints | None = None,
    ) -> None:
        super().__init__(name=f"remote_magic follow {job_id}", daemon=True)
        self.client, self.job_id = client, job_id
        self.on_event, self.on_end, self.on_error = on_event, on_end, on_error
        self.from_seq, self.reconnect_timeout, self.hints = from_seq, reconnect_timeout, hints
        self._stop_requested = threading.Event()
        self.error: BaseException | None = None

    def stop(self) -> None:
        self._stop_requested.set()

    @property
    def stopped(self) -> bool:
        return self._stop_requested.is_set()

    def run(self) -> None:
        try:
            final = follow(
                self.client,
                self.job_id,
                self.on_event,
                from_seq=self.from_seq,
                reconnect_timeout=self.reconnect_timeout,
                keep_going=lambda: not self.stopped,
                hints=self.hints,
            )
            if final is not None and not self.stopped:
                self.on_end(final)
        except BaseException as exc:  # noqa: BLE001  (reported through on_error: a thread cannot raise to the user)
            self.error = exc
            self.on_error(exc)


# Transfers at least this big show their progress in the panel.
SHOWN_TRANSFER_BYTES = 32 * 1024 * 1024


def shown_progress(show: Callable[[str], None], what: str) -> upload.Progress:
    """A transfer's progress as a panel line ("uploading: 12.6 of 536.9 MB (2%)"), for those worth showing."""

    def progress(moved: int, total: int) -> None:
        if total >= SHOWN_TRANSFER_BYTES:
            show(f"{what}: {moved / 1e6:,.1f} of {total / 1e6:,.1f} MB ({100 * moved // total}%)")

    return progress


def fetch_outputs(
    client: AgentClient,
    job_id: str,
    done: dict[str, Any],
    cache: BlobCache | None = None,
    progress: upload.Progress | None = None,
) -> dict[str, Any]:
    """Load the job's outputs; each blob comes from the local cache when an earlier fetch stored it."""
    data = client.outputs(job_id)
    blobs = done.get("blobs", [])
    report = upload.TransferProgress(sum(size for _, size in blobs), progress)
    buffers = []
    for digest, size in blobs:
        buffers.append(fetch_blob(client, digest, size, cache, report.within))
        report.add(size)
    report.finish()
    return payload.unpack(data, buffers)


def fetch_blob(
    client: AgentClient,
    digest: str,
    size: int,
    cache: BlobCache | None = None,
    progress: Callable[[int], None] | None = None,
) -> bytearray:
    # The local host's blobs are on this disk already: caching them would only store them twice.
    cache = None if client.is_local else cache or BlobCache()
    buffer = cache.get(digest, size) if cache is not None else None
    if buffer is None:
        buffer = client.get_blob(digest, size, progress)  # verified against its sha256 while it arrives
        if cache is not None:
            cache.put_in_background(digest, buffer)
    return buffer


def fetch_checkpoint(client: AgentClient, job_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model of the job's last checkpoint, and the checkpoint's epoch information."""
    meta = client.status(job_id).get("checkpoint")
    if not meta:
        raise RemoteMagicError(
            f"job {job_id} on host {client.host} has no checkpoint: no Keras epoch ended "
            "(or it ran with --checkpoint-every 0)"
        )
    return payload.unpack(client.checkpoint(job_id), []), meta


@dataclass
class FileFetch:
    """``--fetch``: the job's files matching ``patterns`` come back into ``folder`` (the kernel's working folder).

    ``layout_cwd`` is ``folder``'s place inside the job's layout (the
    submission's ``cwd``) when the caller knows it; otherwise the host says,
    and its word counts only as far as ``folder`` really ends with that path.
    The bounds default to the kernel's ``REMOTE_MAGIC_FETCH_MAX_FILES`` and
    ``REMOTE_MAGIC_FETCH_MAX_BYTES``, else the agent's defaults.
    """

    patterns: list[str]
    folder: str
    overwrite: bool = False
    layout_cwd: str | None = None
    max_files: int | None = None
    max_bytes: int | None = None


def fetch_files(client: AgentClient, job_id: str, request: FileFetch, cache: BlobCache | None = None) -> list[str]:
    """Bring back the job's files that match; what happened, one line each, for the panel.

    Each file arrives whole (a temporary file renamed into place, never a
    partial one).  A local file with other content is kept and the fetched
    one saved beside it (``model.<job id>.keras``) unless ``overwrite``.
    Whatever the host answers, nothing is written outside this folder's copy
    of the job's layout: every path is checked before the first file is.
    """
    max_files, max_bytes = fetch_bounds(request)
    answer = client.fetch_files(job_id, request.patterns, max_files, max_bytes)
    found = _fetched_list(answer, max_files, max_bytes)
    if not found:
        return [f"--fetch {','.join(request.patterns)}: no file of job {job_id} matched"]
    folder = os.path.realpath(request.folder)
    layout_root = _local_layout_root(folder, request.layout_cwd, answer.get("cwd"))
    targets = [_local_target(layout_root, folder, rel) for rel, _, _ in found]
    notes, saved = [], []
    for (rel, digest, size), target in zip(found, targets, strict=True):
        if os.path.isfile(target) and _same_content(target, digest, size):
            saved.append(f"{rel} (unchanged)")
            continue
        if os.path.exists(target) and not request.overwrite:
            stem, ext = os.path.splitext(target)
            beside = f"{stem}.{job_id}{ext}"
            notes.append(
                f"{rel} exists here with other content: kept it, saved the job's as "
                f"{os.path.relpath(beside, folder)} (--fetch-overwrite replaces it)"
            )
            target = beside
        _fetch_file(client, digest, size, target, None if client.is_local else cache or BlobCache(), layout_root)
        saved.append(f"{os.path.relpath(target, folder)} ({size:,} bytes)")
    return [f"fetched: {', '.join(saved)}", *notes]


def fetch_bounds(request: FileFetch) -> tuple[int, int]:
    """(files, bytes) one fetch may bring back: the request's, else the kernel's environment, else the defaults."""
    files, size = request.max_files, request.max_bytes
    setting = os.environ.get(protocol.FETCH_MAX_FILES_SETTING, "").strip()
    if files is None and setting:
        if not setting.isdigit() or int(setting) < 1:
            raise RemoteMagicError(
                f"{protocol.FETCH_MAX_FILES_SETTING} takes how many files one fetch may bring back (1 or more), "
                f"not {setting!r}"
            )
        files = int(setting)
    setting = os.environ.get(protocol.FETCH_MAX_BYTES_SETTING, "").strip()
    if size is None and setting:
        try:
            size = memory_mib(setting, protocol.FETCH_MAX_BYTES_SETTING) << 20
        except ValueError as exc:
            raise RemoteMagicError(str(exc)) from None
        if size < 1:
            raise RemoteMagicError(f"{protocol.FETCH_MAX_BYTES_SETTING} takes a size of 1MiB or more, not {setting!r}")
    return files or protocol.FETCH_MAX_FILES, size or protocol.FETCH_MAX_BYTES


def _fetched_list(answer: object, max_files: int, max_bytes: int) -> list[tuple[str, str, int]]:
    """The host's list of fetched files, each [path, sha256, size], checked before it is used: the digest
    names a file in the local cache and the size how much is read."""
    files = answer.get("files") if isinstance(answer, dict) else None
    if not isinstance(files, list) or not all(
        isinstance(entry, list)
        and len(entry) == 3
        and isinstance(entry[0], str)
        and isinstance(entry[1], str)
        and _SHA256.fullmatch(entry[1]) is not None
        and isinstance(entry[2], int)
        and entry[2] >= 0
        for entry in files
    ):
        raise RemoteMagicError(
            "the host's answer to --fetch is not a list of [path, sha256, size]; nothing was written"
        )
    if len(files) > max_files or sum(size for _, _, size in files) > max_bytes:
        raise RemoteMagicError(
            f"the host's answer to --fetch lists {len(files):,} files, more than the bounds of this fetch "
            f"({max_files:,} files, {max_bytes:,} bytes); nothing was written"
        )
    return [(rel, digest, size) for rel, digest, size in files]


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _local_layout_root(folder: str, layout_cwd: str | None, host_cwd: object) -> str:
    """The local folder that mirrors the job's layout root: ``folder`` (which mirrors the cell's working
    folder) climbed as many levels as the cell's folder lies inside the layout.  The host's word for that
    is taken only when it is a plain relative path that ``folder`` really ends with; else no climbing."""
    offset = layout_cwd if layout_cwd is not None else host_cwd
    if not isinstance(offset, str) or _fetched_path_problem(offset or ".") or ".." in offset.split("/"):
        return folder
    parts = [part for part in offset.split("/") if part not in ("", ".")]
    root = folder
    for part in reversed(parts):
        if layout_cwd is None and os.path.basename(root) != part:
            return folder  # the kernel is elsewhere now: files land in this folder only
        root = os.path.dirname(root)
    return root


def _fetched_path_problem(rel: str) -> str | None:
    """Why a path the host answered cannot be used here, or None: absolute, empty, control characters."""
    if not rel or any(ord(c) < 32 or c == "\x7f" for c in rel):
        return "which is empty or has control characters"
    if (
        rel.startswith("/")
        or os.path.isabs(rel)
        or any(sep in rel for sep in (os.sep, os.altsep) if sep and sep != "/")
    ):
        return "which is absolute (or uses this system's separators)"
    return None


def _local_target(layout_root: str, folder: str, rel: str) -> str:
    """Where a fetched file goes: ``rel`` below ``folder``, refused unless it stays inside ``layout_root``, by
    name and by real path (a local link such as ``data -> /mnt/x`` would carry ``data/f`` out of it)."""
    problem = _fetched_path_problem(rel)
    if problem is None:
        target = os.path.normpath(os.path.join(folder, *rel.split("/")))
        if not target.startswith(layout_root.rstrip(os.sep) + os.sep):
            problem = f"which would land outside {layout_root}, this kernel's copy of the job's layout"
        else:
            problem = _linked_outside(layout_root, target)
            if problem is None:
                return target
    raise RemoteMagicError(
        f"--fetch: the host answered with the path {rel!r}, {problem}; nothing was written. Fetch from the "
        "folder the job was started in, with patterns inside the job's folder"
    )


def _linked_outside(layout_root: str, target: str) -> str | None:
    """Why ``target``'s folder, by its real path (the part that exists resolved, links included), is not
    inside ``layout_root``'s real path; None when it is."""
    root, real = os.path.realpath(layout_root), os.path.realpath(os.path.dirname(target))
    if real == root or real.startswith(root.rstrip(os.sep) + os.sep):
        return None
    return f"whose folder leads through a link to {real}, outside {layout_root}, this kernel's copy of the job's layout"


def _fetch_file(
    client: AgentClient, digest: str, size: int, target: str, cache: BlobCache | None, layout_root: str
) -> None:
    """One fetched file, streamed to a temporary file beside ``target`` and renamed into place when whole.

    Its folder is checked again once it exists (by real path, inside ``layout_root``), and the temporary
    file is created new (``O_EXCL | O_NOFOLLOW``): a link planted at its name is never written through."""
    os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
    problem = _linked_outside(layout_root, target)
    if problem is not None:
        raise RemoteMagicError(
            f"--fetch: {os.path.basename(target)} was not written: its folder {os.path.dirname(target)}, "
            f"{problem.removeprefix('whose folder ')}"
        )
    tmp = f"{target}.part-{os.getpid()}-{secrets.token_hex(4)}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(tmp, flags, 0o666)
    except FileExistsError:
        raise RemoteMagicError(
            f"--fetch: something is in the way of the temporary file {tmp} (left alone); "
            f"{os.path.basename(target)} was not written"
        ) from None
    try:
        with os.fdopen(fd, "wb") as f:
            cached = cache is not None and cache.copy_out(digest, size, f)
            if not cached:
                f.seek(0)
                f.truncate()
                client.get_blob_into(digest, size, f)
        if cache is not None and not cached:
            with contextlib.suppress(OSError):  # a full cache disk only costs a later download
                cache.put_file(digest, tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _same_content(path: str, digest: str, size: int) -> bool:
    if os.path.getsize(path) != size:
        return False
    hasher = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            hasher.update(chunk)
    return hasher.hexdigest() == digest


def missing_module_hint(module: str) -> str:
    """What to do when the host lacks a module: ship it when it is local here, else install it there."""
    origin = project.local_origin(module)
    if origin:
        return (
            f"module {module!r} is {origin} here, and it was not sent: add `--modules {module.split('.')[0]}` "
            "to the cell (or set c.RemoteMagics.ship_modules = 'auto')"
        )
    return f"module {module!r} is not installed on the host: install it there, or run the cell with `--env auto`"


def raise_for_final(final: dict[str, Any], job_id: str, host: str, hints: Hints | None = None) -> None:
    hints = hints or PlainHints()
    kind = final["type"]
    if kind == protocol.ERROR:
        missing = final.get("missing_module")
        raise RemoteExecutionError(
            final.get("message", ""),
            final.get("traceback", ""),
            final.get("exc_type", ""),
            final.get("cell_line"),
            hint=missing_module_hint(missing) if missing else "",
        )
    if kind == protocol.CANCELLED:
        raise RemoteMagicError(f"job {job_id} on host {host} was cancelled; nothing was injected")
    if kind == protocol.LOST:
        raise JobLost(
            f"job {job_id} on host {host} ended without finishing ({final.get('message')}); "
            f"{hints.detail(job_id, host)}, and {hints.checkpoint(job_id, host)}"
        )


def registered_jobs(records: list[Any], client_for: Callable[[str], AgentClient]) -> list[dict[str, Any]]:
    """Live rows for the jobs in the local registry, one status call per host.

    An unreachable host gives its jobs the state ``unreachable`` instead of
    failing the whole list.
    """
    rows: list[dict[str, Any]] = []
    hosts = list(dict.fromkeys(record.host for record in records))
    for host in hosts:
        try:
            live = {row["job_id"]: row for row in client_for(host).status()}
            problem = None
        except RemoteMagicError as exc:
            live, problem = {}, str(exc)
        for record in (r for r in records if r.host == host):
            row = live.get(record.job_id)
            if row is None:
                row = {
                    "job_id": record.job_id,
                    "name": record.name,
                    "state": protocol.STATE_UNREACHABLE if problem else protocol.STATE_GONE,
                    "message": problem or "no longer on the host (collected)",
                    "submitted": record.submitted,
                }
            rows.append({**row, "host": host, "notebook": record.notebook, "registered": record.submitted})
    return sorted(rows, key=lambda row: row["registered"])  # oldest first, as submitted


def describe_injection(names: list[str]) -> str:
    return ", ".join(names) if names else "nothing"


class Panel(Protocol):
    """What the lifecycle needs of a panel (ui.panel.TextPanel and WidgetPanel)."""

    view: Any

    def handle(self, event: dict[str, Any]) -> None: ...

    def note(self, text: str) -> None: ...

    def finish(self) -> None: ...

    def progress(self, text: str) -> None: ...

    def set_actions(self, on_stop: Callable[[], Any] | None, on_detach: Callable[[], Any] | None) -> None: ...


class JobLifecycle:
    """Follows jobs into panels and injects their outputs: blocking, after a detach, after an interrupt.

    ``inject`` puts values into the user's namespace.  The first interrupt
    (or the Stop button) asks the host to stop after the current batch and
    still returns the partly trained outputs; a second interrupt cancels and
    injects the last checkpoint.  Detach returns at once and follows in the
    background.
    """

    def __init__(self, inject: Callable[[dict[str, Any]], None], hints: Hints, cache_limit: int | None = None) -> None:
        self.inject = inject
        self.hints = hints
        self.reconnect_timeout = RECONNECT_TIMEOUT
        self.cache_limit = cache_limit
        self.background: list[BackgroundFollower] = []

    def cache(self) -> BlobCache:
        return BlobCache(limit=self.cache_limit)

    def run(
        self, client: AgentClient, job_id: str, panel: Panel, inject: bool = True, fetch: FileFetch | None = None
    ) -> None:
        """Show the job until it ends (or is detached), then inject its outputs (and fetch its files)."""
        detach = threading.Event()
        panel.set_actions(on_stop=lambda: client.stop(job_id), on_detach=detach.set)

        def follow_from(from_seq: int) -> dict[str, Any] | None:
            return follow(
                client, job_id, panel.handle, from_seq=from_seq, reconnect_timeout=self.reconnect_timeout,
                on_reconnecting=lambda reason: panel.note(f"reconnecting: {reason}"),
                keep_going=lambda: not detach.is_set(), hints=self.hints,
            )  # fmt: skip

        try:
            final = follow_from(0)
        except KeyboardInterrupt:
            try:
                panel.note("interrupted: the host stops training after the current batch (interrupt again to cancel)")
                client.stop(job_id)
                final = follow_from(panel.view.next_seq)
            except KeyboardInterrupt:
                self.cancel_and_fall_back_to_checkpoint(client, job_id, panel)
                return
        if final is None:
            panel.note("detached: the job runs on; this panel keeps updating while the kernel is idle")
            self.follow_in_background(client, job_id, panel, inject, from_seq=panel.view.next_seq, fetch=fetch)
            return
        try:
            self.end_job(client, job_id, panel, final, inject, fetch)
        finally:
            panel.finish()

    def cancel_and_fall_back_to_checkpoint(self, client: AgentClient, job_id: str, panel: Panel) -> None:
        """A second interrupt: kill the job, and inject the model of its last checkpoint if it has one."""
        try:
            client.cancel(job_id)
            try:
                values, meta = fetch_checkpoint(client, job_id)
            except RemoteMagicError:
                panel.note(f"job {job_id} cancelled; it had no checkpoint, nothing was injected")
                raise KeyboardInterrupt from None
            self.inject(values)
            panel.note(
                f"job {job_id} cancelled; injected {', '.join(values)} from the checkpoint of epoch "
                f"{meta['epoch']} of {meta.get('epochs') or '?'}"
            )
        finally:
            panel.finish()

    def end_job(
        self,
        client: AgentClient,
        job_id: str,
        panel: Panel,
        final: dict[str, Any],
        inject: bool,
        fetch: FileFetch | None = None,
    ) -> None:
        raise_for_final(final, job_id, client.host, self.hints)
        if final.get("stopped"):
            panel.note(f"stopped at epoch {panel.view.epoch} of {panel.view.epochs or '?'}")
        try:
            if not inject:
                panel.note(f"finished; outputs not injected, as asked: {self.hints.attach(job_id, client.host)}")
                return
            try:
                values = fetch_outputs(
                    client, job_id, final, self.cache(), shown_progress(panel.progress, "downloading outputs")
                )
            except KeyboardInterrupt:
                later = f"; {self.hints.fetch(job_id, client.host, fetch.patterns)}" if fetch is not None else ""
                fetch = None  # stopped: no GiBs of files either
                panel.note(
                    "interrupted while downloading the outputs: nothing was injected; the job finished and keeps "
                    f"them on the host: {self.hints.attach(job_id, client.host)}{later}"
                )
                raise
            self.inject(values)
            for note in codec.take_notes():  # e.g. tensors that were on a GPU there are on the CPU here
                panel.note(note)
            panel.note(f"injected: {describe_injection(list(values))}")
        finally:
            if fetch is not None:  # after the outputs: a file that cannot be fetched never costs the model
                self._fetch_into_panel(client, job_id, fetch, panel)

    def _fetch_into_panel(self, client: AgentClient, job_id: str, fetch: FileFetch, panel: Panel) -> None:
        try:
            for line in fetch_files(client, job_id, fetch, self.cache()):
                panel.note(line)
        except (RemoteMagicError, OSError) as exc:
            panel.note(f"--fetch failed: {exc}; {self.hints.fetch(job_id, client.host, fetch.patterns)}")

    def follow_in_background(
        self,
        client: AgentClient,
        job_id: str,
        panel: Panel,
        inject: bool,
        from_seq: int = 0,
        fetch: FileFetch | None = None,
    ) -> BackgroundFollower:
        """Keep the panel live while the kernel is idle; inject the outputs when the job ends."""

        def on_end(final: dict[str, Any]) -> None:
            try:
                self.end_job(client, job_id, panel, final, inject, fetch)
            except Exception as exc:  # noqa: BLE001  (shown in the panel: there is no cell to raise into)
                panel.note(f"{type(exc).__name__}: {exc}")
            finally:
                panel.finish()

        def on_error(exc: BaseException) -> None:
            panel.note(f"stopped following job {job_id}: {type(exc).__name__}: {exc}")
            panel.finish()

        follower = BackgroundFollower(
            client, job_id, panel.handle, on_end, on_error, from_seq=from_seq,
            reconnect_timeout=self.reconnect_timeout, hints=self.hints,
        )  # fmt: skip
        panel.set_actions(on_stop=lambda: client.stop(job_id), on_detach=None)
        self.background.append(follower)
        follower.start()
        return follower

    def stop_background(self, timeout: float = 5.0) -> None:
        """Stop following detached jobs (they run on); used when the extension unloads."""
        for follower in self.background:
            follower.stop()
        for follower in self.background:
            follower.join(timeout)
        self.background.clear()


# ------------------------------------------------------------------ environment
KERAS_BACKENDS = ("tensorflow", "jax", "torch", "numpy", "openvino")
# Distributions that provide the same import under another name on another machine (a CPU build here, a GPU one there).
_SAME_IMPORT = {
    "tensorflow": ("tensorflow", "tensorflow-cpu", "tensorflow-gpu", "tensorflow-macos", "tensorflow-intel"),
    "jax": ("jax",),
    "torch": ("torch",),
}
# Always compared: what loading the inputs and the outputs takes.
_ALWAYS_NEEDED = ("cloudpickle", "numpy")


# What %remote_env compares even before a cell was sent.
BASE_PACKAGES = ("cloudpickle", "numpy", "keras", "tensorflow", "torch", "jax")


def has_distribution(import_name: str) -> bool:
    """Whether this kernel has the package installed (found, not imported)."""
    return importlib.util.find_spec(import_name) is not None


def kernel_backend() -> str | None:
    """The Keras backend of this kernel: the imported keras's, else $KERAS_BACKEND, else None (the host's default)."""
    keras = sys.modules.get("keras")
    if keras is not None:
        with contextlib.suppress(Exception):
            return str(keras.backend.backend())
    return os.environ.get("KERAS_BACKEND") or None


def expected_kernel_backend() -> str:
    """The backend this kernel's Keras has or will have once imported, without importing it (for a warm-up).

    As Keras decides: $KERAS_BACKEND, else the "backend" of $KERAS_HOME/keras.json (~/.keras), else tensorflow.
    """
    return kernel_backend() or protocol.default_backend()  # the agent's rule: the same code decides on both ends


def needed_imports(submission: Submission) -> list[str]:
    """Top-level modules whose versions matter for this job: its imports, plus Keras's backend where Keras is used."""
    names = list(dict.fromkeys([*_ALWAYS_NEEDED, *submission.imports, *submission.module_imports]))
    if "keras" in names:
        names.append(submission.backend or kernel_backend() or "tensorflow")
    return list(dict.fromkeys(names))


def environment_report(
    client: AgentClient, import_names: list[str], env: str | None = None, maybe_unused: Iterable[str] = ()
) -> envcheck.EnvReport:
    """This kernel's versions of the packages behind ``import_names`` next to the host's (or the env's there).

    ``maybe_unused``: imports found only inside the local modules sent (an
    optional import, a file the cell never uses): missing on the host, they
    are a warning, not a refusal.
    """
    distributions = envcheck.distributions_for(import_names)  # import -> distribution here
    local = envcheck.local_versions(distributions.values())
    asked = {dist: list(dict.fromkeys([dist, *_SAME_IMPORT.get(name, ())])) for name, dist in distributions.items()}
    answer = client.versions(sorted({d for names in asked.values() for d in names}), env)
    found = answer["versions"]
    remote = {dist: next((found.get(n) for n in names if found.get(n)), None) for dist, names in asked.items()}
    where = client.host + (" (its environment)" if env else "")
    python = client.hello()["python"]
    report = envcheck.compare(where, local, remote, platform.python_version(), answer["python"], python)
    soft = {distributions[name] for name in maybe_unused if name in distributions}
    for row in report.rows:
        if row.blocking and row.package in soft:
            row.blocking = False
            row.fix = f"only your local modules import it (optional?); if the job needs it: {row.fix}"
    report.rows.sort(key=lambda row: (not row.blocking, row.package))
    return report


def ensure_environment(
    client: AgentClient, env: str, submission: Submission, on_line: Callable[[str], None], cwd: str | None = None
) -> tuple[str, dict[str, Any]]:
    """Build (once) the host environment ``--env`` asks for: a requirements file, or ``auto``; (its key, build info).

    ``auto``: this kernel's versions of the job's packages that the host
    lacks or has in another major.minor; nothing to install means no env.
    """
    if env == "auto":
        report = environment_report(client, needed_imports(submission))
        requirements = "\n".join(envcheck.auto_requirements(report))
        if not requirements:
            return "", {"built": False, "seconds": 0.0, "empty": True}
    else:
        path = os.path.join(cwd or os.getcwd(), os.path.expanduser(env))
        try:
            with open(path, encoding="utf-8") as f:
                requirements = f.read()
        except OSError as exc:
            raise project.ProjectError(f"--env {env}: cannot read the requirements file ({exc.strerror})") from None
    built = client.ensure_env(requirements, on_line)
    return built["key"], built
