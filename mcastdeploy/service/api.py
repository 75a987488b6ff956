"""The daemon's HTTP API: JSON in and out, every request authenticated.

- ``POST /v1/sessions`` ``{"image": X, "agent": NAME, "sha256": HEX, "image_format":
  "raw"|"qcow2"}`` -> ``{"spec": {...}, "joined": bool}``: the session spec for that agent
  (all but the image optional; image_format says what sha256 pins, as in the spec).
- ``GET /v1/status`` -> sessions in flight and recently ended, with their agents.
- ``GET /metrics`` -> the Prometheus text format.

Authentication is a bearer token (``Authorization: Bearer TOKEN``), compared in constant
time; anything else gets 401 before the request is looked at.  The answer to a session
request holds the session key, so the API belongs on the rack's management network, or
behind TLS (``tls_cert``/``tls_key`` in the config).
"""

from __future__ import annotations

import hmac
import json
import ssl
import sys
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

from mcastdeploy.service import metrics
from mcastdeploy.service.daemon import Daemon, RequestError
from mcastdeploy.service.events import log_event

MAX_BODY = 64 * 1024


class ApiServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], daemon: Daemon) -> None:
        self.service = daemon
        self.token = daemon.config.token.encode()
        super().__init__(address, ApiHandler)
        config = daemon.config
        if config.tls_cert is not None:
            # Answers carry session keys and requests the token: on a network others can
            # listen to, only over TLS.  The handshake is the handler thread's (setup), so
            # a slow client never holds up accept().
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.load_cert_chain(config.tls_cert, config.tls_key)
            self.socket = context.wrap_socket(self.socket, server_side=True,
                                              do_handshake_on_connect=False)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that broke (a client gone mid-answer): one event line, not the
        traceback socketserver would print."""
        error = sys.exc_info()[1]
        log_event("http_error", client=client_address[0],
                  error=f"{type(error).__name__}: {error}")


class ApiHandler(BaseHTTPRequestHandler):
    server: ApiServer
    server_version = "mcastdeploy"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    #: Seconds a connection may stay silent (a client that connects and says nothing).
    timeout = 30

    def setup(self) -> None:
        super().setup()
        if isinstance(self.connection, ssl.SSLSocket):
            self.connection.do_handshake()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass  # answers worth an event are logged once, by _answer

    def _authorized(self) -> bool:
        header = self.headers.get("Authorization", "")
        scheme, _, credentials = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            credentials.strip().encode(), self.server.token)

    def _answer(self, status: int, body: bytes, content_type: str,
                error: Optional[str] = None, session: Optional[str] = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if status == HTTPStatus.UNAUTHORIZED:
            self.send_header("WWW-Authenticate", 'Bearer realm="mcastdeploy"')
        self.end_headers()
        self.wfile.write(body)
        if self.command == "GET" and status == HTTPStatus.OK:
            return  # status --watch and Prometheus read every few seconds: not events
        fields = {"method": self.command, "path": self.path.split("?")[0],
                  "status": status, "client": self.client_address[0]}
        if error:
            fields["error"] = error
        log_event("http_request", session, **fields)

    def _json(self, status: int, data: Any, session: Optional[str] = None) -> None:
        self._answer(status, json.dumps(data, sort_keys=True).encode(), "application/json",
                     data.get("error") if isinstance(data, dict) else None, session)

    def _refuse(self) -> bool:
        if self._authorized():
            return False
        self._json(HTTPStatus.UNAUTHORIZED, {"error": "a valid bearer token is required"})
        return True

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self._refuse():
            return
        path = self.path.split("?")[0]
        service = self.server.service
        if path == "/v1/status":
            self._json(HTTPStatus.OK, service.status())
        elif path == "/metrics":
            totals, views = service.counters()
            text = metrics.render(totals, views, service.config.rate_bps)
            self._answer(HTTPStatus.OK, text.encode(), metrics.CONTENT_TYPE)
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no such resource {path}"})

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        if self._refuse():
            return
        if self.path.split("?")[0] != "/v1/sessions":
            self._json(HTTPStatus.NOT_FOUND, {"error": "POST goes to /v1/sessions"})
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if not 0 < length <= MAX_BODY:
            self._json(HTTPStatus.BAD_REQUEST, {"error": "a JSON body of at most 64 KiB"})
            return
        try:
            request = json.loads(self.rfile.read(length))
            if not isinstance(request, dict):
                raise ValueError
        except ValueError:
            self._json(HTTPStatus.BAD_REQUEST, {"error": "the body is not a JSON object"})
            return
        unknown = set(request) - {"image", "agent", "sha256", "image_format"}
        if unknown:
            self._json(HTTPStatus.BAD_REQUEST, {"error": f"unknown field {sorted(unknown)[0]}"})
            return
        try:
            spec, joined = self.server.service.request(
                request.get("image"), request.get("agent"), self.client_address[0],
                request.get("sha256"), request.get("image_format"))
        except RequestError as error:
            self._json(error.status, {"error": str(error)})
            return
        except Exception as error:  # noqa: BLE001 - the daemon answers and goes on
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR,
                       {"error": f"{type(error).__name__}: {error}"})
            return
        self._json(HTTPStatus.OK, {"spec": json.loads(spec.to_json()), "joined": joined},
                   spec.session_id)
