"""Peer seeding without sockets or a clock: the tracker, the peer byte protocol, and the
sender's and receivers' decisions about stragglers, stepped with explicit ``now``.

The rack tests (tests/test_rack_peers.py) run the same objects through the real drivers.
"""

from __future__ import annotations

import hashlib
import random

import pytest

from mcastdeploy import wire
from mcastdeploy.protocol import events
from mcastdeploy.protocol.manifest import SenderManifest, block_hash
from mcastdeploy.protocol.peering import (FRAME_HEAD, MAX_REQUEST_BLOCKS, BlockReceived,
                                          BlocksRequested, NotHeld, PeerClient, PeerError,
                                          PeerServer)
from mcastdeploy.protocol.receiver import Receiver, ReceiverConfig, ReceiverPhase, UnicastServer
from mcastdeploy.protocol.sender import Sender, SenderConfig, SenderState
from mcastdeploy.protocol.straggler import StragglerPolicy
from mcastdeploy.protocol.tracker import Tracker, TrackerConfig

SID = 0x5EED_0001
SECRET = bytes(range(32))
GROUP = ("239.1.2.3", 9000)
SENDER = ("10.0.0.9", 7000)
SOURCE_PORT = 7100


def drain(node) -> list:
    out = []
    while (event := node.next_event()) is not None:
        out.append(event)
    return out


# --- tracker ---------------------------------------------------------------------------


def seeded_tracker(seeders: int, **config) -> Tracker:
    tracker = Tracker(TrackerConfig(**config), rng=random.Random(1))
    for origin in range(1, seeders + 1):
        tracker.report(origin, f"10.0.0.{origin}", 7000 + origin, finished=True)
    return tracker


def test_tracker_lists_only_finished_receivers_that_seed() -> None:
    tracker = Tracker(rng=random.Random(0))
    tracker.report(1, "10.0.0.1", 7001, finished=True)
    tracker.report(2, "10.0.0.2", 0, finished=True)  # does not seed
    tracker.report(3, "10.0.0.3", 7003, finished=False)  # still receiving
    assert [peer.origin for peer in tracker.peers_for(99, 0.0)] == [1]
    tracker.report(1, "10.0.0.1", 0, finished=True)  # stopped seeding
    assert tracker.peers_for(99, 0.0) == []
    assert len(tracker) == 0


def test_tracker_lists_are_short_random_and_spread_within_the_cap() -> None:
    tracker = seeded_tracker(12, list_size=4, per_seeder=2)
    lists = [tracker.peers_for(straggler, 0.0) for straggler in range(100, 106)]
    assert all(len(peers) == 4 for peers in lists)
    load: dict[int, int] = {}
    for peers in lists:
        assert len({peer.origin for peer in peers}) == 4
        for peer in peers:
            load[peer.origin] = load.get(peer.origin, 0) + 1
    # 6 stragglers x 4 = 24 listings over 12 seeders at most 2 each: every one used twice.
    assert sorted(load.values()) == [2] * 12
    # Not everyone gets the same first peer: the lists are random.
    assert len({peers[0].origin for peers in lists}) > 1


def test_tracker_leases_cap_seeders_expire_and_are_renewed_by_the_same_straggler() -> None:
    tracker = seeded_tracker(1, list_size=4, per_seeder=1, lease=10.0)
    assert [p.origin for p in tracker.peers_for(100, 0.0)] == [1]
    # Busy with straggler 100: another gets none, and is told that all are busy ...
    assert tracker.peers_for(101, 1.0) == [] and tracker.all_busy(101, 1.0)
    # ... while 100 asking again renews its own lease.
    assert [p.origin for p in tracker.peers_for(100, 5.0)] == [1]
    assert tracker.peers_for(101, 14.0) == []  # renewed at 5 s: busy until 15 s
    assert [p.origin for p in tracker.peers_for(101, 15.0)] == [1]  # expired
    tracker.release(101)  # done: free at once
    assert [p.origin for p in tracker.peers_for(102, 15.0)] == [1]
    assert not seeded_tracker(0).all_busy(100, 0.0)  # none at all is not "busy"
    two = seeded_tracker(2, list_size=1, per_seeder=1, lease=10.0)
    first = two.peers_for(100, 0.0)[0].origin
    second = two.peers_for(101, 0.0)[0].origin
    assert first != second  # the free one, not the busy one


