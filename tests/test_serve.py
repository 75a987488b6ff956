"""The rack-head daemon (``mcastdeploy serve``, issue 8) run as operators run it.

On loopback: requests without the token are refused; agents asking for one image share
one session and receive it.  In the rack of namespaces (tools/rackbed.py, needs root): two
images to two groups of agents at once, the second group asking 5 s after the first, with
an agent asking for the first image while it is in flight; the daemon killed (SIGKILL)
and restarted mid-session; and the status API and metrics checked against what the
agents themselves report.  Every copy is checked byte for byte (SHA-256).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any, Optional

import pytest
from helpers import finish, mcastdeploy, sha256_file, write_random
from http_objects import ObjectServer
from swift_fixture import local_swift  # noqa: F401  (a fixture)
from rack_fixtures import rack, rack_bed  # noqa: F401  (fixtures)

TOKEN = "serve-test-token-" + "x" * 16
ENV = dict(os.environ, PYTHONUNBUFFERED="1")
#: Longest any wait here may take before the test fails.
DEADLINE = 90.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_config(directory, *, listen: str, interface: str, rate: str, gather: float = 1.0,
                 linger: float = 3.0, serve_extra: str = "", extra: str = "") -> str:
    (directory / "token").write_text(TOKEN + "\n")
    os.chmod(directory / "token", 0o600)
    path = directory / "serve.ini"
    path.write_text(f"""[serve]
