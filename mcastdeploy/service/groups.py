"""Which multicast group a new session gets: a free one whose Ethernet address is free too.

Switches forward IPv4 multicast by MAC address, 01:00:5e plus the group's **low 23 bits**,
so 32 groups share each MAC (239.192.1.2 and 239.64.1.2 alias, and so do 224.1.1.1 and
239.129.1.1).  Two sessions whose groups alias reach each other's agents through IGMP
snooping (their NICs then drop the other session's datagrams only in software), so a group
is chosen only if no session in flight uses its MAC.  Groups whose MAC is one of the
link-local control block's (01:00:5e:00:00:xx, i.e. 224.0.0.x) are never chosen: switches
flood those to every port whatever IGMP says.
"""

from __future__ import annotations

import ipaddress
import random
from typing import Iterable, Optional

from mcastdeploy.drivers.udp import FLOODED_MACS, MAC_BITS

#: Random tries before scanning the range in order (small ranges, nearly full).
_TRIES = 64


class NoFreeGroup(RuntimeError):
    """Every group of the range is taken (or aliases one in use)."""


def mac_of(group: str) -> int:
    """The low 23 bits of the group: what its Ethernet address carries."""
    return int(ipaddress.IPv4Address(group)) & MAC_BITS


def parse_range(text: str) -> ipaddress.IPv4Network:
    """'239.192.0.0/14' -> the network; ValueError (one line) unless it is multicast."""
    try:
        network = ipaddress.IPv4Network(text.strip(), strict=True)
    except ValueError as error:
        raise ValueError(f"bad group range {text!r}: {error}") from None
    if not network.is_multicast:
        raise ValueError(f"group range {text} is not multicast (224.0.0.0/4)")
    if network.subnet_of(ipaddress.IPv4Network("224.0.0.0/24")):
        raise ValueError(f"group range {text} is the link-local control block")
    return network


def allocate(network: ipaddress.IPv4Network, in_use: Iterable[str],
             rng: Optional[random.Random] = None) -> str:
    """A group of ``network`` whose MAC no group of ``in_use`` has; random, so that a
    restarted daemon or a second rack head rarely picks what another just used."""
    rng = rng or random.SystemRandom()
    taken = {mac_of(group) for group in in_use}
    first, size = int(network.network_address), network.num_addresses

    def usable(address: int) -> bool:
        mac = address & MAC_BITS
        return mac not in taken and mac not in FLOODED_MACS

    for _ in range(_TRIES):
        candidate = first + rng.randrange(size)
        if usable(candidate):
            return str(ipaddress.IPv4Address(candidate))
    # A small or crowded range: look at every address once (at most 2^23 distinct MACs).
    start = rng.randrange(size)
    for step in range(min(size, MAC_BITS + 1)):
        candidate = first + (start + step) % size
        if usable(candidate):
            return str(ipaddress.IPv4Address(candidate))
    raise NoFreeGroup(f"no free group in {network}: {len(taken)} in use")
