"""How hard a fetch tries before it gives up: attempts per copy, back-off, a time limit."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RetryPolicy"]


@dataclass(frozen=True)
class RetryPolicy:
    """Bounds on retrying one piece of work (describing the object, or one range).

    A piece fails over to the next copy after ``attempts_per_copy`` failures in a row on the
    copy it was using (counted over all connections, so a dead copy is left after a few
    failures, not a few per connection), and gives up after ``attempts_per_copy`` times the
    number of copies, or ``give_up_after`` seconds after its first failure, whichever comes
    first. Waits between attempts double from ``first_delay`` up to ``max_delay``; moving to
    a copy that has not failed this piece yet does not wait.
    """

    attempts_per_copy: int = 3
    first_delay: float = 1.0
    max_delay: float = 15.0
    give_up_after: float = 120.0

    def delay(self, attempt: int) -> float:
        """The pause after the ``attempt``-th failure (1-based) of one piece."""
        return min(self.max_delay, self.first_delay * 2 ** max(0, attempt - 1))