def test_tracker_excludes_failed_peers_and_the_straggler_itself() -> None:
    tracker = seeded_tracker(3, list_size=4)
    assert {p.origin for p in tracker.peers_for(2, 0.0)} == {1, 3}
    assert {p.origin for p in tracker.peers_for(100, 0.0, exclude=(1, 3))} == {2}
    tracker.forget(2)
    assert tracker.peers_for(100, 0.0, exclude=(1, 3)) == []


def test_tracker_refers_only_after_the_pass_with_seeders_and_much_missing() -> None:
    tracker = seeded_tracker(1, refer_share=0.25)
    assert tracker.should_refer(25, 100, pass_complete=True)
    assert not tracker.should_refer(24, 100, pass_complete=True)
    assert not tracker.should_refer(100, 100, pass_complete=False)
    assert not Tracker().should_refer(100, 100, pass_complete=True)  # no seeders


# --- the peer byte protocol ------------------------------------------------------------


def pair(encrypt: bool = False, block_bytes: int = 1000, *, client_secret: bytes = SECRET,
         client_session: int = SID) -> tuple[PeerClient, PeerServer]:
    client = PeerClient(client_secret, client_session, b"c" * 16, encrypt=encrypt,
                        block_bytes=block_bytes)
    server = PeerServer(SECRET, SID, b"s" * 16, encrypt=encrypt, block_bytes=block_bytes)
    return client, server


def pump(client: PeerClient, server: PeerServer, *, bytewise: bool = False) -> bytes:
    """Move bytes both ways until quiet; what the server sent, in order."""
    sent = b""
    for _ in range(20):
        to_server, to_client = client.data_to_send(), server.data_to_send()
        if not to_server and not to_client:
            break
        sent += to_client
        for chunks, node in ((to_server, server), (to_client, client)):
            pieces = [chunks[i:i + 1] for i in range(len(chunks))] if bytewise else [chunks]
            for piece in pieces:
                if piece:
                    node.receive_data(piece)
    return sent


@pytest.mark.parametrize("encrypt", [False, True])
@pytest.mark.parametrize("bytewise", [False, True])
def test_peer_exchange_round_trip(encrypt: bool, bytewise: bool) -> None:
    client, server = pair(encrypt)
    client.request(10, 3)  # before the hellos: sent once keys are agreed
    pump(client, server, bytewise=bytewise)
    assert client.established and server.established
    assert drain(server) == [BlocksRequested(10, 3)]
    server.send_block(10, b"x" * 1000)
    server.send_block(11, b"y" * 17)  # the last block of an image may be short
    server.send_not_held(12, 1)
    wire_bytes = pump(client, server, bytewise=bytewise)
    assert drain(client) == [BlockReceived(10, b"x" * 1000), BlockReceived(11, b"y" * 17),
                             NotHeld(12, 1)]
    assert (b"x" * 100 in wire_bytes) is not encrypt  # encrypted only when asked


@pytest.mark.parametrize("change", ["secret", "session"])
def test_peer_of_another_key_or_session_is_refused(change: str) -> None:
    if change == "secret":
        client, server = pair(client_secret=bytes(32))
    else:
        client, server = pair(client_session=SID + 1)
    client.request(0, 1)
    with pytest.raises(PeerError):
        pump(client, server)
    assert drain(server) == []  # nothing reported from a frame that did not open


def test_a_recorded_stream_cannot_be_replayed_to_a_new_connection() -> None:
    client, server = pair()
    client.request(0, 1)
    hello = pump(client, server)
    drain(server)
    server.send_block(0, b"z" * 1000)
    recorded = hello + pump(client, server)
    assert drain(client) == [BlockReceived(0, b"z" * 1000)]
    # A second connection of the same client: its nonce differs, so does the key.
    again = PeerClient(SECRET, SID, b"d" * 16, encrypt=False, block_bytes=1000)
    again.request(0, 1)
    with pytest.raises(PeerError, match="authentication"):
        again.receive_data(recorded)
    assert drain(again) == []


def test_tampered_frames_and_absurd_lengths_end_the_connection() -> None:
    client, server = pair()
    client.request(0, 1)
    pump(client, server)
    drain(server)
    server.send_block(0, b"a" * 1000)
    data = bytearray(server.data_to_send())
    data[FRAME_HEAD.size + 10] ^= 1
    with pytest.raises(PeerError, match="authentication"):
        client.receive_data(bytes(data))
    # A frame longer than any block is refused from its length alone, before buffering.
    other_client, other_server = pair()
    pump(other_client, other_server)
    with pytest.raises(PeerError, match="out of bounds"):
        other_client.receive_data(FRAME_HEAD.pack(10**8, 2))
    # A server takes only small requests.
    with pytest.raises(ValueError):
        other_client.request(0, MAX_REQUEST_BLOCKS + 1)
    with pytest.raises(PeerError, match="out of bounds"):
        other_server.receive_data(FRAME_HEAD.pack(5000, 1))


