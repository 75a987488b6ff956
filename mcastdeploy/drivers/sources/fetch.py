"""Pulling one object into a local file: byte ranges over several connections, retried,
failed over between copies, resumable after a kill, and verified before it is named.

The file is built as ``DEST.part``; a sidecar ``DEST.part.state`` records every range
written, so a fetch killed at 80 % continues from there. Only a complete, verified file is
renamed to ``DEST``: a file at ``DEST`` is always whole. The SHA-256 is computed in order
while later ranges are still arriving (reading back ranges just written, from the page
cache), so verifying costs no second pass over the image.

Resuming trusts that bytes written before a kill reached the page cache, which survives the
process but not a power cut; a known SHA-256 catches the latter at the end.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence, TypeVar

from mcastdeploy.drivers.sources.errors import ChecksumMismatch, FetchError, ReadError
from mcastdeploy.drivers.sources.reader import RangeReader
from mcastdeploy.drivers.sources.retry import RetryPolicy

__all__ = ["fetch", "FetchResult", "part_path", "state_path", "DEFAULT_RANGE_BYTES"]

DEFAULT_RANGE_BYTES = 8 * 1024 * 1024
_STATE_FORMAT = "mcastdeploy-fetch/1"
_HASH_READ = 1024 * 1024

T = TypeVar("T")


def part_path(dest_path: str) -> str:
    """Where the image is built until it is complete and verified."""
    return dest_path + ".part"


def state_path(dest_path: str) -> str:
    """The sidecar recording which ranges of the ``.part`` file are written."""
    return dest_path + ".part.state"


@dataclass
class FetchResult:
    path: str
    size: int
    sha256: str
    etag: Optional[str]
    #: Received over the network by this run (a range retried counts twice).
    bytes_fetched: int
    ranges_fetched: int
    #: Ranges a killed earlier run had written already.
    ranges_resumed: int
    #: Failed attempts, all copies together.
    retries: int
    #: Copies this run left: unusable, or failed over from.
    copies_failed: list = field(default_factory=list)
    seconds: float = 0.0


class _Stopped(Exception):
    """Another connection failed for good; this one abandons its range."""


class _Stop:
    """When the fetch's connections stop: on its own stop (the end, or a failure), or on
    the caller's ``cancel``, which the fetch only reads (the caller may fetch again)."""

    def __init__(self, cancel: Optional[threading.Event]) -> None:
        self._own = threading.Event()
        self._cancel = cancel

    def set(self) -> None:
        self._own.set()

    def is_set(self) -> bool:
        return self._own.is_set() or (self._cancel is not None and self._cancel.is_set())

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.is_set() and (left := deadline - time.monotonic()) > 0:
            self._own.wait(min(left, 0.1))
        return self.is_set()


