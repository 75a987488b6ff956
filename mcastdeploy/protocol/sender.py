"""The sender's protocol state machine: no sockets, no clock, no files.

The driver feeds it datagrams and the time, asks it what to send and when to wake it, and
supplies image blocks it asks for (``blocks_wanted`` / ``supply_block``).  Because block data
comes in through that door, the same object serves a local file, a pipelined Swift download
and an in-memory simulator alike, and never holds more than a small window of the image.
"""

from __future__ import annotations

import bisect
import enum
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from mcastdeploy import wire
from mcastdeploy.fec import codec_for
from mcastdeploy.protocol import events, reporting
from mcastdeploy.protocol.geometry import ImageGeometry
from mcastdeploy.protocol.intake import admit, overhead, protection_for
from mcastdeploy.protocol.pacing import TokenBucket
from mcastdeploy.protocol.manifest import CHUNK_BLOCKS, SenderManifest, chunks_due
from mcastdeploy.protocol.parity import ProactivePolicy
from mcastdeploy.protocol.ratecontrol import AutoRate, FixedRate, RateController
from mcastdeploy.protocol.repair import RepairQueue
from mcastdeploy.protocol.rtt import GroupRtt
from mcastdeploy.protocol.tracker import Tracker, TrackerConfig

Address = tuple


@dataclass
class SenderConfig:
    session_id: int
    group: Address  # (group address, port) where multicast goes
    rate_bps: float
    symbol_size: int = 1400
    block_symbols: int = 32
    #: Repair symbols sent with every block in the data pass, before anyone asks.
    proactive_repair: int = 1
    #: Size that parity from the group's loss reports (protocol/parity.py), with
    #: ``proactive_repair`` as the floor.
    auto_proactive: bool = False
    announce_interval: float = 0.5
    #: The session secret (32 bytes): every datagram sent is sealed with it and every one
    #: received must open with it.  None only where tests and the simulator craft packets.
    key: Optional[bytes] = None
    #: Encrypt bodies too, not only authenticate them.
    encrypt: bool = False
    #: Start the pass once this many receivers are known ...
    min_receivers: int = 0
    #: ... or this many seconds after start, whichever comes first (None: no limit).
    wait: Optional[float] = None
    #: After the pass, finish when nobody has asked for anything for this long (longer in
    #: groups so large that receivers' STATUS come further apart: reporting.group_linger).
    linger: float = 5.0
    #: Even when every known receiver is done, stay this long after the last request and
    #: after the ANNOUNCE sent once they all were: a receiver whose STATUS was lost is
    #: unknown to us until it asks for what it lacks, and one that started since the
    #: previous ANNOUNCE learns of the session only from that one.
    flush: float = 0.2
    #: Group round-trip guess until receivers' echoes measure it.
    grtt: float = 0.01
    #: Unicast address receivers send NACK/STATUS to; "0.0.0.0" means the datagrams' source.
    reply_host: str = "0.0.0.0"
    reply_port: int = 0
    #: Most datagrams returned by one ``datagrams_to_send`` call.
    max_batch: int = 64
    #: Share of the rate repair may take while the data pass still runs.  Small, because
    #: the slowest receiver must not set the pace: one receiver on a 20 % loss link asks
    #: for a quarter of the pass again, and every byte of that repair sent during the pass
    #: delays everyone else.  What it lacks is owed all the same and goes out at the full
    #: rate once the pass is over (total bytes, hence the lossy receiver's finish, hardly
    #: change).  1/(1 - share) bounds how much repair can slow the pass: 2 % here.
    repair_share: float = 0.02
    #: Image blocks kept in memory for repair and lookahead.
    block_cache: int = 64
    #: Pick the rate from the group's loss reports (protocol/ratecontrol.py), with
    #: ``rate_bps`` as the ceiling, instead of sending at ``rate_bps`` throughout.
    auto_rate: bool = False
    #: TCP port of the sender's own block server (the source, stragglers' last resort),
    #: named in every PEERS; 0: none.
    source_port: int = 0
    #: How stragglers are spread over seeders (protocol/tracker.py).
    tracker: TrackerConfig = field(default_factory=TrackerConfig)

    def __post_init__(self) -> None:
        if self.rate_bps <= 0:
            raise ValueError("rate must be positive")
        if not 0 <= self.proactive_repair <= wire.MAX_SYMBOL_ID + 1 - self.block_symbols:
            raise ValueError("proactive repair does not fit in the symbol id space")
        if not 0 < self.repair_share < 1:
            raise ValueError("repair share must be between 0 and 1")


class SenderState(enum.Enum):
    WAITING = "waiting"  # gathering receivers
    SENDING = "sending"  # the data pass
    REPAIRING = "repairing"  # pass complete, answering NACKs
    FINISHED = "finished"


