"""Running the real CLI on a rack (tools/rackbed.py): shared by test_rack and test_faults.

A :class:`Transfer` starts ``mcastdeploy recv``/``send`` in the rack's namespaces with
``--json``, waits for them (bounded), and checks exit codes, summaries and every copy's
SHA-256.  Fault tests also kill and restart peers mid-transfer, so a host may run more
than once; its earlier runs are kept (``Transfer.gone``) for their logs and summaries.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import pytest
from helpers import sha256_file

from mcastdeploy.spec import new_session

LINK = "50mbit"
#: 80 % of the link: headers fit, and tbf never has to drop what the sender paces out.
RATE_BPS = 40_000_000
IMAGE_SIZE = 12 * 1024 * 1024 + 777  # ~2.5 s at RATE_BPS; not a whole number of blocks
#: Longest any one transfer may take here before the test kills it and fails.
DEADLINE = 60.0
ENV = dict(os.environ, PYTHONUNBUFFERED="1")


@dataclass
class Peer:
    host: str
    process: Any  # subprocess.Popen
    out: str
    err: str
    target: Optional[str]
    started: float
    ended: Optional[float] = None

    def summary(self) -> dict[str, Any]:
        with open(self.out, encoding="utf-8") as handle:
            text = handle.read().strip()
        return json.loads(text.splitlines()[-1]) if text else {}

    def tail(self, chars: int = 1500) -> str:
        with open(self.err, encoding="utf-8", errors="replace") as handle:
            return handle.read()[-chars:]


class Transfer:
    """One session on a rack: receivers and a sender started by hand, timed, then checked."""

    def __init__(self, rack, directory, image: tuple[str, str], label: str,
                 image_size: int = IMAGE_SIZE) -> None:
        self.rack = rack
        self.directory = directory / label
        self.directory.mkdir()
        self.image, self.sha = image
        self.image_size = image_size
        self.spec = new_session(interface="eth0", rate_bps=RATE_BPS)
        self.spec_path = str(self.directory / "session.json")
        self.spec.save(self.spec_path)
        self.peers: dict[str, Peer] = {}
        #: Earlier runs of restarted hosts (killed), in the order they were replaced.
        self.gone: list[Peer] = []
        self.sender_started: Optional[float] = None

    def _start(self, host: str, argv: list[str], target: Optional[str],
               command: Optional[list[str]] = None) -> Peer:
        # A restarted host keeps the logs of its earlier runs: host.out, host.2.out ...
        runs = 1 + sum(1 for peer in self.gone if peer.host == host)
        stem = host if runs == 1 else f"{host}.{runs}"
        out, err = (str(self.directory / f"{stem}.{kind}") for kind in ("out", "err"))
        with open(out, "w") as stdout, open(err, "w") as stderr:
            process = self.rack.exec(host, [sys.executable,
                                            *(command or ["-m", "mcastdeploy"]), *argv],
                                     stdout=stdout, stderr=stderr, env=ENV)
        peer = Peer(host, process, out, err, target, time.monotonic())
        self.peers[host] = peer
        return peer

    def target_of(self, host: str) -> str:
        """Where ``host`` writes its copy (prepare it there before ``receive``)."""
        return str(self.directory / f"{host}.raw")

    def receive(self, *hosts: str, wait_joined: bool = True, timeout: float = 30.0,
                resume: bool = False, options: tuple[str, ...] = (),
                command: Optional[list[str]] = None) -> None:
        """``recv`` on each host (``options`` added; ``command`` replaces
        ``-m mcastdeploy``, e.g. a test's hostile variant)."""
        for host in hosts:
            target = self.target_of(host)
            self._start(host, ["recv", "--session", self.spec_path, "--json", "--timeout",
                               f"{timeout:g}", "--progress", "none", *options,
                               *(["--resume"] if resume else []), target], target, command)
        if wait_joined:  # every receiver listening before the sender starts: fair timing
            self.rack.wait_joined(hosts, self.spec.group, timeout=15)

    def send(self, min_receivers: int, progress: str = "none",
             linger: Optional[float] = None, wait: float = 30.0) -> Peer:
        options = [] if linger is None else ["--linger", f"{linger:g}"]
        peer = self._start("sender", ["send", "--session", self.spec_path,
                                      "--min-receivers", str(min_receivers),
                                      "--wait", f"{wait:g}",
                                      *options, "--json", "--progress", progress,
                                      self.image], None)
        if self.sender_started is None:  # a restarted sender: times count from the first
            self.sender_started = peer.started
        return peer

    def kill(self, host: str) -> Peer:
        """SIGKILL ``host``'s process (no goodbye on the wire) and wait for it, bounded."""
        peer = self.peers.pop(host)
        peer.process.send_signal(signal.SIGKILL)
        peer.process.wait(10)
        peer.ended = time.monotonic()
        self.gone.append(peer)
        return peer

    def wait_sent(self, fraction: float, timeout: float = 30.0) -> float:
        """Wait (bounded) until the sender's pass (``progress="json"``) has sent
        ``fraction`` of the image; returns the fraction it had reached."""
        record = self.wait_progress(lambda r: r.get("state") == "sending"
                                    and r["bytes_done"] >= fraction * self.image_size,
                                    timeout, "the pass did not get there")
        return record["bytes_done"] / self.image_size

    def wait_progress(self, reached: Callable[[dict[str, Any]], bool], timeout: float = 30.0,
                      what: str = "the sender's progress did not get there") -> dict[str, Any]:
        """Wait (bounded) for the first progress record of the sender
        (``progress="json"``) for which ``reached`` is true; returns it."""
        sender = self.peers["sender"]
        deadline = time.monotonic() + timeout
        offset, pending = 0, ""
        while True:
            assert time.monotonic() < deadline, f"{what}\n{self.tails()}"
            assert sender.process.poll() is None, f"the sender ended early\n{self.tails()}"
            time.sleep(0.02)
            with open(sender.err, encoding="utf-8") as handle:
                handle.seek(offset)
                pending += handle.read()
                offset = handle.tell()
            *lines, pending = pending.split("\n")  # keep a line still being written
            for line in lines:
                if line.startswith("{") and line.endswith("}"):
                    record = json.loads(line)
                    if reached(record):
                        return record

    def _note_ends(self, now: float) -> None:
        for peer in self.peers.values():
            if peer.ended is None and peer.process.poll() is not None:
                peer.ended = now

    def watch(self, seconds: float) -> None:
        """Sleep ``seconds`` while a fault lasts, still noting when processes end."""
        until = time.monotonic() + seconds
        while (now := time.monotonic()) < until:
            self._note_ends(now)
            time.sleep(min(0.005, until - now))

    def wait(self) -> None:
        """Wait (bounded) for every process, noting when each one ended."""
        deadline = time.monotonic() + DEADLINE
        while any(p.ended is None for p in self.peers.values()):
            now = time.monotonic()
            self._note_ends(now)
            if now > deadline:
                for peer in self.peers.values():
                    if peer.process.poll() is None:
                        peer.process.kill()
                        peer.process.wait(5)
                pytest.fail(f"transfer still running after {DEADLINE:g} s\n{self.tails()}")
            time.sleep(0.005)

    def finished_after(self, host: str) -> float:
        """Seconds from the (first) sender's start to ``host``'s exit."""
        assert self.sender_started is not None
        return self.peers[host].ended - self.sender_started  # type: ignore[operator]

    def tails(self) -> str:
        return "\n".join(f"--- {p.host} exit {p.process.returncode}, stderr tail:\n{p.tail()}"
                         for p in [*self.gone, *self.peers.values()])

    def check_receivers(self) -> dict[str, dict[str, Any]]:
        """Assert every (current) receiver's exit code, summary and copy; their summaries."""
        summaries = {}
        for host, peer in self.peers.items():
            if peer.target is None:
                continue
            assert peer.process.returncode == 0, f"{host} exited {peer.process.returncode}\n" \
                                                 f"{self.tails()}"
            summary = summaries[host] = peer.summary()
            assert summary.get("ok") is True, f"{host}: {summary}\n{self.tails()}"
            assert summary["role"] == "recv"
            assert summary["sha256"] == self.sha, f"{host}: {summary}"
            assert summary["bytes"] == self.image_size
            assert sha256_file(peer.target) == self.sha, f"{host}'s copy differs"
        return summaries

    def run(self, *hosts: str) -> dict[str, dict[str, Any]]:
        """The whole plain transfer: ``hosts`` receive, the sender waits for all of them,
        everything ends and is checked; the summaries by host."""
        self.receive(*hosts)
        self.send(min_receivers=len(hosts))
        self.wait()
        return self.check(receivers_done=len(hosts))

    def check(self, receivers_done: int) -> dict[str, dict[str, Any]]:
        """Assert exit codes, summaries and copies; return the summaries by host."""
        summaries = self.check_receivers()
        peer = self.peers["sender"]
        assert peer.process.returncode == 0, f"sender exited {peer.process.returncode}\n" \
                                             f"{self.tails()}"
        sender = summaries["sender"] = peer.summary()
        assert sender.get("ok") is True, f"sender: {sender}\n{self.tails()}"
        assert sender["role"] == "send"
        assert sender["sha256"] == self.sha, f"sender: {sender}"
        assert sender["bytes"] == self.image_size
        assert sender["receivers"] == receivers_done, f"{sender}\n{self.tails()}"
        assert sender["receivers_done"] == receivers_done, f"{sender}\n{self.tails()}"
        return summaries


def assert_bed_dropped(bed, host: str, loss: float) -> None:
    """The bed really dropped about ``loss`` % of what reached ``host`` (none at 0)."""
    counted = bed.counters(host)
    if not loss:
        assert counted["loss"] == 0, (host, counted)
        return
    share = counted["loss"] / max(1, counted["seen"])
    assert 0.5 * loss / 100 < share < 1.6 * loss / 100, (host, counted)


def report(what: str, **numbers: Any) -> str:
    line = f"rack {what}: " + ", ".join(
        f"{key} {value:.2f}" if isinstance(value, float) else f"{key} {value}"
        for key, value in numbers.items())
    print(line)
    return line
