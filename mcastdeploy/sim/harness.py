"""Discrete-event driver: one Sender and many Receivers on a simulated lossy network.

The same protocol objects the socket drivers run are stepped here in simulated time, so a
test of a 5%-loss network takes milliseconds and replays exactly from its seed.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
from dataclasses import dataclass, field
from typing import Optional, Union

from mcastdeploy import wire
from mcastdeploy.protocol import events
from mcastdeploy.protocol.receiver import Receiver
from mcastdeploy.protocol.sender import Sender
from mcastdeploy.sim.network import LossModel

SENDER_HOST = "sender"
Node = Union[Sender, Receiver]


@dataclass
class SimResult:
    """What happened, for assertions and for the simulator's report."""

    end_time: float
    images: dict[str, bytearray]  # the receivers' targets themselves (not copied)
    finished_at: dict[str, float]
    failures: dict[str, str]
    sender_events: list = field(default_factory=list)


class Simulation:
    """Runs ``sender`` and ``receivers`` (by host name) until all settle or ``until`` passes.

    Multicast from the sender reaches every joined receiver after ``delay`` seconds unless
    the loss model drops it for that receiver; unicast from a receiver reaches the sender
    unless dropped on the receiver's own link.  ``join_at`` delays a receiver's start (late
    joiners hear nothing before it).
    """

    def __init__(self, sender: Sender, image: bytes, receivers: dict[str, Receiver],
                 loss: LossModel, *, delay: float = 0.0005,
                 join_at: Optional[dict[str, float]] = None) -> None:
        self.sender = sender
        self.image = image
        self.receivers = receivers
        self.loss = loss
        self.delay = delay
        self.join_at = join_at or {}
        self._queue: list = []
        self._seq = itertools.count()
        self._timers: dict[str, float] = {}
        self._targets = {host: bytearray(len(image)) for host in receivers}
        self._finished: dict[str, float] = {}
        self._failures: dict[str, str] = {}
        self._sender_events: list = []
        self._joined: set[str] = set()
        self._sender_done = False

    def run(self, until: float) -> SimResult:
        now = 0.0
        for host in self.receivers:
            start = self.join_at.get(host, 0.0)
            self._push(start, "join", host, None)
        # Queued after the joins at time 0: receivers started first listen from the start.
        self._push(0.0, "start", SENDER_HOST, None)
        while self._queue:
            when, _, kind, host, payload = heapq.heappop(self._queue)
            if when > until:
                now = until
                break
            now = when
            if kind == "start":
                self.sender.start(now)
                self._after(SENDER_HOST, now)
            elif kind == "join":
                self._joined.add(host)
                self.receivers[host].start(now)
                self._after(host, now)
            elif kind == "timer":
                if self._timers.get(host) != when:
                    continue  # superseded
                del self._timers[host]
                node = self._node(host)
                node.handle_timer(now)
                self._after(host, now)
            elif kind == "deliver":
                data, source = payload
                self._node(host).receive_datagram(data, (source, 0), now)
                self._after(host, now)
            elif kind == "multicast":
                self._deliver_multicast(payload, now)
            if self._settled():
                break
        return SimResult(now, self._targets,
                         dict(self._finished), dict(self._failures), self._sender_events)

    # -- internals ------------------------------------------------------------------------

    def _node(self, host: str) -> Node:
        return self.sender if host == SENDER_HOST else self.receivers[host]

    def _push(self, when: float, kind: str, host: str, payload: object) -> None:
        heapq.heappush(self._queue, (when, next(self._seq), kind, host, payload))

    def _settled(self) -> bool:
        return self._sender_done and len(self._finished) + len(self._failures) >= len(
            self.receivers)

    def _after(self, host: str, now: float) -> None:
        """Carry out what a node wants after it was stepped: events, sends, its next timer."""
        node = self._node(host)
        if host == SENDER_HOST:
            self._feed_sender()
        self._drain_events(host, node, now)
        if host == SENDER_HOST:
            self._feed_sender()
        for data, address in node.datagrams_to_send(now):
            self._transmit(host, data, now)
        self._drain_events(host, node, now)
        timer = node.get_timer()
        if timer is not None:
            timer = max(timer, now)
            if self._timers.get(host) != timer:
                self._timers[host] = timer
                self._push(timer, "timer", host, None)

    def _feed_sender(self) -> None:
        geometry = self.sender.geometry
        for block in self.sender.blocks_wanted():
            offset = geometry.offset(block)
            self.sender.supply_block(block, self.image[offset:offset + geometry.block_length(block)])

    def _transmit(self, source: str, data: bytes, now: float) -> None:
        arrive = now + self.delay
        if source == SENDER_HOST:
            # One event per datagram, not per receiver: losses are drawn when it is sent.
            hosts = [host for host in self._joined
                     if host not in self._finished and host not in self._failures
                     and not self.loss.dropped(host, now)]
            if hosts:
                self._push(arrive, "multicast", SENDER_HOST, (data, hosts))
        elif not self.loss.dropped(source, now):
            self._push(arrive, "deliver", SENDER_HOST, (data, source))

    def _deliver_multicast(self, payload: tuple[bytes, list[str]], now: float) -> None:
        data, hosts = payload
        packet = wire.parse(data)  # once for every receiver; the sender only sends valid ones
        address = (SENDER_HOST, 0)
        for host in hosts:
            self.receivers[host].receive_packet(packet, address, now)
            self._after(host, now)

    def _drain_events(self, host: str, node: Node, now: float) -> None:
        while (event := node.next_event()) is not None:
            if host == SENDER_HOST:
                self._sender_events.append(event)
                if isinstance(event, events.SessionEnded):
                    self._sender_done = True
            elif isinstance(event, events.BlockDecoded):
                target = self._targets[host]
                target[event.offset:event.offset + len(event.data)] = event.data
            elif isinstance(event, events.AllBlocksDecoded):
                assert isinstance(node, Receiver)
                node.image_verified(hashlib.sha256(self._targets[host]).digest(), now)
            elif isinstance(event, events.TransferComplete):
                self._finished[host] = now
            elif isinstance(event, events.TransferFailed):
                self._failures[host] = event.reason
