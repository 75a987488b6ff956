"""Send-rate policy: a fixed rate, or an automatic one driven by the group's loss reports.

Receivers report cumulative pass packets received and lost in every STATUS.  The
automatic mode looks at how much each receiver lost since the previous decision and
follows one rule, in the spirit of TFMCC (RFC 4654) but much simpler, because a rack is
one sender, one switch and no competing multicast flow:

* **Group loss** is the *median* receiver's loss over the last interval.  Congestion of
  the sender's link or the switch raises everyone's loss together; one bad cable raises
  one receiver's.  The median follows the first and ignores the second, so the slowest
  receiver never sets the pace (it catches up through repair).
* **Base loss** is the lowest group loss seen in the last ``BASE_WINDOW`` intervals: the
  loss the links have whatever the rate (1 % random loss stays 1 % at any rate).
  Congestion is loss *above* that, which is loss the rate itself causes.
* **Slow start.**  The rate starts at an eighth of the ceiling and *doubles* after every
  interval within ``CLEAN`` of base, so it reaches the ceiling after three clean
  intervals.  Slow start ends for good at the ceiling, or at the first interval more
  than ``CONGESTED`` above base: the rate then falls to what the group received,
  rate × (1 − loss), cut at least by ``DECREASE`` and at most by half, and the rule
  below takes over.  In between it holds, still in slow start: the first interval's
  small sample can put the base a point too low, and that must not end slow start on
  noise.
* After slow start: group loss more than ``CONGESTED`` above base multiplies the rate
  by ``DECREASE``; within ``CLEAN`` of base, by ``INCREASE``; in between it holds.
* The rate stays within [floor, ceiling]; the operator's rate is the ceiling.
* After a decrease the next interval is skipped: its reports still mix the old rate in,
  and acting on them would cut twice for one episode.
* An interval with too few packets to judge (``MIN_PACKETS``: the pass has only just
  begun, or nothing is being sent) is not thrown away: its counts carry on into the
  next call, so the first judged interval of a pass is never a handful of packets.

Why doubling is safe here: there is one sender, one switch and no other flow to be fair
to, only a queue not to overrun, and the operator's ceiling bounds the overshoot.  The
sender consults the policy at every ANNOUNCE (every 0.5 s) and it decides once per
``interval`` (1 s); receivers send STATUS once a second, so a verdict covers the second
before each receiver's last STATUS: partly the rate set one decision earlier, partly the
current one.  A doubling that overruns the queue therefore shows at the next decision.  An overrun queue drops the excess, so
rate × (1 − loss) is what the bottleneck passes when the reports covered the current
rate; when they still mix in the previous, lower one, the loss understates the overrun,
hence the cut is at least ``DECREASE``.  It is at most half, since the rate before the
doubling was clean.  If the reports lagged a whole doubling, the cut rate still loses
and ``DECREASE`` cuts it again two intervals later (the one after a cut is skipped).
The packets lost meanwhile are repaired like any others.  Starting at an eighth of the
ceiling costs at most about two seconds of sending at the ceiling; the former ×1.15
climb took about 15 s at a 1 Gbit/s ceiling, longer than a 256 MiB image takes at that
rate.  After slow start the increase stays multiplicative but gentle, so the rate
settles near a bottleneck instead of swinging between half and twice it.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Optional, Protocol

#: Intervals whose lowest group loss is the links' own loss.
BASE_WINDOW = 10
#: Group loss this far above base is congestion ...
CONGESTED = 0.02
#: ... and within this of it the path is clean.
CLEAN = 0.005
DECREASE = 0.7
INCREASE = 1.15
#: Slow start multiplies the rate by this per clean interval, and divides it by this
#: when congestion ends slow start.
SLOW_START = 2.0
#: A receiver's interval counts only with this many pass packets in it.
MIN_PACKETS = 50


class RateController(Protocol):
    """What the sender asks of a rate policy."""

    rate_bps: float

    def report(self, receiver: int, received: int, lost: int) -> None:
        """A receiver's cumulative pass packets received and lost (from its STATUS)."""

    def update(self, now: float, report_interval: float = 0.0) -> float:
        """Called periodically; returns the rate to send at from now on.  Receivers report
        about every ``report_interval`` seconds (more in large groups)."""


