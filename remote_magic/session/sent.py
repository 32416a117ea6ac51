"""The arrays this kernel sent as inputs, by digest: an output buffer with the same digest is read from them.

A model whose custom loss reads a 200 MB notebook global carries that global by value, both ways;
the host sends it back unchanged, under the digest the kernel gave it.  Downloading it again would
double every run's transfer and hold a second copy in memory.  So the kernel remembers what it sent,
by weak reference (a sent array the notebook dropped is not kept alive), and the injected value
shares the kernel's memory instead.

Between the send and the injection the notebook may have changed the array in place (a detached
job runs while cells do, an earlier cell sent it): the bytes are hashed again first, which costs less
than downloading them (about 0.6 s per GiB) and nothing on the wire.
"""

from __future__ import annotations

import pickle
import threading
import weakref
from collections.abc import Sequence
from typing import Any

from ..agent import digest as digests


class SentBuffers:
    """Weak references to the objects whose buffers went out as input blobs, by the blob's digest."""

    def __init__(self) -> None:
        self._sent: dict[str, tuple[weakref.ref[Any], int]] = {}
        self._lock = threading.Lock()

    def remember(self, blobs: Sequence[tuple[str, int]], buffers: Sequence[memoryview]) -> None:
        """After a submit: each blob's exporting object (a numpy array), when it can be referred to weakly."""
        with self._lock:
            for (digest, size), buffer in zip(blobs, buffers, strict=True):
                try:
                    self._sent[digests.normal(digest)] = (weakref.ref(buffer.obj), size)
                except (TypeError, ValueError):  # bytes, a temporary view: nothing to find it by later
                    continue
            for digest in [d for d, (ref, _) in self._sent.items() if ref() is None]:
                del self._sent[digest]

    def find(self, digest: str, size: int) -> memoryview | None:
        """The kernel's own bytes for this blob, when the object that held them still holds exactly them; else None."""
        with self._lock:
            entry = self._sent.get(digests.normal(digest))
        owner = entry[0]() if entry is not None else None
        if owner is None or entry is None or entry[1] != size:
            return None
        try:
            view = pickle.PickleBuffer(owner).raw()
        except (BufferError, TypeError, ValueError):  # no longer contiguous, or no longer a buffer
            return None
        if view.nbytes != size or digests.normal(digests.of(view)) != digests.normal(digest):
            return None
        return view

    def forget(self) -> None:
        """Remember nothing sent so far (a benchmark's baseline: what a kernel without this would receive)."""
        with self._lock:
            self._sent.clear()


# One per kernel: what it sent lives in its own memory.
SENT = SentBuffers()
