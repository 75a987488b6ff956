"""Discrete-event driver: one Sender and many Receivers on a simulated lossy network.

The same protocol objects the socket drivers run are stepped here in simulated time, so a
test of a 5%-loss network takes milliseconds and replays exactly from its seed.

The driver's own work per receiver and multicast datagram is kept to a few list lookups
and calls, because at 10,000 receivers it is paid ten thousand times per datagram: losses
for a datagram are drawn in one call to the loss model, the listening group is a tuple
rebuilt only when it changes, and a node's timer is queued only when it moves earlier (a
receiver's inactivity deadline moves later with every packet; re-queuing it each time
would grow the event heap by one entry per delivery).
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import math
from dataclasses import dataclass, field
from typing import Optional, Union

from mcastdeploy import wire
from mcastdeploy.protocol import events
from mcastdeploy.protocol.receiver import Receiver, ReceiverPhase
from mcastdeploy.protocol.sender import Sender
from mcastdeploy.sim.network import LossModel

SENDER_HOST = "sender"
Node = Union[Sender, Receiver]

# Event kinds, ordered as the queue breaks ties at equal times and sequence numbers.
_START, _JOIN, _TIMER, _DELIVER, _MULTICAST = range(5)
_NEVER = math.inf


@dataclass
class SimResult:
    """What happened, for assertions and for the simulator's report."""

    end_time: float
    #: The receivers' targets themselves (not copied); empty with ``keep_images=False``.
    images: dict[str, bytearray]
    #: When each receiver emitted TransferComplete (after its last DONE copy).
    finished_at: dict[str, float]
    failures: dict[str, str]
    sender_events: list = field(default_factory=list)
    #: When each receiver had the whole image written and its SHA-256 accepted (phase DONE).
    verified_at: dict[str, float] = field(default_factory=dict)
    #: Per receiver: every block was handed over exactly once and matched the source image.
    intact: dict[str, bool] = field(default_factory=dict)
    #: Per receiver whose copy is not intact: what was wrong with it, in one line.
    faults: dict[str, str] = field(default_factory=dict)
    #: When the sender began the data pass (its TransferStarted), if it did.
    pass_started: Optional[float] = None


class _BlockLedger:
    """Light verification for one receiver: each decoded block is compared with the source
    at once and only a count per block is kept, instead of a copy of the whole image."""

    __slots__ = ("counts", "duplicates", "mismatched")

    def __init__(self, blocks: int) -> None:
        self.counts = bytearray(blocks)
        self.duplicates = 0
        self.mismatched: Optional[int] = None  # the first block whose bytes differed

    def record(self, block: int, matches: bool) -> None:
        if self.counts[block]:
            self.duplicates += 1
        else:
            self.counts[block] = 1
        if not matches and self.mismatched is None:
            self.mismatched = block

    def fault(self) -> Optional[str]:
        """None if every block arrived exactly once with the right bytes, else why not."""
        if self.mismatched is not None:
            return f"block {self.mismatched} differs from the source image"
        if self.duplicates:
            return f"{self.duplicates} block(s) handed over more than once"
        missing = self.counts.count(0)
        if missing:
            return f"{missing} of {len(self.counts)} blocks never handed over"
        return None


