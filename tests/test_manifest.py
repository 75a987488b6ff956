"""The block manifest (protocol/manifest.py): no block is handed over unchecked, a bad one
is fetched again, a resuming receiver keeps what its target already holds."""

from __future__ import annotations

import hashlib
import random

import pytest
from test_protocol import (SID, SOURCE_ADDR, Source, drain_events, joined, random_image,
                           receive_block, sent_by)

from mcastdeploy import wire
from mcastdeploy.protocol import events, manifest
from mcastdeploy.protocol.geometry import ImageGeometry
from mcastdeploy.protocol.manifest import (CHUNK_BLOCKS, ReceiverManifest, SenderManifest,
                                           chunks_before)
from mcastdeploy.protocol.receiver import Receiver, ReceiverConfig, ReceiverPhase
from mcastdeploy.protocol.sender import Sender, SenderConfig
from mcastdeploy.sim import LossModel, Simulation


class ManifestSource(Source):
    """A Source that also announces and multicasts the manifest of its image."""

    def __init__(self, image: bytes, **kwargs) -> None:
        super().__init__(image, **kwargs)
        g = self.geometry
        self.manifest = SenderManifest.of_image(
            lambda offset, length: image[offset:offset + length], g.block_count,
            lambda b: (g.offset(b), g.block_length(b)))

    def announce(self, next_block: int = 0, **kwargs) -> bytes:
        plain = wire.parse(super().announce(next_block, **kwargs))
        return wire.encode(plain.header.session_id, self.origin, plain.body,
                           plain.header.flags | wire.Flags.MANIFEST)

    def chunk(self, index: int, hashes: tuple[bytes, ...] | None = None) -> bytes:
        first, real = self.manifest.chunk(index)
        return wire.encode(SID, self.origin, wire.Manifest(first, hashes or real))


def block_events(receiver: Receiver) -> list[int]:
    return [e.block for e in drain_events(receiver) if isinstance(e, events.BlockDecoded)]


def test_every_hash_is_sent_twice_before_its_block() -> None:
    chunks = 5
    seen: dict[int, int] = {}
    for block in range(chunks * CHUNK_BLOCKS):
        for chunk in chunks_before(block, chunks):
            seen[chunk] = seen.get(chunk, 0) + 1
        # By the time a block goes out, its chunk has been sent twice.
        assert seen.get(manifest.chunk_of(block), 0) == 2
    assert seen == {c: 2 for c in range(chunks)}


def test_a_block_is_handed_over_only_once_its_hash_vouches_for_it() -> None:
    source = ManifestSource(random_image(3 * 256))
    receiver = joined(source)
    receive_block(receiver, source, 0, 0.1)
    assert block_events(receiver) == []  # decoded, but no hash yet: held
    receiver.handle_timer(0.1)
    asks = [(p, a) for p, a in sent_by(receiver, 0.1)
            if isinstance(p.body, wire.Nack) and p.header.flags & wire.Flags.MANIFEST]
    assert [p.body.needs for p, _ in asks] == [((0, 1),)]  # it asks for chunk 0
    receiver.receive_datagram(source.chunk(0), SOURCE_ADDR, 0.2)
    assert block_events(receiver) == [0]
    receive_block(receiver, source, 1, 0.3)  # hash already known: at once
    assert block_events(receiver) == [1]


def test_a_block_that_does_not_match_is_discarded_and_fetched_again() -> None:
    image = random_image(3 * 256)
    source = ManifestSource(image)
    receiver = joined(source)
    receiver.receive_datagram(source.chunk(0), SOURCE_ADDR, 0.0)
    # An insider's well-sealed but wrong symbol arrives first and poisons block 0.
    forged = wire.encode(SID, source.origin, wire.Data(0, 0, bytes(64)))
    receiver.receive_datagram(forged, SOURCE_ADDR, 0.1)
    receive_block(receiver, source, 0, 0.1, skip=(0,))
    assert block_events(receiver) == [] and receiver.stats.blocks_rejected == 1
    assert receiver.blocks_done == 0
    receive_block(receiver, source, 1, 0.2)  # the pass moves on: block 0 is owed again
    receiver.handle_timer(0.5)
    nacks = [p.body for p, _ in sent_by(receiver, 0.5)
             if isinstance(p.body, wire.Nack) and not p.header.flags & wire.Flags.MANIFEST]
    assert nacks and nacks[0].needs[0] == (0, 4)  # the whole block again
    for symbol in range(4, 8):  # repair symbols, now genuine
        receiver.receive_datagram(source.data(0, symbol, repair=True), SOURCE_ADDR, 0.6)
    decoded = [e for e in drain_events(receiver) if isinstance(e, events.BlockDecoded)]
    assert [e.block for e in decoded] == [1, 0]
    block0 = next(e for e in decoded if e.block == 0)
    assert bytes(block0.data) == image[:256]


