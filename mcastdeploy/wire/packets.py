"""The mcastdeploy wire format: every datagram's bytes are defined here and nowhere else.

Every packet starts with one fixed header::

    0      2        3       4       5       8                16          20
    +------+--------+-------+-------+-------+----------------+-----------+
    | "MD" | version| type  | flags |  pad  |   session id   |  origin   |
    +------+--------+-------+-------+-------+----------------+-----------+

``session id`` binds the packet to one deployment session (from the session spec), so a
stray packet of another session on the same group and port is recognised before anything
else is read.  ``origin`` is a random 32-bit id chosen by each process at start: the
sender's run instance (so a restarted sender is told apart from the old one) or a
receiver's node id (so several receivers behind one address are still counted apart).

The body that follows depends on the type.  All integers are big-endian.  :func:`parse`
raises only :class:`WireError`, whatever bytes it is given, because it is the first code to
touch what arrives from the network.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple, Union

MAGIC = b"MD"
VERSION = 1

HEADER = struct.Struct("!2sBBB3xQI")
HEADER_SIZE = HEADER.size  # 20

#: Largest datagram we build or accept; bounds memory per packet and keeps us below the
#: IPv4 UDP payload limit even on loopback (MTU 65536).
MAX_DATAGRAM = 65507

#: Symbol ids are bytes: 0..k-1 are source symbols, k..254 repair symbols (RS over GF(2^8)).
MAX_SYMBOL_ID = 254
MAX_BLOCK_SYMBOLS = 254


class WireError(ValueError):
    """A datagram is not a well-formed mcastdeploy packet."""


class PacketType(enum.IntEnum):
    ANNOUNCE = 1  # sender -> group: session parameters and progress
    DATA = 2  # sender -> group: one source or repair symbol
    NACK = 3  # receiver -> sender (unicast): symbols still needed, per block
    STATUS = 4  # receiver -> sender (unicast): progress and loss
    DONE = 5  # receiver -> sender (unicast): image complete and verified
    END = 6  # sender -> group: the session is over, no more repair will come
    REPAIR_NOTICE = 7  # sender -> group: repair just scheduled, per block (NACK suppression)
    MANIFEST = 8  # sender -> group: SHA-256 of consecutive blocks
    PEER_REQUEST = 9  # receiver -> sender (unicast): a straggler asks where to fetch blocks
    PEERS = 10  # sender -> receiver (unicast): finished receivers that serve blocks


class Flags(enum.IntFlag):
    NONE = 0
    #: DATA: a repair answer, not part of the in-order data pass (does not move the frontier).
    REPAIR = 0x01
    #: ANNOUNCE: the image checksum field is valid (it may be computed during the pass).
    CHECKSUM_KNOWN = 0x02
    #: ANNOUNCE: every block has been sent at least once.
    PASS_COMPLETE = 0x04
    #: ANNOUNCE: the sender is still gathering receivers and has not started the data pass.
    WAITING = 0x08
    #: ANNOUNCE: the sender multicasts a block manifest (receivers check every block).
    #: NACK: the entries ask for manifest chunks (first block, 1), not for symbols.
    MANIFEST = 0x10
    #: ANNOUNCE, MANIFEST: sent by unicast to one receiver, not to the group.
    #: STATUS: this receiver hears nothing of the group: answer by unicast (an ANNOUNCE).
    #: NACK with MANIFEST: send the chunks by unicast (a straggler; others need none).
    REPLY = 0x20
    #: PEERS: seeders exist, but each serves as many stragglers as it may: ask again soon
    #: (the list is empty), rather than turn to the source.
    WAIT = 0x40


class Header(NamedTuple):
    """The fixed header.  ``flags`` stays a plain int (test bits with ``&``): it is read
    for every datagram, and building an enum per packet costs more than the rest of it."""

    type: PacketType
    session_id: int
    origin: int
    flags: int = 0


@dataclass(frozen=True)
class Announce:
    """Everything a receiver needs to join, repeated periodically so late joiners can."""

    TYPE: ClassVar[PacketType] = PacketType.ANNOUNCE
    BODY: ClassVar[struct.Struct] = struct.Struct("!QHBxIIQIII32sB16sHQI")

    image_size: int
    symbol_size: int
    block_symbols: int  # k: source symbols per block (the last block may have fewer)
    block_count: int
    next_block: int  # blocks below this have been sent once in the data pass
    rate_bps: int  # the sender's current send rate, bits per second
    grtt_us: int  # the sender's group round-trip estimate, microseconds
    group_size: int  # the sender's estimate of how many receivers listen
    proactive_repair: int  # repair symbols the data pass sends after each block's source symbols
    checksum: bytes  # SHA-256 of the whole image (valid with Flags.CHECKSUM_KNOWN)
    sender_host: str  # where NACK/STATUS go; "0.0.0.0" means "the source address"
    sender_port: int
    #: The sender's clock when sent (microseconds); receivers echo it so the sender can
    #: measure round trips without synchronised clocks.
    timestamp_us: int = 0
    #: How long the sender expects to need to send the repair it owes now (microseconds):
    #: receivers wait that much longer before asking again for what they were promised.
    backlog_us: int = 0

    def body(self) -> bytes:
        ip = ipaddress.ip_address(self.sender_host)
        return self.BODY.pack(
            self.image_size,
            self.symbol_size,
            self.block_symbols,
            self.block_count,
            self.next_block,
            self.rate_bps,
            self.grtt_us,
            self.group_size,
            self.proactive_repair,
            self.checksum,
            ip.version,
            ip.packed.ljust(16, b"\0"),
            self.sender_port,
            self.timestamp_us,
            self.backlog_us,
        )

    @classmethod
    def from_body(cls, body: memoryview) -> "Announce":
        (size, sym, k, blocks, next_block, rate, grtt, group, proactive, checksum, family, addr,
         port, timestamp, backlog) = _unpack_exact(cls.BODY, body, "ANNOUNCE")
        if family == 4:
            host = str(ipaddress.IPv4Address(addr[:4]))
        elif family == 6:
            host = str(ipaddress.IPv6Address(addr))
        else:
            raise WireError(f"ANNOUNCE: unknown address family {family}")
        if not 1 <= k <= MAX_BLOCK_SYMBOLS:
            raise WireError(f"ANNOUNCE: block symbols {k} out of range")
        if size == 0:
            raise WireError("ANNOUNCE: empty image")
        if sym == 0 or sym + HEADER_SIZE + DATA_BODY.size > MAX_DATAGRAM:
            raise WireError(f"ANNOUNCE: symbol size {sym} out of range")
        if k + proactive > MAX_SYMBOL_ID + 1:
            raise WireError(f"ANNOUNCE: {proactive} proactive repair symbols do not fit k={k}")
        block_bytes = k * sym
        if blocks != -(-size // block_bytes):
            raise WireError("ANNOUNCE: block count does not match image size")
        if next_block > blocks:
            raise WireError("ANNOUNCE: next block beyond the last block")
        return cls(size, sym, k, blocks, next_block, rate, grtt, group, proactive, bytes(checksum),
                   host, port, timestamp, backlog)


DATA_BODY = struct.Struct("!IB3x")


@dataclass(frozen=True)
class Data:
    """One symbol of one block; source (id < k) and repair (id >= k) share the format."""

    TYPE: ClassVar[PacketType] = PacketType.DATA

    block: int
    symbol: int
    payload: Union[bytes, memoryview] = field(repr=False)

    def body(self) -> bytes:
        return DATA_BODY.pack(self.block, self.symbol) + bytes(self.payload)

    @classmethod
    def from_body(cls, body: memoryview) -> "Data":
        if len(body) <= DATA_BODY.size:
            raise WireError("DATA: truncated")
        block, symbol = DATA_BODY.unpack_from(body)
        if symbol > MAX_SYMBOL_ID:
            raise WireError(f"DATA: symbol id {symbol} out of range")
        return cls(block, symbol, body[DATA_BODY.size:])


NACK_ENTRY = struct.Struct("!IB")
#: Round-trip echo carried by NACK and STATUS: ANNOUNCE timestamp, microseconds held.
ECHO = struct.Struct("!QI")
NACK_COUNT = struct.Struct("!H")
BACKLOG = struct.Struct("!I")
#: Keeps a NACK inside one 1500-byte Ethernet frame.
MAX_NACK_ENTRIES = 250


def _pack_block_counts(name: str, entries: tuple[tuple[int, int], ...]) -> bytes:
    if not 1 <= len(entries) <= MAX_NACK_ENTRIES:
        raise WireError(f"{name}: {len(entries)} entries, 1..{MAX_NACK_ENTRIES} allowed")
    parts = [NACK_COUNT.pack(len(entries))]
    parts.extend(NACK_ENTRY.pack(block, count) for block, count in entries)
    return b"".join(parts)


def _unpack_block_counts(name: str, body: memoryview) -> tuple[tuple[int, int], ...]:
    if len(body) < NACK_COUNT.size:
        raise WireError(f"{name}: truncated")
    (count,) = NACK_COUNT.unpack_from(body)
    if not 1 <= count <= MAX_NACK_ENTRIES:
        raise WireError(f"{name}: {count} entries, 1..{MAX_NACK_ENTRIES} allowed")
    if len(body) != NACK_COUNT.size + count * NACK_ENTRY.size:
        raise WireError(f"{name}: length does not match entry count")
    entries = tuple(NACK_ENTRY.iter_unpack(body[NACK_COUNT.size:]))
    if any(symbols == 0 for _, symbols in entries):
        raise WireError(f"{name}: an entry counts zero symbols")
    return entries


@dataclass(frozen=True)
class Nack:
    """Per block, how many more symbols a receiver needs; many blocks ride in one packet."""

    TYPE: ClassVar[PacketType] = PacketType.NACK

    needs: tuple[tuple[int, int], ...]  # (block, symbols needed)
    echo_us: int = 0  # the last ANNOUNCE's timestamp (0: none heard yet)
    hold_us: int = 0  # how long ago it arrived, so the sender can subtract it

    def body(self) -> bytes:
        return ECHO.pack(self.echo_us, self.hold_us) + _pack_block_counts("NACK", self.needs)

    @classmethod
    def from_body(cls, body: memoryview) -> "Nack":
        if len(body) < ECHO.size:
            raise WireError("NACK: truncated")
        echo, hold = ECHO.unpack_from(body)
        return cls(_unpack_block_counts("NACK", body[ECHO.size:]), echo, hold)


@dataclass(frozen=True)
class RepairNotice:
    """Repair the sender has just scheduled: (block, fresh symbols coming).

    NACKs are unicast, so receivers cannot hear each other; the sender echoes what it
    will send so that a receiver whose need is already covered keeps quiet (NORM's NACK
    suppression, with the sender as the echo).
    """

    TYPE: ClassVar[PacketType] = PacketType.REPAIR_NOTICE

    scheduled: tuple[tuple[int, int], ...]  # (block, symbols coming)
    backlog_us: int = 0  # as in ANNOUNCE: time to send all repair owed, these included

    def body(self) -> bytes:
        return BACKLOG.pack(self.backlog_us) + _pack_block_counts("REPAIR_NOTICE",
                                                                  self.scheduled)

    @classmethod
    def from_body(cls, body: memoryview) -> "RepairNotice":
        if len(body) < BACKLOG.size:
            raise WireError("REPAIR_NOTICE: truncated")
        (backlog,) = BACKLOG.unpack_from(body)
        return cls(_unpack_block_counts("REPAIR_NOTICE", body[BACKLOG.size:]), backlog)


MANIFEST_FIRST = struct.Struct("!I")
MANIFEST_HASH_BYTES = 32
#: Hashes in one MANIFEST packet at most (the protocol sends 40: protocol/manifest.py).
MAX_MANIFEST_HASHES = 40


@dataclass(frozen=True)
class Manifest:
    """SHA-256 digests of blocks ``first``, ``first + 1``, ... (protocol/manifest.py)."""

    TYPE: ClassVar[PacketType] = PacketType.MANIFEST

    first: int
    hashes: tuple[bytes, ...] = field(repr=False)

    def body(self) -> bytes:
        if not 1 <= len(self.hashes) <= MAX_MANIFEST_HASHES:
            raise WireError(f"MANIFEST: {len(self.hashes)} hashes, 1..{MAX_MANIFEST_HASHES}")
        if any(len(digest) != MANIFEST_HASH_BYTES for digest in self.hashes):
            raise WireError("MANIFEST: a hash is not 32 bytes")
        return MANIFEST_FIRST.pack(self.first) + b"".join(self.hashes)

    @classmethod
    def from_body(cls, body: memoryview) -> "Manifest":
        if len(body) < MANIFEST_FIRST.size + MANIFEST_HASH_BYTES:
            raise WireError("MANIFEST: truncated")
        (first,) = MANIFEST_FIRST.unpack_from(body)
        rest = body[MANIFEST_FIRST.size:]
        count, extra = divmod(len(rest), MANIFEST_HASH_BYTES)
        if extra or count > MAX_MANIFEST_HASHES:
            raise WireError("MANIFEST: not a whole number of hashes, or too many")
        return cls(first, tuple(bytes(rest[i * MANIFEST_HASH_BYTES:(i + 1) * MANIFEST_HASH_BYTES])
                                for i in range(count)))


class ReceiverState(enum.IntEnum):
    JOINING = 0
    RECEIVING = 1
    VERIFYING = 2
    DONE = 3
    FAILED = 4


@dataclass(frozen=True)
class Status:
    """A receiver's progress and the loss it sees, so the sender can watch the group."""

    TYPE: ClassVar[PacketType] = PacketType.STATUS
    BODY: ClassVar[struct.Struct] = struct.Struct("!BxHIIQQIQIQIIII")
    #: The body before it carried the split of ``blocks_done`` (four counts fewer): still
    #: read, as "split unknown", so that a rack head hears agents of an older ramdisk.
    SPLIT: ClassVar[struct.Struct] = struct.Struct("!IIII")

    state: ReceiverState
    blocks_done: int
    block_count: int
    packets_received: int  # pass packets (source and proactive), not repair or control
    packets_lost: int  # pass packets missed: estimated from gaps in the pass sequence
    nacks_sent: int
    echo_us: int = 0  # as in NACK
    hold_us: int = 0
    #: The receiver's node (machine and target), the same across its restarts; 0: unknown.
    #: Lets the sender tell a restarted receiver from a new one (origins are per run).
    node_id: int = 0
    #: TCP port where this receiver serves the blocks it holds to stragglers (its peer
    #: block server, protocol/peering.py), on the address the STATUS came from; 0: none.
    seed_port: int = 0
    #: Of ``blocks_done``, those served by unicast, by whom: finished peers, the sender's
    #: own block server, the image's origin (HTTP/Swift); and those that needed nothing
    #: (all-zero, or already on the target when resuming). The rest came by multicast:
    #: the rack head's status shows operators where each agent's image came from.
    blocks_from_peers: int = 0
    blocks_from_source: int = 0
    blocks_from_origin: int = 0
    blocks_in_place: int = 0

    def body(self) -> bytes:
        return self.BODY.pack(self.state, self.seed_port, self.blocks_done, self.block_count,
                              self.packets_received, self.packets_lost, self.nacks_sent,
                              self.echo_us, self.hold_us, self.node_id, self.blocks_from_peers,
                              self.blocks_from_source, self.blocks_from_origin,
                              self.blocks_in_place)

    @classmethod
    def from_body(cls, body: memoryview) -> "Status":
        if len(body) == cls.BODY.size - cls.SPLIT.size:
            body = memoryview(bytes(body) + bytes(cls.SPLIT.size))
        (state, seed_port, done, count, received, lost, nacks, echo,
         hold, node, from_peers, from_source, from_origin,
         in_place) = _unpack_exact(cls.BODY, body, "STATUS")
        try:
            receiver_state = ReceiverState(state)
        except ValueError:
            raise WireError(f"STATUS: unknown state {state}") from None
        if done > count:
            raise WireError("STATUS: more blocks done than exist")
        if from_peers + from_source + from_origin + in_place > done:
            raise WireError("STATUS: more blocks accounted for than done")
        return cls(receiver_state, done, count, received, lost, nacks, echo, hold, node,
                   seed_port, from_peers, from_source, from_origin, in_place)


