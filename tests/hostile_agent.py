"""An attacker for tests/test_hostile.py, run inside one of the rack's namespaces.

Two roles:

``attacker`` (a spare receiver slot): listens on the session's group like any host on the
segment, learns the sender's origin, reply port and packet counter from its sealed
ANNOUNCE and DATA, and then sends, at the group, at every receiver's unicast port and at
the sender: packets sealed with another key, of another session, unsealed, truncated,
oversized (up to 65,507 bytes, fragmented), of a wrong version or type, correctly sealed
but malformed (symbol 255, zero counts, lengths that disagree, unknown states), DATA for
blocks past the image and ANNOUNCEs naming an unusable reply address, both impersonating
the sender, replays of the genuine datagrams it heard, and a flood of NACKs (forged, and
correctly sealed ones asking for absurd blocks).

``replayer`` (the sender's namespace): captures, with a raw socket, what receivers send
the sender (STATUS, NACK, DONE) and sends each datagram twice more, from the receiver's
address and port, as an attacker on the path would.

Packets are crafted with scapy (IP/UDP around the payloads, fragments for the oversized
ones) and leave through scapy's raw IP socket.  Everything the attacker can build before
the sender exists is built while the test waits for ``ready``, so the attack itself takes
a fraction of a second of CPU.  Every loop is bounded by ``--deadline``; the report (what
was sent, by kind) is one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import secrets
import signal
import socket
import struct
import sys
import time
from typing import Optional

from mcastdeploy import wire
from mcastdeploy.spec import SessionSpec
from mcastdeploy.wire.packets import (BACKLOG, DATA_BODY, ECHO, HEADER, MAGIC, NACK_COUNT,
                                      NACK_ENTRY, VERSION)
from mcastdeploy.wire.seal import COUNTER, AuthError, Opener, Sealer, session_cipher

#: Linux SOL_PACKET / PACKET_IGNORE_OUTGOING (not in the socket module): the replayer
#: hears what arrives, not the sender's own data.
SOL_PACKET = 263
PACKET_IGNORE_OUTGOING = 23
#: Blocks no image of this test has: a NACK or DATA naming them is malformed.
ABSURD_BLOCKS = (2**31, 2**32 - 1)
#: How far ahead of the sender's newest counter the impersonating DATA goes: always less
#: than the replay window (1024), so no genuine packet is pushed out of it.
STEAL_SPAN = 1000
STEAL_PACKETS = 40


class Stop(Exception):
    """SIGTERM or the deadline: report what was done and leave."""


class Wire:
    """Scapy-built IP/UDP packets, kept as bytes and sent through scapy's raw socket."""

    def __init__(self) -> None:
        from scapy.all import IP, UDP, Raw, conf, fragment, raw  # slow import: here, once
        from scapy.supersocket import L3RawSocket

        conf.verb = 0
        self._ip, self._udp, self._raw, self._bytes = IP, UDP, Raw, raw
        self._fragment = fragment
        self._socket = L3RawSocket()
        self._socket.ins.close()  # only sending: do not copy every frame to an unread queue
        self.sent = 0
        self.errors = 0

    def build(self, payload: bytes, destination: tuple[str, int],
              source: Optional[tuple[str, int]] = None) -> list[tuple[bytes, str]]:
        """The frames of one datagram (several if it needs fragments), as (bytes, address).

        UDP checksums are left out (0, allowed over IPv4) so that a destination port learnt
        later can be patched in (:meth:`to_port`).
        """
        # A fresh IP id per datagram: fragments of two oversized ones must never mix.
        ip = self._ip(dst=destination[0], id=secrets.randbelow(65536))
        if source is not None:
            ip.src = source[0]
        packet = ip / self._udp(sport=source[1] if source else 40000, dport=destination[1],
                                chksum=0) / self._raw(payload)
        if len(payload) + 28 > 1500:
            frames = self._fragment(packet, fragsize=1480)
        else:
            frames = [packet]
        return [(self._bytes(frame), destination[0]) for frame in frames]

    @staticmethod
    def to_port(frames: list[tuple[bytes, str]], port: int) -> list[tuple[bytes, str]]:
        """The frames with the UDP destination port (in the first fragment) set to ``port``."""
        first = bytearray(frames[0][0])
        first[22:24] = struct.pack("!H", port)
        return [(bytes(first), frames[0][1])] + frames[1:]

    def send(self, frames: list[tuple[bytes, str]]) -> None:
        for frame, address in frames:
            try:
                self._socket.outs.sendto(frame, (address, 0))
                self.sent += 1
            except OSError:
                self.errors += 1


