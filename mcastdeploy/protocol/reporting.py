"""How often receivers send STATUS: one rule, followed by receivers and allowed for by the
sender.

Every receiver reports to the sender by unicast.  At a fixed one-second interval the load
grows with the group: 10,000 receivers would send 10,000 STATUS a second, a burst of
10,000 at once when they joined on the same ANNOUNCE.  As RTCP does (RFC 3550, 6.2-6.3),
the steady interval grows with the group size the sender announces, so that the group's
aggregate stays within ``STATUS_BUDGET``, and every gap is drawn at random around its
nominal value, so that receivers drift apart instead of reporting in lockstep.

The sender reads STATUS for three things, each of which must allow for the longer gaps:
a still-wanting STATUS counts as a request and restarts the linger (``group_linger``),
the automatic rate compares loss between its decisions (``group_interval`` paces them),
and the parity policy reads cumulative loss (a later report is merely staler).
"""

from __future__ import annotations

import random

#: STATUS per second the whole group may send the sender in steady state.  One STATUS is
#: about 120 bytes on the wire (sealed) and some 10 us of the sender's time: 1000/s is
#: 1 Mbit/s and about 1 % of a core (plus the socket reads), beside the tens of thousands
#: of packets/s it sends.  Groups up to 1000 keep the one-second interval; 10,000 receivers
#: report every 10 s.
STATUS_BUDGET = 1000.0
#: The early ramp (join repeats at 50, 100, 200 ms ...) keeps each wave of the group's
#: reports within this rate: its first gap is at least group size / this.  A transient
#: (each wave half the rate of the one before), so allowed well above the steady budget:
#: up to 1000 receivers keep the 50 ms join repeat, 10,000 repeat after 0.5 s.
RAMP_BUDGET = 20 * STATUS_BUDGET
#: Each gap is drawn uniformly between (1 - JITTER) and (1 + JITTER) times its nominal
#: value (RTCP's 0.5 to 1.5): the mean, hence the budget, is unchanged.
JITTER = 0.5
#: The sender's linger outlasts this many of the longest gaps the group size causes, so a
#: receiver still reporting missing blocks is not given up on for one or two lost STATUS.
SILENT_GAPS = 3


def group_interval(group_size: int) -> float:
    """The mean STATUS interval the group size alone requires to stay within the budget."""
    return max(group_size, 1) / STATUS_BUDGET


def steady_interval(group_size: int, base: float) -> float:
    """A receiver's mean STATUS interval once its ramp is over: its configured ``base``,
    lengthened for large groups."""
    return max(base, group_interval(group_size))


def nominal_gap(sent: int, group_size: int, base: float, join_repeat: float) -> float:
    """The gap after a receiver's ``sent``-th STATUS (1 is its join): the ramp doubles from
    ``join_repeat`` (or the ramp budget's floor) up to the steady interval."""
    first = max(join_repeat, max(group_size, 1) / RAMP_BUDGET)
    steady = steady_interval(group_size, base)
    return min(first * 2.0 ** min(sent - 1, 30), steady)


def draw_gap(nominal: float, rng: random.Random) -> float:
    """``nominal`` spread at random within +/- JITTER of itself."""
    return nominal * rng.uniform(1.0 - JITTER, 1.0 + JITTER)


def group_linger(group_size: int, linger: float) -> float:
    """The sender's linger: the configured one, or long enough to cover ``SILENT_GAPS`` of
    the longest STATUS gap the group size causes, whichever is longer.  Only the group's
    part is counted: receivers' own base interval is theirs to configure, and at small
    groups the configured linger is kept exactly."""
    return max(linger, SILENT_GAPS * (1.0 + JITTER) * group_interval(group_size))
