"""A block server: serves the blocks a node holds to stragglers over TCP.

Receivers that seed run one on their target (serving only blocks already verified and
written); the sender runs one on its image, the last resort.  The byte protocol is
protocol/peering.py; this module only moves its bytes between sockets and the file.

Threads, not the event loop: a seeder's loop is busy receiving the multicast, and a slow
or stalled straggler must not hold it up.  Each connection is bounded: ``max_connections``
at once (more are closed at once: the tracker spreads stragglers, and a straggler fails
over), and one idle for ``idle_timeout`` is closed.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
from typing import NamedTuple, Optional

from mcastdeploy.protocol.geometry import ImageGeometry
from mcastdeploy.protocol.peering import NONCE_BYTES, BlocksRequested, PeerError, PeerServer

log = logging.getLogger(__name__)

RECV_BYTES = 65536
#: Seconds a connection may take to show the session key (its hello).
HELLO_TIMEOUT = 2.0
#: Seconds a connection may sit without a request before it is closed (its slot freed).
IDLE_TIMEOUT = 10.0


class BlockServer:
    """Listens at once (so that the port can be reported); serves once ``serve`` says what."""

    def __init__(self, secret: bytes, session_id: int, *, encrypt: bool, host: str = "0.0.0.0",
                 port: int = 0, max_connections: int = 8,
                 idle_timeout: float = IDLE_TIMEOUT) -> None:
        self._secret = secret
        self._session_id = session_id
        self._encrypt = encrypt
        self._max_connections = max_connections
        self._idle_timeout = idle_timeout
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._listener.bind((host, port))
        except OSError:
            self._listener.close()
            raise
        self._listener.listen(32)
        self._listener.settimeout(0.25)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._fd: Optional[int] = None
        self._geometry: Optional[ImageGeometry] = None
        self._held: Optional[bytearray] = None
        self._connections: set[socket.socket] = set()
        self._closed = threading.Event()
        #: Bytes of blocks sent, and connections served (for summaries).
        self.bytes_served = 0
        self.connections_served = 0
        self._thread = threading.Thread(target=self._accept_loop, name="block-server",
                                        daemon=True)
        self._thread.start()

    def serve(self, source: str | int, geometry: ImageGeometry,
              held: Optional[bytearray] = None) -> None:
        """Serve blocks of ``source`` (a path, or an open file descriptor, duplicated)
        laid out as ``geometry``: those marked in ``held`` (a byte per block, set by the
        caller once a block is verified on disk), or all."""
        fd = (os.dup(source) if isinstance(source, int)
              else os.open(source, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)))
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
            self._fd, self._geometry, self._held = fd, geometry, held

    def close(self) -> None:
        self._closed.set()
        self._thread.join(2.0)
        self._listener.close()
        with self._lock:
            for conn in list(self._connections):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> "BlockServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self._lock:
                busy = (len(self._connections) >= self._max_connections
                        or self._geometry is None)
                if not busy:
                    self._connections.add(conn)
            if busy:
                conn.close()
                continue
            threading.Thread(target=self._serve_connection, args=(conn,), daemon=True,
                             name="block-server-conn").start()

    def _snapshot(self) -> Optional["_Image"]:
        """What this connection serves, its own descriptor included, so that a later
        ``serve`` or ``close`` never pulls a file from under a running answer (a closed
        descriptor's number may already name another file)."""
        with self._lock:
            if self._fd is None or self._geometry is None:
                return None
            return _Image(os.dup(self._fd), self._geometry, self._held)

    def _serve_connection(self, conn: socket.socket) -> None:
        image = self._snapshot()
        try:
            if image is not None:
                self._converse(conn, image)
        except (OSError, PeerError) as error:
            log.debug("peer connection ended: %s", error)
        finally:
            if image is not None:
                os.close(image.fd)
            with self._lock:
                self._connections.discard(conn)
                self.connections_served += 1
            conn.close()

    def _converse(self, conn: socket.socket, image: "_Image") -> None:
        channel = PeerServer(self._secret, self._session_id, secrets.token_bytes(NONCE_BYTES),
                             encrypt=self._encrypt, block_bytes=image.geometry.block_bytes)
        # Until the peer has shown the key (its hello), a slot is held briefly: whoever
        # can connect must not keep seeders busy for nobody.
        conn.settimeout(min(HELLO_TIMEOUT, self._idle_timeout))
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while not self._closed.is_set():
            data = conn.recv(RECV_BYTES)
            channel.receive_data(data)
            if not data:
                return
            if channel.established:
                conn.settimeout(self._idle_timeout)
            while (event := channel.next_event()) is not None:
                if isinstance(event, BlocksRequested):
                    self._answer(conn, channel, image, event)
            out = channel.data_to_send()
            if out:
                conn.sendall(out)

    def _answer(self, conn: socket.socket, channel: PeerServer, image: "_Image",
                request: BlocksRequested) -> None:
        """BLOCK for each requested block we hold, NOT_HELD for the others; each block
        leaves as soon as it is sealed, so a request never holds its blocks in memory."""
        geometry = image.geometry
        missing_from: Optional[int] = None
        stop = request.first + request.count
        for block in range(request.first, stop):
            held = block < geometry.block_count and (image.held is None or image.held[block])
            if held:
                if missing_from is not None:
                    channel.send_not_held(missing_from, block - missing_from)
                    missing_from = None
                data = self._read(image, block)
                channel.send_block(block, data)
                conn.sendall(channel.data_to_send())
                with self._lock:
                    self.bytes_served += len(data)
            elif missing_from is None:
                missing_from = block
        if missing_from is not None:
            channel.send_not_held(missing_from, stop - missing_from)
        conn.sendall(channel.data_to_send())

    def _read(self, image: "_Image", block: int) -> bytes:
        geometry = image.geometry
        length = geometry.block_length(block)
        data = os.pread(image.fd, length, geometry.offset(block))
        if len(data) != length:
            raise OSError(f"short read of block {block}")
        return data


class _Image(NamedTuple):
    """One connection's view of what is served: its own descriptor of the image."""

    fd: int
    geometry: ImageGeometry
    held: Optional[bytearray]
