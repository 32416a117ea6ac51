"""Baselines through an emulated link (issue 22): scp, scp -C, rsync -e ssh and the link's own limit.

Our figures on a slow or far link mean something only beside what the tools users would reach for do
on the same link in the same run. This routes OpenSSH's own tools through bench/link_emulator.py in
front of the test sshd and times them, with the emulator's own measured RTT and rate.

    .venv/bin/python bench/links.py --profile vpn --mib 32      # starts its own sshd
    links.figure(bench, "lfn")                                  # from bench/run.py, on its sshd
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent / "tests"))

from link_emulator import PROFILES, Link, LinkCheck, LinkEmulator, ssh_config_through  # noqa: E402

MiB = 1024 * 1024
SSH_WINDOW = 2 * MiB  # OpenSSH's channel window: one stream moves at most this per round trip


@dataclasses.dataclass
class Row:
    method: str
    direction: str
    data: str
    seconds: float
    nbytes: int

    @property
    def mib_s(self) -> float:
        return self.nbytes / MiB / self.seconds


@dataclasses.dataclass
class LinkBaselines:
    """The baselines of one link, with what the emulator measured of itself in the same run."""

    link: Link
    check: LinkCheck
    rows: list[Row]
    zlib_ratio: float
    zlib_mib_s: float
    login_s: float  # `ssh host true` through the link: what every scp and rsync below pays before its data

    @property
    def limit_s(self) -> float:
        return self.rows[0].seconds  # the first row is the link's own limit

    def table(self) -> str:
        lines = [
            f"{self.link}: {self.check}; `ssh host true` {self.login_s:.2f} s; the images: zlib-6"
            f" {self.zlib_ratio:.1f}x at {self.zlib_mib_s:.0f} MiB/s on one core here",
            f"{'method':<34}{'dir':<6}{'data':<22}{'seconds':>9}{'MiB/s':>9}{'x link':>8}",
        ]
        for row in self.rows:
            lines.append(
                f"{row.method:<34}{row.direction:<6}{row.data:<22}{row.seconds:>9.2f}{row.mib_s:>9.1f}"
                f"{self.limit_s / row.seconds:>8.2f}"
            )
        return "\n".join(lines)

    def as_dicts(self) -> list[dict[str, Any]]:
        """Rows for bench/results JSON, each with the link and its measured RTT and rate beside it."""
        return [
            {**dataclasses.asdict(row), "mib_s": row.mib_s, "link": self.link.name, "of_link_limit": self.limit_s / row.seconds,
             "measured_rtt_ms": self.check.rtt_ms, "measured_rate_mbit": self.check.rate_mbit, "login_s": self.login_s}
            for row in self.rows
        ]  # fmt: skip


def write_test_files(folder: Path, nbytes: int) -> tuple[Path, Path, float, float]:
    """A random file (incompressible) and uint8 "images" quantized to 4 levels (zlib-6 shrinks them ~3.4x),
    as training data compresses; returns both paths, and the second's zlib-6 ratio and speed (MiB/s of input)
    on a sample: ssh -C compresses with zlib-6, so that speed bounds scp -C where it is below the link's."""
    import zlib

    import numpy as np

    rng = np.random.default_rng(22)
    folder.mkdir(parents=True, exist_ok=True)
    random_path, images_path = folder / "random.bin", folder / "images.u8"
    rng.integers(0, 256, nbytes, dtype=np.uint8).tofile(random_path)
    images = rng.integers(0, 4, nbytes, dtype=np.uint8) * np.uint8(85)
    images.tofile(images_path)
    sample = images[: 4 * MiB].tobytes()
    start = time.perf_counter()
    compressed = zlib.compress(sample, 6)
    speed = len(sample) / MiB / (time.perf_counter() - start)
    return random_path, images_path, len(sample) / len(compressed), speed


def _timed(argv: list[str], *, result: Path | None, nbytes: int, repeat: int) -> float:
    """Median seconds of argv; each run starts with result gone and must leave nbytes there."""
    times = []
    for _ in range(repeat):
        if result is not None:
            result.unlink(missing_ok=True)
        start = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
        if result is not None and result.stat().st_size != nbytes:
            raise RuntimeError(f"{argv[0]} left {result.stat().st_size} bytes, not {nbytes}: {argv}")
    return statistics.median(times)


