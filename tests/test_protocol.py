"""The sans-IO sender and receiver, stepped by hand in simulated time, and the lossy simulator.

No sockets and no clock: every test passes ``now`` explicitly, so timing rules (pacing,
back-off, retry, linger, timeout) are checked exactly and every run replays.
"""

from __future__ import annotations

import hashlib
import math
import random
import statistics
from typing import Callable, Optional

import numpy as np
import pytest

from mcastdeploy import wire
from mcastdeploy.fec import codec_for
from mcastdeploy.protocol import events, repair, reporting
from mcastdeploy.protocol.geometry import ImageGeometry
from mcastdeploy.protocol.pacing import TokenBucket
from mcastdeploy.protocol.receiver import Receiver, ReceiverConfig, ReceiverPhase
from mcastdeploy.protocol.sender import Sender, SenderConfig, SenderState
from mcastdeploy.sim import BurstLoss, LossModel, Simulation

SID = 0x5E55_10E1
GROUP = ("239.1.2.3", 9000)
SENDER_ORIGIN = 0xA11CE
SOURCE_ADDR = ("10.0.0.9", 5555)  # where the sender's multicast comes from


def random_image(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def drain_events(node: Sender | Receiver) -> list:
    out = []
    while (event := node.next_event()) is not None:
        out.append(event)
    return out


# --- geometry --------------------------------------------------------------------------------


@pytest.mark.parametrize("symbol_size, k", [(64, 4), (1400, 32), (1, 3), (3, 1), (10, 254)])
@pytest.mark.parametrize("delta", [-1, 0, 1])
@pytest.mark.parametrize("blocks", [1, 2, 5])
def test_geometry_at_block_boundaries(symbol_size: int, k: int, delta: int, blocks: int) -> None:
    block_bytes = symbol_size * k
    size = blocks * block_bytes + delta
    geometry = ImageGeometry(size, symbol_size, k)
    expected_blocks = blocks + (delta > 0)
    assert geometry.block_bytes == block_bytes
    assert geometry.block_count == expected_blocks
    lengths = [geometry.block_length(b) for b in range(expected_blocks)]
    assert sum(lengths) == size
    assert all(length == block_bytes for length in lengths[:-1])
    for b in range(expected_blocks):
        assert geometry.offset(b) == b * block_bytes
    last = expected_blocks - 1
    last_length = {-1: block_bytes - 1, 0: block_bytes, 1: 1}[delta]
    assert lengths[-1] == last_length
    assert geometry.symbols_in(last) == math.ceil(last_length / symbol_size)
    assert all(geometry.symbols_in(b) == k for b in range(last))


def test_geometry_last_block_symbols() -> None:
    geometry = ImageGeometry(3 * 256 + 100, 64, 4)
    assert geometry.block_count == 4
    assert [geometry.symbols_in(b) for b in range(4)] == [4, 4, 4, 2]
    assert geometry.block_length(3) == 100
    assert ImageGeometry(3 * 256 + 64, 64, 4).symbols_in(3) == 1
    assert ImageGeometry(3 * 256 + 65, 64, 4).symbols_in(3) == 2


@pytest.mark.parametrize("size, symbol_size, k", [(0, 64, 4), (10, 0, 4), (10, 64, 0),
                                                  (10, 64, wire.MAX_BLOCK_SYMBOLS + 1)])
def test_geometry_rejects_bad_parameters(size: int, symbol_size: int, k: int) -> None:
    with pytest.raises(ValueError):
        ImageGeometry(size, symbol_size, k)


# --- pacing ----------------------------------------------------------------------------------


def test_token_bucket_burst_then_rate() -> None:
    bucket = TokenBucket(rate_bps=8_000, burst_bytes=300, now=0.0)  # 1000 bytes/s
    assert [bucket.try_consume(100, 0.0) for _ in range(4)] == [True, True, True, False]
    ready = bucket.ready_at(100)
    assert ready == pytest.approx(0.1)  # empty: 100 bytes take 0.1 s
    assert not bucket.try_consume(100, ready - 1e-3)
    assert bucket.try_consume(100, ready)
    # After a long idle the bucket holds only its burst.
    assert [bucket.try_consume(100, 100.0) for _ in range(4)] == [True, True, True, False]
    with pytest.raises(ValueError):
        TokenBucket(0, 100, 0.0)


@pytest.mark.parametrize("rate_bps, packet", [(8e6, 1428), (1e9, 1428), (64_000, 100)])
def test_token_bucket_rate_over_simulated_time(rate_bps: float, packet: int) -> None:
    burst = packet * 16
    bucket = TokenBucket(rate_bps, burst, now=0.0)
    duration = 20_000 * packet * 8 / rate_bps  # long enough for 20k packets at the rate
    now, sent, wakeups = 0.0, 0, 0
    while True:
        while bucket.try_consume(packet, now):
            sent += packet
        ready = bucket.ready_at(packet)
        assert ready > now  # empty bucket: the next wakeup is in the future, no busy loop
        if ready > duration:
            break
        now = ready
        wakeups += 1
    allowed = rate_bps / 8 * duration + burst
    assert allowed - packet <= sent <= allowed
    assert wakeups <= sent // packet  # every wakeup sends


def test_token_bucket_set_rate() -> None:
    bucket = TokenBucket(8_000, 100, now=0.0)
    assert bucket.try_consume(100, 0.0)
    bucket.set_rate(16_000)
    assert bucket.ready_at(100) == pytest.approx(0.05)
    with pytest.raises(ValueError):
        bucket.set_rate(-1)


# --- sender ----------------------------------------------------------------------------------


def make_sender(size: int, *, checksum: Optional[bytes] = None, **config) -> Sender:
    settings = dict(session_id=SID, group=GROUP, rate_bps=1e9, symbol_size=64, block_symbols=4,
                    proactive_repair=1, reply_host="10.0.0.9", reply_port=7000)
    settings.update(config)
    return Sender(SenderConfig(**settings), size, origin=SENDER_ORIGIN, checksum=checksum)


def feed(sender: Sender, image: bytes) -> None:
    geometry = sender.geometry
    for block in sender.blocks_wanted():
        start = geometry.offset(block)
        sender.supply_block(block, image[start:start + geometry.block_length(block)])


def step(sender: Sender, image: bytes, now: float) -> list[wire.Packet]:
    """One driver turn: the timer if due, the blocks it wants, then what it sends."""
    timer = sender.get_timer()
    if timer is not None and timer <= now:
        sender.handle_timer(now)
    feed(sender, image)
    out = []
    for datagram, address in sender.datagrams_to_send(now):
        assert address == GROUP
        out.append(wire.parse(datagram))
    return out


def drive(sender: Sender, image: bytes, now: float, until: float,
          stop: Optional[Callable[[Sender], bool]] = None
          ) -> tuple[float, list[tuple[float, wire.Packet]]]:
    """Step the sender at each of its timers until ``until`` or ``stop``; returns (now, sent)."""
    sent: list[tuple[float, wire.Packet]] = []
    idle_turns = 0
    while now <= until:
        packets = step(sender, image, now)
        sent.extend((now, packet) for packet in packets)
        if stop is not None and stop(sender):
            break
        timer = sender.get_timer()
        if timer is None:
            break
        # A sender that asks to be woken now yet sends nothing would spin its driver.
        idle_turns = idle_turns + 1 if timer <= now and not packets else 0
        assert idle_turns < 3, f"busy loop at t={now}"
        now = max(now, timer)
    return now, sent


def data_of(sent: list, *, repair: Optional[bool] = None) -> list[tuple[int, int]]:
    out = []
    for item in sent:
        packet = item[1] if isinstance(item, tuple) else item
        if isinstance(packet.body, wire.Data):
            is_repair = bool(packet.header.flags & wire.Flags.REPAIR)
            if repair is None or repair == is_repair:
                out.append((packet.body.block, packet.body.symbol))
    return out


def reply(body: wire.packets.Body, origin: int, session: int = SID) -> bytes:
    return wire.encode(session, origin, body)


def status(state: wire.ReceiverState = wire.ReceiverState.RECEIVING) -> wire.Status:
    return wire.Status(state, 0, 0, 0, 0, 0)


def block_rows(image: bytes, geometry: ImageGeometry, block: int) -> np.ndarray:
    k = geometry.symbols_in(block)
    rows = np.zeros((k, geometry.symbol_size), dtype=np.uint8)
    start = geometry.offset(block)
    chunk = image[start:start + geometry.block_length(block)]
    rows.reshape(-1)[:len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
    return rows


def symbol_bytes(image: bytes, geometry: ImageGeometry, block: int, symbol: int) -> bytes:
    rows = block_rows(image, geometry, block)
    if symbol < rows.shape[0]:
        return rows[symbol].tobytes()
    return codec_for(rows.shape[0]).encode(rows, [symbol])[0].tobytes()


def test_sender_waits_for_min_receivers() -> None:
    image = random_image(1000)
    checksum = hashlib.sha256(image).digest()
    sender = make_sender(len(image), checksum=checksum, min_receivers=2, announce_interval=0.5)
    sender.start(0.0)
    assert sender.state is SenderState.WAITING

    first = step(sender, image, 0.0)
    assert len(first) == 1 and isinstance(first[0].body, wire.Announce)
    header, announce = first[0].header, first[0].body
    assert header.flags & wire.Flags.WAITING and header.flags & wire.Flags.CHECKSUM_KNOWN
    assert not header.flags & wire.Flags.PASS_COMPLETE
    assert (header.session_id, header.origin) == (SID, SENDER_ORIGIN)
    assert (announce.image_size, announce.symbol_size, announce.block_symbols,
            announce.block_count, announce.next_block) == (1000, 64, 4, 4, 0)
    assert announce.checksum == checksum
    assert (announce.sender_host, announce.sender_port) == ("10.0.0.9", 7000)
    # No wait limit: only the next ANNOUNCE, sooner than the interval while gathering.
    assert sender.get_timer() == pytest.approx(0.1)

    # While waiting, only ANNOUNCEs (every 0.1 s) go out, even with blocks at hand.
    _, sent = drive(sender, image, 0.01, 2.0)
    times = [t for t, _ in sent]
    assert len(times) in (19, 20) and times[0] == pytest.approx(0.1)  # (float sums)
    assert all(b - a == pytest.approx(0.1) for a, b in zip(times, times[1:]))
    assert all(isinstance(p.body, wire.Announce) and p.header.flags & wire.Flags.WAITING
               for _, p in sent)

    sender.receive_datagram(reply(status(), 1), ("10.0.0.1", 4000), 2.1)
    sender.receive_datagram(reply(status(), 1), ("10.0.0.1", 4000), 2.2)  # same receiver again
    assert sender.state is SenderState.WAITING
    assert not data_of(step(sender, image, 2.2))
    sender.receive_datagram(reply(status(), 2), ("10.0.0.2", 4000), 2.3)
    assert sender.state is SenderState.SENDING
    assert drain_events(sender) == [events.ReceiverJoined(1, ("10.0.0.1", 4000)),
                                    events.ReceiverJoined(2, ("10.0.0.2", 4000)),
                                    events.TransferStarted(2)]
    started = step(sender, image, 2.3)
    assert isinstance(started[0].body, wire.Announce)
    assert not started[0].header.flags & wire.Flags.WAITING  # the pass start is announced at once
    assert data_of(started)[:3] == [(0, 0), (0, 1), (0, 2)]


def test_sender_starts_when_wait_elapses() -> None:
    image = random_image(1000)
    sender = make_sender(len(image), min_receivers=5, wait=1.0, announce_interval=10.0)
    sender.start(0.0)
    announces = []
    now = 0.0
    while (timer := sender.get_timer()) < 1.0:
        now = timer
        announces += step(sender, image, now)
    assert sender.get_timer() == 1.0
    # Every 0.1 s from 0 to just below 1.0 (float sums may add one more at 0.999...).
    assert len(announces) in (10, 11)
    assert all(isinstance(p.body, wire.Announce) for p in announces)
    sender.handle_timer(0.999)
    assert sender.state is SenderState.WAITING
    sender.receive_datagram(reply(status(), 1), ("10.0.0.1", 1), 0.5)
    assert sender.state is SenderState.WAITING
    sender.handle_timer(1.0)
    assert sender.state is SenderState.SENDING
    assert drain_events(sender)[-1] == events.TransferStarted(1)
    assert data_of(step(sender, image, 1.0))


def test_sender_without_min_receivers_starts_at_once() -> None:
    image = random_image(1000)
    sender = make_sender(len(image))
    sender.start(0.0)
    assert sender.state is SenderState.SENDING
    assert data_of(step(sender, image, 0.0))


def test_data_pass_order_and_payloads() -> None:
    image = random_image(2 * 256 + 100)  # k=4 x 64 B: blocks of 4, 4 and 2 symbols
    sender = make_sender(len(image), proactive_repair=2)
    sender.start(0.0)
    _, sent = drive(sender, image, 0.0, 10.0, stop=lambda s: s.state is not SenderState.SENDING)
    assert sender.state is SenderState.REPAIRING
    assert data_of(sent, repair=True) == []
    assert data_of(sent) == [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (0, 5),
                             (1, 0), (1, 1), (1, 2), (1, 3), (1, 4), (1, 5),
                             (2, 0), (2, 1), (2, 2), (2, 3)]
    geometry = sender.geometry
    for _, packet in sent:
        if isinstance(packet.body, wire.Data):
            body = packet.body
            assert bytes(body.payload) == symbol_bytes(image, geometry, body.block, body.symbol)
    assert sender.stats.source_packets == 10 and sender.stats.proactive_packets == 6
    assert events.PassComplete() in drain_events(sender)
    final = step(sender, image, sender.get_timer())
    assert final[0].header.flags & wire.Flags.PASS_COMPLETE
    assert final[0].body.next_block == 3


@pytest.mark.parametrize("rate_bps", [2e6, 50e6])
@pytest.mark.parametrize("block_symbols", [2, 8])  # 2: the burst spans several blocks
def test_sender_paces_at_its_rate(rate_bps: float, block_symbols: int) -> None:
    image = random_image(4_000_000)
    sender = make_sender(len(image), rate_bps=rate_bps, symbol_size=1000,
                         block_symbols=block_symbols, announce_interval=0.25)
    sender.start(0.0)
    interval = 1028 * 8 / rate_bps  # one DATA datagram at the rate
    duration = 4000 * interval
    _, sent = drive(sender, image, 0.0, duration)
    assert sender.state is SenderState.SENDING  # the image is far from sent
    data_bytes = sum(len(wire.encode(SID, 0, p.body)) for _, p in sent
                     if isinstance(p.body, wire.Data))
    burst = 16 * 1028
    assert rate_bps / 8 * duration - 1028 <= data_bytes <= rate_bps / 8 * duration + burst + 1
    # After the initial burst, packets are spread evenly: no clumps and no pauses.
    late = [t for t, p in sent if isinstance(p.body, wire.Data) and t > duration / 2]
    gaps = np.diff(late)
    assert 0.99 * interval <= gaps.min() and gaps.max() <= 1.01 * interval


def finish_pass(sender: Sender, image: bytes) -> float:
    now, _ = drive(sender, image, 0.0, 100.0, stop=lambda s: s.state is not SenderState.SENDING)
    assert sender.state is SenderState.REPAIRING
    drain_events(sender)
    return now


def test_repair_uses_fresh_ids_and_the_largest_need() -> None:
    image = random_image(3 * 256)
    sender = make_sender(len(image), proactive_repair=1, grtt=0.01)
    sender.start(0.0)
    now = finish_pass(sender, image)
    geometry = sender.geometry
    ever_sent = {b: {s for s in range(5)} for b in range(3)}  # the pass sent ids 0..4

    def repairs_at(t: float) -> list[tuple[int, int]]:
        sent = drive(sender, image, t, t, stop=lambda s: True)[1]
        for _, packet in sent:
            if isinstance(packet.body, wire.Data):
                body = packet.body
                assert packet.header.flags & wire.Flags.REPAIR
                assert bytes(body.payload) == symbol_bytes(image, geometry, body.block, body.symbol)
        pairs = data_of(sent, repair=True)
        for block, symbol in pairs:
            assert symbol not in ever_sent[block], "a repair id was sent before"
            ever_sent[block].add(symbol)
        return pairs

    t = now + 0.1
    sender.receive_datagram(reply(wire.Nack(((0, 2),)), 11), ("10.0.0.11", 1), t)
    sender.receive_datagram(reply(wire.Nack(((0, 3), (1, 1))), 12), ("10.0.0.12", 1), t)
    sender.receive_datagram(reply(wire.Nack(((0, 1),)), 13), ("10.0.0.13", 1), t)
    assert repairs_at(t) == [(0, 5), (0, 6), (0, 7), (1, 5)]  # max need of 2, 3, 1 for block 0
    assert sender.stats.repair_packets == 4

    # Within the holdoff, a NACK asking no more than the round carried was sent before it
    # arrived: suppressed.  Asking for more is answered.
    holdoff = 2 * 0.01
    sender.receive_datagram(reply(wire.Nack(((0, 3),)), 11), ("10.0.0.11", 1), t + holdoff / 2)
    sender.receive_datagram(reply(wire.Nack(((1, 1),)), 11), ("10.0.0.11", 1), t + holdoff / 2)
    assert sender.stats.nack_entries_suppressed == 2
    assert repairs_at(t + holdoff / 2) == []
    sender.receive_datagram(reply(wire.Nack(((0, 4),)), 12), ("10.0.0.12", 1), t + holdoff / 2)
    assert repairs_at(t + holdoff / 2) == [(0, 8), (0, 9), (0, 10), (0, 11)]
    # After the holdoff any need is answered, with ids never sent before.
    t2 = t + holdoff / 2 + holdoff * 1.5
    sender.receive_datagram(reply(wire.Nack(((0, 1), (2, 2))), 13), ("10.0.0.13", 1), t2)
    assert repairs_at(t2) == [(0, 12), (2, 5), (2, 6)]
    assert sender.stats.nack_entries_suppressed == 2


def test_nack_for_unsent_blocks_is_ignored() -> None:
    image = random_image(5 * 512)
    sender = make_sender(len(image), block_symbols=8, min_receivers=1)
    sender.start(0.0)
    # While waiting nothing was sent: every NACK entry is ignored (the sender learns of a
    # receiver, which here also starts the pass).
    sender.receive_datagram(reply(wire.Nack(((0, 3),)), 1), ("10.0.0.1", 1), 0.0)
    assert sender.stats.nack_entries == 1 and sender.stats.repairs_requested == 0
    sent = step(sender, image, 0.0)  # one burst: block 0 (9 packets) and part of block 1
    assert (1, 0) in data_of(sent) and (2, 0) not in data_of(sent)
    sender.receive_datagram(reply(wire.Nack(((1, 2), (2, 4), (4, 1), (0, 2))), 1),
                            ("10.0.0.1", 1), 0.0)
    assert sender.stats.repairs_requested == 2  # block 0 only
    assert sender.stats.nack_entries_suppressed == 0
    _, sent = drive(sender, image, 0.0, 20.0, stop=lambda s: s.state is SenderState.FINISHED)
    assert data_of(sent, repair=True) == [(0, 9), (0, 10)]


def test_nack_or_status_for_blocks_past_the_image_is_invalid_and_adds_no_receiver() -> None:
    # Found on the rack (tests/test_hostile.py): sealed NACKs for absurd blocks made their
    # origin a receiver, which never reported done, so the sender failed the session.
    image = random_image(5 * 512)
    sender = make_sender(len(image), block_symbols=8, min_receivers=1)
    sender.start(0.0)
    count = sender.geometry.block_count
    for body in (wire.Nack(((count, 1),)), wire.Nack(((0, 1), (2**32 - 1, 3))),
                 wire.Status(wire.ReceiverState.RECEIVING, 0, count + 1, 0, 0, 0),
                 wire.Status(wire.ReceiverState.RECEIVING, 2**32 - 1, 2**32 - 1, 0, 0, 0)):
        sender.receive_datagram(reply(body, 0xBAD), ("10.0.0.66", 1), 0.0)
    assert sender.stats.invalid_packets == 4
    assert sender.receivers == {} and sender.state is SenderState.WAITING
    assert sender.stats.nacks_received == 0
    # What real receivers send still counts: before joining (no image yet) and after.
    sender.receive_datagram(reply(status(), 1), ("10.0.0.1", 1), 0.0)
    sender.receive_datagram(reply(wire.Nack(((count - 1, 1),)), 2), ("10.0.0.2", 1), 0.0)
    assert set(sender.receivers) == {1, 2} and sender.stats.invalid_packets == 4


def test_sender_finishes_when_every_receiver_is_done() -> None:
    image = random_image(3 * 256)
    checksum = hashlib.sha256(image).digest()
    sender = make_sender(len(image), checksum=checksum, linger=100.0, min_receivers=2)
    sender.start(0.0)
    sender.receive_datagram(reply(status(), 1), ("10.0.0.1", 1), 0.0)
    sender.receive_datagram(reply(status(), 2), ("10.0.0.2", 1), 0.0)
    now = finish_pass(sender, image)
    sender.receive_datagram(reply(wire.Done(checksum), 1), ("10.0.0.1", 1), now + 0.1)
    drive(sender, image, now + 0.1, now + 1.0)
    assert sender.state is SenderState.REPAIRING  # one receiver is still missing
    sender.receive_datagram(reply(wire.Done(bytes(32)), 2), ("10.0.0.2", 1), now + 1.0)
    end, sent = drive(sender, image, now + 1.0, now + 50.0,
                      stop=lambda s: s.state is SenderState.FINISHED)
    assert sender.state is SenderState.FINISHED
    assert end - (now + 1.0) < 1.0  # at once, not after the 100 s linger
    assert drain_events(sender) == [events.ReceiverDone(1, True), events.ReceiverDone(2, False),
                                    events.SessionEnded("every receiver is done", 2, 2)]
    assert [type(p.body) for t, p in sent if t == end] == [wire.End] * 3
    assert sender.get_timer() is None
    assert sender.datagrams_to_send(end + 1) == []
    assert sender.blocks_wanted() == []


def test_sender_finishes_after_linger_without_nacks() -> None:
    image = random_image(3 * 256)
    sender = make_sender(len(image), linger=2.0)
    sender.start(0.0)
    passed = finish_pass(sender, image)
    sender.handle_timer(passed + 1.0)
    assert sender.state is SenderState.REPAIRING
    sender.receive_datagram(reply(wire.Nack(((1, 1),)), 1), ("10.0.0.1", 1), passed + 1.0)
    now, sent = drive(sender, image, passed + 1.0, passed + 10.0,
                      stop=lambda s: s.state is SenderState.FINISHED)
    assert data_of(sent, repair=True) == [(1, 5)]
    assert now == pytest.approx(passed + 3.0)  # linger counts from the last NACK
    assert drain_events(sender)[-1] == events.SessionEnded("nothing asked for 2 s", 1, 0)
    assert [type(p.body) for t, p in sent if t == now] == [wire.End] * 3


def test_linger_is_not_over_before_a_long_repair_is_sent() -> None:
    # 24 blocks x 4 symbols take ~0.8 s at this rate; linger is 0.5 s.
    image = random_image(24 * 4 * 1000)
    sender = make_sender(len(image), rate_bps=1e6, symbol_size=1000, linger=0.5)
    sender.start(0.0)
    passed = finish_pass(sender, image)
    nack = wire.Nack(tuple((b, 4) for b in range(24)))
    sender.receive_datagram(reply(nack, 1), ("10.0.0.1", 1), passed)
    now, sent = drive(sender, image, passed, passed + 20,
                      stop=lambda s: s.state is SenderState.FINISHED)
    repairs = [t for t, p in sent if isinstance(p.body, wire.Data)]
    assert sender.stats.repair_packets == 96
    assert len(repairs) == 96 and repairs[-1] - passed > 0.5
    # Receivers get ``linger`` after the last repair to ask again.
    assert now >= repairs[-1] + 0.5


@pytest.mark.parametrize("share", [0.5, 0.2, SenderConfig.repair_share])
def test_repair_backlog_does_not_stall_the_pass(share: float) -> None:
    image = random_image(60 * 512)  # k=8 x 64 B
    sender = make_sender(len(image), block_symbols=8, proactive_repair=0, repair_share=share)
    sender.start(0.0)
    drive(sender, image, 0.0, 10.0, stop=lambda s: s.pass_position() >= 20)
    position = sender.pass_position()
    needs = tuple((b, 8) for b in range(20))  # a receiver lost all of 20 blocks: 160 symbols
    sender.receive_datagram(reply(wire.Nack(needs), 1), ("10.0.0.1", 1), 1.0)
    _, sent = drive(sender, image, 1.0, 10.0,
                    stop=lambda s: s.stats.source_packets >= position * 8 + 100)
    flags = [bool(p.header.flags & wire.Flags.REPAIR) for _, p in sent
             if isinstance(p.body, wire.Data)]
    assert sender.state is SenderState.SENDING
    assert sender.stats.repairs_requested == 160 > sender.stats.repair_packets  # still owed
    assert sender.pass_position() >= position + 100 // 8  # yet the pass went on
    # Once any banked credit is spent, repair takes its share of the packets, no more.
    steady = flags[flags.index(False):][:100]
    assert sum(steady) == pytest.approx(100 * share, abs=2)


def test_pass_accounting_counts_repair_interleaved_in_the_pass() -> None:
    """pass_bytes_sent is what a loss-free receiver waits for, whatever the clock says."""
    image = random_image(60 * 512)  # k=8 x 64 B: 60 blocks
    header = len(wire.encode_data_header(SID, SENDER_ORIGIN, 0, 0))

    def run(nack: bool) -> Sender:
        sender = make_sender(len(image), block_symbols=8, proactive_repair=0,
                             repair_share=0.2, rate_bps=1e6)
        sender.start(0.0)
        now, _ = drive(sender, image, 0.0, 10.0, stop=lambda s: s.pass_position() >= 30)
        if nack:  # a receiver lost all of 30 blocks: more repair than the share allows
            needs = tuple((b, 8) for b in range(30))
            sender.receive_datagram(reply(wire.Nack(needs), 1), ("10.0.0.1", 1), now)
        drive(sender, image, now, 60.0, stop=lambda s: s.state is SenderState.REPAIRING)
        assert sender.state is SenderState.REPAIRING
        return sender

    quiet, busy = run(nack=False), run(nack=True)
    source_bytes = 60 * 8 * (header + 64)
    assert source_bytes <= quiet.stats.pass_bytes_sent <= source_bytes * 1.05  # + ANNOUNCEs
    assert 0 < busy.stats.repair_packets < busy.stats.repairs_requested  # some still owed
    # Repair took at most its share (0.2) of the pass, so the pass grew by at most 1/0.8.
    assert quiet.stats.pass_bytes_sent < busy.stats.pass_bytes_sent
    assert busy.stats.pass_bytes_sent <= quiet.stats.pass_bytes_sent / 0.8 * 1.02
    # At a fixed rate, the pass's length in seconds follows its bytes.
    assert busy.stats.pass_seconds / quiet.stats.pass_seconds == pytest.approx(
        busy.stats.pass_bytes_sent / quiet.stats.pass_bytes_sent, rel=0.05)

def test_a_restarted_receiver_replaces_its_dead_run() -> None:
    """The same node (machine and target) under a new origin is the old receiver come back:
    the sender waits for the new run only, and reports the session done when it is."""
    image = random_image(1000)
    sender = make_sender(len(image), min_receivers=2)
    sender.start(0.0)
    joined = wire.Status(wire.ReceiverState.RECEIVING, 0, 0, 0, 0, 0, node_id=5)
    other = wire.Status(wire.ReceiverState.RECEIVING, 0, 0, 0, 0, 0, node_id=6)
    sender.receive_datagram(reply(joined, 1), ("10.0.0.1", 1), 0.0)
    sender.receive_datagram(reply(other, 3), ("10.0.0.3", 1), 0.0)
    drive(sender, image, 0.0, 5.0, stop=lambda s: s.state is SenderState.REPAIRING)
    # Receiver 1 dies; the same node comes back as origin 2 and finishes.
    sender.receive_datagram(reply(joined, 2), ("10.0.0.1", 2), 1.0)
    assert set(sender.receivers) == {2, 3} and sender.stats.receivers_restarted == 1
    for origin in (2, 3):
        sender.receive_datagram(reply(wire.Done(sender.checksum or bytes(32)), origin),
                                ("10.0.0.1", origin), 1.1)
    now, _ = drive(sender, image, 1.1, 10.0, stop=lambda s: s.state is SenderState.FINISHED)
    assert sender.state is SenderState.FINISHED and now < 2.0  # no linger for the dead run
    ended = [e for e in drain_events(sender) if isinstance(e, events.SessionEnded)]
    assert ended[-1].receivers_known == ended[-1].receivers_done == 2


def test_sender_ignores_foreign_and_invalid_datagrams() -> None:
    image = random_image(1000)
    sender = make_sender(len(image), min_receivers=1)
    sender.start(0.0)
    sender.receive_datagram(reply(status(), 1, session=SID + 1), ("10.0.0.1", 1), 0.0)
    sender.receive_datagram(b"garbage", ("10.0.0.1", 1), 0.0)
    other_sender = wire.encode(SID, SENDER_ORIGIN + 1, wire.End())
    sender.receive_datagram(other_sender, ("10.0.0.2", 1), 0.0)
    assert (sender.stats.foreign_packets, sender.stats.invalid_packets) == (2, 1)
    assert sender.receivers == {} and sender.state is SenderState.WAITING


# --- receiver --------------------------------------------------------------------------------


class Source:
    """What a sender multicasts for ``image``, built straight from the wire format."""

    def __init__(self, image: bytes, *, k: int = 4, symbol_size: int = 64, proactive: int = 1,
                 origin: int = SENDER_ORIGIN, host: str = "10.0.0.9", port: int = 7000,
                 grtt_us: int = 10_000, rate_bps: int = 8_000_000, group_size: int = 1) -> None:
        self.image = image
        self.geometry = ImageGeometry(len(image), symbol_size, k)
        self.checksum = hashlib.sha256(image).digest()
        self.proactive = proactive
        self.origin = origin
        self.host, self.port = host, port
        self.grtt_us, self.rate_bps, self.group_size = grtt_us, rate_bps, group_size

    @property
    def timing(self) -> repair.NackTiming:
        return repair.NackTiming(self.grtt_us / 1e6, self.group_size, self.rate_bps,
                                 wire.HEADER_SIZE + 8 + self.geometry.symbol_size)

    def announce(self, next_block: int = 0, *, checksum_known: bool = True,
                 session: int = SID) -> bytes:
        g = self.geometry
        flags = wire.Flags.CHECKSUM_KNOWN if checksum_known else wire.Flags.NONE
        return wire.encode(session, self.origin, wire.Announce(
            g.image_size, g.symbol_size, g.block_symbols, g.block_count, next_block,
            self.rate_bps, self.grtt_us, self.group_size, self.proactive,
            self.checksum if checksum_known else bytes(32), self.host, self.port), flags)

    def data(self, block: int, symbol: int, *, repair: bool = False, session: int = SID) -> bytes:
        payload = symbol_bytes(self.image, self.geometry, block, symbol)
        flags = wire.Flags.REPAIR if repair else wire.Flags.NONE
        return wire.encode(session, self.origin, wire.Data(block, symbol, payload), flags)

    def end(self, *, session: int = SID) -> bytes:
        return wire.encode(session, self.origin, wire.End())


def make_receiver(seed: int = 0, **config) -> Receiver:
    settings = dict(session_id=SID, status_interval=1000.0, timeout=30.0)
    settings.update(config)
    receiver = Receiver(ReceiverConfig(**settings), origin=0xBEEF, rng=random.Random(seed))
    receiver.start(0.0)
    return receiver


def sent_by(receiver: Receiver, now: float) -> list[tuple[wire.Packet, tuple]]:
    return [(wire.parse(data), address) for data, address in receiver.datagrams_to_send(now)]


def nacks_in(out: list[tuple[wire.Packet, tuple]]) -> list[tuple[wire.Nack, tuple]]:
    return [(p.body, address) for p, address in out if isinstance(p.body, wire.Nack)]


def joined(source: Source, seed: int = 0, **config) -> Receiver:
    receiver = make_receiver(seed, **config)
    receiver.receive_datagram(source.announce(), SOURCE_ADDR, 0.0)
    receiver.handle_timer(0.0)  # the STATUS that says we are here
    out = sent_by(receiver, 0.0)
    assert [type(p.body) for p, _ in out] == [wire.Status]
    assert drain_events(receiver) == [events.SessionJoined(source.geometry, source.origin)]
    return receiver


def test_receiver_ignores_data_before_announce() -> None:
    source = Source(random_image(3 * 256))
    receiver = make_receiver()
    for symbol in range(4):
        receiver.receive_datagram(source.data(0, symbol), SOURCE_ADDR, 0.0)
    assert receiver.stats.early_packets == 4
    assert receiver.geometry is None and receiver._partial == {}
    assert drain_events(receiver) == [] and sent_by(receiver, 0.0) == []
    receiver.receive_datagram(source.announce(), SOURCE_ADDR, 0.1)
    assert receiver.phase is ReceiverPhase.RECEIVING
    assert receiver.blocks_done == 0  # the early symbols were not kept


def test_receiver_decodes_each_block_as_soon_as_possible() -> None:
    image = random_image(3 * 256 + 100)  # blocks of 4, 4, 4 and 2 symbols
    source = Source(image, proactive=1)
    receiver = joined(source)
    schedule = [
        # block 0: source 1 lost, the proactive repair symbol (id 4) fills in
        [(0, 0, False), (0, 2, False), (0, 3, False), (0, 4, False)],
        # block 1: only two source symbols; duplicates do not count; two repair answers
        [(1, 2, False), (1, 1, False), (1, 1, False), (1, 5, True), (1, 5, True), (1, 9, True)],
        # block 2: all source symbols, no FEC
        [(2, 0, False), (2, 1, False), (2, 2, False), (2, 3, False)],
        # last block, k=2: one source and one repair symbol (proactive id 2 for k=2)
        [(3, 1, False), (3, 2, False)],
    ]
    t = 0.0
    for block, packets in enumerate(schedule):
        for index, (b, symbol, is_repair) in enumerate(packets):
            t += 0.001
            receiver.receive_datagram(source.data(b, symbol, repair=is_repair), SOURCE_ADDR, t)
            happened = drain_events(receiver)
            got = [e for e in happened if isinstance(e, events.BlockDecoded)]
            if index < len(packets) - 1:
                assert got == [], f"block {block} decoded before it was decodable"
                assert block in receiver._partial
            else:
                assert len(got) == 1
                decoded = got[0]
                start = source.geometry.offset(block)
                assert decoded.block == block and decoded.offset == start
                length = source.geometry.block_length(block)
                assert bytes(decoded.data) == image[start:start + length]
                assert block not in receiver._partial  # nothing kept for a finished block
                last = block == len(schedule) - 1
                assert (events.AllBlocksDecoded() in happened) == last
    assert receiver.stats.blocks_recovered == 3
    assert receiver.stats.duplicate_packets == 2
    assert receiver._partial == {}
    assert receiver.phase is ReceiverPhase.VERIFYING
    receiver.receive_datagram(source.data(2, 1), SOURCE_ADDR, t)  # late duplicate
    assert receiver._partial == {} and receiver.stats.duplicate_packets == 3


def test_all_blocks_decoded_then_verified_sends_done() -> None:
    image = random_image(2 * 256 + 10)
    source = Source(image)
    receiver = joined(source)
    for block in range(3):
        for symbol in range(source.geometry.symbols_in(block)):
            receiver.receive_datagram(source.data(block, symbol), SOURCE_ADDR, 0.5)
    got = drain_events(receiver)
    assert [type(e) for e in got] == [events.BlockDecoded] * 3 + [events.AllBlocksDecoded]
    assert b"".join(bytes(e.data) for e in got[:3]) == image
    assert sent_by(receiver, 0.5) == []  # no DONE before the driver verified the image

    receiver.image_verified(source.checksum, 1.0)
    out = sent_by(receiver, 1.0)
    dones = [(p, a) for p, a in out if isinstance(p.body, wire.Done)]
    assert len(dones) == 1
    packet, address = dones[0]
    assert address == ("10.0.0.9", 7000)
    assert packet.body.checksum == source.checksum
    assert (packet.header.session_id, packet.header.origin) == (SID, 0xBEEF)
    assert receiver.phase is ReceiverPhase.DONE
    times = []
    while (timer := receiver.get_timer()) is not None:
        receiver.handle_timer(timer)
        times.append(timer)
        assert [type(p.body) for p, _ in sent_by(receiver, timer)] == [wire.Done]
    assert times == pytest.approx([1.02, 1.04])
    assert drain_events(receiver) == [events.TransferComplete(source.checksum)]


def test_checksum_announced_after_the_image_is_complete() -> None:
    image = random_image(300)
    source = Source(image)
    receiver = make_receiver()
    receiver.receive_datagram(source.announce(checksum_known=False), SOURCE_ADDR, 0.0)
    for block in range(2):
        for symbol in range(source.geometry.symbols_in(block)):
            receiver.receive_datagram(source.data(block, symbol), SOURCE_ADDR, 0.1)
    receiver.image_verified(source.checksum, 0.2)
    assert not [p for p, _ in sent_by(receiver, 0.2) if isinstance(p.body, wire.Done)]
    receiver.receive_datagram(source.announce(2), SOURCE_ADDR, 0.3)
    assert [p for p, _ in sent_by(receiver, 0.3) if isinstance(p.body, wire.Done)]
    assert receiver.phase is ReceiverPhase.DONE


def test_wrong_image_checksum_fails() -> None:
    source = Source(random_image(300))
    receiver = joined(source)
    for block in range(2):
        for symbol in range(source.geometry.symbols_in(block)):
            receiver.receive_datagram(source.data(block, symbol), SOURCE_ADDR, 0.1)
    drain_events(receiver)
    receiver.image_verified(hashlib.sha256(b"something else").digest(), 0.2)
    assert receiver.phase is ReceiverPhase.FAILED
    assert [type(e) for e in drain_events(receiver)] == [events.TransferFailed]
    assert not [p for p, _ in sent_by(receiver, 0.2) if isinstance(p.body, wire.Done)]
    assert receiver.get_timer() is None


def test_pinned_checksum_mismatch_fails() -> None:
    source = Source(random_image(300))
    receiver = make_receiver(expected_checksum=hashlib.sha256(b"other").digest())
    receiver.receive_datagram(source.announce(checksum_known=False), SOURCE_ADDR, 0.0)
    assert receiver.phase is ReceiverPhase.JOINING  # pinned: waits to learn the checksum
    receiver.receive_datagram(source.announce(), SOURCE_ADDR, 0.1)
    assert receiver.phase is ReceiverPhase.FAILED
    assert isinstance(drain_events(receiver)[-1], events.TransferFailed)


def test_end_while_blocks_are_missing_fails() -> None:
    source = Source(random_image(3 * 256))
    receiver = joined(source)
    receiver.receive_datagram(source.data(0, 0), SOURCE_ADDR, 0.1)
    receiver.receive_datagram(source.end(), SOURCE_ADDR, 0.2)
    assert receiver.phase is ReceiverPhase.FAILED
    failed = drain_events(receiver)
    assert len(failed) == 1 and isinstance(failed[0], events.TransferFailed)
    assert "ended" in failed[0].reason
    assert receiver._partial == {}


def test_other_sessions_are_ignored() -> None:
    source = Source(random_image(3 * 256))
    receiver = make_receiver()
    receiver.receive_datagram(source.announce(session=SID + 1), SOURCE_ADDR, 0.0)
    receiver.receive_datagram(source.data(0, 0, session=SID + 1), SOURCE_ADDR, 0.0)
    assert receiver.stats.foreign_packets == 2
    assert receiver.geometry is None and receiver.phase is ReceiverPhase.JOINING
    assert drain_events(receiver) == []
    receiver = joined(source)
    for symbol in range(4):
        receiver.receive_datagram(source.data(0, symbol, session=SID + 1), SOURCE_ADDR, 0.1)
    assert receiver.stats.foreign_packets == 4
    assert receiver._partial == {} and receiver.blocks_done == 0
    assert drain_events(receiver) == []
    receiver.receive_datagram(source.end(session=SID + 1), SOURCE_ADDR, 0.2)
    assert receiver.phase is ReceiverPhase.RECEIVING


def receive_block(receiver: Receiver, source: Source, block: int, now: float,
                  skip: tuple[int, ...] = ()) -> None:
    for symbol in range(source.geometry.symbols_in(block)):
        if symbol not in skip:
            receiver.receive_datagram(source.data(block, symbol), SOURCE_ADDR, now)


def test_nack_only_after_frontier_and_backoff() -> None:
    source = Source(random_image(4 * 256), proactive=0, group_size=40)
    backoff_max = source.timing.backoff_max()
    assert backoff_max > 0.01  # scaled up for the group
    delays = []
    for seed in range(40):
        receiver = joined(source, seed, join_repeat=1000.0)  # no STATUS timer in the way
        receive_block(receiver, source, 0, 0.01, skip=(2,))
        # Block 0 may still be in flight: no NACK however long we wait ...
        for i in range(1, 101):
            receiver.handle_timer(0.01 * i)
        assert nacks_in(sent_by(receiver, 1.0)) == []
        assert receiver.get_timer() > 10  # nothing but STATUS and the silence timeout ahead
        # ... until the pass has moved on past it.
        receiver.receive_datagram(source.data(1, 0), SOURCE_ADDR, 1.0)
        nack_at = receiver.get_timer()
        assert 1.0 <= nack_at <= 1.0 + backoff_max
        if nack_at - 1e-6 >= 1.0:
            receiver.handle_timer(nack_at - 1e-6)
            assert nacks_in(sent_by(receiver, nack_at - 1e-6)) == []
        receiver.handle_timer(nack_at)
        nacks = nacks_in(sent_by(receiver, nack_at))
        assert nacks == [(wire.Nack(((0, 1),)), ("10.0.0.9", 7000))]
        assert receiver.stats.nacks_sent == 1
        delays.append(nack_at - 1.0)
    # A random back-off, spread over the window, not a fixed delay.
    assert max(delays) - min(delays) > backoff_max / 2


def test_nack_goes_to_the_source_address_when_the_sender_names_none() -> None:
    source = Source(random_image(4 * 256), proactive=0, host="0.0.0.0", port=0)
    receiver = joined(source)
    receive_block(receiver, source, 0, 0.01, skip=(0, 3))
    receiver.receive_datagram(source.announce(1), SOURCE_ADDR, 0.02)  # frontier via ANNOUNCE
    receiver.handle_timer(receiver.get_timer())
    assert nacks_in(sent_by(receiver, 1.0)) == [(wire.Nack(((0, 2),)), SOURCE_ADDR)]


@pytest.mark.parametrize("host", ["255.255.255.255", "239.1.2.3", "::1"])
def test_announce_naming_a_reply_address_no_datagram_can_reach_is_invalid(host: str) -> None:
    # Found on the rack (tests/test_hostile.py): one sealed ANNOUNCE naming the broadcast
    # address made every receiver's next STATUS fail with EACCES, ending its transfer.
    source = Source(random_image(3 * 256))
    receiver = joined(source)
    unusable = Source(source.image, host=host)
    receiver.receive_datagram(unusable.announce(), SOURCE_ADDR, 0.1)
    assert receiver.stats.invalid_packets == 1
    assert receiver.sender_address == ("10.0.0.9", 7000)
    fresh = make_receiver()  # nor does anyone join on one
    fresh.receive_datagram(unusable.announce(), SOURCE_ADDR, 0.0)
    assert fresh.geometry is None and fresh.stats.invalid_packets == 1


def test_nack_retries_back_off_up_to_the_cap() -> None:
    source = Source(random_image(4 * 256), proactive=0)
    timing = source.timing
    receiver = joined(source, timeout=5.0)
    receive_block(receiver, source, 0, 0.0, skip=(1,))
    receiver.receive_datagram(source.data(1, 0), SOURCE_ADDR, 0.0)
    nack_times = []
    now, next_announce = 0.0, 0.5
    while now < 30.0:
        now = min(receiver.get_timer(), next_announce)
        if now == next_announce:  # the sender is alive but never answers
            receiver.receive_datagram(source.announce(1), SOURCE_ADDR, now)
            next_announce += 0.5
        if receiver.get_timer() <= now:
            receiver.handle_timer(now)
        for nack, address in nacks_in(sent_by(receiver, now)):
            assert nack.needs == ((0, 1),) and address == ("10.0.0.9", 7000)
            nack_times.append(now)
    assert receiver.phase is ReceiverPhase.RECEIVING
    gaps = np.diff(nack_times)
    wait = timing.retry_after(1)
    backoff = timing.backoff_max()
    assert gaps.min() >= wait  # never more often than the retry wait
    assert gaps.max() <= repair.MAX_RETRY_WAIT + backoff  # never longer than the cap
    assert gaps[0] < 2 * wait + backoff  # starts short ...
    assert all(g >= repair.MAX_RETRY_WAIT for g in gaps[-5:])  # ... grows to the cap
    assert all(b >= a - backoff for a, b in zip(gaps, gaps[1:]))  # and never shrinks
    assert len(nack_times) <= math.log2(repair.MAX_RETRY_WAIT / wait) + 30 / 2 + 2

    # The repair arrives: the block is decoded and no more NACKs follow.
    receiver.receive_datagram(source.data(0, 4, repair=True), SOURCE_ADDR, now)
    assert any(isinstance(e, events.BlockDecoded) and e.block == 0
               for e in drain_events(receiver))
    end = now + 10
    while now < end:
        now = min(receiver.get_timer(), next_announce)
        if now == next_announce:
            receiver.receive_datagram(source.announce(1), SOURCE_ADDR, now)
            next_announce += 0.5
        receiver.handle_timer(now)
        assert nacks_in(sent_by(receiver, now)) == []


def test_arriving_repair_restarts_the_retry_timer_without_back_off() -> None:
    # k = 8: block 0 lacks 3 symbols; the NACK goes out, then repair trickles in slowly
    # (a sender holding repair back during its pass).  No retry while it keeps coming.
    source = Source(random_image(4 * 8 * 64), k=8, proactive=0)
    timing = source.timing
    receiver = joined(source)
    receive_block(receiver, source, 0, 0.0, skip=(1, 2, 3))
    receiver.receive_datagram(source.data(1, 0), SOURCE_ADDR, 0.0)
    receiver.handle_timer(receiver.get_timer())
    first = receiver.stats.nacks_sent
    assert nacks_in(sent_by(receiver, 0.0))[0][0].needs == ((0, 3),)
    now = 0.0
    for symbol in (8, 9):  # two of the three asked-for symbols, each after a long gap
        now += 0.9 * timing.retry_after(3)
        receiver.receive_datagram(source.data(0, symbol, repair=True), SOURCE_ADDR, now)
        assert receiver.stats.nacks_sent == first  # the first retry would be due by now
    # Once arrivals stop, the retry comes a retry wait after the last one, not backed off.
    wait = timing.retry_after(1)
    while receiver.stats.nacks_sent == first:
        at = receiver.get_timer()
        assert at <= now + wait + timing.backoff_max() + 1e-9
        receiver.handle_timer(at)
    assert at >= now + wait
    assert [nack.needs for nack, _ in nacks_in(sent_by(receiver, at))] == [((0, 1),)]


@pytest.mark.parametrize("loss", [0.05, 0.2, 0.4])
@pytest.mark.parametrize("need", [1, 3, 8, 32])
def test_padded_need_makes_one_round_likely_enough(loss: float, need: int) -> None:
    asked = repair.padded_need(need, loss)
    assert asked >= need
    # P(at least ``need`` of ``asked`` symbols arrive) with independent loss.
    p_enough = sum(math.comb(asked, got) * (1 - loss) ** got * loss ** (asked - got)
                   for got in range(need, asked + 1))
    assert p_enough >= 0.5
    assert asked <= need / (1 - loss) + 2 * math.sqrt(need) + 2  # no runaway padding


def test_padded_need_is_exact_on_clean_links() -> None:
    for need in range(0, 20):
        assert repair.padded_need(need, 0.0) == need
        assert repair.padded_need(need, 0.005) == need


def test_receiver_times_out_after_silence() -> None:
    receiver = make_receiver(timeout=3.0)
    assert receiver.get_timer() == 3.0
    receiver.handle_timer(2.99)
    assert receiver.phase is ReceiverPhase.JOINING
    receiver.handle_timer(3.0)
    assert receiver.phase is ReceiverPhase.FAILED
    assert drain_events(receiver) == [events.TransferFailed("no ANNOUNCE from the sender for 3 s")]

    source = Source(random_image(3 * 256))
    receiver = joined(source, timeout=3.0)
    receiver.receive_datagram(source.data(0, 0), SOURCE_ADDR, 2.0)  # the sender is heard
    receiver.handle_timer(4.99)
    assert receiver.phase is ReceiverPhase.RECEIVING
    assert receiver.get_timer() == 5.0
    receiver.handle_timer(5.0)
    assert receiver.phase is ReceiverPhase.FAILED
    assert isinstance(drain_events(receiver)[-1], events.TransferFailed)


def test_receiver_follows_a_restarted_sender_and_keeps_its_blocks() -> None:
    image = random_image(4 * 256)
    old = Source(image, origin=111, port=7000)
    new = Source(image, origin=222, port=7001)
    receiver = joined(old)
    receive_block(receiver, old, 0, 0.1)
    receive_block(receiver, old, 1, 0.1)
    receive_block(receiver, old, 2, 0.1, skip=(2, 3))
    assert [e.block for e in drain_events(receiver)] == [0, 1]

    receiver.receive_datagram(new.announce(0), SOURCE_ADDR, 1.0)
    assert receiver.sender_id == 222 and receiver.sender_address == ("10.0.0.9", 7001)
    receiver.handle_timer(1.0)  # it reports to the new instance at once
    assert [(type(p.body), to) for p, to in sent_by(receiver, 1.0)] == [
        (wire.Status, ("10.0.0.9", 7001))]
    assert drain_events(receiver) == []  # the same session goes on, no new join
    # The old instance's symbols of unfinished block 2 are dropped: no block mixes two
    # instances' packets.  And the old instance is not followed any more.
    assert 2 not in receiver._partial
    receiver.receive_datagram(old.data(2, 2), SOURCE_ADDR, 1.1)
    assert receiver.stats.early_packets == 1 and 2 not in receiver._partial
    # A different image under our session id is not followed either.
    stranger = Source(random_image(5 * 256), origin=333)
    receiver.receive_datagram(stranger.announce(), SOURCE_ADDR, 1.1)
    assert receiver.sender_id == 222 and receiver.stats.foreign_packets == 1

    # The new pass: blocks 0 and 1 are duplicates, block 2 comes whole from the new one.
    for block in range(4):
        receive_block(receiver, new, block, 1.2)
    decoded = [e.block for e in drain_events(receiver) if isinstance(e, events.BlockDecoded)]
    assert decoded == [2, 3]
    assert receiver.blocks_done == 4 and receiver.phase is ReceiverPhase.VERIFYING
    assert receiver.stats.duplicate_packets == 8  # blocks 0 and 1
    receiver.image_verified(new.checksum, 1.3)
    dones = [a for p, a in sent_by(receiver, 1.3) if isinstance(p.body, wire.Done)]
    assert dones == [("10.0.0.9", 7001)]


def status_times(source: Source, seed: int, until: float, *,
                 regroup: Optional[tuple[float, int]] = None) -> list[float]:
    """When a receiver that joined ``source`` at 0 sends STATUS, up to ``until``.  The
    source announces every second (keeping it from timing out); ``regroup`` = (time, size)
    changes the announced group size then."""
    receiver = make_receiver(seed, status_interval=1.0)
    receiver.receive_datagram(source.announce(), SOURCE_ADDR, 0.0)
    times, next_announce = [], 1.0
    while (timer := receiver.get_timer()) is not None and min(timer, next_announce) <= until:
        if next_announce <= timer:
            if regroup is not None and next_announce >= regroup[0]:
                source.group_size = regroup[1]
            receiver.receive_datagram(source.announce(), SOURCE_ADDR, next_announce)
            next_announce += 1.0
            continue
        receiver.handle_timer(timer)
        times += [timer for p, _ in sent_by(receiver, timer) if isinstance(p.body, wire.Status)]
    assert receiver.phase is ReceiverPhase.RECEIVING
    return times


def gaps_of(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:])]


