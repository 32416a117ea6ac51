#!/usr/bin/env python3
"""A fake ``nvidia-smi`` for tests (a simulation): no machine running the tests has a GPU.

Tests call ``install(folder, state)``, which writes an executable ``nvidia-smi`` into ``folder``
that runs this script with the state file's path baked in, and put ``folder`` first on PATH
(``monkeypatch.setenv`` locally; the sshd's ``SetEnv PATH=...`` for the agent's sessions). Each
call reads the state file afresh, so a test changes the simulated GPUs by rewriting it
(``write_state``, ``save_state``):

    {"gpus": [{"name": "NVIDIA H100 80GB HBM3", "memory_total": 81559, "memory_used": 0, "utilization": 0}, ...],
     "processes": [{"gpu": 1, "pid": 4242, "memory": 20480}, {"gpu": 0, "job": "<job id>", "memory": 1024}]}

* A GPU may give its own ``"uuid"``; any value given as a string (``"[N/A]"``) is printed as is.
* ``memory.used`` is the GPU's ``memory_used`` plus the memory of the processes shown on it.
* A process given by ``"job"`` stands for that remote_magic job: it is shown as the oldest live process
  tagged ``REMOTE_MAGIC_JOB=<job id>`` (read from ``/proc/*/environ``), and not at all once none lives,
  as the driver frees a job's memory when it ends.
* ``"fail": "message"`` makes every call print the message and exit 9 (as with no driver);
  ``"delay": seconds`` sleeps before answering; ``"log": path`` appends each call's arguments (JSON).

It answers ``--query-gpu=FIELDS`` and ``--query-compute-apps=FIELDS`` with ``--format=csv[,noheader][,nounits]``,
``-L``, and no arguments (a short table); anything else exits 9 with an error, so an unexpected use shows.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

DEFAULT_NAME = "NVIDIA H100 80GB HBM3"
DEFAULT_MEMORY = 81559  # MiB, as an H100 80GB reports it
TAG_VARIABLE = "REMOTE_MAGIC_JOB"  # procs.TAG_VARIABLE; this script runs without remote_magic importable
DRIVER = "550.54.15"

_GPU_FIELDS = {"index", "uuid", "name", "memory.total", "memory.used", "memory.free", "utilization.gpu", "pci.bus_id"}
_APP_FIELDS = {"gpu_uuid", "pid", "used_memory", "process_name", "gpu_bus_id"}
_UNITS = {
    "memory.total": "MiB",
    "memory.used": "MiB",
    "memory.free": "MiB",
    "utilization.gpu": "%",
    "used_memory": "MiB",
}


# ----------------------------------------------------------------- for tests
def install(folder: Path, state: Path, python: str = sys.executable, copy: bool = False) -> Path:
    """Write ``folder/nvidia-smi``, which runs this fake on ``state``; returns its path. Put ``folder`` first on PATH.

    ``copy``: run a copy of this script in ``folder``, for users who cannot read the checkout.
    """
    folder.mkdir(parents=True, exist_ok=True)
    exe = folder / "nvidia-smi"
    script = Path(__file__).resolve()
    if copy:
        script = Path(shutil.copy(script, folder / script.name))
    argv = [python, str(script), str(state.resolve())]
    exe.write_text("#!/bin/sh\nexec " + " ".join(shlex.quote(a) for a in argv) + ' "$@"\n')
    exe.chmod(0o755)
    if not state.exists():
        save_state(state, {"gpus": [], "processes": []})
    return exe


def path_with(folder: Path, path: str | None = None) -> str:
    """PATH with ``folder`` first, before ``path`` (default: this process's PATH, which holds /usr/bin and the rest)."""
    rest = os.environ.get("PATH", os.defpath) if path is None else path
    return f"{folder}{os.pathsep}{rest}" if rest else str(folder)


def gpu(
    name: str = DEFAULT_NAME, memory_total: int = DEFAULT_MEMORY, memory_used: int | str = 0, utilization: int | str = 0
) -> dict[str, Any]:
    return {"name": name, "memory_total": memory_total, "memory_used": memory_used, "utilization": utilization}


def write_state(
    state: Path,
    gpus: int = 4,
    name: str | Sequence[str] = DEFAULT_NAME,
    processes: Iterable[dict[str, Any]] = (),
    memory_total: int = DEFAULT_MEMORY,
    **extra: Any,
) -> Path:
    """A host with ``gpus`` idle GPUs (``name`` may list one name per GPU, for a mixed host) and these processes.

    ``extra`` goes to the top level as is (``fail``, ``delay``, ``log``).
    """
    names = [name] * gpus if isinstance(name, str) else list(name)
    data = {"gpus": [gpu(n, memory_total) for n in names], "processes": list(processes), **extra}
    save_state(state, data)
    return state


def read_state(state: Path) -> dict[str, Any]:
    return json.loads(state.read_text())


def save_state(state: Path, data: dict[str, Any]) -> None:
    """Atomically (tmp, rename): a fake running meanwhile reads the old state or the new one, never half of one."""
    state.parent.mkdir(parents=True, exist_ok=True)
    tmp = state.with_name(f"{state.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, state)


def update_gpu(state: Path, index: int, **fields: Any) -> None:
    """Change one GPU's fields (``utilization=87``, ``memory_used=1000``)."""
    data = read_state(state)
    data["gpus"][index].update(fields)
    save_state(state, data)


# ----------------------------------------------------------------- the fake
class Usage(Exception):
    pass


def _uuid(index: int, spec: dict[str, Any]) -> str:
    return str(spec.get("uuid") or f"GPU-fa4e0000-0000-4000-8000-{index:012x}")


def _start_ticks(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _tagged_pid(job_id: str) -> int | None:
    """The oldest live process tagged with the job (the runner, or the first of its children)."""
    entry = f"\0{TAG_VARIABLE}={job_id}\0".encode()
    found: list[tuple[int, int]] = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():  # this fake inherits the tag when a job runs it
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                data = b"\0" + f.read() + b"\0"
        except OSError:
            continue
        if entry in data:
            ticks = _start_ticks(int(name))
            if ticks is not None:
                found.append((ticks, int(name)))
    return min(found)[1] if found else None


def _shown_processes(state: dict[str, Any]) -> list[dict[str, Any]]:
    shown = []
    for spec in state.get("processes", []):
        pid = spec.get("pid")
        if "job" in spec:
            pid = _tagged_pid(str(spec["job"]))
            if pid is None:
                continue
        shown.append({**spec, "pid": pid})
    return shown


def _value(v: Any, unit: str | None, units: bool) -> str:
    if isinstance(v, str):
        return v
    return f"{v} {unit}" if unit and units else str(v)


def _gpu_rows(state: dict[str, Any]) -> list[dict[str, Any]]:
    shown = _shown_processes(state)
    rows = []
    for index, spec in enumerate(state.get("gpus", [])):
        used = spec.get("memory_used", 0)
        total = spec.get("memory_total", DEFAULT_MEMORY)
        if isinstance(used, int):
            used += sum(p.get("memory", 0) for p in shown if p.get("gpu") == index and isinstance(p.get("memory"), int))
        free = total - used if isinstance(total, int) and isinstance(used, int) else "[N/A]"
        rows.append(
            {
                "index": index,
                "uuid": _uuid(index, spec),
                "name": spec.get("name", DEFAULT_NAME),
                "memory.total": total,
                "memory.used": used,
                "memory.free": free,
                "utilization.gpu": spec.get("utilization", 0),
                "pci.bus_id": f"00000000:{0x18 + index:02X}:00.0",
            }
        )
    return rows


def _app_rows(state: dict[str, Any]) -> list[dict[str, Any]]:
    gpus = state.get("gpus", [])
    rows = []
    for p in _shown_processes(state):
        index = p.get("gpu", 0)
        if not 0 <= index < len(gpus):
            continue
        rows.append(
            {
                "gpu_uuid": _uuid(index, gpus[index]),
                "gpu_bus_id": f"00000000:{0x18 + index:02X}:00.0",
                "pid": p["pid"],
                "used_memory": p.get("memory", 0),
                "process_name": p.get("name", "python"),
            }
        )
    return rows


def _csv(fields: list[str], rows: list[dict[str, Any]], fmt: str) -> str:
    options = fmt.split(",")
    if options[0] != "csv" or not set(options[1:]) <= {"noheader", "nounits"}:
        raise Usage(f'"{fmt}" is not a valid format')
    units = "nounits" not in options
    lines = []
    if "noheader" not in options:
        lines.append(", ".join(f"{f} [{_UNITS[f]}]" if f in _UNITS and units else f for f in fields))
    lines += [", ".join(_value(row[f], _UNITS.get(f), units) for f in fields) for row in rows]
    return "".join(line + "\n" for line in lines)


def _table(state: dict[str, Any]) -> str:
    out = [f"| NVIDIA-SMI (fake)   Driver Version: {DRIVER}   CUDA Version: 12.4 |"]
    for row in _gpu_rows(state):
        out.append(
            f"| {row['index']}  {row['name']:<28} {row['memory.used']}MiB / {row['memory.total']}MiB"
            f"  {row['utilization.gpu']}% |"
        )
    out.append("| Processes:")
    apps = _app_rows(state)
    out += [f"|  {r['gpu_uuid']}  {r['pid']}  {r['process_name']}  {r['used_memory']}MiB |" for r in apps]
    if not apps:
        out.append("|  No running processes found |")
    return "\n".join(out) + "\n"


def answer(args: list[str], state: dict[str, Any]) -> str:
    """What the real tool prints for ``args`` (the forms remote_magic uses); raises Usage for anything else."""
    if not args:
        return _table(state)
    if args in (["-L"], ["--list-gpus"]):
        return "".join(f"GPU {r['index']}: {r['name']} (UUID: {r['uuid']})\n" for r in _gpu_rows(state))
    options = dict(a.split("=", 1) for a in args if a.startswith("--") and "=" in a)
    if len(options) != len(args) or "--format" not in options or len(options) != 2:
        raise Usage(f"unsupported arguments: {' '.join(args)}")
    if "--query-gpu" in options:
        fields, known, rows = options["--query-gpu"].split(","), _GPU_FIELDS, _gpu_rows(state)
    elif "--query-compute-apps" in options:
        fields, known, rows = options["--query-compute-apps"].split(","), _APP_FIELDS, _app_rows(state)
    else:
        raise Usage(f"unsupported arguments: {' '.join(args)}")
    unknown = [f for f in fields if f not in known]
    if unknown:
        raise Usage(f'Field "{unknown[0]}" is not a valid field to query.')
    return _csv(fields, rows, options["--format"])


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("fake nvidia-smi: the state file is missing (use install())", file=sys.stderr)
        return 9
    state = read_state(Path(argv[1]))
    args = argv[2:]
    if state.get("log"):
        with open(state["log"], "a", encoding="utf-8") as f:
            f.write(json.dumps(args) + "\n")
    if state.get("delay"):
        time.sleep(float(state["delay"]))
    if state.get("fail"):
        print(state["fail"])
        return 9
    try:
        sys.stdout.write(answer(args, state))
    except Usage as exc:
        print(f"fake nvidia-smi: {exc}", file=sys.stderr)
        return 9
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