@dataclass(frozen=True)
class Done:
    """A receiver has the whole image and its SHA-256 matched; the sender may stop for it."""

    TYPE: ClassVar[PacketType] = PacketType.DONE
    BODY: ClassVar[struct.Struct] = struct.Struct("!32s")

    checksum: bytes

    def body(self) -> bytes:
        return self.BODY.pack(self.checksum)

    @classmethod
    def from_body(cls, body: memoryview) -> "Done":
        (checksum,) = _unpack_exact(cls.BODY, body, "DONE")
        return cls(bytes(checksum))


@dataclass(frozen=True)
class End:
    """The sender is finished; a receiver still missing blocks will get no more repair."""

    TYPE: ClassVar[PacketType] = PacketType.END

    def body(self) -> bytes:
        return b""

    @classmethod
    def from_body(cls, body: memoryview) -> "End":
        if len(body):
            raise WireError("END: unexpected body")
        return cls()


#: Manifest chunks a sender answers by unicast for one NACK (REPLY flag) at most: the
#: answer goes out at once, unpaced.
MAX_UNICAST_CHUNKS = 16
#: Origins a straggler asks the tracker to leave out (peers that failed it) at most.
MAX_PEER_EXCLUDES = 32
_ORIGIN = struct.Struct("!I")


@dataclass(frozen=True)
class PeerRequest:
    """A straggler asks the sender (the tracker) for peers to fetch its missing blocks from.

    ``blocks_missing`` lets the tracker judge how much it lacks; ``exclude`` names peers
    (by origin) that failed it already, so that the next list is of others.
    """

    TYPE: ClassVar[PacketType] = PacketType.PEER_REQUEST
    BODY: ClassVar[struct.Struct] = struct.Struct("!IB")

    blocks_missing: int
    exclude: tuple[int, ...] = ()

    def body(self) -> bytes:
        if len(self.exclude) > MAX_PEER_EXCLUDES:
            raise WireError(f"PEER_REQUEST: {len(self.exclude)} excluded, "
                            f"{MAX_PEER_EXCLUDES} allowed")
        return (self.BODY.pack(self.blocks_missing, len(self.exclude))
                + b"".join(_ORIGIN.pack(origin) for origin in self.exclude))

    @classmethod
    def from_body(cls, body: memoryview) -> "PeerRequest":
        if len(body) < cls.BODY.size:
            raise WireError("PEER_REQUEST: truncated")
        missing, count = cls.BODY.unpack_from(body)
        if count > MAX_PEER_EXCLUDES:
            raise WireError(f"PEER_REQUEST: {count} excluded, {MAX_PEER_EXCLUDES} allowed")
        if len(body) != cls.BODY.size + count * _ORIGIN.size:
            raise WireError("PEER_REQUEST: length does not match its count")
        return cls(missing, tuple(origin for (origin,) in
                                  _ORIGIN.iter_unpack(body[cls.BODY.size:])))


