"""Images that are not on the rack head yet: where they are, pulling them, keeping them.

- ``reader.py``: the ``RangeReader`` interface a place holding images offers (size, ETag,
  byte ranges); ``http_reader.py`` implements it for http(s):// URLs, ``swift_reader.py``
  for swift://CONTAINER/OBJECT; ``readers_for`` picks one by the URL's scheme.
- ``fetch.py``: one object into one file, ranged over several connections, retried, failed
  over between copies, resumable, verified.
- ``cache.py``: the rack head's cache of fetched images, with LRU eviction and locks so
  that senders sharing a head fetch each image once.
- ``retry.py``, ``errors.py``: the retry bounds, and what can go wrong.
"""

from __future__ import annotations

import re
from typing import Mapping, Optional, Sequence

from mcastdeploy.drivers.image_source import SourceError
from mcastdeploy.drivers.sources.cache import CachedImage, ImageCache
from mcastdeploy.drivers.sources.errors import (CacheError, ChecksumMismatch, FetchError,
                                                ReadError)
from mcastdeploy.drivers.sources.fetch import DEFAULT_RANGE_BYTES, FetchResult, fetch
from mcastdeploy.drivers.sources.http_reader import HttpRangeReader
from mcastdeploy.drivers.sources.reader import RangeReader, display_url
from mcastdeploy.drivers.sources.retry import RetryPolicy

__all__ = ["CacheError", "CachedImage", "ChecksumMismatch", "DEFAULT_RANGE_BYTES",
           "FetchError", "FetchResult", "HttpRangeReader", "ImageCache", "RangeReader",
           "ReadError", "RetryPolicy", "display_url", "fetch", "is_remote", "readers_for"]

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def is_remote(image: str) -> bool:
    """Whether ``image`` names a URL rather than a local file or device."""
    return _URL.match(image) is not None


def readers_for(urls: Sequence[str], *, timeout: float = 30.0,
                environ: Optional[Mapping[str, str]] = None) -> list:
    """One reader per URL, all copies of one image (schemes may be mixed: a Swift object and
    an HTTP mirror of it). Raises SourceError (bad input) for a URL no reader understands,
    or a swift:// URL without credentials in ``environ`` (the process's by default)."""
    readers: list[RangeReader] = []
    for url in urls:
        scheme = url.split("://", 1)[0].lower()
        try:
            if scheme in ("http", "https"):
                readers.append(HttpRangeReader(url, timeout))
            elif scheme == "swift":
                # Imported here: swiftclient (and requests) only for those who use Swift.
                from mcastdeploy.drivers.sources.swift_reader import SwiftRangeReader
                readers.append(SwiftRangeReader(url, timeout, environ=environ))
            else:
                raise ValueError("only http://, https:// and swift:// URLs are supported")
        except ValueError as error:
            raise SourceError(f"cannot read image {display_url(url)}: {error}") from None
        except ImportError as error:
            raise SourceError(f"cannot read image {display_url(url)}: {error.name} is not "
                              "installed (pip install python-swiftclient)") from None
    return readers
