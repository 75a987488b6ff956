"""UDP multicast sockets: joining the group, choosing the interface, sizing buffers."""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from dataclasses import dataclass
from typing import Optional

import netifaces

#: Asked for on every socket; the kernel caps it at net.core.[rw]mem_max unless we are root.
SOCKET_BUFFER = 16 * 1024 * 1024


class NetworkError(OSError):
    """A network setting cannot be used (no such interface, not a multicast group, ...)."""


@dataclass(frozen=True)
class Interface:
    name: Optional[str]
    address: str  # IPv4 address the multicast goes out of and is joined on; 0.0.0.0 = any


def resolve_interface(spec: Optional[str]) -> Interface:
    """Turn an interface name ("eth0", "lo") or one of this host's IPv4 addresses into both."""
    if not spec:
        return Interface(None, "0.0.0.0")
    if spec in netifaces.interfaces():
        addresses = netifaces.ifaddresses(spec).get(netifaces.AF_INET, [])
        if not addresses:
            raise NetworkError(f"interface {spec} has no IPv4 address")
        return Interface(spec, addresses[0]["addr"])
    try:
        wanted = ipaddress.IPv4Address(spec)
    except ValueError:
        raise NetworkError(f"no such interface: {spec}") from None
    for name in netifaces.interfaces():
        for entry in netifaces.ifaddresses(name).get(netifaces.AF_INET, []):
            if entry.get("addr") == str(wanted):
                return Interface(name, str(wanted))
    raise NetworkError(f"no interface has the address {spec}")


#: Switches forward IPv4 multicast by MAC address, 01:00:5e plus the group's low 23 bits.
MAC_BITS = 0x7FFFFF
#: Low 23 bits of 224.0.0.0/24, the link-local control block: switches flood groups with
#: these MACs (224.0.0.x, and every 239.0.0.x, 239.128.0.x ... that aliases them) to every
#: port, whatever IGMP snooping says.
FLOODED_MACS = range(0, 256)


def check_group(group: str) -> str:
    try:
        address = ipaddress.IPv4Address(group)
    except ValueError:
        raise NetworkError(f"not an IPv4 address: {group!r}") from None
    if not address.is_multicast:
        raise NetworkError(f"{group} is not a multicast group (224.0.0.0/4)")
    if int(address) & MAC_BITS in FLOODED_MACS:
        raise NetworkError(f"{group} would reach every port of the switch whatever IGMP "
                           "snooping says (its MAC is the link-local control block's); "
                           "choose another, e.g. in 239.192.0.0/14")
    return str(address)


def _grow_buffers(sock: socket.socket) -> None:
    for force, plain in ((getattr(socket, "SO_RCVBUFFORCE", 33), socket.SO_RCVBUF),
                         (getattr(socket, "SO_SNDBUFFORCE", 32), socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
        except OSError:  # not root: the plain option, capped by the sysctl
            sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER)


def _bind(sock: socket.socket, address: tuple[str, int], what: str) -> None:
    try:
        sock.bind(address)
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            raise NetworkError(f"{what} port {address[1]} is in use") from None
        if error.errno == errno.EADDRNOTAVAIL:
            raise NetworkError(f"cannot bind {what} to {address[0]}") from None
        raise NetworkError(f"cannot bind {what} to {address[0]}:{address[1]}: "
                           f"{error.strerror}") from None


def open_sender_socket(interface: Interface, ttl: int, port: int = 0) -> socket.socket:
    """One socket for the sender: multicast out of ``interface``, NACK/STATUS in."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    _grow_buffers(sock)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, ttl)
    # Loop our multicast back so receivers on this very host (the demo, tests) hear it.
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
    if interface.address != "0.0.0.0":
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF,
                        socket.inet_aton(interface.address))
    _bind(sock, (interface.address, port), "sender")
    return sock


def open_group_socket(group: str, port: int, interface: Interface) -> socket.socket:
    """A receiver's socket joined to ``group``; several receivers on one host may share it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    _grow_buffers(sock)
    _bind(sock, (group, port), "group")
    membership = struct.pack("4s4s", socket.inet_aton(group), socket.inet_aton(interface.address))
    try:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
    except OSError as error:
        sock.close()
        where = interface.name or "the default interface"
        raise NetworkError(f"cannot join {group} on {where}: {error.strerror}") from None
    return sock


def open_unicast_socket(interface: Interface) -> socket.socket:
    """A receiver's socket for NACK/STATUS/DONE to the sender (and its unicast replies)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    _grow_buffers(sock)
    _bind(sock, (interface.address, 0), "unicast")
    return sock