@dataclass
class ReceiverRecord:
    address: Address
    first_seen: float
    last_seen: float
    state: wire.ReceiverState = wire.ReceiverState.JOINING
    blocks_done: int = 0
    packets_lost: int = 0
    packets_received: int = 0
    done: bool = False
    seed_port: int = 0  # where it serves blocks once finished (STATUS); 0: it does not
    referred: bool = False  # sent to peers once instead of repair (tracker.should_refer)
    asked_peers: bool = False  # a straggler: it asked the tracker for peers
    #: Repair symbols its NACKs asked for, as heard here (the rack head's status shows it).
    symbols_asked: int = 0
    #: Of the blocks done as its last STATUS said (``blocks_reported``; a DONE after it
    #: sets ``blocks_done`` only): served by finished peers, by our block server, by the
    #: image's origin; and needing nothing (all-zero, already on the target).
    blocks_reported: int = 0
    blocks_from_peers: int = 0
    blocks_from_source: int = 0
    blocks_from_origin: int = 0
    blocks_in_place: int = 0


@dataclass
class SenderStats:
    packets_sent: int = 0
    bytes_sent: int = 0
    source_packets: int = 0
    proactive_packets: int = 0
    repair_packets: int = 0
    announce_packets: int = 0
    notice_packets: int = 0
    nacks_received: int = 0
    #: STATUS reports heard: the load receivers' periodic reports put on the sender.
    status_received: int = 0
    nack_entries: int = 0
    repairs_requested: int = 0
    nack_entries_suppressed: int = 0
    invalid_packets: int = 0
    foreign_packets: int = 0
    unauthentic_packets: int = 0
    replayed_packets: int = 0
    manifest_packets: int = 0
    #: Receivers that came back under a new origin (the old run forgotten).
    receivers_restarted: int = 0
    manifest_requests: int = 0
    #: Bytes on the wire from the pass's start to its last block (to within one batch),
    #: repair interleaved included: at a fixed rate this, not a clock, says how much a
    #: lossy receiver delayed the receivers that lost nothing.
    pass_bytes_sent: int = 0
    #: Seconds from the pass's start to its last block; 0 until the pass is complete.
    pass_seconds: float = 0.0
    #: Stragglers' requests for peers, and receivers sent to peers instead of repair.
    peer_requests: int = 0
    peer_referrals: int = 0
    #: Datagrams (and their bytes) sent by unicast to one receiver: ANNOUNCE, MANIFEST
    #: and PEERS answers to stragglers and receivers that hear no group.
    unicast_packets: int = 0
    unicast_bytes: int = 0
    #: When the first source symbol went out (None before): with a download still running,
    #: how soon pipelining put the image on the wire.
    first_data_at: Optional[float] = None


_END_COPIES = 3
_STILL_WANTING = (wire.ReceiverState.JOINING, wire.ReceiverState.RECEIVING)
_WAITING_ANNOUNCE_INTERVAL = 0.1


