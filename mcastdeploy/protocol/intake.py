"""Admission of arriving datagrams, shared by sender and receiver.

Everything from the network passes here first, so that the rules for what is even looked
at (well-formed, our session; later: authenticated) live in one place.
"""

from __future__ import annotations

from typing import Optional, Protocol, Union

from mcastdeploy import wire


class IntakeCounters(Protocol):
    invalid_packets: int
    foreign_packets: int


def admit(data: Union[bytes, memoryview], session_id: int,
          counters: IntakeCounters) -> Optional[wire.Packet]:
    """The parsed packet if it is well formed and of our session; else count it, None."""
    try:
        packet = wire.parse(data)
    except wire.WireError:
        counters.invalid_packets += 1
        return None
    if packet.header.session_id != session_id:
        counters.foreign_packets += 1
        return None
    return packet
