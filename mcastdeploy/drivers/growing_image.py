"""An image the sender multicasts while it is still being downloaded into the cache.

The download (``ImageCache.get_or_fetch``) runs in a thread of its own and reports how far
the file is written and hashed; the sender's event loop, on the caller's thread, reads that
prefix from the ``.part`` file. Only three things cross between the threads, under one lock:
the hashed length, the outcome (the held cache entry, or the error) and a wake-up of the
loop. The loop's open descriptor stays valid when the finished ``.part`` is renamed into
place, so the sender never has to reopen the image mid-session.
"""

from __future__ import annotations

import threading
import time
from typing import Optional, Sequence

from mcastdeploy.drivers.event_loop import Wakeup
from mcastdeploy.drivers.image_source import LocalImage, SourceError
from mcastdeploy.drivers.sources import display_url
from mcastdeploy.drivers.sources.cache import CachedImage, ImageCache
from mcastdeploy.drivers.sources.reader import RangeReader

#: How long closing waits for a cancelled download's connections to give up.
_JOIN_TIMEOUT = 30.0


class GrowingImage:
    """One download into ``cache``, watched from the sender's loop.

    ``start()`` begins it; ``wait_started(timeout)`` returns once the first bytes are in (or
    the download is over: a cache hit, a failure); then ``finished`` tells the two apart.
    While it runs, ``open()`` gives a reader of the partial file, ``hashed`` says how many
    leading bytes of it are final. ``close()`` cancels a download still running (its
    ``.part`` stays for the next attempt to resume) and releases the cache entry.
    """

    def __init__(self, cache: ImageCache, key: str, readers: Sequence[RangeReader],
                 expected_sha256: Optional[str] = None) -> None:
        self._cache = cache
        self._key = key
        self._readers = list(readers)
        self._expected = expected_sha256
        self.wakeup = Wakeup()
        self._lock = threading.Lock()
        self._news = threading.Event()
        self._cancel = threading.Event()
        self._part: Optional[str] = None
        self._hashed = 0
        self._cached: Optional[CachedImage] = None
        self._error: Optional[BaseException] = None
        self._done = False
        self._closed = False
        self._began = 0.0
        #: Seconds the download took (None until it ended; ~0 for a cache hit).
        self.fetch_seconds: Optional[float] = None
        self._thread = threading.Thread(target=self._download, name="download", daemon=True)

    # -- the download's thread ---------------------------------------------------------------

    def _download(self) -> None:
        try:
            cached = self._cache.get_or_fetch(self._key, self._readers, self._expected,
                                              on_hashed=self._on_hashed, cancel=self._cancel)
        except BaseException as error:  # noqa: BLE001 - handed to the loop's thread as is
            outcome: tuple[Optional[CachedImage], Optional[BaseException]] = (None, error)
        else:
            outcome = (cached, None)
        with self._lock:
            abandoned = self._cancel.is_set() and self._closed
            self._cached, self._error = (None, outcome[1]) if abandoned else outcome
            self._done = True
            self.fetch_seconds = time.monotonic() - self._began
        if abandoned and outcome[0] is not None:
            outcome[0].close()  # close() gave up waiting: release the entry's lock here
        self._news.set()
        self.wakeup.wake()

    def _on_hashed(self, part: str, hashed: int) -> None:
        with self._lock:
            self._part, self._hashed = part, hashed
        self._news.set()
        self.wakeup.wake()

    # -- the loop's thread -------------------------------------------------------------------

    def start(self) -> None:
        self._began = time.monotonic()
        self._thread.start()

    def wait_started(self, timeout: float) -> None:
        """Until the first bytes are hashed or the download ended; TimeoutError past
        ``timeout`` (a source that answers but sends nothing)."""
        if not self._news.wait(timeout):
            raise TimeoutError(f"no byte of {display_url(self._key)} arrived within {timeout:g} s")

    def wait_finished(self, timeout: float) -> None:
        """Until the download ended (either way); TimeoutError past ``timeout``."""
        if not self._finish_within(timeout):
            raise TimeoutError(f"the download of {display_url(self._key)} did not end "
                               f"within {timeout:g} s")

    @property
    def finished(self) -> bool:
        with self._lock:
            return self._done

    @property
    def error(self) -> Optional[BaseException]:
        with self._lock:
            return self._error

    @property
    def hashed(self) -> int:
        """Leading bytes written and folded into the download's checksum."""
        with self._lock:
            return self._hashed

    def result(self) -> CachedImage:
        """The complete, verified cache entry (held until ``close``); raises the
        download's error. Only once ``finished``."""
        with self._lock:
            if not self._done:
                raise RuntimeError("the download has not finished")
            if self._error is not None:
                raise self._error
            assert self._cached is not None
            return self._cached

    @property
    def bytes_fetched(self) -> int:
        """Bytes this download pulled from the source (0 for a cache hit, or before it
        finished: the fetch counts them at its end)."""
        with self._lock:
            cached = self._cached
        fetched = None if cached is None else cached.fetched
        return 0 if fetched is None else fetched.bytes_fetched

    @property
    def sha256(self) -> bytes:
        """The whole image's SHA-256, as the download computed and checked it."""
        digest = self.result().sha256
        assert digest is not None  # a fetched entry always records it
        return bytes.fromhex(digest)

    def open(self) -> LocalImage:
        """A reader of the image: the partial file while the download runs (its full size
        from the start), the cache entry once it is complete."""
        with self._lock:
            part, done = self._part, self._done
        if not done and part is not None:
            try:
                return LocalImage(part)
            except SourceError:
                if not self._finish_within(_JOIN_TIMEOUT):  # renamed just now: completed
                    raise
        if not self._finish_within(0):
            raise RuntimeError("open() before the download started")
        return LocalImage(self.result().path)

    def _finish_within(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return self.finished

    def close(self) -> None:
        self._cancel.set()
        if self._thread.is_alive():
            self._thread.join(_JOIN_TIMEOUT)
        with self._lock:
            self._closed = True  # a download ending later releases its own entry
            cached, self._cached = self._cached, None
        if cached is not None:
            cached.close()
        self.wakeup.close()

    def __enter__(self) -> "GrowingImage":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
