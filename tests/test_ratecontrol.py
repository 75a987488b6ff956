"""Rate control: the fixed and automatic policies, alone and driving a sender in the simulator.

The automatic rule (protocol/ratecontrol.py) is checked step by step with made-up loss
reports, then end to end against a simulated bottleneck whose loss grows with the rate.
"""

from __future__ import annotations

import hashlib
import random

import pytest

from mcastdeploy.protocol import ratecontrol
from mcastdeploy.protocol.ratecontrol import AutoRate, FixedRate
from mcastdeploy.protocol.receiver import Receiver, ReceiverConfig
from mcastdeploy.protocol.sender import Sender, SenderConfig
from mcastdeploy.sim import LossModel, Simulation

M = 1e6


class Group:
    """Receivers whose cumulative pass counters advance by hand, one interval at a time."""

    def __init__(self, control: AutoRate, receivers: int) -> None:
        self.control = control
        self.counters = {r: [0, 0] for r in range(receivers)}
        self.now = 0.0
        control.update(self.now)  # the first call only marks the start

    def interval(self, losses: dict[int, float], packets: int = 1000) -> float:
        for receiver, counter in self.counters.items():
            lost = round(packets * losses.get(receiver, losses.get(-1, 0.0)))
            counter[0] += packets - lost
            counter[1] += lost
            self.control.report(receiver, *counter)
        self.now += self.control.interval
        return self.control.update(self.now)


def test_fixed_rate_ignores_reports() -> None:
    fixed = FixedRate(50 * M)
    fixed.report(1, 10, 90)
    assert fixed.update(0.0) == fixed.update(10.0) == 50 * M


def test_slow_start_doubles_from_an_eighth_to_the_ceiling_in_three_clean_intervals() -> None:
    control = AutoRate(800 * M)
    assert control.rate_bps == 100 * M and control.slow_start
    group = Group(control, 4)
    rates = [group.interval({}) for _ in range(3)]
    assert rates == [200 * M, 400 * M, 800 * M]
    assert not control.slow_start  # done at the ceiling
    assert all(group.interval({}) == 800 * M for _ in range(20))  # and capped