class PeerAddress(NamedTuple):
    """Where one seeder serves blocks: IPv4 host, TCP port, and its origin (to name it)."""

    host: str
    port: int
    origin: int


PEER_ENTRY = struct.Struct("!4sHI")
PEERS_HEAD = struct.Struct("!HB")
#: Peers in one PEERS packet at most: a short list, so that stragglers spread out.
MAX_PEERS = 16


@dataclass(frozen=True)
class Peers:
    """The tracker's answer to a straggler: seeders to fetch from, and the sender's own
    block server (``source_port``, on the sender's address; 0: none) as the last resort.
    An empty list says no seeder can serve now."""

    TYPE: ClassVar[PacketType] = PacketType.PEERS

    peers: tuple[PeerAddress, ...]
    source_port: int = 0

    def body(self) -> bytes:
        if len(self.peers) > MAX_PEERS:
            raise WireError(f"PEERS: {len(self.peers)} peers, {MAX_PEERS} allowed")
        parts = [PEERS_HEAD.pack(self.source_port, len(self.peers))]
        for peer in self.peers:
            try:
                host = ipaddress.IPv4Address(peer.host)
            except ValueError:
                raise WireError(f"PEERS: {peer.host!r} is not an IPv4 address") from None
            parts.append(PEER_ENTRY.pack(host.packed, peer.port, peer.origin))
        return b"".join(parts)

    @classmethod
    def from_body(cls, body: memoryview) -> "Peers":
        if len(body) < PEERS_HEAD.size:
            raise WireError("PEERS: truncated")
        source_port, count = PEERS_HEAD.unpack_from(body)
        if count > MAX_PEERS:
            raise WireError(f"PEERS: {count} peers, {MAX_PEERS} allowed")
        if len(body) != PEERS_HEAD.size + count * PEER_ENTRY.size:
            raise WireError("PEERS: length does not match its count")
        peers = []
        for packed, port, origin in PEER_ENTRY.iter_unpack(body[PEERS_HEAD.size:]):
            host = ipaddress.IPv4Address(packed)
            if port == 0 or not is_unicast_host(host):
                raise WireError(f"PEERS: {host}:{port} is no address to connect to")
            peers.append(PeerAddress(str(host), port, origin))
        return cls(tuple(peers), source_port)