def test_hello_must_be_ours() -> None:
    client, server = pair()
    with pytest.raises(PeerError, match="not an mcastdeploy peer"):
        server.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(20))
    reflected = PeerClient(SECRET, SID, b"c" * 16, encrypt=False, block_bytes=1000)
    with pytest.raises(PeerError, match="echoed"):
        reflected.receive_data(reflected.data_to_send())  # its own hello sent back


# --- sender and receivers: who is a straggler, and what the tracker answers ------------


K, L = 4, 64
BLOCKS = 20


class Session:
    """A real Sender (with manifest, tracker and a source port) and what it sent."""

    def __init__(self, seed: int = 0, **config) -> None:
        self.image = random.Random(seed).randbytes(BLOCKS * K * L - 10)
        settings = dict(session_id=SID, group=GROUP, rate_bps=1e9, symbol_size=L,
                        block_symbols=K, proactive_repair=1, reply_host=SENDER[0],
                        reply_port=SENDER[1], linger=30.0, source_port=SOURCE_PORT,
                        min_receivers=5, wait=0.0)  # it outlives the receivers here
        settings.update(config)
        self.sender = Sender(SenderConfig(**settings), len(self.image), origin=0xA11CE,
                             checksum=hashlib.sha256(self.image).digest(),
                             manifest=SenderManifest(
                                 [block_hash(self.block(b)) for b in range(BLOCKS)]))
        self.sender.tracker = Tracker(self.sender.config.tracker, rng=random.Random(seed))
        self.now = 0.0
        self.sender.start(self.now)

    def block(self, block: int) -> bytes:
        return self.image[block * K * L:(block + 1) * K * L]

    def step(self, now: float) -> list[tuple[bytes, tuple]]:
        """The sender's turn at ``now``: timer, blocks, what it sends."""
        self.now = now
        timer = self.sender.get_timer()
        if timer is not None and timer <= now:
            self.sender.handle_timer(now)
        for block in self.sender.blocks_wanted():
            self.sender.supply_block(block, self.block(block))
        return self.sender.datagrams_to_send(now)

    def run_pass(self, until: float = 1.0) -> list[bytes]:
        """Step until the pass is complete; the group datagrams it sent."""
        group = []
        now = self.now
        while self.sender.state is SenderState.SENDING or self.sender.state is SenderState.WAITING:
            group += [d for d, addr in self.step(now) if addr == GROUP]
            now = max(now + 1e-4, self.sender.get_timer() or now)
            assert now < until
        return group

    def announce(self, now: float) -> bytes:
        """The next group ANNOUNCE."""
        for _ in range(100):
            for data, addr in self.step(now):
                if addr == GROUP and wire.parse(data).header.type is wire.PacketType.ANNOUNCE:
                    return data
            now += 0.1
        raise AssertionError("no ANNOUNCE")

    def deliver(self, receiver: Receiver, address: tuple, now: float) -> list[wire.Packet]:
        """What ``receiver`` sends goes to the sender; its unicast answers come back.
        Returns what the receiver sent."""
        sent = []
        for data, to in receiver.datagrams_to_send(now):
            assert to == SENDER
            sent.append(wire.parse(data))
            self.sender.receive_datagram(data, address, now)
        for data, to in self.step(now):
            if to == address:
                receiver.receive_datagram(data, SENDER, now)
        return sent


def make_receiver(seed: int = 0, **config) -> Receiver:
    return Receiver(ReceiverConfig(session_id=SID, **config), origin=0xB0B0 + seed,
                    rng=random.Random(seed))


def seeder(session: Session, group: list[bytes], address: tuple, port: int,
           seed: int = 1) -> Receiver:
    """A receiver that got the whole pass and reported done, seeding at ``port``."""
    receiver = make_receiver(seed, seed_port=port)
    receiver.start(0.0)
    for data in group:
        receiver.receive_datagram(data, SENDER, session.now)
    for event in drain(receiver):
        if isinstance(event, events.AllBlocksDecoded):
            receiver.image_verified(hashlib.sha256(session.image).digest(), session.now)
    assert receiver.phase is ReceiverPhase.DONE
    session.deliver(receiver, address, session.now)
    return receiver


