"""Fetching an image over HTTP: ranges over several connections, retries, failover between
copies, resume after a kill, verification. Every server is a 127.0.0.1 ObjectServer."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import time

import pytest

from http_objects import ObjectServer, dead_url

from mcastdeploy.drivers.sources import (ChecksumMismatch, FetchError, HttpRangeReader,
                                         RetryPolicy, fetch)
from mcastdeploy.drivers.sources.fetch import part_path, state_path

RANGE = 64 * 1024
FAST = RetryPolicy(attempts_per_copy=3, first_delay=0.01, max_delay=0.05, give_up_after=10)


class InOrder(random.Random):
    """Tries the copies in the order given, so a test knows which one is first."""

    def shuffle(self, x, *args) -> None:
        pass


def payload(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def ranges_of(size: int) -> list:
    return [(start, min(size, start + RANGE)) for start in range(0, size, RANGE)]


def assert_no_leftovers(dest) -> None:
    assert not os.path.exists(part_path(str(dest)))
    assert not os.path.exists(state_path(str(dest)))


def test_parallel_ranged_fetch_writes_the_right_bytes(tmp_path):
    data = payload(37 * RANGE + 123)
    dest = tmp_path / "image"
    with ObjectServer({"/img": data}) as server:
        result = fetch([HttpRangeReader(server.url())], str(dest), connections=4,
                       range_bytes=RANGE, expected_sha256=sha(data))
    assert dest.read_bytes() == data
    assert result.sha256 == sha(data) and result.size == len(data)
    assert result.ranges_fetched == 38 and result.ranges_resumed == 0 and result.retries == 0
    assert sorted(server.served) == [(0, 1)] + ranges_of(len(data))  # byte 0: the size
    assert server.bytes_served == len(data) + 1
    assert_no_leftovers(dest)


def test_the_hashed_prefix_is_reported_in_order_as_it_grows(tmp_path):
    """What a pipelined sender multicasts: only bytes already written and hashed."""
    data = payload(37 * RANGE + 123)
    dest = tmp_path / "image"
    prefixes: list[int] = []

    def on_hashed(prefix: int) -> None:
        with open(part_path(str(dest)), "rb") as part:
            assert part.read(prefix) == data[:prefix]  # written before it is reported
        prefixes.append(prefix)

    with ObjectServer({"/img": data}) as server:
        fetch([HttpRangeReader(server.url())], str(dest), connections=4,
              range_bytes=RANGE, on_hashed=on_hashed)
    assert prefixes == sorted(set(prefixes)) and prefixes[-1] == len(data)
    ends = {min(len(data), (index + 1) * RANGE) for index in range(38)}
    assert ends <= set(prefixes)  # every range, as it completes


def test_the_hashed_prefix_follows_a_range_still_arriving(tmp_path):
    """A slow first range is hashed as it arrives, not once it is complete: else a sender
    would wait for a whole range (8 MB by default) before its first packet."""
    data = payload(4 * RANGE)
    dest = tmp_path / "image"
    prefixes: list[int] = []
    with ObjectServer({"/img": data}, piece_delay=0.01) as server:
        fetch([HttpRangeReader(server.url())], str(dest), connections=1,
              range_bytes=len(data), on_hashed=prefixes.append)
    assert prefixes[-1] == len(data)
    assert len([prefix for prefix in prefixes if prefix < len(data)]) >= 3


def test_failed_ranges_are_retried_from_where_they_broke(tmp_path):
    data = payload(12 * RANGE)
    dest = tmp_path / "image"
    with ObjectServer({"/img": data}) as server:
        server.fault = lambda number, path, wanted: {3: "drop", 6: "500"}.get(number)
        result = fetch([HttpRangeReader(server.url())], str(dest), connections=3,
                       range_bytes=RANGE, retry=FAST)
    assert dest.read_bytes() == data
    assert result.retries == 2
    # The dropped range went on from its middle: nothing was served twice.
    assert server.bytes_served == len(data) + 1
    assert any(start % RANGE for start, _ in server.served)


def test_failover_when_the_first_copy_is_dead(tmp_path):
    """A copy that refuses connections is left at once, with no pause (the default policy
    would wait a second before retrying a copy)."""
    data = payload(8 * RANGE + 5)
    dest = tmp_path / "image"
    dead = dead_url()
    with ObjectServer({"/img": data}) as server:
        result = fetch([HttpRangeReader(dead), HttpRangeReader(server.url())], str(dest),
                       range_bytes=RANGE, rng=InOrder())
    assert dest.read_bytes() == data
    assert result.copies_failed == [dead] and result.retries == 1


def test_failover_when_the_first_copy_fails_mid_fetch(tmp_path):
    data = payload(16 * RANGE)
    dest = tmp_path / "image"
    with ObjectServer({"/img": data}) as first, ObjectServer({"/img": data}) as second:
        first.fault = lambda number, path, wanted: "500" if number > 4 else None
        result = fetch([HttpRangeReader(first.url()), HttpRangeReader(second.url())],
                       str(dest), connections=2, range_bytes=RANGE, retry=FAST, rng=InOrder())
    assert dest.read_bytes() == data
    assert result.copies_failed == [first.url()]
    assert first.bytes_served > 0 and second.bytes_served > 0
    assert first.bytes_served + second.bytes_served == len(data) + 2  # each described once


def test_every_copy_dead_is_one_clear_error(tmp_path):
    dest = tmp_path / "image"
    urls = [dead_url("/a"), dead_url("/b")]
    with pytest.raises(FetchError) as caught:
        fetch([HttpRangeReader(url) for url in urls], str(dest), retry=FAST)
    message = str(caught.value)
    assert "\n" not in message and "cannot connect" in message
    assert all(url in message for url in urls)
    assert not dest.exists()
    assert_no_leftovers(dest)


def test_a_server_that_ignores_ranges_is_refused(tmp_path):
    with ObjectServer({"/img": payload(RANGE)}, ranges=False) as server:
        with pytest.raises(FetchError, match="ignores Range requests"):
            fetch([HttpRangeReader(server.url())], str(tmp_path / "image"), retry=FAST)
    assert server.requests == 1  # no use asking again


def test_copies_of_different_images_are_not_mixed(tmp_path):
    """Same size, other ETag and no checksum to tell: the second copy is not used."""
    with ObjectServer({"/img": payload(8 * RANGE, seed=1)}) as first, \
            ObjectServer({"/img": payload(8 * RANGE, seed=2)}) as second:
        first.fault = lambda number, path, wanted: "500" if number > 2 else None
        with pytest.raises(FetchError, match="not the same image"):
            fetch([HttpRangeReader(first.url()), HttpRangeReader(second.url())],
                  str(tmp_path / "image"), connections=1, range_bytes=RANGE, retry=FAST,
                  rng=InOrder())
    assert second.bytes_served == 1


def test_a_killed_fetch_resumes_with_only_the_missing_ranges(tmp_path):
    data = payload(40 * RANGE + 77)
    dest = tmp_path / "image"
    with ObjectServer({"/img": data}, delay=0.05) as server:
        code = ("from mcastdeploy.drivers.sources import HttpRangeReader, fetch\n"
                f"fetch([HttpRangeReader({server.url()!r})], {str(dest)!r}, connections=2, "
                f"range_bytes={RANGE})\n")
        child = subprocess.Popen([sys.executable, "-c", code])
        state = state_path(str(dest))
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and child.poll() is None:
                if os.path.exists(state) and open(state).read().count("\n") > 6:
                    break
                time.sleep(0.02)
        finally:
            child.kill()
            child.wait(10)
        lines = open(state).read().split("\n")
        done = {int(line) for line in lines[1:-1]}
        assert 5 < len(done) < 41 and not dest.exists()

        server.delay = 0
        server.reset_counts()
        result = fetch([HttpRangeReader(server.url())], str(dest), range_bytes=RANGE)
    assert dest.read_bytes() == data
    assert result.ranges_resumed == len(done) and result.ranges_fetched == 41 - len(done)
    missing = [(start, end) for index, (start, end) in enumerate(ranges_of(len(data)))
               if index not in done]
    assert sorted(server.served) == [(0, 1)] + missing
    assert server.bytes_served == 1 + sum(end - start for start, end in missing)
    assert_no_leftovers(dest)


def test_an_object_changed_since_the_interrupted_fetch_is_fetched_afresh(tmp_path):
    old, new = payload(10 * RANGE, seed=1), payload(10 * RANGE, seed=2)
    dest = tmp_path / "image"
    with ObjectServer({"/img": old}) as server:
        server.fault = lambda number, path, wanted: "500" if number > 4 else None
        with pytest.raises(FetchError, match="after 3 attempts"):
            fetch([HttpRangeReader(server.url())], str(dest), connections=1,
                  range_bytes=RANGE, retry=FAST)
        assert os.path.exists(state_path(str(dest)))
        server.fault = None
        server.objects["/img"] = new  # same size, new ETag
        server.reset_counts()
        result = fetch([HttpRangeReader(server.url())], str(dest), range_bytes=RANGE)
    assert dest.read_bytes() == new
    assert result.ranges_resumed == 0 and server.bytes_served == len(new) + 1


def test_a_checksum_mismatch_keeps_nothing(tmp_path):
    data = payload(4 * RANGE)
    dest = tmp_path / "image"
    with ObjectServer({"/img": data}) as server:
        with pytest.raises(ChecksumMismatch, match="expected " + "0" * 64):
            fetch([HttpRangeReader(server.url())], str(dest), range_bytes=RANGE,
                  expected_sha256="0" * 64)
    assert not dest.exists()
    assert_no_leftovers(dest)


def test_an_unpinned_image_is_checked_against_a_bare_md5_etag(tmp_path):
    """Swift sends a plain object's ETag bare: its bytes' MD5. Without a pinned SHA-256 it
    is the content's one check, and bytes that do not match it are not kept; a quoted ETag
    (a large object's, most servers') is no digest and only names the version."""
    data = payload(4 * RANGE)
    with ObjectServer({"/img": data}) as server:
        server.etag = lambda path: hashlib.md5(server.objects[path]).hexdigest()  # Swift's
        result = fetch([HttpRangeReader(server.url())], str(tmp_path / "good"),
                       range_bytes=RANGE)
        assert result.etag == hashlib.md5(data).hexdigest()
        assert (tmp_path / "good").read_bytes() == data
        server.etag = lambda path: hashlib.md5(b"another image").hexdigest()
        with pytest.raises(ChecksumMismatch, match="ETag says"):
            fetch([HttpRangeReader(server.url())], str(tmp_path / "bad"), range_bytes=RANGE)
        assert_no_leftovers(tmp_path / "bad")
        assert not (tmp_path / "bad").exists()
        # Pinned: the SHA-256 decides, the ETag is not read as a digest.
        fetch([HttpRangeReader(server.url())], str(tmp_path / "pinned"), range_bytes=RANGE,
              expected_sha256=hashlib.sha256(data).hexdigest())


def test_a_missing_object_is_not_retried(tmp_path):
    with ObjectServer({}) as server:
        with pytest.raises(FetchError, match="HTTP 404"):
            fetch([HttpRangeReader(server.url())], str(tmp_path / "image"))
    assert server.requests == 1


def test_urls_are_shown_without_credentials_or_signatures():
    from mcastdeploy.drivers.sources import display_url

    assert display_url("https://user:pw@swift.example:8080/v1/AUTH_x/images/u.raw"
                       "?temp_url_sig=5ecret&temp_url_expires=1") \
        == "https://swift.example:8080/v1/AUTH_x/images/u.raw"
    assert display_url("/srv/images/u.raw") == "/srv/images/u.raw"
    assert display_url("ubuntu-22.04") == "ubuntu-22.04"
    assert HttpRangeReader("http://a:b@h/x?sig=1").name == "http://h/x"