listen = {listen}
interface = {interface}
rate = {rate}
gather = {gather:g}
linger = {linger:g}
token_file = token
state_dir = state
image_dir = images
{serve_extra}[cache]
dir = cache
limit = 1G
{extra}""")
    os.chmod(path, 0o600)
    return str(path)


class Daemon:
    """``mcastdeploy serve`` as a process (in a rack host's namespace, or here); its log."""

    def __init__(self, directory, config: str, url: str, rack=None,
                 env: Optional[dict] = None) -> None:
        self.directory, self.config, self.url, self.rack = directory, config, url, rack
        self.env = env or ENV
        self.runs = 0
        self.process: Optional[subprocess.Popen] = None
        self.start()

    @property
    def log(self) -> str:
        return str(self.directory / f"serve.{self.runs}.log")

    def start(self) -> None:
        self.runs += 1
        argv = [sys.executable, "-m", "mcastdeploy", "serve", "--config", self.config]
        with open(self.log, "w") as log:
            if self.rack is None:
                self.process = subprocess.Popen(argv, stdout=log, stderr=log, env=self.env,
                                                cwd=self.directory)
            else:
                self.process = self.rack.exec("sender", argv, stdout=log, stderr=log,
                                              env=self.env, cwd=self.directory)
        deadline = time.monotonic() + 20
        while "event=serving" not in self.text():
            assert self.process.poll() is None, f"serve exited:\n{self.text()}"
            assert time.monotonic() < deadline, f"serve did not start:\n{self.text()}"
            time.sleep(0.05)

    def text(self, run: Optional[int] = None) -> str:
        path = str(self.directory / f"serve.{run or self.runs}.log")
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read()

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def http(url: str, path: str, token: Optional[str], body: Optional[dict] = None
         ) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url + path, data=data, headers=headers,
                                     method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def parse_metrics(text: str) -> dict[str, float]:
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


# -- on loopback ----------------------------------------------------------------------------


def start_local_daemon(directory, linger: float = 2.0) -> Daemon:
    """A daemon on 127.0.0.1 multicasting on lo, serving images/small.raw (3 MB)."""
    (directory / "images").mkdir()
    sha = write_random(directory / "images" / "small.raw", 3 * 1024 * 1024 + 5, seed=81)
    port = free_port()
    config = write_config(directory, listen=f"127.0.0.1:{port}", interface="lo",
                          rate="200M", gather=1.0, linger=linger)
    daemon = Daemon(directory, config, f"http://127.0.0.1:{port}")
    daemon.sha = sha
    return daemon


@pytest.fixture
def local_daemon(tmp_path):
    daemon = start_local_daemon(tmp_path)
    yield daemon
    daemon.stop()


def test_unauthenticated_requests_are_refused(local_daemon, tmp_path):
    url = local_daemon.url
    for token in (None, "", "wrong-token-" + "y" * 20, TOKEN + "x"):
        assert http(url, "/v1/status", token)[0] == 401
        assert http(url, "/metrics", token)[0] == 401
        assert http(url, "/v1/sessions", token, {"image": "small.raw"})[0] == 401
    (tmp_path / "bad-token").write_text("not-the-token\n")
    code, out, err = finish(mcastdeploy("session", "new", "--rack-head", url, "--image",
                                        "small.raw", "--token-file",
                                        str(tmp_path / "bad-token")), timeout=30)
    assert code == 1 and "401" in err and len(err.strip().splitlines()) == 1, err
    status, body = http(url, "/v1/status", TOKEN)
    assert status == 200 and json.loads(body)["sessions"] == []  # nothing was opened
    assert "event=session_opened" not in local_daemon.text()


def test_bad_requests_are_one_line(local_daemon, tmp_path):
    url = local_daemon.url
    for image in ("missing.raw", "../serve.ini", "/etc/passwd", "http://example.com/x"):
        status, body = http(url, "/v1/sessions", TOKEN, {"image": image})
        assert status in (403, 404), (image, status, body)
    assert http(url, "/v1/sessions", TOKEN, {"image": "small.raw", "colour": 1})[0] == 400
    env = dict(ENV, MCASTDEPLOY_TOKEN=TOKEN)
    process = subprocess.Popen([sys.executable, "-m", "mcastdeploy", "session", "new",
                                "--rack-head", url, "--image", "missing.raw"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env)
    code, _, err = finish(process, timeout=30)
    assert code == 1 and "404" in err and "Traceback" not in err, err


def test_agents_asking_for_one_image_share_its_session(local_daemon, tmp_path):
    url, token_file = local_daemon.url, str(tmp_path / "token")

    def ask(agent: str) -> dict:
        out = str(tmp_path / f"{agent}.json")
        code, _, err = finish(mcastdeploy("session", "new", "--rack-head", url, "--image",
                                          "small.raw", "--agent", agent, "--token-file",
                                          token_file, "-o", out), timeout=30)
        assert code == 0, err
        with open(out, encoding="utf-8") as handle:
            return json.load(handle)

    first = ask("agent-1")
    receivers = [mcastdeploy("recv", "--session", str(tmp_path / "agent-1.json"), "--json",
                             "--timeout", "30", "--progress", "none",
                             str(tmp_path / "agent-1.raw"))]
    second = ask("agent-2")  # inside the gathering window: the same session
    assert second == first
    receivers.append(mcastdeploy("recv", "--session", str(tmp_path / "agent-2.json"),
                                 "--json", "--timeout", "30", "--progress", "none",
                                 str(tmp_path / "agent-2.raw")))
    summaries = []
    for process in receivers:
        code, out, err = finish(process, timeout=DEADLINE)
        assert code == 0, err
        summaries.append(json.loads(out))
    for agent in ("agent-1", "agent-2"):
        assert sha256_file(tmp_path / f"{agent}.raw") == local_daemon.sha

    view = wait_for_ended(url, first["session_id"])
    assert view["state"] == "done" and view["image"] == "small.raw"
    assert sorted(a["name"] for a in view["agents"]) == ["agent-1", "agent-2"]
    assert all(a["state"] == "done" and a["progress"] == 1.0 for a in view["agents"])
    log = local_daemon.text()
    assert first["key"] not in log  # keys never logged
    for line in log.splitlines():
        if any(f"event={e}" in line for e in ("session_opened", "agent_joined",
                                               "session_ended", "rate_shared")):
            assert f"session={first['session_id']}" in line, line


def test_the_rack_heads_session_for_ironic(local_daemon, tmp_path):
    """``session new --rack-head ... --ironic``: the daemon's session as the nodes'
    instance_info value, which the IPA plugin reads back as the same session."""
    from mcastdeploy.ipa.ironic_spec import IronicSpec

    code, out, err = finish(mcastdeploy(
        "session", "new", "--rack-head", local_daemon.url, "--image", "small.raw",
        "--agent", "rack1", "--token-file", str(tmp_path / "token"), "--ironic",
        "--early-start", "-o", str(tmp_path / "rack1.json")), timeout=30)
    assert code == 0, err
    value = IronicSpec.from_value(out.strip())
    with open(tmp_path / "rack1.json", encoding="utf-8") as handle:
        saved = json.load(handle)
    assert value.early_start and value.session.session_id == saved["session_id"]
    assert value.session.key == saved["key"] and value.session.group == saved["group"]
    status = json.loads(http(local_daemon.url, "/v1/status", TOKEN)[1])
    assert [v["session_id"] for v in status["sessions"]] == [saved["session_id"]], status


@pytest.mark.skipif(shutil.which("qemu-img") is None,
                    reason="qemu-img (qemu-utils) is not installed")
def test_a_qcow2_image_pinned_as_ironic_pins_it(local_daemon, tmp_path):
    """--sha256 --qcow2: the pin is of the qcow2 file (Ironic's checksum); agents get the
    raw conversion, byte-identical to the raw image it was made from; a wrong pin fails the
    session, not the daemon."""
    raw = tmp_path / "source.raw"
    raw_sha = write_random(raw, 1024 * 1024 + 4096, seed=84)  # whole sectors, as qcow2 keeps
    qcow2 = tmp_path / "images" / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw),
                    str(qcow2)], check=True, timeout=60)
    pin = sha256_file(qcow2)

    def ask(sha: str, out: str) -> tuple[int, str]:
        code, _, err = finish(mcastdeploy(
            "session", "new", "--rack-head", local_daemon.url, "--image", "disk.qcow2",
            "--sha256", sha, "--qcow2", "--token-file", str(tmp_path / "token"), "-o",
            str(tmp_path / out)), timeout=30)
        return code, err

    assert ask(pin, "good.json") == (0, "")
    spec = json.loads((tmp_path / "good.json").read_text())
    assert (spec["image_sha256"], spec["image_format"]) == (pin, "qcow2")
    code, out, err = finish(mcastdeploy("recv", "--session", str(tmp_path / "good.json"),
                                        "--json", "--timeout", "30", "--progress", "none",
                                        str(tmp_path / "copy.raw")), timeout=DEADLINE)
    assert code == 0, err
    assert json.loads(out)["sha256"] == raw_sha == sha256_file(tmp_path / "copy.raw")

    assert ask("0" * 64, "bad.json")[0] == 0  # a session with another pin: its own
    bad = json.loads((tmp_path / "bad.json").read_text())
    assert bad["session_id"] != spec["session_id"]
    view = wait_for_ended(local_daemon.url, bad["session_id"])
    assert view["state"] == "failed" and "sha256" in view["reason"], view


