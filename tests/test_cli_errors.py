"""Bad input gets one clear line on stderr and a non-zero exit, never a traceback,
and nothing is written where it should not be."""

from __future__ import annotations

import json
import os
import stat

import pytest

from helpers import finish, mcastdeploy, write_random
from http_objects import ObjectServer

from mcastdeploy.spec import new_session


def run(*args: str, timeout: float = 30) -> tuple[int, str, str]:
    return finish(mcastdeploy(*args), timeout=timeout)


def assert_one_line_error(code: int, err: str, expected_code: int, fragment: str) -> None:
    assert code == expected_code, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("mcastdeploy: error: ") or lines[0].startswith("Error: "), err
    assert fragment in lines[0], err


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "image.raw"
    write_random(path, 100_000)
    return str(path)


KEY = '"key": "%s", ' % ("ab" * 32)


@pytest.mark.parametrize("content, fragment", [
    (None, "cannot read session spec"),
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "is a JSON object"),
    ('{"group": "239.1.1.1"}', "lacks 'session_id'"),
    ('{"session_id": "0123456789abcdef", "group": "239.1.1.1"}', "lacks 'key'"),
    ('{%s"session_id": "0123456789abcdef", "group": "10.1.1.1"}' % KEY, "not a multicast address"),
    ('{%s"session_id": "0123456789abcdef", "group": "239.1.1.1", "port": 70000}' % KEY, "'port'"),
    ('{%s"session_id": "xyz", "group": "239.1.1.1"}' % KEY, "'session_id'"),
    ('{"session_id": "0123456789abcdef", "group": "239.1.1.1", "key": "00"}', "'key'"),
    ('{%s"session_id": "0123456789abcdef", "group": "239.1.1.1", "color": 1}' % KEY, "'color'"),
    ('{%s"session_id": "0123456789abcdef", "group": "239.1.1.1", "version": 9}' % KEY,
     "version 9"),
])
def test_unusable_session_spec(tmp_path, image, content, fragment):
    spec = tmp_path / "spec.json"
    if content is not None:
        spec.write_text(content)
    target = tmp_path / "target.raw"
    for args in (("send", "--session", str(spec), image),
                 ("recv", "--session", str(spec), str(target))):
        code, _, err = run(*args)
        assert_one_line_error(code, err, 2, fragment)
    assert not target.exists()


def test_no_such_image(loopback_spec, tmp_path):
    code, _, err = run("send", "--session", loopback_spec[1], str(tmp_path / "missing.raw"))
    assert_one_line_error(code, err, 2, "cannot read image")


def test_image_is_a_directory(loopback_spec, tmp_path):
    code, _, err = run("send", "--session", loopback_spec[1], "--progress", "none",
                       str(tmp_path))
    assert code == 2 and "Traceback" not in err


def test_empty_image(loopback_spec, tmp_path):
    empty = tmp_path / "empty.raw"
    empty.write_bytes(b"")
    code, _, err = run("send", "--session", loopback_spec[1], str(empty))
    assert_one_line_error(code, err, 2, "is empty")


@pytest.mark.parametrize("command", ["send", "recv"])
def test_no_such_interface(loopback_spec, image, tmp_path, command):
    last = image if command == "send" else str(tmp_path / "t.raw")
    code, _, err = run(command, "--session", loopback_spec[1], "--interface", "nosuch0", last)
    assert_one_line_error(code, err, 2, "no such interface: nosuch0")


@pytest.mark.parametrize("command", ["send", "recv"])
@pytest.mark.parametrize("group, message", [
    ("192.0.2.1", "is not a multicast group"),
    # Flooded to every port whatever IGMP snooping says: an image must not go there.
    ("224.0.0.1", "every port of the switch"), ("239.128.0.7", "every port of the switch")])
def test_group_that_is_no_sessions_group(loopback_spec, image, tmp_path, command, group,
                                         message):
    last = image if command == "send" else str(tmp_path / "t.raw")
    code, _, err = run(command, "--session", loopback_spec[1], "--group", group, last)
    assert_one_line_error(code, err, 2, message)


