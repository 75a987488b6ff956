"""Talking to a rack head's daemon: what ``session new --rack-head`` and ``status`` use
(and the IPA plugin may).  Every failure is a ClientError with a one-line message."""

from __future__ import annotations

import http.client
import json
import os
import urllib.error
import urllib.request
from typing import Any, Optional

from mcastdeploy.spec import SessionSpec, SpecError

TOKEN_ENV = "MCASTDEPLOY_TOKEN"
TIMEOUT = 15.0


class ClientError(RuntimeError):
    """The rack head could not be reached, refused, or answered nonsense; one line."""


def read_token(token_file: Optional[str]) -> str:
    """The API token: from ``token_file``, else from $MCASTDEPLOY_TOKEN."""
    if token_file is not None:
        try:
            with open(token_file, encoding="utf-8") as handle:
                token = handle.read().strip()
        except OSError as error:
            raise ClientError(f"cannot read token file {token_file}: "
                              f"{error.strerror}") from None
        except UnicodeDecodeError:
            raise ClientError(f"token file {token_file} is not UTF-8 text") from None
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise ClientError(f"no API token: give --token-file or set {TOKEN_ENV}")
    return token


def call(rack_head: str, token: str, method: str, path: str,
         body: Optional[dict] = None, timeout: float = TIMEOUT) -> tuple[str, bytes]:
    """(content type, body) of a successful answer."""
    if not rack_head.startswith(("http://", "https://")):
        raise ClientError(f"rack head {rack_head!r} is not an http(s):// URL")
    data = json.dumps(body).encode() if body is not None else None
    try:
        request = urllib.request.Request(rack_head.rstrip("/") + path, data=data,
                                         method=method,
                                         headers={"Authorization": f"Bearer {token}",
                                                  "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.headers.get("Content-Type", ""), response.read()
    except (ValueError, http.client.InvalidURL) as error:  # a URL urllib cannot parse
        raise ClientError(f"rack head {rack_head!r} is not a usable URL: {error}") from None
    except urllib.error.HTTPError as error:
        try:
            reason = json.loads(error.read()).get("error", error.reason)
        except (ValueError, AttributeError, OSError):
            reason = error.reason
        raise ClientError(f"rack head {rack_head} refused: {error.code} {reason}") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise ClientError(f"cannot reach rack head {rack_head}: {reason}") from None


def _json(rack_head: str, answer: bytes) -> Any:
    try:
        return json.loads(answer)
    except ValueError:
        raise ClientError(f"rack head {rack_head} answered something not JSON") from None


def request_session(rack_head: str, token: str, image: str, agent: Optional[str] = None,
                    sha256: Optional[str] = None,
                    image_format: Optional[str] = None) -> tuple[SessionSpec, bool]:
    """Ask for ``image`` (pinned to ``sha256`` of its ``image_format``, raw or qcow2, if
    given): the session's spec, and whether it was already in flight."""
    body: dict[str, Any] = {"image": image}
    for name, value in (("agent", agent), ("sha256", sha256), ("image_format", image_format)):
        if value is not None:
            body[name] = value
    _, answer = call(rack_head, token, "POST", "/v1/sessions", body)
    data = _json(rack_head, answer)
    try:
        return SessionSpec.from_dict(data["spec"]), bool(data.get("joined"))
    except (KeyError, TypeError, SpecError) as error:
        raise ClientError(f"rack head {rack_head} answered a bad spec: {error}") from None


def fetch_status(rack_head: str, token: str) -> dict:
    _, answer = call(rack_head, token, "GET", "/v1/status")
    data = _json(rack_head, answer)
    if not isinstance(data, dict) or "sessions" not in data:
        raise ClientError(f"rack head {rack_head} answered a bad status")
    return data
