"""A straggler's fetcher: missing blocks from several peers in parallel, with failover.

One thread per peer connection (at most ``parallel`` at once; further peers wait as
spares).  Each takes the next run of wanted blocks, asks for it (protocol/peering.py),
and passes every block that arrives to the receiver's event loop through ``results``,
waking it with ``wake``.  Nothing is written here: the loop thread checks each block
against the manifest (Receiver.offer_block) and reports a bad one with :meth:`rejected`,
which drops that peer and wants the block again from another.

A peer that cannot be reached, stalls for ``timeout`` seconds, breaks the protocol or
closes the connection gives its unfinished blocks back to the others.  When no peer is
left while blocks are still wanted, ``("exhausted", failed origins)`` goes into
``results`` once: the driver then asks the tracker for more peers or turns to the source.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import secrets
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Union

from mcastdeploy.drivers.peer_server import IDLE_TIMEOUT
from mcastdeploy.drivers.sources.errors import ReadError
from mcastdeploy.drivers.sources.reader import RangeReader
from mcastdeploy.protocol.geometry import ImageGeometry
from mcastdeploy.protocol.peering import (MAX_REQUEST_BLOCKS, NONCE_BYTES, BlockReceived,
                                          NotHeld, PeerClient, PeerError)
from mcastdeploy.protocol.receiver import UnicastServer

log = logging.getLogger(__name__)

RECV_BYTES = 1 << 18
#: Blocks arrived but not yet taken by the loop thread, at most: a loop busy with the
#: multicast must not make the fetcher buffer the image in memory.
MAX_QUEUED = 64
#: A worker with nothing to ask for this long closes its connection and waits among the
#: spares: well inside a seeder's idle timeout, before it closes the connection under us
#: (a request on one it did close is sent again once, over a new connection).
IDLE_PARK = IDLE_TIMEOUT / 2


@dataclass(eq=False)
class Peer:
    host: str
    port: int
    origin: int
    #: The sender's own block server, or the image's origin: the last resorts.
    source: bool = False
    #: The image's origin (Swift, HTTP): ranged GETs instead of the peer stream.
    reader: Optional[RangeReader] = None
    failed: bool = False
    bytes_received: int = 0
    blocks: list[int] = field(default_factory=list)  # in flight on this peer

    @property
    def server(self) -> UnicastServer:
        if self.reader is not None:
            return UnicastServer.ORIGIN
        return UnicastServer.SOURCE if self.source else UnicastServer.PEER

    def __str__(self) -> str:
        if self.reader is not None:
            return f"origin {self.reader.name}"
        return f"{'source' if self.source else 'peer'} {self.host}:{self.port}"


#: (peer, block, data) for a block that arrived, ("failed", (origin,)) when a peer is
#: dropped, or ("exhausted", failed origins) when none is left.
Result = Union[tuple[Peer, int, bytes], tuple[str, tuple[int, ...]]]


class _StaleConnection(OSError):
    """The peer closed the connection before answering a request."""


class PeerFetcher:
    def __init__(self, secret: bytes, session_id: int, *, encrypt: bool,
                 geometry: ImageGeometry, wake: Callable[[], None], parallel: int = 4,
                 batch: int = 16, timeout: float = 5.0, idle: float = IDLE_PARK) -> None:
        self._secret = secret
        self._session_id = session_id
        self._encrypt = encrypt
        self._geometry = geometry
        self._wake = wake
        self._parallel = parallel
        self._batch = min(batch, MAX_REQUEST_BLOCKS)
        self._timeout = timeout
        self._idle = idle
        self._lock = threading.Condition()
        self._pending: deque[int] = deque()
        self._wanted: set[int] = set()  # pending or in flight, not yet accepted
        self._spares: deque[Peer] = deque()
        self._active: list[Peer] = []
        self._known: set[tuple[str, int]] = set()
        self._failed: list[int] = []
        self._exhausted_told = False
        self._closed = False
        self.results: "queue.SimpleQueue[Result]" = queue.SimpleQueue()
        self._slots = threading.Semaphore(MAX_QUEUED)

    # -- what the loop thread calls ----------------------------------------------------------

    def want(self, blocks: Iterable[int]) -> None:
        """Blocks to fetch (those already wanted are ignored)."""
        with self._lock:
            added = False
            for block in blocks:
                if block not in self._wanted:
                    self._wanted.add(block)
                    self._pending.append(block)
                    added = True
            if added:
                self._lock.notify_all()
            # Not re-armed here: blocks wanted while no peer serves are the same
            # exhaustion, already told; new peers (add_peers, add_origin) re-arm it.
            self._start_workers()
            self._check_exhausted()

    def add_peers(self, peers: Iterable[tuple[str, int, int]], *, source: bool = False) -> int:
        """Peers to fetch from, (host, port, origin); those seen before are ignored.
        Returns how many are new."""
        new = 0
        with self._lock:
            for host, port, origin in peers:
                if (host, port) in self._known:
                    continue
                self._known.add((host, port))
                self._spares.append(Peer(host, port, origin, source=source))
                new += 1
            if new:
                self._exhausted_told = False
            self._start_workers()
        return new

    def add_origin(self, readers: Iterable[RangeReader]) -> int:
        """The image's origin copies (raw bytes, e.g. the URLs Ironic gave), fetched by
        ranged GET like peers; those seen before are ignored. Returns how many are new."""
        new = 0
        with self._lock:
            for reader in readers:
                if ("origin", reader.name) in self._known:
                    continue
                self._known.add(("origin", reader.name))
                self._spares.append(Peer(reader.name, 0, 0, source=True, reader=reader))
                new += 1
            if new:
                self._exhausted_told = False
            self._start_workers()
        return new

    def accepted(self, block: int) -> None:
        """The receiver took ``block`` (verified, or no longer needed)."""
        self._slots.release()
        with self._lock:
            self._wanted.discard(block)

    def rejected(self, peer: Peer, block: int) -> None:
        """``block`` from ``peer`` did not match the manifest: drop the peer, want the
        block again from another."""
        self._slots.release()
        with self._lock:
            if not peer.failed:
                log.warning("%s served a block that does not match the manifest; dropped",
                            peer)
                self._fail(peer)
            if block in self._wanted and block not in peer.blocks:
                self._pending.appendleft(block)
            self._lock.notify_all()
            self._start_workers()
            self._check_exhausted()

    @property
    def outstanding(self) -> int:
        with self._lock:
            return len(self._wanted)

    @property
    def peers_left(self) -> int:
        """Peers fetching or waiting to."""
        with self._lock:
            return len(self._active) + len(self._spares)

    @property
    def idle(self) -> bool:
        """No peer is fetching or waiting to."""
        with self._lock:
            return not self._active and not self._spares

    @property
    def failed_origins(self) -> tuple[int, ...]:
        with self._lock:
            return tuple(self._failed)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()

    # -- workers ------------------------------------------------------------------------------

    def _start_workers(self) -> None:
        """(lock held) Put spares to work while there is room and work."""
        while self._spares and len(self._active) < self._parallel and self._pending \
                and not self._closed:
            peer = self._spares.popleft()
            if peer.failed:
                continue
            self._active.append(peer)
            threading.Thread(target=self._work, args=(peer,), daemon=True,
                             name=f"fetch-{peer.host}").start()

    def _fail(self, peer: Peer) -> None:
        """(lock held) ``peer`` is done for: its blocks in flight go back to the others."""
        peer.failed = True
        if peer in self._spares:  # parked with blocks still queued, one of them rejected
            self._spares.remove(peer)
        if peer.origin not in self._failed:
            self._failed.append(peer.origin)
            self.results.put(("failed", (peer.origin,)))
            self._wake()
        for block in reversed(peer.blocks):
            if block in self._wanted:
                self._pending.appendleft(block)
        peer.blocks.clear()

    def _check_exhausted(self) -> None:
        """(lock held) Tell the loop once when blocks are wanted and no peer is left."""
        if self._pending and not self._active and not self._spares \
                and not self._exhausted_told and not self._closed:
            self._exhausted_told = True
            self.results.put(("exhausted", tuple(self._failed)))
            self._wake()

    def _take(self, peer: Peer) -> list[int]:
        """(lock held) The next run of consecutive wanted blocks, up to a batch."""
        run: list[int] = []
        while self._pending and len(run) < self._batch:
            block = self._pending[0]
            if block not in self._wanted:
                self._pending.popleft()
                continue
            if run and block != run[-1] + 1:
                break
            run.append(self._pending.popleft())
        peer.blocks = list(run)
        return run

    def _work(self, peer: Peer) -> None:
        try:
            self._fetch_from(peer)
        except (OSError, PeerError, ReadError) as error:
            log.warning("%s failed: %s", peer, error)
            with self._lock:
                self._fail(peer)
        finally:
            with self._lock:
                if peer in self._active:
                    self._active.remove(peer)
                    if not peer.failed and not self._closed:
                        # Ran out of work: it serves again when blocks are wanted later
                        # (hashes learned since), over a new connection.
                        self._spares.append(peer)
                self._start_workers()
                self._check_exhausted()
                self._lock.notify_all()

    def _fetch_from(self, peer: Peer) -> None:
        if peer.reader is not None:
            self._fetch_ranges(peer, peer.reader)
            return
        conn: Optional[socket.socket] = None
        try:
            while run := self._next_run(peer):
                for retry in (False, True):
                    if conn is None:
                        conn, channel, reused = self._connect(peer), self._channel(), False
                    try:
                        channel.request(run[0], len(run))
                        conn.sendall(channel.data_to_send())
                        self._receive_run(peer, channel, conn, set(run))
                        reused = True
                        break
                    except (_StaleConnection, BrokenPipeError, ConnectionResetError):
                        # The seeder let a connection we held idle go (its idle timeout,
                        # or a restart) before answering: once, over a new one.
                        conn.close()
                        conn = None
                        if retry or not reused:
                            raise
        finally:
            if conn is not None:
                conn.close()

    def _connect(self, peer: Peer) -> socket.socket:
        conn = socket.create_connection((peer.host, peer.port), timeout=self._timeout)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def _channel(self) -> PeerClient:
        return PeerClient(self._secret, self._session_id, secrets.token_bytes(NONCE_BYTES),
                          encrypt=self._encrypt, block_bytes=self._geometry.block_bytes)

    def _next_run(self, peer: Peer) -> list[int]:
        """The next run of blocks for ``peer``; [] when it should stop: dropped, closed,
        or nothing to ask for ``idle`` seconds (blocks may be wanted again meanwhile, as
        hashes arrive, or come back from a failed peer)."""
        with self._lock:
            while True:
                park_at = time.monotonic() + self._idle
                while not self._pending and not peer.failed and not self._closed:
                    left = park_at - time.monotonic()
                    if left <= 0:
                        break
                    self._lock.wait(min(0.5, left))
                if peer.failed or self._closed or not self._pending:
                    return []
                run = self._take(peer)
                if run:
                    return run

    def _fetch_ranges(self, peer: Peer, reader: RangeReader) -> None:
        """Runs of blocks as one ranged GET each from the origin; cut into blocks here,
        checked by the loop thread like any peer's."""
        geometry = self._geometry
        while run := self._next_run(peer):
            start = geometry.offset(run[0])
            end = geometry.offset(run[-1]) + geometry.block_length(run[-1])
            with contextlib.closing(reader.read_range(start, end)) as chunks:  # type: ignore[type-var]
                if not self._cut_into_blocks(peer, chunks, run):
                    return

    def _cut_into_blocks(self, peer: Peer, chunks: Iterable[bytes], run: list[int]) -> bool:
        geometry = self._geometry
        pending = bytearray()
        block = run[0]
        for chunk in chunks:
            pending += chunk
            while block <= run[-1] and len(pending) >= geometry.block_length(block):
                length = geometry.block_length(block)
                data = bytes(pending[:length])
                del pending[:length]
                peer.bytes_received += length
                if not self._deliver(peer, block, data):
                    return False
                block += 1
        return True

    def _receive_run(self, peer: Peer, channel: PeerClient, conn: socket.socket,
                     waiting: set[int]) -> None:
        answered = False
        while waiting:
            try:
                data = conn.recv(RECV_BYTES)
            except ConnectionResetError:
                data = b""
            if not data:
                raise (OSError if answered else _StaleConnection)(
                    "the peer closed the connection")
            answered = True
            channel.receive_data(data)
            while (event := channel.next_event()) is not None:
                if isinstance(event, BlockReceived):
                    if event.block not in waiting:
                        raise PeerError(f"block {event.block} was not asked for")
                    waiting.discard(event.block)
                    peer.bytes_received += len(event.data)
                    if not self._deliver(peer, event.block, event.data):
                        return
                elif isinstance(event, NotHeld):
                    # A seeder holds the whole image; one that does not is no use to us.
                    raise PeerError(f"blocks {event.first}+{event.count} not held")
            out = channel.data_to_send()
            if out:
                conn.sendall(out)

    def _deliver(self, peer: Peer, block: int, data: bytes) -> bool:
        """Queue ``block`` for the loop thread (waiting for room); False when ``peer``
        should stop (dropped, or the fetcher closed)."""
        while not self._slots.acquire(timeout=0.5):
            if self._closed:
                return False
        with self._lock:
            if peer.failed:
                self._slots.release()
                return False
            peer.blocks.remove(block)
        self.results.put((peer, block, data))
        self._wake()
        return True
