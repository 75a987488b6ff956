"""How the daemon's rate budget is split between the sessions it runs: max-min fairness.

Every session gets an equal share of the budget, except that one asking for less (its
image's or the deployer's ceiling) gets what it asks and the rest is shared among the
others again (water filling).  The split is made afresh whenever a session starts or
ends, so one session alone gets the whole budget and two get half each.
"""

from __future__ import annotations

from typing import Mapping, Optional

#: No session is ever given less than this (bits per second): a rate of zero would stall
#: its sender, and a budget split a thousand ways is a deployer's mistake to show, not hide.
MIN_SHARE_BPS = 1_000_000


def fair_shares(budget_bps: int, ceilings: Mapping[str, Optional[int]]) -> dict[str, int]:
    """Each session's rate; ``ceilings`` maps session id to the most it may use (None: no
    limit of its own).  The shares sum to at most ``budget_bps`` (or MIN_SHARE_BPS each)."""
    shares: dict[str, int] = {}
    left = dict(ceilings)
    remaining = budget_bps
    while left:
        equal = remaining / len(left)
        capped = {name: cap for name, cap in left.items() if cap is not None and cap <= equal}
        if not capped:
            for name in left:
                shares[name] = int(equal)
            break
        for name, cap in capped.items():
            shares[name] = int(cap)  # type: ignore[arg-type]
            remaining -= cap  # type: ignore[operator]
            del left[name]
    return {name: max(MIN_SHARE_BPS, rate) for name, rate in shares.items()}
