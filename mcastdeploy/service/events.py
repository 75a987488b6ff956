"""Structured logs: one line per event, ``key=value`` pairs, the session id on every line
of a session's events.  Session keys and the API token never appear: fields are named by
the caller, and a field named like a secret is refused rather than written."""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Optional

LOGGER = logging.getLogger("mcastdeploy.serve")
_SECRET_NAMES = {"key", "token", "secret", "password", "spec"}


def _format(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    if not text or any(c.isspace() or c in '"=' for c in text):
        return json.dumps(text)
    return text


def log_event(event: str, session: Optional[str] = None, *, level: int = logging.INFO,
              **fields: Any) -> str:
    """Log ``event`` with its fields; returns the line (tests look at it)."""
    secret = _SECRET_NAMES & set(fields)
    if secret:
        raise ValueError(f"refusing to log a secret field: {sorted(secret)[0]}")
    parts = [f"ts={time.time():.3f}", f"event={event}"]
    if session is not None:
        parts.append(f"session={session}")
    parts += [f"{name}={_format(value)}" for name, value in fields.items()]
    line = " ".join(parts)
    LOGGER.log(level, line)
    return line


def configure(stream: Any = None) -> None:
    """Send the daemon's events to ``stream`` (stderr), one bare line each: journald adds
    its own timestamp and unit, and the line already says what it is."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    LOGGER.handlers[:] = [handler]
    LOGGER.setLevel(logging.INFO)
    LOGGER.propagate = False
