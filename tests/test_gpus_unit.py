"""agent/launch/gpus.py against a fake ``nvidia-smi`` (a simulation: no machine running the tests has a GPU)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fake_nvidia_smi as fake
import pytest

from remote_magic.agent import procs
from remote_magic.agent.launch import gpus
from remote_magic.agent.launch.gpus import Gpu, GpuProcess

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

H100 = fake.DEFAULT_NAME


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A simulated host with four idle H100s: the fake is first on PATH, its state file is returned."""
    path = fake.write_state(tmp_path / "gpus.json")
    folder = tmp_path / "bin"
    fake.install(folder, path)
    monkeypatch.setenv("PATH", fake.path_with(folder))
    return path


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for child in started:
        child.kill()
        child.wait(timeout=10)


def sleeper(children: list[subprocess.Popen[bytes]], job_id: str | None = None) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k != procs.TAG_VARIABLE}
    if job_id is not None:
        env = procs.tag_environment(env, job_id)
    child = subprocess.Popen(["sleep", "60"], env=env, stdin=subprocess.DEVNULL)
    children.append(child)
    return child


def wait_for(predicate: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# ----------------------------------------------------------------- inventory and processes
def test_simulated_inventory_lists_four_gpus_in_index_order(state: Path) -> None:
    fake.update_gpu(state, 2, memory_used=1000, utilization=37)
    assert gpus.nvidia_smi() == str(state.parent / "bin" / "nvidia-smi")
    found = gpus.inventory()
    assert [g.index for g in found] == [0, 1, 2, 3]
    assert all(g.name == H100 and g.memory_total == 81559 for g in found)
    assert len({g.uuid for g in found}) == 4 and all(g.uuid.startswith("GPU-") for g in found)
    assert (found[2].memory_used, found[2].utilization) == (1000, 37)
    assert (found[0].memory_used, found[0].utilization) == (0, 0)


def test_simulated_na_values_and_odd_rows_read_as_zero(state: Path) -> None:
    fake.save_state(
        state,
        {
            "gpus": [
                fake.gpu(memory_used="[N/A]", utilization="[N/A]"),
                {**fake.gpu(name="Weird, Inc. GPU", utilization="[Not Supported]"), "memory_total": "  40960  "},
            ],
            "processes": [{"gpu": 0, "pid": 77, "memory": "[N/A]"}, {"gpu": 1, "pid": "[N/A]", "memory": 5}],
        },
    )
    first, second = gpus.inventory()
    assert (first.memory_used, first.utilization, first.memory_total) == (0, 0, 81559)
    assert second.name == "Weird, Inc. GPU" and second.memory_total == 40960 and second.utilization == 0
    # A process without memory counts with 0; one without a pid names nobody and is dropped.
    assert gpus.processes([first, second]) == [GpuProcess(0, 77, 0)]


def test_simulated_failing_or_hanging_nvidia_smi_means_no_gpus(state: Path) -> None:
    fake.write_state(state, processes=[{"gpu": 0, "pid": 4242, "memory": 20480}], fail="NVIDIA-SMI has failed")
    assert gpus.inventory() == []
    known = [Gpu(0, "GPU-fa4e0000-0000-4000-8000-000000000000", H100, 81559, 0, 0)]
    assert gpus.processes(known) == []
    fake.write_state(state, delay=5)
    started = time.monotonic()
    assert gpus.inventory(timeout=0.5) == []
    assert time.monotonic() - started < 4


def test_no_nvidia_smi_on_path_means_no_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert gpus.nvidia_smi() is None
    assert gpus.inventory() == []
    assert gpus.processes([Gpu(0, "GPU-x", H100, 81559, 0, 0)]) == []


def test_simulated_processes_map_to_gpu_indices(state: Path) -> None:
    fake.write_state(
        state,
        processes=[{"gpu": 1, "pid": 4242, "memory": 20480}, {"gpu": 3, "pid": 4343, "memory": 100}],
    )
    found = gpus.inventory()
    assert found[1].memory_used == 20480  # the fake counts its processes' memory as used
    assert gpus.processes(found) == [GpuProcess(1, 4242, 20480), GpuProcess(3, 4343, 100)]
    assert gpus.processes([g for g in found if g.index != 1]) == [GpuProcess(3, 4343, 100)]  # unknown uuid: dropped
    assert gpus.processes([]) == []


def test_simulated_job_process_shows_the_tagged_pid_while_the_job_lives(
    state: Path, children: list[subprocess.Popen[bytes]]
) -> None:
    job_id = f"test-gpus-{uuid.uuid4().hex}"
    fake.write_state(state, processes=[{"gpu": 0, "job": job_id, "memory": 2048}])
    assert gpus.processes(gpus.inventory()) == []  # no process of the job yet: nothing on the GPU
    child = sleeper(children, job_id)
    wait_for(lambda: procs.tagged_processes(job_id))
    found = gpus.inventory()
    assert found[0].memory_used == 2048
    assert gpus.processes(found) == [GpuProcess(0, child.pid, 2048)]
    child.kill()
    child.wait()
    assert gpus.processes(gpus.inventory()) == []


def test_simulated_fake_rejects_queries_it_does_not_know(state: Path) -> None:
    smi = gpus.nvidia_smi()
    assert smi is not None
    bad = subprocess.run([smi, "--query-gpu=index,clocks.sm", "--format=csv"], capture_output=True, text=True)
    assert bad.returncode == 9 and "clocks.sm" in bad.stderr
    assert subprocess.run([smi, "-q"], capture_output=True).returncode == 9
    listing = subprocess.run([smi, "-L"], capture_output=True, text=True, check=True).stdout
    assert listing.count(f": {H100} (UUID: GPU-") == 4
    assert "No running processes found" in subprocess.run([smi], capture_output=True, text=True, check=True).stdout


# ----------------------------------------------------------------- who holds a GPU
def test_busy_by_others_counts_only_foreign_memory_above_the_threshold() -> None:
    four = [Gpu(i, f"GPU-{i}", H100, 81559, 0, 0) for i in range(4)]
    held = [
        GpuProcess(0, 100, 600),  # foreign, above 512 together with the next one
        GpuProcess(0, 101, 100),
        GpuProcess(1, 200, 300),  # foreign, below the threshold: a display server, say
        GpuProcess(2, 300, 40000),  # ours
        GpuProcess(3, 400, 512),  # exactly the threshold: not busy
        GpuProcess(3, 300, 9000),  # ours again
        GpuProcess(7, 500, 9000),  # a GPU not in the list
    ]
    busy = gpus.busy_by_others(four, held, ours={300}, busy_mib=512)
    assert busy == {0: [GpuProcess(0, 100, 600), GpuProcess(0, 101, 100)]}
    assert gpus.busy_by_others(four, held, ours=set(), busy_mib=512) == {
        0: [GpuProcess(0, 100, 600), GpuProcess(0, 101, 100)],
        2: [GpuProcess(2, 300, 40000)],
        3: [GpuProcess(3, 300, 9000), GpuProcess(3, 400, 512)],
    }
    assert gpus.busy_by_others(four, held, ours=set(), busy_mib=0)[1] == [GpuProcess(1, 200, 300)]


def test_simulated_foreign_process_makes_its_gpu_busy(state: Path) -> None:
    fake.write_state(state, processes=[{"gpu": 1, "pid": 4242, "memory": 20480}, {"gpu": 2, "pid": 4343, "memory": 8}])
    found = gpus.inventory()
    busy = gpus.busy_by_others(found, gpus.processes(found), ours=set(), busy_mib=512)
    assert busy == {1: [GpuProcess(1, 4242, 20480)]}
    assert gpus.describe_holder(busy[1][0]) == "another process (pid 4242, 20 GiB)"


def test_job_of_reads_the_tag_of_a_real_process(children: list[subprocess.Popen[bytes]]) -> None:
    job_id = f"test-gpus-{uuid.uuid4().hex}"
    tagged = sleeper(children, job_id)
    plain = sleeper(children)
    wait_for(lambda: procs.tagged_processes(job_id))
    assert gpus.job_of(tagged.pid) == job_id
    assert gpus.job_of(plain.pid) is None
    assert gpus.job_of(0) is None and gpus.job_of(-1) is None
    tagged.kill()
    tagged.wait()
    assert gpus.job_of(tagged.pid) is None  # gone (and reaped)
    held = GpuProcess(2, plain.pid, 1536)
    assert gpus.describe_holder(held) == f"another process (pid {plain.pid}, 1.5 GiB)"


def test_describe_holder_names_another_job_by_its_id(children: list[subprocess.Popen[bytes]]) -> None:
    job_id = f"test-gpus-{uuid.uuid4().hex}"
    tagged = sleeper(children, job_id)
    wait_for(lambda: procs.tagged_processes(job_id))
    assert gpus.describe_holder(GpuProcess(0, tagged.pid, 300)) == f"job {job_id} (pid {tagged.pid}, 300 MiB)"


# ----------------------------------------------------------------- a runner's CUDA, a job's devices
MAPS = """\
55d0c0a00000-55d0c0a01000 r--p 00000000 08:01 1234   /usr/bin/python3.11
7f1a2b000000-7f1a2b200000 r-xp 00000000 08:01 5678   /usr/local/cuda/lib64/libcudart.so.12.4.99
7f1a2c000000-7f1a2c021000 rw-p 00000000 00:00 0
7ffd1e5f0000-7ffd1e611000 rw-p 00000000 00:00 0      [stack]
"""


def test_cuda_driver_mapped_reads_a_maps_file(tmp_path: Path) -> None:
    without = tmp_path / "maps-without"
    without.write_text(MAPS)  # the runtime alone is not the driver
    assert gpus.cuda_driver_mapped(str(without)) is False
    driver = tmp_path / "maps-driver"
    driver.write_text(
        MAPS + "7f1a30000000-7f1a30800000 r-xp 00000000 08:01 91011  /usr/lib/x86_64-linux-gnu/libcuda.so.1\n"
    )
    assert gpus.cuda_driver_mapped(str(driver)) is True
    versioned = tmp_path / "maps-versioned"
    versioned.write_text(
        MAPS + "7f1a30000000-7f1a30800000 r-xp 00000000 08:01 91011  /usr/lib64/libcuda.so.550.54.15\n"
    )
    assert gpus.cuda_driver_mapped(str(versioned)) is True
    assert gpus.cuda_driver_mapped(str(tmp_path / "missing")) is False


def test_this_process_has_no_cuda_driver_mapped() -> None:
    assert gpus.cuda_driver_mapped() is False


def test_visible_devices_env_confines_a_job_to_its_gpus() -> None:
    assert gpus.visible_devices_env([2, 3]) == {"CUDA_VISIBLE_DEVICES": "2,3", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert gpus.visible_devices_env([0]) == {"CUDA_VISIBLE_DEVICES": "0", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert gpus.visible_devices_env([]) == {"CUDA_VISIBLE_DEVICES": "", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def test_describe_job_gpus() -> None:
    four = [Gpu(i, f"GPU-{i}", "NVIDIA H100 80GB", 81559, 0, 0) for i in range(4)]
    assert gpus.describe_job_gpus([2, 3], four) == "GPU 2,3 of 4 × NVIDIA H100 80GB"
    assert gpus.describe_job_gpus([0], four) == "GPU 0 of 4 × NVIDIA H100 80GB"
    mixed = [Gpu(0, "a", "NVIDIA A100", 40960, 0, 0), *four[1:]]
    assert gpus.describe_job_gpus([0, 3], mixed) == "GPU 0 (NVIDIA A100), 3 (NVIDIA H100 80GB) of 4"
    assert gpus.describe_job_gpus([], four) == "no GPU"
    assert gpus.describe_job_gpus([1, 2], []) == "GPU 1,2"


# ----------------------------------------------------------------- sampling
class Events:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.lock = threading.Lock()

    def __call__(self, type_: str, **fields: Any) -> None:
        with self.lock:
            self.events.append((type_, fields))

    def count(self) -> int:
        with self.lock:
            return len(self.events)


def test_simulated_sampler_emits_the_jobs_gpus_and_reports_peaks(state: Path) -> None:
    events = Events()
    fake.update_gpu(state, 1, memory_used=3000, utilization=20)
    sampler = gpus.Sampler([1, 3], events, interval=0.05)
    sampler.start()
    wait_for(lambda: events.count() >= 1)
    fake.update_gpu(state, 1, memory_used=70000, utilization=98)
    fake.update_gpu(state, 3, memory_used=512, utilization=5)
    wait_for(lambda: any(f["gpus"][0]["utilization"] == 98 for _, f in list(events.events)))
    fake.update_gpu(state, 1, memory_used=100, utilization=0)  # the peak stays
    wait_for(lambda: events.events[-1][1]["gpus"][0]["memory_used"] == 100)
    result = sampler.stop()
    after = events.count()
    assert result == {"gpu_peak": {1: 70000, 3: 512}}
    assert {t for t, _ in events.events} == {"gpu"}
    first = events.events[0][1]["gpus"]
    assert first == [
        {"index": 1, "utilization": 20, "memory_used": 3000, "memory_total": 81559},
        {"index": 3, "utilization": 0, "memory_used": 0, "memory_total": 81559},
    ]
    time.sleep(0.3)
    assert events.count() == after  # nothing after stop


def test_simulated_sampler_survives_a_failing_emit_and_nvidia_smi(state: Path) -> None:
    calls: list[int] = []

    def broken(type_: str, **fields: Any) -> None:
        calls.append(1)
        raise OSError("the event log is closed")

    sampler = gpus.Sampler([0], broken, interval=0.05)
    sampler.start()
    wait_for(lambda: len(calls) >= 2)
    fake.write_state(state, fail="NVIDIA-SMI has failed")
    time.sleep(0.3)
    fake.write_state(state)
    seen = len(calls)
    wait_for(lambda: len(calls) > seen)
    assert sampler.stop() == {"gpu_peak": {0: 0}}


def test_sampler_without_gpus_does_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events = Events()
    idle = gpus.Sampler([], events, interval=0.01)
    idle.start()
    assert idle.stop() == {"gpu_peak": {}}
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi: no samples, no peaks
    blind = gpus.Sampler([0], events, interval=0.01)
    blind.start()
    time.sleep(0.1)
    assert blind.stop() == {"gpu_peak": {}}
    assert events.count() == 0
