"""pytest fixtures for the rack test bed (tools/rackbed.py): racks that always come down.

Import the fixtures into a test module (``from rack_fixtures import rack``); a conftest
below the rootdir may not declare ``pytest_plugins``.
"""

from __future__ import annotations

import os
import secrets
import sys
from typing import Any, Callable, Iterator

import pytest

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
if TOOLS not in sys.path:
    sys.path.insert(0, TOOLS)

import rackbed  # noqa: E402


@pytest.fixture(scope="session")
def rack_bed() -> Iterator[None]:
    """Skip unless racks can be built here; first tear down racks of killed earlier runs."""
    reason = rackbed.available()
    if reason:
        pytest.skip(reason)
    rackbed.sweep_stale()
    yield


@pytest.fixture
def rack(rack_bed: None) -> Iterator[Callable[..., rackbed.Rack]]:
    """A factory: ``rack(receivers=8, rate="50mbit", loss=0, snooping=..., querier=...)``.

    Each rack gets a fresh name (md + 6 hex digits) so parallel runs never collide, and is
    torn down after the test whatever happened: processes started with ``Rack.exec`` are
    killed by PID, every namespace (with its veths, bridge, qdiscs and nft tables) deleted.
    """
    racks: list[rackbed.Rack] = []

    def build(receivers: int = 8, **settings: Any) -> rackbed.Rack:
        built = rackbed.Rack(f"md{secrets.token_hex(3)}", receivers, owner_pid=os.getpid(),
                             **settings)
        racks.append(built)
        return built.up()

    yield build
    errors = []
    for built in racks:  # every rack, even if tearing down an earlier one failed
        try:
            built.down()
        except Exception as error:  # noqa: BLE001 - reported below, after the others
            errors.append(f"{built.name}: {error}")
    left = [ns for ns in rackbed.netns_list()
            if any(ns.startswith(f"{built.name}-") for built in racks)]
    assert not errors and not left, f"teardown failed: {errors}; left behind: {left}"
