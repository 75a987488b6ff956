"""The peer block server and fetcher on loopback TCP: failover, lying and absent peers.

The rack tests (tests/test_rack_peers.py) run them inside ``recv`` and ``send``; these
need no root, and check the drivers' own promises: blocks come from several peers at
once, a peer whose block the caller rejects is dropped and its blocks fetched from the
others, and a fetcher with no usable peer says so ("exhausted") instead of hanging.
"""

from __future__ import annotations

import queue
import random
import time

import pytest

from mcastdeploy.drivers.peer_fetch import PeerFetcher
from mcastdeploy.drivers.peer_server import BlockServer
from mcastdeploy.protocol.geometry import ImageGeometry
from mcastdeploy.protocol.manifest import block_hash

SECRET = bytes(range(32))
SID = 0x5EED_0002
GEOMETRY = ImageGeometry(60 * 4 * 256 - 100, 256, 4)  # 60 blocks of 1 KiB, a short last one


class LyingServer(BlockServer):
    def _read(self, image, block):  # type: ignore[override]
        data = bytearray(super()._read(image, block))
        data[0] ^= 1
        return bytes(data)


@pytest.fixture
def image(tmp_path) -> tuple[str, bytes]:
    data = random.Random(3).randbytes(GEOMETRY.image_size)
    path = tmp_path / "image.raw"
    path.write_bytes(data)
    return str(path), data


def serve(server_class, path: str, held=None, idle_timeout: float = 5.0) -> BlockServer:
    server = server_class(SECRET, SID, encrypt=True, host="127.0.0.1", idle_timeout=idle_timeout)
    server.serve(path, GEOMETRY, held)
    return server


def run_fetch(fetcher: PeerFetcher, data: bytes, deadline: float = 20.0) -> dict:
    """Play the receiver: check each block, accept or reject it, until all are in or the
    fetcher is exhausted.  What happened."""
    hashes = [block_hash(data[GEOMETRY.offset(b):GEOMETRY.offset(b) + GEOMETRY.block_length(b)])
              for b in range(GEOMETRY.block_count)]
    got: dict[int, bytes] = {}
    rejected, exhausted = 0, None
    until = time.monotonic() + deadline
    while len(got) < GEOMETRY.block_count and exhausted is None:
        assert time.monotonic() < until, f"only {len(got)} blocks in time"
        try:
            item = fetcher.results.get(timeout=0.5)
        except queue.Empty:
            continue
        if item[0] in ("failed",):
            continue
        if item[0] == "exhausted":
            exhausted = item[1]
            continue
        peer, block, blob = item
        if block_hash(blob) == hashes[block]:
            got[block] = blob
            fetcher.accepted(block)
        else:
            rejected += 1
            fetcher.rejected(peer, block)
    fetcher.close()
    return {"got": got, "rejected": rejected, "exhausted": exhausted}


def fetch_all(data: bytes, ports: list[int], secret: bytes = SECRET,
              **options) -> tuple[PeerFetcher, dict]:
    """Every block wanted from the peers at ``ports`` on loopback (origins 1, 2, ...): the
    fetcher, and what happened (run_fetch)."""
    fetcher = PeerFetcher(secret, SID, encrypt=True, geometry=GEOMETRY, wake=lambda: None,
                          **options)
    fetcher.add_peers([("127.0.0.1", port, origin) for origin, port in enumerate(ports, 1)])
    fetcher.want(range(GEOMETRY.block_count))
    return fetcher, run_fetch(fetcher, data)


def test_blocks_from_two_peers_one_lying(image):
    path, data = image
    honest, liar = serve(BlockServer, path), serve(LyingServer, path)
    try:
        fetcher, outcome = fetch_all(data, [honest.port, liar.port], batch=4, timeout=5.0)
    finally:
        honest.close()
        liar.close()
    assert outcome["exhausted"] is None
    assert b"".join(outcome["got"][b] for b in range(GEOMETRY.block_count)) == data
    assert outcome["rejected"] >= 1  # both started at once: the liar was asked too
    assert fetcher.failed_origins == (2,)
    assert honest.bytes_served >= GEOMETRY.image_size - 4 * GEOMETRY.block_bytes


