"""This process's peak memory, for the summaries (issue 5 bounds it)."""

from __future__ import annotations

from typing import Optional


def peak_rss_mb() -> Optional[float]:
    """Peak resident set size of this process image, in MB (10^6 bytes); None off Linux.

    From /proc's VmHWM rather than getrusage: ru_maxrss also counts the peak of the
    process that forked us, before our exec, so a small receiver started by a big parent
    would report the parent's memory.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e6
    except (OSError, ValueError, IndexError):
        return None
    return None
