"""The sender as tracker: which finished receivers serve blocks, and who gets which.

Multicast serves the many; a straggler (it joined after the pass, lost too much, or hears
no group at all) would otherwise make the sender repeat the image for one machine, or
make it fetch it from Swift again.  Receivers that hold the whole image report a seed port
in STATUS; a straggler asks for peers (PEER_REQUEST) and gets a short random list of them.

Policy, and why:

* **Short random lists** (``list_size``): stragglers spread over the seeders instead of
  all starting with the first one, and a straggler fetches from several at once (and asks
  for more when one fails).
* **A cap per seeder** (``per_seeder``): a seeder is a node about to boot its image with
  one link; it serves at most that many stragglers at once.  Each listing is a *lease*
  that expires after ``lease`` seconds (a straggler that finished or died does not hold
  its seeders forever), renewed when the same straggler asks again and ended when it is
  done.  When every seeder is at its cap the answer is empty and says so (``all_busy``):
  the straggler asks again shortly, by when stragglers that finished have freed their
  seeders, and, seeding themselves, added to them.  Sending it to the source instead
  would load the one machine the seeding is there to spare.
* **Referring instead of repairing** (``should_refer``): after the pass, a receiver that
  still lacks a large share of the image (``refer_share``) is better served by a peer
  than by multicast repair, which every other receiver would have to hear.
* The sender itself is the last resort: its own block server, named in every PEERS.

No clock, no I/O: ``now`` comes in, the rng is injected (tests seed it).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Iterable, Optional

from mcastdeploy.wire import PeerAddress


@dataclass
class TrackerConfig:
    #: Peers named in one answer, and stragglers one seeder is listed to at once.  Equal,
    #: so that on links of one speed a straggler's downlink is filled by its peers' shares
    #: of their uplinks, and the seeders can serve as many stragglers at once as there are
    #: seeders.  Measured: with 4 per list, 12 late joiners on 4 seeders took 15 s, each
    #: holding 4 seeders' slots while its own link was the limit (docs/peers.rst).
    list_size: int = 2
    per_seeder: int = 2
    #: Seconds a listing counts against a seeder's cap.
    lease: float = 20.0
    #: After the pass, a NACK from a receiver missing at least this share of the blocks
    #: is answered with peers rather than repair (when seeders exist).
    refer_share: float = 0.25


@dataclass
class Seeder:
    address: PeerAddress
    #: straggler origin -> when its lease on this seeder expires
    leases: dict[int, float] = field(default_factory=dict)

    def load(self, now: float) -> int:
        for straggler in [s for s, until in self.leases.items() if until <= now]:
            del self.leases[straggler]
        return len(self.leases)


class Tracker:
    def __init__(self, config: Optional[TrackerConfig] = None, *,
                 rng: Optional[random.Random] = None) -> None:
        self.config = config or TrackerConfig()
        self._rng = rng or random.Random()
        self._seeders: dict[int, Seeder] = {}
        #: Listings handed out, for the summary.
        self.listings = 0

    def __len__(self) -> int:
        return len(self._seeders)

    def report(self, origin: int, host: str, seed_port: int, finished: bool) -> None:
        """A receiver's STATUS: it seeds (has the whole image verified and a seed port)
        or, with port 0 or not finished, does not (any more)."""
        if seed_port and finished:
            seeder = self._seeders.get(origin)
            address = PeerAddress(host, seed_port, origin)
            if seeder is None:
                self._seeders[origin] = Seeder(address)
            else:
                seeder.address = address
        else:
            self._seeders.pop(origin, None)

    def forget(self, origin: int) -> None:
        """The receiver ``origin`` is gone (restarted under a new origin)."""
        self._seeders.pop(origin, None)

    def peers_for(self, straggler: int, now: float,
                  exclude: Iterable[int] = ()) -> list[PeerAddress]:
        """A short random list of seeders for ``straggler``, least loaded first; leases
        are taken (or renewed) on each one listed."""
        candidates = self._candidates(straggler, exclude)
        self._rng.shuffle(candidates)  # ties in load broken at random
        candidates.sort(key=lambda s: s.load(now) - (straggler in s.leases))
        chosen = [s for s in candidates if self._free_for(s, straggler, now)]
        chosen = chosen[:self.config.list_size]
        for seeder in chosen:
            seeder.leases[straggler] = now + self.config.lease
        self.listings += len(chosen)
        return [seeder.address for seeder in chosen]

    def all_busy(self, straggler: int, now: float, exclude: Iterable[int] = ()) -> bool:
        """Seeders exist for ``straggler`` but every one serves as many as it may."""
        candidates = self._candidates(straggler, exclude)
        return bool(candidates) and not any(self._free_for(s, straggler, now)
                                            for s in candidates)

    def _candidates(self, straggler: int, exclude: Iterable[int]) -> list[Seeder]:
        excluded = set(exclude) | {straggler}
        return [s for origin, s in self._seeders.items() if origin not in excluded]

    def _free_for(self, seeder: Seeder, straggler: int, now: float) -> bool:
        """Below its cap, or already serving ``straggler`` (asking again renews it)."""
        return seeder.load(now) < self.config.per_seeder or straggler in seeder.leases

    def release(self, straggler: int) -> None:
        """``straggler`` finished: its leases end now."""
        for seeder in self._seeders.values():
            seeder.leases.pop(straggler, None)

    def should_refer(self, blocks_missing: int, block_count: int, pass_complete: bool) -> bool:
        """Answer a NACK with peers instead of multicast repair?"""
        return (pass_complete and bool(self._seeders) and block_count > 0
                and blocks_missing >= self.config.refer_share * block_count)
