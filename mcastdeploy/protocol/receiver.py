"""The receiver's protocol state machine: no sockets, no clock, no files.

It collects symbols per block, hands each block over (``BlockDecoded``) the moment it is
decodable, and keeps only incomplete blocks in memory.  What is missing it asks for with
NACKs after a random back-off (``repair.NackScheduler``).  The driver writes blocks out,
computes the image's SHA-256, and reports it with :meth:`Receiver.image_verified`; only
then does the receiver tell the sender it is done.
"""

from __future__ import annotations

import enum
import ipaddress
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from mcastdeploy import wire
from mcastdeploy.fec import codec_for
from mcastdeploy.protocol import events, reporting
from mcastdeploy.protocol.geometry import ImageGeometry
from mcastdeploy.protocol.intake import admit, overhead, protection_for
from mcastdeploy.protocol.manifest import CHUNK_BLOCKS, ReceiverManifest, ZeroHashes
from mcastdeploy.protocol.repair import NackScheduler, NackTiming, padded_need
from mcastdeploy.protocol.straggler import StragglerPolicy

Address = tuple


class UnicastServer(enum.Enum):
    """Who served a block a straggler fetched by unicast, in its order of resort."""

    PEER = "peers"  # a finished receiver's block server
    SOURCE = "source"  # the sender's own block server
    ORIGIN = "origin"  # the image's HTTP/Swift origin, by ranged GET


@dataclass
class ReceiverConfig:
    session_id: int
    #: SHA-256 the operator pinned in the session spec; the sender's must match it.
    expected_checksum: Optional[bytes] = None
    #: Give up when nothing has come from the sender for this long.
    timeout: float = 30.0
    #: Mean STATUS interval in small groups; large ones stretch it (protocol/reporting.py).
    status_interval: float = 1.0
    #: The first STATUS (our join) is repeated this soon, as the sender may miss it; the
    #: gaps then double up to the steady interval.
    join_repeat: float = 0.05
    #: Copies of DONE sent (spaced by ``done_spacing``) before finishing.
    done_copies: int = 3
    done_spacing: float = 0.02
    #: The session secret (32 bytes): see SenderConfig.key.
    key: Optional[bytes] = None
    encrypt: bool = False
    #: Stable across this receiver's restarts (machine and target; see wire.Status):
    #: the sender then counts a restarted receiver once, not as a new one and a dead one.
    node_id: int = 0
    #: Bytes of incomplete blocks held for repair at most; past it, the one with fewest
    #: symbols is dropped and later asked for whole.  Keeps memory flat on lossy links.
    partial_budget: int = 64 * 1024 * 1024
    #: Refuse a sender that multicasts no block manifest (the CLI always requires one).
    require_manifest: bool = False
    #: The target may already hold blocks (a restarted receiver): ask for the whole
    #: manifest at once, so that the driver can check them (HashesLearned, block_on_target).
    resume: bool = False
    #: The sender's unicast address from the session spec, if it names one: STATUS goes
    #: there before any ANNOUNCE, so that a receiver that hears no group can still join.
    sender_hint: Optional[Address] = None
    #: Where this receiver serves blocks to stragglers once it has the image (STATUS
    #: says so; 0: it does not seed).
    seed_port: int = 0
    #: When to fetch from peers instead of multicast repair (protocol/straggler.py).
    straggler: StragglerPolicy = StragglerPolicy()


_REPAIR_FLAG = int(wire.Flags.REPAIR)
_REPLY_FLAG = int(wire.Flags.REPLY)
_HELD = 2  # _done: decoded, waiting for the manifest to vouch for it
_DONE = 1


def _reply_address(announce: wire.Announce, source: Address) -> Optional[Address]:
    """Where NACK/STATUS/DONE go for this ANNOUNCE, or None if no datagram can go there.

    A group, the broadcast address or a host of the other IP family makes every send fail
    in the driver (EACCES, EAFNOSUPPORT): one sealed ANNOUNCE naming one, from an insider,
    ended every receiver on the rack.  Such an ANNOUNCE is malformed and ignored.
    """
    host = source[0] if announce.sender_host in ("0.0.0.0", "::") else announce.sender_host
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return (host, announce.sender_port or source[1])  # a simulator's node name
    try:
        family = ipaddress.ip_address(source[0]).version
    except ValueError:
        family = address.version
    if not wire.is_unicast_host(address) or address.version != family:
        return None
    return (host, announce.sender_port or source[1])

#: Manifest chunks a straggler asks for by unicast at once (wire.MAX_UNICAST_CHUNKS).
_UNICAST_MANIFEST_CHUNKS = wire.packets.MAX_UNICAST_CHUNKS
_LOSS_PRIOR = 100  # a plain int: enum arithmetic per packet is slow


class ReceiverPhase(enum.Enum):
    JOINING = "joining"
    RECEIVING = "receiving"
    VERIFYING = "verifying"
    DONE = "done"
    FAILED = "failed"


_WIRE_STATE = {
    ReceiverPhase.JOINING: wire.ReceiverState.JOINING,
    ReceiverPhase.RECEIVING: wire.ReceiverState.RECEIVING,
    ReceiverPhase.VERIFYING: wire.ReceiverState.VERIFYING,
    ReceiverPhase.DONE: wire.ReceiverState.DONE,
    ReceiverPhase.FAILED: wire.ReceiverState.FAILED,
}


