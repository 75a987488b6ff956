"""What the protocol objects report to their drivers: one small dataclass per happening."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from mcastdeploy.protocol.geometry import ImageGeometry


@dataclass(frozen=True)
class ReceiverJoined:
    """The sender heard from a receiver it did not know."""

    receiver_id: int
    address: tuple


@dataclass(frozen=True)
class ReceiverDone:
    """A receiver reported the whole image received and verified."""

    receiver_id: int
    checksum_ok: bool


@dataclass(frozen=True)
class TransferStarted:
    """The sender stopped gathering receivers and began the data pass."""

    receivers: int


@dataclass(frozen=True)
class PassComplete:
    """Every block has been multicast once; from now on only repair is sent."""


@dataclass(frozen=True)
class SessionEnded:
    """The sender is done: every known receiver finished, or nobody asked for ``linger``."""

    reason: str
    receivers_known: int
    receivers_done: int


@dataclass(frozen=True)
class SessionJoined:
    """The receiver learned the session's parameters from an ANNOUNCE."""

    geometry: ImageGeometry
    sender_id: int


@dataclass(frozen=True)
class BlockDecoded:
    """A block is complete: ``data`` belongs at byte ``offset`` of the target."""

    block: int
    offset: int
    data: memoryview = field(repr=False)


@dataclass(frozen=True)
class BlockIsZero:
    """Block ``block`` is all zeros (the manifest says so): make ``length`` bytes at
    ``offset`` zero on the target, as cheaply as it allows; nothing will be received."""

    block: int
    offset: int
    length: int


@dataclass(frozen=True)
class HashesLearned:
    """The manifest now vouches for ``blocks``: a resuming driver may check the target."""

    blocks: range


@dataclass(frozen=True)
class AllBlocksDecoded:
    """Every block has been handed over; the driver must now check the image's SHA-256."""


@dataclass(frozen=True)
class TransferComplete:
    """The image is complete and its SHA-256 matched the sender's."""

    checksum: bytes


@dataclass(frozen=True)
class TransferFailed:
    """The receiver gave up; ``reason`` is one line for the user."""

    reason: str


@dataclass(frozen=True)
class PeersOffered:
    """This receiver is a straggler (``reason``) and the sender named where to fetch:
    ``peers`` (seeders), and ``source`` (the sender's own block server, host and port;
    None if it has none), the last resort.  Both empty: fetch by multicast repair."""

    reason: str
    peers: tuple
    source: Optional[tuple]


@dataclass(frozen=True)
class SessionOver:
    """(receiver, after it finished) The sender ended the session: stop seeding."""


Event = Union[ReceiverJoined, ReceiverDone, TransferStarted, PassComplete, SessionEnded,
              SessionJoined, BlockDecoded, BlockIsZero, HashesLearned, AllBlocksDecoded,
              TransferComplete, TransferFailed, PeersOffered, SessionOver]
