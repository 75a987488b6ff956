"""NACK suppression by REPAIR_NOTICE, the back-off spread, and the measured group RTT."""

from __future__ import annotations

import hashlib
import random
import statistics

import pytest

from test_protocol import (GROUP, SID, Source, drain_events, joined, make_sender, nacks_in,
                           random_image, reply, sent_by, status, step)

from mcastdeploy import wire
from mcastdeploy.protocol import Receiver, ReceiverConfig, repair
from mcastdeploy.protocol.rtt import GroupRtt
from mcastdeploy.sim import LossModel, Simulation


def notices_in(packets: list[wire.Packet]) -> list[tuple[tuple[int, int], ...]]:
    return [p.body.scheduled for p in packets if isinstance(p.body, wire.RepairNotice)]


def test_sender_notices_accepted_repair_once_with_the_merged_count():
    image = random_image(4 * 256)
    sender = make_sender(len(image), rate_bps=1e3)  # slow: the repair stays queued
    sender.start(0.0)
    sender._pass_block = sender.geometry.block_count  # as if the pass were over
    sender.receive_datagram(reply(wire.Nack(((1, 2), (2, 1))), 7), ("10.0.0.2", 9), 0.1)
    sender.receive_datagram(reply(wire.Nack(((1, 3),)), 8), ("10.0.0.3", 9), 0.1)
    first = notices_in(step(sender, image, 0.1))
    assert first == [((1, 3), (2, 1))]  # block 1 raised to the larger need, one packet
    assert notices_in(step(sender, image, 0.2)) == []  # nothing new: nothing repeated


def _first_nacks(receiver: Receiver, now: float, until: float, deliver=None):
    """Step the receiver's timers until it sends a NACK; ``deliver(now)`` runs each turn."""
    while now < until:
        now = max(now, receiver.get_timer())
        if deliver is not None:
            deliver(now)
        receiver.handle_timer(now)
        asked = nacks_in(sent_by(receiver, now))
        if asked:
            return now, [nack.needs for nack, _ in asked]
    return now, []


def _receiver_missing_blocks_0_and_1(source: Source) -> Receiver:
    receiver = joined(source)
    for symbol in (0, 1, 2):  # block 0 lacks one symbol
        receiver.receive_datagram(source.data(0, symbol), ("10.0.0.9", 1), 0.01)
    for symbol in (0, 1):  # block 1 lacks two
        receiver.receive_datagram(source.data(1, symbol), ("10.0.0.9", 1), 0.01)
    receiver.receive_datagram(source.data(2, 0), ("10.0.0.9", 1), 0.02)  # 0, 1 now owed
    notice = wire.encode(SID, source.origin, wire.RepairNotice(((0, 1), (1, 1))))
    receiver.receive_datagram(notice, ("10.0.0.9", 1), 0.021)
    assert receiver.stats.nacks_suppressed == 1  # block 0 covered; block 1 needs 2 > 1
    return receiver


def test_receiver_stays_silent_when_a_notice_covers_its_need():
    source = Source(random_image(6 * 256), group_size=50)
    receiver = _receiver_missing_blocks_0_and_1(source)
    repaired = []

    def deliver(now: float) -> None:  # the noticed repair arrives a little later
        if now >= 0.03 and not repaired:
            repaired.append(now)
            receiver.receive_datagram(source.data(0, 5, repair=True), ("10.0.0.9", 1), now)

    _, asked = _first_nacks(receiver, 0.021, 1.0, deliver)
    assert asked == [((1, 2),)]


def test_covered_block_is_asked_for_when_the_repair_never_comes():
    source = Source(random_image(6 * 256), group_size=50)
    receiver = _receiver_missing_blocks_0_and_1(source)
    asked_blocks: set[int] = set()
    now = 0.021
    while now < 3.0 and 0 not in asked_blocks:
        now, asked = _first_nacks(receiver, now, 3.0)
        asked_blocks |= {block for needs in asked for block, _ in needs}
        now += 1e-6
    assert 0 in asked_blocks and now < 1.0


def test_notice_from_another_sender_or_session_is_ignored():
    source = Source(random_image(4 * 256))
    receiver = joined(source)
    receiver.receive_datagram(source.data(1, 0), ("10.0.0.9", 1), 0.01)
    for notice in (wire.encode(SID, source.origin + 1, wire.RepairNotice(((0, 4),))),
                   wire.encode(SID + 1, source.origin, wire.RepairNotice(((0, 4),)))):
        receiver.receive_datagram(notice, ("10.0.0.9", 1), 0.02)
    assert receiver.stats.nacks_suppressed == 0