def fetch(readers: Sequence[RangeReader], dest_path: str, *, connections: int = 4,
          range_bytes: int = DEFAULT_RANGE_BYTES, expected_sha256: Optional[str] = None,
          retry: Optional[RetryPolicy] = None,
          reserve: Optional[Callable[[int], None]] = None,
          on_hashed: Optional[Callable[[int], None]] = None,
          cancel: Optional[threading.Event] = None,
          rng: Optional[random.Random] = None) -> FetchResult:
    """Fetch the object that every reader in ``readers`` holds into ``dest_path``.

    The readers are copies of the same bytes: one chosen at random serves first (so many
    rack heads spread over the copies), the others in random order when it fails.
    ``reserve(size)`` is called once the size is known and before any byte is written (the
    cache makes room there; raising stops the fetch). Raises FetchError with a one-line
    message when the fetch cannot complete; the ``.part`` file then stays for a later call
    to resume, except after a checksum mismatch, where nothing is kept.

    ``on_hashed(n)`` is called, from the calling thread, each time the first ``n`` bytes of
    ``DEST.part`` are written and folded into the running SHA-256 (about every MB): a
    sender may multicast that prefix while the rest is still arriving.

    Setting ``cancel`` (from any thread) stops the fetch within about a second: it raises
    FetchError and keeps the ``.part`` to resume.
    """
    if connections < 1 or range_bytes < 1:
        raise ValueError("connections and range_bytes must be positive")
    started = time.monotonic()
    expected = expected_sha256.lower() if expected_sha256 else None
    stop = _Stop(cancel)
    copies = _Copies(readers, retry or RetryPolicy(), expected is not None,
                     rng or random.Random())
    try:
        copies.attempt(lambda reader: None, "the image's size", stop)  # a live copy
    except _Stopped:
        raise FetchError(f"the fetch of {copies.name} was cancelled") from None
    size, etag = copies.size, copies.etag
    assert size is not None
    if reserve is not None:
        reserve(size)
    count = -(-size // range_bytes)
    part = part_path(dest_path)
    try:
        fd = os.open(part, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as error:
        raise FetchError(f"cannot create {part}: {error.strerror}") from None
    try:
        header = {"format": _STATE_FORMAT, "size": size, "range_bytes": range_bytes,
                  "etag": etag, "sha256": expected}
        log = _RangeLog(state_path(dest_path))
        done = log.resumable(header) if os.fstat(fd).st_size == size else set()
        done = {index for index in done if index < count}
        resumed = len(done)
        try:
            os.ftruncate(fd, size)
            log.start(header, keep=bool(done))
        except OSError as error:
            raise FetchError(f"cannot prepare {part}: {error.strerror}") from None
        transfer = _Transfer(fd, part, size, range_bytes, copies, log, done, stop,
                             on_hashed)
        # Without a pinned SHA-256, a plain Swift object's ETag (its bytes' MD5) is the one
        # check of the content there is; a pin makes the MD5 pass needless.
        etag_md5 = etag if expected is None and _is_content_md5(etag) else None
        digest, md5 = transfer.run(connections, md5=etag_md5 is not None)
        if expected is not None and digest != expected:
            _remove(part, state_path(dest_path))
            raise ChecksumMismatch(f"{copies.name} has SHA-256 {digest}, expected {expected}; "
                                   "nothing was kept")
        if etag_md5 is not None and md5 != etag_md5:
            _remove(part, state_path(dest_path))
            raise ChecksumMismatch(f"{copies.name}: the bytes fetched have MD5 {md5}, its "
                                   f"ETag says {etag_md5}; nothing was kept (a server whose "
                                   "ETag is no MD5: pin the image's SHA-256 instead)")
        try:
            if os.fstat(fd).st_size != size:
                raise FetchError(f"{part} is not {size} bytes after the fetch")
            os.fsync(fd)  # the whole file is on disk before its name says it is complete
        except OSError as error:
            raise FetchError(f"cannot write {part}: {error.strerror}") from None
    finally:
        os.close(fd)
    try:
        os.replace(part, dest_path)
        _sync_directory(dest_path)
    except OSError as error:
        raise FetchError(f"cannot rename {part} to {dest_path}: {error.strerror}") from None
    _remove(state_path(dest_path))
    return FetchResult(path=dest_path, size=size, sha256=digest, etag=etag,
                       bytes_fetched=transfer.bytes_fetched,
                       ranges_fetched=count - resumed, ranges_resumed=resumed,
                       retries=copies.retries, copies_failed=copies.failed_names(),
                       seconds=time.monotonic() - started)


class _Copies:
    """The copies in the order tried, their health, and the identity (size, ETag) that
    every copy used must share so that ranges from two of them make one image."""

    def __init__(self, readers: Sequence[RangeReader], policy: RetryPolicy,
                 checksum_known: bool, rng: random.Random) -> None:
        if not readers:
            raise FetchError("no source given for the image")
        self._readers = list(readers)
        self._order = list(range(len(self._readers)))
        rng.shuffle(self._order)
        self.name = self._readers[self._order[0]].name
        self._policy = policy
        # With a SHA-256 to check at the end, copies may differ in ETag (two nginx servers
        # holding the same file do); without one the ETag is all that proves them the same.
        self._etag_must_match = not checksum_known
        self._lock = threading.Lock()
        self._describe_lock = threading.Lock()
        self._described = [False] * len(self._readers)
        self._failures = [0] * len(self._readers)
        self._last_error: dict[int, str] = {}
        self._dead: dict[int, str] = {}
        self._left: list[int] = []
        self.size: Optional[int] = None
        self.etag: Optional[str] = None
        self.retries = 0

    def attempt(self, operation: Callable[[RangeReader], T], what: str,
                stop: "_Stop") -> T:
        """Run ``operation`` on the current copy until it succeeds, within the policy."""
        attempts = 0
        first_failure: Optional[float] = None
        failed_here: set[int] = set()
        limit = self._policy.attempts_per_copy * len(self._readers)
        while True:
            if stop.is_set():
                raise _Stopped()
            index = self._primary()
            reader = self._readers[index]
            try:
                self._describe(index)
                result = operation(reader)
            except ReadError as error:
                if error.permanent:
                    self._kill(index, str(error))
                    continue
                attempts += 1
                failed_here.add(index)
                self._failed(index, error)
                now = time.monotonic()
                first_failure = now if first_failure is None else first_failure
                if attempts >= limit or now - first_failure >= self._policy.give_up_after:
                    raise FetchError(f"gave up on {what} after {attempts} attempts in "
                                     f"{now - first_failure:.0f} s: {self._errors()}") from None
                if self._primary() in failed_here:  # no fresh copy to move to: pause
                    stop.wait(self._policy.delay(attempts))
                continue
            with self._lock:
                self._failures[index] = 0
            return result

    def failed_names(self) -> list:
        return [self._readers[index].name for index in self._left]

    def _primary(self) -> int:
        with self._lock:
            for index in self._order:
                if index not in self._dead:
                    return index
        what = "the image" if len(self._readers) == 1 else "any copy of the image"
        raise FetchError(f"cannot fetch {what}: {self._errors()}")

    def _describe(self, index: int) -> None:
        if self._described[index]:
            return
        with self._describe_lock:
            if self._described[index]:
                return
            reader = self._readers[index]
            size, etag = reader.describe()
            if size <= 0:
                raise ReadError(f"{reader.name} is empty", permanent=True)
            with self._lock:
                if self.size is None:
                    self.size, self.etag = size, etag
                elif size != self.size:
                    raise ReadError(f"{reader.name} is {size} bytes, another copy "
                                    f"{self.size}: not the same image", permanent=True)
                elif self._etag_must_match and etag and self.etag and etag != self.etag:
                    raise ReadError(f"{reader.name} has ETag {etag}, another copy "
                                    f"{self.etag}: not the same image", permanent=True)
                self._described[index] = True

    def _failed(self, index: int, error: ReadError) -> None:
        """Count a failure; the copy that failed too often in a row (or cannot be reached
        at all) goes to the back of the order, so every connection moves on together."""
        with self._lock:
            self.retries += 1
            self._last_error[index] = str(error)
            self._failures[index] += 1
            live = [i for i in self._order if i not in self._dead]
            if len(live) > 1 and live[0] == index and (
                    error.unreachable
                    or self._failures[index] >= self._policy.attempts_per_copy):
                self._order.remove(index)
                self._order.append(index)
                self._failures[index] = 0
                if index not in self._left:
                    self._left.append(index)

    def _kill(self, index: int, reason: str) -> None:
        with self._lock:
            self._dead[index] = reason
            self._last_error[index] = reason
            if index not in self._left:
                self._left.append(index)

    def _errors(self) -> str:
        with self._lock:
            return "; ".join(self._last_error[i] for i in self._order if i in self._last_error)


class _RangeLog:
    """The sidecar state file: a JSON header line naming the object, then the index of each
    range written, one per line, appended as it completes. A line torn by a kill has no
    newline and is ignored; the range it named is simply fetched again."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = -1
        self._lock = threading.Lock()

    def resumable(self, header: dict) -> set:
        """The ranges an earlier run wrote, if it fetched this very object."""
        try:
            with open(self.path, encoding="ascii") as handle:
                lines = handle.read().split("\n")
            before = json.loads(lines[0])
        except (OSError, ValueError, UnicodeDecodeError):
            return set()
        if not isinstance(before, dict) or any(
                before.get(key) != header[key] for key in ("format", "size", "range_bytes")):
            return set()
        same_etag = header["etag"] is not None and before.get("etag") == header["etag"]
        same_sum = header["sha256"] is not None and before.get("sha256") == header["sha256"]
        if not (same_etag or same_sum):
            return set()  # nothing proves the object unchanged since
        return {int(line) for line in lines[1:-1] if line.isdigit()}

    def start(self, header: dict, keep: bool) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
        self._fd = os.open(self.path, flags if keep else flags | os.O_TRUNC, 0o644)
        if not keep:
            os.write(self._fd, (json.dumps(header, sort_keys=True) + "\n").encode("ascii"))

    def record(self, index: int) -> None:
        with self._lock:
            os.write(self._fd, f"{index}\n".encode("ascii"))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class _Transfer:
    """The ranges still missing, the connections fetching them, and the in-order digest."""

    def __init__(self, fd: int, part: str, size: int, range_bytes: int, copies: _Copies,
                 log: _RangeLog, done: set, stop: _Stop,
                 on_hashed: Optional[Callable[[int], None]] = None) -> None:
        self._fd = fd
        self._on_hashed = on_hashed
        self._part = part
        self._size = size
        self._range_bytes = range_bytes
        self._count = -(-size // range_bytes)
        self._copies = copies
        self._log = log
        self._done = set(done)
        self._stop = stop
        self._ready = threading.Condition()
        self._errors: list[BaseException] = []
        self._pending: queue.SimpleQueue = queue.SimpleQueue()
        for index in range(self._count):
            if index not in self._done:
                self._pending.put(index)
        self._counter = threading.Lock()
        self.bytes_fetched = 0
        #: Range -> bytes written contiguously from its start, while it is being fetched.
        self._written: dict[int, int] = {}

    def run(self, connections: int, md5: bool = False) -> tuple[str, Optional[str]]:
        """Fetch every missing range; returns the SHA-256 (hex) of the whole file, and its
        MD5 if asked for."""
        workers = min(connections, max(1, self._count - len(self._done)))
        digest = hashlib.sha256()
        digests = [digest, hashlib.md5(usedforsecurity=False)] if md5 else [digest]
        try:
            with ThreadPoolExecutor(workers, thread_name_prefix="fetch") as pool:
                for _ in range(workers):
                    pool.submit(self._work)
                try:
                    self._digest_in_order(digests)
                finally:
                    self._stop.set()  # stops the connections if the digest ended early
        finally:
            self._log.close()
        if self._errors:
            raise self._errors[0]
        if len(self._done) != self._count:
            raise FetchError(f"the fetch of {self._copies.name} stopped before its end")
        return digest.hexdigest(), digests[1].hexdigest() if md5 else None

    def _range(self, index: int) -> tuple[int, int]:
        start = index * self._range_bytes
        return start, min(self._size, start + self._range_bytes)

    def _digest_in_order(self, digests: "list[hashlib._Hash]") -> None:
        """Hash the file front to back as it fills: within a range too, as far as its
        connection has written, so that ``on_hashed`` moves every megabyte or so rather
        than once a range (8 MB, the first of them arriving last of all at a slow start).
        A second digest (the ETag's MD5) runs on a side thread, alongside: hashlib lets go
        of the GIL, so both take the time of the slower (853 against 630 MiB/s here)."""
        with ThreadPoolExecutor(1, thread_name_prefix="md5") if len(digests) > 1 \
                else contextlib.nullcontext() as side:
            self._digest_ranges(digests, side)

    def _digest_ranges(self, digests: "list[hashlib._Hash]",
                       side: Optional[ThreadPoolExecutor]) -> None:
        for index in range(self._count):
            start, end = self._range(index)
            offset = start
            while offset < end:
                with self._ready:
                    while (available := self._available(index, start, end)) <= offset:
                        if self._errors or self._stop.is_set():
                            return
                        self._ready.wait(0.5)
                while offset < available:
                    length = min(_HASH_READ, available - offset)
                    try:
                        data = os.pread(self._fd, length, offset)
                    except OSError as error:
                        raise FetchError(f"cannot read back {self._part}: "
                                         f"{error.strerror}") from None
                    if not data:
                        raise FetchError(f"{self._part} shrank while being fetched")
                    beside = side.submit(digests[1].update, data) if side else None
                    digests[0].update(data)
                    if beside is not None:
                        beside.result()
                    offset += len(data)
                    if self._on_hashed is not None:
                        self._on_hashed(offset)

    def _available(self, index: int, start: int, end: int) -> int:
        """How far range ``index`` is written contiguously from its start (under _ready)."""
        if index in self._done:
            return end
        return start + self._written.get(index, 0)

    def _work(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    index = self._pending.get_nowait()
                except queue.Empty:
                    return
                self._fetch_range(index)
                self._log.record(index)
                with self._ready:
                    self._done.add(index)
                    self._written.pop(index, None)
                    self._ready.notify_all()
        except _Stopped:
            pass
        except OSError as error:  # the state file
            self._fail(FetchError(f"cannot record progress in {self._log.path}: "
                                  f"{error.strerror}"))
        except BaseException as error:  # FetchError, or a bug: either way, stop everyone
            self._fail(error)

    def _fail(self, error: BaseException) -> None:
        with self._ready:
            self._errors.append(error)
            self._ready.notify_all()
        self._stop.set()

    def _fetch_range(self, index: int) -> None:
        start, end = self._range(index)
        position = start  # a retry continues where the last attempt broke off

        def into_file(reader: RangeReader) -> None:
            nonlocal position
            chunks = reader.read_range(position, end)
            try:
                for chunk in chunks:
                    self._write(chunk, position)
                    position += len(chunk)
                    with self._counter:
                        self.bytes_fetched += len(chunk)
                    with self._ready:  # the digest may follow up to here
                        self._written[index] = position - start
                        self._ready.notify_all()
                    if self._stop.is_set():
                        raise _Stopped()
            finally:
                _close(chunks)
            if position != end:
                raise ReadError(f"{reader.name}: bytes {start}-{end - 1} ended "
                                f"{end - position} bytes short")

        self._copies.attempt(into_file, f"bytes {start}-{end - 1}", self._stop)

    def _write(self, data: bytes, offset: int) -> None:
        view = memoryview(data)
        while view:
            try:
                written = os.pwrite(self._fd, view, offset)
            except OSError as error:
                raise FetchError(f"cannot write {self._part}: {error.strerror}") from None
            view = view[written:]
            offset += written


def _close(chunks: Iterator[bytes]) -> None:
    close = getattr(chunks, "close", None)
    if close is not None:
        close()


def _is_content_md5(etag: Optional[str]) -> bool:
    """A bare 32-hex-digit ETag: Swift's for a plain object, the MD5 of its bytes. (A large
    object's, and the usual HTTP server's, are quoted and are no digest of the bytes.)"""
    return etag is not None and len(etag) == 32 and all(c in "0123456789abcdef" for c in etag)


def _remove(*paths: str) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _sync_directory(path: str) -> None:
    """Make a rename durable: the directory entry, not only the file, must reach disk."""
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