@pytest.mark.parametrize("rate", ["fast", "auto:fast", "auto:0", "automatic"])
def test_bad_rate(loopback_spec, image, rate):
    code, _, err = run("send", "--session", loopback_spec[1], "--rate", rate, image)
    assert code == 2 and "bad rate" in err and "Traceback" not in err


@pytest.mark.parametrize("args", [
    ["recv", "--session", "{spec}", "--timeout", "nan", "{target}"],
    ["recv", "--session", "{spec}", "--timeout", "inf", "{target}"],
    ["recv", "--session", "{spec}", "--seed-time", "nan", "{target}"],
    ["send", "--session", "{spec}", "--wait", "nan", "{image}"],
    ["send", "--session", "{spec}", "--linger", "nan", "{image}"],
    ["session", "ironic", "--agent-timeout", "nan", "{spec}"],
    ["session", "ironic", "--agent-seed-time", "nan", "{spec}"],
    ["session", "new", "--ironic", "-o", "{target}", "--agent-timeout", "inf"],
    ["serve", "--config", "{target}", "--gather", "nan"],
    ["status", "--rack-head", "http://127.0.0.1:9", "--interval", "nan"],
])
def test_seconds_that_are_no_duration(loopback_spec, image, tmp_path, args):
    """click's FloatRange lets NaN through: a NaN --timeout broke the event loop's select()
    and a NaN --agent-timeout went into Ironic's JSON as a bare NaN."""
    target = tmp_path / "target.raw"
    places = {"spec": loopback_spec[1], "image": image, "target": str(target)}
    code, out, err = run(*(arg.format(**places) for arg in args))
    assert code == 2 and "is not a number of seconds" in err and "Traceback" not in err, err
    assert out == "" and not target.exists()


def test_target_smaller_than_pinned_image(tmp_path, image):
    spec = new_session(interface="lo", image_size=100_000)
    spec_path = tmp_path / "spec.json"
    spec.save(str(spec_path))
    target = tmp_path / "small.raw"
    target.write_bytes(b"keep me" * 100)
    before = target.read_bytes()
    code, _, err = run("recv", "--session", str(spec_path), str(target))
    assert_one_line_error(code, err, 2, "smaller than the image")
    assert target.read_bytes() == before


def test_target_smaller_than_announced_image(tmp_path, loopback_spec, image):
    """Size known only from the sender's ANNOUNCE: the receiver stops before writing."""
    target = tmp_path / "small.raw"
    target.write_bytes(b"keep me" * 100)
    before = target.read_bytes()
    receiver = mcastdeploy("recv", "--session", loopback_spec[1], "--timeout", "10",
                           str(target))
    sender = mcastdeploy("send", "--session", loopback_spec[1], "--min-receivers", "1",
                         "--wait", "10", "--linger", "1", image)
    code, _, err = finish(receiver)
    finish(sender)
    assert_one_line_error(code, err, 2, "smaller than the image")
    assert target.read_bytes() == before


def test_target_in_missing_directory(loopback_spec, tmp_path):
    code, _, err = run("recv", "--session", loopback_spec[1],
                       str(tmp_path / "no" / "such" / "dir" / "t.raw"))
    assert_one_line_error(code, err, 2, "does not exist")


def test_no_sender(loopback_spec, tmp_path):
    target = tmp_path / "t.raw"
    code, out, err = run("recv", "--session", loopback_spec[1], "--timeout", "0.5", "--json",
                         str(target))
    assert_one_line_error(code, err, 1, "no ANNOUNCE from the sender for 0.5 s")
    assert json.loads(out)["ok"] is False
    assert not target.exists()


def test_image_does_not_match_pinned_checksum(tmp_path, image):
    spec = new_session(interface="lo", image_sha256="0" * 64)
    spec_path = tmp_path / "spec.json"
    spec.save(str(spec_path))
    code, _, err = run("send", "--session", str(spec_path), image)
    assert_one_line_error(code, err, 2, "does not match the session's sha256")