def test_status_ramp_and_interval_are_unchanged_in_small_groups() -> None:
    # 50, 100, 200, 400, 800 ms, then every second: each within the jitter of its value.
    nominal = [0.05, 0.1, 0.2, 0.4, 0.8] + [1.0] * 40
    steady = []
    for seed in range(10):
        times = status_times(Source(random_image(256), group_size=8), seed, 40.0)
        assert times[0] == 0.0  # the join, at once
        gaps = gaps_of(times)
        for gap, expected in zip(gaps, nominal):
            assert (1 - reporting.JITTER) * expected <= gap <= (1 + reporting.JITTER) * expected
        steady += gaps[5:]
    assert statistics.mean(steady) == pytest.approx(1.0, rel=0.05)
    assert max(steady) - min(steady) > 0.5  # spread out, not in lockstep


def test_status_interval_grows_with_the_announced_group() -> None:
    size = 10_000
    interval = size / reporting.STATUS_BUDGET  # 10 s: 1000 STATUS/s at the sender
    steady = []
    for seed in range(10):
        times = status_times(Source(random_image(256), group_size=size), seed, 200.0)
        gaps = gaps_of(times)
        # The ramp starts at group size / ramp budget (0.5 s), not 50 ms, and still doubles.
        first = size / reporting.RAMP_BUDGET
        assert first == 0.5
        for gap, expected in zip(gaps, [first, 2 * first, 4 * first, 8 * first]):
            assert (1 - reporting.JITTER) * expected <= gap <= (1 + reporting.JITTER) * expected
        steady += gaps[5:]
    assert all((1 - reporting.JITTER) * interval <= gap <= (1 + reporting.JITTER) * interval
               for gap in steady)
    assert statistics.mean(steady) == pytest.approx(interval, rel=0.1)
    assert max(steady) - min(steady) > interval / 2
    # The sender gives a silent receiver several of the longest gaps before ending.
    assert reporting.group_linger(size, 5.0) >= 3 * max(steady)
    assert reporting.group_linger(8, 5.0) == 5.0