def test_late_joiner_is_a_straggler_and_gets_peers_hashes_and_the_source() -> None:
    session = Session()
    group = session.run_pass()
    seeder(session, group, ("10.0.0.21", 5000), 7021)
    late = make_receiver(5)
    late.start(1.0)
    late.receive_datagram(session.announce(1.0), SENDER, 1.0)
    assert late.straggler == "joined after the multicast pass"
    late.handle_timer(1.0)
    sent = session.deliver(late, ("10.0.0.30", 5000), 1.0)
    kinds = {type(p.body) for p in sent}
    assert wire.PeerRequest in kinds
    manifest_asks = [p for p in sent if isinstance(p.body, wire.Nack)]
    assert manifest_asks and all(p.header.flags & wire.Flags.REPLY for p in manifest_asks)
    offered = [e for e in drain(late) if isinstance(e, events.PeersOffered)]
    assert offered == [events.PeersOffered(
        "joined after the multicast pass", (wire.PeerAddress("10.0.0.21", 7021, 0xB0B1),),
        (SENDER[0], SOURCE_PORT))]
    # The hashes came by unicast: enough to check blocks from peers.
    assert late.manifest is not None and late.manifest.hash_of(0) is not None
    assert session.sender.stats.peer_requests == 1
    # While peers serve it, it asks the sender for no symbols.
    for now in (1.5, 3.0, 6.0):
        late.handle_timer(now)
        assert not [p for p in session.deliver(late, ("10.0.0.30", 5000), now)
                    if isinstance(p.body, wire.Nack) and not p.header.flags & wire.Flags.MANIFEST]


def test_blocks_from_peers_are_checked_against_the_manifest() -> None:
    session = Session()
    session.run_pass()
    late = make_receiver(5)
    late.start(1.0)
    late.receive_datagram(session.announce(1.0), SENDER, 1.0)
    assert late.offer_block(0, session.block(0), 1.0) is None  # no hash yet: not usable
    late.handle_timer(1.0)
    session.deliver(late, ("10.0.0.30", 5000), 1.0)
    drain(late)
    bad = bytearray(session.block(1))
    bad[5] ^= 0xFF
    assert late.offer_block(1, bytes(bad), 1.1) is False
    assert late.offer_block(1, session.block(1)[:-1], 1.1) is False  # wrong length
    assert drain(late) == []  # nothing handed over to be written
    assert late.offer_block(1, session.block(1), 1.2) is True
    decoded = drain(late)
    assert [(e.block, bytes(e.data)) for e in decoded] == [(1, session.block(1))]
    assert late.offer_block(1, session.block(1), 1.3) is None  # already done
    assert late.stats.peer_blocks_rejected == 2
    assert late.stats.blocks_from == {UnicastServer.PEER: 1, UnicastServer.SOURCE: 0,
                                      UnicastServer.ORIGIN: 0}
    # Who served each block is counted, and the receiver's reports tell the sender.
    late.offer_block(0, session.block(0), 1.4, UnicastServer.ORIGIN)
    late.offer_block(2, session.block(2), 1.4, UnicastServer.SOURCE)
    for block in range(BLOCKS):
        late.offer_block(block, session.block(block), 1.4)
    assert any(isinstance(e, events.AllBlocksDecoded) for e in drain(late))
    stats = late.stats
    assert stats.blocks_from == {UnicastServer.PEER: BLOCKS - 2, UnicastServer.SOURCE: 1,
                                 UnicastServer.ORIGIN: 1}
    late.image_verified(hashlib.sha256(session.image).digest(), 1.5)
    session.deliver(late, ("10.0.0.30", 5000), 1.5)
    record = next(r for r in session.sender.receivers.values()
                  if r.address == ("10.0.0.30", 5000))
    assert record.done and (record.blocks_from_peers, record.blocks_from_source,
                            record.blocks_from_origin) == (BLOCKS - 2, 1, 1)


def test_receiver_that_missed_much_of_the_pass_is_a_straggler_one_that_missed_little_not() -> None:
    session = Session()
    group = session.run_pass()
    data = [d for d in group if wire.parse(d).header.type is wire.PacketType.DATA]
    first_data = group.index(data[0])
    announces = [d for d in group if wire.parse(d).header.type is wire.PacketType.ANNOUNCE]
    for share, straggles in ((0.5, True), (0.9, False)):
        receiver = make_receiver(7)
        receiver.start(0.0)
        receiver.receive_datagram(announces[0], SENDER, 0.0)
        cut = first_data + int(share * len(data))
        for datagram in group[:first_data] + group[first_data:cut]:  # then a dead link
            receiver.receive_datagram(datagram, SENDER, 0.1)
        receiver.receive_datagram(session.announce(0.5), SENDER, 0.5)
        assert (receiver.straggler is not None) is straggles, share
        if straggles:
            assert receiver.straggler.startswith("missed")