def test_no_usable_peer_is_reported_not_waited_for(image):
    path, data = image
    held = bytearray(GEOMETRY.block_count)  # a seeder that holds nothing yet
    empty = serve(BlockServer, path, held)
    gone = serve(BlockServer, path)
    gone_port = gone.port
    gone.close()  # nobody listens there any more
    try:
        _, outcome = fetch_all(data, [empty.port, gone_port], timeout=2.0)
    finally:
        empty.close()
    assert outcome["got"] == {}
    assert set(outcome["exhausted"]) == {1, 2}


def test_wrong_key_gets_nothing(image):
    path, data = image
    server = serve(BlockServer, path)
    try:
        _, outcome = fetch_all(data, [server.port], secret=bytes(32), timeout=2.0)
    finally:
        server.close()
    assert outcome["got"] == {} and outcome["exhausted"] == (1,)
    assert server.bytes_served == 0


def test_the_origin_serves_by_ranged_get_after_a_dead_peer(image):
    """The very last resort: the image's origin URL (raw bytes, as Ironic gives it),
    read in ranges of whole blocks; a corrupt origin copy is caught like a lying peer."""
    from http_objects import ObjectServer

    from mcastdeploy.drivers.sources import HttpRangeReader

    _, data = image
    corrupt = bytearray(data)
    corrupt[5 * GEOMETRY.block_bytes] ^= 1
    gone = serve(BlockServer, image[0])
    gone_port = gone.port
    gone.close()
    with ObjectServer({"/good": data, "/bad": bytes(corrupt)}) as server:
        fetcher = PeerFetcher(SECRET, SID, encrypt=True, geometry=GEOMETRY, wake=lambda: None,
                              batch=8, timeout=2.0)
        fetcher.add_peers([("127.0.0.1", gone_port, 1)])
        fetcher.want(range(GEOMETRY.block_count))
        first = run_fetch(fetcher, data)
        assert first["got"] == {} and first["exhausted"] == (1,)
        fetcher = PeerFetcher(SECRET, SID, encrypt=True, geometry=GEOMETRY, wake=lambda: None,
                              batch=8, timeout=2.0, parallel=1)
        assert fetcher.add_origin([HttpRangeReader(server.url("/bad")),
                                   HttpRangeReader(server.url("/good"))]) == 2
        fetcher.want(range(GEOMETRY.block_count))
        outcome = run_fetch(fetcher, data)
    assert outcome["exhausted"] is None and outcome["rejected"] == 1
    assert b"".join(outcome["got"][b] for b in range(GEOMETRY.block_count)) == data
    # Ranges of whole blocks, never more than a batch: one GET per run, not per block.
    assert all((end - start) <= 8 * GEOMETRY.block_bytes for start, end in server.served)
    assert len(server.served) < GEOMETRY.block_count


def test_exhaustion_is_told_once_however_often_blocks_are_wanted():
    """A straggler learns its manifest in many pieces and wants blocks each time; with no
    peer serving, that is one exhaustion, not one per piece (each would push the driver a
    step further down its order of resort)."""
    fetcher = PeerFetcher(SECRET, SID, encrypt=True, geometry=GEOMETRY, wake=lambda: None)
    for block in range(6):
        fetcher.want([block])
    told = []
    while True:
        try:
            told.append(fetcher.results.get_nowait())
        except queue.Empty:
            break
    assert told == [("exhausted", ())]
    fetcher.add_peers([("127.0.0.1", 9, 5)])  # new peers re-arm it (this one is dead)
    deadline = time.monotonic() + 10
    while ("exhausted", (5,)) not in told:
        assert time.monotonic() < deadline
        try:
            told.append(fetcher.results.get(timeout=0.5))
        except queue.Empty:
            pass
    fetcher.close()


def test_a_connection_without_the_key_holds_a_slot_only_briefly(image):
    """Whoever can connect, without the key, must not keep a seeder's few connection
    slots for the whole idle time (10 s here)."""
    import socket

    from mcastdeploy.drivers.peer_server import HELLO_TIMEOUT

    server = BlockServer(SECRET, SID, encrypt=True, host="127.0.0.1", idle_timeout=10.0)
    server.serve(image[0], GEOMETRY)
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
            started = time.monotonic()
            assert conn.recv(1) == b""  # closed by the server: a hello never came
            assert time.monotonic() - started < HELLO_TIMEOUT + 2
    finally:
        server.close()