def test_status_gap_pending_when_the_group_grows_is_stretched() -> None:
    # Joined while the sender knew of few receivers, as everyone does at the start: the
    # repeats must slow down once the ANNOUNCE says how many there are.
    for seed in range(10):
        times = status_times(Source(random_image(256), group_size=1), seed, 60.0,
                             regroup=(1.0, 10_000))
        before = [t for t in times if t <= 1.0]
        after = [t for t in times if t > 1.0]
        # The gap pending at the regroup is drawn again for the large group's ramp step.
        nominal = reporting.nominal_gap(len(before), 10_000, 1.0, 0.05)
        assert nominal >= 4.0
        assert after[0] - before[-1] >= (1 - reporting.JITTER) * nominal
        assert all(gap >= (1 - reporting.JITTER) * 8.0 for gap in gaps_of(after))


def test_sender_lingers_through_the_status_gaps_of_a_large_group() -> None:
    image = random_image(3 * 256)
    sender = make_sender(len(image), linger=5.0)
    sender.start(0.0)
    size = 10_000
    for origin in range(1, size + 1):
        sender.receive_datagram(reply(status(), origin), ("10.0.0.1", 1), 0.0)
    passed = finish_pass(sender, image)
    linger = reporting.group_linger(size, 5.0)
    assert linger == pytest.approx(3 * 1.5 * 10.0)  # three of the longest gaps, 15 s each
    # A receiver still missing blocks reports it only every ~10 s, and NACKs nothing.
    sender.handle_timer(passed + 14.0)
    assert sender.state is SenderState.REPAIRING
    sender.receive_datagram(reply(status(), 7), ("10.0.0.1", 1), passed + 14.0)
    now, _ = drive(sender, image, passed + 14.0, passed + 100.0,
                   stop=lambda s: s.state is SenderState.FINISHED)
    assert now == pytest.approx(passed + 14.0 + linger)
    assert drain_events(sender)[-1] == events.SessionEnded(f"nothing asked for {linger:g} s",
                                                           size, 0)


