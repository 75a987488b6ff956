"""SHA-256 of an image whose blocks arrive in any order, without holding them in memory."""

from __future__ import annotations

import hashlib
from typing import Callable


class OrderedDigest:
    """Hashes the contiguous prefix as it grows.

    Blocks that arrive ahead of the prefix are only remembered by position; when the gap
    before them closes, ``read_back`` fetches their bytes again (from the disk they were
    written to), so memory stays flat however out of order the blocks come.
    """

    def __init__(self, size: int, read_back: Callable[[int, int], bytes] | None = None) -> None:
        self.size = size
        self.hashed = 0
        self._hash = hashlib.sha256()
        self._ahead: dict[int, int] = {}  # offset -> length, beyond the prefix
        self._read_back = read_back

    def update_at(self, offset: int, data: bytes | memoryview) -> None:
        if offset == self.hashed:
            self._hash.update(data)
            self.hashed += len(data)
            self._catch_up()
        elif offset > self.hashed and self._read_back is not None:
            self._ahead[offset] = len(data)
        # offset < hashed: already counted (a block supplied twice)

    def _catch_up(self) -> None:
        assert self._read_back is not None or not self._ahead
        while self.hashed in self._ahead:
            length = self._ahead.pop(self.hashed)
            self._hash.update(self._read_back(self.hashed, length))  # type: ignore[misc]
            self.hashed += length

    @property
    def complete(self) -> bool:
        return self.hashed >= self.size

    def digest(self) -> bytes:
        if not self.complete:
            raise ValueError(f"only {self.hashed} of {self.size} bytes were hashed")
        return self._hash.digest()
