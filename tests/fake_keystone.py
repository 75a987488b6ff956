"""Just enough Keystone v3 on 127.0.0.1 for keystoneauth's password login, in front of the
real local Swift (swift_fixture.py).

It answers version discovery and ``POST /v3/auth/tokens``; the token it issues is a real
tempauth token of the local Swift and its catalog's object-store endpoint is that Swift,
so the client libraries (openstacksdk's config loader, keystoneauth, swiftclient) go the
whole way a Keystone deployment takes them, and the bytes come from the real Swift.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

USER, PASSWORD, PROJECT, DOMAIN = "deploy", "s3cret-pw", "ironic", "Default"
REGION = "RegionOne"
DEAD = "http://127.0.0.1:9/v1/AUTH_nobody"  # the discard port: nothing listens


class FakeKeystone:
    def __init__(self, swift: Any, token_life: float = 86400.0) -> None:
        self.swift = swift
        #: Seconds each token it issues lives (as the token says: keystoneauth renews it
        #: ahead of its expiry; the tempauth token behind it lives on).
        self.token_life = token_life
        self.logins = 0  # successful password logins
        self.refused = 0
        self._server: Optional[ThreadingHTTPServer] = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "FakeKeystone":
        owner = self

        class Handler(_Handler):
            keystone = owner

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()

    def version(self) -> dict:
        return {"id": "v3.14", "status": "stable", "updated": "2020-04-07T00:00:00Z",
                "links": [{"rel": "self", "href": f"{self.url}/v3/"}],
                "media-types": [{"base": "application/json",
                                 "type": "application/vnd.openstack.identity-v3+json"}]}

    def token(self, storage_url: str) -> dict:
        domain = {"id": "default", "name": DOMAIN}
        return {"token": {
            "methods": ["password"], "issued_at": _stamp(time.time()),
            "expires_at": _stamp(time.time() + self.token_life),
            "user": {"id": "u-deploy", "name": USER, "domain": domain},
            "project": {"id": "p-ironic", "name": PROJECT, "domain": domain},
            "roles": [{"id": "r-member", "name": "member"}],
            # Only the public endpoint of REGION works: a client must pick it by the
            # settings' region and interface, not take the first one listed.
            "catalog": [{"type": "object-store", "name": "swift", "id": "s-swift",
                         "endpoints": [
                             {"id": "e-other", "interface": "public", "region": "RegionZero",
                              "region_id": "RegionZero", "url": DEAD},
                             {"id": "e-internal", "interface": "internal", "region": REGION,
                              "region_id": REGION, "url": DEAD},
                             {"id": "e-public", "interface": "public", "region": REGION,
                              "region_id": REGION, "url": storage_url}]}]}}


def _stamp(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime(seconds))


class _Handler(BaseHTTPRequestHandler):
    keystone: FakeKeystone

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path.rstrip("/") == "/v3":
            self._json(200, {"version": self.keystone.version()})
        else:
            self._json(300, {"versions": {"values": [self.keystone.version()]}})

    def do_POST(self) -> None:  # noqa: N802
        if self.path != "/v3/auth/tokens":
            self._json(404, {"error": {"code": 404, "message": "not found"}})
            return
        length = int(self.headers.get("Content-Length", "0"))
        auth = json.loads(self.rfile.read(length))["auth"]
        user = auth["identity"]["password"]["user"]
        project = auth.get("scope", {}).get("project", {})
        if (user.get("name"), user.get("password"), user.get("domain", {}).get("name"),
                project.get("name")) != (USER, PASSWORD, DOMAIN, PROJECT):
            self.keystone.refused += 1
            self._json(401, {"error": {"code": 401, "title": "Unauthorized",
                                       "message": "The request you have made requires "
                                                  "authentication."}})
            return
        # A real token the local Swift accepts (tempauth), and where that Swift is.
        storage_url, token = self.keystone.swift.connection().get_auth()
        self.keystone.logins += 1
        self._json(201, self.keystone.token(storage_url), {"X-Subject-Token": token})

    def _json(self, status: int, body: dict, headers: Optional[dict] = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