def test_multicast_dead_receiver_joins_by_unicast_and_turns_to_peers() -> None:
    policy = StragglerPolicy(group_silence=2.0)
    session = Session(min_receivers=3, wait=10.0)  # gathering receivers throughout
    dead = make_receiver(9, sender_hint=SENDER, straggler=policy)
    dead.start(0.0)
    dead.handle_timer(0.0)
    first = session.deliver(dead, ("10.0.0.40", 5000), 0.0)
    # Before any ANNOUNCE it reports to the spec's address, asking for a unicast answer ...
    assert [type(p.body) for p in first] == [wire.Status]
    assert first[0].header.flags & wire.Flags.REPLY
    # ... and joins from the sender's unicast ANNOUNCE, without the group.
    assert dead.phase is ReceiverPhase.RECEIVING
    joined_at = 0.0
    # The group stays silent; the STATUS it keeps sending is answered by unicast.
    now = 0.0
    asked: list[wire.Packet] = []
    while dead.straggler is None:
        now = dead.get_timer()
        assert now is not None and now < joined_at + 5.0
        dead.handle_timer(now)
        asked = session.deliver(dead, ("10.0.0.40", 5000), now)
    assert dead.straggler.startswith("no multicast from the sender")
    assert now >= joined_at + policy.group_silence
    # It asks for peers at once, and gets the sender's answer by unicast.
    assert any(isinstance(p.body, wire.PeerRequest) for p in asked)
    assert [e for e in drain(dead) if isinstance(e, events.PeersOffered)]
    # A receiver that hears the group is never taken for multicast-dead.
    alive = make_receiver(10, sender_hint=SENDER, straggler=policy)
    alive.start(0.0)
    alive.handle_timer(0.0)
    session.deliver(alive, ("10.0.0.41", 5000), 0.0)
    for now in (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0):
        alive.receive_datagram(session.announce(now), SENDER, now)
        alive.handle_timer(now)
        session.deliver(alive, ("10.0.0.41", 5000), now)
    assert alive.straggler is None


def test_with_no_peer_and_no_source_a_straggler_falls_back_to_multicast_repair() -> None:
    session = Session(source_port=0)
    session.run_pass()
    late = make_receiver(5)
    late.start(1.0)
    late.receive_datagram(session.announce(1.0), SENDER, 1.0)
    late.handle_timer(1.0)
    session.deliver(late, ("10.0.0.30", 5000), 1.0)
    assert [e for e in drain(late) if isinstance(e, events.PeersOffered)] == [
        events.PeersOffered("joined after the multicast pass", (), None)]
    nacked = False
    now = 1.0
    while not nacked:
        now = late.get_timer()
        assert now is not None and now < 4.0
        late.handle_timer(now)
        nacked = any(isinstance(p.body, wire.Nack) and not p.header.flags & wire.Flags.MANIFEST
                     for p in session.deliver(late, ("10.0.0.30", 5000), now))


def test_sender_refers_a_receiver_missing_much_to_peers_instead_of_repair_once() -> None:
    session = Session()
    group = session.run_pass()
    seeder(session, group, ("10.0.0.21", 5000), 7021)
    needy = ("10.0.0.50", 5000)
    nack = wire.encode(SID, 0xCAFE, wire.Nack(tuple((b, 4) for b in range(BLOCKS))))
    session.sender.receive_datagram(wire.encode(SID, 0xCAFE, wire.Status(
        wire.ReceiverState.RECEIVING, 2, BLOCKS, 0, 0, 0)), needy, 2.0)
    session.sender.receive_datagram(nack, needy, 2.0)
    answer = [wire.parse(d) for d, to in session.step(2.0) if to == needy]
    assert [type(p.body) for p in answer] == [wire.Peers]
    assert session.sender.stats.peer_referrals == 1 and session.sender.stats.repairs_requested == 0
    session.sender.receive_datagram(nack, needy, 2.5)  # it asks again: repair this time
    assert session.sender.stats.repairs_requested > 0


