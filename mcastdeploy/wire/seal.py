"""Packet protection: every datagram authenticated (and optionally encrypted) with AES-GCM.

A sealed datagram is the plain one with a counter after its header and a tag at the end::

    +-------------------+-------------+--------------------------+-----------+
    | header (20 bytes) | counter (8) | body (clear or encrypted) | tag (16)  |
    +-------------------+-------------+--------------------------+-----------+

Header and counter are always associated data; the body is too, or, with ``encrypt``, the
plaintext.  Choices, and why:

* **AES-GCM** from ``cryptography``: about 1.3 µs per 1400-byte packet here (AES-NI),
  against tens of µs of Python per packet elsewhere; ChaCha20-Poly1305 measured twice that.
* **The key is per session.**  The spec's 32-byte secret goes through HKDF-SHA256 with the
  session id as salt, so a secret copied into a second spec still yields a different key.
* **Nonce = origin (4 bytes, from the header) ‖ counter (8 bytes).**  Every process picks a
  random origin per run and starts its counter at a random 64-bit value, then counts up by
  one per packet; a nonce repeats only if two processes draw the same origin *and*
  overlapping counter ranges (about 2^-32 × packets/2^64), so a restarted sender, whose
  origin is new, can never reuse one.  Packets are bound to the session (its id is in the
  header, authenticated, and salts the key) and to the sender's run (its origin is).
* **Replay window** per origin (as in IPsec, RFC 4303 §3.4.3): the highest counter seen and
  a bitmap of the ``WINDOW`` below it.  Multicast on one LAN hardly reorders, so a replayed
  or very late packet is dropped.  Windows exist only for origins that authenticated, so
  nobody without the key can grow the table.

What it does not do: everybody holding the spec holds the key, so a node of the session
can forge packets for the others (a group key, not signatures; see docs/security.rst).
"""

from __future__ import annotations

import secrets
import struct
from typing import Union

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from mcastdeploy.wire.packets import HEADER_SIZE, WireError

KEY_BYTES = 32
COUNTER = struct.Struct("!Q")
TAG_BYTES = 16
#: Bytes a sealed datagram has more than the plain one.
OVERHEAD = COUNTER.size + TAG_BYTES
#: Counters this far below the highest seen from an origin are still accepted once.
WINDOW = 1024
_WINDOW_MASK = (1 << WINDOW) - 1
_ORIGIN = struct.Struct("!I")
#: The nonce: origin ‖ counter, the counter's 8 bytes also going into the datagram.
_NONCE = struct.Struct("!IQ")
_pack_nonce = _NONCE.pack
#: Where the nonce (origin, then counter) and the body lie in a sealed datagram.
_NONCE_AT = HEADER_SIZE - _ORIGIN.size
_BODY_AT = HEADER_SIZE + COUNTER.size
_COUNTER_END = 2**64
_HKDF_INFO = b"mcastdeploy v1 packet key"


class AuthError(WireError):
    """A datagram failed authentication: forged, damaged, of another key, or replayed."""


class ReplayError(AuthError):
    """An authentic datagram seen before (or too old to tell)."""


def new_key() -> bytes:
    """A fresh session secret, for ``mcastdeploy session new``."""
    return secrets.token_bytes(KEY_BYTES)


def session_cipher(secret: bytes, session_id: int) -> AESGCM:
    """The AEAD for one session: HKDF-SHA256 of the spec's secret, salted by the session."""
    if len(secret) != KEY_BYTES:
        raise ValueError(f"a session key is {KEY_BYTES} bytes")
    derived = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES,
                   salt=struct.pack("!Q", session_id), info=_HKDF_INFO).derive(secret)
    return AESGCM(derived)


