"""Runs one job: load inputs, run the cell, record events, write outputs.

Started by the job's launcher in a session of its own (a new process, a
warm runner's fork, a Slurm batch step), detached from the SSH connection,
so the job survives the client going away.  The job's events.jsonl belongs
to this process while it runs.  What differs between launchers (the job's
GPUs, what a signal means, a requeue) is asked of the launcher's ``InJob``:
nothing here knows which one started the job.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from importlib import metadata, util
from typing import Any

from . import callbacks, cells, changes, codec, disk, jobs, procs, protocol, values
from .launch import gpus
from .launch.base import InJob
from .store import fetch, layout

_VERSION_PACKAGES = ("cloudpickle", "numpy", "keras", "tensorflow", "torch", "jax", "zstandard")
# Import name -> the distributions that may provide it.
_DISTRIBUTIONS = {"tensorflow": ("tensorflow", "tensorflow-cpu", "tensorflow-macos")}
# A line longer than this (no newline yet) goes out in pieces: no single event, and no buffer, grows without bound.
MAX_LINE_CHARS = 64 * 1024
# Children the cell left running get this long after SIGTERM when the job ends.
LEFTOVER_GRACE_SECONDS = 2.0


class EventStream(io.TextIOBase):
    """A text stream that turns each complete line into a stdout/stderr event.

    A carriage return starts the line over (progress bars), so only what a
    terminal would finally show is recorded, and only that is kept while the
    line is open: each write costs its own length, never the line's so far.
    A line of Keras's fit progress bar gets ``progress: true``; what else is
    printed in the middle of one (a callback's print) gets a line of its own.
    """

    def __init__(self, emit: Any, kind: str) -> None:
        self.emit = emit
        self.kind = kind
        self.pending = ""
        self.pending_progress = False  # whether the open line is Keras's progress bar
        self.lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        progress = callbacks.in_keras_progress()
        with self.lock:
            if self.pending and progress != self.pending_progress:  # the bar and the cell's print: a line each
                self._line(self.pending + "\n")
                self.pending = ""
            self.pending_progress = progress
            *lines, rest = text.split("\n")
            if lines:
                first, *lines = lines
                self._line(_after_return(self.pending + first) + "\n")
                for line in lines:
                    self._line(_after_return(line) + "\n")
                self.pending = ""
            self.pending = _after_return(self.pending + rest) if "\r" in rest else self.pending + rest
            while len(self.pending) > MAX_LINE_CHARS:
                self._line(self.pending[:MAX_LINE_CHARS])
                self.pending = self.pending[MAX_LINE_CHARS:]
        return len(text)

    def _line(self, text: str) -> None:
        self.emit(self.kind, text=text, **({"progress": True} if self.pending_progress else {}))

    def close_line(self) -> None:
        with self.lock:
            if self.pending:
                self._line(self.pending.rsplit("\r", 1)[-1])
                self.pending = ""


def _after_return(text: str) -> str:
    return text.rsplit("\r", 1)[-1]


def device_info(assigned: list[int] | None, inventory: list[gpus.Gpu]) -> dict[str, Any]:
    """The GPUs the job holds (``GPU 2,3 of 4 × NVIDIA H100 80GB``), or CPU."""
    if not assigned:
        return {"kind": "CPU", "gpus": []}
    names = {g.index: g.name for g in inventory}
    return {
        "kind": "GPU",
        "gpus": [names.get(i, "?") for i in assigned],
        "indices": assigned,
        "label": gpus.describe_job_gpus(assigned, inventory),
    }


def _sample_seconds() -> float:
    """How often the job's GPUs are sampled ($REMOTE_MAGIC_GPU_SAMPLE_SECONDS on the host, default 5)."""
    try:
        return max(float(os.environ.get("REMOTE_MAGIC_GPU_SAMPLE_SECONDS", 5)), 0.1)
    except ValueError:
        return 5.0


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that matter for loading results, without importing them."""
    versions: dict[str, str | None] = {}
    for name in _VERSION_PACKAGES:
        versions[name] = None
        for distribution in _DISTRIBUTIONS.get(name, (name,)):
            try:
                versions[name] = metadata.version(distribution)
                break
            except metadata.PackageNotFoundError:
                continue
        if versions[name] is None and util.find_spec(name) is not None:
            versions[name] = "unknown"
    return versions


def run_job(root: str, path: str, job: InJob) -> int:
    """Run the job in ``path`` in this process; ``job`` is its launcher's part here (its GPUs, its signals)."""
    if not job.begin(path):
        return 1
    if not job.leads:
        return _follow(root, path, job)
    run = _Run(root, path, job)
    hooks = run.begin()
    try:
        return run.execute(hooks)
    finally:
        run.close()


class _Run:
    """One job run by this process: its event log, its namespace and output streams, and how far it got."""

    def __init__(self, root: str, path: str, job: InJob) -> None:
        self.root, self.path, self.job = root, path, job
        self.log = jobs.EventLog(path)
        self.log.summary = jobs.EventSummary()
        for event, _ in jobs.iter_events(path):  # a requeued job's log goes on: its summary covers all of it
            self.log.summary.feed(event)
        self.lock = threading.Lock()
        self.spec = jobs.read_spec(path)
        self.namespace: dict[str, Any] = {}
        self.out, self.err = EventStream(self.emit, protocol.STDOUT), EventStream(self.emit, protocol.STDERR)
        self.sampler: gpus.Sampler | None = None
        self.started = time.time()
        self.phase = "files"
        self.cwd: str | None = None
        self.inputs = values.Inputs(changes.Blobs())

    def emit(self, type_: str, **fields: Any) -> dict[str, Any]:
        with self.lock:
            return self.log.append(type_, **fields)

    def begin(self) -> callbacks.TrainingHooks:
        """Signals, GPUs and the ``started`` event; from here on what the cell prints becomes events."""
        os.environ.update(procs.tag_environment({}, self.spec["job_id"]))  # what the cell starts is the job's too
        resume = _resume_point(self.path, self._warn) if self.job.restarts else None
        hooks = callbacks.TrainingHooks(
            self.emit, _checkpointer(self.path, self.spec, self.namespace, self.emit), resume
        )
        signal.signal(signal.SIGINT, lambda *_: hooks.stop_requested.set())
        self.job.handle_signals(self.path, hooks)
        assigned = self.job.gpus(self.path)
        inventory = gpus.inventory() if assigned else []  # one nvidia-smi call at start, not one per use
        self.emit(
            protocol.STARTED,
            host=socket.gethostname(),
            pid=os.getpid(),
            python=sys.executable,
            python_version=platform.python_version(),
            device=device_info(assigned, inventory),
            **self.job.started(),
            versions=package_versions(),
        )
        if assigned and inventory:  # a Slurm node may have no nvidia-smi: then nothing to sample
            self.sampler = gpus.Sampler(assigned, self.emit, _sample_seconds())
            self.sampler.start()
        sys.stdout, sys.stderr = self.out, self.err  # type: ignore[assignment]
        return hooks

    def execute(self, hooks: callbacks.TrainingHooks) -> int:
        """Files, inputs, the cell, outputs; then the final event that says how it went."""
        try:
            self._run_phases(hooks)
            with codec.noting() as notes:
                manifest = values.write_outputs(self.root, self.path, self.spec, self.namespace, self.emit, self.inputs)
            self._warn(notes)
            files = self.wind_up()
            seconds = round(time.time() - self.started, 3)
            self.emit(protocol.DONE, seconds=seconds, stopped=hooks.stop_requested.is_set(), **manifest, **files)
            return 0
        except callbacks.Cancelled:
            self.wind_up()
            self.emit(protocol.CANCELLED, message="cancelled on request")
            return 1
        except callbacks.Requeue as requeue:  # no final event: the job comes back and goes on from its checkpoint
            with contextlib.suppress(Exception):
                self.wind_up()
            epoch = (jobs.read_checkpoint_meta(self.path) or {}).get("epoch") or 0
            self.emit(protocol.REQUEUED, reason=requeue.reason, epoch=epoch)
            self.job.requeued(requeue.reason, self.emit)
            return 0
        except BaseException as exc:  # noqa: BLE001  (everything the cell raises is reported)
            files = {}
            with contextlib.suppress(Exception):
                files = self.wind_up()
            self.emit(protocol.ERROR, **cells.describe_exception(exc, self.spec["source"], self.phase), **files)
            return 1

    def _run_phases(self, hooks: callbacks.TrainingHooks) -> None:
        """Place the files, load the inputs, run the cell: ``phase`` says which failed."""
        self.cwd, modules = layout.materialize(self.root, self.path, self.spec)
        self.job.files_placed(self.path)  # the other tasks of the job wait for them
        _use_job_folders(self.cwd, modules, self.spec)
        self.started, self.phase = time.time(), "inputs"
        with codec.noting() as notes:
            namespace, self.inputs = values.load_inputs(self.root, self.path, self.spec)
            self.namespace.update(namespace)
            del namespace  # a cell that deletes an input frees it
        self._warn(notes)
        if self.spec.get("changed_inputs"):  # the inputs that come back are those whose content the cell changes
            candidates = [n for n in self.spec.get("inputs", []) if n not in self.spec.get("outputs", [])]
            self.inputs.before = changes.fingerprints(self.namespace, candidates, self.inputs.blobs)
        self.namespace["remote_log"] = _remote_log(self.emit, hooks.stop_requested)
        callbacks.watch_keras(hooks)
        self.phase = "cell"
        with contextlib.suppress(StopRequested):  # a loop stopped on request: what it has so far comes back
            cells.run_cell(self.spec["source"], self.namespace, self.spec.get("cells"))
        self.out.close_line()
        self.err.close_line()
        self.phase = "outputs"

    def _warn(self, notes: list[str]) -> None:
        for note in notes:
            self.emit(protocol.WARNING, message=note)

    def wind_up(self) -> dict[str, Any]:
        """Before the final event: end open lines, free the shipped files' copies, list the files it wrote."""
        self.out.close_line()
        self.err.close_line()
        peaks = self.sampler.stop() if self.sampler is not None else {}
        layout.release_copies(self.root, self.path)
        if self.cwd is None:
            return peaks
        written, total = fetch.written_files(self.path, self.spec, self.started)
        return {"files": written, "files_total": total, **peaks}

    def close(self) -> None:
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        with contextlib.suppress(OSError):
            self.log.write_summary()
        self.log.close()
        _end_leftovers(self.spec["job_id"])
        self.job.ended(self.spec)


def _follow(root: str, path: str, job: InJob) -> int:
    """A task of a job of several that does not lead: the same cell on the same inputs, in the same folder.

    The leader writes the events and outputs; what this task prints goes to its launcher's log.
    """
    spec = jobs.read_spec(path)
    os.environ.update(procs.tag_environment({}, spec["job_id"]))
    if not job.wait_for_files(path):
        return 1
    modules = os.path.join(path, layout.MODULES_DIR) if spec.get("modules") else None
    _use_job_folders(layout.job_cwd(path, spec), modules, spec)
    namespace, _ = values.load_inputs(root, path, spec)
    namespace["remote_log"] = lambda *args, **kwargs: None  # the leader's rows are the panel's
    try:
        cells.run_cell(spec["source"], namespace, spec.get("cells"))
    except BaseException:  # noqa: BLE001  (reported in the launcher's log; the launcher ends the other tasks)
        traceback.print_exc()
        return 1
    return 0


def _use_job_folders(cwd: str, modules: str | None, spec: dict[str, Any]) -> None:
    """Run in the job's working folder, with its shipped modules first on sys.path and its Keras backend."""
    os.chdir(cwd)
    if modules:
        sys.path.insert(0, modules)
    backend = spec.get("backend")
    if backend and "keras" not in sys.modules:  # a warm runner with keras imported was chosen for this backend
        os.environ["KERAS_BACKEND"] = backend


def _end_leftovers(job_id: str) -> None:
    """End what the cell started and left running (its own sessions included): the job is over."""
    try:
        procs.terminate_tagged(job_id, LEFTOVER_GRACE_SECONDS)
    except Exception:  # noqa: BLE001  (the job's result is recorded; a failed sweep must not change it)
        pass


class StopRequested(BaseException):
    """Raised by ``remote_log`` after a Stop (or an interrupt in the notebook): the loop ends where it is.

    A BaseException, so a loop's own ``except Exception`` does not swallow
    it; the runner then brings back what the cell has so far, as a stopped
    Keras fit does.
    """


def _remote_log(emit: Any, stop_requested: threading.Event) -> Any:
    """``remote_log(step=..., total=..., **metrics)``: the panel for any training loop.

    Each call is one row, like a Keras epoch; ``step`` counts from 1 by
    default, ``total`` (once is enough) gives the progress bar its end.
    After a Stop, the call records its row and ends the loop.
    """
    state = {"step": 0, "total": None}

    def remote_log(step: int | None = None, total: int | None = None, **metrics: float) -> None:
        state["step"] = state["step"] + 1 if step is None else int(step)
        if total is not None and total != state["total"]:
            state["total"] = int(total)
            emit(protocol.TRAIN_BEGIN, epochs=state["total"], steps=None, source="remote_log")
        emit(protocol.EPOCH, epoch=state["step"], epochs=state["total"], logs=callbacks.floats(metrics), unit="step")
        if stop_requested.is_set():
            raise StopRequested()

    return remote_log


def _checkpointer(path: str, spec: dict[str, Any], namespace: dict[str, Any], emit: Any) -> Any:
    """Saves the model being trained every N epochs (weights + optimizer), atomically.

    The checkpoint is the same pickle as an output (model under its variable
    name, custom objects with it), kept in one file so it never fills the
    blob store; a killed job still yields the model of its last epoch.
    """
    every = int(spec.get("checkpoint_every", 1) or 0)  # 0: only when a scheduler requeues the job
    folder = os.path.join(path, protocol.CHECKPOINT_DIR)

    def checkpoint(model: Any, epoch: int, epochs: int | None, force: bool = False) -> None:
        if not force and (every <= 0 or epoch % every):
            return
        names = [n for n, v in namespace.items() if v is model and not n.startswith("_")] or ["model"]
        try:
            data, _ = codec.dumps({names[0]: model}, codec.notebook_defined(namespace), threshold=2**62)
            disk.ensure_dir(folder)
            disk.atomic_write(os.path.join(folder, protocol.CHECKPOINT_FILE), data)
            meta = {"epoch": epoch, "epochs": epochs, "name": names[0], "t": time.time()}
            disk.atomic_write(os.path.join(folder, protocol.CHECKPOINT_META), json.dumps(meta).encode())
        except Exception as exc:  # noqa: BLE001  (a failed checkpoint must not end the training)
            emit(protocol.WARNING, message=f"checkpoint at epoch {epoch} failed: {type(exc).__name__}: {exc}")

    return checkpoint


def _resume_point(path: str, warn: Callable[[list[str]], None]) -> callbacks.Resume | None:
    """Where a requeued job's training goes on: its checkpoint, and the epochs its log already has.

    ``warn`` gets the notes of loading the checkpoint (its tensors moved to another device)."""
    meta = jobs.read_checkpoint_meta(path)
    if not meta or not meta.get("epoch"):
        return None
    history: dict[str, list[float]] = {}
    resumed = False
    for event, _ in jobs.iter_events(path):
        if event["type"] == protocol.RESUMED:
            resumed = True
        elif event["type"] == protocol.TRAIN_BEGIN:
            if not resumed:
                history = {}  # a later fit starts its own history; a resumed one goes on with it
            resumed = False
        elif event["type"] == protocol.EPOCH and event.get("unit") != "step":
            for key, value in (event.get("logs") or {}).items():
                history.setdefault(key, []).append(value)

    def load() -> Any:
        with open(os.path.join(path, protocol.CHECKPOINT_DIR, protocol.CHECKPOINT_FILE), "rb") as f:
            with codec.noting() as notes:
                saved = codec.loads(f.read(), [], receiver="host")
        warn(notes)
        return saved[meta.get("name") or next(iter(saved))]

    return callbacks.Resume(int(meta["epoch"]), load, history)