# --- sender and receiver together -----------------------------------------------------------


RECEIVER_ADDR = ("10.0.0.7", 4000)


def converse(sender: Sender, image: bytes, receiver: Receiver, now: float, until: float
             ) -> tuple[float, bytearray]:
    """Step a real sender and receiver on a loss-free, zero-delay link, each at its own
    timers, until the session ends or ``until``; returns (now, the image as written)."""
    written = bytearray(len(image))
    while now <= until:
        if (timer := sender.get_timer()) is not None and timer <= now:
            sender.handle_timer(now)
        if (timer := receiver.get_timer()) is not None and timer <= now:
            receiver.handle_timer(now)
        # Exchange datagrams until both are quiet at this instant.
        while True:
            feed(sender, image)
            down = sender.datagrams_to_send(now)
            for datagram, _ in down:
                receiver.receive_datagram(datagram, SOURCE_ADDR, now)
            while (event := receiver.next_event()) is not None:
                if isinstance(event, events.BlockDecoded):
                    written[event.offset:event.offset + len(event.data)] = event.data
                elif isinstance(event, events.AllBlocksDecoded):
                    receiver.image_verified(hashlib.sha256(written).digest(), now)
            up = receiver.datagrams_to_send(now)
            for datagram, _ in up:
                sender.receive_datagram(datagram, RECEIVER_ADDR, now)
            if not down and not up:
                break
        timers = [t for t in (sender.get_timer(), receiver.get_timer()) if t is not None]
        if sender.state is SenderState.FINISHED and sender.get_timer() is None or not timers:
            break
        now = max(now, min(timers))
    return now, written