@dataclass
class ReceiverStats:
    packets_received: int = 0
    data_packets: int = 0
    repair_packets: int = 0
    duplicate_packets: int = 0
    early_packets: int = 0
    invalid_packets: int = 0
    foreign_packets: int = 0
    unauthentic_packets: int = 0
    replayed_packets: int = 0
    nacks_sent: int = 0
    nacks_suppressed: int = 0  # block entries not asked for: a REPAIR_NOTICE covered them
    symbols_requested: int = 0
    blocks_recovered: int = 0  # blocks that needed the FEC decoder (a source symbol was lost)
    blocks_rejected: int = 0  # decoded blocks whose hash did not match the manifest
    blocks_kept: int = 0  # blocks the target already held, checked against the manifest
    blocks_zero: int = 0  # all-zero blocks, zeroed by the driver instead of received
    partials_dropped: int = 0  # incomplete blocks forgotten to stay within partial_budget
    manifest_requests: int = 0
    #: Verified blocks each unicast server (peers, the sender's block server, the origin)
    #: served.
    blocks_from: dict[UnicastServer, int] = field(
        default_factory=lambda: dict.fromkeys(UnicastServer, 0))
    peer_blocks_rejected: int = 0  # blocks from a peer that did not match the manifest
    peer_requests: int = 0


class _PartialBlock:
    """Symbols of one incomplete block: received source rows in place, repair rows aside."""

    __slots__ = ("k", "rows", "present", "have", "repair")

    def __init__(self, k: int, symbol_size: int) -> None:
        self.k = k
        self.rows = np.zeros((k, symbol_size), dtype=np.uint8)
        self.present = np.zeros(k, dtype=bool)
        self.have = 0
        self.repair: dict[int, bytes] = {}


