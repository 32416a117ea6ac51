"""What a cell becomes before anything is sent, and sending it.

``prepare`` works out everything locally (the names the cell reads and assigns, the pickled
inputs, the files and local modules that travel with it), so a mistake is raised before any I/O
with a host; ``submit`` then uploads only what the host lacks and creates the job.
"""

from __future__ import annotations

import linecache
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import project
from ..agent import protocol
from ..agent.protocol import GpuRequest
from ..errors import RemoteMagicError
from ..project import ProjectFile, capture, payload
from ..wire import upload
from ..wire.client import AgentClient
from .sent import SENT


@dataclass
class Submission:
    """What a cell asks for, worked out locally before anything is sent."""

    source: str
    inputs: list[str]
    outputs: list[str]  # the names the cell assigns, or exactly those --out names
    payload: payload.Payload
    name: str | None = None
    changed_inputs: bool = True  # the inputs whose content the cell changes come back too (not with --out)
    checkpoint_every: int = 1
    warm: bool = True
    compress: str = "auto"
    files: list[ProjectFile] = field(default_factory=list)  # the --files layout
    cwd: str = ""  # the kernel's working folder inside that layout
    modules: list[ProjectFile] = field(default_factory=list)  # local modules, relative to their sys.path entry
    workdir: str | None = None  # --workdir: a folder on the host to run in instead
    env: str | None = None  # a built environment's key on the host
    backend: str | None = None  # the job's KERAS_BACKEND
    gpus: GpuRequest = field(default_factory=GpuRequest)  # the host's queue (or Slurm) gives them
    busy_gpu_memory: int | None = None  # MiB: see HostSettings
    queue: str | None = None  # the host's shared queue folder: see HostSettings
    slurm: dict[str, Any] | None = None  # on a Slurm host: the job's sbatch options (SlurmSettings.job_options)
    sweep: dict[str, Any] | None = None  # a sweep's trial: {"id", "trial", "parallel", "params"} (protocol.SPEC_KEYS)
    imports: list[str] = field(default_factory=list)  # top-level modules the cell and the pickle need
    cells: dict[str, list[str]] = field(default_factory=dict)  # {label: [source, code key...]} (protocol.SPEC_KEYS)
    # imported only somewhere in the local modules sent (maybe optional, or in a file the cell never uses)
    module_imports: list[str] = field(default_factory=list)

    def spec(self) -> dict[str, Any]:
        """The job's spec as the agent stores it (protocol.SPEC_KEYS); the host picks the launcher itself."""
        self.payload.hash()  # where the caller did not already (a no-op then)
        spec: dict[str, Any] = {
            "source": self.source,
            "name": self.name,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "changed_inputs": self.changed_inputs,
            "checkpoint_every": self.checkpoint_every,
            "warm": self.warm,
            "blobs": self.payload.blobs,
            "client": {"python": sys.version.split()[0], "agent_schema": protocol.SCHEMA_VERSION},
            "files": [[f.rel, f.digest, f.size, f.mode] for f in self.files],
            "modules": [[f.rel, f.digest, f.size, f.mode] for f in self.modules],
            "cwd": self.cwd,
            **self.gpus.spec(),
        }
        optional = {
            "workdir": self.workdir,
            "env": self.env,
            "backend": self.backend,
            "busy_gpu_memory": self.busy_gpu_memory,
            "queue": self.queue,
            "sweep": self.sweep,
            "slurm": self.slurm,
            "cells": self.cells or None,
        }
        spec.update({key: value for key, value in optional.items() if value is not None})
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
    files: str | Sequence[str] | None = None,
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
    validation_only = capture.validated_only(source)  # no shuffle-order note for validation data
    packed = payload.pack({n: namespace[n] for n in inputs}, namespace, hash_buffers, validation_only)
    wanted = outputs if outputs is not None else capture.default_outputs(names)
    submission = Submission(source, inputs, wanted, packed, name, changed_inputs=outputs is None)
    submission.cells = notebook_cells(packed.code_files)
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


# The cells sent for tracebacks: enough for the functions a cell calls, never a notebook's worth of megabytes.
MAX_CELL_CHARS, MAX_CELLS_CHARS = 100_000, 1_000_000


def notebook_cells(code_files: dict[str, set[str]]) -> dict[str, list[str]]:
    """{label: [source, code key...]} of the cells that defined the functions sent, for the host's tracebacks.

    IPython keeps each cell's source in ``linecache`` under its code filename
    and names the filename ``Cell In[2]`` (``shell.compile.format_code_name``);
    the host names the frames of those functions the same way.
    """
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    namer = getattr(getattr(shell, "compile", None), "format_code_name", None)
    cells: dict[str, list[str]] = {}
    total = 0
    for filename, keys in sorted(code_files.items()):
        entry = linecache.cache.get(filename)
        source = "".join(entry[2]) if entry else ""
        if not source or len(source) > MAX_CELL_CHARS or total + len(source) > MAX_CELLS_CHARS:
            continue
        named = namer(filename) if namer is not None else None
        cells[" ".join(named) if named else f'File "{filename}"'] = [source, *sorted(keys)]
        total += len(source)
    return cells


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
            SENT.remember(submission.payload.blobs, submission.payload.buffers)  # what comes back as is stays here
            return answer["job_id"]
        upload.send_missing(client, sources, set(answer["missing"]), submission.compress, progress)
    raise RemoteMagicError(f"host {client.host} kept asking for the same inputs; its disk may be full")
