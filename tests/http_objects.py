"""A small HTTP/1.1 object server on 127.0.0.1 for the source tests: single byte ranges,
ETags, counters of what it served, and failures injected on demand.

Run as a program (``http_objects.py FILE HOST``) it serves FILE as ``/image.raw`` on HOST
until killed, printing its port: an image's origin inside a rack test's namespace."""

from __future__ import annotations

import hashlib
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional

#: fault(request_number, path, (start, end) or None) -> None, "500" or "drop"
Fault = Callable[[int, str, Optional[tuple]], Optional[str]]


class ObjectServer:
    """Serves ``objects`` (path -> bytes). ``ranges=False`` ignores Range headers, as some
    servers do; ``delay`` pauses before each body, so a fetch can be caught half done;
    ``piece_delay`` after each 64 KiB of it, a slow link (a download that takes a while)."""

    def __init__(self, objects: dict, *, ranges: bool = True, etags: bool = True,
                 delay: float = 0.0, piece_delay: float = 0.0, host: str = "127.0.0.1") -> None:
        self.objects = dict(objects)
        self.host = host
        self.ranges = ranges
        self.etags = etags
        self.delay = delay
        self.piece_delay = piece_delay
        self.fault: Optional[Fault] = None
        self.requests = 0
        self.bytes_served = 0
        self.served: list = []  # (start, end) of every body started
        self._etags: dict = {}
        self._generation = 0  # requests from before reset_counts count no more
        self._lock = threading.Lock()
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "ObjectServer":
        owner = self

        class Handler(_Handler):
            server_owner = owner

        self._server = ThreadingHTTPServer((self.host, 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_address[1]

    def url(self, path: str = "/img") -> str:
        return f"http://{self.host}:{self.port}{path}"

    def reset_counts(self) -> None:
        with self._lock:
            self._generation += 1
            self.requests = 0
            self.bytes_served = 0
            self.served = []

    def etag(self, path: str) -> str:
        data = self.objects[path]
        if self._etags.get(path, (None,))[0] is not data:  # hashed once per object
            self._etags[path] = (data, '"%s"' % hashlib.md5(data).hexdigest())
        return self._etags[path][1]

    def _count_request(self) -> tuple:
        with self._lock:
            self.requests += 1
            return self.requests, self._generation

    def _count_bytes(self, n: int, generation: int) -> None:
        with self._lock:
            if generation == self._generation:
                self.bytes_served += n


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_owner: ObjectServer
    timeout = 5  # idle keep-alive connections end on their own

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        owner = self.server_owner
        number, generation = owner._count_request()
        data = owner.objects.get(self.path)
        if data is None:
            self._empty(404)
            return
        wanted = None
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if match and owner.ranges:
            start = int(match.group(1))
            end = min(len(data), int(match.group(2)) + 1 if match.group(2) else len(data))
            if start >= len(data):
                self._empty(416, {"Content-Range": f"bytes */{len(data)}"})
                return
            wanted = (start, end)
        fault = owner.fault(number, self.path, wanted) if owner.fault else None
        if fault == "500":
            self._empty(500)
            return
        start, end = wanted or (0, len(data))
        self.send_response(206 if wanted else 200)
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes" if owner.ranges else "none")
        if wanted:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        if owner.etags:
            self.send_header("ETag", owner.etag(self.path))
        self.end_headers()
        with owner._lock:
            if generation == owner._generation:
                owner.served.append((start, end))
        if owner.delay:
            time.sleep(owner.delay)
        if fault == "drop":  # half the body, then the connection dies
            end = start + (end - start) // 2
        try:
            for offset in range(start, end, 64 * 1024):
                piece = data[offset:min(end, offset + 64 * 1024)]
                owner._count_bytes(len(piece), generation)  # before: the client may be quicker
                self.wfile.write(piece)
                if owner.piece_delay:
                    time.sleep(owner.piece_delay)
        except (ConnectionError, socket.timeout):
            self.close_connection = True
            return
        if fault == "drop":
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True

    def _empty(self, status: int, headers: Optional[dict] = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", "0")
        self.end_headers()


def dead_url(path: str = "/img") -> str:
    """A URL on a 127.0.0.1 port where nothing listens: connections are refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}{path}"


if __name__ == "__main__":
    import sys

    with open(sys.argv[1], "rb") as image, \
            ObjectServer({"/image.raw": image.read()}, host=sys.argv[2]) as served:
        print(served.port, flush=True)
        time.sleep(600)  # the test kills it long before
