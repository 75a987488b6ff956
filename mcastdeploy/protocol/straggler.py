"""When a receiver is a straggler: better served by peers than by multicast repair.

Multicast repair is paid by every receiver of the group (each hears every repair symbol)
and by the sender's link; it is the right answer for the loss of the pass, the wrong one
for a receiver that lacks most of the image.  A receiver is a straggler when:

* it **joined after the pass**: its first ANNOUNCE already says PASS_COMPLETE;
* it **missed too much**: when the pass ends it lacks at least ``missing_share`` of the
  blocks (a receiver that joined late in the pass, or sat behind a lossy link);
* it is **multicast-dead**: it hears the sender's unicast replies but nothing from the
  group for ``group_silence`` seconds (IGMP snooping without a querier, a firewall that
  drops the group).  The sender answers a STATUS flagged REPLY with a unicast ANNOUNCE,
  so a receiver whose spec names the sender's address can join without the group at all.

A straggler asks the sender for peers (PEER_REQUEST), again after ``ask_retry`` (doubling
up to ``ask_retry_max``) until PEERS comes; a PEERS flagged WAIT (every seeder busy)
makes it ask again after ``busy_retry``.  Pure functions of their inputs: no clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class StragglerPolicy:
    missing_share: float = 0.25
    group_silence: float = 2.0
    ask_retry: float = 0.25
    ask_retry_max: float = 2.0
    #: The tracker said every seeder is busy: ask again after this long.
    busy_retry: float = 0.5

    def late_join(self, pass_complete: bool, blocks_missing: int) -> Optional[str]:
        if pass_complete and blocks_missing:
            return "joined after the multicast pass"
        return None

    def missed_too_much(self, blocks_missing: int, block_count: int) -> Optional[str]:
        if block_count and blocks_missing >= self.missing_share * block_count:
            return (f"missed {blocks_missing} of {block_count} blocks of the multicast pass")
        return None

    def group_silent(self, now: float, group_heard: float) -> bool:
        """Nothing from the group for long enough to ask the sender by unicast."""
        return now - group_heard >= self.group_silence

    def multicast_dead(self, now: float, group_heard: float,
                       unicast_heard: Optional[float]) -> Optional[str]:
        """The sender answers by unicast, yet the group has been silent since."""
        if unicast_heard is not None and unicast_heard >= group_heard \
                and self.group_silent(now, group_heard):
            return f"no multicast from the sender for {now - group_heard:.1f} s"
        return None

    def next_ask(self, now: float, asks: int) -> float:
        return now + min(self.ask_retry * 2 ** asks, self.ask_retry_max)