def test_receiver_refuses_an_image_other_than_the_pinned_one(tmp_path, image):
    """The receiver's spec pins a checksum; the sender sends something else."""
    sender_spec = new_session(interface="lo")
    receiver_spec = sender_spec.replace(image_sha256="ab" * 32)
    paths = []
    for name, spec in (("send.json", sender_spec), ("recv.json", receiver_spec)):
        paths.append(tmp_path / name)
        spec.save(str(paths[-1]))
    target = tmp_path / "t.raw"
    receiver = mcastdeploy("recv", "--session", str(paths[1]), "--timeout", "10", str(target))
    sender = mcastdeploy("send", "--session", str(paths[0]), "--min-receivers", "1",
                         "--wait", "10", "--linger", "1", image)
    code, _, err = finish(receiver)
    finish(sender)
    assert_one_line_error(code, err, 1, "differs from the session spec's")
    assert not target.exists()


def test_session_new_writes_private_spec(tmp_path, image):
    out = tmp_path / "s.json"
    code, _, err = run("session", "new", "--group", "239.9.9.9", "--port", "7000",
                       "--interface", "lo", "--rate", "1G", "--image", image, "-o", str(out))
    assert code == 0, err
    assert out.stat().st_mode & 0o777 == 0o600
    data = json.loads(out.read_text())
    assert data["group"] == "239.9.9.9" and data["port"] == 7000
    assert data["rate_bps"] == 1_000_000_000 and data["image_size"] == 100_000
    assert len(data["session_id"]) == 16 and len(data["image_sha256"]) == 64


def test_session_new_writes_no_spec_over_a_device(tmp_path):
    """-o /dev/full once replaced the device node with a regular file and exited 0; a FIFO
    stands in for the device here (the test may not make device nodes)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    code, out, err = run("session", "new", "-o", str(fifo))
    assert_one_line_error(code, err, 2, f"cannot write session spec to {fifo}: not a regular")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and out == ""
    assert os.listdir(tmp_path) == ["fifo"]


@pytest.mark.parametrize("argv, fields", [
    (["--rate", "auto:2G"], {"rate_mode": "auto", "rate_bps": 2_000_000_000}),
    (["--proactive-repair", "auto"], {"proactive_mode": "auto", "proactive_repair": 1}),
    (["--proactive-repair", "auto:3"], {"proactive_mode": "auto", "proactive_repair": 3}),
    (["--proactive-repair", "2"], {"proactive_mode": "fixed", "proactive_repair": 2}),
])
def test_session_new_automatic_modes(argv, fields):
    code, out, err = run("session", "new", *argv)
    assert code == 0, err
    data = json.loads(out)
    assert {key: data[key] for key in fields} == fields


@pytest.mark.parametrize("value", ["x", "auto:x", "-1", "auto:"])
def test_session_new_bad_proactive(value):
    code, _, err = run("session", "new", "--proactive-repair", value)
    assert code == 2 and "bad proactive repair" in err and "Traceback" not in err


def test_session_new_prints_spec_with_fresh_ids():
    first, second = (json.loads(run("session", "new")[1]) for _ in range(2))
    assert first["session_id"] != second["session_id"]
    assert first["group"].startswith("239.")


def test_receiver_with_the_wrong_key_writes_nothing_and_says_why(tmp_path, image):
    sender_spec = new_session(interface="lo")
    receiver_spec = sender_spec.replace(key="cd" * 32)
    paths = []
    for name, spec in (("send.json", sender_spec), ("recv.json", receiver_spec)):
        paths.append(tmp_path / name)
        spec.save(str(paths[-1]))
    target = tmp_path / "t.raw"
    receiver = mcastdeploy("recv", "--session", str(paths[1]), "--timeout", "2", "--json",
                           str(target))
    # Waiting for a receiver that never joins, the sender announces for 4 s.
    sender = mcastdeploy("send", "--session", str(paths[0]), "--min-receivers", "1",
                         "--wait", "4", "--linger", "0", image)
    code, out, err = finish(receiver)
    finish(sender)
    assert_one_line_error(code, err, 1, "failed authentication: is the session key")
    summary = json.loads(out)
    assert summary["ok"] is False and summary["rejected"]["unauthentic"] > 0
    assert not target.exists()


def test_port_in_use(loopback_spec, tmp_path):
    """Another program holds the session's port without sharing it."""
    import socket
    _, spec_path = loopback_spec
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        holder.bind(("0.0.0.0", 0))  # a port nobody else here uses, held unshared
        port = str(holder.getsockname()[1])
        target = tmp_path / "t.raw"
        code, _, err = run("recv", "--session", spec_path, "--port", port, "--timeout", "1",
                           str(target))
        assert_one_line_error(code, err, 2, "in use")
        assert not target.exists()
    finally:
        holder.close()