def test_sigterm_stops_the_daemon_and_its_table_keeps_the_sessions(local_daemon, tmp_path):
    status, body = http(local_daemon.url, "/v1/sessions", TOKEN, {"image": "small.raw"})
    assert status == 200
    session_id = json.loads(body)["spec"]["session_id"]
    local_daemon.process.terminate()
    assert local_daemon.process.wait(15) == 0
    assert "event=stopping sessions=1" in local_daemon.text()
    table = tmp_path / "state" / "sessions.json"
    assert os.stat(table).st_mode & 0o077 == 0  # it holds the keys
    assert [entry["spec"]["session_id"]
            for entry in json.loads(table.read_text())["sessions"]] == [session_id]
    local_daemon.start()
    assert f"event=session_resumed session={session_id}" in local_daemon.text()
    (view,) = json.loads(http(local_daemon.url, "/v1/status", TOKEN)[1])["sessions"]
    assert view["session_id"] == session_id and view["resumed"]


def test_an_agent_done_is_in_the_table_and_not_waited_for_after_a_restart(tmp_path):
    # A linger that outlasts the test: the session stays in flight, waiting for "absent".
    local_daemon = start_local_daemon(tmp_path, linger=120.0)
    try:
        check_done_agents_survive_a_restart(local_daemon, tmp_path)
    finally:
        local_daemon.stop()


