"""A multi-GiB round trip over a fresh sshd, checked by hash (rekeying, windows, memory).

    .venv/bin/python bench/big_transfer.py --gib 4

Uploads SIZE random bytes as one blob (read from a memory-mapped file, so the
client holds no copy), downloads it back into one buffer, and compares sha256.
"""

from __future__ import annotations

import argparse
import mmap
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=4.0)
    args = parser.parse_args()
    size = int(args.gib * 1024**3)
    from sshd import make_sshd

    from remote_magic.agent import digest as digests

    with tempfile.TemporaryDirectory(prefix="remote_magic-big-") as tmp:
        os.environ["REMOTE_MAGIC_DATA_DIR"] = str(Path(tmp) / "data")
        from remote_magic.transport import SSHTransport
        from remote_magic.wire.client import AgentClient

        source = Path(tmp) / "source.bin"
        with open(source, "wb") as f:
            for _ in range(0, size, 64 * 1024 * 1024):
                f.write(os.urandom(64 * 1024 * 1024))
            f.truncate(size)
        sshd = make_sshd(Path(tmp) / "sshd")
        sshd.start()
        try:
            transport = AgentClient(SSHTransport("testhost", python=sys.executable, ssh_config=str(sshd.ssh_config)))
            transport.hello()
            with open(source, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as mapped:
                view = memoryview(mapped)
                start = time.perf_counter()
                digest = digests.of(view)
                hashed = time.perf_counter() - start
                start = time.perf_counter()
                transport.put_blob(digest, view, "none")
                uploaded = time.perf_counter() - start
                view.release()
            start = time.perf_counter()
            back = transport.get_blob(digest, size)
            downloaded = time.perf_counter() - start
            same = digests.of(back) == digest
            mib = size / 1024**2
            print(f"{args.gib:g} GiB: hash {hashed:.1f} s, upload {uploaded:.1f} s ({mib / uploaded:.0f} MiB/s), "
                  f"download {downloaded:.1f} s ({mib / downloaded:.0f} MiB/s), digest equal: {same}")  # fmt: skip
            return 0 if same else 1
        finally:
            sshd.stop()


if __name__ == "__main__":
    sys.exit(main())
