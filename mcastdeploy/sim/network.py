"""Loss models for the in-process network: seeded, so every run can be replayed."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import numpy as np


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
    receiver does not change what the others lose.  That costs one draw per receiver per
    multicast datagram; :class:`GroupLossModel` draws the same law for a whole group at once.
    """

    seed: int
    loss: float = 0.0
    bursts: tuple[BurstLoss, ...] = ()
    #: Per-host overrides of ``loss`` (e.g. one receiver on a bad link).
    host_loss: dict = field(default_factory=dict)
    #: Burst times count from here: a simulation that times bursts from the start of the
    #: data pass (whose time depends on how long gathering the group took) sets it then.
    epoch: float = 0.0
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
            if burst.start <= now - self.epoch < burst.end:
                probability = max(probability, burst.loss)
        return probability > 0 and self._rng(host).random() < probability

    def multicast_losses(self, hosts: Sequence[object], now: float) -> set[int]:
        """Positions in ``hosts`` of the receivers that lose a multicast datagram sent at ``now``.

        Asks :meth:`dropped` for each host, so a test may wrap that one method to count.
        """
        dropped = self.dropped
        return {position for position, host in enumerate(hosts) if dropped(host, now)}


@dataclass
class GroupLossModel(LossModel):
    """The same loss law as :class:`LossModel`, drawn for all receivers of a datagram at once.

    One NumPy generator (seeded from ``seed``) draws a vector of uniforms per multicast
    datagram, which costs well under a microsecond per receiver where a Python draw per
    receiver cost about one.  The price: a receiver's losses depend on which others listen,
    so runs replay exactly from their seed, but adding a receiver reshuffles the draws.
    Unicast (a receiver's own link) still uses :meth:`LossModel.dropped`.
    """

    _generator: Optional[np.random.Generator] = field(default=None, repr=False)
    _host_key: Optional[Sequence[object]] = field(default=None, repr=False)
    _host_vector: Optional[np.ndarray] = field(default=None, repr=False)

    def multicast_losses(self, hosts: Sequence[object], now: float) -> set[int]:
        if not hosts:
            return set()
        probability = self._probability(hosts, now)
        if np.all(probability == 0):
            return set()  # a loss-free run draws nothing, so it costs nothing
        if self._generator is None:
            self._generator = np.random.default_rng(self.seed)
        draws = self._generator.random(len(hosts))
        return set(np.flatnonzero(draws < probability).tolist())

    def _probability(self, hosts: Sequence[object], now: float) -> Union[float, np.ndarray]:
        """Loss probability per position in ``hosts`` at ``now`` (a scalar if all alike)."""
        probability: Union[float, np.ndarray] = self.loss
        if self.host_loss:
            if self._host_key is not hosts:  # the caller rebuilds ``hosts`` on a change only
                self._host_key = hosts
                self._host_vector = np.array([self.host_loss.get(host, self.loss)
                                              for host in hosts])
            probability = self._host_vector
        for burst in self.bursts:
            if burst.start <= now - self.epoch < burst.end:
                probability = np.maximum(probability, burst.loss)
        return probability
