"""An image on a plain HTTP(S) server (nginx, Apache, a Swift temp URL, S3 presigned GETs),
read in byte ranges with the standard library.

A server that ignores ``Range`` is refused rather than streamed whole: the ranged fetch,
its resume and its failover between copies all need ranges, every server one would put
images on supports them, and an operator is better told once than left with a fetch that
can neither resume nor use more than one connection.
"""

from __future__ import annotations

import http.client
import re
import socket
import ssl
import threading
import urllib.parse
from typing import Iterator, Mapping, Optional

from mcastdeploy.drivers.sources.errors import ReadError
from mcastdeploy.drivers.sources.reader import display_url, read_exactly

__all__ = ["HttpRangeReader"]

#: Bytes per ``read`` from the socket: large enough to be cheap, small enough that a fetch
#: told to stop notices soon.

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_UNSATISFIABLE = re.compile(r"bytes \*/(\d+)")


class HttpRangeReader:
    """One copy of an image at an http:// or https:// URL.

    Keeps one keep-alive connection per thread (``http.client`` connections are not
    thread-safe), so consecutive ranges on one connection cost no new handshake. Every socket
    wait is bounded by ``timeout``. ``headers`` go with every request (an auth token, say).
    """

    def __init__(self, url: str, timeout: float = 30.0, *,
                 headers: Optional[Mapping[str, str]] = None,
                 context: Optional[ssl.SSLContext] = None) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url}")
        self.url = url
        # Query strings often carry signatures (temp URLs): keep them out of messages.
        self.name = display_url(url)
        self.timeout = timeout
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self._target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._headers = dict(headers or {})
        self._context = context
        self._local = threading.local()
        self._size: Optional[int] = None
        self._etag: Optional[str] = None

    def describe(self) -> tuple[int, Optional[str]]:
        """Size and ETag from a GET of byte 0 rather than a HEAD: presigned URLs are often
        valid for GET only, and the answer proves at once that the server honours ranges."""
        response = self._get("bytes=0-0")
        finished = False
        try:
            etag = response.getheader("ETag")
            if response.status == 416:  # an empty object has no byte 0
                match = _UNSATISFIABLE.fullmatch(response.getheader("Content-Range") or "")
                if not match:
                    raise ReadError(f"{self.name}: HTTP 416 without the object's size",
                                    permanent=True)
                size = int(match.group(1))
            else:
                size = self._check(response, 0, 1)[2]
                response.read()
                finished = True
        finally:
            if not finished:
                self._drop()
        self._size, self._etag = size, etag
        return size, etag

    def read_range(self, start: int, end: int) -> Iterator[bytes]:
        if end <= start:
            return
        response = self._get(f"bytes={start}-{end - 1}")
        finished = False
        try:
            self._check(response, start, end)
            # read1: what has arrived, up to a chunk, so a slow link's bytes are written
            # (and may be multicast) as they come rather than a megabyte at a time.
            yield from read_exactly(response.read1, end - start, name=self.name,
                                    what=f"bytes {start}-{end - 1}",
                                    broke=(OSError, http.client.HTTPException),
                                    reason=self._reason)
            response.read()  # b"": read1 alone never marks the response finished
            finished = True  # the whole body was read: the connection can serve the next
        finally:
            if not finished:
                self._drop()

    def _get(self, byte_range: str) -> http.client.HTTPResponse:
        headers = dict(self._headers, Range=byte_range)
        for _ in range(2):
            connection = getattr(self._local, "connection", None)
            reused = connection is not None
            if connection is None:
                connection = self._connect()
            try:
                connection.request("GET", self._target, headers=headers)
                return connection.getresponse()
            except (OSError, http.client.HTTPException) as error:
                self._drop()
                if not reused:
                    raise ReadError(f"{self.name}: {self._reason(error)}") from None
                # The server closed an idle keep-alive connection: one fresh try, no wait.
        raise AssertionError("unreachable")  # pragma: no cover

    def _connect(self) -> http.client.HTTPConnection:
        connection: http.client.HTTPConnection
        if self._https:
            connection = http.client.HTTPSConnection(self._host, self._port,
                                                     timeout=self.timeout,
                                                     context=self._context)
        else:
            connection = http.client.HTTPConnection(self._host, self._port,
                                                    timeout=self.timeout)
        try:
            connection.connect()
        except ssl.SSLError as error:
            raise ReadError(f"{self.name}: TLS failed: {error.reason or error}",
                            permanent=True) from None
        except OSError as error:
            raise ReadError(f"{self.name}: cannot connect: {self._reason(error)}",
                            unreachable=True) from None
        self._local.connection = connection
        return connection

    def _drop(self) -> None:
        """Forget this thread's connection: after an error or a body left unread it is in
        an unknown state."""
        connection = getattr(self._local, "connection", None)
        self._local.connection = None
        if connection is not None:
            connection.close()

    def _check(self, response: http.client.HTTPResponse, start: int,
               end: int) -> tuple[int, int, int]:
        """The answer must be exactly the range asked for, of the object described."""
        status = response.status
        if status == 200:
            raise ReadError(f"{self.name} ignores Range requests (it answered 200 to a ranged "
                            "GET); serve the image from a server that supports byte ranges",
                            permanent=True)
        if status != 206:
            why = f"{self.name}: HTTP {status} {response.reason}"
            lasting = 400 <= status < 500 and status not in (408, 425, 429)
            raise ReadError(why, permanent=lasting)
        match = _CONTENT_RANGE.fullmatch(response.getheader("Content-Range") or "")
        if not match or match.group(3) == "*":
            raise ReadError(f"{self.name}: a 206 answer without a usable Content-Range",
                            permanent=True)
        first, last, size = (int(match.group(n)) for n in (1, 2, 3))
        if (first, last + 1) != (start, end):
            raise ReadError(f"{self.name}: asked for bytes {start}-{end - 1}, got "
                            f"{first}-{last}", permanent=True)
        etag = response.getheader("ETag")
        if self._size is not None and size != self._size:
            raise ReadError(f"{self.name} changed size from {self._size} to {size} bytes "
                            "while being fetched", permanent=True)
        if self._etag and etag and etag != self._etag:
            raise ReadError(f"{self.name} changed (ETag {self._etag} became {etag}) while "
                            "being fetched", permanent=True)
        return first, last, size

    def _reason(self, error: BaseException) -> str:
        if isinstance(error, (socket.timeout, TimeoutError)):
            return f"no answer within {self.timeout:g} s"
        if isinstance(error, OSError) and error.strerror:
            return error.strerror
        return str(error) or type(error).__name__
