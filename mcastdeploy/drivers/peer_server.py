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
from typing import Optional

from mcastdeploy.protocol.geometry import ImageGeometry
from mcastdeploy.protocol.peering import NONCE_BYTES, BlocksRequested, PeerError, PeerServer

log = logging.getLogger(__name__)

RECV_BYTES = 65536


class BlockServer:
    """Listens at once (so that the port can be reported); serves once ``serve`` says what."""

    def __init__(self, secret: bytes, session_id: int, *, encrypt: bool, host: str = "0.0.0.0",
                 port: int = 0, max_connections: int = 8, idle_timeout: float = 10.0) -> None:
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

    def _serve_connection(self, conn: socket.socket) -> None:
        geometry = self._geometry
        assert geometry is not None
        channel = PeerServer(self._secret, self._session_id, secrets.token_bytes(NONCE_BYTES),
                             encrypt=self._encrypt, block_bytes=geometry.block_bytes)
        conn.settimeout(self._idle_timeout)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while not self._closed.is_set():
                data = conn.recv(RECV_BYTES)
                channel.receive_data(data)
                if not data:
                    return
                while (event := channel.next_event()) is not None:
                    if isinstance(event, BlocksRequested):
                        self._answer(channel, geometry, event)
                        conn.sendall(channel.data_to_send())
                out = channel.data_to_send()
                if out:
                    conn.sendall(out)
        except (OSError, PeerError) as error:
            log.debug("peer connection ended: %s", error)
        finally:
            with self._lock:
                self._connections.discard(conn)
                self.connections_served += 1
            conn.close()

    def _answer(self, channel: PeerServer, geometry: ImageGeometry,
                request: BlocksRequested) -> None:
        """BLOCK for each requested block we hold, NOT_HELD for the others."""
        missing_from: Optional[int] = None
        stop = request.first + request.count
        for block in range(request.first, stop):
            held = block < geometry.block_count and (self._held is None or self._held[block])
            if held:
                if missing_from is not None:
                    channel.send_not_held(missing_from, block - missing_from)
                    missing_from = None
                data = self._read(geometry, block)
                channel.send_block(block, data)
                with self._lock:
                    self.bytes_served += len(data)
            elif missing_from is None:
                missing_from = block
        if missing_from is not None:
            channel.send_not_held(missing_from, stop - missing_from)

    def _read(self, geometry: ImageGeometry, block: int) -> bytes:
        fd = self._fd
        assert fd is not None
        length = geometry.block_length(block)
        data = os.pread(fd, length, geometry.offset(block))
        if len(data) != length:
            raise OSError(f"short read of block {block}")
        return data
