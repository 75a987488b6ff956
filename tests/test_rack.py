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

import pytest
from helpers import write_random
from rack_fixtures import rack, rack_bed, rackbed  # noqa: F401  (fixtures)
from rack_transfer import IMAGE_SIZE, LINK, Transfer, assert_bed_dropped, report

RECEIVERS = 8


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> tuple[str, str]:
    path = tmp_path_factory.mktemp("rack") / "image.raw"
    return str(path), write_random(path, IMAGE_SIZE, seed=11)


def receivers_of(rack, count: int = RECEIVERS) -> list[str]:
    return rack.receivers[:count]


@pytest.mark.parametrize("loss", [0.0, 1.0, 5.0])
def test_eight_receivers_with_random_loss(rack, tmp_path, image, loss, record_property):
    bed = rack(RECEIVERS, rate=LINK, loss=loss)
    hosts = receivers_of(bed)
    transfer = Transfer(bed, tmp_path, image, "run")
    summaries = transfer.run(*hosts)

    for host in hosts:
        assert_bed_dropped(bed, host, loss)
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
    quiet = alone.run(*others)["sender"]
    base = [alone.finished_after(h) for h in others]

    bed.set_loss(lossy, 20.0)
    mixed = Transfer(bed, tmp_path, image, "with")
    summaries = mixed.run(*others, lossy)
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
    transfer.send(min_receivers=len(early), progress="json")

    # Start the last receiver once the data pass is a fifth of the way through.
    position = transfer.wait_sent(0.2)
    transfer.receive(late, wait_joined=False)
    transfer.wait()
    summaries = transfer.check(receivers_done=RECEIVERS)

    # It really was late: what passed before it listened came back only as repair.
    assert summaries[late]["repairs_asked"] > 0, summaries[late]
    record_property("late_joiner_s", transfer.finished_after(late))
    report("late joiner", joined_at_fraction=position,
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