def check_done_agents_survive_a_restart(local_daemon: Daemon, tmp_path) -> None:
    url = local_daemon.url
    spec = json.loads(http(url, "/v1/sessions", TOKEN, {"image": "small.raw",
                                                        "agent": "quick"})[1])["spec"]
    assert json.loads(http(url, "/v1/sessions", TOKEN, {"image": "small.raw",
                                                        "agent": "absent"})[1])["joined"]
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    code, _, err = finish(mcastdeploy("recv", "--session", str(tmp_path / "spec.json"),
                                      "--json", "--timeout", "30", "--progress", "none",
                                      str(tmp_path / "copy.raw")), timeout=DEADLINE)
    assert code == 0, err
    table = tmp_path / "state" / "sessions.json"
    deadline = time.monotonic() + 10
    while True:  # the session waits for "absent"; "quick" is recorded done
        agents = json.loads(table.read_text())["sessions"][0]["agents"]
        if {a["name"]: a["done"] for a in agents} == {"quick": True, "absent": False}:
            break
        assert time.monotonic() < deadline, agents
        time.sleep(0.1)
    local_daemon.kill()
    local_daemon.start()
    assert (f"event=session_resumed session={spec['session_id']} image=small.raw "
            f"group={spec['group']} agents=2 waiting=1") in local_daemon.text()
    (view,) = json.loads(http(url, "/v1/status", TOKEN)[1])["sessions"]
    assert {a["name"]: a["state"] for a in view["agents"]} == {"quick": "done",
                                                              "absent": "asked"}


def self_signed(directory) -> tuple[str, str]:
    """A certificate for 127.0.0.1 (an IP subject alternative name) and its key, PEM."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rack head")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.SubjectAlternativeName(
                       [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None),
                                  critical=True)
                   .sign(key, hashes.SHA256()))
    cert, key_path = directory / "api.crt", directory / "api.key"
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    os.chmod(key_path, 0o600)
    return str(cert), str(key_path)


def test_the_api_over_tls(tmp_path):
    """With tls_cert/tls_key the API speaks HTTPS only; a client that trusts the rack head's
    certificate (SSL_CERT_FILE) gets its session, one that does not is told in one line."""
    cert, key = self_signed(tmp_path)
    (tmp_path / "images").mkdir()
    write_random(tmp_path / "images" / "small.raw", 64 * 1024, seed=85)
    port = free_port()
    config = write_config(tmp_path, listen=f"127.0.0.1:{port}", interface="lo", rate="200M",
                          serve_extra=f"tls_cert = {cert}\ntls_key = {key}\n")
    daemon = Daemon(tmp_path, config, f"https://127.0.0.1:{port}")
    try:
        assert "tls=true" in daemon.text()
        trusted = dict(ENV, SSL_CERT_FILE=cert, MCASTDEPLOY_TOKEN=TOKEN)
        untrusted = dict(ENV, MCASTDEPLOY_TOKEN=TOKEN)
        untrusted.pop("SSL_CERT_FILE", None)
        argv = [sys.executable, "-m", "mcastdeploy", "session", "new", "--rack-head",
                daemon.url, "--image", "small.raw"]
        code, out, err = finish(subprocess.Popen(argv, stdout=subprocess.PIPE,
                                                 stderr=subprocess.PIPE, text=True,
                                                 env=trusted), timeout=30)
        assert code == 0, err
        assert json.loads(out)["session_id"]
        code, _, err = finish(subprocess.Popen(argv, stdout=subprocess.PIPE,
                                               stderr=subprocess.PIPE, text=True,
                                               env=untrusted), timeout=30)
        assert code == 1 and "CERTIFICATE_VERIFY_FAILED" in err, err
        assert len(err.strip().splitlines()) == 1, err
        plain = f"http://127.0.0.1:{port}"
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            http(plain, "/v1/status", TOKEN)
    finally:
        daemon.stop()


def test_a_failed_session_leaves_the_daemon_serving_and_urls_are_pulled_once(tmp_path):
    """An image whose store answers 404 fails its session only; an image from a URL is
    pulled into the cache once, and its next session is sent from there."""
    data = random_bytes(2 * 1024 * 1024 + 3, seed=82)
    with ObjectServer({"/img": data}) as store:
        (tmp_path / "images").mkdir()
        port = free_port()
        config = write_config(tmp_path, listen=f"127.0.0.1:{port}", interface="lo",
                              rate="200M", gather=0.5, linger=2.0, extra=f"""[images]
