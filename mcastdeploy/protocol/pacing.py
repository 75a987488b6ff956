"""Send pacing: a token bucket driven by the time the caller passes in."""

from __future__ import annotations


_EPSILON_BYTES = 1e-6


class TokenBucket:
    """Allows ``rate_bps`` bits per second on average with bursts of up to ``burst_bytes``.

    Multicast has no per-receiver flow control, so the sender's only defence against
    overrunning switch buffers and receivers is to pace itself evenly.
    """

    def __init__(self, rate_bps: float, burst_bytes: int, now: float) -> None:
        if rate_bps <= 0:
            raise ValueError("rate must be positive")
        self.rate_bps = float(rate_bps)
        self.burst_bytes = burst_bytes
        self._tokens = float(burst_bytes)
        self._updated = now

    def set_rate(self, rate_bps: float) -> None:
        if rate_bps <= 0:
            raise ValueError("rate must be positive")
        self.rate_bps = float(rate_bps)

    def _refill(self, now: float) -> None:
        if now > self._updated:
            self._tokens = min(self.burst_bytes,
                               self._tokens + (now - self._updated) * self.rate_bps / 8)
            self._updated = now

    def try_consume(self, nbytes: int, now: float) -> bool:
        """Take ``nbytes`` of tokens if they are there (the bucket may go to zero, not below)."""
        self._refill(now)
        # The tolerance absorbs float rounding between ready_at() and the refill, which
        # would otherwise wake the caller a hair too early, forever.
        if self._tokens >= nbytes - _EPSILON_BYTES:
            self._tokens = max(0.0, self._tokens - nbytes)
            return True
        return False

    def ready_at(self, nbytes: int) -> float:
        """The earliest time ``nbytes`` can be sent, as of the last refill."""
        missing = nbytes - self._tokens
        return self._updated if missing <= 0 else self._updated + missing * 8 / self.rate_bps
