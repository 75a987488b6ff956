"""A real OpenStack Swift on 127.0.0.1 for the source tests.

memcached, one-replica rings built with ``swift-ring-builder``, and the account, container,
object and proxy servers (tempauth, SLO, DLO), each its own process in the foreground so
that it is stopped by its PID. Every server logs (syslog over UDP on 127.0.0.1) to a socket
this module reads, so the proxy's access log (bytes it sent per request, from its
proxy-logging middleware) is Swift's own count of what a reader took, not ours.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Iterator, Optional

import pytest

ACCOUNT = "test"
USER = "tester"
KEY = "testing"
#: The proxy-logging line; "ACCESS" tells it from the servers' other messages.
_ACCESS_TEMPLATE = ("ACCESS {method} {status_int} {bytes_sent} {source} {path}")
_SERVERS = ("account", "container", "object")


def _bin(name: str) -> Optional[str]:
    """A Swift or memcached command: next to this interpreter (a venv) first, then PATH."""
    local = os.path.join(os.path.dirname(sys.executable), name)
    return local if os.access(local, os.X_OK) else shutil.which(name)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class AccessLine:
    method: str
    status: int
    bytes_sent: int
    source: str  # "-" for a client's own request, e.g. "SLO" for a middleware's subrequest
    path: str


class LocalSwift:
    """Swift in ``root`` (a temp dir it owns); ``start()`` then ``stop()``, or as a context."""

    def __init__(self) -> None:
        self.root = tempfile.mkdtemp(prefix="mcastdeploy-swift-")
        self.ports = {name: _free_port() for name in ("proxy", "memcached", *_SERVERS)}
        self.auth_url = f"http://127.0.0.1:{self.ports['proxy']}/auth/v1.0"
        self._processes: dict[str, subprocess.Popen] = {}
        self._lines: list[str] = []
        self._lines_lock = threading.Lock()
        self._log_socket: Optional[socket.socket] = None
        self._log_thread: Optional[threading.Thread] = None
        self._log_port = 0
        self._log_stop = threading.Event()

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> "LocalSwift":
        self._listen_for_logs()
        self._write_configs()
        self._build_rings()
        memcached = _bin("memcached")
        assert memcached is not None
        self._spawn("memcached", [memcached, "-l", "127.0.0.1", "-p",
                                  str(self.ports["memcached"]), "-U", "0", "-m", "16"]
                    + (["-u", "nobody"] if os.geteuid() == 0 else []))
        for name in _SERVERS:
            self._spawn(name, [_bin(f"swift-{name}-server"), self._conf(name)])
        self.start_proxy()
        return self

    def start_proxy(self) -> None:
        """(Re)start the proxy on its port and wait (bounded) until it answers."""
        self._spawn("proxy", [_bin("swift-proxy-server"), self._conf("proxy")])
        self._wait_healthy(time.monotonic() + 30)

    def stop_proxy(self) -> None:
        self._stop("proxy", signal.SIGKILL)

    def stop(self) -> None:
        for name in list(self._processes):
            self._stop(name, signal.SIGTERM)
        self._log_stop.set()
        if self._log_thread is not None:
            self._log_thread.join(5)
        if self._log_socket is not None:
            self._log_socket.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "LocalSwift":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- what the tests use ----------------------------------------------------------------

    def env(self) -> dict:
        """Environment for a tempauth (v1) client: what an operator would export."""
        return {"ST_AUTH": self.auth_url, "ST_USER": f"{ACCOUNT}:{USER}", "ST_KEY": KEY}

    def connection(self):
        import swiftclient
        return swiftclient.Connection(self.auth_url, f"{ACCOUNT}:{USER}", KEY, retries=2,
                                      timeout=30)

    def access_lines(self) -> list[AccessLine]:
        """The proxy's access log so far: one line per finished request."""
        with self._lines_lock:
            lines = list(self._lines)
        found = []
        for line in lines:
            at = line.find("ACCESS ")
            if at < 0:
                continue
            method, status, sent, source, path = line[at:].split(" ", 5)[1:]
            path = urllib.parse.unquote(path.split(" (txn: ")[0])  # syslog appends the txn
            found.append(AccessLine(method, int(status), 0 if sent == "-" else int(sent),
                                    source, path))
        return found

    def bytes_sent_for(self, container: str, obj: str, after: int = 0,
                       at_least: int = 0, wait: float = 10.0) -> int:
        """Bytes the proxy sent clients for GETs of one object, counting access lines from
        index ``after`` on. The proxy logs a request once its body is out, which can be just
        after the client has it: waits (at most ``wait`` s) for ``at_least`` bytes, then
        until the count stays put for 0.5 s, so that a surplus shows too."""
        suffix = f"/{container}/{obj}"
        deadline = time.monotonic() + wait
        last = -1
        while True:
            lines = self.access_lines()[after:]
            total = sum(line.bytes_sent for line in lines
                        if line.method == "GET" and line.source == "-"
                        and line.path.split("?")[0].endswith(suffix))
            if (total >= at_least and total == last) or time.monotonic() >= deadline:
                return total
            last = total
            time.sleep(0.5)

    def log_text(self) -> str:
        with self._lines_lock:
            return "\n".join(self._lines)

    # -- plumbing --------------------------------------------------------------------------

    def _conf(self, name: str) -> str:
        return os.path.join(self.root, f"{name}-server.conf")

    def _listen_for_logs(self) -> None:
        # UDP syslog: the one transport proxy-logging's own logger can be pointed at
        # (it copies log_udp_host, not log_address, from its config).
        self._log_socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._log_socket.bind(("127.0.0.1", 0))
        self._log_port = self._log_socket.getsockname()[1]
        self._log_socket.settimeout(0.2)  # so the reader notices stop() soon

        def read() -> None:
            assert self._log_socket is not None
            while not self._log_stop.is_set():
                try:
                    data = self._log_socket.recv(65536)
                except socket.timeout:
                    continue
                except OSError:
                    return
                with self._lines_lock:
                    self._lines.append(data.decode("utf-8", "replace").rstrip("\x00\n"))

        self._log_thread = threading.Thread(target=read, daemon=True, name="swift-log")
        self._log_thread.start()

    def _write_configs(self) -> None:
        devices = os.path.join(self.root, "srv")
        os.makedirs(os.path.join(devices, "d1"))
        with open(os.path.join(self.root, "swift.conf"), "w") as handle:
            handle.write("[swift-hash]\nswift_hash_path_prefix = mcastdeploy\n"
                         "swift_hash_path_suffix = tests\n\n"
                         "[storage-policy:0]\nname = one\ndefault = yes\n")
        common = (f"[DEFAULT]\nbind_ip = 127.0.0.1\nswift_dir = {self.root}\n"
                  f"devices = {devices}\nmount_check = false\ndisable_fallocate = true\n"
                  f"workers = 0\nlog_udp_host = 127.0.0.1\nlog_udp_port = {self._log_port}\n"
                  "log_level = INFO\n")
        for name in _SERVERS:
            with open(self._conf(name), "w") as handle:
                handle.write(common + f"bind_port = {self.ports[name]}\n\n"
                             f"[pipeline:main]\npipeline = {name}-server\n\n"
                             f"[app:{name}-server]\nuse = egg:swift#{name}\n\n"
                             f"[{name}-replicator]\n\n[{name}-updater]\n\n"
                             f"[{name}-auditor]\n")
        with open(self._conf("proxy"), "w") as handle:
            handle.write(
                common + f"bind_port = {self.ports['proxy']}\n\n"
                "[pipeline:main]\npipeline = catch_errors gatekeeper healthcheck "
                "proxy-logging cache listing_formats tempauth copy dlo slo proxy-logging "
                "proxy-server\n\n"
                "[app:proxy-server]\nuse = egg:swift#proxy\naccount_autocreate = true\n\n"
                f"[filter:tempauth]\nuse = egg:swift#tempauth\n"
                f"user_{ACCOUNT}_{USER} = {KEY} .admin\n\n"
                f"[filter:cache]\nuse = egg:swift#memcache\n"
                f"memcache_servers = 127.0.0.1:{self.ports['memcached']}\n\n"
                "[filter:proxy-logging]\nuse = egg:swift#proxy_logging\n"
                f"log_msg_template = {_ACCESS_TEMPLATE}\n\n"
                "[filter:catch_errors]\nuse = egg:swift#catch_errors\n\n"
                "[filter:gatekeeper]\nuse = egg:swift#gatekeeper\n\n"
                "[filter:healthcheck]\nuse = egg:swift#healthcheck\n\n"
                "[filter:listing_formats]\nuse = egg:swift#listing_formats\n\n"
                "[filter:copy]\nuse = egg:swift#copy\n\n"
                "[filter:dlo]\nuse = egg:swift#dlo\n\n"
                # Small segments allowed, so a test's SLO can have several.
                "[filter:slo]\nuse = egg:swift#slo\nmin_segment_size = 1\n")

    def _build_rings(self) -> None:
        builder = _bin("swift-ring-builder")
        for name in _SERVERS:
            path = os.path.join(self.root, f"{name}.builder")
            for args in (["create", "8", "1", "1"],
                         ["add", f"r1z1-127.0.0.1:{self.ports[name]}/d1", "100"],
                         ["rebalance"]):
                done = subprocess.run([builder, path, *args], capture_output=True,
                                      text=True, timeout=60)
                # rebalance exits 1 for warnings (one device is "unbalanced" by design).
                if done.returncode not in (0, 1):
                    raise RuntimeError(f"swift-ring-builder {args[0]}: {done.stdout}"
                                       f"{done.stderr}")
            if not os.path.exists(os.path.join(self.root, f"{name}.ring.gz")):
                raise RuntimeError(f"swift-ring-builder made no {name} ring")

    def _spawn(self, name: str, argv: list) -> None:
        output = open(os.path.join(self.root, f"{name}.out"), "ab")
        try:
            self._processes[name] = subprocess.Popen(argv, stdout=output,
                                                     stderr=subprocess.STDOUT,
                                                     stdin=subprocess.DEVNULL)
        finally:
            output.close()

    def _stop(self, name: str, how: signal.Signals) -> None:
        process = self._processes.pop(name, None)
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(how)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)

    def _wait_healthy(self, deadline: float) -> None:
        """Until the proxy answers and the account servers stand behind it."""
        url = f"http://127.0.0.1:{self.ports['proxy']}/healthcheck"
        while True:
            for name, process in self._processes.items():
                if process.poll() is not None:
                    with open(os.path.join(self.root, f"{name}.out"), "rb") as handle:
                        tail = handle.read()[-2000:].decode("utf-8", "replace")
                    raise RuntimeError(f"swift {name} exited {process.returncode}: {tail}")
            try:
                with urllib.request.urlopen(url, timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() >= deadline:
                raise RuntimeError("swift proxy did not answer within 30 s")
            time.sleep(0.1)


def swift_missing() -> Optional[str]:
    """Why a real Swift cannot run here, or None. Only absent software is a reason: in CI
    tools/bootstrap installs memcached (tools/apt-packages.txt) and swift (the test extra)."""
    try:
        import swift  # noqa: F401
        import swiftclient  # noqa: F401
    except ImportError as error:
        return f"{error.name} is not installed (pip install -e '.[test]')"
    for command in ("swift-proxy-server", "swift-ring-builder"):
        if _bin(command) is None:
            return f"{command} is not on PATH nor next to {sys.executable}"
    if _bin("memcached") is None:
        return "memcached is not installed (Debian package memcached; tools/bootstrap)"
    return None


@pytest.fixture(scope="module")
def local_swift() -> Iterator[LocalSwift]:
    """One Swift per test module: starting it costs a few seconds."""
    reason = swift_missing()
    if reason and os.environ.get("CI"):
        # CI runs tools/bootstrap, which installs both: missing there is a broken setup.
        pytest.fail(f"no local Swift in CI: {reason}")
    if reason:
        pytest.skip(f"no local Swift: {reason}")
    with LocalSwift() as swift:
        yield swift