gone = {store.url("/missing")}?temp_url_sig=SIGSECRET&temp_url_expires=9
remote = {store.url("/img")}
""")
        daemon = Daemon(tmp_path, config, f"http://127.0.0.1:{port}")
        try:
            url = daemon.url
            status, body = http(url, "/v1/sessions", TOKEN, {"image": "gone"})
            assert status == 200  # opened; the fetch fails in the session's thread
            failed = wait_for_ended(url, json.loads(body)["spec"]["session_id"])
            assert failed["state"] == "failed" and "404" in failed["reason"], failed
            assert "event=session_failed" in daemon.text()
            assert "SIGSECRET" not in daemon.text() + json.dumps(failed)  # a temp URL's

            for run in range(2):
                spec_path = tmp_path / f"remote{run}.json"
                status, body = http(url, "/v1/sessions", TOKEN, {"image": "remote",
                                                                 "agent": f"node{run}"})
                assert status == 200, body
                spec = json.loads(body)["spec"]
                spec_path.write_text(json.dumps(spec))
                code, _, err = finish(mcastdeploy(
                    "recv", "--session", str(spec_path), "--json", "--timeout", "30",
                    "--progress", "none", str(tmp_path / f"copy{run}.raw")), timeout=DEADLINE)
                assert code == 0, err
                assert sha256_file(tmp_path / f"copy{run}.raw") == hashlib.sha256(data).hexdigest()
                assert wait_for_ended(url, spec["session_id"])["state"] == "done"
            metrics = parse_metrics(http(url, "/metrics", TOKEN)[1].decode())
            # Pulled from the store once (the object's bytes plus describe's first byte).
            assert len(data) <= metrics["mcastdeploy_source_bytes_total"] <= len(data) + 1
            assert store.bytes_served <= len(data) + 1
            assert metrics['mcastdeploy_sessions_ended_total{result="done"}'] == 2
            assert metrics['mcastdeploy_sessions_ended_total{result="failed"}'] == 1
        finally:
            daemon.stop()


def test_swift_credentials_from_the_config_and_bytes_from_swift_counted(local_swift,  # noqa: F811
                                                                        tmp_path):
    """A swift:// image with the credentials only in the config's [swift] section (not in
    the daemon's environment); /metrics counts what Swift's own access log says it sent."""
    data = random_bytes(2 * 1024 * 1024 + 11, seed=83)
    connection = local_swift.connection()
    connection.put_container("images")
    connection.put_object("images", "serve.raw", data)
    credentials = "".join(f"{name} = {value}\n" for name, value in local_swift.env().items())
    (tmp_path / "images").mkdir()
    port = free_port()
    config = write_config(tmp_path, listen=f"127.0.0.1:{port}", interface="lo", rate="200M",
                          gather=0.5, linger=2.0,
                          extra=f"[images]\nfromswift = swift://images/serve.raw\n"
                                f"[swift]\n{credentials}")
    mark = len(local_swift.access_lines())
    clean = {k: v for k, v in ENV.items() if not k.startswith(("ST_", "OS_"))}
    daemon = Daemon(tmp_path, config, f"http://127.0.0.1:{port}", env=clean)
    try:
        status, body = http(daemon.url, "/v1/sessions", TOKEN, {"image": "fromswift"})
        assert status == 200, body
        spec = json.loads(body)["spec"]
        (tmp_path / "spec.json").write_text(json.dumps(spec))
        code, _, err = finish(mcastdeploy("recv", "--session", str(tmp_path / "spec.json"),
                                          "--json", "--timeout", "30", "--progress", "none",
                                          str(tmp_path / "copy.raw")), timeout=DEADLINE)
        assert code == 0, f"{err}\n{daemon.text()}"
        assert sha256_file(tmp_path / "copy.raw") == hashlib.sha256(data).hexdigest()
        assert wait_for_ended(daemon.url, spec["session_id"])["state"] == "done"
        by_swift = local_swift.bytes_sent_for("images", "serve.raw", after=mark,
                                              at_least=len(data))
        metrics = parse_metrics(http(daemon.url, "/metrics", TOKEN)[1].decode())
        assert metrics["mcastdeploy_source_bytes_total"] == by_swift
    finally:
        daemon.stop()


def random_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def wait_for_ended(url: str, session_id: str, fetch=None) -> dict:
    """The session's view once it has ended (polled, bounded)."""
    deadline = time.monotonic() + 30
    while True:
        status = fetch() if fetch else json.loads(http(url, "/v1/status", TOKEN)[1])
        ended = [v for v in status["recent"] if v["session_id"] == session_id]
        if ended:
            return ended[0]
        assert time.monotonic() < deadline, f"session {session_id} did not end: {status}"
        time.sleep(0.3)


