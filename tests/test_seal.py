"""Packet protection (wire/seal.py): what is accepted, what is refused, and why."""

from __future__ import annotations

import pytest

from mcastdeploy import wire
from mcastdeploy.wire import seal
from mcastdeploy.wire.seal import AuthError, Opener, ReplayError, Sealer, session_cipher

SECRET = bytes(range(32))
SID = 0x1122334455667788


def status_datagram(origin: int = 7, session: int = SID) -> bytes:
    return wire.encode(session, origin, wire.Nack(((3, 2), (9, 1))))


def pair(encrypt: bool = False, session: int = SID) -> tuple[Sealer, Opener]:
    cipher = session_cipher(SECRET, session)
    return (Sealer(cipher, 7, encrypt=encrypt, first_counter=100),
            Opener(session_cipher(SECRET, session), encrypt=encrypt))


@pytest.mark.parametrize("encrypt", [False, True])
def test_sealed_datagrams_open_to_the_original(encrypt: bool) -> None:
    sealer, opener = pair(encrypt)
    plain = status_datagram()
    sealed = sealer.seal(plain)
    assert len(sealed) == len(plain) + seal.OVERHEAD
    assert opener.open(sealed) == plain
    assert wire.parse(opener.open(sealer.seal(plain))).body == wire.parse(plain).body
    body = plain[wire.HEADER_SIZE:]
    assert (body in sealed) is not encrypt  # encryption hides the body, the header stays


@pytest.mark.parametrize("encrypt", [False, True])
def test_any_changed_byte_fails_authentication(encrypt: bool) -> None:
    sealer, opener = pair(encrypt)
    sealed = sealer.seal(status_datagram())
    for index in range(len(sealed)):
        damaged = bytearray(sealed)
        damaged[index] ^= 0x01
        with pytest.raises(AuthError):
            opener.open(bytes(damaged))
    assert opener.open(sealed)  # the original still opens: failures left no trace


def test_other_key_or_session_fails() -> None:
    sealed = pair()[0].seal(status_datagram())
    with pytest.raises(AuthError):
        Opener(session_cipher(bytes(32), SID)).open(sealed)
    # The same secret in another session's spec derives another key.
    with pytest.raises(AuthError):
        Opener(session_cipher(SECRET, SID + 1)).open(sealed)


def test_truncated_or_extended_datagrams_fail() -> None:
    sealer, opener = pair()
    sealed = sealer.seal(status_datagram())
    for bad in (sealed[:-1], sealed + b"\0", sealed[:wire.HEADER_SIZE], b""):
        with pytest.raises(AuthError):
            opener.open(bad)


def test_replays_are_refused_and_reordering_is_not() -> None:
    sealer, opener = pair()
    first, second, third = (sealer.seal(status_datagram()) for _ in range(3))
    opener.open(third)
    opener.open(first)  # late but new: accepted once
    with pytest.raises(ReplayError):
        opener.open(first)
    with pytest.raises(ReplayError):
        opener.open(third)
    opener.open(second)


def test_packets_older_than_the_window_are_refused() -> None:
    sealer, opener = pair()
    old = sealer.seal(status_datagram())
    for _ in range(seal.WINDOW):
        opener.open(sealer.seal(status_datagram()))
    with pytest.raises(ReplayError):
        opener.open(old)


def test_a_counter_far_ahead_moves_the_window_without_a_huge_shift() -> None:
    # Found by tools/fuzz: accepting a counter 2^63 past the highest shifted the bitmap
    # by that much, so one sealed packet raised MemoryError in the sender or a receiver.
    cipher = session_cipher(SECRET, SID)
    opener = Opener(cipher)
    first, second = Sealer(cipher, 7, first_counter=1), Sealer(cipher, 7, first_counter=2)
    old = first.seal(status_datagram())
    opener.open(old)
    opener.open(second.seal(status_datagram()))
    far = Sealer(cipher, 7, first_counter=2**64 - 2)
    opener.open(far.seal(status_datagram()))
    with pytest.raises(ReplayError):  # everything before is now too old
        opener.open(old)
    later = far.seal(status_datagram())  # and the window goes on from the new counter
    assert opener.open(later)
    with pytest.raises(ReplayError):
        opener.open(later)


def test_each_origin_has_its_own_window() -> None:
    cipher = session_cipher(SECRET, SID)
    opener = Opener(cipher)
    a, b = Sealer(cipher, 1, first_counter=5), Sealer(cipher, 2, first_counter=5)
    assert opener.open(a.seal(status_datagram(1))) and opener.open(b.seal(status_datagram(2)))


def test_nonces_never_repeat_within_a_sealer() -> None:
    sealer, _ = pair()
    counters = {sealer.seal(status_datagram())[wire.HEADER_SIZE:wire.HEADER_SIZE + 8]
                for _ in range(1000)}
    assert len(counters) == 1000
    # A fresh sealer starts at a random counter, not at zero.
    assert Sealer(session_cipher(SECRET, SID), 7)._counter != Sealer(
        session_cipher(SECRET, SID), 7)._counter


def test_a_key_must_be_32_bytes() -> None:
    with pytest.raises(ValueError):
        session_cipher(b"short", SID)
    assert len(seal.new_key()) == seal.KEY_BYTES


@pytest.mark.parametrize("encrypt", [False, True])
def test_a_payload_passed_apart_seals_as_if_joined(encrypt: bool) -> None:
    cipher = session_cipher(SECRET, SID)
    head = wire.encode_data_header(SID, 7, 3, 1)
    payload = memoryview(bytes(range(200)))
    joined = Sealer(cipher, 7, encrypt=encrypt, first_counter=9).seal(head + bytes(payload))
    apart = Sealer(cipher, 7, encrypt=encrypt, first_counter=9).seal(head, payload)
    assert apart == joined
    assert Opener(cipher, encrypt=encrypt).open(apart) == head + bytes(payload)
