"""Writing blocks straight to the target disk (or file) at their offsets."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import stat
import struct
from typing import Optional

from mcastdeploy.drivers.digest import OrderedDigest


class TargetError(OSError):
    """The target cannot take the image (missing, too small, not writable)."""


def device_size(fd: int) -> int:
    """Size of a regular file or block device behind ``fd``."""
    return os.lseek(fd, 0, os.SEEK_END)


def check_target(path: str, image_size: Optional[int] = None) -> None:
    """Fail early, before joining, on a target that cannot possibly work; writes nothing."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise TargetError(f"target directory {parent} does not exist") from None
        if not os.access(parent, os.W_OK):
            raise TargetError(f"cannot create target {path}: permission denied") from None
        return
    if not (stat.S_ISREG(info.st_mode) or stat.S_ISBLK(info.st_mode)):
        raise TargetError(f"target {path} is neither a regular file nor a block device")
    if not os.access(path, os.W_OK):
        raise TargetError(f"target {path} is not writable")
    if image_size is not None:
        _check_size(path, info, image_size)


def _check_size(path: str, info: os.stat_result, image_size: int) -> None:
    if stat.S_ISBLK(info.st_mode):
        with open(path, "rb") as handle:
            size = device_size(handle.fileno())
    else:
        size = info.st_size
        if size == 0:
            return  # an empty file (e.g. from mktemp) is grown to the image
    if size < image_size:
        raise TargetError(f"target {path} is {size} bytes, smaller than the image "
                          f"({image_size} bytes)")


_BLKZEROOUT = 0x127F  # _IO(0x12, 127): zero a byte range of a block device
_BLKSSZGET = 0x1268  # _IO(0x12, 104): its logical sector size
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_ZEROS: dict[int, bytes] = {}


def _zeros(length: int) -> bytes:
    """Shared zero bytes (a session has two block lengths: full and last)."""
    zeros = _ZEROS.get(length)
    if zeros is None:
        zeros = _ZEROS[length] = bytes(length)
    return zeros


def _write_zeros(fd: int, offset: int, length: int) -> None:
    step = 1 << 20
    for start in range(offset, offset + length, step):
        _pwrite_all(fd, memoryview(_zeros(min(step, offset + length - start))), start)


def _punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate a range of a regular file (it reads back as zeros); False if the file
    system or platform cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fallocate = libc.fallocate
    except (OSError, AttributeError):
        return False
    fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long)
    return fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0