def test_a_chunk_of_the_wrong_shape_is_refused() -> None:
    source = ManifestSource(random_image(3 * 256))
    receiver = joined(source)
    wrong = wire.encode(SID, source.origin, wire.Manifest(1, (bytes(32),)))  # not a boundary
    receiver.receive_datagram(wrong, SOURCE_ADDR, 0.1)
    too_few = wire.encode(SID, source.origin, wire.Manifest(0, (bytes(32),)))  # 3 blocks
    receiver.receive_datagram(too_few, SOURCE_ADDR, 0.1)
    assert receiver.stats.invalid_packets == 2
    assert receiver.manifest is not None and receiver.manifest.hash_of(0) is None


def test_a_receiver_that_requires_a_manifest_refuses_a_sender_without_one() -> None:
    source = Source(random_image(3 * 256))
    receiver = Receiver(ReceiverConfig(session_id=SID, require_manifest=True), origin=5)
    receiver.start(0.0)
    receiver.receive_datagram(source.announce(), SOURCE_ADDR, 0.0)
    assert receiver.phase is ReceiverPhase.FAILED and "manifest" in (receiver.failure or "")


def test_a_resuming_receiver_asks_for_the_whole_manifest_and_keeps_good_blocks() -> None:
    image = random_image(90 * 256)  # 90 blocks: 3 chunks
    source = ManifestSource(image)
    receiver = Receiver(ReceiverConfig(session_id=SID, resume=True), origin=5)
    receiver.start(0.0)
    receiver.receive_datagram(source.announce(), SOURCE_ADDR, 0.0)
    receiver.handle_timer(0.0)
    asks = [p.body.needs for p, _ in sent_by(receiver, 0.0)
            if isinstance(p.body, wire.Nack) and p.header.flags & wire.Flags.MANIFEST]
    assert asks == [((0, 1), (40, 1), (80, 1))]
    for index in range(3):
        receiver.receive_datagram(source.chunk(index), SOURCE_ADDR, 0.1)
    learned = [e.blocks for e in drain_events(receiver) if isinstance(e, events.HashesLearned)]
    assert learned == [range(0, 40), range(40, 80), range(80, 90)]
    for block in range(0, 90, 2):  # the driver found the even blocks intact on its target
        receiver.block_on_target(block, 0.2)
    assert receiver.blocks_done == 45 and receiver.stats.blocks_kept == 45
    for block in range(90):
        receive_block(receiver, source, block, 0.3)
    assert block_events(receiver) == list(range(1, 90, 2))  # only the others are written
    assert receiver.phase is ReceiverPhase.VERIFYING


def keyed_pair(image: bytes, receivers: int) -> tuple[Sender, dict[str, Receiver]]:
    config = SenderConfig(session_id=SID, group=("239.1.1.1", 1), rate_bps=20e6, symbol_size=256,
                          block_symbols=8, min_receivers=receivers, wait=2.0, key=bytes(32))
    g = ImageGeometry(len(image), config.symbol_size, config.block_symbols)
    sender = Sender(config, len(image), origin=1, checksum=hashlib.sha256(image).digest(),
                    manifest=SenderManifest.of_image(
                        lambda offset, length: image[offset:offset + length], g.block_count,
                        lambda b: (g.offset(b), g.block_length(b))))
    nodes = {f"r{i}": Receiver(ReceiverConfig(session_id=SID, key=bytes(32),
                                              require_manifest=True),
                               origin=10 + i, rng=random.Random(i)) for i in range(receivers)}
    return sender, nodes


@pytest.mark.parametrize("loss", [0.0, 0.05])
def test_a_lossy_group_gets_every_block_checked(loss: float) -> None:
    image = random.Random(3).randbytes(400_000)  # 196 blocks: 5 chunks
    sender, nodes = keyed_pair(image, 4)
    result = Simulation(sender, image, nodes, LossModel(seed=7, loss=loss)).run(until=60)
    assert result.failures == {}
    assert all(copy == image for copy in result.images.values())
    chunks = sender.manifest.chunk_count  # type: ignore[union-attr]
    assert sender.stats.manifest_packets >= 2 * chunks
    for node in nodes.values():
        assert node.stats.blocks_rejected == 0
        # Every chunk's hashes were released once its blocks were done: memory stays flat.
        assert node.manifest is not None and node.manifest.complete
        assert node.manifest._chunks == {}
    if not loss:
        assert sender.stats.manifest_packets == 2 * chunks
        assert all(node.stats.manifest_requests == 0 for node in nodes.values())