@pytest.mark.parametrize("group_size", [1, 100, 10_000])
def test_backoff_stays_within_its_bound_and_skews_late_for_large_groups(group_size):
    timing = repair.NackTiming(0.002, group_size, 1e9, 1428)
    rng = random.Random(5)
    delays = [timing.backoff(rng) for _ in range(5000)]
    bound = timing.backoff_max()
    assert 0 <= min(delays) and max(delays) <= bound
    if group_size == 1:
        # lambda = 1: mean of a density ~ e^x on [0, 1] is 1/(1 - 1/e) - 1 = 0.582
        assert statistics.mean(delays) == pytest.approx(bound * 0.582, rel=0.05)
    else:
        # Few draw early: the first NACK of a large group comes early, the rest late enough
        # to hear the REPAIR_NOTICE it triggers.
        early = sum(d < bound / 4 for d in delays) / len(delays)
        assert early < (0.1 if group_size == 100 else 0.05)
        assert statistics.mean(delays) > 0.7 * bound


def test_group_rtt_rises_at_once_and_decays_slowly():
    rtt = GroupRtt(initial=0.01)
    rtt.sample(0.001)
    assert rtt.value == 0.001  # the first sample replaces the guess
    rtt.sample(0.004)
    assert rtt.value == 0.004  # a farther receiver: at once
    rtt.end_window()
    rtt.sample(0.001)
    rtt.end_window()
    assert rtt.value == 0.002  # halved toward the window's peak, not dropped
    rtt.sample(-1.0)
    rtt.sample(60.0)  # nonsense echoes are ignored
    assert rtt.samples == 3
    rtt.sample(0.00001)
    assert rtt.value >= rtt.floor


def test_sender_measures_rtt_from_echoes():
    image = random_image(2 * 256)
    sender = make_sender(len(image), grtt=0.05)
    sender.start(10.0)
    announces = [p for p in step(sender, image, 10.0) if isinstance(p.body, wire.Announce)]
    stamp = announces[0].body.timestamp_us
    assert stamp == int(10.0 * 1e6)
    # The receiver held the ANNOUNCE 3 ms; the round trip on the wire was 2 ms.
    echo = wire.Status(wire.ReceiverState.RECEIVING, 0, 2, 0, 0, 0, echo_us=stamp,
                       hold_us=3000)
    sender.receive_datagram(reply(echo, 7), ("10.0.0.2", 9), 10.005)
    assert sender.grtt.value == pytest.approx(0.002)
    later = [p for p in step(sender, image, 10.6) if isinstance(p.body, wire.Announce)]
    assert later[-1].body.grtt_us == pytest.approx(2000, abs=1)


def test_simulated_group_learns_its_round_trip():
    image = random_image(300_000, seed=2)
    sender = make_sender(len(image), symbol_size=1000, block_symbols=16, rate_bps=50e6,
                         checksum=hashlib.sha256(image).digest(), grtt=0.05, min_receivers=4,
                         wait=5.0)
    receivers = {f"r{i}": Receiver(ReceiverConfig(SID), origin=100 + i, rng=random.Random(i))
                 for i in range(4)}
    result = Simulation(sender, image, receivers, LossModel(seed=3, loss=0.02),
                        delay=0.004).run(until=60)
    assert not result.failures and all(copy == image for copy in result.images.values())
    assert sender.grtt.samples >= 4
    assert sender.grtt.value == pytest.approx(0.008, rel=0.3)  # 2 x 4 ms one way


def test_nack_heap_does_not_keep_entries_of_blocks_long_done() -> None:
    """A long transfer owes and completes many blocks: the heap's stale entries are swept
    instead of growing with every block ever owed."""
    scheduler = repair.NackScheduler(random.Random(1))
    for block in range(10_000):
        scheduler.add(block, float(block))
        scheduler.discard(block)  # completed by repair before it was ever due
    assert len(scheduler) == 0 and len(scheduler._heap) < 200
    for block in range(5):
        scheduler.add(block, 1.0)
    assert scheduler.take_due(2.0, 10) == [0, 1, 2, 3, 4]