# -- in the rack ----------------------------------------------------------------------------

HEAD = "http://10.99.0.1:6780"


class RackHead:
    """A daemon on the rack's sender host, and agents on its receivers asking it for images."""

    def __init__(self, bed, directory, images: dict[str, int], rate: str, gather: float,
                 linger: float = 3.0) -> None:
        self.bed, self.directory = bed, directory
        (directory / "images").mkdir()
        self.sha = {name: write_random(directory / "images" / name, size, seed=len(name) + size)
                    for name, size in images.items()}
        config = write_config(directory, listen="0.0.0.0:6780", interface="eth0", rate=rate,
                              gather=gather, linger=linger)
        self.daemon = Daemon(directory, config, HEAD, rack=bed)
        self.agents: dict[str, dict[str, Any]] = {}

    def ask(self, host: str, image: str) -> dict:
        """``host`` asks for ``image`` (session new --rack-head) and starts receiving it."""
        spec_path = str(self.directory / f"{host}.json")
        self.bed.run(host, [sys.executable, "-m", "mcastdeploy", "session", "new",
                            "--rack-head", HEAD, "--image", image, "--agent", host,
                            "--token-file", str(self.directory / "token"), "-o", spec_path])
        with open(spec_path, encoding="utf-8") as handle:
            spec = json.load(handle)
        target = str(self.directory / f"{host}.raw")
        out, err = (open(str(self.directory / f"{host}.{kind}"), "w") for kind in ("out", "err"))
        with out, err:
            process = self.bed.exec(host, [sys.executable, "-m", "mcastdeploy", "recv",
                                           "--session", spec_path, "--json", "--timeout", "30",
                                           "--progress", "none", target],
                                    stdout=out, stderr=err, env=ENV)
        self.agents[host] = {"image": image, "spec": spec, "process": process,
                             "target": target}
        return spec

    def get(self, path: str, host: str = "r1") -> bytes:
        """GET ``path`` from the daemon, from inside ``host``'s namespace."""
        script = ("import sys, urllib.request; r = urllib.request.Request(sys.argv[1], "
                  "headers={'Authorization': 'Bearer ' + sys.argv[2]}); "
                  "sys.stdout.write(urllib.request.urlopen(r, timeout=10).read().decode())")
        return self.bed.run(host, [sys.executable, "-c", script, HEAD + path, TOKEN]
                            ).stdout.encode()

    def status(self) -> dict:
        return json.loads(self.get("/v1/status"))

    def wait_agents(self) -> dict[str, dict]:
        """Wait (bounded) for every agent; assert exit 0 and a byte-identical copy; their
        summaries."""
        deadline = time.monotonic() + DEADLINE
        summaries = {}
        for host, agent in self.agents.items():
            process = agent["process"]
            try:
                process.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
            err = (self.directory / f"{host}.err").read_text()
            assert process.returncode == 0, f"{host} exited {process.returncode}: " \
                                            f"{err[-1500:]}\n{self.daemon.text()[-3000:]}"
            summary = summaries[host] = json.loads(
                (self.directory / f"{host}.out").read_text().strip().splitlines()[-1])
            assert summary["ok"] and summary["sha256"] == self.sha[agent["image"]], summary
            assert sha256_file(agent["target"]) == self.sha[agent["image"]], host
        return summaries

    def check_status_against(self, summaries: dict[str, dict],
                             one_sender: bool = True) -> list[dict]:
        """The daemon's status and metrics say what the agents themselves said.
        ``one_sender``: False when a restarted daemon only heard the agents' later NACKs."""
        views = {}
        for host, agent in self.agents.items():
            session_id = agent["spec"]["session_id"]
            if session_id not in views:
                views[session_id] = wait_for_ended(HEAD, session_id, fetch=self.status)
        rows = {}
        for view in views.values():
            assert view["state"] == "done", view
            for row in view["agents"]:
                rows[row["name"]] = (view, row)
        for host, summary in summaries.items():
            view, row = rows[host]
            assert view["session_id"] == self.agents[host]["spec"]["session_id"]
            assert view["image"] == self.agents[host]["image"]
            assert row["state"] == "done" and row["progress"] == 1.0, row
            assert row["address"] == self.bed.address(host)
            # NACKs are never lost on the way up here (the bed drops at receivers' ingress):
            # what the sender heard each agent ask is what the agent says it asked.
            if one_sender:
                assert row["repairs_asked"] == summary["repairs_asked"], (host, row, summary)
            else:
                assert row["repairs_asked"] <= summary["repairs_asked"], (host, row, summary)
            # Where its blocks came from, as the agent counts the bytes it wrote.
            names = ("multicast", "peers", "source", "origin")
            assert row["source"] == "+".join(
                name for name in names if summary[f"bytes_from_{name}"]), (host, row, summary)
            spec = self.agents[host]["spec"]
            block_bytes = spec["symbol_size"] * spec["block_symbols"]
            for name in names:
                blocks = row["blocks_from"][name]
                assert (blocks - 1) * block_bytes < summary[f"bytes_from_{name}"] \
                    <= blocks * block_bytes or blocks == summary[f"bytes_from_{name}"] == 0, \
                    (host, name, row, summary)
            assert row["straggler"] == bool(summary["straggler"]), (host, row, summary)
        metrics = parse_metrics(self.get("/metrics").decode())
        asked = sum(s["repairs_asked"] for s in summaries.values())
        assert (metrics["mcastdeploy_repairs_asked_total"] == asked if one_sender
                else metrics["mcastdeploy_repairs_asked_total"] <= asked)
        assert metrics['mcastdeploy_sessions_ended_total{result="done"}'] >= len(views)
        assert metrics["mcastdeploy_multicast_bytes_total"] >= sum(
            os.path.getsize(self.directory / "images" / view["image"])
            for view in views.values())
        return list(views.values())

    def close(self) -> None:
        self.daemon.stop()