def is_unicast_host(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True if a datagram or a connection can go to ``address`` as to one host: not a
    group, not the unspecified address, not the limited broadcast (every send to those
    fails, or reaches everyone). Whatever names where we send — a PEERS entry, an
    ANNOUNCE's reply address, the spec's ``sender`` — is checked with this."""
    return not (address.is_multicast or address.is_unspecified
                or address == _LIMITED_BROADCAST)


_LIMITED_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


Body = Union[Announce, Data, Nack, Status, Done, End, RepairNotice, Manifest, PeerRequest, Peers]

_PACKET_TYPES = {int(member): member for member in PacketType}
_BODY_TYPES: dict[PacketType, type] = {
    cls.TYPE: cls for cls in (Announce, Data, Nack, Status, Done, End, RepairNotice, Manifest,
                              PeerRequest, Peers)
}


@dataclass(frozen=True)
class Packet:
    header: Header
    body: Body


def encode(session_id: int, origin: int, body: Body, flags: Flags = Flags.NONE) -> bytes:
    """Build one datagram.  Raises WireError if the result would not fit a datagram."""
    data = HEADER.pack(MAGIC, VERSION, body.TYPE, flags, session_id, origin) + body.body()
    if len(data) > MAX_DATAGRAM:
        raise WireError(f"packet of {len(data)} bytes exceeds {MAX_DATAGRAM}")
    return data


def encode_data_header(session_id: int, origin: int, block: int, symbol: int,
                       flags: Flags = Flags.NONE) -> bytes:
    """The bytes before a DATA payload, for senders that gather header and payload (sendmsg)."""
    return (HEADER.pack(MAGIC, VERSION, PacketType.DATA, flags, session_id, origin)
            + DATA_BODY.pack(block, symbol))


def parse_header(data: Union[bytes, memoryview]) -> Header:
    if len(data) < HEADER_SIZE:
        raise WireError(f"datagram of {len(data)} bytes is shorter than the header")
    if len(data) > MAX_DATAGRAM:
        raise WireError(f"datagram of {len(data)} bytes is too long")
    magic, version, ptype, flags, session_id, origin = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise WireError("bad magic")
    if version != VERSION:
        raise WireError(f"unsupported version {version}")
    packet_type = _PACKET_TYPES.get(ptype)
    if packet_type is None:
        raise WireError(f"unknown packet type {ptype}")
    return Header(packet_type, session_id, origin, flags)


def parse(data: Union[bytes, memoryview]) -> Packet:
    """Parse one datagram; raises WireError, and only WireError, on anything malformed."""
    header = parse_header(data)
    return parse_body(header, memoryview(data)[HEADER_SIZE:])


def parse_body(header: Header, body: Union[bytes, memoryview]) -> Packet:
    """The packet of an already parsed header and its body (a sealed datagram's body does
    not follow its header: the counter lies between)."""
    return Packet(header, _BODY_TYPES[header.type].from_body(memoryview(body)))


def _unpack_exact(layout: struct.Struct, body: memoryview, name: str) -> tuple:
    if len(body) != layout.size:
        raise WireError(f"{name}: body is {len(body)} bytes, expected {layout.size}")
    return layout.unpack(body)