def test_receiver_started_after_the_last_announce_still_gets_the_image() -> None:
    # The only known receiver reports DONE just after the PASS_COMPLETE ANNOUNCE; a receiver
    # started in between has heard nothing yet, and the next periodic ANNOUNCE (0.5 s) is
    # due long after the 0.2 s flush.  The sender must tell it about the session first.
    image = random_image(3 * 256)
    checksum = hashlib.sha256(image).digest()
    sender = make_sender(len(image), checksum=checksum, rate_bps=1e6, min_receivers=1,
                         announce_interval=0.5, flush=0.2, linger=5.0)
    sender.start(0.0)
    sender.receive_datagram(reply(status(), 1), ("10.0.0.1", 1), 0.0)
    passed = finish_pass(sender, image)
    _, sent = drive(sender, image, passed, passed)  # the PASS_COMPLETE ANNOUNCE goes out
    assert [type(p.body) for _, p in sent] == [wire.Announce]

    late = Receiver(ReceiverConfig(session_id=SID), origin=0xBEEF, rng=random.Random(0))
    late.start(passed + 0.01)
    sender.receive_datagram(reply(wire.Done(checksum), 1), ("10.0.0.1", 1), passed + 0.05)
    end, written = converse(sender, image, late, passed + 0.05, passed + 30.0)

    assert late.phase is ReceiverPhase.DONE, late.failure
    assert bytes(written) == image
    assert sender.state is SenderState.FINISHED
    assert drain_events(sender)[-1] == events.SessionEnded("every receiver is done", 2, 2)
    # Not held for the linger: once both are done it ends within an ANNOUNCE and a flush.
    assert end - passed < 0.5 + 0.2 + 0.5