@pytest.mark.parametrize("idle", [0.3, 60.0], ids=["parked-first", "seeder-closed-first"])
def test_a_peer_stays_for_blocks_wanted_later_over_a_renewed_connection(image, idle):
    """A straggler learns the manifest in pieces: blocks become wanted after the fetcher
    ran dry, here after longer than the seeder keeps an idle connection. The same peer
    serves them, never counted as failed: the worker parks before the seeder closes its
    connection, or (``idle`` longer than the seeder's timeout) asks again over a new one."""
    path, data = image
    server = serve(BlockServer, path, idle_timeout=0.5)
    half = GEOMETRY.block_count // 2
    try:
        fetcher = PeerFetcher(SECRET, SID, encrypt=True, geometry=GEOMETRY, wake=lambda: None,
                              batch=4, timeout=5.0, idle=idle)
        fetcher.add_peers([("127.0.0.1", server.port, 1)])
        got: dict[int, bytes] = {}
        for wanted, pause in ((range(half), 0.0), (range(half, half + 4), 1.0),
                              (range(half + 4, GEOMETRY.block_count), 0.0)):
            time.sleep(pause)  # longer than the server keeps an idle connection
            fetcher.want(wanted)
            until = time.monotonic() + 20.0
            while not set(wanted) <= got.keys():
                assert time.monotonic() < until, f"only {len(got)} blocks in time"
                try:
                    item = fetcher.results.get(timeout=0.5)
                except queue.Empty:
                    continue
                assert item[0] not in ("failed", "exhausted"), item
                peer, block, blob = item
                got[block] = blob
                fetcher.accepted(block)
        fetcher.close()
    finally:
        server.close()
    assert b"".join(got[b] for b in range(GEOMETRY.block_count)) == data
    assert fetcher.failed_origins == ()
    assert server.connections_served >= 2  # the idle one went; a new one served the rest


def test_a_parked_peer_found_lying_is_not_asked_again(image):
    """The loop rejects a block of a peer that has already parked (out of work): the peer
    is dropped for good, not started again from the spares."""
    path, data = image
    liar = serve(LyingServer, path)
    try:
        fetcher = PeerFetcher(SECRET, SID, encrypt=True, geometry=GEOMETRY, wake=lambda: None,
                              batch=4, timeout=5.0, idle=0.05)
        fetcher.add_peers([("127.0.0.1", liar.port, 9)])
        fetcher.want(range(4))
        items = [fetcher.results.get(timeout=5) for _ in range(4)]
        until = time.monotonic() + 5
        while fetcher._active:  # noqa: SLF001 - parked: its worker has ended
            assert time.monotonic() < until
            time.sleep(0.05)
        peer, block, _ = items[0]
        fetcher.rejected(peer, block)
        time.sleep(0.5)
        assert fetcher.peers_left == 0 and fetcher.idle
        assert liar.connections_served == 1
        assert fetcher.results.get(timeout=5)[0] == "failed"
        assert fetcher.results.get(timeout=5) == ("exhausted", (9,))
        fetcher.close()
    finally:
        liar.close()


class SlowLyingServer(LyingServer):
    def _read(self, image, block):  # type: ignore[override]
        time.sleep(1.0)
        return super()._read(image, block)


def test_a_peer_waiting_on_anothers_blocks_is_not_dropped_by_its_idle_seeder(image):
    """The honest peer has nothing to ask while a slow liar holds the last blocks; when the
    liar is dropped those blocks come back to it, after longer than its seeder keeps an
    idle connection: it asks over a new one instead of failing."""
    path, data = image
    honest, liar = serve(BlockServer, path, idle_timeout=0.5), serve(SlowLyingServer, path)
    try:
        fetcher, outcome = fetch_all(data, [honest.port, liar.port], batch=4, timeout=5.0,
                                     idle=0.3)
    finally:
        honest.close()
        liar.close()
    assert outcome["exhausted"] is None and outcome["rejected"] == 1
    assert b"".join(outcome["got"][b] for b in range(GEOMETRY.block_count)) == data
    assert fetcher.failed_origins == (2,)
