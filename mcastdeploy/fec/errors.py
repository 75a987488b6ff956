"""The one exception the FEC layer raises."""

from __future__ import annotations

__all__ = ["FecError"]


class FecError(ValueError):
    """Bad block size, bad symbol id, too few symbols or wrongly shaped data.

    A ``ValueError`` subclass, so callers that only care about "the input
    was wrong" need not import it.
    """