@pytest.mark.parametrize("interval", [0.5, 0.05])
def test_sender_announces_before_ending_once_everyone_is_done(interval: float) -> None:
    # Also with ANNOUNCEs more frequent than the flush: the later ones must not defer the end.
    image = random_image(3 * 256)
    checksum = hashlib.sha256(image).digest()
    sender = make_sender(len(image), checksum=checksum, min_receivers=1,
                         announce_interval=interval, flush=0.2, linger=5.0)
    sender.start(0.0)
    sender.receive_datagram(reply(status(), 1), ("10.0.0.1", 1), 0.0)
    passed = finish_pass(sender, image)
    drive(sender, image, passed, passed + 0.1)
    sender.receive_datagram(reply(wire.Done(checksum), 1), ("10.0.0.1", 1), passed + 0.1)
    end, sent = drive(sender, image, passed + 0.1, passed + 10.0,
                      stop=lambda s: s.state is SenderState.FINISHED)
    kinds = [(t, type(p.body)) for t, p in sent]
    # An ANNOUNCE at once, for anyone who started since the last one; END a flush later.
    assert kinds[0] == (pytest.approx(passed + 0.1), wire.Announce)
    assert end == pytest.approx(passed + 0.1 + 0.2)
    assert kinds[-3:] == [(end, wire.End)] * 3
    assert {kind for _, kind in kinds[:-3]} == {wire.Announce}


