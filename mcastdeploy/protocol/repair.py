"""Repair policy: which repair symbols the sender owes, and when a receiver should ask.

Kept apart from the state machines so that the rules (NORM-style reactive parity, NACK
back-off and retry) can be tuned or swapped without touching packet handling.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import OrderedDict
from dataclasses import dataclass

from mcastdeploy.wire import MAX_SYMBOL_ID

_ID_SPACE = MAX_SYMBOL_ID + 1
#: Upper bound of a receiver's wait between two NACKs for one block.
MAX_RETRY_WAIT = 2.0
#: NACK back-off spread in group round trips, for groups of more than one receiver.
BACKOFF_RTTS = 4.0
#: Upper bound of that spread.  A round-trip estimate inflated by a stalled process (CI,
#: a busy agent) must not keep a receiver silent for longer than the sender's linger.
MAX_BACKOFF = 1.0


class RepairQueue:
    """The sender's debt of repair symbols, per block, in the order they were first asked for.

    A NACK for a block already queued raises the debt to the larger need instead of adding
    to it: one multicast round of ``max(need)`` fresh symbols serves every receiver that
    lost up to that many (NORM's reactive parity).  Just after a round goes out, NACKs that
    ask no more than it carried were sent before it arrived; they are ignored for
    ``holdoff`` seconds.
    """

    def __init__(self, holdoff: float) -> None:
        self.holdoff = holdoff
        self._owed: OrderedDict[int, int] = OrderedDict()
        self._last_round: dict[int, tuple[float, int]] = {}
        self._next_id: dict[int, int] = {}
        self.suppressed = 0
        #: Symbols owed over all blocks, kept as a running sum for the backlog estimate.
        self.total = 0

    def __bool__(self) -> bool:
        return bool(self._owed)

    def __len__(self) -> int:
        return len(self._owed)

    def request(self, block: int, need: int, now: float) -> bool:
        """Record that a receiver needs ``need`` more symbols of ``block``; False if covered."""
        owed = self._owed.get(block)
        if owed is not None:
            if need > owed:
                self._owed[block] = need
                self.total += need - owed
            return True
        last = self._last_round.get(block)
        if last is not None and now - last[0] < self.holdoff and need <= last[1]:
            self.suppressed += 1
            return False
        self._owed[block] = need
        self.total += need
        return True

    def owed(self, block: int) -> int:
        """Symbols still to send for ``block`` in the current round."""
        return self._owed.get(block, 0)

    def head(self) -> int | None:
        return next(iter(self._owed), None)

    def take(self, block: int, count: int, now: float) -> int:
        """Take up to ``count`` owed symbols of ``block`` for sending; returns how many."""
        owed = self._owed[block]
        taken = min(owed, count)
        self.total -= taken
        if taken == owed:
            del self._owed[block]
        else:
            self._owed[block] = owed - taken
        started, sent = self._last_round.get(block, (now, 0))
        # A round that continues across batches keeps counting; a new round starts afresh.
        self._last_round[block] = (now, sent + taken if now - started < self.holdoff else taken)
        return taken

    def fresh_ids(self, block: int, count: int, first_fresh: int) -> list[int]:
        """Symbol ids not yet sent for ``block``, beginning at ``first_fresh`` (k + proactive).

        Ids run through the repair space k..254 first; a block that exhausts it (extreme
        loss) cycles through source and repair ids again, since any k distinct ids decode.
        """
        position = self._next_id.get(block, first_fresh)
        self._next_id[block] = position + count
        return [p if p < _ID_SPACE else (p - _ID_SPACE) % _ID_SPACE
                for p in range(position, position + count)]


def padded_need(need: int, loss: float) -> int:
    """How many repair symbols to ask for when ``need`` are missing and a share ``loss`` of
    what reaches us is lost: the need, plus the expected loss of the round and one standard
    deviation of it, rounded.

    A receiver on a 20 % loss link that asks for exactly what it lacks loses a fifth of
    every round and needs round after round, each a retry timer apart.  On a clean link the
    padding rounds to nothing, so large groups of good receivers do not over-ask.
    """
    if need <= 0 or loss <= 0:
        return need
    loss = min(loss, 0.9)
    extra = (need * loss + math.sqrt(need * loss * (1 - loss))) / (1 - loss)
    return need + int(extra + 0.5)


@dataclass
class NackTiming:
    """Receiver NACK timing, derived from what the sender announces."""

    grtt: float  # group round-trip estimate, seconds
    group_size: int
    rate_bps: float
    packet_bytes: int

    def backoff_max(self) -> float:
        """Longest random delay before a NACK: a few group round trips (NORM's K = 4),
        long enough for the sender's REPAIR_NOTICE to reach everyone still waiting."""
        spread = BACKOFF_RTTS * self.grtt if self.group_size > 1 else self.grtt
        return min(max(0.002, spread), MAX_BACKOFF)

    def backoff(self, rng: random.Random) -> float:
        """A random NACK delay from a truncated exponential on [0, backoff_max].

        Most receivers draw a delay near the maximum and only a few near zero, so in a
        group of N the first NACK comes early and the REPAIR_NOTICE it triggers silences
        the rest; lambda = ln(N) + 1 keeps the expected number of NACKs per loss event
        near one whatever N is (Nonnenmacher and Biersack; NORM, RFC 5740).
        """
        spread = self.backoff_max()
        lam = math.log(max(self.group_size, 1)) + 1.0
        return spread / lam * math.log1p(rng.random() * math.expm1(lam))

    def drain(self, symbols: int) -> float:
        """Seconds the sender needs to send ``symbols`` at its announced rate."""
        return symbols * self.packet_bytes * 8 / max(self.rate_bps, 1.0)

    def retry_after(self, owed_symbols: int) -> float:
        """How long to wait for asked-for repair before asking again: two round trips plus
        twice the time the sender needs to send what was asked."""
        return 2 * self.grtt + 2 * self.drain(owed_symbols) + 0.005


class NackScheduler:
    """The receiver's list of blocks it may ask repair for, each with the time it may ask.

    A heap keyed by the time a block is next due keeps each step O(log n) even when a late
    joiner is missing a million blocks.
    """

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._heap: list[tuple[float, int]] = []
        self._due: dict[int, float] = {}
        #: Heap entries no longer in _due (done or rescheduled blocks), left for lazy
        #: removal; the heap is rebuilt when they outnumber the live ones, so that a long
        #: transfer's memory does not grow with every block ever owed.
        self._stale = 0
        self._attempts: dict[int, int] = {}
        self.nack_at: float | None = None
        self._armed_for = 0.0
        #: No new NACK before this: the sender is still busy with what was last asked, and
        #: asking faster than it can answer only queues duplicate rounds.
        self.quiet_until = 0.0

    def __len__(self) -> int:
        return len(self._due)

    def add(self, block: int, now: float) -> None:
        if block not in self._due:
            self._due[block] = now
            heapq.heappush(self._heap, (now, block))

    def discard(self, block: int) -> None:
        if self._due.pop(block, None) is not None:
            self._note_stale()
        self._attempts.pop(block, None)

    def _note_stale(self) -> None:
        self._stale += 1
        if self._stale > 2 * len(self._due) + 64:
            self._heap = [(due, block) for block, due in self._due.items()]
            heapq.heapify(self._heap)
            self._stale = 0

    def earliest_due(self) -> float | None:
        while self._heap:
            due, block = self._heap[0]
            if self._due.get(block) == due:
                return due
            heapq.heappop(self._heap)  # stale entry: block done or rescheduled
            self._stale = max(0, self._stale - 1)
        return None

    def arm(self, now: float, timing: NackTiming) -> None:
        """Schedule the next NACK after a random back-off from when something is due.

        Called whenever blocks become due; an armed timer is pulled earlier when a block
        is now due sooner than the one it was armed for (a newly owed block must not wait
        behind another block's retry).
        """
        due = self.earliest_due()
        if due is None:
            return
        start = max(now, due, self.quiet_until)
        if self.nack_at is None or start < self._armed_for:
            self._armed_for = start
            self.nack_at = start + timing.backoff(self._rng)

    def take_due(self, now: float, limit: int) -> list[int]:
        """Pop up to ``limit`` blocks whose time has come, earliest first."""
        blocks: list[int] = []
        while len(blocks) < limit:
            due = self.earliest_due()
            if due is None or due > now:
                break
            _, block = heapq.heappop(self._heap)
            blocks.append(block)
        return blocks

    def asked(self, block: int, now: float, wait: float, backlog: float = 0.0) -> None:
        """``block`` went out in a NACK; it is due again after ``wait`` (doubling with each
        retry, up to the cap) plus the sender's announced ``backlog``, unless it completes."""
        attempt = self._attempts.get(block, 0)
        self._attempts[block] = attempt + 1
        self._reschedule(block,
                         now + min(wait * 2 ** min(attempt, 8), MAX_RETRY_WAIT) + backlog)

    def progress(self, block: int, now: float, wait: float) -> None:
        """Repair for ``block`` is arriving: ask again only once it has stopped arriving for
        ``wait``, and without back-off, since the sender is answering.

        Retry timers guess when a round will have been sent; a sender that holds repair
        back during its pass sends it much later than the guess, and by then a block's
        back-off may have doubled to the cap.  Arrivals tell the truth.
        """
        if block in self._due:
            self._attempts.pop(block, None)
            self._reschedule(block, now + min(wait, MAX_RETRY_WAIT))

    def covered(self, block: int, now: float, wait: float, backlog: float = 0.0) -> None:
        """Repair for ``block`` is on its way for someone else's NACK: wait for it, as if
        we had asked, without counting a retry of our own."""
        if block in self._due:
            self._reschedule(block, now + min(wait, MAX_RETRY_WAIT) + backlog)

    def _reschedule(self, block: int, due: float) -> None:
        self._due[block] = due
        heapq.heappush(self._heap, (due, block))
        self._note_stale()  # the block's previous entry
