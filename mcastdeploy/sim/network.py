"""Loss models for the in-process network: seeded, so every run can be replayed."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(frozen=True)
class BurstLoss:
    """Between ``start`` and ``end`` (simulated seconds) datagrams are lost with ``loss``."""

    start: float
    end: float
    loss: float


@dataclass
class LossModel:
    """Independent loss per datagram and per receiving host, plus optional burst windows.

    Each host draws from its own generator seeded from ``seed`` and its address, so adding a
    receiver does not change what the others lose.
    """

    seed: int
    loss: float = 0.0
    bursts: tuple[BurstLoss, ...] = ()
    #: Per-host overrides of ``loss`` (e.g. one receiver on a bad link).
    host_loss: dict = field(default_factory=dict)
    _rngs: dict = field(default_factory=dict, repr=False)

    def _rng(self, host: object) -> random.Random:
        rng = self._rngs.get(host)
        if rng is None:
            rng = self._rngs[host] = random.Random(f"{self.seed}/{host}")
        return rng

    def dropped(self, host: object, now: float) -> bool:
        """Whether the datagram reaching ``host`` at ``now`` is lost."""
        probability = self.host_loss.get(host, self.loss)
        for burst in self.bursts:
            if burst.start <= now < burst.end:
                probability = max(probability, burst.loss)
        return probability > 0 and self._rng(host).random() < probability
