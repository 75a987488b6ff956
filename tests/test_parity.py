"""Proactive parity sized from the group's loss reports (protocol/parity.py), the sender
changing it between blocks, and receivers counting the loss they report."""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter

import numpy as np
import pytest

from mcastdeploy import wire
from mcastdeploy.protocol import parity
from mcastdeploy.protocol.parity import ProactivePolicy, blocks_failing, expected_askers
from mcastdeploy.protocol.receiver import Receiver, ReceiverConfig
from mcastdeploy.protocol.sender import Sender, SenderConfig
from mcastdeploy.sim import LossModel, Simulation


def direct_tail(n: int, q: float, more_than: int) -> float:
    return sum(math.comb(n, i) * q ** i * (1 - q) ** (n - i) for i in range(more_than + 1, n + 1))


@pytest.mark.parametrize("k, p, q", [(32, 1, 0.01), (64, 4, 0.01), (8, 0, 0.2), (128, 7, 0.02)])
def test_blocks_failing_is_the_binomial_tail(k: int, p: int, q: float) -> None:
    assert blocks_failing(k, p, q) == pytest.approx(direct_tail(k + p, q, p), rel=1e-6, abs=1e-12)
    assert blocks_failing(k, p, 0.0) == 0.0


def decided(receivers: dict[int, float], k: int = 32, floor: int = 1,
            packets: int = 10_000) -> ProactivePolicy:
    policy = ProactivePolicy(k, floor)
    for receiver, loss in receivers.items():
        lost = round(packets * loss)
        policy.report(receiver, packets - lost, lost)
    policy.update(0.0)
    return policy


@pytest.mark.parametrize("group", [8, 1000, 10_000])
def test_smallest_parity_that_keeps_about_one_asker_per_block(group: int) -> None:
    policy = decided({r: 0.01 for r in range(group)})
    p = policy.proactive
    losses = policy.losses()
    assert expected_askers(32, p, losses) <= parity.TARGET_ASKERS
    if p > policy.floor:
        assert expected_askers(32, p - 1, losses) > parity.TARGET_ASKERS
    assert {8: 1, 1000: 3, 10_000: 4}[group] == p


def test_a_lossy_receiver_does_not_buy_parity_for_everyone() -> None:
    clean = decided({r: 0.01 for r in range(8)}).proactive
    assert decided({**{r: 0.01 for r in range(8)}, 8: 0.2}).proactive == clean


def test_parity_is_capped_at_a_quarter_of_k() -> None:
    assert decided({r: 0.3 for r in range(100)}).proactive == 8
    assert decided({r: 0.3 for r in range(100)}, k=240).proactive == wire.MAX_SYMBOL_ID + 1 - 240


def test_before_any_report_a_large_group_starts_from_the_prior() -> None:
    small, large = ProactivePolicy(32, 1), ProactivePolicy(32, 1)
    assert small.update(0.0, group_size=8) == 1
    prior = Counter({parity.PRIOR_LOSS: 10_000})
    p = large.update(0.0, group_size=10_000)
    assert p > 1 and expected_askers(32, p, prior) <= parity.TARGET_ASKERS
    assert expected_askers(32, p - 1, prior) > parity.TARGET_ASKERS
    # Reports of a clean group then bring it down to the floor at the next decision.
    for receiver in range(10_000):
        large.report(receiver, 5_000, 0)
    assert large.update(large.interval, group_size=10_000) == 1


def test_noise_in_short_reports_buys_no_parity() -> None:
    """10,000 receivers at 1 % that have each reported 200 packets: their measured rates
    spread from 0 to 4 %, yet the parity is what 1 % exactly needs."""
    rng = np.random.default_rng(5)
    noisy = ProactivePolicy(32, 1)
    for receiver, lost in enumerate(rng.binomial(200, 0.01, size=10_000)):
        noisy.report(receiver, 200 - int(lost), int(lost))
    assert noisy.update(0.0, group_size=10_000) == decided(
        {r: 0.01 for r in range(10_000)}).proactive


def test_receivers_that_really_lose_more_are_counted_once_their_reports_are_long() -> None:
    group = {**{r: 0.01 for r in range(1000)}, **{r: 0.03 for r in range(1000, 1100)}}
    assert (decided(group, packets=100_000).proactive
            > decided({r: 0.01 for r in range(1100)}, packets=100_000).proactive)


def test_sender_changes_parity_between_blocks_and_keeps_repair_ids_fresh() -> None:
    """End to end in the simulator: 200 receivers at 1 % loss, k = 16, parity from 0."""
    image = random.Random(2).randbytes(1_500_000)
    config = SenderConfig(session_id=5, group=("239.1.1.1", 1), rate_bps=4e6, symbol_size=256,
                          block_symbols=16, proactive_repair=0, auto_proactive=True,
                          min_receivers=200, wait=2.0)
    sender = Sender(config, len(image), origin=1, checksum=hashlib.sha256(image).digest())
    sent: dict[int, set[int]] = {}
    duplicates = []
    original = sender._next_pass_symbol

    def spy(now: float) -> bytes:
        datagram = original(now)
        body = wire.parse(datagram).body
        sent.setdefault(body.block, set()).add(body.symbol)
        return datagram

    sender._next_pass_symbol = spy  # type: ignore[method-assign]
    repair_spy = sender._next_repair

    def repair(now: float):
        datagram = repair_spy(now)
        if datagram is not None:
            body = wire.parse(datagram).body
            if body.symbol in sent.get(body.block, set()):
                duplicates.append((body.block, body.symbol))
            sent.setdefault(body.block, set()).add(body.symbol)
        return datagram

    sender._next_repair = repair  # type: ignore[method-assign]
    nodes = {f"r{i}": Receiver(ReceiverConfig(session_id=5), origin=10 + i,
                               rng=random.Random(i)) for i in range(200)}
    result = Simulation(sender, image, nodes, LossModel(seed=4, loss=0.01)).run(until=60)
    assert result.failures == {}
    assert all(copy == image for copy in result.images.values())
    assert sender.parity is not None and sender.parity.history  # it did change ...
    assert sender.parity.proactive >= 2  # ... upward, for 200 receivers at 1 %
    k = 16
    last = sender.geometry.block_count - 1
    pass_counts = [len([s for s in symbols if s < k + 16])
                   for block, symbols in sent.items() if block != last]
    assert min(pass_counts) >= k and max(pass_counts) > k + 1
    assert duplicates == []  # repair never re-sent an id the pass had sent
    # Receivers' loss reports, counted per block, are close to the 1 % they had.
    losses = [node.packets_lost / (node.packets_lost + node._pass_received)
              for node in nodes.values()]
    assert 0.007 < sum(losses) / len(losses) < 0.013