def test_receiver_manifest_retries_and_stops_once_learned() -> None:
    m = ReceiverManifest(100)
    m.want(5, 1.0)
    m.want(7, 1.0)  # the same chunk
    assert m.take_due(1.0, 10, 0.1) == [0]
    assert m.take_due(1.05, 10, 0.1) == []  # not before the retry
    assert m.take_due(1.1, 10, 0.1) == [0]
    assert m.next_ask() == pytest.approx(1.3)  # doubled
    assert m.learn(0, tuple(bytes(32) for _ in range(40))) == range(0, 40)
    assert m.next_ask() is None and m.learn(0, tuple(bytes(32) for _ in range(40))) == range(0)


def sparse_image(blocks: int, zero: set[int], block_bytes: int = 8 * 256) -> bytes:
    rng = random.Random(4)
    return b"".join(bytes(block_bytes) if b in zero else rng.randbytes(block_bytes)
                    for b in range(blocks))[:-100]  # a short last block too


@pytest.mark.parametrize("zero", [
    set(range(0, 45)) | set(range(80, 130)) | {199},  # runs across chunk boundaries
    set(range(200)),  # nothing but zeros
])
def test_zero_blocks_are_not_sent_and_arrive_as_zeros(zero: set[int]) -> None:
    image = sparse_image(200, zero)
    sender, nodes = keyed_pair(image, 3)
    assert sender.geometry.block_count == 200
    result = Simulation(sender, image, nodes, LossModel(seed=5, loss=0.03)).run(until=60)
    assert result.failures == {}
    assert all(copy == image for copy in result.images.values())
    data_blocks = 200 - len(zero)
    # The pass sent data blocks only: k source symbols each (the last is short).
    assert sender.stats.source_packets <= data_blocks * 8
    assert sender.stats.source_packets >= (data_blocks - 1) * 8
    for node in nodes.values():
        assert node.stats.blocks_zero == len(zero)
        # Skipped blocks are not counted as lost: the loss estimate stays near 3 %.
        if data_blocks:
            assert node.loss_rate < 0.06


def test_a_sparse_image_puts_only_its_data_on_the_wire() -> None:
    """A tenth of the blocks hold data: about a tenth of what the dense image costs goes
    out (the manifest, for every block, is the rest)."""
    sent = []
    for zero in ({b for b in range(400) if b % 10}, set()):
        image = sparse_image(400, zero)
        sender, nodes = keyed_pair(image, 2)
        result = Simulation(sender, image, nodes, LossModel(seed=6, loss=0.0)).run(until=60)
        assert result.failures == {} and all(copy == image for copy in result.images.values())
        sent.append(sender.stats.bytes_sent)
    assert 0.09 < sent[0] / sent[1] < 0.13


# --- pipelined: the pass starts before the download (and its hashing) has finished --------


def partly_zero_image(blocks: int, block_bytes: int, zero: range, seed: int = 5) -> bytes:
    image = bytearray(random.Random(seed).randbytes(blocks * block_bytes - 100))
    image[zero.start * block_bytes:zero.stop * block_bytes] = bytes(len(zero) * block_bytes)
    return bytes(image)


def hashes_of(image: bytes, g: ImageGeometry, blocks: range) -> bytes:
    return b"".join(manifest.block_hash(image[g.offset(b):g.offset(b) + g.block_length(b)])
                    for b in blocks)


