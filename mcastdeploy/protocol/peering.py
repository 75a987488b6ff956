"""The block exchange between a straggler and a seeder, over one byte stream (TCP).

Sans-IO, as h11 is for HTTP: a :class:`PeerClient` (the straggler) and a
:class:`PeerServer` (the seeder) take the bytes that arrived (``receive_data``), say what
to send (``data_to_send``), and report what happened (``next_event``).  Sockets, threads
and the disk are the drivers' (drivers/peer_server.py, drivers/peer_fetch.py).

The stream::

    client -> server   HELLO  "MDPEER01", session id (8), client nonce (16)
    server -> client   HELLO  "MDPEER01", session id (8), server nonce (16)
    then frames, both ways:  length (4) | type (1) | body | tag (16)

Why so:

* **A key per connection.**  Both nonces are fresh random bytes, and the frame key is
  HKDF-SHA256 of the session secret salted with both: a recorded stream does not open
  under the next connection's key, so it cannot be replayed to a seeder or a straggler,
  and the counters can start at zero.  Each direction has its own nonce prefix.
* **Every frame sealed** (AES-GCM, as packets are: wire/seal.py): length and type are
  authenticated; the body is encrypted when the spec says ``encrypt``, authenticated in
  the clear otherwise.  A frame that does not open ends the connection
  (:class:`PeerError`); nothing of it is reported.
* **Nothing taken on trust from a seeder.**  Anyone holding the spec holds the key, so a
  frame that opens proves only membership of the session.  The straggler's driver checks
  every block against the sender's manifest (protocol/manifest.py) before it is written;
  a block that does not match drops the peer.
* **Bounded.**  A frame longer than the largest block (plus framing) is refused before it
  is buffered; a request names at most ``MAX_REQUEST_BLOCKS`` blocks.

Frames: REQUEST (client): first block, count.  BLOCK (server): block number and its
bytes.  NOT_HELD (server): first block, count: the seeder does not hold them.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import Optional, Union

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MAGIC = b"MDPEER01"
NONCE_BYTES = 16
HELLO = struct.Struct(f"!8sQ{NONCE_BYTES}s")
FRAME_HEAD = struct.Struct("!IB")
TAG_BYTES = 16
RANGE = struct.Struct("!IH")
BLOCK_NUMBER = struct.Struct("!I")
#: Blocks one REQUEST may name: a fetcher keeps a few in flight per peer, no more.
MAX_REQUEST_BLOCKS = 64
_NONCE = struct.Struct("!IQ")
_CLIENT_TO_SERVER = 0
_SERVER_TO_CLIENT = 1
_HKDF_INFO = b"mcastdeploy v1 peer stream"


class PeerError(Exception):
    """The other end broke the protocol: bad hello, a frame that does not open, a frame
    too long or malformed.  The connection must be dropped."""


class FrameType(enum.IntEnum):
    REQUEST = 1
    BLOCK = 2
    NOT_HELD = 3


@dataclass(frozen=True)
class BlocksRequested:
    """(server) The straggler asks for blocks ``first`` .. ``first + count - 1``."""

    first: int
    count: int


@dataclass(frozen=True)
class BlockReceived:
    """(client) The seeder sent ``block``; still to be checked against the manifest."""

    block: int
    data: bytes = field(repr=False)


@dataclass(frozen=True)
class NotHeld:
    """(client) The seeder does not hold blocks ``first`` .. ``first + count - 1``."""

    first: int
    count: int


PeerEvent = Union[BlocksRequested, BlockReceived, NotHeld]


def stream_key(secret: bytes, session_id: int, client_nonce: bytes,
               server_nonce: bytes) -> bytes:
    """The frame key of one connection: the session secret, salted with both nonces."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=client_nonce + server_nonce,
                info=_HKDF_INFO + struct.pack("!Q", session_id)).derive(secret)


