"""Content digests, named by their algorithm: ``sha256:<hex>``.

One format for every blob, file and cache entry, so a later algorithm can sit beside this one.  Bare hex
(what earlier versions wrote in specs, manifests and file names) is read as sha256, and a blob's file
name stays its bare hex, so blobs and caches stored before keep working.  Shared by the agent and the client.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Protocol

ALGORITHM = "sha256"
_HEX = re.compile(r"[0-9a-f]{64}")


class Hasher(Protocol):
    def update(self, data: Any, /) -> None: ...
    def hexdigest(self) -> str: ...


def new() -> Hasher:
    """A hasher for the current algorithm; ``named(hasher)`` gives its digest."""
    return hashlib.sha256()


def named(hasher: Hasher) -> str:
    return f"{ALGORITHM}:{hasher.hexdigest()}"


def of(data: Any) -> str:
    """The digest of bytes (or any buffer)."""
    return named(hashlib.sha256(data))


def split(digest: object) -> tuple[str, str] | None:
    """(algorithm, hex) of a digest, bare hex read as sha256; None when it is not one."""
    if not isinstance(digest, str):
        return None
    algorithm, _, hex_ = digest.rpartition(":") if ":" in digest else (ALGORITHM, "", digest)
    if algorithm != ALGORITHM or not _HEX.fullmatch(hex_):
        return None
    return algorithm, hex_


def is_digest(text: object) -> bool:
    return split(text) is not None


def normal(digest: str) -> str:
    """The named form of a digest (``sha256:<hex>``), whichever form it came in; ValueError when it is none."""
    parts = split(digest)
    if parts is None:
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return f"{parts[0]}:{parts[1]}"


def file_name(digest: str) -> str:
    """The name a blob is stored under: its bare hex for sha256, as earlier versions stored it."""
    parts = split(digest)
    if parts is None:
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return parts[1] if parts[0] == "sha256" else f"{parts[0]}-{parts[1]}"


def matches(hasher: Hasher, digest: str) -> bool:
    """Whether what ``hasher`` read has this digest (named or bare)."""
    parts = split(digest)
    return parts is not None and parts[0] == ALGORITHM and hasher.hexdigest() == parts[1]


def short(digest: str) -> str:
    """A few hex digits to name a blob in a message."""
    parts = split(digest)
    return parts[1][:12] if parts else str(digest)[:12]
