"""The rack head's image cache: each image is pulled once, then sent as often as asked.

One directory; each entry is named by a digest of the image's identity (its URL or object
name) and its SHA-256 when known, so a new checksum for the same name is a new entry:

- ``ID.img``: the complete, verified image (it only appears by rename at the end of a fetch);
  or the raw conversion of a qcow2 image (``get_or_convert``), an entry of its own
- ``ID.img.part``, ``ID.img.part.state``: a fetch in progress, or a killed one to resume
- ``ID.json``: what the entry is, for people and for the ``CachedImage`` it returns
- ``ID.lock``: flock(2) on it: shared while a sender uses the image, exclusive while one
  fetches it or evicts it. So two senders on one head never fetch one image twice at once,
  and eviction never removes an image in use or being fetched.

Last use is the ``.img`` file's mtime, set when it is fetched and at every hit (atime is
often off). To stay under
the limit, a fetch first evicts the least recently used entries that nobody holds, under a
directory-wide lock (``.cache.lock``) so that two fetches do not both count the same room.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import json
import os
import threading
import time
from typing import Any, Callable, Optional, Sequence

from mcastdeploy.drivers.sources.errors import CacheError
from mcastdeploy.drivers.sources.fetch import FetchResult, fetch, part_path, state_path
from mcastdeploy.drivers.sources.qcow2 import check, convert_to_raw, virtual_size
from mcastdeploy.drivers.sources.reader import RangeReader

__all__ = ["ImageCache", "CachedImage"]

_POLL = 0.1


class CachedImage:
    """A complete, verified image in the cache, held (shared lock) until ``close``: path-like,
    so it can go wherever a path does; a context manager."""

    def __init__(self, path: str, lock_fd: int, meta: dict,
                 fetched: Optional[FetchResult]) -> None:
        self.path = path
        self.key: str = meta.get("key", "")
        self.size: Optional[int] = meta.get("size")
        self.sha256: Optional[str] = meta.get("sha256")
        #: How it was fetched by this call; None for a cache hit or a conversion.
        self.fetched = fetched
        self._lock_fd = lock_fd

    def __fspath__(self) -> str:
        return self.path

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the shared lock
            self._lock_fd = -1

    def __enter__(self) -> "CachedImage":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class ImageCache:
    """Images by identity, at most ``limit_bytes`` of them, least recently used evicted first.

    ``lock_timeout`` bounds every wait for another process's lock, including the wait for
    another sender to finish fetching the image we want. ``fetch_options`` go to ``fetch``
    (connections, range_bytes, retry).
    """

    def __init__(self, directory: str, limit_bytes: int, *, lock_timeout: float = 3600.0,
                 **fetch_options: Any) -> None:
        if limit_bytes <= 0:
            raise ValueError("the cache limit must be positive")
        self.directory = directory
        self.limit_bytes = limit_bytes
        self.lock_timeout = lock_timeout
        self._fetch_options = fetch_options

    def entry_id(self, key: str, sha256: Optional[str]) -> str:
        identity = f"{key}\n{(sha256 or '').lower()}".encode()
        return hashlib.sha256(identity).hexdigest()[:32]

    def image_path(self, key: str, sha256: Optional[str] = None) -> str:
        return os.path.join(self.directory, self.entry_id(key, sha256) + ".img")

    def get_or_fetch(self, key: str, readers: Sequence[RangeReader],
                     expected_sha256: Optional[str] = None, *,
                     on_hashed: Optional[Callable[[str, int], None]] = None,
                     cancel: Optional[threading.Event] = None) -> CachedImage:
        """A held, complete copy of the image, fetched through ``readers`` if missing.

        A hit touches no network. A miss waits (bounded) for another sender fetching the
        same image, else fetches it itself, resuming a killed fetch's ``.part``; then
        ``on_hashed(part, n)`` says, from this thread, that the first ``n`` bytes of the
        file ``part`` (already at its full size) are written and hashed, so a sender can
        multicast them while the rest arrives. ``cancel`` stops such a fetch (fetch()).
        """
        entry = self.entry_id(key, expected_sha256)

        def make(image: str, reserve: Callable[[int], None]) -> tuple[dict, Any]:
            hashed = None if on_hashed is None else functools.partial(
                on_hashed, part_path(image))
            result = fetch(readers, image, expected_sha256=expected_sha256,
                           reserve=reserve, on_hashed=hashed, cancel=cancel,
                           **self._fetch_options)
            return {"key": key, "size": result.size, "sha256": result.sha256,
                    "etag": result.etag, "fetched": time.time()}, result

        return self._get_or_make(entry, key, make)

    def get_or_convert(self, key: str, source: str) -> CachedImage:
        """A held raw copy of the qcow2 image ``source``, converted once per ``key`` (which
        must name the source's content: a cache entry's id, or a local file's path, size
        and mtime). Same locks as a fetch, so two senders never convert one image twice."""
        entry = self.entry_id("raw-of:" + key, None)

        def make(image: str, reserve: Callable[[int], None]) -> tuple[dict, Any]:
            check(source)
            size = virtual_size(source)
            reserve(size)
            convert_to_raw(source, part_path(image), image)
            return {"key": "raw-of:" + key, "size": size, "sha256": None,
                    "converted_from": source, "converted": time.time()}, None

        return self._get_or_make(entry, key, make)

    def _get_or_make(self, entry: str, key: str,
                     make: Callable[[str, Callable[[int], None]], tuple[dict, Any]]
                     ) -> CachedImage:
        """The held entry's image; if missing, ``make(image_path, reserve)`` creates it
        (atomically, by rename) under the entry's exclusive lock and returns (meta, how)."""
        self._ensure_directory()
        image = os.path.join(self.directory, entry + ".img")
        lock = os.path.join(self.directory, entry + ".lock")
        deadline = time.monotonic() + self.lock_timeout
        while True:
            fd = self._open_locked(lock, fcntl.LOCK_SH, deadline, key)
            if os.path.exists(image):
                _touch(image)
                return CachedImage(image, fd, self._meta(entry), None)
            os.close(fd)
            fd = self._open_locked(lock, fcntl.LOCK_EX, deadline, key)
            if os.path.exists(image):  # another sender made it while we waited
                os.close(fd)
                continue
            try:
                meta, result = make(image,
                                    lambda size: self._reserve(entry, size, deadline))
                self._write_meta(entry, meta)
                _touch(image)
                # From making to using; not atomic, so an evictor may slip in between.
                _flock_until(fd, fcntl.LOCK_SH, time.monotonic() + self.lock_timeout,
                             f"{key} made but locked by another process for too long")
            except BaseException:
                os.close(fd)
                raise
            if os.path.exists(image):
                return CachedImage(image, fd, meta, result)
            os.close(fd)  # evicted in the instant the lock changed mode: start again

    def _ensure_directory(self) -> None:
        try:
            os.makedirs(self.directory, exist_ok=True)
            probe = os.path.join(self.directory, ".cache.lock")
            os.close(os.open(probe, os.O_RDWR | os.O_CREAT, 0o644))
        except OSError as error:
            raise CacheError(f"cannot use cache directory {self.directory}: "
                             f"{error.strerror}") from None

    def _open_locked(self, path: str, mode: int, deadline: float, key: str) -> int:
        """Open and flock ``path``, waiting at most until ``deadline``. An evicting process
        unlinks lock files it holds, so a lock taken on an unlinked file is taken again."""
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                _flock_until(fd, mode, deadline,
                             f"{key} is still locked by another sender after "
                             f"{self.lock_timeout:g} s ({path})")
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)

    def _reserve(self, keep: str, size: int, deadline: float) -> None:
        """Make room for ``size`` bytes of entry ``keep``: evict the least recently used
        entries nobody holds, then claim the room by giving the ``.part`` its full size
        before the directory lock is released."""
        if size > self.limit_bytes:
            raise CacheError(f"the image is {size} bytes, more than the cache limit of "
                             f"{self.limit_bytes} bytes ({self.directory})")
        lock = os.path.join(self.directory, ".cache.lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            _flock_until(fd, fcntl.LOCK_EX, deadline,
                         f"cache directory {self.directory} still locked after "
                         f"{self.lock_timeout:g} s")
            entries = self._scan()
            used = sum(used for entry, (used, _) in entries.items() if entry != keep)
            by_age = sorted((last, entry) for entry, (_, last) in entries.items()
                            if entry != keep)
            for _, entry in by_age:
                if used + size <= self.limit_bytes:
                    break
                if self._evict(entry):
                    used -= entries[entry][0]
            if used + size > self.limit_bytes:
                raise CacheError(f"cache {self.directory} has no room for {size} bytes: "
                                 f"{used} bytes of it are in use, the limit is "
                                 f"{self.limit_bytes}")
            part = part_path(os.path.join(self.directory, keep + ".img"))
            try:
                with open(part, "ab") as handle:
                    handle.truncate(size)
            except OSError as error:
                raise CacheError(f"cannot claim {size} bytes in {self.directory}: "
                                 f"{error.strerror}") from None
        finally:
            os.close(fd)

    def _scan(self) -> dict:
        """Bytes and last use of every entry: the sum of its files' sizes, and its image's
        mtime (a fetch never finished: its newest file's)."""
        used: dict[str, int] = {}
        last: dict[str, int] = {}
        images: dict[str, int] = {}
        with os.scandir(self.directory) as listing:
            for item in listing:
                if item.name.startswith(".") or "." not in item.name:
                    continue
                try:
                    info = item.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                entry, suffix = item.name.split(".", 1)
                used[entry] = used.get(entry, 0) + info.st_size
                last[entry] = max(last.get(entry, 0), info.st_mtime_ns)
                if suffix == "img":
                    images[entry] = info.st_mtime_ns
        return {entry: (used[entry], images.get(entry, last[entry])) for entry in used}

    def _evict(self, entry: str) -> bool:
        """Remove an entry unless someone holds it; True if it was removed."""
        base = os.path.join(self.directory, entry)
        try:
            fd = os.open(base + ".lock", os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0),
                         0o644)
        except OSError:
            return False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    return False  # in use, or being fetched
                raise
            image = base + ".img"
            for path in (image, part_path(image), state_path(image), base + ".json",
                         base + ".lock"):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
            return True
        finally:
            os.close(fd)

    def _meta(self, entry: str) -> dict:
        try:
            with open(os.path.join(self.directory, entry + ".json"), encoding="utf-8") as f:
                meta = json.load(f)
            return meta if isinstance(meta, dict) else {}
        except (OSError, ValueError):
            return {}

    def _write_meta(self, entry: str, meta: dict) -> None:
        path = os.path.join(self.directory, entry + ".json")
        try:
            with open(path + ".tmp", "w", encoding="utf-8") as handle:
                json.dump(meta, handle, sort_keys=True)
            os.replace(path + ".tmp", path)
        except OSError:
            pass  # only informative: the image itself is complete and verified


def _touch(image: str) -> None:
    """Mark the image used now. The time comes from the system clock at full resolution:
    the kernel's own file times tick only every few milliseconds, too coarse to order two
    uses in a row."""
    now = time.time_ns()
    os.utime(image, ns=(now, now))


def _flock_until(fd: int, mode: int, deadline: float, message: str) -> None:
    """flock(2) without blocking forever: poll until ``deadline``, then CacheError."""
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return
        except OSError as error:
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
        if time.monotonic() >= deadline:
            raise CacheError(message)
        time.sleep(_POLL)
