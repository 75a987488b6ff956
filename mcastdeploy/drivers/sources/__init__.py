"""Images that are not on the rack head yet: where they are, pulling them, keeping them.

- ``reader.py``: the ``RangeReader`` interface a place holding images offers (size, ETag,
  byte ranges); ``http_reader.py`` implements it for http(s):// URLs. Swift comes next,
  behind the same interface.
- ``fetch.py``: one object into one file, ranged over several connections, retried, failed
  over between copies, resumable, verified.
- ``cache.py``: the rack head's cache of fetched images, with LRU eviction and locks so
  that senders sharing a head fetch each image once.
- ``retry.py``, ``errors.py``: the retry bounds, and what can go wrong.
"""

from __future__ import annotations

import re
from typing import Sequence

from mcastdeploy.drivers.image_source import SourceError
from mcastdeploy.drivers.sources.cache import CachedImage, ImageCache
from mcastdeploy.drivers.sources.errors import (CacheError, ChecksumMismatch, FetchError,
                                                ReadError)
from mcastdeploy.drivers.sources.fetch import DEFAULT_RANGE_BYTES, FetchResult, fetch
from mcastdeploy.drivers.sources.http_reader import HttpRangeReader
from mcastdeploy.drivers.sources.reader import RangeReader
from mcastdeploy.drivers.sources.retry import RetryPolicy

__all__ = ["CacheError", "CachedImage", "ChecksumMismatch", "DEFAULT_RANGE_BYTES",
           "FetchError", "FetchResult", "HttpRangeReader", "ImageCache", "RangeReader",
           "ReadError", "RetryPolicy", "fetch", "is_remote", "readers_for"]

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def is_remote(image: str) -> bool:
    """Whether ``image`` names a URL rather than a local file or device."""
    return _URL.match(image) is not None


def readers_for(urls: Sequence[str], *, timeout: float = 30.0) -> list:
    """One reader per URL, all copies of one image. Raises SourceError (bad input) for a
    URL no reader understands."""
    readers: list[RangeReader] = []
    for url in urls:
        scheme = url.split("://", 1)[0].lower()
        if scheme not in ("http", "https"):
            raise SourceError(f"cannot read image {url}: only http:// and https:// URLs are "
                              "supported")
        try:
            readers.append(HttpRangeReader(url, timeout))
        except ValueError as error:
            raise SourceError(f"cannot read image {url}: {error}") from None
    return readers