# --- the seeded lossy network ------------------------------------------------------------------


IMAGE_SIZE = 3 * 1024 * 1024 + 12_345  # not a multiple of the 44 800-byte block


def run_group(seed: int, *, receivers: int = 8, rate_bps: float = 50e6,
              loss: float = 0.05, bursts: tuple = (), host_loss: Optional[dict] = None,
              join_at: Optional[dict] = None, min_receivers: Optional[int] = None,
              announce_interval: float = 0.1, delay: float = 0.0005, linger: float = 5.0,
              size: int = IMAGE_SIZE, until: float = 60.0):
    image = random_image(size, seed=1)
    checksum = hashlib.sha256(image).digest()
    config = SenderConfig(session_id=SID, group=GROUP, rate_bps=rate_bps,
                          min_receivers=receivers if min_receivers is None else min_receivers,
                          wait=2.0, announce_interval=announce_interval, linger=linger)
    sender = Sender(config, len(image), origin=SENDER_ORIGIN, checksum=checksum)
    nodes = {f"r{i}": Receiver(ReceiverConfig(session_id=SID, timeout=max(10.0, 4 * delay)),
                               origin=100 + i,
                               rng=random.Random(f"{seed}/{i}"))
             for i in range(receivers)}
    model = LossModel(seed=seed, loss=loss, bursts=bursts, host_loss=host_loss or {})
    burst_drops = [0]
    dropped = model.dropped

    def counting(host: object, now: float) -> bool:
        lost = dropped(host, now)
        burst_drops[0] += lost and any(b.start <= now < b.end for b in bursts)
        return lost

    model.dropped = counting  # type: ignore[method-assign]
    result = Simulation(sender, image, nodes, model, join_at=join_at,
                        delay=delay).run(until=until)
    return image, sender, nodes, result, burst_drops[0]