def run_baselines(sshd: Any, link: Link, nbytes: int, workdir: Path, repeat: int = 1) -> LinkBaselines:
    """Time scp, scp -C and rsync up and down through ``link`` in front of a started ``tests/sshd.py`` sshd."""
    if shutil.which("rsync") is None:
        raise RuntimeError("rsync is missing: apt-get install -y rsync (make system-deps does this)")
    local, remote = workdir / "local", workdir / "remote"  # the "host" is this machine, under remote/
    random_path, images_path, ratio, zlib_speed = write_test_files(local, nbytes)
    remote.mkdir(parents=True, exist_ok=True)
    size = f"{nbytes // MiB} MiB"
    with LinkEmulator(sshd.port, link) as emulator:
        check = emulator.self_check()
        config = ssh_config_through(sshd, emulator.port, workdir / "ssh_config_link")
        host = sshd.alias
        scp = ["scp", "-q", "-F", str(config)]
        rsync = ["rsync", "-e", f"ssh -F {config}"]
        login_s = _timed(["ssh", "-F", str(config), host, "true"], result=None, nbytes=0, repeat=max(3, repeat))
        rows = [Row("link limit (size / rate)", "", size, link.limit_s(nbytes), nbytes)]
        if link.rtt_ms > 0:
            window_s = nbytes / SSH_WINDOW * link.rtt_ms / 1000  # binds only where "x link" is below 1
            rows.append(Row("one channel's 2 MiB window / RTT", "", size, window_s, nbytes))
        runs = [
            ("scp", "up", f"{size} random", [*scp, str(random_path), f"{host}:{remote}/scp.bin"], remote / "scp.bin"),
            ("scp", "down", f"{size} random", [*scp, f"{host}:{remote}/scp.bin", str(local / "scp.bin")], local / "scp.bin"),
            ("scp -C", "up", f"{size} images {ratio:.1f}x", [*scp, "-C", str(images_path), f"{host}:{remote}/scpC.u8"], remote / "scpC.u8"),
            ("scp -C", "down", f"{size} images {ratio:.1f}x", [*scp, "-C", f"{host}:{remote}/scpC.u8", str(local / "scpC.u8")], local / "scpC.u8"),
            ("rsync -e ssh", "up", f"{size} random", [*rsync, str(random_path), f"{host}:{remote}/rsync.bin"], remote / "rsync.bin"),
            ("rsync -e ssh", "down", f"{size} random", [*rsync, f"{host}:{remote}/rsync.bin", str(local / "rsync.bin")], local / "rsync.bin"),
        ]  # fmt: skip
        for method, direction, data, argv, result in runs:
            rows.append(Row(method, direction, data, _timed(argv, result=result, nbytes=nbytes, repeat=repeat), nbytes))
    return LinkBaselines(link=link, check=check, rows=rows, zlib_ratio=ratio, zlib_mib_s=zlib_speed, login_s=login_s)


def figure(bench: Any, profile: str = "vpn", mib: int | None = None) -> LinkBaselines:
    """The baselines for one profile on bench/run.py's sshd (32 MiB with --quick, else 128 MiB); prints the table."""
    size = (mib or (32 if bench.quick else 128)) * MiB
    result = run_baselines(bench.sshd, PROFILES[profile], size, bench.tmp / f"links-{profile}")
    print(result.table(), flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), action="append", help="default: vpn")
    parser.add_argument("--mib", type=int, default=32, help="size of each transfer, MiB")
    parser.add_argument("--repeat", type=int, default=1, help="runs per baseline (the median is shown)")
    args = parser.parse_args()
    from sshd import make_sshd

    with tempfile.TemporaryDirectory(prefix="remote_magic-links-") as tmp:
        sshd = make_sshd(Path(tmp) / "sshd")
        sshd.start()
        try:
            for name in args.profile or ["vpn"]:
                result = run_baselines(sshd, PROFILES[name], args.mib * MiB, Path(tmp) / name, args.repeat)
                print(result.table(), flush=True)
        finally:
            sshd.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
