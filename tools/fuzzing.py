"""The fuzz engine behind tools/fuzz and tests/test_fuzz.py: hostile datagrams through every
door a packet from the network passes.

Every input goes, in order, through ``wire.parse``, a session ``Opener`` (and ``wire.parse``
again on what it opens), ``intake.admit``, and two live sender/receiver pairs, one keyed
and one not (as in the simulator), each pair talking to itself over a perfect link while
the input arrives at both ends; after each input the pairs run as their drivers would
(``datagrams_to_send``, ``handle_timer``, ``next_event``, blocks supplied and written).
A pair that finished is replaced by a new one, so the hostile inputs meet every phase.

Inputs are random bytes, a valid header with random bytes after it, mutated genuine
datagrams from the pairs' own traffic, genuine sealed datagrams replayed or damaged, and
crafted packets with out-of-range fields; each may be left plain, sealed with the session
key (an insider's malformed packet, which must still be refused by the state machines'
own checks), with another key, or for another session.

Only the refusals the code promises are expected: ``WireError`` from ``parse``,
``AuthError`` from ``open``, nothing from ``admit`` and the state machines.  Anything else
is recorded with the input that raised it, so it can be replayed.
"""

from __future__ import annotations

import hashlib
import ipaddress
import random
import struct
import time
import traceback
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable, Optional

from mcastdeploy import wire
from mcastdeploy.protocol import events
from mcastdeploy.protocol.intake import Protection, admit
from mcastdeploy.protocol.receiver import Receiver, ReceiverConfig, ReceiverPhase
from mcastdeploy.protocol.sender import Sender, SenderConfig, SenderState
from mcastdeploy.wire.seal import COUNTER, AuthError, Opener, Sealer, session_cipher

