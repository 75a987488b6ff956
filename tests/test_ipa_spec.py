"""The IPA plugin's parts that need no agent: the ``mcastdeploy`` value Ironic stores,
where the agent finds it, Ironic's checksums, the receive job's bounds, and
``session new --ironic``."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import subprocess
import sys
import time

import pytest
from helpers import finish, mcastdeploy, sha256_file, write_random

from mcastdeploy.ipa.checksum import (ChecksumError, ImageChecksum, check_written,
                                      ironic_checksum, pin_session)
from mcastdeploy.ipa.ironic_spec import IronicSpec, find_ironic_spec
from mcastdeploy.ipa.job import ReceiveJob
from mcastdeploy.spec import SessionSpec, SpecError, new_session


def value_of(spec: SessionSpec, **options) -> dict:
    return IronicSpec(spec, **options).to_ironic()


def test_the_value_reads_back_as_object_or_json_text():
    spec = new_session(interface="eth7")
    value = value_of(spec, early_start=True, interface="eno1")
    assert "interface" not in value["session"]  # the rack head's NIC is not the nodes'
    for stored in (value, json.dumps(value)):
        ironic = IronicSpec.from_value(stored)
        assert ironic.early_start is True
        assert ironic.receiver_session == spec.replace(interface="eno1")


@pytest.mark.parametrize("stored, message", [
    ("{not json", "not valid JSON"),
    ([1, 2], "must be a JSON object"),
    ({"early_start": True}, "lacks 'session'"),
    ({"session": {}, "colour": "red"}, "unknown mcastdeploy field 'colour'"),
    ({"session": {"group": "239.1.1.1"}}, "lacks 'session_id'"),
])
def test_malformed_values_are_one_line_errors(stored, message):
    with pytest.raises(SpecError, match=message):
        IronicSpec.from_value(stored)


@pytest.mark.parametrize("option", [{"early_start": "yes"}, {"timeout": 0},
                                    {"deadline": -1}, {"interface": ""}, {"seed_time": -1},
                                    {"seed_time": "60"}, {"seed_time": 7200},
                                    {"timeout": float("nan")}, {"deadline": float("inf")},
                                    {"seed_time": float("nan")}])
def test_bad_agent_options_are_refused(option):
    with pytest.raises(SpecError):
        IronicSpec.from_value({**value_of(new_session()), **option})


def test_where_the_agent_finds_the_spec():
    first, second, third = (value_of(new_session()) for _ in range(3))
    node = {"uuid": "u", "instance_info": {"mcastdeploy": second},
            "driver_internal_info": {"mcastdeploy": third}}
    found = find_ironic_spec(node, {"mcastdeploy": first})
    assert found.session.session_id == first["session"]["session_id"]
    found = find_ironic_spec(node, {"id": "image"})
    assert found.session.session_id == second["session"]["session_id"]
    del node["instance_info"]["mcastdeploy"]
    found = find_ironic_spec(node, None)
    assert found.session.session_id == third["session"]["session_id"]
    assert find_ironic_spec({"uuid": "u", "instance_info": {}, "driver_internal_info": {}},
                            {"id": "image"}) is None
    assert find_ironic_spec(None, {}) is None
    asking = find_ironic_spec({"uuid": "u", "instance_info": {"mcastdeploy": {
        "rack_head": "http://10.0.0.1:6780", "token": "s3cret-token"}}}, None)
    assert asking.token == "s3cret-token" and "s3cret-token" not in repr(asking)
    assert first["session"]["key"] not in repr(find_ironic_spec(node, {"mcastdeploy": first}))


def test_ironic_checksums_as_ipa_reads_them():
    multihash = {"os_hash_algo": "SHA512", "os_hash_value": "AB" * 64, "checksum": "c" * 32}
    assert ironic_checksum(multihash) == ImageChecksum("sha512", "ab" * 64)
    assert ironic_checksum({"checksum": "d" * 64}) == ImageChecksum("sha256", "d" * 64)
    assert ironic_checksum({"checksum": "e" * 32}, md5_allowed=True).algorithm == "md5"
    for info, message in [({"checksum": "e" * 32}, "MD5"), ({}, "no checksum"),
                          ({"checksum": "http://x/SHA256SUMS"}, "URL"),
                          ({"checksum": "f" * 40}, "40-digit")]:
        with pytest.raises(ChecksumError, match=message):
            ironic_checksum(info)


def test_raw_sha256_becomes_the_pin_and_other_pins_conflict():
    session = new_session()
    checksum = ImageChecksum("sha256", "1" * 64)
    assert pin_session(session, checksum, raw=True).image_sha256 == "1" * 64
    assert pin_session(session, ImageChecksum("sha512", "2" * 128), raw=True) == session
    with pytest.raises(ChecksumError, match="another image"):
        pin_session(session.replace(image_sha256="3" * 64), checksum, raw=True)


def test_a_converted_image_needs_the_senders_pin_of_the_same_file():
    checksum = ImageChecksum("sha256", "4" * 64)
    vouched = new_session(image_sha256="4" * 64, image_format="qcow2")
    assert pin_session(vouched, checksum, raw=False) == vouched
    for session in (new_session(), vouched.replace(image_sha256="5" * 64)):
        with pytest.raises(ChecksumError, match="does not pin the same"):
            pin_session(session, checksum, raw=False)


def test_check_written_reads_other_algorithms_back(tmp_path):
    device = tmp_path / "disk"
    device.write_bytes(b"image" * 1000 + b"tail past the image")
    size = 5000
    good = ImageChecksum("sha512", hashlib.sha512(b"image" * 1000).hexdigest())
    check_written(str(device), size, "unused for sha512", good)
    with pytest.raises(ChecksumError, match="sha512"):
        check_written(str(device), size + 1, "", good)
    sha256 = hashlib.sha256(b"image" * 1000).hexdigest()
    check_written(str(device), size, sha256, ImageChecksum("sha256", sha256))
    with pytest.raises(ChecksumError):
        check_written(str(device), size, "0" * 64, ImageChecksum("sha256", sha256))
    with pytest.raises(ChecksumError, match="cannot read the image back"):
        check_written(str(tmp_path / "gone"), size, "", good)


@pytest.mark.parametrize("bound, reason", [("deadline", "deadline of 1 s"),
                                           ("timeout", "from the sender for 1 s"),
                                           ("cancel", "cancelled")])
def test_a_receive_with_no_sender_ends_in_bounded_time(tmp_path, bound, reason):
    session = new_session(interface="lo")
    ironic = IronicSpec(session, timeout=30 if bound != "timeout" else 1,
                        deadline=1 if bound == "deadline" else 60)
    job = ReceiveJob(ironic, session, lambda: str(tmp_path / "disk")).start()
    if bound == "cancel":
        job.cancel()
    outcome = job.wait(15)
    assert outcome is not None and not outcome.ok
    assert reason in outcome.reason
    status = job.status()
    assert status["state"] == "failed" and status["reason"] == outcome.reason
    assert status["eta_s"] is None and status["device"] == str(tmp_path / "disk")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mcastdeploy", *args], capture_output=True,
                          text=True, timeout=60)


def test_session_new_ironic_prints_what_the_nodes_get(tmp_path):
    path = tmp_path / "rack1.json"
    done = run("session", "new", "--interface", "lo", "-o", str(path), "--ironic",
               "--early-start", "--agent-timeout", "90", "--agent-seed-time", "120")
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.strip().splitlines()) == 1  # one line for --instance-info
    ironic = IronicSpec.from_value(done.stdout)
    assert (ironic.early_start, ironic.timeout, ironic.interface, ironic.seed_time) == (
        True, 90, None, 120)
    assert ironic.session == dataclasses.replace(SessionSpec.load(str(path)), interface=None)
    again = run("session", "ironic", str(path), "--node-interface", "eno1")
    assert again.returncode == 0, again.stderr
    assert IronicSpec.from_value(again.stdout).receiver_session \
        == SessionSpec.load(str(path)).replace(interface="eno1")


def test_agent_options_that_do_not_go_together_leave_no_spec_behind(tmp_path):
    path = tmp_path / "rack1.json"
    done = run("session", "new", "--interface", "lo", "-o", str(path), "--ironic",
               "--agent-seed-time", "9000")  # longer than the agent's deadline
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "'seed_time' must be shorter than 'deadline'" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not path.exists()


def test_session_new_ironic_without_a_file_for_the_sender_is_refused():
    done = run("session", "new", "--ironic")
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "needs -o FILE" in done.stderr


def test_a_rack_head_value_asks_for_the_image_pinned_as_ironic_pins_it(monkeypatch):
    from mcastdeploy.ipa import ironic_spec

    asked = []
    spec = new_session(interface="eth9")

    def request_session(rack_head, token, image, agent=None, sha256=None, image_format=None):
        asked.append((rack_head, token, image, agent, sha256, image_format))
        return spec, False

    monkeypatch.setattr(ironic_spec, "request_session", request_session)
    value = {"rack_head": "https://head:7470", "token": "t0ken", "interface": "eno1"}
    ironic = IronicSpec.from_value(json.dumps(value))
    node = {"uuid": "node-1", "instance_info": {"image_source": "glance-id",
                                                "image_os_hash_algo": "sha256",
                                                "image_os_hash_value": "ab" * 32,
                                                "image_disk_format": "qcow2"}}
    # At lookup (early start): from instance_info; the node's NIC replaces the head's.
    assert ironic.session_for(None, node) == spec.replace(interface="eno1")
    # In the deploy step: image_info's own, a raw image here.
    info = {"id": "glance-id", "os_hash_algo": "sha256", "os_hash_value": "cd" * 32,
            "disk_format": "raw"}
    ironic.session_for(info, node)
    named = IronicSpec.from_value(dict(value, image="ubuntu-22.04"))
    named.session_for({"id": "glance-id", "checksum": "ef" * 16}, node)  # md5: no pin
    named.session_for({"id": "glance-id", "checksum": "EF" * 32}, node)  # legacy SHA-256
    assert asked == [
        ("https://head:7470", "t0ken", "glance-id", "node-1", "ab" * 32, "qcow2"),
        ("https://head:7470", "t0ken", "glance-id", "node-1", "cd" * 32, None),
        ("https://head:7470", "t0ken", "ubuntu-22.04", "node-1", None, None),
        ("https://head:7470", "t0ken", "ubuntu-22.04", "node-1", "ef" * 32, None)]


@pytest.mark.parametrize("value, message", [
    ({"rack_head": "https://head"}, "'token'"),
    ({"rack_head": "ftp://head", "token": "t"}, "http(s)://"),
    ({"rack_head": "https://head", "token": "t",
      "session": json.loads(new_session().to_json())}, "either"),
    ({"early_start": True}, "lacks 'session'"),
])
def test_bad_rack_head_values(value, message):
    with pytest.raises(SpecError, match=re.escape(message)):
        IronicSpec.from_value(value)


def test_a_rack_head_that_refuses_is_a_spec_error(monkeypatch):
    from mcastdeploy.ipa import ironic_spec
    from mcastdeploy.service.client import ClientError

    def refuse(*args, **kwargs):
        raise ClientError("rack head https://head refused: 404 no image 'x'")

    monkeypatch.setattr(ironic_spec, "request_session", refuse)
    ironic = IronicSpec.from_value({"rack_head": "https://head", "token": "t"})
    with pytest.raises(SpecError, match="404"):
        ironic.session_for({"id": "x"}, {"uuid": "n"})


def test_a_replaced_receive_has_let_go_of_the_disk_before_the_next_starts(tmp_path):
    """Two receives (or a receive and IPA's download) must never write one disk: the
    job replaced is stopped, not only told to stop."""
    from mcastdeploy.ipa import job as ipa_job

    session = new_session(interface="lo")
    ironic = IronicSpec(session, timeout=30, deadline=60)
    first = ReceiveJob(ironic, session, lambda: str(tmp_path / "disk"))
    ipa_job.replace_current_job(first)
    first.start()
    second = ReceiveJob(ironic, session, lambda: str(tmp_path / "disk"))
    try:
        ipa_job.replace_current_job(second)
        assert first.finished and "cancelled" in first.outcome.reason
        assert ipa_job.current_job() is second
    finally:
        ipa_job.replace_current_job(None)


def test_a_finished_agent_seeds_a_late_node_until_its_step_is_cancelled(tmp_path):
    """With ``seed_time`` the agent serves its verified image to the rack's stragglers
    before the deploy step returns: a node that starts after the pass gets every block
    from it. Cancelling ends the seeding at once, and the verified image stands."""
    size = 3 * 1024 * 1024 + 5
    image = tmp_path / "image.raw"
    write_random(image, size, seed=4)
    session = new_session(interface="lo")
    session.save(str(tmp_path / "spec.json"))
    ironic = IronicSpec(session, timeout=30, deadline=120, seed_time=100)
    job = ReceiveJob(ironic, session, lambda: str(tmp_path / "disk")).start()
    # It waits for a third receiver that never comes: the session lasts its linger.
    sender = mcastdeploy("send", "--session", str(tmp_path / "spec.json"), "--min-receivers",
                         "3", "--wait", "1", "--linger", "60", "--json", str(image))
    late = None
    try:
        until = time.monotonic() + 60
        while job.status()["state"] != "seeding":
            assert time.monotonic() < until and not job.finished, job.status()
            time.sleep(0.1)
        late = mcastdeploy("recv", "--session", str(tmp_path / "spec.json"), "--json",
                           "--timeout", "30", str(tmp_path / "late"))
        code, out, err = finish(late, timeout=60)
        assert code == 0, err
        summary = json.loads(out)
        assert summary["bytes_from_peers"] == size, summary
        assert job.status()["state"] == "seeding"  # still: the sender lingers
        stopping = time.monotonic()
        assert job.stop(timeout=10)
        assert time.monotonic() - stopping < 5
    finally:
        job.stop(timeout=10)
        sender.kill()
        finish(sender)
    assert job.outcome is not None and job.outcome.ok, job.outcome
    assert job.outcome.summary.bytes_seeded == size
    assert job.status()["state"] == "done"
    assert sha256_file(tmp_path / "disk", size) == sha256_file(image)
