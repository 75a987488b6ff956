"""The one interface a place holding images offers the fetch: its size and identity, and
byte ranges of it.

HTTP(S) (http_reader.py) and Swift (swift_reader.py: ``head_object`` for ``describe``,
``get_object`` with a Range header and ``resp_chunk_size`` for ``read_range``) implement it,
so the fetch and the cache never learn where bytes come from.
"""

from __future__ import annotations

import re
import urllib.parse

from typing import Callable, Iterator, Optional, Protocol

from mcastdeploy.drivers.sources.errors import ReadError

__all__ = ["RangeReader", "read_exactly", "CHUNK_BYTES"]

#: Bytes a reader hands the fetch at a time.
CHUNK_BYTES = 256 * 1024


class RangeReader(Protocol):
    """One copy of one object.

    ``read_range`` is called from several threads at once (one per connection), so a reader
    keeps per-thread connections. Every failure is a ``ReadError`` (errors.py) and every
    wait is bounded by the reader's own timeout: the fetch's retry bounds rely on both.
    """

    #: Shown in messages: where the copy is, without credentials or signatures.
    name: str

    def describe(self) -> tuple[int, Optional[str]]:
        """The object's size in bytes and its ETag (None when the server gives none).

        Copies of one image must agree on both (the ETag only when no SHA-256 is known), and
        a resumed fetch continues only if they have not changed since.
        """
        ...

    def read_range(self, start: int, end: int) -> Iterator[bytes]:
        """The bytes ``[start, end)`` as chunks, exactly ``end - start`` of them in all.

        The fetch closes the iterator when it stops early, so a reader frees its connection
        in a ``finally``. Fewer bytes than asked is a ``ReadError``, never a silent short read.
        """
        ...


def read_exactly(read: Callable[[int], bytes], length: int, *, name: str, what: str,
                 broke: tuple[type[BaseException], ...],
                 reason: Callable[[BaseException], str]) -> Iterator[bytes]:
    """``length`` bytes of a response body, in chunks of at most ``CHUNK_BYTES``.

    A stream that breaks (one of ``broke`` from ``read``) or ends early is a retryable
    ``ReadError`` naming the copy (``name``) and the range (``what``): never a short read.
    """
    remaining = length
    while remaining:
        try:
            chunk = read(min(CHUNK_BYTES, remaining))
        except broke as error:
            raise ReadError(f"{name}: {reason(error)} reading {what}") from None
        if not chunk:
            raise ReadError(f"{name}: connection closed {remaining} bytes short of {what}")
        remaining -= len(chunk)
        yield chunk


def display_url(image: str) -> str:
    """``image`` as it may be shown (logs, status, errors): a URL without its user info
    and query, which often carry credentials or a temp URL's signature."""
    try:
        parts = urllib.parse.urlsplit(image)
    except ValueError:  # e.g. an unclosed '[': still shown, still without credentials
        return re.sub(r"//[^/]*@", "//", image.split("?", 1)[0])
    if not parts.scheme or not parts.netloc:
        return image  # a local path
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))