def test_straggler_told_every_seeder_is_busy_waits_and_asks_again() -> None:
    session = Session()
    session.sender.tracker.config.per_seeder = 1
    group = session.run_pass()
    seeder(session, group, ("10.0.0.21", 5000), 7021)
    first, second = make_receiver(5), make_receiver(6)
    for receiver, address in ((first, ("10.0.0.30", 5000)), (second, ("10.0.0.31", 5000))):
        receiver.start(1.0)
        receiver.receive_datagram(session.announce(1.0), SENDER, 1.0)
        receiver.handle_timer(1.0)
        session.deliver(receiver, address, 1.0)
    assert [e.peers for e in drain(first) if isinstance(e, events.PeersOffered)] == [
        (wire.PeerAddress("10.0.0.21", 7021, 0xB0B1),)]
    assert [e for e in drain(second) if isinstance(e, events.PeersOffered)] == []
    session.sender.receive_datagram(wire.encode(SID, first.origin, wire.Done(
        hashlib.sha256(session.image).digest())), ("10.0.0.30", 5000), 1.2)  # first is done
    # It waits for peers, asking for no symbols, and asks the tracker again soon.
    now, asked = 1.0, []
    while not any(isinstance(p.body, wire.PeerRequest) for p in asked):
        now = second.get_timer()
        assert now is not None and now < 3.0
        second.handle_timer(now)
        asked = session.deliver(second, ("10.0.0.31", 5000), now)
        assert not [p for p in asked if isinstance(p.body, wire.Nack)
                    and not p.header.flags & wire.Flags.MANIFEST]
    assert now >= 1.0 + second.config.straggler.busy_retry
    assert [e.peers for e in drain(second) if isinstance(e, events.PeersOffered)] == [
        (wire.PeerAddress("10.0.0.21", 7021, 0xB0B1),)]


def test_finished_receiver_hears_the_end_of_the_session() -> None:
    session = Session()
    group = session.run_pass()
    done = seeder(session, group, ("10.0.0.21", 5000), 7021)
    drain(done)
    done.receive_datagram(wire.encode(SID, 0xBAD, wire.End()), SENDER, 3.0)  # not our sender
    assert not done.session_over
    session.sender._finish("test", 1, 1, 3.0)
    for data, _ in session.step(3.0):
        done.receive_datagram(data, SENDER, 3.0)
    assert done.session_over and drain(done) == [events.SessionOver()]


def test_receiver_that_joined_by_unicast_after_the_pass_and_hears_no_group_is_multicast_dead(
        ) -> None:
    """Taken for a late joiner first (its unicast ANNOUNCE says the pass is over), then
    found multicast-dead: repair cannot reach it, so with no peer and no source it fails
    rather than wait for repair forever."""
    session = Session(source_port=0)
    session.run_pass()
    dead = make_receiver(11, sender_hint=SENDER)
    dead.start(2.0)
    dead.handle_timer(2.0)
    session.deliver(dead, ("10.0.0.60", 5000), 2.0)  # its STATUS; the unicast ANNOUNCE back
    assert dead.straggler == "joined after the multicast pass" and not dead.multicast_dead
    dead.handle_timer(2.0)
    session.deliver(dead, ("10.0.0.60", 5000), 2.0)  # its PEER_REQUEST; PEERS back
    offered = [e for e in drain(dead) if isinstance(e, events.PeersOffered)]
    assert offered and offered[0].peers == () and offered[0].source is None
    dead.peers_failed(2.0)  # what the driver does: no peer, no source
    now = 2.0
    while not dead.multicast_dead:
        now = dead.get_timer()
        assert now is not None and now < 6.0
        dead.handle_timer(now)
        session.deliver(dead, ("10.0.0.60", 5000), now)
    assert [e for e in drain(dead) if isinstance(e, events.PeersOffered)]  # asked again
    dead.peers_failed(now)
    assert dead.phase is ReceiverPhase.FAILED
    assert "no multicast reaches" in dead.failure


def test_a_seeder_that_stops_leaves_the_tracker() -> None:
    """When its block server closes, a seeder says so (STATUS without a seed port), and
    the tracker lists it to no more stragglers."""
    session = Session()
    group = session.run_pass()
    done = seeder(session, group, ("10.0.0.21", 5000), 7021)
    assert len(session.sender.tracker) == 1
    done.stop_seeding(3.0)
    sent = session.deliver(done, ("10.0.0.21", 5000), 3.0)
    assert [packet.body.seed_port for packet in sent] == [0, 0]
    assert len(session.sender.tracker) == 0
    done.stop_seeding(3.5)  # once is enough
    assert done.datagrams_to_send(3.5) == []
