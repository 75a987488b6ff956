"""Progress on stderr while a transfer runs: a live bar for people, JSON lines for programs."""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import IO, Optional, Union

from mcastdeploy.drivers.recv_session import RecvProgress
from mcastdeploy.drivers.send_session import SendProgress

MODES = ("auto", "bar", "json", "none")
_BAR_WIDTH = 24


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressDisplay:
    """Renders SendProgress/RecvProgress snapshots; ``auto`` is a bar on a terminal only."""

    def __init__(self, mode: str, label: str, stream: Optional[IO[str]] = None) -> None:
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if self.stream.isatty() else "none"
        self.mode = mode
        self.label = label
        self._last: Optional[tuple[float, int]] = None
        self._rate = 0.0
        self._drawn = False

    def __call__(self, progress: Union[SendProgress, RecvProgress]) -> None:
        if self.mode == "none":
            return
        if self.mode == "json":
            record = dataclasses.asdict(progress) | {"label": self.label}
            self.stream.write(json.dumps(record) + "\n")
            self.stream.flush()
            return
        self._update_rate(progress.elapsed, progress.bytes_done)
        self.stream.write("\r" + self._line(progress) + "\x1b[K")
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False

    def _update_rate(self, elapsed: float, done: int) -> None:
        if self._last is not None and elapsed > self._last[0]:
            instant = (done - self._last[1]) / (elapsed - self._last[0])
            self._rate = instant if self._rate == 0 else 0.7 * self._rate + 0.3 * instant
        self._last = (elapsed, done)

    def _line(self, progress: Union[SendProgress, RecvProgress]) -> str:
        total = progress.bytes_total
        fraction = progress.bytes_done / total if total else 0.0
        filled = int(fraction * _BAR_WIDTH)
        bar = "#" * filled + "-" * (_BAR_WIDTH - filled)
        remaining = total - progress.bytes_done
        eta = _duration(remaining / self._rate) if self._rate > 0 and total else "-:--:--"
        line = (f"{self.label} {progress.state:<9} [{bar}] {fraction * 100:5.1f}% "
                f"{progress.bytes_done / 1e6:8.1f}/{total / 1e6:.1f} MB "
                f"{self._rate / 1e6:7.1f} MB/s ETA {eta}")
        if isinstance(progress, SendProgress):
            return line + (f" repairs {progress.repairs_sent}"
                           f" receivers {progress.receivers_done}/{progress.receivers}")
        return line + f" repairs {progress.repairs_asked} lost {progress.packets_lost}"