def snapshot(sender: Sender, nodes: dict, result) -> tuple:
    return (sender.stats, {h: r.stats for h, r in nodes.items()}, result.end_time,
            result.finished_at)


def test_lossy_group_gets_identical_images_deterministically() -> None:
    # The pass of ~3.2 MB at 50 Mbit/s takes ~0.53 s and starts once all 8 receivers are
    # heard from (at most a few announce intervals of 0.1 s): the burst hits its middle.
    burst = (BurstLoss(0.30, 0.31, 0.9),)
    image, sender, nodes, result, burst_drops = run_group(7, bursts=burst)
    assert result.failures == {}
    assert set(result.finished_at) == set(nodes)
    for host, data in result.images.items():
        assert data == image, host
    assert isinstance(result.sender_events[-1], events.SessionEnded)
    assert result.sender_events[-1].reason == "every receiver is done"
    assert events.PassComplete() in result.sender_events
    assert burst_drops > 8 * 20  # the burst did fall on the transfer
    assert sender.stats.repair_packets > 0 and sender.stats.nacks_received > 0
    assert all(r.stats.blocks_recovered > 0 for r in nodes.values())
    assert all(r._partial == {} for r in nodes.values())

    again = run_group(7, bursts=burst)
    assert snapshot(*again[1:4]) == snapshot(sender, nodes, result)
    other = run_group(8, bursts=burst)
    assert snapshot(*other[1:4]) != snapshot(sender, nodes, result)


def test_late_joiner_completes() -> None:
    # 8 receivers start the pass; a ninth joins 0.2 s into it (the pass takes ~0.5 s).
    image, sender, nodes, result, _ = run_group(3, receivers=9, loss=0.02, join_at={"r8": 0.2},
                                                min_receivers=8)
    assert result.failures == {}
    assert result.images["r8"] == image
    late = nodes["r8"].stats
    assert late.early_packets > 0  # it joined while the pass was running
    # It asked for the part of the pass it missed, far more than anyone who was there.
    on_time = max(nodes[f"r{i}"].stats.symbols_requested for i in range(8))
    assert late.symbols_requested > 3 * on_time
    assert result.sender_events[-1].reason == "every receiver is done"
    assert result.sender_events[-1].receivers_done == 9


def test_receiver_with_heavy_loss_completes() -> None:
    image, sender, nodes, result, _ = run_group(5, receivers=4, loss=0.01,
                                                host_loss={"r3": 0.2})
    assert result.failures == {}
    assert all(data == image for data in result.images.values())
    assert nodes["r3"].stats.nacks_sent > nodes["r0"].stats.nacks_sent
    assert result.sender_events[-1].reason == "every receiver is done"


@pytest.mark.parametrize("seed", range(3))
def test_long_round_trips_do_not_end_the_session_under_a_lossy_receiver(seed: int) -> None:
    # A 1.6 s round trip (what a stalled process makes of a LAN) with 20 % loss on one
    # receiver: its NACKs come seconds apart, and some are lost.  The sender must keep
    # going while it still reports missing blocks, though nobody NACKs for ``linger``.
    image, sender, nodes, result, _ = run_group(seed, receivers=4, loss=0.0, delay=0.8,
                                                host_loss={"r3": 0.2}, linger=3.0,
                                                size=1024 * 1024, until=300.0)
    assert result.failures == {}
    assert all(data == image for data in result.images.values())
    assert sender.grtt.value > 1.0
    assert result.sender_events[-1].reason == "every receiver is done"


def test_incomplete_blocks_are_bounded_in_memory() -> None:
    """Past the budget, the incomplete block with fewest symbols is forgotten (and later
    asked for whole): memory for repair stays flat however lossy the link and long the
    image."""
    image = random_image(40 * 256)  # 40 blocks of k = 4 x 64 B
    source = Source(image, proactive=0)
    receiver = joined(source, partial_budget=3 * 256)  # room for three blocks
    for block in range(12):  # each block misses its last symbol
        receive_block(receiver, source, block, 0.1, skip=(3,) if block % 2 else (2, 3))
    assert len(receiver._partial) <= 3
    assert receiver.stats.partials_dropped >= 9
    # Those with fewest symbols (the even blocks, 2 of 4) went first.
    assert all(receiver._partial[block].have == 3 for block in receiver._partial
               if block < 11)
    # A forgotten block is asked for whole.
    receiver.receive_datagram(source.announce(12), SOURCE_ADDR, 0.2)
    receiver.handle_timer(5.0)
    needs = dict(n for body, _ in nacks_in(sent_by(receiver, 5.0)) for n in body.needs)
    assert needs[0] >= 4  # all 4 symbols (padded for the loss it sees)