def test_slow_start_reaches_the_ceiling_within_four_intervals_of_a_thin_start() -> None:
    """The pass may begin just before a decision: that interval has too few packets to
    judge, so they carry over and the ceiling is still reached by the fourth."""
    control = AutoRate(800 * M)
    group = Group(control, 4)
    rates = [group.interval({}, packets=ratecontrol.MIN_PACKETS // 2)]
    rates += [group.interval({}) for _ in range(3)]
    assert rates == [100 * M, 200 * M, 400 * M, 800 * M]


def test_congestion_ends_slow_start_and_cuts_the_rate() -> None:
    control = AutoRate(800 * M)
    group = Group(control, 8)
    assert [group.interval({}) for _ in range(2)] == [200 * M, 400 * M]
    cut = group.interval({-1: 0.10})  # 400M overran the queue
    assert cut == pytest.approx(400 * M * ratecontrol.DECREASE)
    assert not control.slow_start
    assert group.interval({-1: 0.10}) == cut  # the interval after a cut is skipped
    # Clean again: the gentle increase now, not another doubling.
    assert group.interval({}) == pytest.approx(cut * ratecontrol.INCREASE)


def test_heavy_loss_in_slow_start_cuts_to_what_the_group_received() -> None:
    for loss, kept in ((0.40, 0.60), (0.80, 1 / ratecontrol.SLOW_START)):
        control = AutoRate(800 * M)
        group = Group(control, 8)
        assert group.interval({}) == 200 * M
        # 40 % lost: 60 % got through.  80 %: at most one doubling is undone.
        assert group.interval({-1: loss}) == pytest.approx(200 * M * kept)
        assert not control.slow_start


def test_a_small_rise_in_loss_holds_slow_start_without_ending_it() -> None:
    """1 % after a first interval that saw none may be the links' own loss, measured
    better: slow start waits rather than ending on noise."""
    control = AutoRate(800 * M)
    group = Group(control, 8)
    assert group.interval({}) == 200 * M
    assert group.interval({-1: 0.01}) == 200 * M
    assert control.slow_start
    assert group.interval({}) == 400 * M


def test_auto_rate_backs_off_when_loss_rises_above_the_links_own() -> None:
    control = AutoRate(800 * M, start_bps=200 * M)
    group = Group(control, 8)
    for _ in range(3):
        group.interval({-1: 0.01})  # 1 % on every link at any rate: not congestion
    before = control.rate_bps
    assert before > 200 * M and not control.slow_start
    after = group.interval({-1: 0.08})  # everyone loses 8 %: the rate caused it
    assert after == pytest.approx(before * ratecontrol.DECREASE)
    assert group.interval({-1: 0.08}) == after  # the interval after a change is skipped
    assert group.interval({-1: 0.08}) == pytest.approx(after * ratecontrol.DECREASE)


def test_one_lossy_receiver_does_not_set_the_pace() -> None:
    def rates(losses: dict[int, float]) -> list[float]:
        group = Group(AutoRate(800 * M, start_bps=50 * M), 8)
        return [group.interval(losses) for _ in range(8)]

    assert rates({7: 0.2}) == rates({})


def test_constant_link_loss_does_not_collapse_the_rate() -> None:
    control = AutoRate(800 * M, start_bps=100 * M)
    group = Group(control, 8)
    rng = random.Random(1)
    for _ in range(30):
        group.interval({r: rng.uniform(0.045, 0.055) for r in range(8)})
    assert control.rate_bps >= 400 * M


def test_too_few_packets_decide_nothing() -> None:
    control = AutoRate(800 * M)
    group = Group(control, 3)
    assert group.interval({}, packets=ratecontrol.MIN_PACKETS - 1) == 100 * M
    assert control.history == []
    # Those packets are not thrown away: with the next few they make an interval.
    assert group.interval({}, packets=2) == 200 * M


def test_decisions_wait_for_receivers_reporting_less_often() -> None:
    # 10,000 receivers report every ~10 s: deciding each second would judge a few of them,
    # on windows reaching back before the last decision.
    control = AutoRate(800 * M, start_bps=100 * M)
    control.update(0.0, 10.0)
    control.report(1, 1000, 0)
    assert [control.update(t, 10.0) for t in range(1, 10)] == [100 * M] * 9
    assert control.history == []
    assert control.update(10.0, 10.0) == pytest.approx(100 * M * ratecontrol.SLOW_START)
    assert control.update(11.0, 0.0) == control.rate_bps  # the next one is 10 s on
    assert len(control.history) == 1


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError):
        AutoRate(1 * M, floor_bps=2 * M)


class Bottleneck(LossModel):
    """Every receiver's link carries ``capacity`` bit/s: above it, the excess is dropped."""

    def __init__(self, seed: int, capacity: float, sender: Sender) -> None:
        super().__init__(seed=seed)
        self.capacity = capacity
        self.sender = sender

    def dropped(self, host: object, now: float) -> bool:
        rate = self.sender.rate.rate_bps
        excess = max(0.0, 1 - self.capacity / rate)
        return excess > 0 and self._rng(host).random() < excess


def test_auto_rate_finds_a_bottleneck_and_every_copy_is_intact() -> None:
    image = random.Random(3).randbytes(60_000_000)
    config = SenderConfig(session_id=9, group=("239.1.1.1", 1), rate_bps=200 * M,
                          min_receivers=4, wait=2.0, auto_rate=True)
    sender = Sender(config, len(image), origin=1, checksum=hashlib.sha256(image).digest())
    nodes = {f"r{i}": Receiver(ReceiverConfig(session_id=9), origin=10 + i,
                               rng=random.Random(i)) for i in range(4)}
    capacity = 40 * M
    result = Simulation(sender, image, nodes, Bottleneck(5, capacity, sender)).run(until=120)
    assert result.failures == {}
    assert all(copy == image for copy in result.images.values())
    history = sender.rate.history
    rates = [rate for _, _, rate in history]
    assert max(rates) > capacity  # it probed past the bottleneck ...
    assert any(b < a for a, b in zip(rates, rates[1:]))  # ... and backed off
    # Once found, it stays around the capacity: mean over the second half of the pass.
    settled = rates[len(rates) // 2:]
    assert 0.6 * capacity < sum(settled) / len(settled) < 1.3 * capacity
