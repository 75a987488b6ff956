"""Proactive parity sized from the loss the group reports.

Every repair symbol sent before anyone asks costs every receiver a packet's time; every
block some receiver cannot decode costs a NACK and a repair round.  In a group of N
receivers with loss q, a block of k source and p proactive symbols fails for a receiver
when more than p of its k + p symbols are lost, so the group expects

    E(p) = sum over receivers of P(Binomial(k + p, q_i) > p)

receivers per block to ask for repair.  The policy picks the smallest p with
E(p) <= ``TARGET_ASKERS`` (one receiver per block: with NACK suppression that is about one
NACK per block), between the operator's starting value as a floor and k/4 as a ceiling.

Receivers whose loss is far above the group's (more than ``OUTLIER_FACTOR`` times the
median and ``OUTLIER_MARGIN`` above it) are left out: parity for them would be paid by
everyone, and the slowest receiver never sets the pace; they catch up through repair.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

from mcastdeploy.wire import MAX_SYMBOL_ID

TARGET_ASKERS = 1.0
#: A receiver's estimate counts once it has this many pass packets behind it.
MIN_PACKETS = 200
OUTLIER_FACTOR = 4.0
OUTLIER_MARGIN = 0.02
#: Loss estimates are grouped at this resolution, so a decision costs the same for 10
#: receivers as for 10,000.
LOSS_RESOLUTION = 0.001


def blocks_failing(k: int, p: int, loss: float) -> float:
    """P(more than ``p`` of ``k + p`` symbols lost), independent loss ``loss``."""
    if loss <= 0:
        return 0.0
    n = k + p
    kept = 1 - loss
    # 1 - P(at most p lost), summed in the direction that stays accurate for small tails.
    head = sum(math.comb(n, lost) * loss ** lost * kept ** (n - lost) for lost in range(p + 1))
    return max(0.0, 1.0 - head)


def expected_askers(k: int, p: int, losses: Counter) -> float:
    """Receivers per block expected to lack symbols, from a histogram of loss rates."""
    return sum(count * blocks_failing(k, p, loss) for loss, count in losses.items())


@dataclass
class ProactivePolicy:
    """Decides the proactive parity per block from receivers' cumulative loss reports."""

    block_symbols: int
    floor: int
    interval: float = 0.5
    proactive: int = field(init=False)
    #: (time, parity) of every change, for reports and tests.
    history: list[tuple[float, int]] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        room = MAX_SYMBOL_ID + 1 - self.block_symbols  # repair ids k..254
        self.ceiling = max(self.floor, min(self.block_symbols // 4, room))
        self.proactive = self.floor
        self._reports: dict[int, tuple[int, int]] = {}
        self._next_decision: Optional[float] = None

    def report(self, receiver: int, received: int, lost: int) -> None:
        self._reports[receiver] = (received, lost)

    def losses(self) -> Counter:
        """Histogram of the loss rates that count (enough packets, not outliers)."""
        rates = [lost / (received + lost) for received, lost in self._reports.values()
                 if received + lost >= MIN_PACKETS]
        if not rates:
            return Counter()
        median = statistics.median(rates)
        limit = max(median * OUTLIER_FACTOR, median + OUTLIER_MARGIN)
        return Counter(round(rate / LOSS_RESOLUTION) * LOSS_RESOLUTION
                       for rate in rates if rate <= limit)

    def update(self, now: float) -> int:
        """Called periodically; returns the parity to send with each block from now on."""
        if self._next_decision is not None and now < self._next_decision:
            return self.proactive
        self._next_decision = now + self.interval
        losses = self.losses()
        if not losses:
            return self.proactive
        k = self.block_symbols
        chosen = self.ceiling
        for p in range(self.floor, self.ceiling + 1):
            if expected_askers(k, p, losses) <= TARGET_ASKERS:
                chosen = p
                break
        if chosen != self.proactive:
            self.proactive = chosen
            self.history.append((now, chosen))
        return self.proactive