#: What a "rack head" that is not one answers GET /v1/status with, by URL path prefix.
NOT_A_RACK_HEAD = {
    "/count/v1/status": b'{"sessions": 5}',
    "/no-agents/v1/status": b'{"sessions": [{"session_id": "x"}]}',
    "/text-budget/v1/status": b'{"sessions": [], "budget_bps": "lots"}',
}


@pytest.fixture(scope="module")
def not_a_rack_head():
    with ObjectServer(NOT_A_RACK_HEAD) as server:
        yield server.url("")


#: Command lines a user may really type, with {spec} (a loopback session), {image} (a
#: small file), {target} (a file that must stay unwritten), {tmp}, {head} (an HTTP
#: server answering NOT_A_RACK_HEAD), {config} (a daemon's config, fine in itself) and
#: {fifo} filled in; each must end in one line, with its exit code, and leave the target
#: alone.
@pytest.mark.parametrize("args, code, fragment", [
    (["send", "--session", "{spec}", "--cache-dir", "{tmp}/cache", "http://u:pw@[::1/img"],
     2, "cannot read image http://[::1/img: Invalid IPv6 URL"),
    (["recv", "--session", "{spec}", "--origin", "http://[::1", "{target}"], 2,
     "Invalid IPv6 URL"),
    (["status", "--rack-head", "http://[::1"], 1, "is not a usable URL"),
    (["status", "--rack-head", "http://127.0.0.1:abc"], 1, "nonnumeric port"),
    (["session", "new", "--rack-head", "http://127.0.0.1:abc", "--image", "x"], 1,
     "is not a usable URL"),
    (["session", "new", "-o", "{tmp}/no/such/dir/s.json"], 2,
     "cannot write session spec to {tmp}/no/such/dir/s.json: No such file or directory"),
    (["serve", "--config", "{config}", "--interface", "nosuch0"], 2,
     "no such interface: nosuch0"),
    (["serve", "--config", "{config}", "--interface", "192.0.2.1"], 2,
     "no interface has the address 192.0.2.1"),
    (["status", "--rack-head", "http://127.0.0.1:9", "--token-file", "{image}"], 1,
     "token file {image} is not UTF-8 text"),
    (["session", "new", "--image", "/dev/zero"], 2,
     "image /dev/zero is neither a regular file nor a block device"),
    (["session", "new", "--image", "{fifo}"], 2, "is neither a regular file"),
    (["send", "--session", "{spec}", "{fifo}"], 2, "is neither a regular file"),
    (["demo", "--size", "100000G", "--keep", "{tmp}/demo"], 1, "the demo needs"),
    (["status", "--rack-head", "{head}/count"], 1, "answered a status this version cannot"),
    (["status", "--rack-head", "{head}/no-agents"], 1, "KeyError: 'agents'"),
    (["status", "--rack-head", "{head}/text-budget"], 1, "cannot show (TypeError"),
])
def test_bad_command_line(loopback_spec, image, tmp_path, monkeypatch, not_a_rack_head,
                          args, code, fragment):
    monkeypatch.setenv("MCASTDEPLOY_TOKEN", "t" * 32)
    target = tmp_path / "target.raw"
    config = tmp_path / "serve.ini"  # a daemon's config that is fine but for the options
    config.write_text(f"[serve]\ntoken = {'t' * 32}\nlisten = 127.0.0.1:9\n"
                      f"state_dir = {tmp_path / 'state'}\n")
    config.chmod(0o600)
    places = {"spec": loopback_spec[1], "image": image, "target": str(target),
              "tmp": str(tmp_path), "head": not_a_rack_head, "config": str(config),
              "fifo": str(tmp_path / "fifo")}
    os.mkfifo(places["fifo"])  # opening it for reading blocks until a writer comes
    returned, _, err = run(*(arg.format(**places) for arg in args))
    assert_one_line_error(returned, err, code, fragment.format(**places))
    assert not target.exists()