class _Channel:
    """What both ends share: the hello exchange, sealing and opening frames."""

    _sends = _CLIENT_TO_SERVER
    _accepts: tuple[FrameType, ...] = ()

    def __init__(self, secret: bytes, session_id: int, nonce: bytes, *, encrypt: bool,
                 max_body: int) -> None:
        if len(nonce) != NONCE_BYTES:
            raise ValueError(f"a nonce is {NONCE_BYTES} bytes")
        self._secret = secret
        self._session_id = session_id
        self._nonce = nonce
        self._encrypt = encrypt
        self._max_frame = max_body + TAG_BYTES
        self._aead: Optional[AESGCM] = None
        self._out = bytearray()
        self._in = bytearray()
        self._events: list[PeerEvent] = []
        self._send_counter = 0
        self._receive_counter = 0
        self.closed = False

    @property
    def established(self) -> bool:
        """Both hellos exchanged: frames can flow."""
        return self._aead is not None

    def data_to_send(self) -> bytes:
        out, self._out = bytes(self._out), bytearray()
        return out

    def next_event(self) -> Optional[PeerEvent]:
        return self._events.pop(0) if self._events else None

    def receive_data(self, data: bytes) -> None:
        """Bytes from the stream (b"" at its end).  Raises PeerError on a broken stream."""
        if self.closed:
            return
        if not data:
            self.closed = True
            return
        self._in += data
        if self._aead is None:
            if len(self._in) < HELLO.size:
                return
            self._on_hello(bytes(self._in[:HELLO.size]))
            del self._in[:HELLO.size]
        while len(self._in) >= FRAME_HEAD.size:
            length, kind = FRAME_HEAD.unpack_from(self._in)
            if length > self._max_frame or length < TAG_BYTES:
                raise PeerError(f"a frame of {length} bytes is out of bounds")
            end = FRAME_HEAD.size + length
            if len(self._in) < end:
                return
            frame = bytes(self._in[:end])
            del self._in[:end]
            self._on_frame(kind, self._open(frame))

    # -- hello and keys -----------------------------------------------------------------

    def _hello(self) -> bytes:
        return HELLO.pack(MAGIC, self._session_id, self._nonce)

    def _parse_hello(self, data: bytes) -> bytes:
        magic, session_id, nonce = HELLO.unpack(data)
        if magic != MAGIC:
            raise PeerError("not an mcastdeploy peer")
        if session_id != self._session_id:
            raise PeerError("a peer of another session")
        if nonce == self._nonce:
            raise PeerError("the peer echoed our nonce")  # a reflection, not a peer
        return nonce

    def _on_hello(self, data: bytes) -> None:
        raise NotImplementedError

    def _key(self, client_nonce: bytes, server_nonce: bytes) -> None:
        self._aead = AESGCM(stream_key(self._secret, self._session_id, client_nonce,
                                       server_nonce))

    # -- frames -------------------------------------------------------------------------

    def _seal(self, kind: FrameType, body: bytes) -> None:
        assert self._aead is not None, "no frames before the hello exchange"
        nonce = _NONCE.pack(self._sends, self._send_counter)
        self._send_counter += 1
        head = FRAME_HEAD.pack(len(body) + TAG_BYTES, kind)
        if self._encrypt:
            self._out += head + self._aead.encrypt(nonce, body, head)
        else:
            self._out += head + body + self._aead.encrypt(nonce, b"", head + body)

    def _open(self, frame: bytes) -> bytes:
        assert self._aead is not None
        nonce = _NONCE.pack(1 - self._sends, self._receive_counter)
        self._receive_counter += 1
        head = frame[:FRAME_HEAD.size]
        try:
            if self._encrypt:
                return self._aead.decrypt(nonce, frame[FRAME_HEAD.size:], head)
            self._aead.decrypt(nonce, frame[-TAG_BYTES:], frame[:-TAG_BYTES])
        except InvalidTag:
            raise PeerError("a frame failed authentication") from None
        return frame[FRAME_HEAD.size:-TAG_BYTES]

    def _on_frame(self, kind: int, body: bytes) -> None:
        if kind not in self._accepts:
            raise PeerError(f"unexpected frame type {kind}")
        self._frame(FrameType(kind), body)

    def _frame(self, kind: FrameType, body: bytes) -> None:
        raise NotImplementedError


def _range(body: bytes, what: str) -> tuple[int, int]:
    if len(body) != RANGE.size:
        raise PeerError(f"{what}: body is {len(body)} bytes")
    first, count = RANGE.unpack(body)
    if not 1 <= count <= MAX_REQUEST_BLOCKS:
        raise PeerError(f"{what}: {count} blocks")
    return first, count


class PeerClient(_Channel):
    """The straggler's end: it speaks first, asks for blocks, gets blocks or NOT_HELD."""

    _sends = _CLIENT_TO_SERVER
    _accepts = (FrameType.BLOCK, FrameType.NOT_HELD)

    def __init__(self, secret: bytes, session_id: int, nonce: bytes, *, encrypt: bool,
                 block_bytes: int) -> None:
        super().__init__(secret, session_id, nonce, encrypt=encrypt,
                         max_body=BLOCK_NUMBER.size + block_bytes)
        self._out += self._hello()
        self._pending: list[tuple[int, int]] = []

    def request(self, first: int, count: int) -> None:
        """Ask for blocks ``first`` .. ``first + count - 1`` (sent once established)."""
        if not 1 <= count <= MAX_REQUEST_BLOCKS:
            raise ValueError(f"a request names 1..{MAX_REQUEST_BLOCKS} blocks")
        if self._aead is None:
            self._pending.append((first, count))
        else:
            self._seal(FrameType.REQUEST, RANGE.pack(first, count))

    def _on_hello(self, data: bytes) -> None:
        self._key(self._nonce, self._parse_hello(data))
        for first, count in self._pending:
            self._seal(FrameType.REQUEST, RANGE.pack(first, count))
        self._pending.clear()

    def _frame(self, kind: FrameType, body: bytes) -> None:
        if kind is FrameType.BLOCK:
            if len(body) <= BLOCK_NUMBER.size:
                raise PeerError("BLOCK: truncated")
            (block,) = BLOCK_NUMBER.unpack_from(body)
            self._events.append(BlockReceived(block, body[BLOCK_NUMBER.size:]))
        else:
            self._events.append(NotHeld(*_range(body, "NOT_HELD")))


class PeerServer(_Channel):
    """The seeder's end: it answers the hello, then each REQUEST with BLOCK / NOT_HELD."""

    _sends = _SERVER_TO_CLIENT
    _accepts = (FrameType.REQUEST,)

    def __init__(self, secret: bytes, session_id: int, nonce: bytes, *, encrypt: bool,
                 block_bytes: int) -> None:
        super().__init__(secret, session_id, nonce, encrypt=encrypt, max_body=RANGE.size)
        self._block_bytes = block_bytes

    def _on_hello(self, data: bytes) -> None:
        client_nonce = self._parse_hello(data)
        self._out += self._hello()
        self._key(client_nonce, self._nonce)

    def _frame(self, kind: FrameType, body: bytes) -> None:
        self._events.append(BlocksRequested(*_range(body, "REQUEST")))

    def send_block(self, block: int, data: bytes | memoryview) -> None:
        if len(data) > self._block_bytes:
            raise ValueError("a block longer than the session's blocks")
        self._seal(FrameType.BLOCK, BLOCK_NUMBER.pack(block) + bytes(data))

    def send_not_held(self, first: int, count: int) -> None:
        self._seal(FrameType.NOT_HELD, RANGE.pack(first, count))
