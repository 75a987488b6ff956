"""The sender's estimate of the group round-trip time (GRTT).

NACK back-off, the sender's repair hold-off and receivers' retry timers are all measured
in group round trips, so a guess that is ten times too long makes repair ten times slower.
The estimate follows NORM's rule: it tracks the *largest* recent receiver RTT (timers must
cover the farthest receiver), rises at once and decays slowly.
"""

from __future__ import annotations

from typing import Optional

#: Samples outside these bounds are clock glitches or forged echoes, not round trips.
MIN_SAMPLE = 0.0
MAX_SAMPLE = 10.0


class GroupRtt:
    def __init__(self, initial: float, floor: float = 0.0005, ceiling: float = 5.0) -> None:
        self.value = initial
        self.floor = floor
        self.ceiling = ceiling
        self.samples = 0
        self._window_peak: Optional[float] = None

    def sample(self, rtt: float) -> None:
        """One receiver's round trip: echo arrival minus its ANNOUNCE's timestamp and hold."""
        if not MIN_SAMPLE <= rtt <= MAX_SAMPLE:
            return
        rtt = min(max(rtt, self.floor), self.ceiling)
        if self.samples == 0 or rtt > self.value:
            self.value = rtt  # the first sample replaces the configured guess
        self._window_peak = rtt if self._window_peak is None else max(self._window_peak, rtt)
        self.samples += 1

    def end_window(self) -> None:
        """Called once per ANNOUNCE interval: decay toward the window's largest sample."""
        if self._window_peak is not None and self._window_peak < self.value:
            self.value = max(self._window_peak, 0.5 * self.value)
        self._window_peak = None