def _zero_device(fd: int, offset: int, length: int) -> None:
    """BLKZEROOUT on the sector-aligned middle of the range, written zeros at its edges."""
    sector = _sector_size(fd, default=0)
    start = -(-offset // sector) * sector if sector else offset
    stop = (offset + length) // sector * sector if sector else offset
    if sector and stop > start:
        try:
            fcntl.ioctl(fd, _BLKZEROOUT, struct.pack("QQ", start, stop - start))
        except OSError:
            start = stop = offset
    else:
        start = stop = offset
    if start > offset:
        _write_zeros(fd, offset, start - offset)
    if offset + length > stop:
        _write_zeros(fd, max(stop, offset), offset + length - max(stop, offset))


def _sector_size(fd: int, default: int = 512) -> int:
    """The device's logical sector size; ``default`` where it has none (a file)."""
    try:
        return struct.unpack("i", fcntl.ioctl(fd, _BLKSSZGET, b"\0" * 4))[0]
    except OSError:
        return default


class DirectWriter:
    """Writes through O_DIRECT, past the page cache: a receiver writing 50 GB otherwise
    fills the agent's memory with dirty pages that only the final fsync drains, and evicts
    everything else on the way.

    O_DIRECT wants buffer, offset and length aligned (to the logical sector; we use the
    page, which is at least that): the aligned middle of each write goes direct from a
    page-aligned buffer, its unaligned edges through the ordinary descriptor. A page is
    thereby only ever written one way (an edge page has bytes of two blocks, so no single
    write covers it whole), and the page cache never holds a stale copy of a page written
    direct.
    """

    def __init__(self, path: str, buffered_fd: int) -> None:
        flags = os.O_RDWR | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_DIRECT", 0)
        if not getattr(os, "O_DIRECT", 0):
            raise TargetError("this platform has no O_DIRECT")
        try:
            self._fd = os.open(path, flags)
        except OSError as error:
            if error.errno == errno.EINVAL:
                raise TargetError(f"target {path} does not support direct I/O (O_DIRECT): "
                                  "its file system cannot; receive without --direct") from None
            raise TargetError(f"cannot open target {path}: {error.strerror}") from None
        self.path = path
        self._buffered_fd = buffered_fd
        self.unit = max(mmap.PAGESIZE, _sector_size(self._fd))
        self._buffer: Optional[mmap.mmap] = None
        self.bytes_direct = 0

    def write(self, offset: int, view: memoryview) -> None:
        end = offset + len(view)
        start_aligned = -(-offset // self.unit) * self.unit
        end_aligned = end // self.unit * self.unit
        if end_aligned <= start_aligned:
            _pwrite_all(self._buffered_fd, view, offset)
            return
        middle = end_aligned - start_aligned
        buffer = self._room(middle)
        buffer[:middle] = view[start_aligned - offset:end_aligned - offset]
        # One write: a short one would leave an unaligned rest that O_DIRECT refuses.
        if os.pwrite(self._fd, memoryview(buffer)[:middle], start_aligned) != middle:
            raise TargetError(f"short direct write to {self.path} at {start_aligned}")
        self.bytes_direct += middle
        if start_aligned > offset:
            _pwrite_all(self._buffered_fd, view[:start_aligned - offset], offset)
        if end > end_aligned:
            _pwrite_all(self._buffered_fd, view[end_aligned - offset:], end_aligned)

    def _room(self, length: int) -> mmap.mmap:
        """A page-aligned buffer (anonymous mmap) of at least ``length`` bytes, reused."""
        if self._buffer is None or len(self._buffer) < length:
            if self._buffer is not None:
                self._buffer.close()
            self._buffer = mmap.mmap(-1, -(-length // self.unit) * self.unit)
        return self._buffer

    def close(self) -> None:
        if self._buffer is not None:
            self._buffer.close()
            self._buffer = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


class Target:
    """An open target: ``write`` places blocks, ``finish`` syncs and returns the SHA-256.

    A regular file that does not exist (or is empty) is created at the image's size; an
    existing larger file or block device keeps its size and its bytes past the image.  The
    digest covers exactly what was written, read back from the target for blocks that
    arrived out of order, and ``finish`` syncs before it answers, so nothing is reported as
    written that is not on the disk. ``direct`` writes past the page cache (DirectWriter).
    """

    def __init__(self, path: str, image_size: int, *, direct: bool = False) -> None:
        self.path = path
        self.image_size = image_size
        existed = os.path.exists(path)
        check_target(path, image_size)
        flags = os.O_RDWR | getattr(os, "O_CLOEXEC", 0)
        try:
            self._fd = os.open(path, flags if existed else flags | os.O_CREAT, 0o644)
        except OSError as error:
            raise TargetError(f"cannot open target {path}: {error.strerror}") from None
        info = os.fstat(self._fd)
        self._block_device = stat.S_ISBLK(info.st_mode)
        #: Bytes from here on were holes when we opened the target: already zero.
        self._zero_from = image_size if self._block_device else info.st_size
        if stat.S_ISREG(info.st_mode) and info.st_size < image_size:
            os.ftruncate(self._fd, image_size)
        self._digest = OrderedDigest(image_size, self._read)
        self.bytes_written = 0
        self.bytes_zeroed = 0
        self._direct: Optional[DirectWriter] = None
        if direct:
            try:
                self._direct = DirectWriter(path, self._fd)
            except BaseException:
                self.close()
                raise

    @property
    def bytes_direct(self) -> int:
        """Bytes written past the page cache (O_DIRECT); 0 unless ``direct``."""
        return 0 if self._direct is None else self._direct.bytes_direct

    def read(self, offset: int, length: int) -> bytes:
        """What the target holds there now (a resuming receiver checks it)."""
        return self._read(offset, length)

    def zero(self, offset: int, length: int) -> None:
        """Make ``length`` bytes at ``offset`` zero as cheaply as the target allows: nothing
        where the file was a hole when opened, a punched hole in a regular file,
        BLKZEROOUT on a block device, written zeros where neither works."""
        if offset < 0 or offset + length > self.image_size:
            raise ValueError("zeroing outside the image")
        end = offset + length
        if offset < self._zero_from:
            upto = min(end, self._zero_from)
            if self._block_device:
                _zero_device(self._fd, offset, upto - offset)
            elif not _punch_hole(self._fd, offset, upto - offset):
                _write_zeros(self._fd, offset, upto - offset)
            self.bytes_zeroed += upto - offset
        self._digest.update_at(offset, _zeros(length))

    def keep(self, offset: int, data: bytes | memoryview) -> None:
        """``data``, just read from ``offset``, stays: count it in the image's digest as if
        written (nothing is written)."""
        self._digest.update_at(offset, data)

    def _read(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise TargetError(f"short read back from {self.path} at {offset}")
        return data

    def write(self, offset: int, data: bytes | memoryview) -> None:
        if offset < 0 or offset + len(data) > self.image_size:
            raise ValueError("write outside the image")
        view = memoryview(data).cast("B")
        if self._direct is not None:
            self._direct.write(offset, view)
        else:
            _pwrite_all(self._fd, view, offset)
        self.bytes_written += len(view)
        self._digest.update_at(offset, view)

    def finish(self) -> bytes:
        """Sync everything to the target and return the SHA-256 of the image on it."""
        os.fsync(self._fd)
        return self._digest.digest()

    def close(self) -> None:
        if self._direct is not None:
            self._direct.close()
            self._direct = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "Target":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
