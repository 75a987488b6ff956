"""Reading the image the sender multicasts: a local file or block device."""

from __future__ import annotations

import os
import stat

from mcastdeploy.drivers.digest import OrderedDigest
from mcastdeploy.drivers.target import device_size


class SourceError(OSError):
    """The image cannot be read."""


class LocalImage:
    """A local image, read block by block with ``pread`` so memory stays flat.

    Its SHA-256 is computed as the data pass reads it in order, so sending starts at once
    instead of after a whole extra read of a many-gigabyte image.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as error:
            raise SourceError(f"cannot read image {path}: {error.strerror}") from None
        info = os.fstat(self._fd)
        if not (stat.S_ISREG(info.st_mode) or stat.S_ISBLK(info.st_mode)):
            os.close(self._fd)
            raise SourceError(f"image {path} is neither a regular file nor a block device")
        self.size = device_size(self._fd)
        if self.size == 0:
            os.close(self._fd)
            raise SourceError(f"image {path} is empty")
        self._digest = OrderedDigest(self.size)

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise SourceError(f"image {self.path} shrank while being sent")
        self._digest.update_at(offset, data)
        return data

    def checksum(self) -> bytes | None:
        """The SHA-256, once every byte has been read in order; None before."""
        return self._digest.digest() if self._digest.complete else None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