@dataclass
class FixedRate:
    """The operator's rate, whatever happens."""

    rate_bps: float

    def report(self, receiver: int, received: int, lost: int) -> None:
        pass

    def update(self, now: float, report_interval: float = 0.0) -> float:
        return self.rate_bps


@dataclass
class _Counters:
    received: int = 0
    lost: int = 0
    #: Counters at the previous decision (a new receiver's count from zero).
    mark: tuple[int, int] = (0, 0)


@dataclass
class AutoRate:
    """Doubles from a low start until the group's loss rises above what its links always
    lose, then backs off on such loss and probes up gently without it (the rule is in the
    module docstring)."""

    ceiling_bps: float
    floor_bps: float = 1e6
    start_bps: Optional[float] = None
    interval: float = 1.0
    rate_bps: float = field(init=False)
    #: True until the first congestion or the ceiling: clean intervals double the rate.
    slow_start: bool = field(default=True, init=False)
    #: (time, group loss, rate) of every decision, for reports and tests.
    history: list[tuple[float, float, float]] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        if not 0 < self.floor_bps <= self.ceiling_bps:
            raise ValueError("need 0 < floor <= ceiling")
        start = self.start_bps if self.start_bps is not None else self.ceiling_bps / 8
        self.rate_bps = min(max(start, self.floor_bps), self.ceiling_bps)
        self.slow_start = self.rate_bps < self.ceiling_bps
        self._receivers: dict[int, _Counters] = {}
        self._recent: deque[float] = deque(maxlen=BASE_WINDOW)
        self._next_decision: Optional[float] = None
        self._skip = False

    def report(self, receiver: int, received: int, lost: int) -> None:
        counters = self._receivers.setdefault(receiver, _Counters())
        counters.received, counters.lost = received, lost

    def group_loss(self) -> Optional[float]:
        """The median receiver's loss since the last decision (None: too few packets)."""
        losses = []
        for counters in self._receivers.values():
            received = counters.received - counters.mark[0]
            lost = counters.lost - counters.mark[1]
            if received + lost >= MIN_PACKETS and received >= 0 and lost >= 0:
                losses.append(lost / (received + lost))
        return statistics.median(losses) if losses else None

    def update(self, now: float, report_interval: float = 0.0) -> float:
        # Decide no more often than receivers report: with some of them not heard since the
        # last decision, and others' reports reaching back before it, a decrease would be
        # judged on loss from the old rate and cut again for one episode.
        interval = max(self.interval, report_interval)
        if self._next_decision is None:
            self._next_decision = now + interval
            self._mark()
            return self.rate_bps
        if now < self._next_decision:
            return self.rate_bps
        loss = self.group_loss()
        if loss is None:
            # Too few packets to judge: keep counting and look again at the next call.
            return self.rate_bps
        self._next_decision = now + interval
        self._mark()
        self._recent.append(loss)
        if self._skip:
            self._skip = False
            return self.rate_bps
        rate = self._decide(loss, base=min(self._recent))
        self._skip = rate < self.rate_bps
        self.rate_bps = rate
        self.history.append((now, loss, rate))
        return rate

    def _decide(self, loss: float, base: float) -> float:
        """The next rate for an interval's group loss against the links' own."""
        rate = self.rate_bps
        if loss > base + CONGESTED:
            cut = DECREASE
            if self.slow_start:
                # Down to what the group received, within one doubling's overshoot.
                cut = min(DECREASE, max(1 / SLOW_START, 1 - loss))
                self.slow_start = False
            return max(self.floor_bps, rate * cut)
        if loss <= base + CLEAN:
            rate = min(self.ceiling_bps, rate * (SLOW_START if self.slow_start else INCREASE))
            self.slow_start = self.slow_start and rate < self.ceiling_bps
        return rate

    def _mark(self) -> None:
        for counters in self._receivers.values():
            counters.mark = (counters.received, counters.lost)
