"""The local blob cache: bounded in size, least recently used blobs go first."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import time

from remote_magic.wire import cache as cache_module
from remote_magic.wire.cache import DEFAULT_CACHE_LIMIT, BlobCache


def _blob(seed: int, size: int = 1000) -> tuple[str, bytearray]:
    data = bytearray(hashlib.sha256(str(seed).encode()).digest() * (size // 32 + 1))[:size]
    return hashlib.sha256(data).hexdigest(), data


def _put_aged(cache: BlobCache, seed: int, age: float, size: int = 1000) -> str:
    """Put a blob whose last use was ``age`` seconds ago, so the order does not hang on the clock's resolution."""
    digest, data = _blob(seed, size)
    cache.put(digest, data)
    if os.path.exists(os.path.join(cache.folder, digest)):
        when = time.time() - age
        os.utime(os.path.join(cache.folder, digest), (when, when))
    return digest


def _cached(cache: BlobCache) -> set[str]:
    return set(os.listdir(cache.folder)) if os.path.isdir(cache.folder) else set()


def test_the_default_limit_is_10_gib_and_documented(tmp_path) -> None:
    assert DEFAULT_CACHE_LIMIT == 10 * 2**30
    assert BlobCache(str(tmp_path)).limit == DEFAULT_CACHE_LIMIT
    assert BlobCache(str(tmp_path), limit=None).limit == DEFAULT_CACHE_LIMIT
    assert "10 GiB" in (cache_module.__doc__ or "")


def test_the_cache_stays_within_its_limit(tmp_path) -> None:
    cache = BlobCache(str(tmp_path / "blobs"), limit=3500)
    digests = [_put_aged(cache, seed, age=100 - seed) for seed in range(10)]
    assert _cached(cache) == set(digests[-3:])
    assert cache.usage() == (3, 3000)
    for digest in digests[-3:]:
        assert cache.get(digest, 1000) == _blob(digests.index(digest))[1]


def test_a_blob_read_recently_survives_eviction(tmp_path) -> None:
    cache = BlobCache(str(tmp_path / "blobs"), limit=3000)
    oldest, middle, newest = (_put_aged(cache, seed, age) for seed, age in ((0, 300), (1, 200), (2, 100)))
    assert cache.get(oldest, 1000) is not None  # now the most recently used
    fresh = _put_aged(cache, 3, age=0)
    assert _cached(cache) == {oldest, newest, fresh}
    assert middle not in _cached(cache)


def test_a_blob_larger_than_the_limit_is_not_cached_and_evicts_nothing(tmp_path) -> None:
    cache = BlobCache(str(tmp_path / "blobs"), limit=2500)
    small = _put_aged(cache, 0, age=10)
    digest, data = _blob(1, 2501)
    cache.put(digest, data)
    assert cache.get(digest, 2501) is None
    assert _cached(cache) == {small}


def test_limit_zero_caches_nothing(tmp_path) -> None:
    cache = BlobCache(str(tmp_path / "blobs"), limit=0)
    digest, data = _blob(0)
    cache.put_in_background(digest, data)
    cache.wait()
    assert cache.get(digest, 1000) is None
    assert _cached(cache) == set()
    assert cache.usage() == (0, 0)


def test_put_in_background_then_get(tmp_path) -> None:
    cache = BlobCache(str(tmp_path / "blobs"), limit=10_000)
    digest, data = _blob(0)
    cache.put_in_background(digest, data)
    cache.wait()
    assert cache.get(digest, 1000) == data


def test_stale_temporary_files_are_removed_and_fresh_ones_kept(tmp_path) -> None:
    """A writer killed before its rename leaves a temporary file; one that is still writing must not lose it."""
    folder = tmp_path / "blobs"
    folder.mkdir()
    stale, fresh = folder / "ab.tmp-00000000", folder / "cd.tmp-11111111"
    stale.write_bytes(b"x" * 100)
    fresh.write_bytes(b"y" * 100)
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    cache = BlobCache(str(folder), limit=10_000)
    digest = _put_aged(cache, 0, age=0)
    assert _cached(cache) == {digest, fresh.name}


def test_usage_and_clear(tmp_path) -> None:
    cache = BlobCache(str(tmp_path / "blobs"), limit=10_000)
    assert cache.usage() == (0, 0)
    assert cache.clear() == 0
    digests = [_put_aged(cache, seed, age=10, size=100 * (seed + 1)) for seed in range(3)]
    assert cache.usage() == (3, 600)
    assert cache.clear() == 600
    assert cache.usage() == (0, 0)
    assert all(cache.get(digest, 100 * (n + 1)) is None for n, digest in enumerate(digests))


def _put_many(folder: str, first: int, count: int) -> None:
    cache = BlobCache(folder, limit=20_000)
    for seed in range(first, first + count):
        digest, data = _blob(seed)
        cache.put(digest, data)
        cache.get(digest, 1000)


def test_kernels_evicting_at_the_same_time(tmp_path) -> None:
    """Files another process evicts while this one scans the folder are no error, and the bound holds."""
    folder = str(tmp_path / "blobs")
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_put_many, args=(folder, 1000 * n, 400)) for n in range(4)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(120)
    assert [writer.exitcode for writer in writers] == [0, 0, 0, 0]
    files, size = BlobCache(folder, limit=20_000).usage()
    assert size <= 20_000
    assert files == size // 1000
    assert not [name for name in os.listdir(folder) if ".tmp-" in name]
