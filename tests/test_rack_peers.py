"""Stragglers in the rack (tools/rackbed.py): the real ``send`` and ``recv`` with peer
seeding (docs/peers.rst).  Needs root.

Finished receivers seed (``--seed-time``); stragglers -- late joiners, a receiver whose
group traffic nftables drops -- must finish from them, not from the sender; peers that
lie or die must not stop them or get a wrong byte written; with every peer gone the
source serves, as the last resort.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import write_random
from rack_fixtures import rack, rack_bed, rackbed  # noqa: F401  (fixtures)
from rack_transfer import LINK, Transfer, report

from mcastdeploy.spec import DEFAULT_PORT

#: Small: stragglers fetch it over 50 Mbit/s links in about a second.
IMAGE_SIZE = 6 * 1024 * 1024 + 333
SEED = ("--seed-time", "60")  # the seeders leave when the sender ends the session
HOSTILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hostile_seeder.py")
HTTP_OBJECTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "http_objects.py")


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> tuple[str, str]:
    path = tmp_path_factory.mktemp("rackpeers") / "image.raw"
    return str(path), write_random(path, IMAGE_SIZE, seed=17)


def start_then_finish(transfer: Transfer, early: list[str], total: int,
                      options: tuple[str, ...] = SEED) -> dict:
    """``early`` receive the whole pass and finish (seeding); the sender waits for
    ``total`` receivers, so it outlives them.  The sender's progress record once all of
    ``early`` are done and it has stopped sending data."""
    transfer.receive(*early, options=options)
    transfer.send(min_receivers=total, progress="json", wait=3, linger=20)
    return transfer.wait_progress(lambda r: r["receivers_done"] >= len(early)
                                  and r["state"] == "repairing", 40,
                                  "the early receivers did not finish")


def test_late_joiners_finish_from_peers_not_from_the_sender(rack, tmp_path, image,
                                                            record_property):
    bed = rack(16, rate=LINK)
    hosts = bed.receivers
    early, late = hosts[:12], hosts[12:]
    transfer = Transfer(bed, tmp_path, image, "late4", image_size=IMAGE_SIZE)
    before = start_then_finish(transfer, early, len(hosts))
    transfer.receive(*late, wait_joined=False)
    transfer.wait()
    summaries = transfer.check(receivers_done=len(hosts))

    sender = summaries["sender"]
    # Measured: what the sender sent from the moment the late ones started (ANNOUNCEs,
    # their manifests by unicast, PEERS) -- no image data.
    to_late = sender["bytes_sent"] - before["bytes_sent"]
    assert to_late < 0.01 * len(late) * IMAGE_SIZE, (to_late, sender)
    assert sender["source_bytes_served"] == 0
    assert 0 < sender["bytes_to_stragglers"] <= to_late
    for host in late:
        summary = summaries[host]
        assert summary["straggler"] == "joined after the multicast pass", summary
        assert summary["bytes_from_peers"] == IMAGE_SIZE, summary
        assert summary["bytes_from_multicast"] == summary["bytes_from_source"] == 0
    seeded = sum(summaries[h]["bytes_seeded"] for h in early)
    assert seeded == len(late) * IMAGE_SIZE
    # The tracker spread them: no seeder served more than two stragglers' worth.
    assert max(summaries[h]["bytes_seeded"] for h in early) <= 2 * IMAGE_SIZE
    last = max(transfer.finished_after(h) for h in late)
    record_property("late_last_s", last)
    report("4 late of 16 from peers", sender_bytes_to_late=to_late,
           peers_mb=seeded / 1e6, late_last_s=last,
           seeders_used=sum(1 for h in early if summaries[h]["bytes_seeded"]))


def test_receiver_behind_a_group_dropping_firewall_finishes_through_peers(rack, tmp_path,
                                                                         image):
    bed = rack(4, rate=LINK)
    *others, dead = bed.receivers
    transfer = Transfer(bed, tmp_path, image, "dead", image_size=IMAGE_SIZE)
    # The spec names the sender's unicast address: the only way to it without the group.
    transfer.spec = transfer.spec.replace(sender=f"{rackbed.SENDER_ADDRESS}:{DEFAULT_PORT + 1}")
    transfer.spec.save(transfer.spec_path)
    bed.drop_group(dead)
    transfer.receive(*others, options=SEED)
    transfer.receive(dead, wait_joined=False)
    transfer.send(min_receivers=len(bed.receivers), wait=10, linger=20)
    transfer.wait()
    summaries = transfer.check(receivers_done=len(bed.receivers))

    assert bed.counters(dead)["group"] > 100  # the multicast really was dropped
    summary = summaries[dead]
    assert summary["straggler"].startswith(("no multicast", "joined after")), summary
    assert summary["bytes_from_multicast"] == 0
    assert summary["bytes_from_peers"] == IMAGE_SIZE, summary
    assert summaries["sender"]["source_bytes_served"] == 0
    report("multicast-dead receiver", dead_s=transfer.finished_after(dead),
           others_last_s=max(transfer.finished_after(h) for h in others))


@pytest.mark.parametrize("fault, says", [("corrupt", "serving corrupted blocks"),
                                         ("die:8", "dying after 8 blocks")])
def test_lying_or_dying_peer_neither_stops_a_straggler_nor_gets_written(rack, tmp_path, image,
                                                                       fault, says):
    """Two seeders, one of them hostile (tests/hostile_seeder.py): the tracker lists both
    (lists of 2), and the straggler fetches from both at once from the start."""
    bed = rack(3, rate=LINK)
    honest, hostile, late = bed.receivers
    transfer = Transfer(bed, tmp_path, image, fault.replace(":", ""), image_size=IMAGE_SIZE)
    transfer.receive(honest, options=SEED)
    transfer.receive(hostile, options=SEED, command=[HOSTILE, fault])
    transfer.send(min_receivers=3, progress="json", wait=3, linger=20)
    transfer.wait_progress(lambda r: r["receivers_done"] >= 2 and r["state"] == "repairing",
                           40, "the seeders did not finish")
    transfer.receive(late, wait_joined=False)
    transfer.wait()

    assert says in transfer.peers[hostile].tail(), transfer.tails()
    if fault.startswith("die"):
        assert transfer.peers[hostile].process.returncode == 9, transfer.tails()
        del transfer.peers[hostile]  # it died on purpose; the others must be fine
    summaries = transfer.check(receivers_done=3)
    summary = summaries[late]
    # Every byte written was verified: nothing wrong was written and then overwritten.
    assert summary["bytes_written"] == IMAGE_SIZE, summary
    assert summary["bytes_from_peers"] == IMAGE_SIZE, summary
    assert summary["bytes_from_source"] == 0
    assert summaries[honest]["bytes_seeded"] > 0
    if fault == "corrupt":
        assert summary["peer_blocks_rejected"] >= 1, summary
        assert "does not match the manifest" in transfer.peers[late].tail(20000)
    else:
        assert summary["peer_blocks_rejected"] == 0, summary
        assert "failed" in transfer.peers[late].tail(20000)


def test_with_every_peer_gone_the_straggler_falls_back_to_the_source(rack, tmp_path, image):
    bed = rack(3, rate=LINK)
    *early, late = bed.receivers
    transfer = Transfer(bed, tmp_path, image, "source", image_size=IMAGE_SIZE)
    start_then_finish(transfer, early, 3)
    for host in early:  # listed by the tracker, but gone
        transfer.kill(host)
    transfer.receive(late, wait_joined=False)
    transfer.wait()
    summaries = transfer.check(receivers_done=3)
    summary = summaries[late]
    assert summary["bytes_from_source"] == IMAGE_SIZE, summary
    assert summary["bytes_from_peers"] == 0
    assert summaries["sender"]["source_bytes_served"] == IMAGE_SIZE
    assert "last resort" in transfer.peers[late].tail(20000)
    report("every peer gone", late_s=transfer.finished_after(late))


def test_with_peers_and_the_senders_block_server_gone_the_origin_serves(rack, tmp_path, image):
    """The last of the unicast resorts: ranged GETs of the image's URL (``recv --origin``,
    which the IPA plugin fills with Ironic's), served here from a finished peer's
    namespace, while the straggler's TCP to the sender is dropped."""
    bed = rack(3, rate=LINK)
    *early, late = bed.receivers
    transfer = Transfer(bed, tmp_path, image, "origin", image_size=IMAGE_SIZE)
    start_then_finish(transfer, early, 3)
    for host in early:  # listed by the tracker, but gone
        transfer.kill(host)
    origin = bed.exec(early[0], [sys.executable, HTTP_OBJECTS, image[0], bed.address(early[0])],
                      stdout=subprocess.PIPE, text=True)
    try:
        port = int(origin.stdout.readline())  # type: ignore[union-attr]
        bed.drop_tcp_to(late, rackbed.SENDER_ADDRESS)
        url = f"http://{bed.address(early[0])}:{port}/image.raw"
        transfer.receive(late, wait_joined=False, options=("--origin", url))
        transfer.wait()
    finally:
        origin.kill()
        origin.wait(10)
    summaries = transfer.check(receivers_done=3)
    summary = summaries[late]
    assert summary["bytes_from_origin"] == IMAGE_SIZE, summary
    assert summary["bytes_from_peers"] == summary["bytes_from_source"] == 0
    assert summaries["sender"]["source_bytes_served"] == 0
    assert "fetching from the image's origin" in transfer.peers[late].tail(20000)
    report("peers and block server gone: origin", late_s=transfer.finished_after(late))