SID = 0x5EED_F022_0000_0001
OTHER_SID = SID + 1
KEY = bytes(range(32))
OTHER_KEY = bytes(range(100, 132))
SENDER_ORIGIN = 0x5E4D
RECEIVER_ORIGIN = 0x4EC5
SENDER_ADDR = ("10.0.0.1", 5000)
RECEIVER_ADDR = ("10.0.0.2", 6000)
HOSTILE_ADDR = ("10.0.0.66", 6666)
GROUP = ("239.1.2.3", 6790)
SYMBOL_SIZE = 256
BLOCK_SYMBOLS = 8
#: 25 blocks, the last one short: small enough that pairs finish and are renewed often.
IMAGE = random.Random(7).randbytes(25 * BLOCK_SYMBOLS * SYMBOL_SIZE - 300)
IMAGE_SHA = hashlib.sha256(IMAGE).digest()
BLOCK_COUNT = -(-len(IMAGE) // (BLOCK_SYMBOLS * SYMBOL_SIZE))
#: Simulated time per input: with the rate below a pass takes several hundred inputs.
TICK = 0.0005
RATE_BPS = 2_000_000.0
#: A pair older than this (simulated seconds) is replaced even if it has not finished.
PAIR_LIFETIME = 4.0
#: Recent genuine datagrams kept per pair, to mutate and replay.
RING = 512

_TYPES = [int(t) for t in wire.PacketType]
_FIELD_VALUES = [0, 1, 2, 7, 8, 9, 0x7F, 0x80, 0xFE, 0xFF, 0x100, 0xFFFF, BLOCK_COUNT - 1,
                 BLOCK_COUNT, BLOCK_COUNT + 1, 253, 254, 255, 256, 2**31, 2**32 - 1,
                 2**63, 2**64 - 1]


@dataclass
class Failure:
    """An exception no caller is prepared for: where, what, and the input that raised it."""

    stage: str
    error: str
    trace: str
    data: bytes


@dataclass
class Report:
    inputs: int = 0
    seconds: float = 0.0
    generators: Counter = field(default_factory=Counter)
    seals: Counter = field(default_factory=Counter)
    #: stage -> outcome -> inputs
    outcomes: dict[str, Counter] = field(default_factory=dict)
    pairs: Counter = field(default_factory=Counter)
    #: "sender waiting", "receiver receiving", ...: the phases the inputs met
    phases: Counter = field(default_factory=Counter)
    failures: list[Failure] = field(default_factory=list)
    failure_kinds: Counter = field(default_factory=Counter)

    @property
    def rate(self) -> float:
        return self.inputs / self.seconds if self.seconds else 0.0

    def count(self, stage: str, outcome: str) -> None:
        self.outcomes.setdefault(stage, Counter())[outcome] += 1

    def as_dict(self) -> dict:
        return {
            "inputs": self.inputs, "seconds": round(self.seconds, 3),
            "inputs_per_s": round(self.rate), "generators": dict(self.generators),
            "seals": dict(self.seals), "pairs": dict(self.pairs), "phases": dict(self.phases),
            "outcomes": {stage: dict(sorted(c.items())) for stage, c in self.outcomes.items()},
            "unexpected": dict(self.failure_kinds),
            "failures": [{"stage": f.stage, "error": f.error, "input": f.data[:256].hex(),
                          "input_bytes": len(f.data), "trace": f.trace}
                         for f in self.failures],
        }


class Unsendable(Exception):
    """A receiver addressed a datagram where the socket driver's sendto must fail."""


def _check_sendable(address: tuple) -> None:
    """What the driver's IPv4 socket could send to: a unicast host, a real port."""
    host = ipaddress.ip_address(address[0])
    if (host.version != 4 or host.is_multicast or host.is_unspecified
            or host == ipaddress.IPv4Address("255.255.255.255") or not 0 < address[1] < 65536):
        raise Unsendable(f"a receiver sent to {address}")


_REJECTIONS = ("invalid_packets", "foreign_packets", "unauthentic_packets", "replayed_packets")
_RECEIVER_EXTRA = ("early_packets", "duplicate_packets")


def _verdict(stats: object, names: tuple[str, ...], before: tuple[int, ...]) -> str:
    """Which counter an input moved: the state machine's own word on what it did with it."""
    for name, old in zip(names, before):
        if getattr(stats, name) != old:
            return name.replace("_packets", "")
    return "accepted"


class Pair:
    """A sender and one receiver on a perfect link, driven the way the socket drivers do."""

    def __init__(self, key: Optional[bytes], seed: int, now: float, automatic: bool) -> None:
        self.key = key
        config = SenderConfig(
            session_id=SID, group=GROUP, rate_bps=RATE_BPS, symbol_size=SYMBOL_SIZE,
            block_symbols=BLOCK_SYMBOLS, proactive_repair=1, auto_rate=automatic,
            auto_proactive=automatic, key=key, min_receivers=1, wait=0.3, linger=1.0,
            reply_host=SENDER_ADDR[0], reply_port=SENDER_ADDR[1])
        self.sender = Sender(config, len(IMAGE), origin=SENDER_ORIGIN, checksum=IMAGE_SHA)
        self.receiver = Receiver(ReceiverConfig(session_id=SID, key=key, timeout=3.0),
                                 origin=RECEIVER_ORIGIN, rng=random.Random(seed))
        self.copy = bytearray(len(IMAGE))
        self.born = now
        #: What the two ends sent each other, as sent (sealed if keyed).
        self.genuine: deque[bytes] = deque(maxlen=RING)
        self.sender.start(now)
        self.receiver.start(now)

    def finished(self, now: float) -> bool:
        """Replace the pair once its receiver is through (a forged END or ANNOUNCE, well
        formed and sealed by an insider, fails it early): inputs should meet live ones."""
        receiver_done = (self.receiver.phase in (ReceiverPhase.DONE, ReceiverPhase.FAILED)
                         and self.receiver.get_timer() is None)
        return receiver_done or now - self.born > PAIR_LIFETIME

    def run(self, now: float) -> None:
        """What the drivers do between datagrams: supply blocks, fire timers, send, handle
        events; each end's output goes to the other at once."""
        sender, receiver = self.sender, self.receiver
        geometry = sender.geometry
        for block in sender.blocks_wanted():
            offset = geometry.offset(block)
            sender.supply_block(block, IMAGE[offset:offset + geometry.block_length(block)])
        timer = sender.get_timer()
        if timer is not None and now >= timer:
            sender.handle_timer(now)
        for data, _ in sender.datagrams_to_send(now):
            self.genuine.append(data)
            receiver.receive_datagram(data, SENDER_ADDR, now)
        timer = receiver.get_timer()
        if timer is not None and now >= timer:
            receiver.handle_timer(now)
        while (event := receiver.next_event()) is not None:
            if isinstance(event, events.BlockDecoded):
                self.copy[event.offset:event.offset + len(event.data)] = event.data
            elif isinstance(event, events.AllBlocksDecoded):
                receiver.image_verified(hashlib.sha256(self.copy).digest(), now)
        for data, address in receiver.datagrams_to_send(now):
            _check_sendable(address)
            self.genuine.append(data)
            sender.receive_datagram(data, RECEIVER_ADDR, now)
        while sender.next_event() is not None:
            pass


class Fuzzer:
    """Makes hostile inputs and pushes each through every stage; see the module docstring."""

    def __init__(self, seed: int = 0, max_failures: int = 20) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self.max_failures = max_failures
        self.report = Report()
        self.now = 0.0
        self._cipher = session_cipher(KEY, SID)
        self._other_key = session_cipher(OTHER_KEY, SID)
        self._other_session = session_cipher(KEY, OTHER_SID)
        self.opener = Opener(self._cipher)
        self.intake = Protection(KEY, SID, origin=0xF022)
        self.intake_counts = Counts()
        self._pair_seed = seed * 1000
        self.keyed = self._new_pair(KEY)
        self.plain = self._new_pair(None)
        #: Next counter per origin for insider-sealed packets (fresh unless stolen below).
        self._insider_counter = 1 << 40
        self._generators: list[tuple[float, str, Callable[[], tuple[bytes, str]]]] = [
            (0.15, "random", self._random_bytes),
            (0.15, "header+random", self._header_random),
            (0.35, "mutated", self._mutated_genuine),
            (0.10, "replayed", self._replayed),
            (0.25, "crafted", self._crafted),
        ]

    # -- the run --------------------------------------------------------------------------

    def run(self, inputs: int) -> Report:
        report = self.report
        started = time.perf_counter()
        weights = [w for w, _, _ in self._generators]
        for _ in range(inputs):
            _, name, make = self.rng.choices(self._generators, weights)[0]
            data, seal = make()
            report.generators[name] += 1
            report.seals[seal] += 1
            self.feed(data)
        report.inputs += inputs
        report.seconds += time.perf_counter() - started
        return report

    def feed(self, data: bytes) -> None:
        """One input through every stage, then one tick of both pairs."""
        report = self.report
        self.now += TICK
        try:
            report.count("parse", "ok:" + wire.parse(data).header.type.name)
        except wire.WireError:
            report.count("parse", "WireError")
        except Exception as error:  # noqa: BLE001 - that is the finding
            self._fail("parse", error, data)
        try:
            opened = self.opener.open(data)
        except AuthError as error:
            report.count("open", type(error).__name__)
        except Exception as error:  # noqa: BLE001
            self._fail("open", error, data)
        else:
            report.count("open", "ok")
            try:
                report.count("parse(opened)", "ok:" + wire.parse(opened).header.type.name)
            except wire.WireError:
                report.count("parse(opened)", "WireError")
            except Exception as error:  # noqa: BLE001
                self._fail("parse(opened)", error, data)
        counts = self.intake_counts
        before = counts.snapshot()
        try:
            packet = admit(data, SID, counts, self.intake)
        except Exception as error:  # noqa: BLE001
            self._fail("admit", error, data)
        else:
            report.count("admit", "accepted:" + packet.header.type.name if packet is not None
                         else _verdict(counts, _REJECTIONS, before))
        for label, pair in (("keyed", self.keyed), ("plain", self.plain)):
            self._deliver(label, pair, data)

    def _deliver(self, label: str, pair: Pair, data: bytes) -> None:
        report, now = self.report, self.now
        stage = f"{label} sender"
        report.phases[f"sender {pair.sender.state.value}"] += 1
        report.phases[f"receiver {pair.receiver.phase.value}"] += 1
        try:
            stats = pair.sender.stats
            before = tuple(getattr(stats, n) for n in _REJECTIONS)
            pair.sender.receive_datagram(data, HOSTILE_ADDR, now)
            report.count(stage, _verdict(stats, _REJECTIONS, before))
            stage = f"{label} receiver"
            stats = pair.receiver.stats
            names = _REJECTIONS + _RECEIVER_EXTRA
            before = tuple(getattr(stats, n) for n in names)
            pair.receiver.receive_datagram(data, HOSTILE_ADDR, now)
            report.count(stage, _verdict(stats, names, before))
            stage = f"{label} drivers"
            pair.run(now)
        except Exception as error:  # noqa: BLE001
            self._fail(stage, error, data)
            pair.born = -PAIR_LIFETIME  # its state may be inconsistent: replace it
        if pair.finished(now):
            report.pairs[f"{label} {self._outcome(pair)}"] += 1
            replacement = self._new_pair(pair.key)
            if label == "keyed":
                self.keyed = replacement
            else:
                self.plain = replacement

    @staticmethod
    def _outcome(pair: Pair) -> str:
        phase = pair.receiver.phase
        if phase is ReceiverPhase.DONE:
            return "receiver done" if bytes(pair.copy) == IMAGE else "receiver done, COPY DIFFERS"
        return f"receiver {phase.value}"

    def _new_pair(self, key: Optional[bytes]) -> Pair:
        self._pair_seed += 1
        return Pair(key, self._pair_seed, self.now, automatic=self._pair_seed % 2 == 0)

    def _fail(self, stage: str, error: Exception, data: bytes) -> None:
        kind = f"{stage}: {type(error).__name__}"
        self.report.failure_kinds[kind] += 1
        if len(self.report.failures) < self.max_failures:
            self.report.failures.append(Failure(stage, f"{type(error).__name__}: {error}",
                                                traceback.format_exc(limit=6), data))

    # -- inputs ---------------------------------------------------------------------------

    def _length(self) -> int:
        rng = self.rng
        pick = rng.random()
        if pick < 0.6:
            return rng.randrange(0, 80)
        if pick < 0.95:
            return rng.randrange(80, 1600)
        if pick < 0.999:
            return rng.randrange(1600, 9000)
        return rng.choice([wire.MAX_DATAGRAM - 1, wire.MAX_DATAGRAM, wire.MAX_DATAGRAM + 1])

    def _random_bytes(self) -> tuple[bytes, str]:
        return self.rng.randbytes(self._length()), "none"

    def _header(self, ptype: Optional[int] = None, origin: Optional[int] = None) -> bytes:
        rng = self.rng
        return wire.packets.HEADER.pack(
            wire.packets.MAGIC, wire.packets.VERSION,
            rng.choice(_TYPES) if ptype is None else ptype, rng.randrange(16),
            SID if rng.random() < 0.9 else OTHER_SID,
            self._origin() if origin is None else origin)

    def _origin(self) -> int:
        pick = self.rng.random()
        if pick < 0.5:
            return SENDER_ORIGIN
        if pick < 0.7:
            return RECEIVER_ORIGIN
        return self.rng.getrandbits(32)

    def _header_random(self) -> tuple[bytes, str]:
        plain = self._header() + self.rng.randbytes(self._length())
        return self._maybe_seal(plain[:wire.MAX_DATAGRAM])

    def _mutated_genuine(self) -> tuple[bytes, str]:
        """A genuine plain datagram changed in one to four places, then maybe sealed."""
        ring = self.plain.genuine
        if not ring:
            return self._crafted()
        data = bytearray(self.rng.choice(ring))
        for _ in range(self.rng.randint(1, 4)):
            self._mutate(data)
        return self._maybe_seal(bytes(data[:wire.MAX_DATAGRAM + 1]))

    def _replayed(self) -> tuple[bytes, str]:
        """A genuine sealed datagram again, as it was or damaged."""
        ring = self.keyed.genuine
        if not ring:
            return self._crafted()
        data = self.rng.choice(ring)
        if self.rng.random() < 0.6:
            return data, "replay"
        damaged = bytearray(data)
        self._mutate(damaged)
        return bytes(damaged), "damaged"

    def _mutate(self, data: bytearray) -> None:
        rng = self.rng
        pick = rng.randrange(8)
        if not data:
            data.extend(rng.randbytes(rng.randrange(1, 64)))
            return
        at = rng.randrange(len(data))
        if pick == 0:  # one bit
            data[at] ^= 1 << rng.randrange(8)
        elif pick == 1:  # one byte, a telling value
            data[at] = rng.choice((0, 1, 0x7F, 0x80, 0xFE, 0xFF))
        elif pick == 2:  # a field-sized integer, a telling value
            width = rng.choice((1, 2, 4, 8))
            value = rng.choice(_FIELD_VALUES) % (1 << (8 * width))
            data[at:at + width] = value.to_bytes(width, "big")
        elif pick == 3:  # truncated
            del data[at:]
        elif pick == 4:  # extended
            data.extend(rng.randbytes(rng.choice((1, 4, 16, 200, 3000))))
        elif pick == 5:  # a slice gone
            del data[at:at + rng.randrange(1, 16)]
        elif pick == 6:  # a slice twice
            data[at:at] = data[at:at + rng.randrange(1, 32)]
        else:  # a header field: version, type, flags, session or origin
            field_at, width = rng.choice(((2, 1), (3, 1), (4, 1), (8, 8), (16, 4)))
            if len(data) >= field_at + width:
                value = rng.choice(_FIELD_VALUES + [SID, OTHER_SID, SENDER_ORIGIN])
                data[field_at:field_at + width] = (value % (1 << (8 * width))).to_bytes(
                    width, "big")

    def _crafted(self) -> tuple[bytes, str]:
        """A packet put together field by field with values the parser or the state
        machines must refuse: blocks past the image, symbol 255, zero counts, lengths that
        disagree with the session, unknown states and address families."""
        rng = self.rng
        ptype = rng.choice(_TYPES)
        value = lambda bits: rng.choice(  # noqa: E731
            [v for v in _FIELD_VALUES if v < 1 << bits] + [rng.getrandbits(bits)])
        if ptype == wire.PacketType.DATA:
            length = rng.choice((0, 1, SYMBOL_SIZE - 1, SYMBOL_SIZE, SYMBOL_SIZE, SYMBOL_SIZE + 1,
                                 rng.randrange(4000), wire.MAX_DATAGRAM - 60))
            body = wire.packets.DATA_BODY.pack(
                rng.choice((value(32), rng.randrange(BLOCK_COUNT + 2))),
                rng.choice((value(8), rng.randrange(BLOCK_SYMBOLS + 2)))) + rng.randbytes(length)
        elif ptype in (wire.PacketType.NACK, wire.PacketType.REPAIR_NOTICE):
            count = rng.choice((0, 1, 2, 10, 250, 251, 0xFFFF))
            real = min(count, 260) if rng.random() < 0.8 else rng.randrange(0, 260)
            entries = b"".join(wire.packets.NACK_ENTRY.pack(
                rng.choice((value(32), rng.randrange(BLOCK_COUNT + 2))),
                rng.choice((0, 1, value(8)))) for _ in range(real))
            lead = (wire.packets.ECHO.pack(value(64), value(32)) if ptype == wire.PacketType.NACK
                    else wire.packets.BACKLOG.pack(value(32)))
            body = lead + wire.packets.NACK_COUNT.pack(count) + entries
        elif ptype == wire.PacketType.STATUS:
            body = wire.Status.BODY.pack(rng.randrange(8), value(16), value(32), value(32),
                                         value(64), value(64), value(32), value(64), value(32),
                                         value(64), value(32), value(32), value(32), value(32))
        elif ptype == wire.PacketType.PEER_REQUEST:
            count = rng.choice((0, 1, 32, 33, 255))
            real = count if rng.random() < 0.8 else rng.randrange(0, 40)
            body = wire.PeerRequest.BODY.pack(value(32), count) + rng.randbytes(4 * real)
        elif ptype == wire.PacketType.PEERS:
            count = rng.choice((0, 1, 16, 17, 255))
            real = min(count, 20) if rng.random() < 0.8 else rng.randrange(0, 20)
            body = wire.packets.PEERS_HEAD.pack(value(16), count) + b"".join(
                wire.packets.PEER_ENTRY.pack(rng.choice((bytes([10, 99, 0, 11]), bytes(4),
                                                         b"\xff" * 4, bytes([239, 1, 2, 3]))),
                                             value(16), value(32)) for _ in range(real))
        elif ptype == wire.PacketType.ANNOUNCE and rng.random() < 0.5:
            body = self._near_announce()
        elif ptype == wire.PacketType.ANNOUNCE:
            k = rng.choice((0, 1, BLOCK_SYMBOLS, 254, 255))
            symbol = rng.choice((0, 1, SYMBOL_SIZE, 65_479, 65_480, 65535))
            size = rng.choice((0, 1, len(IMAGE), value(64)))
            blocks = rng.choice((BLOCK_COUNT, -(-size // max(1, k * symbol)), value(32)))
            family, address = rng.choice(((4, bytes([10, 0, 0, 1])), (4, b"\xff" * 4),
                                          (6, bytes(15) + b"\x01"), (5, bytes(16))))
            body = wire.Announce.BODY.pack(
                size, symbol, k, blocks & 0xFFFFFFFF, rng.choice((0, blocks, value(32))) & 0xFFFFFFFF,
                value(32), value(32), value(32), rng.choice((0, 1, 246, 247, 255)),
                rng.choice((IMAGE_SHA, rng.randbytes(32))), family, address.ljust(16, b"\0"),
                value(16), value(64), value(32))
        elif ptype == wire.PacketType.DONE:
            body = rng.choice((IMAGE_SHA, rng.randbytes(32), b"", rng.randbytes(33)))
        else:  # END, which has no body: mostly given one, or receivers rarely live long
            body = rng.choice((b"", b"\0", b"\0", rng.randbytes(rng.randrange(1, 64))))
        return self._maybe_seal(self._header(ptype) + body)

    def _near_announce(self) -> bytes:
        """The sender's own ANNOUNCE body with one field odd: it passes every check that
        compares it with the session, so the field itself must be checked."""
        rng = self.rng
        fields = [len(IMAGE), SYMBOL_SIZE, BLOCK_SYMBOLS, BLOCK_COUNT,
                  rng.randrange(BLOCK_COUNT + 1), int(RATE_BPS), 10_000, 1, 1, IMAGE_SHA, 4,
                  bytes([10, 0, 0, 1]).ljust(16, b"\0"), SENDER_ADDR[1],
                  rng.getrandbits(40), rng.randrange(100_000)]
        which = rng.choice((4, 5, 6, 7, 8, 10, 12, 13, 14))
        if which == 10:  # the reply address: broadcast, a group, nobody, IPv6
            fields[10], address = rng.choice(((4, b"\xff" * 4), (4, bytes([239, 1, 2, 3])),
                                              (4, bytes([10, 0, 0, 255])), (4, bytes(4)),
                                              (6, bytes(15) + b"\1"), (6, b"\xff" + bytes(15))))
            fields[11] = address.ljust(16, b"\0")
        else:
            bits = {4: 32, 5: 64, 6: 32, 7: 32, 8: 32, 12: 16, 13: 64, 14: 32}[which]
            fields[which] = rng.choice([v for v in _FIELD_VALUES if v < 1 << bits])
        return wire.Announce.BODY.pack(*fields)

    def _maybe_seal(self, plain: bytes) -> tuple[bytes, str]:
        """Plain, or sealed with the session key by an insider, another key, or for
        another session; an insider impersonating the sender uses a counter just past the
        sender's own, as it would have to for the receiver to open it."""
        rng = self.rng
        pick = rng.random()
        if pick < 0.45 or len(plain) < wire.HEADER_SIZE:
            return plain, "none"
        origin = wire.packets.HEADER.unpack_from(plain)[-1]
        if pick < 0.85:
            cipher, how = self._cipher, "insider"
            counter = self._sender_counter() if origin == SENDER_ORIGIN else None
            if counter is None:
                self._insider_counter += 1
                counter = self._insider_counter
        else:
            cipher, how = ((self._other_key, "other key") if pick < 0.93
                           else (self._other_session, "other session"))
            counter = rng.getrandbits(63)
        sealed = Sealer(cipher, origin, first_counter=counter).seal(plain)
        return sealed[:wire.MAX_DATAGRAM + 1], how

    def _sender_counter(self) -> Optional[int]:
        for data in reversed(self.keyed.genuine):
            if len(data) >= wire.HEADER_SIZE + COUNTER.size and \
                    wire.packets.HEADER.unpack_from(data)[-1] == SENDER_ORIGIN:
                (counter,) = COUNTER.unpack_from(data, wire.HEADER_SIZE)
                return counter + self.rng.randint(1, 3)
        return None


class Counts:
    """Counters ``intake.admit`` fills in, as a state machine's stats would be."""

    def __init__(self) -> None:
        self.invalid_packets = self.foreign_packets = 0
        self.unauthentic_packets = self.replayed_packets = 0

    def snapshot(self) -> tuple[int, ...]:
        return tuple(getattr(self, name) for name in _REJECTIONS)


def fuzz(inputs: int, seed: int = 0, chunk: int = 100_000,
         progress: Optional[Callable[[Report], None]] = None) -> Report:
    """Run ``inputs`` inputs from ``seed``; ``progress`` hears after every ``chunk``."""
    fuzzer = Fuzzer(seed)
    done = 0
    while done < inputs:
        step = min(chunk, inputs - done)
        fuzzer.run(step)
        done += step
        if progress is not None:
            progress(fuzzer.report)
    return fuzzer.report


def format_report(report: Report) -> str:
    lines = [f"{report.inputs} inputs in {report.seconds:.1f} s: {report.rate:,.0f} inputs/s",
             "generators: " + ", ".join(f"{k} {v}" for k, v in report.generators.most_common()),
             "sealing:    " + ", ".join(f"{k} {v}" for k, v in report.seals.most_common()),
             "pairs:      " + ", ".join(f"{k} {v}" for k, v in sorted(report.pairs.items())),
             "phases met: " + ", ".join(f"{k} {v}" for k, v in sorted(report.phases.items()))]
    for stage, counts in report.outcomes.items():
        lines.append(f"{stage:>15}: " + ", ".join(f"{k} {v}" for k, v in counts.most_common()))
    if report.failure_kinds:
        lines.append("UNEXPECTED EXCEPTIONS:")
        lines.extend(f"  {kind}: {n}" for kind, n in report.failure_kinds.most_common())
        for failure in report.failures[:5]:
            lines.append(f"--- {failure.stage}: {failure.error}\n    input "
                         f"({len(failure.data)} bytes): {failure.data[:96].hex()}\n"
                         f"{failure.trace}")
    else:
        lines.append("unexpected exceptions: none")
    return "\n".join(lines)

