"""Measures the peak memory a submit adds to this process (run by bench/run.py in a fresh process).

argv: SSH_CONFIG SIZE_BYTES.  Prints one JSON line: the array size and the peak added bytes.
"""

from __future__ import annotations

import json
import resource
import sys
import threading
import time

import numpy as np

from remote_magic import session
from remote_magic.transport import SSHTransport
from remote_magic.wire.client import AgentClient


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def main() -> None:
    ssh_config, size = sys.argv[1], int(sys.argv[2])
    transport = AgentClient(SSHTransport("testhost", python=sys.executable, ssh_config=ssh_config))
    transport.hello()
    session.submit(transport, session.prepare("y = 1\n", {}))  # connection, agent and imports warm
    # Filled in slices: generating it at once would itself peak at twice its size, before we measure.
    array = np.empty(size // 8)
    rng = np.random.default_rng(6)
    for start in range(0, array.size, 1 << 20):
        array[start : start + (1 << 20)] = rng.random(min(1 << 20, array.size - start))
    before = current_rss()
    peak_before = peak_rss()
    samples = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(current_rss())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    session.submit(transport, session.prepare("n = big.nbytes\n", {"big": array}))
    done.set()
    sampler.join()
    # The kernel's own peak counter, when the submit raised it, else the sampled peak.
    peak = peak_rss() if peak_rss() > peak_before else max(samples)
    print(json.dumps({"size": size, "peak_added_bytes": peak - before, "sampled_peak_added": max(samples) - before}))


if __name__ == "__main__":
    main()
