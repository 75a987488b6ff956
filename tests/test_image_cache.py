"""The rack head's image cache: hits without network, LRU eviction under the limit, images in
use kept, one fetch for two senders, and nothing cached from a bad download."""

from __future__ import annotations

import os
import threading
import time

import pytest

from http_objects import ObjectServer
from test_remote import FAST, RANGE, payload, sha

from mcastdeploy.drivers.sources import (CacheError, ChecksumMismatch, FetchError,
                                         HttpRangeReader,
                                         ImageCache)

SIZE = 6 * RANGE


def cache_in(tmp_path, limit: int) -> ImageCache:
    return ImageCache(str(tmp_path / "cache"), limit, lock_timeout=10, range_bytes=RANGE,
                      retry=FAST)


def get(cache: ImageCache, server: ObjectServer, path: str, checksum=None):
    url = server.url(path)
    return cache.get_or_fetch(url, [HttpRangeReader(url)], checksum)


def cached_images(cache: ImageCache) -> list:
    return sorted(name for name in os.listdir(cache.directory) if name.endswith(".img"))


@pytest.fixture
def server():
    objects = {f"/{name}": payload(SIZE, seed=seed) for seed, name in enumerate("abcd")}
    with ObjectServer(objects) as running:
        yield running


def test_a_second_session_touches_no_network(tmp_path, server):
    cache = cache_in(tmp_path, 10 * SIZE)
    checksum = sha(server.objects["/a"])
    with get(cache, server, "/a", checksum) as first:
        assert open(first, "rb").read() == server.objects["/a"]
        assert first.fetched is not None and first.sha256 == checksum
    served = server.requests
    with get(cache, server, "/a", checksum) as second:
        assert second.path == first.path and second.fetched is None
        assert open(second, "rb").read() == server.objects["/a"]
    assert server.requests == served
    # The same name with another checksum is another image.
    with pytest.raises(ChecksumMismatch):
        get(cache, server, "/a", "1" * 64)


def test_least_recently_used_images_are_evicted_to_stay_under_the_limit(tmp_path, server):
    cache = cache_in(tmp_path, 2 * SIZE + SIZE // 2)
    for path in ("/a", "/b", "/a"):  # a used again after b: b is the older
        get(cache, server, path).close()
    get(cache, server, "/c").close()
    assert cached_images(cache) == sorted(os.path.basename(cache.image_path(server.url(p)))
                                          for p in ("/a", "/c"))
    used = sum(os.path.getsize(os.path.join(cache.directory, name))
               for name in os.listdir(cache.directory))
    assert used <= cache.limit_bytes


def test_an_image_in_use_is_never_evicted(tmp_path, server):
    cache = cache_in(tmp_path, SIZE + SIZE // 2)
    held = get(cache, server, "/a")
    with pytest.raises(CacheError, match="no room"):
        get(cache, server, "/b")
    assert open(held, "rb").read() == server.objects["/a"]
    held.close()
    with get(cache, server, "/b") as second:  # now a may go
        assert open(second, "rb").read() == server.objects["/b"]
    assert not os.path.exists(held.path)


def test_two_senders_wanting_one_image_fetch_it_once(tmp_path, server):
    server.delay = 0.2  # the first fetch lasts long enough for the second to wait on it
    cache = cache_in(tmp_path, 10 * SIZE)
    results: list = []

    def sender() -> None:
        other = ImageCache(cache.directory, cache.limit_bytes, lock_timeout=10,
                           range_bytes=RANGE, retry=FAST)
        with get(other, server, "/a") as image:
            results.append((image.fetched is not None, open(image, "rb").read()))

    threads = [threading.Thread(target=sender) for _ in range(2)]
    threads[0].start()
    deadline = time.monotonic() + 10
    while not server.requests and time.monotonic() < deadline:
        time.sleep(0.01)
    threads[1].start()  # while the first is fetching
    for thread in threads:
        thread.join(20)
    assert sorted(fetched for fetched, _ in results) == [False, True]
    assert all(data == server.objects["/a"] for _, data in results)
    assert server.bytes_served == SIZE + 1


def test_a_bad_download_leaves_no_cached_entry(tmp_path, server):
    cache = cache_in(tmp_path, 10 * SIZE)
    with pytest.raises(ChecksumMismatch):
        get(cache, server, "/a", "0" * 64)
    assert cached_images(cache) == []
    assert not any(name.endswith((".part", ".state")) for name in os.listdir(cache.directory))


def test_an_image_larger_than_the_cache_is_refused_before_download(tmp_path, server):
    cache = cache_in(tmp_path, SIZE - 1)
    with pytest.raises(CacheError, match="more than the cache limit"):
        get(cache, server, "/a")
    assert server.bytes_served == 1  # only the byte that told the size


def test_an_interrupted_fetch_resumes_in_the_cache(tmp_path, server):
    cache = cache_in(tmp_path, 10 * SIZE)
    server.fault = lambda number, path, wanted: "500" if number > 3 else None
    with pytest.raises(FetchError):
        get(cache, server, "/a")
    assert cached_images(cache) == []
    server.fault = None
    with get(cache, server, "/a") as image:
        assert open(image, "rb").read() == server.objects["/a"]
        assert image.fetched.ranges_resumed == 2
