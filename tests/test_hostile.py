"""Bad input on the rack: a real transfer goes on, correct, while a host of the segment
attacks it (issue 4).

A sender and three receivers run the real command line in their namespaces, as in
tests/test_rack.py; a fourth receiver slot runs no receiver but tests/hostile_agent.py,
which sends at the group, at each receiver's unicast port and at the sender: another
key, another session, unsealed forgeries, truncated and oversized datagrams, wrong
versions and types, correctly sealed but malformed packets, DATA for blocks past the
image and ANNOUNCEs naming a reply address no NACK can go to, both impersonating the
sender, replays of what it heard, and thousands of NACKs.
A second agent in the sender's namespace replays what the receivers send the sender.

Every process must still exit 0 with the right SHA-256, write exactly the image, and
count the attack in its summary's ``rejected``.  Needs root.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import pytest
from helpers import write_random
from rack_fixtures import rack, rack_bed  # noqa: F401  (fixtures)
from rack_transfer import ENV, IMAGE_SIZE, LINK, Transfer, report

TESTS = os.path.dirname(os.path.abspath(__file__))
AGENT = os.path.join(TESTS, "hostile_agent.py")
AGENT_ENV = dict(ENV, PYTHONPATH=os.pathsep.join(
    [os.path.dirname(TESTS)] + [p for p in ENV.get("PYTHONPATH", "").split(os.pathsep) if p]))
RECEIVERS = 3
#: Bounds on the agents: ready (scapy loaded, every packet built), and finished.
READY_TIMEOUT = 30.0
AGENT_DEADLINE = 40.0


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> tuple[str, str]:
    path = tmp_path_factory.mktemp("hostile") / "image.raw"
    return str(path), write_random(path, IMAGE_SIZE, seed=4)


def unicast_port(bed, host: str, timeout: float = 10.0) -> int:
    """The ephemeral port ``host``'s receiver sends NACK/STATUS from (and listens on)."""
    address = bed.address(host)
    deadline = time.monotonic() + timeout
    while True:
        for line in bed.run(host, ["ss", "-Hnua"]).stdout.splitlines():
            words = line.split()
            local = next((w for w in words if w.startswith(address + ":")), None)
            if local is not None:
                return int(local.rsplit(":", 1)[1])
        assert time.monotonic() < deadline, f"{host} opened no unicast socket"
        time.sleep(0.05)


class Agent:
    """One hostile_agent.py process in a namespace; its report is its last stdout line."""

    def __init__(self, bed, host: str, directory, argv: list[str]) -> None:
        self.host = host
        self.out, self.err = (str(directory / f"agent-{host}.{k}") for k in ("out", "err"))
        with open(self.out, "w") as stdout, open(self.err, "w") as stderr:
            self.process = bed.exec(host, [sys.executable, AGENT, *argv,
                                           "--deadline", str(AGENT_DEADLINE)],
                                    stdout=stdout, stderr=stderr, env=AGENT_ENV)

    def lines(self) -> list[str]:
        with open(self.out, encoding="utf-8") as handle:
            return handle.read().splitlines()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while "ready" not in self.lines():
            assert self.process.poll() is None, f"agent in {self.host} died: {self.tail()}"
            assert time.monotonic() < deadline, f"agent in {self.host} not ready"
            time.sleep(0.05)

    def finish(self, timeout: float) -> dict[str, Any]:
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.terminate()  # it reports what it did so far and leaves
            self.process.wait(5)
        assert self.process.returncode == 0, f"agent in {self.host}: {self.tail()}"
        return json.loads(self.lines()[-1])

    def tail(self) -> str:
        with open(self.err, encoding="utf-8", errors="replace") as handle:
            return handle.read()[-2000:]


def test_transfer_survives_hostile_traffic(rack, tmp_path, image, record_property):
    bed = rack(RECEIVERS + 1, rate=LINK)
    hosts, attacker = bed.receivers[:RECEIVERS], bed.receivers[RECEIVERS]
    transfer = Transfer(bed, tmp_path, image, "hostile")
    transfer.receive(*hosts)
    ports = {host: unicast_port(bed, host) for host in hosts}
    sender_address = bed.address("sender")
    agents = [
        Agent(bed, attacker, transfer.directory, [
            "attacker", "--spec", transfer.spec_path, "--sender", sender_address,
            "--image-size", str(IMAGE_SIZE),
            *(f"--receiver={bed.address(h)}:{ports[h]}" for h in hosts)]),
        Agent(bed, "sender", transfer.directory, [
            "replayer", "--spec", transfer.spec_path, "--sender", sender_address,
            *(f"--receiver={bed.address(h)}" for h in hosts)]),
    ]
    for agent in agents:
        agent.wait_ready()
    transfer.send(min_receivers=RECEIVERS)
    transfer.wait()
    reports = {agent.host: agent.finish(timeout=10) for agent in agents}
    attack, replays = reports[attacker], reports["sender"]
    summaries = transfer.check(receivers_done=RECEIVERS)

    # The attack really happened, all of it while every receiver was still at work.
    assert attack["outcome"] == "done" and attack["send_errors"] == 0, attack
    first_done = min(transfer.peers[h].ended for h in hosts)
    assert attack["learnt"]["attack_to"] < first_done, attack
    assert attack["sent"].get("impersonated -> group") == 40, attack
    assert sum(n for k, n in attack["sent"].items() if k.startswith("flood")) >= 3000, attack
    assert replays["sent"].get("replayed -> sender", 0) >= 2, replays

    for host in hosts:
        rejected = summaries[host]["rejected"]
        assert rejected["unauthentic"] > 0, (host, rejected)
        assert rejected["replayed"] > 0, (host, rejected)
        assert rejected["invalid"] > 0, (host, rejected)
        assert rejected["foreign"] > 0, (host, rejected)
        # Not one byte outside the image, and every block written once.
        target = transfer.peers[host].target
        assert os.path.getsize(target) == IMAGE_SIZE
        assert summaries[host]["bytes_written"] == IMAGE_SIZE, summaries[host]
    sender = summaries["sender"]["rejected"]
    assert sender["unauthentic"] >= 1500, sender  # the forged half of the flood
    assert sender["invalid"] >= 1500, sender  # the sealed NACKs for absurd blocks
    assert sender["replayed"] > 0 and sender["foreign"] > 0, sender

    finish = [transfer.finished_after(h) for h in hosts]
    record_property("hostile_last_receiver_s", max(finish))
    started = transfer.sender_started
    report("hostile traffic", attack_from_s=attack["learnt"]["attack_from"] - started,
           attack_to_s=attack["learnt"]["attack_to"] - started,
           first_receiver_s=min(finish), last_receiver_s=max(finish),
           sender_s=summaries["sender"]["seconds"],
           repairs_sent=summaries["sender"]["repairs_sent"],
           frames_sent_by_attacker=attack["frames"],
           replays_at_sender=replays["sent"].get("replayed -> sender", 0),
           sender_rejected=json.dumps(sender),
           receiver_rejected=json.dumps(summaries[hosts[0]]["rejected"]))