class Simulation:
    """Runs ``sender`` and ``receivers`` (by host name) until all settle or ``until`` passes.

    Multicast from the sender reaches every joined receiver after ``delay`` seconds unless
    the loss model drops it for that receiver; unicast from a receiver reaches the sender
    unless dropped on the receiver's own link.  ``join_at`` delays a receiver's start (late
    joiners hear nothing before it); ``join_after_start`` starts a receiver that long after
    the sender began its data pass, so a late joiner lands in the pass even when gathering
    the group takes a variable time.  ``bursts_after_start`` likewise times the loss
    model's bursts from the start of the pass (it sets the model's ``epoch`` then).

    With ``keep_images`` (the default) each receiver writes into its own copy of the image,
    for tests that compare whole copies.  Without it, memory stays independent of the image
    size times the group size: each ``BlockDecoded`` is compared with the source image as it
    comes and only a per-block count is kept (see :meth:`_image_digest` for why the
    receiver's SHA-256 check is still exercised faithfully).
    """

    def __init__(self, sender: Sender, image: bytes, receivers: dict[str, Receiver],
                 loss: LossModel, *, delay: float = 0.0005,
                 join_at: Optional[dict[str, float]] = None,
                 join_after_start: Optional[dict[str, float]] = None,
                 bursts_after_start: bool = False, keep_images: bool = True) -> None:
        self.sender = sender
        self.image = image
        self.receivers = receivers
        self.loss = loss
        self.delay = delay
        self.join_at = join_at or {}
        self.join_after_start = join_after_start or {}
        self.bursts_after_start = bursts_after_start
        self.keep_images = keep_images
        self._queue: list = []
        self._seq = itertools.count()
        # Nodes by index: receivers 0..n-1 in ``receivers`` order, the sender last.
        self._hosts: list[str] = [*receivers, SENDER_HOST]
        self._nodes: list[Node] = [*receivers.values(), sender]
        self._sender_index = len(receivers)
        self._wake: list[Optional[float]] = [None] * len(self._nodes)  # what nodes asked
        self._queued: list[float] = [_NEVER] * len(self._nodes)  # earliest timer queued
        self._digest = hashlib.sha256(image).digest()
        self._targets = ({host: bytearray(len(image)) for host in receivers}
                         if keep_images else {})
        self._ledgers: list[_BlockLedger] = (
            [] if keep_images else
            [_BlockLedger(sender.geometry.block_count) for _ in receivers])
        self._finished: dict[str, float] = {}
        self._failures: dict[str, str] = {}
        self._verified: dict[str, float] = {}
        self._verifying: set[int] = set()  # verified but waiting for the sender's checksum
        self._sender_events: list = []
        self._listening: dict[int, None] = {}  # joined, neither finished nor failed; ordered
        self._group: Optional[tuple[tuple[int, ...], tuple[str, ...]]] = None
        self._sender_done = False
        self._pass_started: Optional[float] = None

    def run(self, until: float) -> SimResult:
        now = 0.0
        for index, host in enumerate(self.receivers):
            if host not in self.join_after_start:
                self._push(self.join_at.get(host, 0.0), _JOIN, index, None)
        # Queued after the joins at time 0: receivers started first listen from the start.
        self._push(0.0, _START, self._sender_index, None)
        queue = self._queue
        while queue:
            when, _, kind, index, payload = heapq.heappop(queue)
            if when > until:
                now = until
                break
            now = when
            if kind == _MULTICAST:
                self._deliver_multicast(payload, now)
            elif kind == _TIMER:
                self._fire_timer(index, when)
            elif kind == _DELIVER:
                data, source = payload
                self.sender.receive_datagram(data, (source, 0), now)
                self._after_sender(now)
            elif kind == _JOIN:
                self._listening[index] = None
                self._group = None
                node = self._nodes[index]
                node.start(now)
                self._after_receiver(index, node, now)
            elif kind == _START:
                self.sender.start(now)
                self._after_sender(now)
            if self._settled():
                break
        return SimResult(now, self._targets, dict(self._finished), dict(self._failures),
                         self._sender_events, dict(self._verified), *self._verification(),
                         pass_started=self._pass_started)

    # -- the event queue and timers ---------------------------------------------------------

    def _push(self, when: float, kind: int, index: int, payload: object) -> None:
        heapq.heappush(self._queue, (when, next(self._seq), kind, index, payload))

    def _schedule(self, index: int, timer: Optional[float], now: float) -> None:
        """Note the node's wanted wake-up; queue it only if earlier than one already queued."""
        if timer is not None and timer < now:
            timer = now
        self._wake[index] = timer
        if timer is not None and timer < self._queued[index]:
            self._queued[index] = timer
            self._push(timer, _TIMER, index, None)

    def _fire_timer(self, index: int, when: float) -> None:
        """A queued timer came due: step the node if it still wants it, else re-queue."""
        if self._queued[index] != when:
            return  # superseded by an earlier entry that already came due
        self._queued[index] = _NEVER
        wanted = self._wake[index]
        if wanted is None:
            return
        if wanted > when:  # the node moved its timer later since this was queued
            self._queued[index] = wanted
            self._push(wanted, _TIMER, index, None)
            return
        node = self._nodes[index]
        node.handle_timer(when)
        if index == self._sender_index:
            self._after_sender(when)
        else:
            self._after_receiver(index, node, when)

    def _settled(self) -> bool:
        return self._sender_done and len(self._finished) + len(self._failures) >= len(
            self.receivers)

    # -- after a node was stepped -----------------------------------------------------------

    def _after_sender(self, now: float) -> None:
        """Carry out what the sender wants: blocks, events, sends, its next timer."""
        sender = self.sender
        self._feed_sender()
        self._drain_sender(now)
        self._feed_sender()
        datagrams = sender.datagrams_to_send(now)
        if datagrams:
            arrive = now + self.delay
            for data, _ in datagrams:
                self._multicast(data, now, arrive)
        self._drain_sender(now)
        self._schedule(self._sender_index, sender.get_timer(), now)

    def _after_receiver(self, index: int, node: Receiver, now: float) -> None:
        """Carry out what a receiver wants: events, unicast to the sender, its next timer.

        Called once per receiver per delivered datagram, so it makes no call it can avoid
        (``_schedule`` is written out here).
        """
        event = node.next_event()
        while event is not None:
            self._on_receiver_event(index, node, event, now)
            event = node.next_event()
        datagrams = node.datagrams_to_send(now)
        if datagrams:
            self._unicast(index, datagrams, now)
        if self._verifying and index in self._verifying:
            self._note_verified(index, node, now)
        timer = node.get_timer()
        if timer is None:
            self._wake[index] = None
            return
        if timer < now:
            timer = now
        self._wake[index] = timer
        if timer < self._queued[index]:
            self._queued[index] = timer
            heapq.heappush(self._queue, (timer, next(self._seq), _TIMER, index, None))

    def _feed_sender(self) -> None:
        sender = self.sender
        geometry = sender.geometry
        for block in sender.blocks_wanted():
            offset = geometry.offset(block)
            sender.supply_block(block, self.image[offset:offset + geometry.block_length(block)])

    def _drain_sender(self, now: float) -> None:
        while (event := self.sender.next_event()) is not None:
            self._sender_events.append(event)
            if isinstance(event, events.SessionEnded):
                self._sender_done = True
            elif isinstance(event, events.TransferStarted) and self._pass_started is None:
                self._pass_started = now
                if self.bursts_after_start:
                    self.loss.epoch = now
                for index, host in enumerate(self.receivers):
                    if host in self.join_after_start:
                        self._push(now + self.join_after_start[host], _JOIN, index, None)

    # -- the network ------------------------------------------------------------------------

    def _multicast(self, data: bytes, now: float, arrive: float) -> None:
        """One event per datagram, not per receiver: losses are drawn when it is sent."""
        if self._group is None:
            listening = tuple(self._listening)
            self._group = (listening, tuple(self._hosts[index] for index in listening))
        listening, hosts = self._group
        if not listening:
            return
        lost = self.loss.multicast_losses(hosts, now)
        if lost:
            targets = [index for position, index in enumerate(listening)
                       if position not in lost]
            if targets:
                self._push(arrive, _MULTICAST, self._sender_index, (data, targets))
        else:
            self._push(arrive, _MULTICAST, self._sender_index, (data, listening))

    def _deliver_multicast(self, payload: tuple[bytes, tuple[int, ...]], now: float) -> None:
        data, targets = payload
        address = (SENDER_HOST, 0)
        nodes = self._nodes
        after = self._after_receiver
        if self.sender.config.key is not None:  # sealed: each receiver must open it itself
            for index in targets:
                node = nodes[index]
                node.receive_datagram(data, address, now)
                after(index, node, now)
            return
        packet = wire.parse(data)  # once for every receiver; the sender only sends valid ones
        for index in targets:
            node = nodes[index]
            node.receive_packet(packet, address, now)
            after(index, node, now)

    def _unicast(self, index: int, datagrams: list[tuple[bytes, object]], now: float) -> None:
        """A receiver's datagrams to the sender, each lost or not on the receiver's link."""
        host = self._hosts[index]
        for data, _ in datagrams:
            if not self.loss.dropped(host, now):
                self._push(now + self.delay, _DELIVER, self._sender_index, (data, host))

    def _stop_listening(self, index: int) -> None:
        self._listening.pop(index, None)
        self._group = None

    # -- receiver events and verification --------------------------------------------------

    def _on_receiver_event(self, index: int, node: Receiver, event: events.Event,
                           now: float) -> None:
        if isinstance(event, events.BlockDecoded):
            self._write_block(index, event)
        elif isinstance(event, events.BlockIsZero):
            self._write_block(index, events.BlockDecoded(event.block, event.offset,
                                                         memoryview(bytes(event.length))))
        elif isinstance(event, events.AllBlocksDecoded):
            node.image_verified(self._image_digest(index), now)
            self._note_verified(index, node, now)
        elif isinstance(event, events.TransferComplete):
            self._finished[self._hosts[index]] = now
            self._stop_listening(index)
        elif isinstance(event, events.TransferFailed):
            self._failures[self._hosts[index]] = event.reason
            self._verifying.discard(index)
            self._stop_listening(index)

    def _write_block(self, index: int, event: events.BlockDecoded) -> None:
        start, end = event.offset, event.offset + len(event.data)
        if self.keep_images:
            self._targets[self._hosts[index]][start:end] = event.data
        else:
            # In place, a memcmp: memoryview == memoryview would compare item by item.
            matches = (len(event.data) == self.sender.geometry.block_length(event.block)
                       and self.image.startswith(event.data, start))
            self._ledgers[index].record(event.block, matches)

    def _image_digest(self, index: int) -> bytes:
        """The SHA-256 the receiver's driver would compute over its target.

        With images kept it is computed.  Without, the ledger decides: the blocks tile the
        image, so the written image equals the source exactly when every block was written
        once with the source's bytes, and then its SHA-256 is the source's digest, known
        in advance.  Any fault yields a digest that differs from it (as a real mismatch
        would, barring a SHA-256 collision), so the receiver's own check still runs and
        fails as it would on a real target.  Stricter than a real disk only in that a block
        written twice with the same bytes counts as a fault: the protocol should not.
        """
        if self.keep_images:
            return hashlib.sha256(self._targets[self._hosts[index]]).digest()
        if self._ledgers[index].fault() is None:
            return self._digest
        return hashlib.sha256(b"not the image: " + self._digest).digest()

    def _note_verified(self, index: int, node: Receiver, now: float) -> None:
        """Record when the receiver accepted its image; it may wait for the sender's
        checksum (announced only at the end of the pass when computed on the fly)."""
        if node.phase is ReceiverPhase.DONE:
            self._verified[self._hosts[index]] = now
            self._verifying.discard(index)
        elif node.phase is ReceiverPhase.VERIFYING:
            self._verifying.add(index)
        else:
            self._verifying.discard(index)

    def _verification(self) -> tuple[dict[str, bool], dict[str, str]]:
        """Per receiver, whether its copy is the source image exactly, and if not, why."""
        faults: dict[str, str] = {}
        for index, host in enumerate(self.receivers):
            if self.keep_images:
                fault = (None if self._targets[host] == self.image
                         else "the written image differs from the source")
            else:
                fault = self._ledgers[index].fault()
            if fault is not None:
                faults[host] = fault
        return {host: host not in faults for host in self.receivers}, faults
