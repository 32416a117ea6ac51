"""The host's GPUs, who holds their memory, and what a job's GPUs do while it runs.

Everything comes from ``nvidia-smi`` (the driver's own tool, present wherever the driver is),
queried in CSV: no NVML binding and no CUDA library is loaded into the agent, because a
process that has initialised CUDA pins the devices it saw and would hand them on to every job
it serves. A host without ``nvidia-smi``, or one where it fails, simply has no GPUs: nothing
here raises for that.

Memory is in MiB and utilization in percent, as ``nvidia-smi`` reports them with ``nounits``;
a value it cannot give (``[N/A]``, e.g. per-process memory under MIG or in some containers)
reads as 0.

Linux only (``/proc``); stdlib only, as all of ``agent/``.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import procs

_GPU_FIELDS = "index,uuid,name,memory.total,memory.used,utilization.gpu"
_APP_FIELDS = "gpu_uuid,pid,used_memory"
_FORMAT = "--format=csv,noheader,nounits"
_SAMPLE_TIMEOUT = 10.0


@dataclass(frozen=True)
class Gpu:
    """One device as ``nvidia-smi`` numbers it (PCI bus order, the order of ``CUDA_DEVICE_ORDER=PCI_BUS_ID``)."""

    index: int
    uuid: str
    name: str
    memory_total: int  # MiB
    memory_used: int  # MiB
    utilization: int  # percent


@dataclass(frozen=True)
class GpuProcess:
    """A compute process on one GPU, with the memory it holds there."""

    gpu_index: int
    pid: int
    memory: int  # MiB


def nvidia_smi() -> str | None:
    """Looked up on each call: PATH is what the agent's session has, and tests put a fake first on it."""
    return shutil.which("nvidia-smi")


def _query(args: list[str], timeout: float) -> str | None:
    """The tool's stdout, or None when it is missing, hangs, or exits non-zero (no driver, a fallen-off GPU)."""
    smi = nvidia_smi()
    if smi is None:
        return None
    try:
        done = subprocess.run(
            [smi, *args],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return done.stdout if done.returncode == 0 else None


def _number(text: str) -> int:
    """``[N/A]``, ``[Not Supported]``, blanks and other non-numbers read as 0; a stray unit is dropped."""
    text = text.strip().split(" ")[0]
    try:
        return max(int(float(text)), 0)
    except ValueError:
        return 0


def _rows(out: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.split(",")] for line in out.splitlines() if line.strip()]


def inventory(timeout: float = 10) -> list[Gpu]:
    """Every GPU of the host; [] when there is no ``nvidia-smi`` or it fails (never raises)."""
    out = _query([f"--query-gpu={_GPU_FIELDS}", _FORMAT], timeout)
    if out is None:
        return []
    gpus: list[Gpu] = []
    for cells in _rows(out):
        if len(cells) < 6:
            continue
        try:
            index = int(cells[0])
        except ValueError:
            continue
        # A name with a comma would split: the name is whatever lies between the uuid and the three numbers.
        name = ", ".join(cells[2:-3])
        gpus.append(Gpu(index, cells[1], name, _number(cells[-3]), _number(cells[-2]), _number(cells[-1])))
    return sorted(gpus, key=lambda gpu: gpu.index)


def processes(gpus: list[Gpu], timeout: float = 10) -> list[GpuProcess]:
    """The compute processes on these GPUs; [] on any failure. ``nvidia-smi`` names a process's GPU by uuid."""
    if not gpus:
        return []
    out = _query([f"--query-compute-apps={_APP_FIELDS}", _FORMAT], timeout)
    if out is None:
        return []
    by_uuid = {gpu.uuid: gpu.index for gpu in gpus}
    found: list[GpuProcess] = []
    for cells in _rows(out):
        if len(cells) < 3 or cells[0] not in by_uuid:
            continue
        pid = _number(cells[1])
        if pid <= 0:  # a pid it cannot show (another pid namespace) names nobody
            continue
        found.append(GpuProcess(by_uuid[cells[0]], pid, _number(cells[2])))
    return found


def busy_by_others(
    gpus: list[Gpu], procs: list[GpuProcess], ours: set[int], busy_mib: int
) -> dict[int, list[GpuProcess]]:
    """GPUs (index -> foreign processes, largest first) where processes not in ``ours`` hold over ``busy_mib`` MiB.

    A threshold rather than "any process": a display server or a monitoring tool holds a few MiB on
    a GPU that is free for training.
    """
    known = {gpu.index for gpu in gpus}
    foreign: dict[int, list[GpuProcess]] = {}
    for p in procs:  # the parameter, not the module: named as callers know it
        if p.gpu_index in known and p.pid not in ours:
            foreign.setdefault(p.gpu_index, []).append(p)
    return {
        index: sorted(found, key=lambda p: (-p.memory, p.pid))
        for index, found in sorted(foreign.items())
        if sum(p.memory for p in found) > busy_mib
    }


