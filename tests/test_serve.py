"""The rack-head daemon (``mcastdeploy serve``, issue 8) run as operators run it.

On loopback: requests without the token are refused; agents asking for one image share
one session and receive it.  In the rack of namespaces (tools/rackbed.py, needs root): two
images to two groups of agents at once, the second group asking 5 s after the first, with
an agent asking for the first image while it is in flight; the daemon killed (SIGKILL)
and restarted mid-session; and the status API and metrics checked against what the
agents themselves report.  Every copy is checked byte for byte (SHA-256).
"""

from __future__ import annotations

import json
import os
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
                 linger: float = 3.0) -> str:
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
[cache]
dir = cache
limit = 1G
""")
    os.chmod(path, 0o600)
    return str(path)


class Daemon:
    """``mcastdeploy serve`` as a process (in a rack host's namespace, or here); its log."""

    def __init__(self, directory, config: str, url: str, rack=None) -> None:
        self.directory, self.config, self.url, self.rack = directory, config, url, rack
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
                self.process = subprocess.Popen(argv, stdout=log, stderr=log, env=ENV,
                                                cwd=self.directory)
            else:
                self.process = self.rack.exec("sender", argv, stdout=log, stderr=log, env=ENV,
                                              cwd=self.directory)
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


@pytest.fixture
def local_daemon(tmp_path):
    (tmp_path / "images").mkdir()
    sha = write_random(tmp_path / "images" / "small.raw", 3 * 1024 * 1024 + 5, seed=81)
    port = free_port()
    config = write_config(tmp_path, listen=f"127.0.0.1:{port}", interface="lo", rate="200M",
                          gather=1.0, linger=2.0)
    daemon = Daemon(tmp_path, config, f"http://127.0.0.1:{port}")
    daemon.sha = sha
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