@pytest.fixture
def rack_head(rack, tmp_path):
    heads: list[RackHead] = []

    def build(receivers: int, **settings: Any) -> RackHead:
        head = RackHead(rack(receivers, rate="50mbit"), tmp_path, **settings)
        heads.append(head)
        return head

    yield build
    for head in heads:
        head.close()


def test_two_images_at_once_and_a_late_agent_joins(rack_head):
    """r1, r2 ask for image A; r3 asks for A while its session is in flight and joins it;
    r4, r5 ask for image B 5 s after the first; the two sessions share the budget."""
    budget = 10_000_000
    head = rack_head(5, images={"a.raw": 8 * 1024 * 1024 + 17, "b.raw": 3 * 1024 * 1024 + 5},
                     rate="10M", gather=1.5)
    started = time.monotonic()
    first = head.ask("r1", "a.raw")
    assert head.ask("r2", "a.raw")["session_id"] == first["session_id"]
    deadline = time.monotonic() + 20
    while True:  # A's pass well under way (about 3 s in at this rate)
        (view,) = head.status()["sessions"]
        if view["state"] == "sending" and view["bytes_done"] >= 0.15 * view["bytes_total"]:
            break
        assert time.monotonic() < deadline, view
        time.sleep(0.2)
    late = head.ask("r3", "a.raw")  # A is being multicast: r3 joins it
    assert late == first
    time.sleep(max(0.0, started + 5.0 - time.monotonic()))
    second = head.ask("r4", "b.raw")
    assert head.ask("r5", "b.raw")["session_id"] == second["session_id"] != first["session_id"]
    assert second["group"] != first["group"]

    # Both in flight at once, each with half the budget.
    shared = None
    deadline = time.monotonic() + 20
    while shared is None and time.monotonic() < deadline:
        sessions = head.status()["sessions"]
        if len(sessions) == 2 and all(v["state"] in ("sending", "repairing") for v in sessions):
            shared = sessions
        time.sleep(0.2)
    assert shared is not None, "the two sessions were never in flight together"
    assert [v["rate_bps"] for v in shared] == [budget // 2] * 2, shared
    # Agents' own rates (from their reports) are there, and none beyond what is sent.
    agent_rates = [a["rate_bps"] for v in shared for a in v["agents"]]
    assert all(0 <= rate <= 1.5 * budget for rate in agent_rates), shared
    metrics = parse_metrics(head.get("/metrics").decode())
    in_flight = {v["session_id"] for v in head.status()["sessions"]}
    rates = {name: value for name, value in metrics.items()
             if name.startswith("mcastdeploy_session_rate_bps{")}
    if len(in_flight) == 2:  # (one may have ended since)
        assert sorted(rates.values()) == [budget // 2] * 2, rates
        assert all(any(session in name for name in rates) for session in in_flight)
    assert metrics["mcastdeploy_rate_budget_bps"] == budget

    summaries = head.wait_agents()
    assert summaries["r3"]["repairs_asked"] > 0  # it really was late
    views = head.check_status_against(summaries)
    assert sorted(len(v["agents"]) for v in views) == [2, 3]
    log = head.daemon.text()
    for agent in head.agents.values():
        assert agent["spec"]["key"] not in log


def test_daemon_killed_and_restarted_mid_session(rack_head):
    """SIGKILL the daemon while it multicasts; started again, it resumes the session from
    its table with the same id, key and group, and every agent ends byte-identical."""
    head = rack_head(3, images={"c.raw": 6 * 1024 * 1024 + 9}, rate="8M", gather=1.0)
    spec = head.ask("r1", "c.raw")
    for host in ("r2", "r3"):
        assert head.ask(host, "c.raw") == spec
    deadline = time.monotonic() + 30
    while True:
        sessions = head.status()["sessions"]
        if sessions and sessions[0]["bytes_done"] >= 0.3 * sessions[0]["bytes_total"]:
            break
        assert time.monotonic() < deadline, sessions
        time.sleep(0.2)
    head.daemon.kill()
    time.sleep(1.0)
    head.daemon.start()
    assert f"event=session_resumed session={spec['session_id']}" in head.daemon.text()
    summaries = head.wait_agents()
    (view,) = head.check_status_against(summaries, one_sender=False)
    assert view["resumed"] and view["group"] == spec["group"]


def test_serve_with_a_bad_config_is_one_line(tmp_path):
    missing = str(tmp_path / "nowhere.ini")
    code, _, err = finish(mcastdeploy("serve", "--config", missing), timeout=30)
    assert code == 2 and "cannot read config" in err and len(err.strip().splitlines()) == 1
    loose = tmp_path / "loose.ini"
    loose.write_text(f"[serve]\ntoken = {TOKEN}\n")
    os.chmod(loose, 0o644)
    code, _, err = finish(mcastdeploy("serve", "--config", str(loose)), timeout=30)
    assert code == 2 and "chmod 600" in err and "Traceback" not in err, err


def test_status_watch_redraws_the_table(local_daemon, tmp_path):
    process = mcastdeploy("status", "--rack-head", local_daemon.url, "--token-file",
                          str(tmp_path / "token"), "--watch", "--interval", "0.3")
    time.sleep(2.0)
    process.send_signal(signal.SIGINT)
    code, out, err = finish(process, timeout=15)
    assert code == 0 and "Traceback" not in err, err
    assert out.count("budget 200.0Mbit/s, 0 sessions in flight") >= 2, out


@pytest.mark.parametrize("args, code, message", [
    (["session", "new", "--rack-head", "http://127.0.0.1:9"], 2, "needs --image"),
    (["session", "new", "--rack-head", "http://127.0.0.1:9", "--image", "x", "--group",
      "239.1.1.1"], 2, "rack head chooses"),
    (["session", "new", "--rack-head", "ftp://head", "--image", "x"], 1, "not an http"),
    (["session", "new", "--rack-head", "http://127.0.0.1:9", "--image", "x"], 1,
     "cannot reach rack head"),
    (["status", "--rack-head", "http://127.0.0.1:9"], 1, "cannot reach rack head"),
])
def test_rack_head_client_errors_are_one_line(args, code, message):
    env = dict(ENV, MCASTDEPLOY_TOKEN=TOKEN)
    process = subprocess.Popen([sys.executable, "-m", "mcastdeploy", *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env)
    returned, _, err = finish(process, timeout=30)
    assert returned == code and message in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_a_client_without_a_token_is_told_so():
    env = {k: v for k, v in ENV.items() if k != "MCASTDEPLOY_TOKEN"}
    process = subprocess.Popen([sys.executable, "-m", "mcastdeploy", "status", "--rack-head",
                                "http://127.0.0.1:9"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
    returned, _, err = finish(process, timeout=30)
    assert returned == 1 and "no API token" in err, err