def job_of(pid: int) -> str | None:
    """The job a process is tagged with (``procs.TAG_VARIABLE``); None for a foreign, unreadable or gone process."""
    if pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            data = f.read()
    except OSError:
        return None
    prefix = f"{procs.TAG_VARIABLE}=".encode()
    for entry in data.split(b"\0"):
        if entry.startswith(prefix):
            return entry[len(prefix) :].decode(errors="replace") or None
    return None


def _size(mib: int) -> str:
    if mib < 1024:
        return f"{mib} MiB"
    gib = mib / 1024
    return f"{gib:.0f} GiB" if gib >= 10 or gib == int(gib) else f"{gib:.1f} GiB"


def describe_holder(p: GpuProcess, memory: bool = True) -> str:
    """Who holds a GPU: another remote_magic job by its id, else the bare process; its memory unless ``memory``
    is False (a queued job's reason leaves it out: the reason is logged each time it changes)."""
    job = job_of(p.pid)
    who = f"job {job}" if job else "another process"
    return f"{who} (pid {p.pid}" + (f", {_size(p.memory)})" if memory else ")")


def cuda_driver_mapped(maps_path: str = "/proc/self/maps") -> bool:
    """Whether libcuda.so (the driver library) is mapped in this process.

    Once loaded, CUDA may have been initialised with the devices this process saw, and a later
    ``CUDA_VISIBLE_DEVICES`` no longer applies: such a warm runner must not serve a GPU job. The
    runtime (libcudart) alone does not count; it loads the driver when CUDA starts. An unreadable
    file (not Linux) reads as not mapped.
    """
    try:
        with open(maps_path, encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].strip().rsplit("/", 1)[-1].startswith("libcuda.so"):
                    return True
    except OSError:
        return False
    return False


def visible_devices_env(ids: list[int]) -> dict[str, str]:
    """The variables that confine a job to these GPUs; [] hides every GPU.

    ``PCI_BUS_ID`` makes CUDA number devices as ``nvidia-smi`` does: its default (fastest first)
    may order a mixed host differently, and the job would get the wrong cards.
    """
    return {"CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in ids), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


class Sampler:
    """Samples the job's GPUs on a daemon thread and emits ``gpu`` events, so the cell shows what they do.

    The first sample is taken at once, then one every ``interval`` seconds. A failing ``nvidia-smi``
    skips a sample; an ``emit`` that raises is ignored: sampling never disturbs the job. No event
    is emitted once ``stop`` has returned.
    """

    def __init__(self, indices: list[int], emit: Callable[..., Any], interval: float = 5.0) -> None:
        self.indices = list(indices)
        self.interval = interval
        self._emit = emit
        self._peaks: dict[int, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None or not self.indices:
            return
        self._thread = threading.Thread(target=self._run, name="remote_magic-gpu-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> dict[str, Any]:
        """End sampling; returns ``{"gpu_peak": {index: peak MiB used}}`` for the GPUs sampled at least once."""
        with self._lock:  # waits for an emit in progress; none starts after this
            self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)  # a hung nvidia-smi may outlive this; it can no longer emit
        with self._lock:
            return {"gpu_peak": dict(sorted(self._peaks.items()))}

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._sample()
            except Exception:  # noqa: BLE001  (a sampler bug must not reach the job)
                pass
            self._stop.wait(self.interval)

    def _sample(self) -> None:
        wanted = set(self.indices)
        gpus = [gpu for gpu in inventory(_SAMPLE_TIMEOUT) if gpu.index in wanted]
        if not gpus:
            return
        rows = [
            {
                "index": g.index,
                "utilization": g.utilization,
                "memory_used": g.memory_used,
                "memory_total": g.memory_total,
            }
            for g in gpus
        ]
        with self._lock:
            if self._stop.is_set():
                return
            for g in gpus:
                self._peaks[g.index] = max(self._peaks.get(g.index, 0), g.memory_used)
            try:
                self._emit("gpu", gpus=rows)
            except Exception:  # noqa: BLE001  (a closed event log must not end the job)
                pass


def describe_job_gpus(indices: list[int], gpus: list[Gpu]) -> str:
    """A job's GPUs for its header line: "GPU 2,3 of 4 × NVIDIA H100 80GB", mixed "GPU 2 (A100), 3 (H100) of 4"."""
    if not indices:
        return "no GPU"
    by_index = {gpu.index: gpu for gpu in gpus}
    if not gpus:
        return "GPU " + ",".join(str(i) for i in indices)
    names = {gpu.name for gpu in gpus}
    if len(names) == 1 and all(i in by_index for i in indices):
        return "GPU " + ",".join(str(i) for i in indices) + f" of {len(gpus)} × {names.pop()}"
    parts = [f"{i} ({by_index[i].name if i in by_index else 'unknown'})" for i in indices]
    return "GPU " + ", ".join(parts) + f" of {len(gpus)}"
