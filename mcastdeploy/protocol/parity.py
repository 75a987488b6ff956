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

Estimates, not counts.  A receiver at 1 % loss that has reported 200 packets measures
anywhere between 0 and 3 %; across 10,000 receivers the top of that spread would buy
parity for loss nobody has.  So each receiver's rate is shrunk toward the group's pooled
rate by ``SHRINK_PACKETS`` packets of evidence (an empirical-Bayes estimate): noise
vanishes, and a receiver that really loses more stands out once its own packets outweigh
the shrinkage.  Before anyone has reported, and for receivers that have not yet, the
group's rate stands in, itself starting from ``PRIOR_LOSS``: the first blocks of a large
group are sent as if loss were 1 %, because being wrong the other way costs a NACK
implosion, while the price of a wrong guess is a few percent of one decision interval.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

from mcastdeploy.wire import MAX_SYMBOL_ID

TARGET_ASKERS = 1.0
#: The group's loss before it has reported anything ...
PRIOR_LOSS = 0.01
#: ... weighed as this many packets against what receivers report.
PRIOR_PACKETS = 1_000
#: Each receiver's rate is pulled toward the group's by this many packets.
SHRINK_PACKETS = 2_000
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

    def group_loss(self) -> float:
        """The pooled loss of every report, with the prior for weight when there are few."""
        received = sum(counts[0] for counts in self._reports.values())
        lost = sum(counts[1] for counts in self._reports.values())
        return (lost + PRIOR_PACKETS * PRIOR_LOSS) / (received + lost + PRIOR_PACKETS)

    def losses(self, group_size: int = 0) -> Counter:
        """Histogram of the loss rates that count: every receiver's shrunk estimate, those
        not yet heard from at the group's rate, outliers left out."""
        pooled = self.group_loss()
        rates = [(lost + SHRINK_PACKETS * pooled) / (received + lost + SHRINK_PACKETS)
                 for received, lost in self._reports.values()]
        rates += [pooled] * max(0, group_size - len(rates))
        if not rates:
            return Counter()
        median = statistics.median(rates)
        limit = max(median * OUTLIER_FACTOR, median + OUTLIER_MARGIN)
        return Counter(round(rate / LOSS_RESOLUTION) * LOSS_RESOLUTION
                       for rate in rates if rate <= limit)

    def update(self, now: float, group_size: int = 0) -> int:
        """Called periodically with the number of receivers the sender knows; returns the
        parity to send with each block from now on."""
        if self._next_decision is not None and now < self._next_decision:
            return self.proactive
        self._next_decision = now + self.interval
        losses = self.losses(group_size)
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
