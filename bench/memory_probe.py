"""Measures the peak memory a submit adds to this process (run by bench/run.py in a fresh process).

argv: SSH_CONFIG SIZE_BYTES.  Prints one JSON line: the array size and the peak added bytes.
"""

from __future__ import annotations

import json
import resource
import sys

import numpy as np

from remote_magic import session
from remote_magic.transport import SSHTransport


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def main() -> None:
    ssh_config, size = sys.argv[1], int(sys.argv[2])
    transport = SSHTransport("testhost", python=sys.executable, ssh_config=ssh_config)
    transport.hello()
    session.submit(transport, session.prepare("y = 1\n", {}))  # connection, agent and imports warm
    array = np.random.default_rng(6).random(size // 8)
    before = current_rss()
    session.submit(transport, session.prepare("n = big.nbytes\n", {"big": array}))
    print(json.dumps({"size": size, "peak_added_bytes": peak_rss() - before}))


if __name__ == "__main__":
    main()
