"""What a submitted spec may ask: checked whole before anything is created, each refusal one line that names
the key (a spec that is not well formed comes from another client, or a newer one)."""

from __future__ import annotations

from typing import Any

from .. import protocol
from ..protocol import SLURM_LAUNCHER
from ..store import envs, layout

# Keys a submit carries beside the spec's own: how many input bytes follow, and the launcher an earlier
# client named for a Slurm host (the host decides now: ``hello --scheduler``).
SUBMIT_KEYS = frozenset({"inputs_size", "launcher"})


def spec_problem(spec: Any, root: str) -> str | None:
    """What is wrong with a submitted spec, or None."""
    if not isinstance(spec, dict):
        return "the spec is not a JSON object"
    for check in (_form_problem, _layout_problem, _gpus_problem, _sweep_problem, _backend_problem, _cells_problem):
        problem = check(spec, root)
        if problem:
            return problem
    return None


def _form_problem(spec: dict[str, Any], root: str) -> str | None:
    unknown = set(spec) - protocol.SPEC_KEYS - SUBMIT_KEYS
    if unknown:
        return f"unknown spec keys {sorted(unknown)} (a newer client? deploy its agent)"
    if spec.get("launcher") not in (None, SLURM_LAUNCHER):
        return f"this agent cannot run jobs with launcher {spec['launcher']!r} (the host picks it: hello --scheduler)"
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
    if not isinstance(spec.get("changed_inputs", False), bool):
        return "changed_inputs must be true or false"
    blobs = spec.get("blobs", [])
    if not isinstance(blobs, list) or not all(
        isinstance(b, list) and len(b) == 2 and isinstance(b[0], str) and isinstance(b[1], int) for b in blobs
    ):
        return "blobs must be a list of [digest, size] pairs"
    return None


def _layout_problem(spec: dict[str, Any], root: str) -> str | None:
    """The job's files and modules, where it runs, and in which built environment."""
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
    return None


def _gpus_problem(spec: dict[str, Any], root: str) -> str | None:
    """The job's GPU request, and the host settings of its GPU queue."""
    try:
        protocol.GpuRequest.from_spec(spec)
    except ValueError as exc:
        return str(exc)
    busy = spec.get("busy_gpu_memory")
    if busy is not None and not (isinstance(busy, int) and busy >= 0):
        return f"busy_gpu_memory must be MiB, 0 or more, not {busy!r}"
    queue = spec.get("queue")
    if queue is not None and not (isinstance(queue, str) and queue.startswith(("/", "~"))):
        return f"queue must be an absolute folder on the host (the host setting 'queue'), not {queue!r}"
    return None


def _sweep_problem(spec: dict[str, Any], root: str) -> str | None:
    sweep = spec.get("sweep")
    if sweep is None:
        return None
    if not (isinstance(sweep, dict) and protocol.is_sweep_id(sweep.get("id")) and isinstance(sweep.get("trial"), int)):
        return "sweep must say its id (sweep-...) and the trial's number"
    trials = sweep.get("trials")
    if trials is not None and not (isinstance(trials, int) and 0 <= sweep["trial"] < trials):
        return f"a sweep's trials must count its trials, trial {sweep['trial']} among them, not {trials!r}"
    parallel = sweep.get("parallel")
    if parallel is not None and not (isinstance(parallel, int) and parallel >= 1):
        return f"a sweep's parallel must be 1 or more, not {parallel!r}"
    return None


def _backend_problem(spec: dict[str, Any], root: str) -> str | None:
    backend = spec.get("backend")
    if backend is not None and not (isinstance(backend, str) and backend.isidentifier()):
        return f"backend must be a Keras backend name, not {backend!r}"
    return None


# Notebook cells' sources sent for tracebacks: a few small cells, never a way to store much on the host.
MAX_CELLS, MAX_CELLS_CHARS = 200, 2_000_000


def _cells_problem(spec: dict[str, Any], root: str) -> str | None:
    cells = spec.get("cells")
    if cells is None:
        return None
    form = (
        isinstance(cells, dict)
        and len(cells) <= MAX_CELLS
        and all(
            isinstance(label, str) and isinstance(cell, list) and cell and all(isinstance(c, str) for c in cell)
            for label, cell in cells.items()
        )
    )
    if not form:
        return f"cells must map at most {MAX_CELLS} cell labels to [source, code key...]"
    size = sum(len(label) + sum(map(len, cell)) for label, cell in cells.items())
    if size > MAX_CELLS_CHARS:
        return f"cells hold {size:,} characters; at most {MAX_CELLS_CHARS:,} are taken"
    return None