class Sender:
    def __init__(self, config: SenderConfig, image_size: int, *, origin: int,
                 checksum: Optional[bytes] = None,
                 manifest: Optional[SenderManifest] = None) -> None:
        self.config = config
        self.origin = origin
        self.geometry = ImageGeometry(image_size, config.symbol_size, config.block_symbols)
        self.checksum = checksum
        self.state = SenderState.WAITING
        self.stats = SenderStats()
        self.receivers: dict[int, ReceiverRecord] = {}
        self._origin_of_node: dict[int, int] = {}
        if manifest is not None and manifest.block_count != self.geometry.block_count:
            raise ValueError("the manifest does not have one hash per block")
        self.manifest = manifest
        #: MANIFEST chunks to multicast next, ahead of data (copies and requests).
        self._manifest_queue: deque[int] = deque()
        self._manifest_queued: Counter[int] = Counter()  # how often each is in the queue

        self._protection = protection_for(config.key, config.session_id, origin, config.encrypt)
        self._packet_bytes = wire.HEADER_SIZE + 8 + config.symbol_size + overhead(
            self._protection)
        self._bucket: Optional[TokenBucket] = None
        self._started_at = 0.0
        self._pass_started_at = 0.0
        self._next_announce = 0.0
        self._last_request = 0.0
        #: Once every known receiver is done, the sender ends only a flush after the next
        #: ANNOUNCE: owed until it goes out, then when it went out.
        self._done_announce_owed = False
        self._done_announced_at: Optional[float] = None
        self._events: deque[events.Event] = deque()
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.grtt = GroupRtt(config.grtt)
        self.rate: RateController = (AutoRate(config.rate_bps) if config.auto_rate
                                     else FixedRate(config.rate_bps))
        self._repair = RepairQueue(holdoff=self._holdoff())
        self._ready_repair: deque[tuple[int, int, bytes]] = deque()
        #: Repair accepted since the last REPAIR_NOTICE went out: block -> symbols coming.
        self._notices: dict[int, int] = {}
        self._repair_credit = 0.0
        #: 1 for all-zero blocks (by the manifest): never sent, receivers zero them.  Only
        #: blocks whose hash is known are marked; the pass waits at the first unknown one.
        self._zero = bytearray(self.geometry.block_count)
        self._zero_marked = 0
        self._mark_zero()
        #: Blocks of the image the driver can read (a download's prefix): the pass waits
        #: at the first one beyond, without waking the driver for it.
        self._readable = self.geometry.block_count
        self._pass_block = self._skip_zero(0)
        #: The pass position up to which manifest chunks have been queued (chunks_due).
        self._manifest_through = -1
        #: Chunks due before their hashes were all known: queued as soon as they are.
        self._manifest_deferred: list[int] = []
        self._pass_symbol = 0
        self._end_remaining = 0
        self._finished_at = 0.0
        self._proactive_rows: dict[int, np.ndarray] = {}
        self.parity = (ProactivePolicy(config.block_symbols, config.proactive_repair)
                       if config.auto_proactive else None)
        #: Where the proactive parity changed: (first block, parity), ascending.
        self._parity_changes: list[tuple[int, int]] = [(0, config.proactive_repair)]
        self.tracker = Tracker(config.tracker)
        #: Unicast answers to single receivers, sent at once (small, and few).
        self._replies: list[tuple[bytes, Address]] = []

    # -- the image ----------------------------------------------------------------------

    def blocks_wanted(self) -> list[int]:
        """Blocks the sender needs in memory to send what comes next (at most a few)."""
        wanted: list[int] = []
        if self.state is SenderState.FINISHED:
            return wanted
        if self.state in (SenderState.WAITING, SenderState.SENDING):
            limit = self._sendable()
            for block in (self._pass_block, self._skip_zero(self._pass_block + 1)):
                if block < limit and block not in self._cache:
                    wanted.append(block)
        head = self._repair.head()
        if head is not None and head not in self._cache and head not in wanted:
            wanted.append(head)
        return wanted

    def supply_block(self, block: int, data: bytes | memoryview) -> None:
        """Hand over the bytes of ``block`` (exactly its length; the last block is short)."""
        if not 0 <= block < self.geometry.block_count:
            raise ValueError(f"block {block} is outside the image")
        length = self.geometry.block_length(block)
        if len(data) != length:
            raise ValueError(f"block {block} must be {length} bytes, got {len(data)}")
        k = self.geometry.symbols_in(block)
        array = np.zeros((k, self.config.symbol_size), dtype=np.uint8)
        array.reshape(-1)[:length] = np.frombuffer(data, dtype=np.uint8)
        self._cache[block] = array
        self._cache.move_to_end(block)
        while len(self._cache) > self.config.block_cache:
            self._cache.popitem(last=False)

    def set_readable(self, blocks: int, now: float) -> None:
        """The driver can supply blocks below ``blocks`` (a download's prefix so far).

        Without it a pass that caught up with the download would ask for a block the
        driver does not have yet and wake it at every pacing time for nothing.
        """
        self._readable = min(max(blocks, 0), self.geometry.block_count)
        self._resume_pass(now)

    def extend_manifest(self, digests: bytes | list[bytes], now: float) -> None:
        """The hashes of the next blocks, in order, as a download computes them: the pass
        goes on into the chunks they complete, and manifest chunks deferred for want of
        them are queued."""
        if self.manifest is None:
            raise ValueError("this sender has no manifest")
        self.manifest.extend(digests)
        self._mark_zero()
        known = self.manifest.known_chunks
        ready = [index for index in self._manifest_deferred if index < known]
        if ready:
            self._manifest_deferred = [i for i in self._manifest_deferred if i >= known]
            self._queue_manifest(ready)
        self._resume_pass(now)

    def set_checksum(self, checksum: bytes, now: float) -> None:
        """The whole image's SHA-256, once a download has read it all: announced at once,
        since receivers that hold every block wait for it to verify their copy."""
        if self.checksum is not None and self.checksum != checksum:
            raise ValueError("the image checksum is already set to another value")
        self.checksum = checksum
        if self.state is not SenderState.FINISHED:
            self._next_announce = min(self._next_announce, now)

    def abort(self, reason: str, now: float) -> None:
        """End the session at once (END goes out): the image cannot be completed, e.g. its
        download failed or did not match the checksum receivers were promised."""
        if self.state is SenderState.FINISHED:
            return
        self._finish(reason, len(self.receivers),
                     sum(1 for record in self.receivers.values() if record.done), now)

    def pass_position(self) -> int:
        """Blocks the data pass has fully sent."""
        return self._pass_block

    # -- sans-IO interface ----------------------------------------------------------------

    def start(self, now: float) -> None:
        self._started_at = now
        self._next_announce = now
        self._last_request = now
        self._bucket = TokenBucket(self.rate.update(now),
                                   self._packet_bytes * min(self.config.max_batch, 16), now)
        self._maybe_begin(now)

    def receive_datagram(self, data: bytes, addr: Address, now: float) -> None:
        packet = admit(data, self.config.session_id, self.stats, self._protection)
        if packet is None:
            return
        header, body = packet.header, packet.body
        if isinstance(body, (wire.Announce, wire.Data, wire.End, wire.RepairNotice,
                             wire.Manifest, wire.Peers)):
            # Our own multicast looped back, or another sender on our group: not for us.
            if header.origin != self.origin:
                self.stats.foreign_packets += 1
            return
        if not self._fits_image(body):
            self.stats.invalid_packets += 1
            return
        record = self._record(header.origin, addr, now)
        if isinstance(body, (wire.Nack, wire.Status)):
            self._rtt_echo(body.echo_us, body.hold_us, now)
        if isinstance(body, wire.Nack) and header.flags & wire.Flags.MANIFEST:
            self._on_manifest_request(body, now,
                                      addr if header.flags & wire.Flags.REPLY else None)
        elif isinstance(body, wire.Nack):
            record.symbols_asked += sum(need for _, need in body.needs)
            if not self._refer(header.origin, record, addr, now):
                self._on_nack(body, now)
        elif isinstance(body, wire.PeerRequest):
            record.asked_peers = True
            self._on_peer_request(header.origin, body, addr, now)
        elif isinstance(body, wire.Status):
            self.stats.status_received += 1
            if body.node_id:
                self._same_node(body.node_id, header.origin)
            record.state = body.state
            record.blocks_done = body.blocks_done
            record.packets_lost = body.packets_lost
            record.packets_received = body.packets_received
            record.seed_port = body.seed_port
            record.blocks_reported = body.blocks_done
            record.blocks_from_peers = body.blocks_from_peers
            record.blocks_from_source = body.blocks_from_source
            record.blocks_from_origin = body.blocks_from_origin
            record.blocks_in_place = body.blocks_in_place
            self.tracker.report(header.origin, addr[0], body.seed_port,
                                body.state is wire.ReceiverState.DONE)
            if header.flags & wire.Flags.REPLY:
                self._reply_announce(addr, now)
            self.rate.report(header.origin, body.packets_received, body.packets_lost)
            if self.parity is not None:
                self.parity.report(header.origin, body.packets_received, body.packets_lost)
            if body.state in _STILL_WANTING:
                # A receiver that says it still lacks blocks is asking, if not in a NACK
                # right now (its retry may be waiting out a long round trip).
                self._last_request = now
        elif isinstance(body, wire.Done):
            if not record.done:
                record.done = True
                record.state = wire.ReceiverState.DONE
                record.blocks_done = self.geometry.block_count
                self.tracker.release(header.origin)
                self.tracker.report(header.origin, addr[0], record.seed_port, True)
                self._events.append(events.ReceiverDone(
                    header.origin, self.checksum is None or body.checksum == self.checksum))
                if self._all_done():
                    # Announce at once rather than at the next interval: a receiver that
                    # started since the last ANNOUNCE has not heard of the session, and we
                    # would otherwise end a flush from now without it.
                    self._done_announce_owed = True
                    self._done_announced_at = None
                    self._next_announce = now
        self._maybe_begin(now)
        self._maybe_finish(now)

    def handle_timer(self, now: float) -> None:
        self._maybe_begin(now)
        self._maybe_finish(now)

    def get_timer(self) -> Optional[float]:
        if self.state is SenderState.FINISHED:
            return self._finished_at if self._end_remaining else None
        deadlines = [self._next_announce]
        if self.state is SenderState.WAITING and self.config.wait is not None:
            deadlines.append(self._started_at + self.config.wait)
        if self.state is SenderState.REPAIRING and not (self._repair or self._ready_repair):
            # Only while no repair is owed: until then _maybe_finish cannot act on it, and
            # a deadline in the past would wake the driver in a busy loop.
            end = self._end_at()
            if end is not None:
                deadlines.append(end)
        # Wake at the pacing time also when only a block is missing, so that the driver
        # supplies it (blocks_wanted) and the pass or repair goes on at the full rate.
        wants_blocks = self.state is not SenderState.WAITING and bool(self.blocks_wanted())
        if (self._has_data_to_send() or wants_blocks) and self._bucket is not None:
            deadlines.append(self._bucket.ready_at(self._packet_bytes))
        return min(deadlines)

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]:
        out: list[tuple[bytes, Address]] = []
        group = self.config.group
        if self._replies:
            out, self._replies = self._replies, []
            self.stats.unicast_packets += len(out)
            self.stats.unicast_bytes += sum(len(datagram) for datagram, _ in out)
        if self.state is SenderState.FINISHED:
            while self._end_remaining:
                self._end_remaining -= 1
                out.append((self._encode(wire.End()), group))
            self._count(out)
            return out
        if now >= self._next_announce:
            self._consult_policies(now)
            out.append((self._announce(now), group))
            if self._done_announce_owed:
                self._done_announce_owed = False
                self._done_announced_at = now
            self.grtt.end_window()
            self.stats.announce_packets += 1
            interval = self.config.announce_interval
            if self.state is SenderState.WAITING:
                # Receivers can only join on an ANNOUNCE: gather them quickly.
                interval = min(interval, _WAITING_ANNOUNCE_INTERVAL)
            self._next_announce = now + interval
        if self._notices:
            # Unpaced: tiny, and their whole point is to arrive before other NACKs leave.
            entries = list(self._notices.items())
            self._notices.clear()
            for start in range(0, len(entries), wire.MAX_NACK_ENTRIES):
                chunk = tuple(entries[start:start + wire.MAX_NACK_ENTRIES])
                out.append((self._encode(wire.RepairNotice(chunk, self._backlog_us())),
                            group))
                self.stats.notice_packets += 1
        in_pass = self.state is SenderState.SENDING
        if self.state is not SenderState.WAITING:
            assert self._bucket is not None
            while len(out) < self.config.max_batch:
                if not self._has_data_to_send():
                    break
                if not self._bucket.try_consume(self._packet_bytes, now):
                    break
                datagram = self._next_data(now)
                if datagram is None:
                    break
                out.append((datagram, group))
        sent = self._count(out)
        if in_pass:
            self.stats.pass_bytes_sent += sent
        return out

    def next_event(self) -> Optional[events.Event]:
        return self._events.popleft() if self._events else None

    # -- internals ------------------------------------------------------------------------

    def _consult_policies(self, now: float) -> None:
        """Ask the rate and parity policies once per ANNOUNCE, which then tells receivers."""
        if self.parity is not None and self.state is SenderState.SENDING:
            self._set_proactive(self.parity.update(now, len(self.receivers)))
        # Receivers in large groups report less often: the rate policy must not decide on
        # deltas that only some of them, or stale ones, have reported (reporting.py).
        rate = self.rate.update(now, reporting.group_interval(len(self.receivers)))
        if self._bucket is not None and rate != self._bucket.rate_bps:
            self._bucket.set_rate(rate)

    def _backlog_us(self) -> int:
        """Time to send all repair owed now: receivers add it to their retry wait, since a
        sender that defers repair during its pass answers later than any round-trip-based
        guess.  While the pass runs repair gets ``repair_share`` of the packets; once it
        ends, all of them."""
        owed = self._repair.total + len(self._ready_repair)
        per_second = self.rate.rate_bps / (self._packet_bytes * 8)
        seconds = owed / per_second
        if self.state is SenderState.SENDING:
            share = self.config.repair_share
            remaining = ((self.geometry.block_count - self._pass_block)
                         * self._pass_symbols(self._pass_block) - self._pass_symbol)
            during_pass = remaining * share / (1 - share)
            if owed <= during_pass:
                seconds = owed / (share * per_second)
            else:
                seconds = (remaining / ((1 - share) * per_second)
                           + (owed - during_pass) / per_second)
        return min(int(seconds * 1e6), 2**32 - 1)

    def _holdoff(self) -> float:
        return max(2 * self.grtt.value, 0.002)

    def _rtt_echo(self, echo_us: int, hold_us: int, now: float) -> None:
        if echo_us:
            self.grtt.sample(now - echo_us / 1e6 - hold_us / 1e6)
            self._repair.holdoff = self._holdoff()

    def _count(self, out: list[tuple[bytes, Address]]) -> int:
        """Count what leaves; its bytes."""
        sent = sum(len(datagram) for datagram, _ in out)
        self.stats.packets_sent += len(out)
        self.stats.bytes_sent += sent
        return sent

    def _same_node(self, node: int, origin: int) -> None:
        """``origin`` reports for ``node``: if another origin did before, that receiver
        was restarted, and its old run is no longer waited for."""
        previous = self._origin_of_node.get(node)
        self._origin_of_node[node] = origin
        if previous is not None and previous != origin and previous in self.receivers:
            del self.receivers[previous]
            self.tracker.forget(previous)
            self.stats.receivers_restarted += 1

    def _fits_image(self, body: wire.packets.Body) -> bool:
        """False for a NACK or STATUS about blocks our image does not have: no receiver of
        it sends one, so it is malformed, even if sealed with the key, and must not make
        its origin a receiver we then wait for (it would never report done)."""
        count = self.geometry.block_count
        if isinstance(body, wire.Nack):
            return all(block < count for block, _ in body.needs)
        if isinstance(body, wire.Status):
            return body.block_count in (0, count) and body.blocks_done <= count
        return True

    def _record(self, origin: int, addr: Address, now: float) -> ReceiverRecord:
        record = self.receivers.get(origin)
        if record is None:
            record = self.receivers[origin] = ReceiverRecord(addr, now, now)
            self._events.append(events.ReceiverJoined(origin, addr))
        record.address = addr
        record.last_seen = now
        return record

    def _encode(self, body: wire.packets.Body, flags: wire.Flags = wire.Flags.NONE) -> bytes:
        datagram = wire.encode(self.config.session_id, self.origin, body, flags)
        return datagram if self._protection is None else self._protection.seal(datagram)

    def _data_datagram(self, block: int, symbol: int, payload: bytes | memoryview,
                       flags: wire.Flags = wire.Flags.NONE) -> bytes:
        """A DATA datagram, sealed as it is assembled: the payload is copied once."""
        head = wire.encode_data_header(self.config.session_id, self.origin, block, symbol, flags)
        if self._protection is None:
            return head + payload
        return self._protection.seal(head, payload)

    def _announce(self, now: float, flags: wire.Flags = wire.Flags.NONE) -> bytes:
        if self.checksum is not None:
            flags |= wire.Flags.CHECKSUM_KNOWN
        if self.state is SenderState.WAITING:
            flags |= wire.Flags.WAITING
        if self._pass_block >= self.geometry.block_count:
            flags |= wire.Flags.PASS_COMPLETE
        if self.manifest is not None:
            flags |= wire.Flags.MANIFEST
        return self._encode(wire.Announce(
            image_size=self.geometry.image_size,
            symbol_size=self.geometry.symbol_size,
            block_symbols=self.geometry.block_symbols,
            block_count=self.geometry.block_count,
            next_block=self._pass_block,
            rate_bps=int(self.rate.rate_bps),
            grtt_us=int(self.grtt.value * 1e6),
            group_size=max(1, len(self.receivers)),
            proactive_repair=self._proactive_of(self._pass_block),
            checksum=self.checksum or bytes(32),
            sender_host=self.config.reply_host,
            sender_port=self.config.reply_port,
            timestamp_us=max(1, int(now * 1e6)),
            backlog_us=self._backlog_us(),
        ), flags)

    def _maybe_begin(self, now: float) -> None:
        if self.state is not SenderState.WAITING:
            return
        wanted = self.config.min_receivers
        enough = len(self.receivers) >= wanted if wanted else True
        timed_out = self.config.wait is not None and now >= self._started_at + self.config.wait
        if enough or timed_out:
            self.state = SenderState.SENDING
            self._next_announce = now  # tell everyone at once that the pass begins
            self._pass_started_at = now
            self._events.append(events.TransferStarted(len(self.receivers)))
            if self._pass_block >= self.geometry.block_count:  # nothing but zeros
                self._complete_pass(now)

    def _all_done(self) -> bool:
        known = len(self.receivers)
        return (known > 0 and known >= self.config.min_receivers
                and all(record.done for record in self.receivers.values()))

    def _end_at(self) -> Optional[float]:
        """When the sender may end if it hears nothing more.

        Once every known receiver is done: ``flush`` after both the last request (to hear
        from receivers whose STATUS was lost) and the ANNOUNCE sent since they all were (so
        that a receiver started after the previous ANNOUNCE hears of the session and joins
        before we end); None until that ANNOUNCE is out, which is due at once.  Otherwise
        ``linger`` after the last request, stretched to outlast a few of the STATUS gaps
        of the group's size: a receiver still missing blocks may be between NACKs, and its
        STATUS is then what says it is still there.
        """
        linger = self.config.linger
        if not self._all_done():
            return self._last_request + self._linger()
        if self._done_announced_at is None:
            return None
        return (max(self._last_request, self._done_announced_at)
                + min(self.config.flush, linger))

    def _linger(self) -> float:
        return reporting.group_linger(len(self.receivers), self.config.linger)

    def _maybe_finish(self, now: float) -> None:
        if self.state is not SenderState.REPAIRING or self._repair or self._ready_repair:
            return
        end = self._end_at()
        if end is None or now < end:
            return
        known = len(self.receivers)
        done = sum(1 for record in self.receivers.values() if record.done)
        reason = ("every receiver is done" if self._all_done()
                  else f"nothing asked for {self._linger():g} s")
        self._finish(reason, known, done, now)

    def _finish(self, reason: str, known: int, done: int, now: float) -> None:
        self.state = SenderState.FINISHED
        self._finished_at = now
        self._end_remaining = _END_COPIES
        self._cache.clear()
        self._events.append(events.SessionEnded(reason, known, done))

    def _on_nack(self, nack: wire.Nack, now: float) -> None:
        self.stats.nacks_received += 1
        for block, need in nack.needs:
            self.stats.nack_entries += 1
            if block >= self._pass_block or self.state is SenderState.FINISHED:
                continue  # not sent yet (it is coming in the pass) or too late
            # Lossy receivers pad their need (repair.padded_need); twice k bounds any sane one.
            need = min(need, 2 * self.geometry.symbols_in(block))
            # Even a NACK we ignore as a duplicate shows a receiver still at work: the
            # linger counts from it, or a slow round trip could end the session under it.
            self._last_request = now
            if self._repair.request(block, need, now):
                self.stats.repairs_requested += need
                self._notices[block] = self._repair.owed(block)
            else:
                self.stats.nack_entries_suppressed += 1

    # -- the tracker: stragglers sent to peers --------------------------------------------

    def _reply_announce(self, addr: Address, now: float) -> None:
        """A receiver that hears nothing of the group (or not yet): the ANNOUNCE by
        unicast, so that it can join, and tell that only the group is silent."""
        if self.state is not SenderState.FINISHED:
            self._replies.append((self._announce(now, wire.Flags.REPLY), addr))

    def _peers_answer(self, straggler: int, addr: Address, now: float,
                      exclude: tuple[int, ...] = ()) -> None:
        peers = self.tracker.peers_for(straggler, now, exclude)
        flags = wire.Flags.REPLY
        if not peers and self.tracker.all_busy(straggler, now, exclude):
            flags |= wire.Flags.WAIT
        self._replies.append((self._encode(wire.Peers(tuple(peers), self.config.source_port),
                                           flags), addr))

    def _on_peer_request(self, origin: int, request: wire.PeerRequest, addr: Address,
                         now: float) -> None:
        self.stats.peer_requests += 1
        if self.state is SenderState.FINISHED:
            return
        self._last_request = now  # a straggler at work keeps the session open
        self._peers_answer(origin, addr, now, request.exclude)

    def _refer(self, origin: int, record: ReceiverRecord, addr: Address, now: float) -> bool:
        """After the pass, send a receiver that still lacks much of the image to peers
        rather than repeat it on the group (once: one that keeps asking gets repair)."""
        if record.referred or self.state is not SenderState.REPAIRING \
                or not self.tracker.should_refer(self.geometry.block_count - record.blocks_done,
                                                 self.geometry.block_count, True):
            return False
        record.referred = True
        self.stats.peer_referrals += 1
        self._last_request = now
        self._peers_answer(origin, addr, now)
        return True

    def _proactive_of(self, block: int) -> int:
        """The proactive parity ``block`` had (or will have) in the pass."""
        index = bisect.bisect_right(self._parity_changes, (block, wire.MAX_SYMBOL_ID + 1)) - 1
        return self._parity_changes[index][1]

    def _set_proactive(self, parity: int) -> None:
        """Change the parity from the next block the pass starts (never mid-block)."""
        first = self._pass_block + (1 if self._pass_symbol else 0)
        if parity == self._proactive_of(first):
            return
        while self._parity_changes and self._parity_changes[-1][0] >= first:
            self._parity_changes.pop()
        self._parity_changes.append((first, parity))

    def _pass_symbols(self, block: int) -> int:
        return self.geometry.symbols_in(block) + self._proactive_of(block)

    def _has_data_to_send(self) -> bool:
        if self.state in (SenderState.WAITING, SenderState.FINISHED):
            return False
        if self._ready_repair or self._manifest_queue:
            return True
        if self._repair and self._repair.head() in self._cache:
            return True
        return self._pass_ready()

    def _next_data(self, now: float) -> Optional[bytes]:
        if self._pass_ready() and not self._pass_symbol:
            # Queue the chunks due at this block before its first symbol, not after it.
            self._advance_manifest(self._pass_block)
        if self._manifest_queue:  # hashes go before the blocks they cover
            return self._next_manifest()
        pass_ready = self._pass_ready()
        repair_ready = bool(self._ready_repair) or (
            bool(self._repair) and self._repair.head() in self._cache)
        share = self.config.repair_share
        if repair_ready and (not pass_ready or self._repair_credit >= 1.0):
            datagram = self._next_repair(now)
            if datagram is not None:
                self._repair_credit = max(0.0, self._repair_credit - 1.0)
                return datagram
        if pass_ready:
            self._repair_credit = min(self._repair_credit + share / (1 - share), 16.0)
            return self._next_pass_symbol(now)
        return None

    def _next_manifest(self) -> bytes:
        assert self.manifest is not None
        index = self._manifest_queue.popleft()
        self._manifest_queued[index] -= 1
        first, hashes = self.manifest.chunk(index)
        self.stats.manifest_packets += 1
        return self._encode(wire.Manifest(first, hashes))

    def _queue_manifest(self, chunks: list[int]) -> None:
        self._manifest_queue.extend(chunks)
        self._manifest_queued.update(chunks)

    def _on_manifest_request(self, nack: wire.Nack, now: float,
                             reply_to: Optional[Address] = None) -> None:
        """A receiver lacks hashes: multicast the chunks it names (once, if already queued)."""
        self.stats.manifest_requests += 1
        if self.manifest is None or self.state is SenderState.FINISHED:
            return
        self._last_request = now  # a receiver still at work, as for any NACK
        # A straggler's (REPLY): only it needs these, so they go to it alone, at once.
        needs = nack.needs if reply_to is None else nack.needs[:wire.packets.MAX_UNICAST_CHUNKS]
        for first, _ in needs:
            index, offset = divmod(first, CHUNK_BLOCKS)
            if offset or index >= self.manifest.known_chunks:
                continue  # not a chunk's first block, or not hashed yet
            if reply_to is not None:
                chunk_first, hashes = self.manifest.chunk(index)
                self._replies.append((self._encode(wire.Manifest(chunk_first, hashes),
                                                   wire.Flags.REPLY), reply_to))
            elif not self._manifest_queued[index]:
                self._queue_manifest([index])

    def _next_pass_symbol(self, now: float) -> bytes:
        block = self._pass_block
        symbol = self._pass_symbol
        if symbol == 0:
            self._advance_manifest(block)
        array = self._cache[block]
        k = array.shape[0]
        if symbol < k:
            payload = array[symbol].data
            if not self.stats.source_packets:
                self.stats.first_data_at = now
            self.stats.source_packets += 1
        else:
            if symbol == k:  # encode the block's proactive symbols in one codec call
                ids = list(range(k, k + self._proactive_of(block)))
                self._proactive_rows = dict(zip(ids, codec_for(k).encode(array, ids)))
            payload = self._proactive_rows.pop(symbol).data
            self.stats.proactive_packets += 1
        datagram = self._data_datagram(block, symbol, payload)
        self._pass_symbol += 1
        if self._pass_symbol >= self._pass_symbols(block):
            self._pass_block = self._skip_zero(block + 1)
            self._pass_symbol = 0
            if self._pass_block >= self.geometry.block_count:
                self._complete_pass(now)
        return datagram

    def _skip_zero(self, block: int) -> int:
        """The first block from ``block`` on that the pass sends (zero blocks are not)."""
        zero, count = self._zero, self._vouched()
        while block < count and zero[block]:
            block += 1
        return block

    def _advance_manifest(self, block: int) -> None:
        """Queue the manifest chunks due before the pass's first symbol of ``block``; those
        not fully known yet (a chunk ahead, while downloading) wait in the deferred list."""
        if self.manifest is not None and block > self._manifest_through:
            known = self.manifest.known_chunks
            due = chunks_due(self._manifest_through, block, self.manifest.chunk_count)
            self._queue_manifest([index for index in due if index < known])
            self._manifest_deferred.extend(index for index in due if index >= known)
            self._manifest_through = block

    def _vouched(self) -> int:
        """Blocks whose whole manifest chunk is known: the pass may send (or skip as zero)
        only these, so that every chunk goes out, twice, before its blocks."""
        if self.manifest is None:
            return self.geometry.block_count
        return min(self.manifest.known_chunks * CHUNK_BLOCKS, self.geometry.block_count)

    def _sendable(self) -> int:
        """The pass may send blocks below this: hashes known and data readable."""
        return min(self._vouched(), self._readable)

    def _mark_zero(self) -> None:
        """Mark the zero blocks among those whose hash became known."""
        if self.manifest is None:
            return
        g = self.geometry
        start = self._zero_marked
        flags = self.manifest.zero_blocks(g.block_bytes, g.block_length(g.block_count - 1),
                                          start)
        self._zero[start:start + len(flags)] = flags
        self._zero_marked = start + len(flags)

    def _pass_ready(self) -> bool:
        return (self.state is SenderState.SENDING and self._pass_block < self._sendable()
                and self._pass_block in self._cache)

    def _resume_pass(self, now: float) -> None:
        """More of the image became known: skip the zero blocks now known to be zero, and
        end a pass that thereby reached the end."""
        if self.state in (SenderState.WAITING, SenderState.SENDING) and not self._pass_symbol:
            self._pass_block = self._skip_zero(self._pass_block)
            if (self.state is SenderState.SENDING
                    and self._pass_block >= self.geometry.block_count):
                self._complete_pass(now)

    def _complete_pass(self, now: float) -> None:
        # Chunks of trailing zero blocks still go out: receivers learn them zero from it.
        self._advance_manifest(self.geometry.block_count - 1)
        self.state = SenderState.REPAIRING
        self._last_request = now
        self._next_announce = now  # announce PASS_COMPLETE at once
        self.stats.pass_seconds = now - self._pass_started_at
        self._events.append(events.PassComplete())

    def _next_repair(self, now: float) -> Optional[bytes]:
        if not self._ready_repair:
            block = self._repair.head()
            if block is None or block not in self._cache:
                return None
            array = self._cache[block]
            self._cache.move_to_end(block)
            k = array.shape[0]
            count = self._repair.take(block, 8, now)
            ids = self._repair.fresh_ids(block, count, k + self._proactive_of(block))
            repair_ids = [i for i in ids if i >= k]
            encoded = dict(zip(repair_ids, codec_for(k).encode(array, repair_ids))) \
                if repair_ids else {}
            for symbol in ids:
                row = array[symbol] if symbol < k else encoded[symbol]
                self._ready_repair.append((block, symbol, row.tobytes()))
        block, symbol, payload = self._ready_repair.popleft()
        self.stats.repair_packets += 1
        if not self._ready_repair and not self._repair:
            # The quiet time before ending counts from the last repair sent, not from the
            # request: after a long backlog receivers must still get time to ask again.
            self._last_request = now
        return self._data_datagram(block, symbol, payload, wire.Flags.REPAIR)
