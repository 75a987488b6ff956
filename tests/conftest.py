"""Shared fixtures: session specs on loopback multicast."""

from __future__ import annotations

import pytest

from mcastdeploy.spec import new_session


@pytest.fixture
def loopback_spec(tmp_path):
    """A fresh session on lo with its own random group, saved to a file."""
    spec = new_session(interface="lo", rate_bps=400_000_000)
    path = tmp_path / "session.json"
    spec.save(str(path))
    return spec, str(path)

