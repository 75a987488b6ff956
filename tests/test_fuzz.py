"""The short fuzz: tools/fuzz's generator for 20,000 inputs, plus hypothesis on the parsers.

Whatever arrives, ``wire.parse`` raises only WireError, an Opener only AuthError, and
``intake.admit`` and the state machines nothing.  The long run (10^6 inputs) is
``tools/fuzz``; docs/security-fuzz.rst records its figures.
"""

from __future__ import annotations

import os
import random
import sys

from hypothesis import given, settings
from hypothesis import strategies as st

from mcastdeploy import wire
from mcastdeploy.protocol.intake import Protection, admit
from mcastdeploy.protocol.receiver import Receiver, ReceiverConfig
from mcastdeploy.wire.seal import AuthError, Opener, Sealer, session_cipher

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
if TOOLS not in sys.path:
    sys.path.insert(0, TOOLS)

import fuzzing  # noqa: E402


def test_twenty_thousand_hostile_inputs_raise_nothing_unexpected() -> None:
    report = fuzzing.fuzz(20_000, seed=1)
    assert not report.failure_kinds, fuzzing.format_report(report)
    outcomes = report.outcomes
    # The generator reached every door, and each door both let in and turned away.
    for stage in ("keyed sender", "keyed receiver"):
        for verdict in ("invalid", "foreign", "unauthentic", "replayed"):
            assert outcomes[stage][verdict] > 0, (stage, outcomes[stage])
    assert outcomes["keyed sender"]["accepted"] > 0
    assert outcomes["plain receiver"]["accepted"] > 0
    assert outcomes["open"]["ok"] > 0 and outcomes["open"]["ReplayError"] > 0
    assert any(k.startswith("accepted:") for k in outcomes["admit"])
    assert report.phases["receiver receiving"] > report.inputs  # both pairs, mostly live
    assert report.phases["sender sending"] > 0 and report.phases["sender repairing"] > 0
    # Live pairs finished and were renewed, and a keyless one even completed its copy.
    assert sum(report.pairs.values()) >= 4, report.pairs
    assert not any("DIFFERS" in outcome for outcome in report.pairs), report.pairs


SID = fuzzing.SID
KEY = fuzzing.KEY


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=3000))
def test_parse_raises_only_wire_error(data: bytes) -> None:
    try:
        wire.parse(data)
    except wire.WireError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(list(wire.PacketType)), st.binary(max_size=2000), st.booleans())
def test_admit_and_a_joined_receiver_take_any_body_under_a_valid_header(
        ptype: wire.PacketType, body: bytes, sealed: bool) -> None:
    """After a genuine ANNOUNCE, a datagram from the sender's origin with a header that
    passes and any body, sealed by an insider or not: refused or handled, never raised."""
    origin = 0x5E4D
    cipher = session_cipher(KEY, SID)
    announce = wire.encode(SID, origin, wire.Announce(
        image_size=5000, symbol_size=256, block_symbols=4, block_count=5, next_block=2,
        rate_bps=10**6, grtt_us=1000, group_size=1, proactive_repair=1,
        checksum=bytes(32), sender_host="10.0.0.1", sender_port=5000))
    plain = wire.packets.HEADER.pack(wire.packets.MAGIC, wire.packets.VERSION, ptype, 0,
                                     SID, origin) + body
    data = Sealer(cipher, origin, first_counter=2).seal(plain) if sealed else plain
    try:
        Opener(cipher).open(data)
    except AuthError:
        pass
    admit(data, SID, fuzzing.Counts(), Protection(KEY, SID, origin=1))
    receiver = Receiver(ReceiverConfig(session_id=SID, key=KEY), origin=2,
                        rng=random.Random(0))
    receiver.start(0.0)
    receiver.receive_datagram(Sealer(cipher, origin, first_counter=1).seal(announce),
                              ("10.0.0.1", 5000), 0.0)
    assert receiver.geometry is not None  # joined: the input meets the deep checks
    receiver.receive_datagram(data, ("10.0.0.66", 1), 0.01)
    for now in (0.02, 1.0, 5.0):
        receiver.handle_timer(now)
        receiver.datagrams_to_send(now)
        while receiver.next_event() is not None:
            pass