class Sealer:
    """Seals what one process sends: its own origin, its own counter."""

    def __init__(self, cipher: AESGCM, origin: int, *, encrypt: bool = False,
                 first_counter: int | None = None) -> None:
        self._aead = cipher.encrypt
        self._origin = origin
        self._encrypt = encrypt
        # Random start: two processes that drew the same origin still do not share nonces.
        self._counter = secrets.randbits(63) if first_counter is None else first_counter

    def seal(self, datagram: Union[bytes, memoryview],
             payload: Union[bytes, memoryview] = b"") -> bytes:
        """The plain datagram ``datagram + payload`` (a header and body, as wire.encode
        makes them), sealed.  A sender passes a DATA payload apart, so that its 1400 bytes
        are copied once, straight into what is signed."""
        # Once per packet sent, and the AEAD call is only about half of it
        # (docs/performance-auth.rst): so nonce and counter are packed at once, and what
        # is signed is built once; plain bytes slices and concatenation beat memoryviews,
        # joins, bytearrays and encrypt_into at these sizes.
        if len(datagram) < HEADER_SIZE:
            raise ValueError("a datagram starts with a header")
        counter = self._counter
        if counter >= _COUNTER_END:
            raise OverflowError("packet counter exhausted; start a new session")
        self._counter = counter + 1
        nonce = _pack_nonce(self._origin, counter)
        data = bytes(datagram)  # the very object if already bytes
        head = data[:HEADER_SIZE] + nonce[4:]  # the counter
        if self._encrypt:
            return head + self._aead(nonce, data[HEADER_SIZE:] + payload, head)
        signed = head + data[HEADER_SIZE:] + payload
        return signed + self._aead(nonce, b"", signed)


class ReplayWindow:
    """Which counters of one origin have been accepted (the newest ``WINDOW`` of them)."""

    def __init__(self) -> None:
        self.highest = -1
        self._seen = 0  # bit i: counter highest - i accepted

    def fresh(self, counter: int) -> bool:
        if counter > self.highest:
            return True
        age = self.highest - counter
        return age < WINDOW and not (self._seen >> age) & 1

    def accept(self, counter: int) -> None:
        if counter > self.highest:
            shift = counter - self.highest
            # A jump past the window forgets it: shifting by the jump itself would build
            # an integer of up to 2^64 bits (MemoryError) for one crafted counter.
            self._seen = 1 if shift >= WINDOW else (
                ((self._seen << shift) | 1) & _WINDOW_MASK)
            self.highest = counter
        else:
            self._seen |= 1 << (self.highest - counter)


class Opener:
    """Checks what arrives: authentic, for this key, and not seen before."""

    def __init__(self, cipher: AESGCM, *, encrypt: bool = False) -> None:
        self._aead_open = cipher.decrypt
        self._encrypt = encrypt
        self._windows: dict[int, ReplayWindow] = {}

    def open(self, datagram: Union[bytes, memoryview]) -> bytes:
        """The plain datagram (header and body) if authentic and fresh; else AuthError
        (ReplayError if authentic but seen before)."""
        return bytes(datagram[:HEADER_SIZE]) + self.open_body(datagram)

    def open_body(self, datagram: Union[bytes, memoryview]) -> bytes:
        """As ``open``, but only the body: for a caller that has parsed the header already.

        Only the header's fixed fields are read before the tag is checked.
        """
        if len(datagram) < HEADER_SIZE + OVERHEAD:
            raise AuthError("too short to be sealed")
        # Once per packet received, on every receiver: the nonce is the header's origin
        # and the counter after it, bytes 16..28 as they stand; nothing is copied twice.
        data = bytes(datagram)
        nonce = data[_NONCE_AT:_BODY_AT]
        origin, counter = _NONCE.unpack(nonce)
        try:
            if self._encrypt:
                body = self._aead_open(nonce, data[_BODY_AT:], data[:_BODY_AT])
            else:
                self._aead_open(nonce, data[-TAG_BYTES:], memoryview(data)[:-TAG_BYTES])
                body = data[_BODY_AT:-TAG_BYTES]
        except InvalidTag:
            raise AuthError("authentication failed") from None
        # Only now, so that a forgery is never counted as a replay.
        window = self._windows.get(origin)
        if window is not None and not window.fresh(counter):
            raise ReplayError("replayed or too old")
        if window is None:
            window = self._windows[origin] = ReplayWindow()
        window.accept(counter)
        return body
