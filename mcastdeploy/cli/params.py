"""Command-line value types shared by every command."""

from __future__ import annotations

import math
from typing import Any, Optional

import click


class Seconds(click.FloatRange):
    """A number of seconds in a range, and finite: click's FloatRange lets 'nan' through
    (every comparison with it is false), and a NaN deadline breaks the event loop's
    select() or lands in JSON that nothing else can read; 'inf' is no duration either."""

    name = "seconds"

    def convert(self, value: Any, param: Optional[click.Parameter],
                ctx: Optional[click.Context]) -> Any:
        seconds = super().convert(value, param, ctx)
        if not math.isfinite(seconds):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        return seconds
