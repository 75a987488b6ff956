"""Admission of arriving datagrams, and protection of leaving ones, for sender and receiver.

Everything from the network passes here first, so that the rules for what is even looked
at live in one place: well formed header, our session, authentic and fresh (wire/seal.py),
and only then a parsed body.
"""

from __future__ import annotations

from typing import Optional, Protocol, Union

from mcastdeploy import wire
from mcastdeploy.wire.seal import (OVERHEAD, AuthError, Opener, ReplayError, Sealer,
                                   session_cipher)


class IntakeCounters(Protocol):
    invalid_packets: int
    foreign_packets: int
    unauthentic_packets: int
    replayed_packets: int


class Protection:
    """One endpoint's use of the session key: seal what it sends, open what it receives."""

    def __init__(self, secret: bytes, session_id: int, origin: int, *,
                 encrypt: bool = False) -> None:
        cipher = session_cipher(secret, session_id)
        #: seal(datagram, payload=b""): ``datagram + payload`` sealed.  The sealer's own
        #: method, not a wrapper: it runs once per packet sent.
        self.seal = Sealer(cipher, origin, encrypt=encrypt).seal
        self.opener = Opener(cipher, encrypt=encrypt)


def protection_for(secret: Optional[bytes], session_id: int, origin: int,
                   encrypt: bool) -> Optional[Protection]:
    """The endpoint's protection, or None where a test or the simulator runs without a key."""
    if secret is None:
        return None
    return Protection(secret, session_id, origin, encrypt=encrypt)


def overhead(protection: Optional[Protection]) -> int:
    """Bytes protection adds to every datagram (for pacing and timing estimates)."""
    return OVERHEAD if protection is not None else 0


def rejected(counters: IntakeCounters) -> dict[str, int]:
    """What admission refused, by reason: for summaries, where an attack shows up."""
    return {"invalid": counters.invalid_packets, "foreign": counters.foreign_packets,
            "unauthentic": counters.unauthentic_packets, "replayed": counters.replayed_packets}


def admit(data: Union[bytes, memoryview], session_id: int, counters: IntakeCounters,
          protection: Optional[Protection] = None) -> Optional[wire.Packet]:
    """The parsed packet if it is well formed, of our session, authentic and fresh; else
    count why not and return None.  Nothing but the fixed header is read before the tag
    has been checked."""
    try:
        header = wire.parse_header(data)
    except wire.WireError:
        counters.invalid_packets += 1
        return None
    if header.session_id != session_id:
        counters.foreign_packets += 1
        return None
    if protection is None:
        body: Union[bytes, memoryview] = memoryview(data)[wire.HEADER_SIZE:]
    else:
        try:
            body = protection.opener.open_body(data)
        except ReplayError:
            counters.replayed_packets += 1
            return None
        except AuthError:
            counters.unauthentic_packets += 1
            return None
    try:
        return wire.parse_body(header, body)
    except wire.WireError:
        counters.invalid_packets += 1
        return None
