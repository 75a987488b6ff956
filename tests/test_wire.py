"""The wire format: every packet round-trips, and parse() rejects bad bytes with WireError only."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mcastdeploy import wire
from mcastdeploy.wire.packets import (BACKLOG, DATA_BODY, ECHO, HEADER, MAGIC, NACK_COUNT,
                                      NACK_ENTRY, VERSION)

BOUNDED = settings(max_examples=300, deadline=None, derandomize=True,
                   suppress_health_check=[HealthCheck.too_slow])

U32 = 2**32 - 1
U64 = 2**64 - 1

session_ids = st.integers(0, U64)
origins = st.integers(0, U32)
flag_values = st.integers(0, 255).map(wire.Flags)
checksums = st.binary(min_size=32, max_size=32)
hosts = st.one_of(
    st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n))),
    st.integers(0, 2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n))),
    st.sampled_from(["0.0.0.0", "::"]),
)

MAX_SYMBOL_SIZE = wire.MAX_DATAGRAM - wire.HEADER_SIZE - DATA_BODY.size


@st.composite
def announces(draw: st.DrawFn) -> wire.Announce:
    k = draw(st.integers(1, wire.MAX_BLOCK_SYMBOLS))
    symbol_size = draw(st.one_of(st.integers(1, 2000), st.integers(1, MAX_SYMBOL_SIZE)))
    block_bytes = k * symbol_size
    image_size = draw(st.integers(1, min(U64, U32 * block_bytes)))
    block_count = -(-image_size // block_bytes)
    return wire.Announce(
        image_size=image_size,
        symbol_size=symbol_size,
        block_symbols=k,
        block_count=block_count,
        next_block=draw(st.integers(0, block_count)),
        rate_bps=draw(st.integers(0, U64)),
        grtt_us=draw(st.integers(0, U32)),
        group_size=draw(st.integers(0, U32)),
        proactive_repair=draw(st.integers(0, wire.MAX_SYMBOL_ID + 1 - k)),
        checksum=draw(checksums),
        sender_host=draw(hosts),
        sender_port=draw(st.integers(0, 65535)),
        timestamp_us=draw(st.integers(0, U64)),
        backlog_us=draw(st.integers(0, U32)),
    )


datas = st.builds(wire.Data, block=st.integers(0, U32), symbol=st.integers(0, wire.MAX_SYMBOL_ID),
                  payload=st.binary(min_size=1, max_size=1500))
block_counts = st.lists(st.tuples(st.integers(0, U32), st.integers(1, 255)),
                        min_size=1, max_size=wire.MAX_NACK_ENTRIES).map(tuple)
nacks = st.builds(wire.Nack, needs=block_counts, echo_us=st.integers(0, U64),
                  hold_us=st.integers(0, U32))
notices = st.builds(wire.RepairNotice, scheduled=block_counts, backlog_us=st.integers(0, U32))


@st.composite
def statuses(draw: st.DrawFn) -> wire.Status:
    count = draw(st.integers(0, U32))
    done = draw(st.integers(0, count))
    # How the done blocks came: any split of them (the rest by multicast).
    cuts = sorted(draw(st.lists(st.integers(0, done), min_size=4, max_size=4)))
    peers, source, origin, in_place = (b - a for a, b in zip([0] + cuts, cuts))
    return wire.Status(state=draw(st.sampled_from(list(wire.ReceiverState))),
                       blocks_done=done, block_count=count,
                       blocks_from_peers=peers, blocks_from_source=source,
                       blocks_from_origin=origin, blocks_in_place=in_place,
                       packets_received=draw(st.integers(0, U64)),
                       packets_lost=draw(st.integers(0, U64)), nacks_sent=draw(st.integers(0, U32)),
                       echo_us=draw(st.integers(0, U64)), hold_us=draw(st.integers(0, U32)),
                       node_id=draw(st.integers(0, U64)), seed_port=draw(st.integers(0, 65535)))


ipv4_hosts = st.integers(1, 2**32 - 2).map(ipaddress.IPv4Address).filter(
    lambda a: not a.is_multicast).map(str)
peer_requests = st.builds(wire.PeerRequest, blocks_missing=st.integers(0, U32),
                          exclude=st.lists(origins, max_size=32).map(tuple))
peer_lists = st.builds(wire.Peers, peers=st.lists(st.builds(
    wire.PeerAddress, host=ipv4_hosts, port=st.integers(1, 65535), origin=origins),
    max_size=wire.packets.MAX_PEERS).map(tuple), source_port=st.integers(0, 65535))


manifests = st.builds(wire.Manifest, first=st.integers(0, U32),
                      hashes=st.lists(checksums, min_size=1,
                                      max_size=wire.MAX_MANIFEST_HASHES).map(tuple))
bodies = st.one_of(announces(), datas, nacks, notices, statuses(),
                   st.builds(wire.Done, checksum=checksums), st.just(wire.End()), manifests,
                   peer_requests, peer_lists)


@st.composite
def datagrams(draw: st.DrawFn) -> bytes:
    return wire.encode(draw(session_ids), draw(origins), draw(bodies), draw(flag_values))


# --- round trips ---------------------------------------------------------------------------


@BOUNDED
@given(session_ids, origins, bodies, flag_values)
def test_every_packet_round_trips(session_id: int, origin: int, body: wire.packets.Body,
                                  flags: wire.Flags) -> None:
    data = wire.encode(session_id, origin, body, flags)
    packet = wire.parse(data)
    assert packet.header == wire.Header(body.TYPE, session_id, origin, flags)
    assert int(packet.header.flags) == int(flags)
    assert type(packet.body) is type(body)
    assert packet.body == body
    if isinstance(body, wire.Data):
        assert bytes(packet.body.payload) == bytes(body.payload)
    assert wire.parse_header(data) == packet.header


@BOUNDED
@given(session_ids, origins, datas, flag_values)
def test_data_header_for_gathered_send_matches_encode(session_id: int, origin: int,
                                                      data: wire.Data, flags: wire.Flags) -> None:
    gathered = wire.encode_data_header(session_id, origin, data.block, data.symbol, flags)
    assert gathered + data.payload == wire.encode(session_id, origin, data, flags)


# --- parse never raises anything but WireError ------------------------------------------------


def _parse_or_wire_error(data: bytes) -> None:
    try:
        packet = wire.parse(data)
    except wire.WireError:
        return
    assert isinstance(packet, wire.Packet)
    # Whatever parses is a fixed point: re-encoding it parses to the same packet.
    header = packet.header
    again = wire.encode(header.session_id, header.origin, packet.body, header.flags)
    assert wire.parse(again) == packet


@BOUNDED
@given(st.binary(max_size=2000))
def test_parse_arbitrary_bytes(data: bytes) -> None:
    _parse_or_wire_error(data)


@BOUNDED
@given(st.integers(0, 255), st.integers(0, 255), st.binary(min_size=12, max_size=12),
       st.binary(max_size=2000))
def test_parse_arbitrary_body_behind_plausible_header(ptype: int, flags: int, ids: bytes,
                                                      body: bytes) -> None:
    # Random bytes almost never carry the magic; this reaches every body parser.
    _parse_or_wire_error(MAGIC + bytes([VERSION, ptype % 8, flags, 0, 0, 0]) + ids + body)


_MUTATIONS = ("truncate", "flip", "extend", "version", "type", "magic", "set_byte")


@BOUNDED
@given(datagrams(), st.sampled_from(_MUTATIONS), st.integers(0, 2**31), st.integers(0, 255),
       st.binary(min_size=1, max_size=64))
def test_parse_mutated_valid_packets(data: bytes, mutation: str, position: int, value: int,
                                     extra: bytes) -> None:
    buf = bytearray(data)
    if mutation == "truncate":
        del buf[position % len(buf):]
    elif mutation == "flip":
        buf[position % len(buf)] ^= 1 << (value % 8)
    elif mutation == "extend":
        buf += extra
    elif mutation == "version":
        buf[2] = value
    elif mutation == "type":
        buf[3] = value
    elif mutation == "magic":
        buf[position % 2] = value
    else:
        buf[position % len(buf)] = value
    mutated = bytes(buf)
    if mutation == "version" and value != VERSION:
        with pytest.raises(wire.WireError):
            wire.parse(mutated)
    elif mutation == "type" and value not in set(wire.PacketType):
        with pytest.raises(wire.WireError):
            wire.parse(mutated)
    elif mutation == "magic" and bytes(buf[:2]) != MAGIC:
        with pytest.raises(wire.WireError):
            wire.parse(mutated)
    elif mutation == "truncate" and len(mutated) < wire.HEADER_SIZE:
        with pytest.raises(wire.WireError):
            wire.parse(mutated)
    else:
        _parse_or_wire_error(mutated)


@BOUNDED
@given(datagrams().filter(lambda d: d[3] not in (wire.PacketType.DATA, wire.PacketType.MANIFEST)),
       st.binary(min_size=1, max_size=64))
def test_fixed_size_bodies_reject_trailing_bytes(data: bytes, extra: bytes) -> None:
    # DATA's payload is open-ended and MANIFEST holds 1..40 hashes; every other body has an
    # exact length.
    with pytest.raises(wire.WireError):
        wire.parse(data + extra)


# --- specific rejects ----------------------------------------------------------------------


def _raw(ptype: int, body: bytes, *, magic: bytes = MAGIC, version: int = VERSION,
         flags: int = 0) -> bytes:
    return HEADER.pack(magic, version, ptype, flags, 1, 2) + body


def _rejects(data: bytes, match: str) -> None:
    with pytest.raises(wire.WireError, match=match):
        wire.parse(data)


def _announce_body(**changes: object) -> bytes:
    fields = dict(size=10_000, sym=1000, k=4, blocks=3, next_block=0, rate=10**8, grtt=10_000,
                  group=1, proactive=1, checksum=bytes(32), family=4, addr=bytes(16), port=0,
                  timestamp=0, backlog=0)
    fields.update(changes)
    return wire.Announce.BODY.pack(*fields.values())


def test_valid_raw_announce_parses() -> None:
    # The baseline the rejects below alter one field of.
    packet = wire.parse(_raw(wire.PacketType.ANNOUNCE, _announce_body()))
    assert packet.body == wire.Announce(10_000, 1000, 4, 3, 0, 10**8, 10_000, 1, 1, bytes(32),
                                        "0.0.0.0", 0)


@pytest.mark.parametrize("length", [0, 1, 2, 19])
def test_reject_short_header(length: int) -> None:
    _rejects(wire.encode(1, 2, wire.End())[:length], "shorter than the header")


def test_reject_bad_magic() -> None:
    _rejects(_raw(wire.PacketType.END, b"", magic=b"MX"), "magic")


@pytest.mark.parametrize("version", [0, 2, 255])
def test_reject_other_versions(version: int) -> None:
    _rejects(_raw(wire.PacketType.END, b"", version=version), "version")


@pytest.mark.parametrize("ptype", [0, 11, 255])
def test_reject_unknown_type(ptype: int) -> None:
    _rejects(_raw(ptype, b""), "unknown packet type")


def test_reject_malformed_manifests() -> None:
    first = struct.pack("!I", 40)
    _rejects(_raw(wire.PacketType.MANIFEST, first), "truncated")
    _rejects(_raw(wire.PacketType.MANIFEST, first + bytes(33)), "whole number")
    _rejects(_raw(wire.PacketType.MANIFEST, first + bytes(32 * (wire.MAX_MANIFEST_HASHES + 1))),
             "too many")
    with pytest.raises(wire.WireError):
        wire.encode(1, 2, wire.Manifest(0, ()))
    with pytest.raises(wire.WireError):
        wire.encode(1, 2, wire.Manifest(0, (b"short",)))


def test_reject_repair_notice_entry_counts() -> None:
    backlog = BACKLOG.pack(1000)
    _rejects(_raw(wire.PacketType.REPAIR_NOTICE, b"\0\0"), "truncated")
    _rejects(_raw(wire.PacketType.REPAIR_NOTICE, backlog + NACK_COUNT.pack(0)), "entries")
    _rejects(_raw(wire.PacketType.REPAIR_NOTICE,
                  backlog + NACK_COUNT.pack(1) + NACK_ENTRY.pack(3, 0)), "zero symbols")


def _nack(body: bytes, echo: int = 0, hold: int = 0) -> bytes:
    return _raw(wire.PacketType.NACK, ECHO.pack(echo, hold) + body)


def test_reject_nack_entry_counts() -> None:
    _rejects(_nack(NACK_COUNT.pack(0)), "entries")
    too_many = wire.MAX_NACK_ENTRIES + 1
    entries = NACK_ENTRY.pack(0, 1) * too_many
    _rejects(_nack(NACK_COUNT.pack(too_many) + entries), "entries")
    full = NACK_COUNT.pack(wire.MAX_NACK_ENTRIES) + NACK_ENTRY.pack(7, 1) * wire.MAX_NACK_ENTRIES
    assert len(wire.parse(_nack(full)).body.needs) == wire.MAX_NACK_ENTRIES
    for needs in ((), ((0, 1),) * too_many):
        with pytest.raises(wire.WireError):
            wire.encode(1, 2, wire.Nack(needs))


def test_reject_nack_zero_need_and_wrong_length() -> None:
    _rejects(_nack(NACK_COUNT.pack(2) + NACK_ENTRY.pack(1, 3) + NACK_ENTRY.pack(2, 0)), "zero")
    body = NACK_COUNT.pack(2) + NACK_ENTRY.pack(1, 3) + NACK_ENTRY.pack(2, 4)
    parsed = wire.parse(_nack(body, echo=123, hold=45)).body
    assert (parsed.needs, parsed.echo_us, parsed.hold_us) == (((1, 3), (2, 4)), 123, 45)
    _rejects(_nack(body[:-1]), "length")
    _rejects(_nack(body + b"\0"), "length")
    _rejects(_raw(wire.PacketType.NACK, b"\0"), "truncated")
    _rejects(_nack(b"\0"), "truncated")


@pytest.mark.parametrize("changes, match", [
    (dict(blocks=2), "block count"),
    (dict(blocks=4), "block count"),
    (dict(k=0), "block symbols"),
    (dict(k=255, proactive=0), "block symbols"),
    (dict(size=0, blocks=0), "empty image"),
    (dict(sym=0), "symbol size"),
    (dict(sym=65535, blocks=1), "symbol size"),
    (dict(k=250, proactive=6, blocks=1), "proactive"),
    (dict(next_block=4), "next block"),
    (dict(family=5), "address family"),
])
def test_reject_inconsistent_announce(changes: dict, match: str) -> None:
    _rejects(_raw(wire.PacketType.ANNOUNCE, _announce_body(**changes)), match)


def test_reject_announce_wrong_length() -> None:
    _rejects(_raw(wire.PacketType.ANNOUNCE, _announce_body()[:-1]), "expected")


def test_reject_status_done_beyond_count_and_unknown_state() -> None:
    layout = wire.Status.BODY
    ok = wire.parse(_raw(wire.PacketType.STATUS,
                         layout.pack(3, 6790, 5, 5, 1, 0, 0, 9, 8, 77, 1, 1, 1, 2))).body
    assert ok.state is wire.ReceiverState.DONE and ok.blocks_done == ok.block_count == 5
    assert (ok.echo_us, ok.hold_us, ok.node_id, ok.seed_port) == (9, 8, 77, 6790)
    assert (ok.blocks_from_peers, ok.blocks_from_source, ok.blocks_from_origin,
            ok.blocks_in_place) == (1, 1, 1, 2)
    _rejects(_raw(wire.PacketType.STATUS, layout.pack(1, 0, 6, 5, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0)),
             "more blocks done")
    _rejects(_raw(wire.PacketType.STATUS, layout.pack(5, 0, 0, 5, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0)),
             "unknown state")
    # A STATUS of before the split is read with the split unknown.
    older = wire.parse(_raw(wire.PacketType.STATUS,
                            layout.pack(1, 0, 3, 5, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0)[:-16])).body
    assert older.blocks_done == 3 and older.blocks_from_peers == older.blocks_in_place == 0
    _rejects(_raw(wire.PacketType.STATUS, layout.pack(1, 0, 3, 5, *(0,) * 10)[:-15]),
             "expected")
    # A split of the done blocks that adds up to more than were done.
    _rejects(_raw(wire.PacketType.STATUS, layout.pack(1, 0, 3, 5, 1, 0, 0, 0, 0, 0, 2, 0, 0, 2)),
             "more blocks accounted")


def test_reject_malformed_peer_packets() -> None:
    from mcastdeploy.wire.packets import PEER_ENTRY, PEERS_HEAD
    _rejects(_raw(wire.PacketType.PEER_REQUEST, b"\0\0"), "truncated")
    _rejects(_raw(wire.PacketType.PEER_REQUEST, wire.PeerRequest.BODY.pack(5, 2) + bytes(4)),
             "length")
    _rejects(_raw(wire.PacketType.PEER_REQUEST, wire.PeerRequest.BODY.pack(5, 33)
                  + bytes(4 * 33)), "excluded")
    _rejects(_raw(wire.PacketType.PEERS, b"\0"), "truncated")
    _rejects(_raw(wire.PacketType.PEERS, PEERS_HEAD.pack(0, 17) + bytes(10 * 17)), "17 peers")
    _rejects(_raw(wire.PacketType.PEERS, PEERS_HEAD.pack(0, 2) + bytes(10)), "length")
    # Addresses nobody can connect to are malformed: a group, 0.0.0.0, port 0.
    for host, port in ((bytes([239, 1, 1, 1]), 5), (bytes(4), 5), (bytes([10, 0, 0, 1]), 0),
                       (b"\xff" * 4, 5)):
        _rejects(_raw(wire.PacketType.PEERS, PEERS_HEAD.pack(0, 1)
                      + PEER_ENTRY.pack(host, port, 1)), "no address")


def test_reject_bad_data_end_done() -> None:
    _rejects(_raw(wire.PacketType.DATA, DATA_BODY.pack(0, 255) + b"x"), "symbol id")
    _rejects(_raw(wire.PacketType.DATA, DATA_BODY.pack(0, 1)), "truncated")
    _rejects(_raw(wire.PacketType.END, b"\0"), "END")
    _rejects(_raw(wire.PacketType.DONE, bytes(31)), "DONE")


def test_reject_oversize_datagram() -> None:
    payload = bytes(wire.MAX_DATAGRAM - wire.HEADER_SIZE - DATA_BODY.size)
    largest = wire.encode(1, 2, wire.Data(0, 0, payload))
    assert len(largest) == wire.MAX_DATAGRAM
    assert bytes(wire.parse(largest).body.payload) == payload
    _rejects(largest + b"\0", "too long")
    with pytest.raises(wire.WireError, match="exceeds"):
        wire.encode(1, 2, wire.Data(0, 0, payload + b"\0"))


def test_unknown_flag_bits_are_kept() -> None:
    packet = wire.parse(_raw(wire.PacketType.END, b"", flags=0xF1))
    assert packet.header.flags == 0xF1
    assert packet.header.flags & wire.Flags.REPAIR
    assert not packet.header.flags & wire.Flags.WAITING


def test_header_field_layout() -> None:
    data = wire.encode(0x0102030405060708, 0x0A0B0C0D, wire.End(), wire.Flags.WAITING)
    assert data == b"MD\x01\x06\x08\0\0\0" + bytes(range(1, 9)) + bytes([10, 11, 12, 13])
    assert struct.calcsize("!2sBBB3xQI") == wire.HEADER_SIZE == 20
