"""Reading the image the sender multicasts: a local file or block device."""

from __future__ import annotations

import errno
import hashlib
import os
import stat

from mcastdeploy.drivers.target import device_size
from mcastdeploy.protocol.manifest import block_hash



class SourceError(OSError):
    """The image cannot be read."""


def check_local_image(path: str) -> None:
    """Refuse, before anything opens it, what is no image: opening a FIFO blocks until a
    writer comes, and /dev/zero or a character device never ends."""
    try:
        info = os.stat(path)
    except OSError as error:
        raise SourceError(f"cannot read image {path}: {error.strerror}") from None
    if not (stat.S_ISREG(info.st_mode) or stat.S_ISBLK(info.st_mode)):
        raise SourceError(f"image {path} is neither a regular file nor a block device")


class LocalImage:
    """A local image, read block by block with ``pread`` so memory stays flat."""

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

    def fileno(self) -> int:
        """The open image (a download's part file may be renamed or removed meanwhile)."""
        return self._fd

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise SourceError(f"image {self.path} shrank while being sent")
        return data

    def digests(self, block_bytes: int) -> tuple[bytes, bytes]:
        """SHA-256 of the whole image, and those of each ``block_bytes`` block one after
        the other (32 bytes each), in one read.

        Knowing them before the first packet lets every ANNOUNCE carry the checksum, so a
        receiver whose spec pins another image refuses before writing a byte, a sender never
        multicasts an image that does not match the spec, and the block manifest
        (protocol/manifest.py) can go out ahead of the blocks it vouches for.
        """
        whole = hashlib.sha256()
        blocks = bytearray()
        zero_hashes: dict[int, bytes] = {}
        for offset in range(0, self.size, block_bytes):
            length = min(block_bytes, self.size - offset)
            if self._in_hole(offset, length):  # sparse: no need to read what is zero
                data = bytes(length)
                digest = zero_hashes.get(length) or zero_hashes.setdefault(
                    length, block_hash(data))
            else:
                data = self.read(offset, length)
                digest = block_hash(data)
            whole.update(data)
            blocks += digest
        return whole.digest(), bytes(blocks)

    def _in_hole(self, offset: int, length: int) -> bool:
        """The file has no data in [offset, offset + length) (SEEK_DATA, where supported)."""
        try:
            return os.lseek(self._fd, offset, os.SEEK_DATA) >= offset + length
        except OSError as error:  # ENXIO: no data after offset at all
            return error.errno == errno.ENXIO
        except AttributeError:
            return False

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