class Attacker:
    def __init__(self, spec: SessionSpec, sender: str, receivers: list[tuple[str, int]],
                 image_size: int, deadline: float) -> None:
        self.spec = spec
        self.sender = sender
        self.sid = spec.session_number
        self.group = (spec.group, spec.port)
        self.receivers = receivers
        self.deadline = deadline
        self.block_count = -(-image_size // (spec.block_symbols * spec.symbol_size))
        self.cipher = session_cipher(spec.key_bytes, self.sid)
        self.origin = secrets.randbits(32)
        self.sealer = Sealer(self.cipher, self.origin)  # an insider's own packets
        self.sent: dict[str, int] = {}
        self.learnt: dict[str, object] = {}
        self.announce: Optional[tuple[wire.Announce, int]] = None  # the sender's, and flags
        self.wire = Wire()
        self.listener = self._listen()
        # Built now, while the test waits: (kind, target, frames), in the order they go
        # out; "sender" targets get their port once the ANNOUNCE has named it.
        self.batches: list[tuple[str, str, list[tuple[bytes, str]]]] = []
        self.finale: list[tuple[str, str, list[tuple[bytes, str]]]] = []
        self._prepare()

    # -- before the sender exists ---------------------------------------------------------

    def _listen(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(self.group)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                        socket.inet_aton(self.group[0]) + socket.inet_aton("0.0.0.0"))
        return sock

    def _header(self, ptype: int, *, version: int = VERSION, session: Optional[int] = None,
                origin: Optional[int] = None) -> bytes:
        return HEADER.pack(MAGIC, version, ptype, 0, self.sid if session is None else session,
                           self.origin if origin is None else origin)

    def _well_formed(self, origin: int) -> list[bytes]:
        """Plain packets of our session that parse: what an outsider forges."""
        sid = self.sid
        return [
            wire.encode(sid, origin, wire.Nack(((0, 2), (1, 1)))),
            wire.encode(sid, origin, wire.Status(wire.ReceiverState.RECEIVING, 0,
                                                 self.block_count, 10, 0, 0)),
            wire.encode_data_header(sid, origin, 0, 0) + bytes(self.spec.symbol_size),
            wire.encode(sid, origin, wire.Done(bytes(32))),
            wire.encode(sid, origin, wire.End()),
        ]

    def _malformed(self) -> list[bytes]:
        """Plain packets of our session that must not parse (to be sealed by an insider)."""
        h, t = self._header, wire.PacketType
        symbol = self.spec.symbol_size
        return [
            h(t.DATA) + DATA_BODY.pack(0, 255) + bytes(symbol),  # symbol id out of range
            h(t.DATA) + b"\0\0\0",  # truncated body
            h(t.NACK) + ECHO.pack(0, 0) + NACK_COUNT.pack(0),  # no entries
            h(t.NACK) + ECHO.pack(0, 0) + NACK_COUNT.pack(5) + NACK_ENTRY.pack(0, 1),
            h(t.NACK) + ECHO.pack(0, 0) + NACK_COUNT.pack(1) + NACK_ENTRY.pack(0, 0),
            h(t.NACK) + b"\0" * 5,
            h(t.STATUS) + wire.Status.BODY.pack(9, 0, 0, 1, *(0,) * 10),  # unknown state
            h(t.STATUS) + wire.Status.BODY.pack(1, 0, 5, 1, *(0,) * 10),  # done > count
            h(t.STATUS) + wire.Status.BODY.pack(1, 0, 1, 1, *(0,) * 6, 1, 0, 0, 1),  # split > done
            h(t.PEER_REQUEST) + wire.PeerRequest.BODY.pack(1, 40) + bytes(160),  # too many
            h(t.PEERS) + bytes(2) + b"\x01" + bytes([239, 1, 1, 1]) + bytes(6),  # a group as peer
            h(t.END) + b"\0" * 5,
            h(t.ANNOUNCE) + bytes(30),
            h(t.REPAIR_NOTICE) + BACKLOG.pack(0) + NACK_COUNT.pack(251),
            h(t.DONE) + bytes(31),
            h(t.DATA, version=VERSION + 1) + DATA_BODY.pack(0, 0) + bytes(symbol),
            h(0) + bytes(40), h(11) + bytes(40), h(255) + bytes(40),  # no such type
        ]

    def _absurd(self) -> list[bytes]:
        """Well-formed on the wire, malformed for this session: blocks past the image."""
        sid, o = self.sid, self.origin
        past = self.block_count
        return [
            wire.encode(sid, o, wire.Nack(((past, 1),))),
            wire.encode(sid, o, wire.Nack(tuple((b, 3) for b in ABSURD_BLOCKS))),
            wire.encode(sid, o, wire.Nack(tuple((2**31 + i, 255) for i in range(250)))),
            wire.encode(sid, o, wire.Status(wire.ReceiverState.RECEIVING, 2**32 - 1,
                                            2**32 - 1, 0, 0, 0)),
        ]

    def _prepare(self) -> None:
        other_key = Sealer(session_cipher(secrets.token_bytes(32), self.sid), self.origin)
        other_session = Sealer(session_cipher(self.spec.key_bytes, self.sid ^ 1), self.origin)
        forged = self._well_formed(self.origin)
        payloads: dict[str, list[bytes]] = {
            "unsealed": forged,
            "wrong key": [other_key.seal(p) for p in forged],
            "other session": [other_session.seal(HEADER.pack(MAGIC, VERSION, p[3], 0,
                                                             self.sid ^ 1, self.origin)
                                                 + p[wire.HEADER_SIZE:]) for p in forged],
            "short": [b"", b"M", b"MD\x01", bytes(19), self._header(2)[:19]],
            "truncated seal": [s[:n] for s in (self.sealer.seal(forged[0]),)
                               for n in (wire.HEADER_SIZE, wire.HEADER_SIZE + 8, len(s) - 1)],
            "sealed malformed": [self.sealer.seal(p) for p in self._malformed()],
            "sealed absurd": [self.sealer.seal(p) for p in self._absurd()],
        }
        big = wire.MAX_DATAGRAM
        oversized = [
            b"XX" + bytes(big - 2),  # no magic
            self._header(2) + secrets.token_bytes(big - wire.HEADER_SIZE),  # no valid tag
            self.sealer.seal(self._header(2) + DATA_BODY.pack(0, 0)
                             + bytes(big - wire.HEADER_SIZE - 8 - 24)),  # sealed, huge
            self.sealer.seal(self._header(3) + ECHO.pack(0, 0) + NACK_COUNT.pack(250)
                             + bytes(big - wire.HEADER_SIZE - 14 - 24)),
        ]
        for kind, datagrams in payloads.items():
            for datagram in datagrams:
                self._aim(self.batches, kind, datagram)
        self._flood()
        # Last, and not at each receiver's port as well: 45 fragments each, on links the
        # data already fills to 80 %.
        for datagram in oversized:
            self._aim(self.finale, "oversized", datagram, only=("group", "sender"))

    def _aim(self, batches: list, kind: str, payload: bytes,
             only: tuple[str, ...] = ("group", "receiver", "sender")) -> None:
        targets = [("group", self.group)] + [("receiver", r) for r in self.receivers] \
            + [("sender", (self.sender, 9))]
        for name, destination in targets:
            if name in only:
                batches.append((kind, name, self.wire.build(payload, destination)))

    def _flood(self) -> None:
        """Thousands of NACKs for the sender: forged (unsealed, other key) and sealed by an
        insider, asking for blocks past the image."""
        other_key = Sealer(session_cipher(secrets.token_bytes(32), self.sid), self.origin)
        for i in range(1500):
            origin = secrets.randbits(32)
            nack = wire.encode(self.sid, origin, wire.Nack(((i % 7, 3), (i % 5 + 1, 2))))
            self._aim(self.finale, "flood unsealed" if i % 2 else "flood wrong key",
                      nack if i % 2 else other_key.seal(nack), only=("sender",))
        for i in range(1500):
            entries = 250 if i % 100 == 0 else 1 + i % 4
            nack = wire.encode(self.sid, self.origin, wire.Nack(tuple(
                (ABSURD_BLOCKS[0] + (i * 251 + j) % 2**30, 1 + j % 200)
                for j in range(entries))))
            self._aim(self.finale, "flood sealed absurd", self.sealer.seal(nack),
                      only=("sender",))

    # -- once the sender speaks -------------------------------------------------------------

    def run(self) -> None:
        opener = Opener(self.cipher)
        heard: list[bytes] = []
        newest: Optional[int] = None
        self.listener.settimeout(0.2)
        while newest is None or len(heard) < 150:
            data = self._receive()
            if data is None:
                continue
            try:
                header = wire.parse_header(data)
                plain = opener.open(data) if header.session_id == self.sid else None
            except (wire.WireError, AuthError):
                continue
            if plain is None:
                continue
            packet = wire.parse(plain)
            heard.append(data)
            if isinstance(packet.body, wire.Announce):
                self.learnt.update(origin=header.origin, port=packet.body.sender_port,
                                   host=packet.body.sender_host)
                self.announce = (packet.body, header.flags)
            if isinstance(packet.body, wire.Data) and header.origin == self.learnt.get("origin"):
                (newest,) = COUNTER.unpack_from(data, wire.HEADER_SIZE)
        self.learnt["heard"] = len(heard)
        # CLOCK_MONOTONIC is one clock for every process here: the test compares.
        self.learnt["attack_from"] = time.monotonic()
        self._steal()
        self.listener.close()
        port = int(self.learnt["port"])  # type: ignore[arg-type]
        for kind, target, frames in self.batches:
            self._send(kind, target, Wire.to_port(frames, port) if target == "sender" else frames)
        # Genuine datagrams every receiver has already opened: replays.  Not all of them
        # at every port, for the same reason as the oversized ones.
        for data in heard[:60]:
            self._send("replayed", "group", self.wire.build(data, self.group))
        for data in heard[60:80]:
            for receiver in self.receivers:
                self._send("replayed", "receiver", self.wire.build(data, receiver))
        for kind, target, frames in self.finale:
            self._send(kind, target, Wire.to_port(frames, port) if target == "sender" else frames)
        self.learnt["attack_to"] = time.monotonic()

    def _receive(self) -> Optional[bytes]:
        if time.monotonic() > self.deadline:
            raise Stop("no sender heard before the deadline")
        try:
            return self.listener.recv(65536)
        except socket.timeout:
            return None

    def _steal(self) -> None:
        """DATA as from the sender, sealed with the key, for blocks past the image or with
        payloads of the wrong size, and its ANNOUNCE naming a reply address no NACK can go
        to (the broadcast address, an IPv6 host): the receivers' own checks must drop them.
        Their counters run just ahead of the sender's newest, so they open; the genuine
        packets whose counters they take are lost (and repaired), none is pushed out of the
        window.
        """
        self.listener.setblocking(False)
        try:
            while True:
                self.listener.recv(65536)  # drain: only a counter heard just now will do
        except BlockingIOError:
            pass
        self.listener.settimeout(1.0)
        newest = None
        while newest is None:
            data = self._receive()
            if data is not None and len(data) > 28 and data[3] == wire.PacketType.DATA \
                    and HEADER.unpack_from(data)[-1] == self.learnt["origin"]:
                (newest,) = COUNTER.unpack_from(data, wire.HEADER_SIZE)
        origin = int(self.learnt["origin"])  # type: ignore[arg-type]
        symbol = self.spec.symbol_size
        assert self.announce is not None  # heard before any DATA of the sender's
        announce, flags = self.announce
        for i in range(1, STEAL_PACKETS + 1):
            if i % 10 == 0:
                host = "255.255.255.255" if i % 20 else "::1"
                plain = wire.encode(self.sid, origin, dataclasses.replace(
                    announce, sender_host=host), wire.Flags(flags))
            else:
                block, size = ((ABSURD_BLOCKS[i % 2], symbol) if i % 4
                               else (i % self.block_count, symbol - 1))
                plain = wire.encode_data_header(self.sid, origin, block, 0) + bytes(size)
            counter = newest + i * STEAL_SPAN // STEAL_PACKETS
            sealed = Sealer(self.cipher, origin, first_counter=counter).seal(plain)
            self._send("impersonated", "group", self.wire.build(sealed, self.group))

    def _send(self, kind: str, target: str, frames: list[tuple[bytes, str]]) -> None:
        if time.monotonic() > self.deadline:
            raise Stop("deadline")
        self.wire.send(frames)
        key = f"{kind} -> {target}"
        self.sent[key] = self.sent.get(key, 0) + 1


class Replayer:
    """Hears receivers' datagrams to the sender and sends each twice more."""

    def __init__(self, own: str, receivers: list[str], deadline: float, limit: int) -> None:
        self.own, self.receivers = own, set(receivers)
        self.deadline, self.limit = deadline, limit
        self.wire = Wire()
        # Cooked: frames start at the IP header.
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800))
        self.sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        self.sock.bind(("eth0", 0x0800))
        self.sock.settimeout(0.2)
        self.sent: dict[str, int] = {}
        self.learnt: dict[str, object] = {"captured": 0}

    def run(self) -> None:
        captured = 0
        while captured < self.limit:
            if time.monotonic() > self.deadline:
                raise Stop("deadline")
            try:
                frame = self.sock.recv(65536)
            except socket.timeout:
                continue
            if len(frame) < 28 or frame[9] != socket.IPPROTO_UDP or frame[0] >> 4 != 4:
                continue
            header = (frame[0] & 0x0F) * 4
            source, destination = socket.inet_ntoa(frame[12:16]), socket.inet_ntoa(frame[16:20])
            if source not in self.receivers or destination != self.own or \
                    frame[6] & 0x3F or frame[7]:
                continue  # not a receiver's datagram to us, or a fragment
            sport, dport = struct.unpack_from("!HH", frame, header)
            payload = frame[header + 8:]
            captured += 1
            self.learnt["captured"] = captured
            frames = self.wire.build(payload, (self.own, dport), source=(source, sport))
            for _ in range(2):
                self.wire.send(frames)
                self.sent["replayed -> sender"] = self.sent.get("replayed -> sender", 0) + 1


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=("attacker", "replayer"))
    parser.add_argument("--spec", required=True)
    parser.add_argument("--receiver", action="append", default=[],
                        help="a receiver's unicast ADDRESS:PORT (attacker) or ADDRESS")
    parser.add_argument("--image-size", type=int, default=0)
    parser.add_argument("--sender", default="10.99.0.1",
                        help="the sender's address (the replayer runs there)")
    parser.add_argument("--limit", type=int, default=12, help="replayer: datagrams to replay")
    parser.add_argument("--deadline", type=float, default=30.0, help="seconds to live")
    args = parser.parse_args()
    deadline = time.monotonic() + args.deadline

    def stop(*_: object) -> None:
        raise Stop("terminated")

    signal.signal(signal.SIGTERM, stop)
    agent: Optional[object] = None
    outcome = "done"
    try:
        spec = SessionSpec.load(args.spec)
        if args.role == "attacker":
            receivers = [(r.rsplit(":", 1)[0], int(r.rsplit(":", 1)[1])) for r in args.receiver]
            agent = Attacker(spec, args.sender, receivers, args.image_size, deadline)
        else:
            agent = Replayer(args.sender, args.receiver, deadline, args.limit)
        print("ready", flush=True)
        agent.run()  # type: ignore[attr-defined]
    except Stop as reason:
        outcome = str(reason)
    report = {"role": args.role, "outcome": outcome,
              "sent": getattr(agent, "sent", {}), "learnt": getattr(agent, "learnt", {}),
              "frames": agent.wire.sent if agent else 0,  # type: ignore[attr-defined]
              "send_errors": agent.wire.errors if agent else 0}  # type: ignore[attr-defined]
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