class Receiver:
    def __init__(self, config: ReceiverConfig, *, origin: int,
                 rng: Optional[random.Random] = None) -> None:
        self.config = config
        self.origin = origin
        self._protection = protection_for(config.key, config.session_id, origin, config.encrypt)
        self.phase = ReceiverPhase.JOINING
        self.stats = ReceiverStats()
        self.geometry: Optional[ImageGeometry] = None
        self.sender_id: Optional[int] = None
        self.sender_address: Optional[Address] = None
        self.checksum: Optional[bytes] = None  # the sender's, once announced
        self.blocks_done = 0
        self.failure: Optional[str] = None

        self._rng = rng or random.Random()
        self._events: deque[events.Event] = deque()
        self._outbox: list[tuple[bytes, Address]] = []
        self._partial: dict[int, _PartialBlock] = {}
        #: Per block: 0 missing, _HELD decoded but awaiting its hash, _DONE handed over.
        self._done: bytearray = bytearray()
        self.manifest: Optional[ReceiverManifest] = None
        self._held: dict[int, _PartialBlock] = {}
        #: Blocks the pass has left whose hash we lack: asked for before any symbols.
        self._awaiting_hash: set[int] = set()
        self._nacks = NackScheduler(self._rng)
        self._timing: Optional[NackTiming] = None
        self._proactive = 0
        self._frontier = 0  # blocks below this were fully sent in the data pass
        self._last_heard = 0.0
        self._next_status: Optional[float] = None
        self._last_status = 0.0
        #: The nominal gap ``_next_status`` was drawn from; None when it is due at once.
        self._status_nominal: Optional[float] = None
        self._statuses_sent = 0
        self._group_size = 1  # as the sender last announced it
        self._echo: Optional[tuple[int, float]] = None  # last ANNOUNCE timestamp, arrival
        self._verified: Optional[bytes] = None
        #: When the sender expects to have sent all repair it owed at its last word.
        self._backlog_until = 0.0
        self._done_remaining = 0
        self._next_done = 0.0
        #: Pass packets counted per block until the pass moves past it (then folded into
        #: the totals below); blocks before ``_count_from`` were partly sent before we
        #: listened and are not counted.
        self._pass_counts: dict[int, int] = {}
        self._count_from: Optional[int] = None
        self._pass_received = 0
        self._pass_lost = 0
        #: Why we fetch from peers (None: multicast serves us); set once.
        self.straggler: Optional[str] = None
        #: The sender answers us by unicast, but the group is silent: multicast repair
        #: cannot reach us either.
        self.multicast_dead = False
        #: Peers (or the source) are serving us: no symbol NACKs meanwhile.
        self._peering = False
        self._peer_ask_at: Optional[float] = None
        #: Where our block server listens (STATUS), until stop_seeding.
        self._seed_port = config.seed_port
        self._peer_asks = 0
        self._peer_exclude: list[int] = []
        #: Last group packet (multicast) and last unicast answer of the sender.
        self._group_heard = 0.0
        self._unicast_heard: Optional[float] = None
        self._pass_complete = False
        #: The sender ended the session after we finished (seeding may stop).
        self.session_over = False

    # -- sans-IO interface ----------------------------------------------------------------

    def start(self, now: float) -> None:
        self._last_heard = now
        self._group_heard = now
        if self.config.sender_hint is not None and self.sender_address is None:
            # Say we are here at once: a sender that answers by unicast lets us join
            # even if the group never reaches us (multicast-dead).
            self.sender_address = self.config.sender_hint
            self._next_status = now

    @property
    def packets_lost(self) -> int:
        """Pass packets the sender sent while we listened that never arrived.

        Counted per block once the pass has moved past it (its k + proactive symbols
        against what came), so that it stays right when the sender changes its proactive
        parity mid-session.
        """
        return self._pass_lost

    @property
    def loss_rate(self) -> float:
        """Share of the pass packets sent while we listened that were lost.

        Counted as if ``_LOSS_PRIOR`` loss-free packets had come first, so that one loss
        among the first few packets does not read as a bad link and inflate our NACKs.
        """
        return self._pass_lost / (self._pass_lost + self._pass_received + _LOSS_PRIOR)

    def receive_datagram(self, data: bytes, addr: Address, now: float) -> None:
        if self.phase is ReceiverPhase.FAILED:
            return
        if self.phase is ReceiverPhase.DONE:
            if not self.session_over:
                self._after_done(data)
            return
        packet = admit(data, self.config.session_id, self.stats, self._protection)
        if packet is not None:
            self.receive_packet(packet, addr, now)

    def _after_done(self, data: bytes) -> None:
        """Finished, perhaps seeding: only the sender's END still matters.  The header is
        read first so that the rest of the pass's DATA, still arriving, costs no tag check
        while this node serves its peers."""
        try:
            if wire.parse_header(data).type is not wire.PacketType.END:
                return
        except wire.WireError:
            return
        packet = admit(data, self.config.session_id, self.stats, self._protection)
        if packet is not None and isinstance(packet.body, wire.End) \
                and packet.header.origin == self.sender_id:
            self.session_over = True
            self._events.append(events.SessionOver())

    def receive_packet(self, packet: wire.Packet, addr: Address, now: float) -> None:
        """A datagram already admitted (parsed, of our session).

        Lets a simulator parse each multicast datagram once for thousands of receivers.
        """
        if self.phase in (ReceiverPhase.DONE, ReceiverPhase.FAILED):
            return
        header, body = packet.header, packet.body
        self.stats.packets_received += 1
        if isinstance(body, wire.Announce):
            self._on_announce(header, body, addr, now)
        elif header.origin != self.sender_id:
            # DATA before ANNOUNCE (we cannot place it yet), or a sender we do not follow.
            if isinstance(body, wire.Data):
                self.stats.early_packets += 1
            elif isinstance(body, wire.End) and self.sender_id is None:
                self._fail("the session ended before this receiver could join it")
            elif self.sender_id is not None:
                self.stats.foreign_packets += 1
        elif isinstance(body, wire.Data):
            self._last_heard = self._group_heard = now
            self._on_data(header, body, now)
        elif isinstance(body, wire.RepairNotice):
            self._last_heard = self._group_heard = now
            self._on_repair_notice(body, now)
        elif isinstance(body, wire.Manifest):
            self._last_heard = now
            if header.flags & _REPLY_FLAG:
                self._unicast_heard = now
            else:
                self._group_heard = now
            self._on_manifest(body, now)
        elif isinstance(body, wire.Peers):
            self._last_heard = self._unicast_heard = now
            self._on_peers(body, now, bool(header.flags & wire.Flags.WAIT))
        elif isinstance(body, wire.End):
            self._last_heard = now
            if self.phase is ReceiverPhase.RECEIVING:
                self._fail("the sender ended the session before this receiver had every block")
        else:
            self.stats.foreign_packets += 1  # NACK/STATUS/DONE: receivers' traffic, not ours

    def image_verified(self, checksum: bytes, now: float) -> None:
        """The driver's SHA-256 of the complete image as written to the target."""
        if self.phase is not ReceiverPhase.VERIFYING:
            raise RuntimeError("image_verified before every block was decoded")
        self._verified = checksum
        self._check_verified(now)

    def handle_timer(self, now: float) -> None:
        if self.phase in (ReceiverPhase.DONE, ReceiverPhase.FAILED):
            if self._done_remaining and now >= self._next_done:
                self._send_done(now)
            return
        if now - self._last_heard >= self.config.timeout:
            what = "no ANNOUNCE" if self.geometry is None else "nothing"
            reason = f"{what} from the sender for {self.config.timeout:g} s"
            if self.geometry is None and self.stats.unauthentic_packets:
                reason += (f"; {self.stats.unauthentic_packets} packets of this session failed"
                           " authentication: is the session key the sender's?")
            self._fail(reason)
            return
        if self._next_status is not None and now >= self._next_status:
            self._send_status(now)
            self._statuses_sent += 1
            self._last_status = now
            # 50 ms, 100 ms, 200 ms ... up to the interval: the first STATUS (our join) may
            # be lost, and early loss reports let the sender size its parity and rate soon.
            # Jittered, and stretched in large groups, to keep the sender's load bounded.
            self._status_nominal = self._status_gap(self._group_size)
            self._next_status = now + reporting.draw_gap(self._status_nominal, self._rng)
        if self._nacks.nack_at is not None and now >= self._nacks.nack_at and not self._peering:
            self._nacks.nack_at = None
            self._send_nack(now)
        if self.manifest is not None:
            self._ask_manifest(now)
        if self.phase is ReceiverPhase.RECEIVING:
            if not self.multicast_dead:
                reason = self.config.straggler.multicast_dead(now, self._group_heard,
                                                              self._unicast_heard)
                if reason is not None:
                    self.multicast_dead = True
                    if self.straggler is None:
                        self._become_straggler(reason, now)
                    elif not self._peering:
                        # Given back to multicast repair, which cannot reach us: ask
                        # for peers again (the driver turns to the source if none).
                        self._peer_asks = 0
                        self._peer_ask_at = now
            if self._peer_ask_at is not None and now >= self._peer_ask_at:
                self._ask_peers(now)
        if self._timing is not None and self.phase is ReceiverPhase.RECEIVING \
                and not self._peering:
            self._nacks.arm(now, self._timing)

    def get_timer(self) -> Optional[float]:
        if self.phase in (ReceiverPhase.DONE, ReceiverPhase.FAILED):
            return self._next_done if self._done_remaining else None
        deadlines = [self._last_heard + self.config.timeout]
        if self._next_status is not None:
            deadlines.append(self._next_status)
        if self._nacks.nack_at is not None and not self._peering:
            deadlines.append(self._nacks.nack_at)
        if self._peer_ask_at is not None:
            deadlines.append(self._peer_ask_at)
        if self.phase is ReceiverPhase.RECEIVING and not self.multicast_dead \
                and self._unicast_heard is not None \
                and self._unicast_heard >= self._group_heard:
            # Only while the sender's latest word came by unicast: else the deadline
            # could pass without the rule firing, and wake the driver in a busy loop.
            deadlines.append(self._group_heard + self.config.straggler.group_silence)
        if self.manifest is not None and self.sender_address is not None:
            ask = self.manifest.next_ask()
            if ask is not None:
                deadlines.append(ask)
        return min(deadlines)

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]:
        out, self._outbox = self._outbox, []
        return out

    def next_event(self) -> Optional[events.Event]:
        return self._events.popleft() if self._events else None

    # -- internals ------------------------------------------------------------------------

    def _encode(self, body: wire.packets.Body, flags: wire.Flags = wire.Flags.NONE) -> bytes:
        datagram = wire.encode(self.config.session_id, self.origin, body, flags)
        return datagram if self._protection is None else self._protection.seal(datagram)

    def _send(self, body: wire.packets.Body, flags: wire.Flags = wire.Flags.NONE) -> None:
        if self.sender_address is not None:
            self._outbox.append((self._encode(body, flags), self.sender_address))

    def _echo_fields(self, now: Optional[float]) -> dict[str, int]:
        """The round-trip echo for the sender (none when we have no time or no ANNOUNCE)."""
        if self._echo is None or now is None or not self._echo[0]:
            return {}
        timestamp, arrived = self._echo
        return {"echo_us": timestamp, "hold_us": min(int((now - arrived) * 1e6), 2**32 - 1)}

    def _status_gap(self, group_size: int) -> float:
        """The nominal gap after our latest STATUS in a group of ``group_size``."""
        return reporting.nominal_gap(self._statuses_sent, group_size,
                                     self.config.status_interval, self.config.join_repeat)

    def _regroup(self, group_size: int) -> None:
        """The announced group size changed: stretch (or shrink) the pending gap to match,
        keeping its random draw, so that receivers that joined before the group was known
        do not repeat their STATUS all together at the small group's pace."""
        if group_size == self._group_size:
            return
        self._group_size = group_size
        if self._next_status is None or self._status_nominal is None:
            return  # none pending, or one due at once (our join, our verdict)
        new = self._status_gap(group_size)
        if new != self._status_nominal:
            drawn = self._next_status - self._last_status
            self._next_status = self._last_status + drawn * new / self._status_nominal
            self._status_nominal = new

    def _send_status(self, now: Optional[float] = None) -> None:
        geometry = self.geometry
        # Not hearing the group (or not yet): ask the sender to answer by unicast.
        silent = self.phase in (ReceiverPhase.JOINING, ReceiverPhase.RECEIVING) and (
            geometry is None or (now is not None and self.config.straggler.group_silent(
                now, self._group_heard)))
        self._send(wire.Status(
            state=_WIRE_STATE[self.phase],
            blocks_done=self.blocks_done,
            block_count=geometry.block_count if geometry else 0,
            # Pass packets only, so that the sender's rate control reads a loss ratio.
            packets_received=self._pass_received,
            packets_lost=self.packets_lost,
            nacks_sent=self.stats.nacks_sent,
            node_id=self.config.node_id,
            seed_port=self._seed_port,
            blocks_from_peers=self.stats.blocks_from[UnicastServer.PEER],
            blocks_from_source=self.stats.blocks_from[UnicastServer.SOURCE],
            blocks_from_origin=self.stats.blocks_from[UnicastServer.ORIGIN],
            blocks_in_place=self.stats.blocks_kept + self.stats.blocks_zero,
            **self._echo_fields(now),
        ), wire.Flags.REPLY if silent else wire.Flags.NONE)

    def stop_seeding(self, now: float) -> None:
        """(driver) The block server is closing: tell the tracker (a STATUS with no seed
        port, twice against loss), so that it lists this node to no more stragglers."""
        if not self._seed_port:
            return
        self._seed_port = 0
        for _ in range(2):
            self._send_status(now)

    def _send_done(self, now: float) -> None:
        assert self._verified is not None
        self._send(wire.Done(self._verified))
        self._done_remaining -= 1
        self._next_done = now + self.config.done_spacing
        if not self._done_remaining:
            self._events.append(events.TransferComplete(self._verified))

    def _fail(self, reason: str) -> None:
        self.phase = ReceiverPhase.FAILED
        self.failure = reason
        self._partial.clear()
        self._held.clear()
        self._send_status()
        self._events.append(events.TransferFailed(reason))

    def _on_announce(self, header: wire.Header, announce: wire.Announce, addr: Address,
                     now: float) -> None:
        reply = _reply_address(announce, addr)
        if reply is None:
            self.stats.invalid_packets += 1
            return
        geometry = ImageGeometry(announce.image_size, announce.symbol_size,
                                 announce.block_symbols)
        checksum = announce.checksum if header.flags & wire.Flags.CHECKSUM_KNOWN else None
        expected = self.config.expected_checksum
        if self.geometry is None:
            if expected is not None and checksum is None:
                return  # a pinned image: join only once the sender says which image it sends
            if not self._accept_checksum(checksum):
                return
            has_manifest = bool(header.flags & wire.Flags.MANIFEST)
            if self.config.require_manifest and not has_manifest:
                self._fail("the sender multicasts no block manifest; refusing unchecked blocks")
                return
            self.geometry = geometry
            self._done = bytearray(geometry.block_count)
            if has_manifest:
                self.manifest = ReceiverManifest(geometry.block_count, ZeroHashes(
                    geometry.block_bytes, geometry.block_length(geometry.block_count - 1)))
                if self.config.resume:
                    self.manifest.want_all(now)
            self.sender_id = header.origin
            self.phase = ReceiverPhase.RECEIVING
            self._next_status = now  # tell the sender at once that we are here
            self._status_nominal = None
            self._group_heard = now  # the group's silence counts from our join
            self._events.append(events.SessionJoined(geometry, header.origin))
        elif geometry != self.geometry:
            self.stats.foreign_packets += 1  # another image under our session id: ignore it
            return
        elif not self._accept_checksum(checksum):
            return
        elif header.origin != self.sender_id:
            self._follow_new_sender(header.origin, now)
        self._last_heard = now
        if header.flags & _REPLY_FLAG:
            self._unicast_heard = now
        else:
            self._group_heard = now
        self._echo = (announce.timestamp_us, now)
        self.sender_address = reply
        self._proactive = announce.proactive_repair
        self._backlog_until = now + announce.backlog_us / 1e6
        if self._count_from is None:
            # The block in flight as we join was partly sent before we listened.
            waiting = header.flags & wire.Flags.WAITING
            self._count_from = announce.next_block + (0 if waiting else 1)
        self._regroup(max(announce.group_size, 1))
        self._timing = NackTiming(
            grtt=announce.grtt_us / 1e6,
            group_size=announce.group_size,
            rate_bps=float(announce.rate_bps),
            packet_bytes=(wire.HEADER_SIZE + 8 + announce.symbol_size
                          + overhead(self._protection)),
        )
        self._advance_frontier(announce.next_block, now)
        if header.flags & wire.Flags.PASS_COMPLETE and not self._pass_complete:
            self._on_pass_complete(now)
        if self.phase is ReceiverPhase.VERIFYING:
            self._check_verified(now)

    def _accept_checksum(self, checksum: Optional[bytes]) -> bool:
        """Check an announced image checksum against what we know; fail on a conflict."""
        if checksum is None:
            return True
        expected = self.config.expected_checksum
        if expected is not None and expected != checksum:
            self._fail("the sender's image checksum differs from the session spec's")
            return False
        if self.checksum is not None and self.checksum != checksum:
            self._fail("the sender announced a different image checksum")
            return False
        self.checksum = checksum
        return True

    def _advance_frontier(self, frontier: int, now: float) -> None:
        """Blocks below ``frontier`` were fully sent in the pass: what is missing is owed."""
        if frontier <= self._frontier:
            return
        manifest = self.manifest
        for block in range(self._frontier, frontier):
            self._count_passed(block)
            if self._done[block]:
                continue
            if manifest is not None and manifest.hash_of(block) is None:
                # Perhaps a zero block the pass skipped: ask for its hash, not its symbols.
                self._awaiting_hash.add(block)
                manifest.want(block, now)
            else:
                self._nacks.add(block, now)
        self._frontier = frontier
        if self._timing is not None and self.phase is ReceiverPhase.RECEIVING:
            self._nacks.arm(now, self._timing)

    def _on_data(self, header: wire.Header, data: wire.Data, now: float) -> None:
        geometry = self.geometry
        assert geometry is not None
        block, symbol = data.block, data.symbol
        if block >= geometry.block_count or len(data.payload) != geometry.symbol_size:
            self.stats.invalid_packets += 1
            return
        self.stats.data_packets += 1
        if header.flags & _REPAIR_FLAG:
            self.stats.repair_packets += 1
        else:
            self._note_pass_packet(block)
            self._advance_frontier(block, now)
        if self._done[block]:
            self.stats.duplicate_packets += 1
            return
        partial = self._partial.get(block)
        if partial is None:
            if len(self._partial) * geometry.block_bytes >= self.config.partial_budget:
                self._drop_a_partial()
            partial = self._partial[block] = _PartialBlock(geometry.symbols_in(block),
                                                           geometry.symbol_size)
        k = partial.k
        if symbol < k:
            if partial.present[symbol]:
                self.stats.duplicate_packets += 1
                return
            partial.rows[symbol] = np.frombuffer(data.payload, dtype=np.uint8)
            partial.present[symbol] = True
        else:
            if symbol in partial.repair:
                self.stats.duplicate_packets += 1
                return
            partial.repair[symbol] = bytes(data.payload)
        partial.have += 1
        if partial.have >= k:
            self._complete_block(block, partial, now)
        elif header.flags & _REPAIR_FLAG and self._timing is not None:
            self._nacks.progress(block, now, self._timing.retry_after(k - partial.have))

    def _drop_a_partial(self) -> None:
        """Memory for incomplete blocks is spent: forget the one that has least, among
        those the pass has left (they are owed, and will be asked for whole).

        Incomplete blocks wait in memory for repair, which comes mostly after the pass; on
        a lossy link their number grows with the image, and memory must not.
        """
        candidates = [block for block in self._partial if block < self._frontier]
        if not candidates:
            return
        victim = min(candidates, key=lambda block: self._partial[block].have)
        del self._partial[victim]
        self.stats.partials_dropped += 1

    def _on_repair_notice(self, notice: wire.RepairNotice, now: float) -> None:
        """Blocks whose repair, asked by someone, will cover our need need no NACK of ours."""
        geometry, timing = self.geometry, self._timing
        if geometry is None or timing is None or self.phase is not ReceiverPhase.RECEIVING:
            return
        backlog = notice.backlog_us / 1e6
        self._backlog_until = now + backlog
        for block, coming in notice.scheduled:
            if block >= geometry.block_count or self._done[block]:
                continue
            partial = self._partial.get(block)
            need = geometry.symbols_in(block) - (partial.have if partial else 0)
            if need <= coming:
                self._nacks.covered(block, now, timing.retry_after(coming), backlog)
                self.stats.nacks_suppressed += 1

    def _note_pass_packet(self, block: int) -> None:
        if block >= self._frontier:  # a pass packet of a block the pass already left: stale
            self._pass_counts[block] = self._pass_counts.get(block, 0) + 1

    def _count_passed(self, block: int) -> None:
        """The pass has moved past ``block``: fold what came of it into the loss totals."""
        got = self._pass_counts.pop(block, 0)
        if self._count_from is None or block < self._count_from or self.geometry is None:
            return
        if not got and self.manifest is not None and (
                self.manifest.hash_of(block) is None or self.manifest.is_zero(block)):
            return  # a zero block the pass skipped, as far as we can tell: nothing was lost
        expected = self.geometry.symbols_in(block) + self._proactive
        self._pass_received += min(got, expected)
        self._pass_lost += max(0, expected - got)

    def _complete_block(self, block: int, partial: _PartialBlock, now: float) -> None:
        geometry = self.geometry
        assert geometry is not None
        del self._partial[block]
        if not partial.present.all():
            codec_for(partial.k).recover_into(partial.rows, partial.present, partial.repair)
            self.stats.blocks_recovered += 1
        self._nacks.discard(block)
        if self.manifest is not None:
            self._done[block] = _HELD
            self._held[block] = partial
            self._check_held(block, now)
        else:
            self._hand_over(block, partial, now)

    def _block_view(self, block: int, partial: _PartialBlock) -> memoryview:
        assert self.geometry is not None
        return memoryview(partial.rows.reshape(-1))[:self.geometry.block_length(block)]

    def _check_held(self, block: int, now: float) -> None:
        """Hand a decoded block over if the manifest vouches for it; fetch it again if the
        manifest says otherwise; keep holding it (and ask for the hash) if it is silent."""
        assert self.manifest is not None
        partial = self._held[block]
        verdict = self.manifest.check(block, self._block_view(block, partial))
        if verdict is None:
            self.manifest.want(block, now)
            return
        del self._held[block]
        if verdict:
            self._hand_over(block, partial, now)
            return
        self.stats.blocks_rejected += 1
        self._done[block] = 0
        if block < self._frontier:
            self._nacks.add(block, now)
            if self._timing is not None:
                self._nacks.arm(now, self._timing)

    def _hand_over(self, block: int, partial: _PartialBlock, now: float) -> None:
        geometry = self.geometry
        assert geometry is not None
        self._mark_done(block)
        self._events.append(events.BlockDecoded(block, geometry.offset(block),
                                                self._block_view(block, partial)))
        self._after_block(now)

    def _mark_done(self, block: int) -> None:
        """``block`` is on the target, whichever way it got there: forget what was held or
        scheduled for it, and count it."""
        self._partial.pop(block, None)
        self._held.pop(block, None)
        self._awaiting_hash.discard(block)
        self._nacks.discard(block)
        self._done[block] = _DONE
        if self.manifest is not None:
            self.manifest.done(block)
        self.blocks_done += 1

    def needs_block(self, block: int) -> bool:
        """False once ``block`` has been handed over (or kept from the target)."""
        return self._done[block] != _DONE

    def block_on_target(self, block: int, now: float) -> None:
        """The driver found ``block`` already on the target, matching the manifest (after
        HashesLearned, with ``resume``): count it done without receiving it."""
        geometry = self.geometry
        if geometry is None or self.phase is not ReceiverPhase.RECEIVING \
                or self._done[block] == _DONE:
            return
        self._mark_done(block)
        self.stats.blocks_kept += 1
        self._after_block(now)

    def _on_manifest(self, manifest: wire.Manifest, now: float) -> None:
        if self.manifest is None:
            self.stats.foreign_packets += 1  # the sender announced none: not ours to use
            return
        learned = self.manifest.learn(manifest.first, manifest.hashes)
        if learned is None:
            self.stats.invalid_packets += 1
            return
        if not learned:
            return
        self._events.append(events.HashesLearned(learned))
        for block in learned:
            if self.manifest.is_zero(block) and self._done[block] != _DONE:
                self._zero_block(block, now)
            elif block in self._awaiting_hash:
                self._awaiting_hash.discard(block)
                if not self._done[block]:
                    self._nacks.add(block, now)
        if self._timing is not None and self.phase is ReceiverPhase.RECEIVING:
            self._nacks.arm(now, self._timing)
        for block in [b for b in self._held if b in learned]:
            self._check_held(block, now)
        self.manifest.settle(learned.start // CHUNK_BLOCKS)

    def _zero_block(self, block: int, now: float) -> None:
        """The manifest says ``block`` is all zeros: the driver zeroes it, nothing comes."""
        geometry = self.geometry
        assert geometry is not None
        self._mark_done(block)
        self.stats.blocks_zero += 1
        self._events.append(events.BlockIsZero(block, geometry.offset(block),
                                               geometry.block_length(block)))
        self._after_block(now)

    def _ask_manifest(self, now: float) -> None:
        """Ask for the manifest chunks whose hashes we lack and need."""
        assert self.manifest is not None
        if self._timing is None or self.phase is not ReceiverPhase.RECEIVING:
            return
        ask = self.manifest.next_ask()
        if ask is None or ask > now:
            return
        # A straggler asks for its chunks by unicast (nobody else needs them), a few at a
        # time, since the sender answers those at once, unpaced.
        reply = self.straggler is not None
        limit = _UNICAST_MANIFEST_CHUNKS if reply else wire.MAX_NACK_ENTRIES
        firsts = self.manifest.take_due(now, limit, self._timing.retry_after(limit))
        if firsts:
            flags = wire.Flags.MANIFEST | (wire.Flags.REPLY if reply else wire.Flags.NONE)
            self._send(wire.Nack(tuple((first, 1) for first in firsts), **self._echo_fields(now)),
                       flags)
            self.stats.manifest_requests += 1

    # -- stragglers: blocks from peers ------------------------------------------------------

    @property
    def blocks_missing(self) -> int:
        return self.geometry.block_count - self.blocks_done if self.geometry else 0

    def _on_pass_complete(self, now: float) -> None:
        """The first ANNOUNCE saying the pass is over: a late joiner, or one that missed
        much of the pass, is a straggler."""
        joined_now = self.stats.data_packets == 0  # no DATA yet: it missed the whole pass
        self._pass_complete = True
        if self.straggler is not None or self.phase is not ReceiverPhase.RECEIVING \
                or self.geometry is None:
            return
        policy = self.config.straggler
        reason = (policy.late_join(True, self.blocks_missing) if joined_now
                  else policy.missed_too_much(self.blocks_missing, self.geometry.block_count))
        if reason is not None:
            self._become_straggler(reason, now)

    def _become_straggler(self, reason: str, now: float) -> None:
        """Ask the sender for peers, and for the hashes of every block we lack (by
        unicast): every block a peer serves is checked against them."""
        self.straggler = reason
        self._peer_asks = 0
        self._peer_ask_at = now
        if self.manifest is not None:
            self.manifest.want_all(now)

    def _ask_peers(self, now: float) -> None:
        self._send(wire.PeerRequest(min(self.blocks_missing, 2**32 - 1),
                                    tuple(self._peer_exclude[-wire.packets.MAX_PEER_EXCLUDES:])))
        self.stats.peer_requests += 1
        self._peer_ask_at = self.config.straggler.next_ask(now, self._peer_asks)
        self._peer_asks += 1

    def _on_peers(self, peers: wire.Peers, now: float, wait: bool = False) -> None:
        """The tracker's answer (or its referral instead of repair)."""
        if self.phase is not ReceiverPhase.RECEIVING or self.sender_address is None:
            return
        if self.straggler is None:
            self._become_straggler("referred to peers by the sender", now)
        listed = tuple(peer for peer in peers.peers if peer.origin not in self._peer_exclude)
        if wait and not listed:
            # Every seeder is busy: ask again soon; meanwhile wait for peers, not repair.
            self._peering = True
            self._peer_ask_at = now + self.config.straggler.busy_retry
            return
        self._peer_ask_at = None
        source = (self.sender_address[0], peers.source_port) if peers.source_port else None
        self._peering = bool(listed or source)
        if not self._peering:
            self._resume_multicast_repair(now)
        self._events.append(events.PeersOffered(self.straggler or "", listed, source))

    @property
    def pass_complete(self) -> bool:
        """The sender said its pass is over: no more seeders are on their way."""
        return self._pass_complete

    def want_peers(self, now: float, failed: tuple[int, ...] = (), delay: float = 0.0) -> None:
        """(driver) The peers we were given are used up or failed (by origin): ask the
        tracker for others in ``delay`` seconds."""
        if self.phase is not ReceiverPhase.RECEIVING:
            return
        self._peer_exclude.extend(origin for origin in failed
                                  if origin not in self._peer_exclude)
        if self.straggler is None:
            self.straggler = "asked for peers"
        self._peer_asks = 0
        ask_at = now + delay  # an earlier ask already due stays due
        self._peer_ask_at = ask_at if self._peer_ask_at is None else min(self._peer_ask_at,
                                                                         ask_at)

    def peers_failed(self, now: float) -> None:
        """(driver) No peer and not the source could serve: back to multicast repair,
        the sender's own last resort -- unless the group does not reach us."""
        self._peering = False
        self._peer_ask_at = None
        if self.multicast_dead:
            self._fail("no multicast reaches this receiver, and no peer nor the source "
                       "could serve it")
            return
        self._resume_multicast_repair(now)

    def _resume_multicast_repair(self, now: float) -> None:
        """What is owed stayed scheduled while peers served us: NACK it again."""
        if self._timing is not None and self.phase is ReceiverPhase.RECEIVING:
            self._nacks.arm(now, self._timing)

    def offer_block(self, block: int, data: bytes | memoryview, now: float,
                    served_by: UnicastServer = UnicastServer.PEER) -> Optional[bool]:
        """(driver) ``data`` came from ``served_by`` as block ``block``: True if the manifest
        vouches for it (it is handed over as BlockDecoded, to be written), False if it does
        not (the peer lies or is broken: drop it), None if it cannot be used now (not
        needed any more, or its hash not known yet)."""
        geometry = self.geometry
        if geometry is None or self.phase is not ReceiverPhase.RECEIVING \
                or not 0 <= block < geometry.block_count or self._done[block] == _DONE:
            return None
        if len(data) != geometry.block_length(block):
            self.stats.peer_blocks_rejected += 1
            return False
        verdict = self.manifest.check(block, data) if self.manifest is not None else None
        if verdict is None:
            return None
        if not verdict:
            self.stats.peer_blocks_rejected += 1
            return False
        self._mark_done(block)
        self.stats.blocks_from[served_by] += 1
        self._events.append(events.BlockDecoded(block, geometry.offset(block),
                                                memoryview(data)))
        self._after_block(now)
        return True

    def _follow_new_sender(self, origin: int, now: float) -> None:
        """The same image from a new sender instance (restarted): follow it.

        Blocks handed over stay (the manifest checked them, and the image's checksum is the
        same); symbols of unfinished blocks are dropped, so that no block mixes two
        instances' packets, and the manifest is learned again from the new one.
        """
        self.sender_id = origin
        self._partial.clear()
        for block in self._held:
            self._done[block] = 0
        self._held.clear()
        self._awaiting_hash.clear()
        if self.manifest is not None:
            self.manifest.forget(self._done)
            if self.config.resume:
                self.manifest.want_all(now)
        # Tell the new instance at once that we are here (it may be waiting for us), and
        # ramp the reports up again as for a join.
        self._next_status = now
        self._statuses_sent = 0
        # The new pass starts over: what is missing is owed again as it passes.
        self._frontier = 0
        self._pass_counts.clear()
        self._nacks = NackScheduler(self._rng)

    def _after_block(self, now: float) -> None:
        geometry = self.geometry
        assert geometry is not None
        if self.blocks_done == geometry.block_count:
            self.phase = ReceiverPhase.VERIFYING
            self._nacks.nack_at = None
            self._next_status = now
            self._status_nominal = None
            self._events.append(events.AllBlocksDecoded())

    def _send_nack(self, now: float) -> None:
        geometry, timing = self.geometry, self._timing
        if geometry is None or timing is None or self.phase is not ReceiverPhase.RECEIVING \
                or self._peering:
            return
        blocks = self._nacks.take_due(now, wire.MAX_NACK_ENTRIES)
        if not blocks:
            return
        needs = []
        loss = self.loss_rate
        for block in blocks:
            partial = self._partial.get(block)
            k = geometry.symbols_in(block)
            needs.append((block, padded_need(k - (partial.have if partial else 0), loss)))
        owed = sum(need for _, need in needs)
        wait = timing.retry_after(owed)
        backlog = max(0.0, self._backlog_until - now)
        for block in blocks:
            self._nacks.asked(block, now, wait, backlog)
        self._nacks.quiet_until = now + timing.drain(owed)
        self._send(wire.Nack(tuple(needs), **self._echo_fields(now)))
        self.stats.nacks_sent += 1
        self.stats.symbols_requested += owed
        self._nacks.arm(now, timing)

    def _check_verified(self, now: float) -> None:
        if self._verified is None or self.checksum is None:
            return  # the sender's checksum may only be known at the end of its pass
        if self._verified != self.checksum:
            self._fail("the image written does not match the sender's SHA-256")
            return
        self.phase = ReceiverPhase.DONE
        self._send_status(now)
        self._done_remaining = self.config.done_copies
        self._send_done(now)
