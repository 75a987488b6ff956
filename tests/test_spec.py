"""The session spec: round trip, validation, rates."""

from __future__ import annotations

import json
import stat

import pytest

from mcastdeploy.spec import SessionSpec, SpecError, new_session, parse_rate, parse_rate_setting


@pytest.mark.parametrize("text, bps", [
    ("500M", 500_000_000), ("1G", 1_000_000_000), ("1.5g", 1_500_000_000),
    ("64k", 64_000), ("100Mbit", 100_000_000), ("2500", 2500), ("50 Mbps", 50_000_000),
])
def test_parse_rate(text, bps):
    assert parse_rate(text) == bps


@pytest.mark.parametrize("text", ["", "fast", "-5M", "0", "1T", "M"])
def test_parse_rate_rejects(text):
    with pytest.raises(SpecError):
        parse_rate(text)


@pytest.mark.parametrize("text, setting", [
    ("500M", ("fixed", 500_000_000)), ("auto", ("auto", None)), ("AUTO", ("auto", None)),
    ("auto:1G", ("auto", 1_000_000_000)), (" auto:50M ", ("auto", 50_000_000)),
])
def test_parse_rate_setting(text, setting):
    assert parse_rate_setting(text) == setting


@pytest.mark.parametrize("text", ["auto:", "auto:fast", "autox", "fixed:1G"])
def test_parse_rate_setting_rejects(text):
    with pytest.raises(SpecError, match="bad rate"):
        parse_rate_setting(text)


def test_new_session_defaults_and_fresh_ids():
    first, second = new_session(), new_session()
    assert first.session_id != second.session_id
    assert first.group.startswith("239.19") and first.port == 6790
    assert len(first.session_id) == 16 and int(first.session_id, 16) == first.session_number
    # A spec that ends up in a log line or a traceback does not give its key away.
    assert first.key not in repr(first) and first.session_id in repr(first)


def test_round_trip_and_private_file(tmp_path):
    spec = new_session(group="239.2.3.4", port=7000, interface="lo", rate_bps=10**9,
                       image_sha256="ab" * 32, image_size=12345)
    path = tmp_path / "s.json"
    spec.save(str(path))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert SessionSpec.load(str(path)) == spec
    assert spec.image_checksum == bytes.fromhex("ab" * 32)
    assert not list(tmp_path.glob("*.tmp*"))


def test_replace_ignores_unset_overrides():
    spec = new_session(port=7000)
    assert spec.replace(port=None, group="239.9.9.9") == SessionSpec(
        **{**json.loads(spec.to_json()), "group": "239.9.9.9"})


@pytest.mark.parametrize("changes, fragment", [
    ({"group": "10.0.0.1"}, "not a multicast"),
    ({"group": "nonsense"}, "not an IPv4"),
    ({"port": 0}, "'port'"),
    ({"port": "80"}, "'port'"),
    ({"ttl": 300}, "'ttl'"),
    ({"block_symbols": 255}, "'block_symbols'"),
    ({"proactive_repair": 230}, "'proactive_repair'"),
    ({"symbol_size": 70000}, "'symbol_size'"),
    ({"image_sha256": "XYZ"}, "'image_sha256'"),
    ({"image_size": 0}, "'image_size'"),
    ({"interface": ""}, "'interface'"),
    ({"session_id": "ABCDEF0123456789"}, "'session_id'"),
    ({"port": True}, "'port'"),
    ({"rate_mode": "turbo"}, "'rate_mode'"),
    ({"proactive_mode": "more"}, "'proactive_mode'"),
    ({"key": "ab" * 31}, "'key'"),
    ({"key": "AB" * 32}, "'key'"),
    ({"key": None}, "'key'"),
    ({"encrypt": "yes"}, "'encrypt'"),
    ({"sender": "10.0.0.1"}, "'sender'"),
    ({"sender": "10.0.0.1:0"}, "'sender'"),
    ({"sender": "10.0.0.1:70000"}, "'sender'"),
    ({"sender": "host:6790"}, "'sender'"),
    ({"sender": "239.1.1.1:6790"}, "'sender'"),
    ({"sender": "0.0.0.0:6790"}, "'sender'"),
    ({"sender": "255.255.255.255:6790"}, "'sender'"),
    ({"sender": 6790}, "'sender'"),
])
def test_validation(changes, fragment):
    data = json.loads(new_session().to_json()) | changes
    with pytest.raises(SpecError, match=fragment):
        SessionSpec.from_dict(data)


def test_every_new_session_has_its_own_key():
    first, second = new_session(), new_session()
    assert first.key != second.key
    assert len(first.key_bytes) == 32 and first.encrypt is False


def test_sender_address():
    assert new_session().sender_address is None
    assert new_session(sender="10.99.0.1:6791").sender_address == ("10.99.0.1", 6791)
