"""Keyed sessions: sender and receiver seal everything they send and refuse, uncounted as
traffic and unparsed, whatever does not open with the session key (protocol/intake.py)."""

from __future__ import annotations

import hashlib
import random

import pytest

from mcastdeploy import wire
from mcastdeploy.protocol.receiver import Receiver, ReceiverConfig, ReceiverPhase
from mcastdeploy.protocol.sender import Sender, SenderConfig
from mcastdeploy.sim import LossModel, Simulation

SID = 0x5EED
KEY = bytes(range(32))
IMAGE = random.Random(9).randbytes(200_000)


def keyed_sender(key: bytes = KEY, encrypt: bool = False, receivers: int = 3) -> Sender:
    config = SenderConfig(session_id=SID, group=("239.1.1.1", 1), rate_bps=50e6, symbol_size=512,
                          block_symbols=16, min_receivers=receivers, wait=2.0, key=key,
                          encrypt=encrypt)
    return Sender(config, len(IMAGE), origin=1, checksum=hashlib.sha256(IMAGE).digest())


def keyed_receiver(index: int, key: bytes = KEY, encrypt: bool = False,
                   timeout: float = 30.0) -> Receiver:
    return Receiver(ReceiverConfig(session_id=SID, key=key, encrypt=encrypt, timeout=timeout),
                    origin=100 + index, rng=random.Random(index))


@pytest.mark.parametrize("encrypt", [False, True])
def test_keyed_session_delivers_the_image_through_loss(encrypt: bool) -> None:
    sender = keyed_sender(encrypt=encrypt)
    nodes = {f"r{i}": keyed_receiver(i, encrypt=encrypt) for i in range(3)}
    result = Simulation(sender, IMAGE, nodes, LossModel(seed=2, loss=0.05)).run(until=60)
    assert result.failures == {}
    assert all(copy == IMAGE for copy in result.images.values())
    assert sender.stats.repair_packets > 0  # NACKs, sealed, were opened and answered
    for node in nodes.values():
        assert node.stats.unauthentic_packets == node.stats.replayed_packets == 0
    assert sender.stats.unauthentic_packets == 0


def test_a_receiver_with_another_key_writes_nothing_and_says_why() -> None:
    sender = keyed_sender(receivers=1)
    good = keyed_receiver(0)
    wrong = keyed_receiver(1, key=bytes(32), timeout=3.0)
    result = Simulation(sender, IMAGE, {"good": good, "wrong": wrong},
                        LossModel(seed=1, loss=0.0)).run(until=30)
    assert result.images["good"] == IMAGE
    assert not any(result.images["wrong"])  # not one byte written
    assert wrong.phase is ReceiverPhase.FAILED and wrong.blocks_done == 0
    assert wrong.stats.unauthentic_packets > 0 and wrong.stats.data_packets == 0
    assert "failed authentication" in result.failures["wrong"]
    # It never heard an ANNOUNCE it could open, so it never joined: the sender saw nobody.
    assert len(sender.receivers) == 1 and wrong.stats.nacks_sent == 0


def pump(sender: Sender, receiver: Receiver, now: float) -> list[bytes]:
    """Hand everything the sender sends now to the receiver, and back; return what it sent."""
    sent = [data for data, _ in sender.datagrams_to_send(now)]
    for data in sent:
        receiver.receive_datagram(data, ("10.0.0.9", 7000), now)
    for data, _ in receiver.datagrams_to_send(now):
        sender.receive_datagram(data, ("10.0.0.1", 5000), now)
    return sent


def started_pair() -> tuple[Sender, Receiver, list[bytes], float]:
    sender, receiver = keyed_sender(receivers=1), keyed_receiver(0)
    sender.start(0.0)
    receiver.start(0.0)
    sent: list[bytes] = []
    now = 0.0
    while now < 1.0 and sender.stats.source_packets < 40:
        for block in sender.blocks_wanted():
            start = sender.geometry.offset(block)
            sender.supply_block(block, IMAGE[start:start + sender.geometry.block_length(block)])
        sent += pump(sender, receiver, now)
        receiver.handle_timer(now)
        sender.handle_timer(now)
        now += 0.001
    assert sender.stats.source_packets >= 40 and receiver.stats.data_packets > 0
    return sender, receiver, sent, now


def test_replayed_datagrams_are_refused_before_they_count() -> None:
    sender, receiver, sent, now = started_pair()
    before = (receiver.stats.data_packets, receiver.stats.duplicate_packets,
              receiver.stats.packets_received)
    for data in sent:
        receiver.receive_datagram(data, ("10.0.0.9", 7000), now)
    assert receiver.stats.replayed_packets == len(sent)
    assert (receiver.stats.data_packets, receiver.stats.duplicate_packets,
            receiver.stats.packets_received) == before


def test_forged_packets_change_nothing() -> None:
    sender, receiver, _, now = started_pair()
    blocks_done, requested = receiver.blocks_done, sender.stats.repairs_requested
    # Unsealed, well-formed packets of our session, as anyone on the segment could send.
    forged_data = wire.encode_data_header(SID, 1, 0, 0) + bytes(512)
    forged_end = wire.encode(SID, 1, wire.End())
    forged_nack = wire.encode(SID, 555, wire.Nack(((0, 16),)))
    for data in (forged_data, forged_end):
        receiver.receive_datagram(data, ("10.0.0.66", 7000), now)
    sender.receive_datagram(forged_nack, ("10.0.0.66", 5000), now)
    assert receiver.stats.unauthentic_packets == 2
    assert receiver.phase is ReceiverPhase.RECEIVING and receiver.blocks_done == blocks_done
    assert sender.stats.unauthentic_packets == 1
    assert sender.stats.repairs_requested == requested and 555 not in sender.receivers
