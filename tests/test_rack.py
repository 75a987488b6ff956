"""The real CLI on the rack test bed: a sender and receivers in their own namespaces.

Every host has its own network namespace on one Linux bridge (tools/rackbed.py); links
are capped with tbf at 50 Mbit/s so that the network, not this machine's two cores, sets
the pace, and loss is nftables dropping packets at random as they reach a receiver.
Each test checks exit codes, the JSON summaries and every copy's SHA-256.  Needs root.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional

import pytest
from helpers import sha256_file, write_random
from rack_fixtures import rack, rack_bed, rackbed  # noqa: F401  (fixtures)

from mcastdeploy.spec import new_session

LINK = "50mbit"
#: 80 % of the link: headers fit, and tbf never has to drop what the sender paces out.
RATE_BPS = 40_000_000
IMAGE_SIZE = 12 * 1024 * 1024 + 777  # ~2.5 s at RATE_BPS; not a whole number of blocks
RECEIVERS = 8
#: Longest any one transfer may take here before the test kills it and fails.
DEADLINE = 60.0
ENV = dict(os.environ, PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> tuple[str, str]:
    path = tmp_path_factory.mktemp("rack") / "image.raw"
    return str(path), write_random(path, IMAGE_SIZE, seed=11)


@dataclass
class Peer:
    host: str
    process: subprocess.Popen
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

    def __init__(self, rack, directory, image: tuple[str, str], label: str) -> None:
        self.rack = rack
        self.directory = directory / label
        self.directory.mkdir()
        self.image, self.sha = image
        self.spec = new_session(interface="eth0", rate_bps=RATE_BPS)
        self.spec_path = str(self.directory / "session.json")
        self.spec.save(self.spec_path)
        self.peers: dict[str, Peer] = {}
        self.sender_started: Optional[float] = None

    def _start(self, host: str, argv: list[str], target: Optional[str]) -> Peer:
        out, err = (str(self.directory / f"{host}.{kind}") for kind in ("out", "err"))
        with open(out, "w") as stdout, open(err, "w") as stderr:
            process = self.rack.exec(host, [sys.executable, "-m", "mcastdeploy", *argv],
                                     stdout=stdout, stderr=stderr, env=ENV)
        peer = Peer(host, process, out, err, target, time.monotonic())
        self.peers[host] = peer
        return peer

    def receive(self, *hosts: str, wait_joined: bool = True) -> None:
        for host in hosts:
            target = str(self.directory / f"{host}.raw")
            self._start(host, ["recv", "--session", self.spec_path, "--json", "--timeout",
                               "30", "--progress", "none", target], target)
        if wait_joined:  # every receiver listening before the sender starts: fair timing
            self.rack.wait_joined(hosts, self.spec.group, timeout=15)

    def send(self, min_receivers: int, progress: str = "none") -> Peer:
        peer = self._start("sender", ["send", "--session", self.spec_path,
                                      "--min-receivers", str(min_receivers), "--wait", "30",
                                      "--json", "--progress", progress, self.image], None)
        self.sender_started = peer.started
        return peer

    def wait(self) -> None:
        """Wait (bounded) for every process, noting when each one ended."""
        deadline = time.monotonic() + DEADLINE
        while any(p.ended is None for p in self.peers.values()):
            now = time.monotonic()
            for peer in self.peers.values():
                if peer.ended is None and peer.process.poll() is not None:
                    peer.ended = now
            if now > deadline:
                for peer in self.peers.values():
                    if peer.process.poll() is None:
                        peer.process.kill()
                        peer.process.wait(5)
                pytest.fail(f"transfer still running after {DEADLINE:g} s\n{self.tails()}")
            time.sleep(0.005)

    def finished_after(self, host: str) -> float:
        """Seconds from the sender's start to ``host``'s exit."""
        assert self.sender_started is not None
        return self.peers[host].ended - self.sender_started  # type: ignore[operator]

    def tails(self) -> str:
        return "\n".join(f"--- {p.host} exit {p.process.returncode}, stderr tail:\n{p.tail()}"
                         for p in self.peers.values())

    def check(self, receivers_done: int) -> dict[str, dict[str, Any]]:
        """Assert exit codes, summaries and copies; return the summaries by host."""
        summaries = {}
        for host, peer in self.peers.items():
            assert peer.process.returncode == 0, f"{host} exited {peer.process.returncode}\n" \
                                                 f"{self.tails()}"
            summary = summaries[host] = peer.summary()
            assert summary.get("ok") is True, f"{host}: {summary}\n{self.tails()}"
            assert summary["sha256"] == self.sha, f"{host}: {summary}"
            assert summary["bytes"] == IMAGE_SIZE
            if peer.target is not None:
                assert summary["role"] == "recv"
                assert sha256_file(peer.target) == self.sha, f"{host}'s copy differs"
        sender = summaries["sender"]
        assert sender["role"] == "send"
        assert sender["receivers"] == receivers_done, f"{sender}\n{self.tails()}"
        assert sender["receivers_done"] == receivers_done, f"{sender}\n{self.tails()}"
        return summaries


def receivers_of(rack, count: int = RECEIVERS) -> list[str]:
    return rack.receivers[:count]


def report(what: str, **numbers: Any) -> str:
    line = f"rack {what}: " + ", ".join(
        f"{key} {value:.2f}" if isinstance(value, float) else f"{key} {value}"
        for key, value in numbers.items())
    print(line)
    return line


@pytest.mark.parametrize("loss", [0.0, 1.0, 5.0])
def test_eight_receivers_with_random_loss(rack, tmp_path, image, loss, record_property):
    bed = rack(RECEIVERS, rate=LINK, loss=loss)
    hosts = receivers_of(bed)
    transfer = Transfer(bed, tmp_path, image, "run")
    transfer.receive(*hosts)
    transfer.send(min_receivers=RECEIVERS)
    transfer.wait()
    summaries = transfer.check(receivers_done=RECEIVERS)

    for host in hosts:
        counted = bed.counters(host)
        if loss:  # the bed really dropped about what it was told to
            share = counted["loss"] / max(1, counted["seen"])
            assert 0.5 * loss / 100 < share < 1.6 * loss / 100, (host, counted)
        else:
            assert counted["loss"] == 0
    finish = [transfer.finished_after(h) for h in hosts]
    record_property("last_receiver_s", max(finish))
    report(f"{RECEIVERS} receivers at {loss:g} % loss", last_receiver_s=max(finish),
           first_receiver_s=min(finish), sender_s=summaries["sender"]["seconds"],
           repairs_sent=summaries["sender"]["repairs_sent"],
           wire_per_image=summaries["sender"]["bytes_sent"] / IMAGE_SIZE)


def test_one_lossy_receiver_does_not_slow_the_others(rack, tmp_path, image, record_property):
    """At a fixed rate the others wait for the data pass, so the pass's bytes on the wire,
    with and without the lossy receiver, measure the slow-down without trusting a clock
    that CI neighbours and disk flushes stretch.  The seconds are printed for the record."""
    bed = rack(RECEIVERS, rate=LINK)
    others, lossy = receivers_of(bed)[:-1], receivers_of(bed)[-1]

    alone = Transfer(bed, tmp_path, image, "without")
    alone.receive(*others)
    alone.send(min_receivers=len(others))
    alone.wait()
    quiet = alone.check(receivers_done=len(others))["sender"]
    base = [alone.finished_after(h) for h in others]

    bed.set_loss(lossy, 20.0)
    mixed = Transfer(bed, tmp_path, image, "with")
    mixed.receive(*others, lossy)
    mixed.send(min_receivers=RECEIVERS)
    mixed.wait()
    summaries = mixed.check(receivers_done=RECEIVERS)
    busy = summaries["sender"]
    slowed = [mixed.finished_after(h) for h in others]
    assert summaries[lossy]["repairs_asked"] > 0
    assert busy["repairs_sent"] > 0

    ratio = busy["pass_bytes_sent"] / quiet["pass_bytes_sent"]
    record_property("pass_ratio", ratio)
    line = report(
        "20 % loss on one receiver", pass_ratio=ratio, pass_mb_without=quiet["pass_bytes_sent"]
        / 1e6, pass_mb_with=busy["pass_bytes_sent"] / 1e6, pass_s_without=quiet["pass_seconds"],
        pass_s_with=busy["pass_seconds"], others_without_last_s=max(base),
        others_with_last_s=max(slowed), others_with_median_s=statistics.median(slowed),
        lossy_s=mixed.finished_after(lossy), sent_mb_with=busy["bytes_sent"] / 1e6)
    # The slowest receiver must not set the pace: repair_share (2 %) bounds what its
    # repair adds to the pass.
    assert ratio <= 1.10, line


def test_late_joiner_catches_up(rack, tmp_path, image, record_property):
    bed = rack(RECEIVERS, rate=LINK)
    early, late = receivers_of(bed)[:-1], receivers_of(bed)[-1]
    transfer = Transfer(bed, tmp_path, image, "late")
    transfer.receive(*early)
    sender = transfer.send(min_receivers=len(early), progress="json")

    # Start the last receiver once the data pass is a fifth of the way through.
    deadline = time.monotonic() + 30
    position = 0
    while position < IMAGE_SIZE // 5:
        assert time.monotonic() < deadline, f"the pass did not start\n{transfer.tails()}"
        assert sender.process.poll() is None, f"the sender ended early\n{transfer.tails()}"
        time.sleep(0.02)
        with open(sender.err, encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("{") and line.endswith("}\n"):
                    record = json.loads(line)
                    if record.get("state") == "sending":
                        position = max(position, record["bytes_done"])
    transfer.receive(late, wait_joined=False)
    transfer.wait()
    summaries = transfer.check(receivers_done=RECEIVERS)

    # It really was late: what passed before it listened came back only as repair.
    assert summaries[late]["repairs_asked"] > 0, summaries[late]
    record_property("late_joiner_s", transfer.finished_after(late))
    report("late joiner", joined_at_fraction=position / IMAGE_SIZE,
           early_last_s=max(transfer.finished_after(h) for h in early),
           late_s=transfer.finished_after(late),
           late_repairs_asked=summaries[late]["repairs_asked"])


def test_snooping_bridge_with_querier(rack, tmp_path, image, record_property):
    bed = rack(RECEIVERS, rate=LINK, snooping=True, querier=True)
    members, bystander = receivers_of(bed)[:-1], receivers_of(bed)[-1]
    settings = bed.bridge_settings()
    assert settings["multicast_snooping"] == 1 and settings["multicast_querier"] == 1
    transfer = Transfer(bed, tmp_path, image, "snoop")
    transfer.receive(*members)

    wanted = {bed.host(h).port for h in members}
    deadline = time.monotonic() + 10
    while True:
        ports = {e.get("port") for e in bed.mdb() if e.get("grp") == transfer.spec.group}
        if ports >= wanted:
            break
        assert time.monotonic() < deadline, f"bridge learnt joins on {sorted(ports)} only"
        time.sleep(0.1)
    before = {h: bed.link_stats(h)["rx_packets"] for h in (members[0], bystander)}
    transfer.send(min_receivers=len(members))
    transfer.wait()
    transfer.check(receivers_done=len(members))

    received = {h: bed.link_stats(h)["rx_packets"] - before[h] for h in before}
    # Snooping really was in force: the port that never joined got none of the group.
    assert received[bystander] < received[members[0]] / 100, received
    record_property("snooping_last_receiver_s",
                    max(transfer.finished_after(h) for h in members))
    report("snooping + querier", last_receiver_s=max(transfer.finished_after(h)
                                                       for h in members),
           member_rx=received[members[0]], bystander_rx=received[bystander])


def test_rack_cli_up_status_loss_down(rack_bed, tmp_path):
    """tools/rack from another process: state survives between commands, down removes all."""
    tool = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "tools", "rack")
    name = f"md{os.urandom(3).hex()}"

    def cli(*args: str) -> str:
        result = subprocess.run([sys.executable, tool, *args], capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, result.stderr
        return result.stdout

    try:
        cli("up", "--name", name, "--receivers", "2", "--rate", LINK)
        cli("loss", "--name", name, "--host", "r2", "--percent", "12.5")
        status = json.loads(cli("status", "--name", name, "--json"))
        assert status["hosts"]["r2"]["loss_percent"] == 12.5
        assert status["hosts"]["r1"]["loss_percent"] == 0
        assert cli("exec", "--name", name, "--host", "r1", "--", "cat",
                   "/proc/sys/net/ipv6/conf/all/disable_ipv6").strip() == "1"
        assert "10.99.0.1/24" in cli("exec", "--name", name, "--host", "sender",
                                     "ip", "-br", "addr")
    finally:
        cli("down", "--name", name)
    assert not [ns for ns in rackbed.netns_list() if ns.startswith(name + "-")]