class Download(Simulation):
    """A simulation whose sender's image arrives as a download would: ``blocks_per_s``
    blocks (and their hashes) a second, the whole-image checksum once it is all in."""

    def __init__(self, *args, blocks_per_s: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.blocks_per_s = blocks_per_s
        self.have = 0
        self.finished_at: float | None = None
        self.sent_while_downloading = 0

    def _after_sender(self, now: float) -> None:
        sender, g = self.sender, self.sender.geometry
        have = min(int(now * self.blocks_per_s), g.block_count)
        if have > self.have:
            sender.extend_manifest(hashes_of(self.image, g, range(self.have, have)), now)
            sender.set_readable(have, now)
            self.have = have
            if have == g.block_count:
                sender.set_checksum(hashlib.sha256(self.image).digest(), now)
                self.finished_at = now
        super()._after_sender(now)
        if self.have < g.block_count:
            self.sent_while_downloading = sender.stats.source_packets


def pipelined_sender(image: bytes, receivers: int) -> tuple[Sender, dict[str, Receiver]]:
    """keyed_pair's sender, but knowing neither hashes nor checksum, nor any block."""
    sender, nodes = keyed_pair(image, receivers)
    g = sender.geometry
    return Sender(sender.config, len(image), origin=1,
                  manifest=SenderManifest(block_count=g.block_count)), nodes


@pytest.mark.parametrize("loss", [0.0, 0.05])
def test_a_pass_that_starts_while_downloading_delivers_a_verified_image(loss: float) -> None:
    image = partly_zero_image(196, 2048, range(70, 130))  # zeros across chunk boundaries
    sender, nodes = pipelined_sender(image, 3)
    sender.set_readable(0, 0.0)
    sim = Download(sender, image, nodes, LossModel(seed=7, loss=loss), blocks_per_s=100)
    result = sim.run(until=60)
    assert result.failures == {}
    assert all(copy == image for copy in result.images.values())
    assert len(result.verified_at) == 3
    assert sim.finished_at is not None and result.pass_started is not None
    assert result.pass_started < sim.finished_at
    assert sim.sent_while_downloading > 0  # data went out before the download ended
    assert sender.stats.source_packets < 196 * 8  # zero blocks were still skipped
    chunks = sender.manifest.chunk_count  # type: ignore[union-attr]
    assert sender.stats.manifest_packets >= 2 * chunks
    for node in nodes.values():
        assert node.stats.blocks_rejected == 0
    if not loss:  # every chunk went out twice, ahead of its blocks: nobody had to ask
        assert sender.stats.manifest_packets == 2 * chunks
        assert all(node.stats.manifest_requests == 0 for node in nodes.values())


def test_a_pass_waiting_for_the_download_neither_spins_nor_outruns_the_hashes() -> None:
    from test_protocol import drive, make_sender

    image = partly_zero_image(100, 256, range(45, 60))  # 64 bytes x k=4: 100 blocks
    plain = make_sender(len(image))
    g = plain.geometry
    sender = Sender(plain.config, len(image), origin=plain.origin,
                    manifest=SenderManifest(block_count=g.block_count))
    sender.start(0.0)
    sender.extend_manifest(hashes_of(image, g, range(0, 50)), 0.0)  # chunk 0 and a bit
    sender.set_readable(30, 0.0)
    now, sent = drive(sender, image, 0.0, 2.0)  # drive() fails on a busy loop
    blocks = {p.body.block for _, p in sent if isinstance(p.body, wire.Data)}
    assert blocks == set(range(30))  # not beyond what the driver can read
    sender.set_readable(100, now)
    now, more = drive(sender, image, now, now + 2.0)
    sent += more
    blocks = {p.body.block for _, p in sent if isinstance(p.body, wire.Data)}
    assert blocks == set(range(40))  # nor beyond the last chunk whose hashes are all known
    assert not any(p.header.flags & wire.Flags.CHECKSUM_KNOWN
                   for _, p in sent if isinstance(p.body, wire.Announce))
    sender.extend_manifest(hashes_of(image, g, range(50, 100)), now)
    sender.set_checksum(hashlib.sha256(image).digest(), now)
    now, more = drive(sender, image, now, now + 5.0,
                      stop=lambda s: s.pass_position() >= g.block_count)
    sent += more
    data = [p.body.block for _, p in sent if isinstance(p.body, wire.Data)]
    assert set(data) == set(range(100)) - set(range(45, 60))
    announces = [p for _, p in sent if isinstance(p.body, wire.Announce)]
    assert announces[-1].header.flags & wire.Flags.CHECKSUM_KNOWN
    # Every chunk went out twice before the first of its blocks that was sent.
    copies: dict[int, int] = {}
    for _, packet in sent:
        if isinstance(packet.body, wire.Manifest):
            index = packet.body.first // CHUNK_BLOCKS
            copies[index] = copies.get(index, 0) + 1
        elif isinstance(packet.body, wire.Data):
            assert copies.get(manifest.chunk_of(packet.body.block), 0) == 2
    assert copies == {0: 2, 1: 2, 2: 2}
