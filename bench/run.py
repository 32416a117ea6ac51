"""remote_magic benchmark: seventeen figures, each against a baseline measured in the same run.

    make bench                 # full sizes (512 MiB transfers, 1 GiB re-run)
    .venv/bin/python bench/run.py --quick   # small sizes, a smoke run

Starts its own sshd on 127.0.0.1 (as the tests do), prints a table and writes
the results as JSON (bench/results/latest.json).  Loopback numbers: they
measure our overheads, not a network.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import by_content

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
MiB = 1024 * 1024


def _median_time(fn: Any, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class Bench:
    def __init__(self, tmp: Path, quick: bool) -> None:
        from sshd import make_sshd

        self.tmp = tmp
        self.quick = quick
        self.size = (32 if quick else 512) * MiB
        self.rerun_size = (64 if quick else 1024) * MiB
        self.sshd = make_sshd(tmp / "sshd")
        self.results: list[dict[str, Any]] = []

    def start(self) -> None:
        self.sshd.start()
        from IPython.testing.globalipapp import start_ipython

        self.ip = start_ipython()
        self.ip.run_line_magic("load_ext", "remote_magic")
        self.magics = self.ip.magics_manager.registry["RemoteMagics"]
        self.magics.ssh_config = str(self.sshd.ssh_config)
        self.magics.hosts = {"testhost": {"python": sys.executable}}
        self.magics.panel = "text"

    def stop(self) -> None:
        self.magics.connections.close()
        self.sshd.stop()
        for ready in self.tmp.rglob("warm/*.ready"):  # no warm runner outlives the benchmark
            with contextlib.suppress(OSError, ValueError, KeyError):
                os.kill(json.loads(ready.read_text())["pid"], signal.SIGTERM)

    def cell(self, source: str) -> None:
        result = self.ip.run_cell(source, store_history=False)
        if not result.success:
            raise RuntimeError(f"cell failed: {result.error_in_exec!r}\n{source}")

    def quiet_cell(self, source: str) -> None:
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):
            self.cell(source)

    def transport(self, host: str = "testhost") -> Any:
        return self.magics._client(host)

    def scp(self, *args: str) -> None:
        subprocess.run(["scp", "-q", "-F", str(self.sshd.ssh_config), *args], check=True)

    def ssh(self, *args: str) -> None:
        subprocess.run(["ssh", "-F", str(self.sshd.ssh_config), "testhost", *args], check=True)

    def record(
        self,
        number: int,
        name: str,
        ours: float,
        baseline: float,
        unit: str,
        target: str,
        ok: bool,
        ratio: float | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        row = {"figure": number, "name": name, "ours": ours, "baseline": baseline, "unit": unit,
               "ratio": ratio if ratio is not None else (ours / baseline if baseline else None),
               "target": target, "met": ok, **(extra or {})}  # fmt: skip
        self.results.append(row)
        print(f"  [{number}] {name}: ours {ours:.3f} {unit}, baseline {baseline:.3f} {unit}, "
              f"ratio {row['ratio']:.2f} (target {target}: {'met' if ok else 'MISSED'})", flush=True)  # fmt: skip

    # 1 ---------------------------------------------------------------------------------------
    def upload(self) -> None:
        import numpy as np

        data = np.random.default_rng(1).integers(0, 255, self.size, dtype=np.uint8)
        path = self.tmp / "upload.bin"
        data.tofile(path)
        scp_time = _median_time(lambda: self.scp(str(path), "testhost:/tmp/remote_magic-bench-upload.bin"), 3)

        def rate(first_round: int) -> float:
            times = []
            for round_ in range(first_round, first_round + 3):
                data[:8] = round_ + 1  # new content each round: nothing deduplicated
                self.ip.user_ns["payload_array"] = data
                start = time.perf_counter()
                self.quiet_cell("%%remote_train --host testhost --detach\nn = payload_array.nbytes\n")
                times.append(time.perf_counter() - start)
            return self.size / MiB / statistics.median(times)

        ours = rate(0)
        with self.paramiko_only():
            paramiko = rate(10)
        base = self.size / MiB / scp_time
        self.record(1, f"upload {self.size // MiB} MiB array (hash + send + submit)", ours, base, "MiB/s",
                    ">= 1.3 x scp", ours >= 1.3 * base, extra={"paramiko_only_mib_s": paramiko})  # fmt: skip
        path.unlink()

    @contextlib.contextmanager
    def paramiko_only(self) -> Any:
        """The same host with the OpenSSH bulk path off (``bulk_ssh: None``), on a new connection."""
        hosts = self.magics.hosts
        self.magics.connections.close()
        self.magics.hosts = {"testhost": {**hosts["testhost"], "bulk_ssh": None}}
        try:
            yield
        finally:
            self.magics.connections.close()
            self.magics.hosts = hosts

    # 2 ---------------------------------------------------------------------------------------
    def download(self) -> None:
        from remote_magic import session
        from remote_magic.agent import digest as digests
        from remote_magic.wire.cache import BlobCache

        cell = (
            f"import numpy as np\nbig_output = np.random.default_rng(2).integers(0, 255, {self.size}, dtype=np.uint8)\n"
        )
        transport = self.transport()
        submission = session.prepare(cell, {})
        job_id = session.submit(transport, submission)
        final = session.follow(transport, job_id, lambda event: None)
        host_file = self.sshd.host_root / "blobs" / digests.file_name(final["blobs"][0][0])
        local = self.tmp / "download.bin"
        scp_time = _median_time(lambda: self.scp(f"testhost:{host_file}", str(local)), 3)

        def rate(name: str) -> float:
            times = []
            for round_ in range(4):  # round 0 brings the bulk path up and warms the link
                cache = BlobCache(str(self.tmp / f"cache-{name}-{round_}"))  # empty: a real download every round
                start = time.perf_counter()
                values = session.fetch_outputs(self.transport(), job_id, final, cache)
                times.append(time.perf_counter() - start)
                assert values["big_output"].nbytes == self.size
                cache.wait()  # its background write must not slow the next round
            return self.size / MiB / statistics.median(times[1:])

        ours = rate("bulk")
        with self.paramiko_only():
            paramiko = rate("paramiko")
        cached = BlobCache(str(self.tmp / "cache-bulk-0"))
        start = time.perf_counter()
        session.fetch_outputs(self.transport(), job_id, final, cached)
        cached_time = time.perf_counter() - start
        base = self.size / MiB / scp_time
        self.record(2, f"download {self.size // MiB} MiB output (fetch + load)", ours, base, "MiB/s",
                    ">= 1.3 x scp", ours >= 1.3 * base,
                    extra={"second_fetch_from_cache_s": cached_time, "paramiko_only_mib_s": paramiko})  # fmt: skip
        local.unlink()

    # 3 ---------------------------------------------------------------------------------------
    def rerun(self) -> None:
        import hashlib

        import numpy as np

        data = np.random.default_rng(3).random(self.rerun_size // 8)
        self.ip.user_ns["rerun_array"] = data
        transport = self.transport()
        cell = "%%remote_train --host testhost\ntotal = float(rerun_array[:10].sum())\n"
        sent = transport.bytes_sent
        start = time.perf_counter()
        self.quiet_cell(cell)
        first = time.perf_counter() - start
        first_bytes = transport.bytes_sent - sent
        sent = transport.bytes_sent
        start = time.perf_counter()
        self.quiet_cell(cell)
        second = time.perf_counter() - start
        second_blob_bytes = transport.bytes_sent - sent
        start = time.perf_counter()
        hashlib.sha256(memoryview(data).cast("B")).hexdigest()
        hashing = time.perf_counter() - start
        self.record(3, f"re-run with unchanged {self.rerun_size // MiB} MiB inputs: wall time", second, first, "s",
                    "hashing + < 0.3 s; 0 blob bytes", second < hashing + 0.3 and second_blob_bytes < 64 * 1024,
                    extra={"first_run_bytes_sent": first_bytes, "rerun_bytes_sent": second_blob_bytes,
                           "hashing_s": hashing})  # fmt: skip

    # 4 ---------------------------------------------------------------------------------------
    def trivial(self) -> None:
        self.ip.user_ns["x"] = 1
        self.quiet_cell("%%remote_train --host testhost\ny = x + 1\n")  # warm connection and agent
        ours = _median_time(lambda: self.quiet_cell("%%remote_train --host testhost\ny = x + 1\n"), 7)
        base = _median_time(lambda: self.ssh("python3", "-c", "pass"), 7)
        self.record(4, "trivial cell y = x + 1, warm connection", ours, base, "s",
                    "<= 1.0 x `ssh host python3 -c pass`, < 0.25 s", ours <= base and ours < 0.25)  # fmt: skip

    # 5 ---------------------------------------------------------------------------------------
    def keras_fit(self) -> None:
        self.quiet_cell(
            "import numpy as np, keras\n"
            "kx = np.random.default_rng(5).random((512, 16), dtype=np.float32)\n"
            "ky = (kx.sum(axis=1) > 8).astype('float32')\n"
            "def tiny():\n"
            "    m = keras.Sequential([keras.Input((16,)), keras.layers.Dense(16, activation='relu'), keras.layers.Dense(1)])\n"
            "    m.compile(optimizer='adam', loss='mse')\n"
            "    return m\n"
            "kmodel = tiny()\n"
            "kmodel.fit(kx, ky, epochs=2, verbose=0)\n"  # warm the kernel's own TF
        )
        local_fit = _median_time(
            lambda: self.quiet_cell("kmodel = tiny()\nkmodel.fit(kx, ky, epochs=2, verbose=0)\n"), 3
        )
        for host in ("local", "testhost"):

            def remote(host: str = host) -> float:
                start = time.perf_counter()
                self.quiet_cell(
                    "kmodel = tiny()\n"
                    f"get_ipython().run_cell_magic('remote_train', '--host {host}', 'kmodel.fit(kx, ky, epochs=2, verbose=0)')\n"
                )
                return time.perf_counter() - start

            cold = remote()
            warm_times = []
            for _ in range(3):
                self.wait_for_warm_runner(host)  # as between two cells a user runs
                warm_times.append(remote())
            warm = statistics.median(warm_times)
            self.record(5, f"tiny Keras fit on {host}, warm runner: overhead", warm - local_fit, local_fit, "s",
                        "overhead <= 0.5 s", warm - local_fit <= 0.5, ratio=warm / local_fit,
                        extra={"remote_warm_s": warm, "remote_cold_s": cold, "cold_overhead_s": cold - local_fit})  # fmt: skip

    def wait_for_warm_runner(self, host: str, timeout: float = 60.0) -> None:
        root = self.sshd.host_root if host == "testhost" else Path(os.environ["REMOTE_MAGIC_DATA_DIR"]) / "local"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not list((root / "warm").glob("*.ready")):
            time.sleep(0.1)

    # 6 ---------------------------------------------------------------------------------------
    def memory(self) -> None:
        size = self.rerun_size
        probe = subprocess.run(
            [sys.executable, str(HERE / "memory_probe.py"), str(self.sshd.ssh_config), str(size)],
            capture_output=True, text=True, check=True,
            env={**os.environ, "REMOTE_MAGIC_DATA_DIR": str(self.tmp / "probe-data")},
        )  # fmt: skip
        result = json.loads(probe.stdout.strip().splitlines()[-1])
        added = result["peak_added_bytes"]
        bound = 1.1 * size + 50 * MiB
        self.record(6, f"peak local memory added while sending {size // MiB} MiB", added / MiB, size / MiB, "MiB",
                    "<= 1.1 x N + 50 MB", added <= bound)  # fmt: skip

    # 7 ---------------------------------------------------------------------------------------
    def latency(self) -> None:
        from remote_magic import session

        cell = (
            "import time\n"
            "for step in range(1, 31):\n"
            "    time.sleep(0.05)\n"
            "    remote_log(step=step, total=30, loss=1.0 / step)\n"
        )
        results = {}
        for host in ("local", "testhost"):
            transport = self.transport(host)
            job_id = session.submit(transport, session.prepare(cell, {}))
            delays = []

            def on_event(event: dict[str, Any], delays: list[float] = delays) -> None:
                if event["type"] == "epoch":
                    delays.append(time.time() - event["t"])

            session.follow(transport, job_id, on_event)
            results[host] = (statistics.median(delays), sorted(delays)[int(len(delays) * 0.95) - 1])
        median_ssh, p95_ssh = results["testhost"]
        self.record(7, "epoch event latency, host epoch end -> panel (sshd, median)", median_ssh * 1000, 100, "ms",
                    "<= 100 ms on loopback", median_ssh <= 0.1,
                    extra={"p95_ms_ssh": p95_ssh * 1000, "median_ms_local": results["local"][0] * 1000})  # fmt: skip

    # 8 ---------------------------------------------------------------------------------------
    def queue_start(self) -> None:
        """A queued job starts within a second of its GPUs freeing (simulated GPUs: a fake nvidia-smi)."""
        import fake_nvidia_smi as fake

        state = fake.write_state(self.tmp / "gpus.json", gpus=4)
        fake.install(self.tmp / "fakebin", state)
        os.environ["PATH"] = fake.path_with(self.tmp / "fakebin")
        shared = self.tmp / "shared-queue"  # as a host's admin makes it: group-writable and sticky
        shared.mkdir()
        shared.chmod(0o3770)
        medians = {}
        for kind, settings in (("private", {}), ("shared", {"queue": str(shared)})):
            self.magics.hosts = {**self.magics.hosts, "local": {"root": str(self.tmp / f"gpu-host-{kind}"), **settings}}
            self.magics.connections.close()
            medians[kind] = self._queue_start_once(self.magics._client("local"))
        (ours, baseline), (shared_ours, shared_baseline) = medians["private"], medians["shared"]
        self.record(8, "queued job: GPUs freed -> started (simulated GPUs, local, private queue, median)",
                    ours * 1000, baseline * 1000, "ms", "< 1000 ms, private and shared queue",
                    ours < 1.0 and shared_ours < 1.0,
                    extra={"shared_queue_ms": shared_ours * 1000, "shared_queue_baseline_ms": shared_baseline * 1000,
                           "shared_queue_ratio": shared_ours / shared_baseline})  # fmt: skip

    def _queue_start_once(self, client: Any) -> tuple[float, float]:
        """(median of GPUs freed -> queued job started, median of a job on free GPUs: queued -> started)."""
        from remote_magic import session
        from remote_magic.agent.protocol import GpuRequest

        def submit(cell: str, gpus: int | str) -> str:
            submission = session.prepare(cell, {})
            submission.gpus = GpuRequest(GpuRequest.ALL if gpus == "all" else int(gpus))
            return session.submit(client, submission)

        def events(job_id: str, until: str) -> list[dict[str, Any]]:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                found = client.events(job_id)
                if any(e["type"] == until for e in found):
                    return found
                time.sleep(0.05)
            raise TimeoutError(f"job {job_id} never reached {until}")

        def t(found: list[dict[str, Any]], kind: str) -> float:
            return next(e["t"] for e in found if e["type"] == kind)

        queued, free = [], []
        for _ in range(3):
            holder = submit("import time\ntime.sleep(1.5)\n", "all")
            waiter = submit("x = 1\n", 1)
            queued.append(t(events(waiter, "done"), "started") - t(events(holder, "done"), "done"))
            direct = submit("x = 1\n", 1)
            found = events(direct, "done")
            free.append(t(found, "started") - t(found, "queued"))
        return statistics.median(queued), statistics.median(free)

    # 9 ---------------------------------------------------------------------------------------
    def sweep(self) -> None:
        """8 trials of a tiny fit as one sweep (2 at a time: the VM has 2 cores) vs the same 8 fits as 8 cells."""
        self.quiet_cell(
            "import numpy as np, keras\n"
            "sx = np.random.default_rng(9).random((512, 16), dtype=np.float32)\n"
            "sy = (sx.sum(axis=1) > 8).astype('float32')\n"
            "grid = {'lr': [1e-3, 3e-3, 1e-2, 3e-2], 'units': [8, 16]}\n"
        )
        fit = (
            "model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(units, activation='relu'),"
            " keras.layers.Dense(1)])\n"
            "model.compile(optimizer=keras.optimizers.Adam(lr), loss='mse')\n"
            "history = model.fit(sx, sy, epochs=3, validation_split=0.25, verbose=0)\n"
        )
        start = time.perf_counter()
        for lr in (1e-3, 3e-3, 1e-2, 3e-2):
            for units in (8, 16):
                self.quiet_cell(f"%%remote_train --host testhost\nlr, units = {lr}, {units}\n" + fit)
        sequential = time.perf_counter() - start
        start = time.perf_counter()
        self.quiet_cell("%%remote_train --host testhost --sweep grid --parallel 2\n" + fit)
        swept = time.perf_counter() - start
        self.record(9, "8-trial sweep (2 at a time, sshd) vs 8 cells back to back: wall time", swept, sequential,
                    "s", "<= 1.0 x", swept <= sequential,
                    extra={"per_trial_s": swept / 8, "per_cell_s": sequential / 8})  # fmt: skip

    # 10 --------------------------------------------------------------------------------------
    def trivial_back_to_back(self) -> None:
        """Ten trivial cells with no pause between them, as Run All or a loop of experiments sends them."""
        self.ip.user_ns["x"] = 1
        self.quiet_cell("%%remote_train --host testhost\ny = x + 1\n")  # warm connection and agent
        times = []
        for _ in range(10):
            start = time.perf_counter()
            self.quiet_cell("%%remote_train --host testhost\ny = x + 1\n")
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        base = _median_time(lambda: self.ssh("python3", "-c", "pass"), 5)
        self.record(10, "trivial cell, 10 back to back (no pause), sshd: median", median, base, "s",
                    "< 0.25 s and <= 1.0 x `ssh host python3 -c pass`", median < 0.25 and median <= base,
                    extra={"max_s": max(times), "times_s": times})  # fmt: skip

    # 11 --------------------------------------------------------------------------------------
    def keras_back_to_back(self) -> None:
        """Five tiny fits back to back: the overhead over the same fit in the kernel, as a user feels it."""
        self.quiet_cell(
            "import numpy as np, keras\n"
            "bx = np.random.default_rng(11).random((512, 16), dtype=np.float32)\n"
            "by = (bx.sum(axis=1) > 8).astype('float32')\n"
            "def tiny_b():\n"
            "    m = keras.Sequential([keras.Input((16,)), keras.layers.Dense(16, activation='relu'), keras.layers.Dense(1)])\n"
            "    m.compile(optimizer='adam', loss='mse')\n"
            "    return m\n"
            "bmodel = tiny_b()\n"
            "bmodel.fit(bx, by, epochs=2, verbose=0)\n"
        )
        local_fit = _median_time(
            lambda: self.quiet_cell("bmodel = tiny_b()\nbmodel.fit(bx, by, epochs=2, verbose=0)\n"), 3
        )
        fit = "bmodel = tiny_b()\nget_ipython().run_cell_magic('remote_train', '--host testhost', 'bmodel.fit(bx, by, epochs=2, verbose=0)')\n"
        self.quiet_cell(fit)  # the host has seen a Keras job: its warm runners import Keras
        self.wait_for_warm_runner("testhost")
        times = []
        for _ in range(5):
            start = time.perf_counter()
            self.quiet_cell(fit)
            times.append(time.perf_counter() - start)
        overhead = statistics.median(times) - local_fit
        self.record(11, "tiny Keras fit, 5 back to back (no pause), sshd: median overhead", overhead, local_fit,
                    "s", "overhead <= 0.5 s", overhead <= 0.5, ratio=statistics.median(times) / local_fit,
                    extra={"times_s": times, "max_overhead_s": max(times) - local_fit})  # fmt: skip

    # 12 --------------------------------------------------------------------------------------
    def run_all(self) -> None:
        """Run All of the quickstart through nbclient, agent deployed and no warm runner waiting, vs the same
        notebook with the magics taken out (everything in the kernel)."""
        from notebooks import execute, write_profile

        source = HERE.parent / "examples" / "notebooks" / "01_quickstart.ipynb"
        plain = self.tmp / "quickstart-plain.ipynb"
        nb = json.loads(source.read_text())
        for cell in nb["cells"]:
            lines = "".join(cell["source"]).splitlines(keepends=True)
            if cell["cell_type"] == "code":
                kept = [line for line in lines if not line.lstrip().startswith("%")]  # the magic lines out
                cell["source"] = kept or ["pass\n"]
        plain.write_text(json.dumps(nb))
        copy = self.tmp / "quickstart.ipynb"
        copy.write_text(source.read_text())
        hosts = {"testhost": {"python": sys.executable}}

        def run(path: Path, host: str) -> float:
            folder = write_profile(self.tmp / f"ipython-{host}", ssh_config=str(self.sshd.ssh_config), hosts=hosts,
                                   default_host=host, panel="text")  # fmt: skip
            os.environ["IPYTHONDIR"] = str(folder)
            self.stop_warm_runners()
            start = time.perf_counter()
            execute(path)
            return time.perf_counter() - start

        run(copy, "local")  # the agent deployed on both hosts, the kernel's imports cached by the OS
        run(copy, "testhost")
        in_kernel = statistics.median(run(plain, "local") for _ in range(2))
        for host in ("local", "testhost"):
            ours = statistics.median(run(copy, host) for _ in range(2))
            self.record(12, f"Run All of the quickstart, {host}, no warm runner waiting", ours, in_kernel, "s",
                        "<= 1.5 x the notebook without magics", ours <= 1.5 * in_kernel)  # fmt: skip

    def stop_warm_runners(self) -> None:
        """As a host the user comes back to after a while: the agent deployed, no warm runner waiting."""
        roots = [self.sshd.host_root, Path(os.environ["REMOTE_MAGIC_DATA_DIR"]) / "local"]
        pids = []
        for ready in [r for root in roots for r in root.glob("warm/*.ready")]:
            with contextlib.suppress(OSError, ValueError, KeyError):
                pids.append(json.loads(ready.read_text())["pid"])
                os.kill(pids[-1], signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in pids):
            time.sleep(0.05)

    # 13 --------------------------------------------------------------------------------------
    def first_cell(self) -> None:
        """The first cell of a fresh kernel (a new process: load the extension, make a new 512 MiB array, run
        one cell), agent deployed and no warm runner waiting; vs scp and an OpenSSH pipe of the same bytes."""
        import numpy as np

        self.transport().hello()  # the agent deployed (as on a host used before)
        data = np.random.default_rng(13).integers(0, 255, self.size, dtype=np.uint8)
        path = self.tmp / "first.bin"
        data.tofile(path)
        del data
        scp_time = _median_time(lambda: self.scp(str(path), "testhost:/tmp/remote_magic-bench-first.bin"), 3)
        pipe = f"cat {path} | ssh -F {self.sshd.ssh_config} -c aes128-gcm@openssh.com testhost 'cat > /dev/null'"
        pipe_time = _median_time(lambda: subprocess.run(pipe, shell=True, check=True), 3)
        # The test shell of globalipapp reads no profile: the settings go in as %config lines, before the
        # extension loads (its warm-up at load uses them), as a profile would give them.
        settings = {"ssh_config": str(self.sshd.ssh_config), "hosts": {"testhost": {"python": sys.executable}},
                    "default_host": "testhost", "panel": "text"}  # fmt: skip
        script = (
            "import sys, time, numpy as np\n"
            "from IPython.testing.globalipapp import start_ipython\n"
            "ip = start_ipython()\n"
            + "".join(f"ip.run_line_magic('config', {f'RemoteMagics.{k} = {v!r}'!r})\n" for k, v in settings.items())
            + "ip.run_line_magic('load_ext', 'remote_magic')\n"
            "assert ip.magics_manager.registry['RemoteMagics'].default_host == 'testhost'\n"
            "ip.user_ns['first'] = np.fromfile(sys.argv[2], dtype=np.uint8)\n"
            "ip.user_ns['first'][:8] = int(sys.argv[1])  # new bytes each round\n"
            "start = time.perf_counter()\n"
            "result = ip.run_cell('%%remote_train\\nn = int(first[:8].sum())\\n', store_history=False)\n"
            "assert result.success and ip.user_ns['n'] == 8 * int(sys.argv[1]), result.error_in_exec\n"
            "sent = ip.magics_manager.registry['RemoteMagics']._client('testhost').bytes_sent\n"
            "print('FIRST', time.perf_counter() - start, sent)\n"
        )
        times, sent = [], []
        for round_ in range(3):
            self.stop_warm_runners()
            out = subprocess.run([sys.executable, "-c", script, str(round_ + 1), str(path)],
                                 capture_output=True, text=True, check=True).stdout  # fmt: skip
            times.append(float(out.split("FIRST", 1)[1].split()[0]))
            sent.append(int(out.split("FIRST", 1)[1].split()[1]))
        ours = statistics.median(times)
        path.unlink()
        self.record(13, f"first cell of a fresh kernel, new {self.size // MiB} MiB array, sshd: wall time", ours,
                    pipe_time, "s", ">= 0.85 x the OpenSSH pipe's speed (stretch >= 1.3 x scp)",
                    ours <= pipe_time / 0.85, extra={"scp_s": scp_time, "times_s": times, "bytes_sent": sent})  # fmt: skip

    # 14 --------------------------------------------------------------------------------------
    def waiting_runners(self) -> None:
        """What the waiting warm runners hold in memory (after the Keras figures: TensorFlow and Keras)."""
        roots = [self.sshd.host_root, Path(os.environ["REMOTE_MAGIC_DATA_DIR"]) / "local"]
        for host in ("local", "testhost"):  # a Keras job on each host: their waiting runners then import Keras
            self.quiet_cell(f"%%remote_train --host {host}\nimport keras\nkb = keras.backend.backend()\n")

        def with_keras(root: Path) -> bool:
            for ready in root.glob("warm/*.ready"):
                with contextlib.suppress(OSError, ValueError, KeyError):
                    if "keras" in json.loads(ready.read_text())["modules"]:
                        return True
            return False

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not all(with_keras(root) for root in roots):
            time.sleep(0.2)
        rss, anonymous, count = 0, 0, 0
        for ready in [r for root in roots for r in root.glob("warm/*.ready")]:
            with contextlib.suppress(OSError, ValueError, KeyError):
                status = Path(f"/proc/{json.loads(ready.read_text())['pid']}/status").read_text()
                fields = {line.split(":")[0]: int(line.split()[1]) for line in status.splitlines() if "kB" in line}
                rss, anonymous, count = rss + fields["VmRSS"], anonymous + fields["RssAnon"], count + 1
        self.record(14, f"memory of the {count} waiting warm runner(s), RSS (anonymous in extra)", rss / 1024,
                    0.0, "MiB", "one per kind, reported", True, ratio=0.0,
                    extra={"anonymous_mib": anonymous / 1024, "runners": count})  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--only", type=int, action="append", help="run only these figures (1-17)")
    parser.add_argument("--json", default=str(HERE / "results" / "latest.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="remote_magic-bench-") as tmp:
        os.environ["REMOTE_MAGIC_DATA_DIR"] = str(Path(tmp) / "data")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        bench = Bench(Path(tmp), args.quick)
        bench.start()
        try:
            figures = [bench.upload, bench.download, bench.rerun, bench.trivial, bench.keras_fit, bench.memory,
                       bench.latency, bench.queue_start, bench.sweep, bench.trivial_back_to_back,
                       bench.keras_back_to_back, bench.run_all, bench.first_cell, bench.waiting_runners]  # fmt: skip
            figures += [functools.partial(figure, bench) for figure in by_content.FIGURES]  # 15-17
            for number, figure in enumerate(figures, start=1):
                if not args.only or number in args.only:
                    print(f"figure {number}: {getattr(figure, 'func', figure).__name__} ...", flush=True)
                    figure()
        finally:
            bench.stop()
    print()
    print(f"{'#':<3}{'figure':<62}{'ours':>11}{'baseline':>11}  {'unit':<6}{'ratio':>7}  target")
    for row in bench.results:
        print(f"{row['figure']:<3}{row['name'][:61]:<62}{row['ours']:>11.3f}{row['baseline']:>11.3f}  "
              f"{row['unit']:<6}{row['ratio']:>7.2f}  {row['target']} [{'met' if row['met'] else 'MISSED'}]")  # fmt: skip
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(
        json.dumps({"time": time.time(), "quick": args.quick, "results": bench.results}, indent=1)
    )
    print(f"\nresults written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
