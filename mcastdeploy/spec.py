"""The session spec: one JSON document that flows operator -> sender -> Ironic node -> agent.

Everything both ends must agree on lives here (group, port, session id, block layout, rate),
so that ``send`` and ``recv`` only need the spec and an image or a target.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
import secrets
from dataclasses import dataclass
from typing import Any, Optional

from mcastdeploy import wire
from mcastdeploy.wire.seal import OVERHEAD as SEAL_OVERHEAD
from mcastdeploy.wire.seal import new_key

SPEC_VERSION = 1
#: What a spec's image pins may describe (SessionSpec.image_format).
IMAGE_FORMATS = ("raw", "qcow2")
DEFAULT_PORT = 6790
DEFAULT_RATE_BPS = 500_000_000
DEFAULT_SYMBOL_SIZE = 1400
DEFAULT_BLOCK_SYMBOLS = 32
DEFAULT_PROACTIVE_REPAIR = 1
#: Organisation-local scope (RFC 2365); a random group per session keeps concurrent
#: sessions on one network apart.
DEFAULT_GROUP_RANGE = ipaddress.IPv4Network("239.192.0.0/14")


class SpecError(ValueError):
    """A session spec is missing, unreadable or malformed; the message is one line."""


_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)(?:bit/s|bps|bit)?\s*$")
_RATE_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}


def parse_rate(text: str) -> int:
    """'500M' -> 500_000_000 bits per second ('k', 'M', 'G' are powers of 1000)."""
    match = _RATE.match(str(text))
    if not match:
        raise SpecError(f"bad rate {text!r}: use bits per second, e.g. 500M or 1G")
    rate = int(float(match.group(1)) * _RATE_UNITS[match.group(2).lower()])
    if rate <= 0:
        raise SpecError(f"bad rate {text!r}: must be positive")
    return rate


def parse_size(text: str) -> int:
    """'100G' -> bytes (K, M, G, T are powers of 1024; a trailing B or iB is allowed)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    clean = str(text).strip().upper().removesuffix("B").removesuffix("I")
    number, unit = (clean[:-1], clean[-1]) if clean and clean[-1] in units else (clean, "")
    try:
        size = int(float(number) * units[unit])
    except ValueError:
        raise SpecError(f"bad size {text!r}: use e.g. 64M or 100G") from None
    if size <= 0:
        raise SpecError(f"bad size {text!r}: must be positive")
    return size


RATE_MODES = ("fixed", "auto")
PROACTIVE_MODES = ("fixed", "auto")


#: (mode, bits per second): None for either leaves the spec's value as it is.
RateSetting = tuple[Optional[str], Optional[int]]


def parse_rate_setting(text: str) -> RateSetting:
    """'500M' -> ('fixed', 500M); 'auto' -> ('auto', None: keep the spec's rate as the
    ceiling); 'auto:1G' -> ('auto', 1G)."""
    word, colon, rest = str(text).strip().partition(":")
    if word.lower() == "auto":
        return "auto", parse_rate(rest) if colon else None
    return "fixed", parse_rate(text)


def parse_proactive_setting(text: str) -> tuple[str, Optional[int]]:
    """'2' -> ('fixed', 2); 'auto' -> ('auto', None: keep the spec's count as the floor);
    'auto:3' -> ('auto', 3)."""
    word, colon, rest = str(text).strip().partition(":")
    mode, number = ("auto", rest if colon else None) if word.lower() == "auto" \
        else ("fixed", str(text).strip())
    if number is not None and not number.isdigit():
        raise SpecError(f"bad proactive repair {text!r}: use a count or auto[:N]")
    return mode, int(number) if number is not None else None


@dataclass(frozen=True)
class SessionSpec:
    session_id: str  # 16 hex digits
    group: str
    #: The session secret, 64 hex digits: every packet is authenticated with a key derived
    #: from it (wire/seal.py).  Whoever holds the spec can join the session, or forge it.
    #: Kept out of repr: a spec logged or in a traceback must not leak it.
    key: str = dataclasses.field(repr=False)
    port: int = DEFAULT_PORT
    interface: Optional[str] = None
    ttl: int = 1
    rate_bps: int = DEFAULT_RATE_BPS
    #: "fixed": send at rate_bps; "auto": rate_bps is the ceiling, and the sender picks
    #: the rate from the group's loss reports (protocol/ratecontrol.py).
    rate_mode: str = "fixed"
    symbol_size: int = DEFAULT_SYMBOL_SIZE
    block_symbols: int = DEFAULT_BLOCK_SYMBOLS
    proactive_repair: int = DEFAULT_PROACTIVE_REPAIR
    #: "fixed": that many repair symbols per block; "auto" (the default): at least that
    #: many, more as the group's size and loss reports call for (protocol/parity.py), so
    #: that a rack of 8 and a fleet of 10,000 both get about one NACK per block.
    proactive_mode: str = "auto"
    #: Pinned by the operator (or Ironic's image checksum): receivers refuse anything else.
    image_sha256: Optional[str] = None
    image_size: Optional[int] = None
    #: What the pins describe: "raw" (the bytes that land on disk, checked by sender and
    #: receivers) or "qcow2" (the qcow2 file as stored, as Ironic's checksum is; the sender
    #: checks it before converting, receivers check the raw image the sender announces).
    image_format: str = "raw"
    #: Encrypt payloads too, not only authenticate them (images with secrets in them).
    encrypt: bool = False
    #: The sender's unicast address, "IPv4:port" (the sender binds that port): receivers
    #: report there before they hear any ANNOUNCE, so that one behind a switch or firewall
    #: that drops the group still joins, by unicast, and fetches from peers
    #: (docs/peers.rst).  None: receivers learn the address from ANNOUNCE only.
    sender: Optional[str] = None
    version: int = SPEC_VERSION

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def session_number(self) -> int:
        return int(self.session_id, 16)

    @property
    def sender_address(self) -> Optional[tuple[str, int]]:
        """``sender`` as (host, port), or None."""
        if self.sender is None:
            return None
        host, _, port = self.sender.rpartition(":")
        return host, int(port)

    @property
    def key_bytes(self) -> bytes:
        return bytes.fromhex(self.key)

    @property
    def image_checksum(self) -> Optional[bytes]:
        return bytes.fromhex(self.image_sha256) if self.image_sha256 else None

    @property
    def disk_checksum(self) -> Optional[bytes]:
        """The pinned SHA-256 of the bytes that land on disk, if the pin is of those."""
        return self.image_checksum if self.image_format == "raw" else None

    @property
    def disk_size(self) -> Optional[int]:
        """The pinned size of the bytes that land on disk, if the pin is of those."""
        return self.image_size if self.image_format == "raw" else None

    def replace(self, **changes: Any) -> "SessionSpec":
        """A copy with ``changes`` applied (None values are ignored: unset CLI options)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: Any) -> "SessionSpec":
        if not isinstance(data, dict):
            raise SpecError("a session spec is a JSON object")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise SpecError(f"unknown session spec field {unknown[0]!r}")
        missing = [name for name in ("session_id", "group", "key") if name not in data]
        if missing:
            raise SpecError(f"session spec lacks {missing[0]!r}")
        try:
            return cls(**data)
        except TypeError as error:
            raise SpecError(f"bad session spec: {error}") from None

    @classmethod
    def load(cls, path: str) -> "SessionSpec":
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except OSError as error:
            raise SpecError(f"cannot read session spec {path}: {error.strerror}") from None
        except UnicodeDecodeError:
            raise SpecError(f"session spec {path} is not UTF-8 text") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise SpecError(f"session spec {path} is not valid JSON: {error.msg} "
                            f"(line {error.lineno})") from None
        return cls.from_dict(data)

    def save(self, path: str) -> None:
        """Write atomically with mode 0600: later versions carry the session key in it.

        Only a regular file is replaced: the rename would put a file where a device such as
        /dev/full was, and report success for bytes that went nowhere."""
        if os.path.exists(path) and not os.path.isfile(path):
            raise SpecError(f"cannot write session spec to {path}: not a regular file")
        temporary = f"{path}.tmp{os.getpid()}"
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        except OSError as error:
            raise SpecError(f"cannot write session spec to {path}: {error.strerror}") from None
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(self.to_json())
            os.replace(temporary, path)
        except BaseException:
            if os.path.exists(temporary):
                os.unlink(temporary)
            raise


def new_session(**settings: Any) -> SessionSpec:
    """A fresh spec: random session id and key and, unless given, a random group in
    239.192/14."""
    if settings.get("group") is None:
        offset = secrets.randbelow(DEFAULT_GROUP_RANGE.num_addresses - 2) + 1
        settings["group"] = str(DEFAULT_GROUP_RANGE.network_address + offset)
    return SessionSpec(session_id=secrets.token_hex(8), key=new_key().hex(),
                       **{k: v for k, v in settings.items() if v is not None})


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise SpecError(f"session spec field {name!r} must be an integer in {low}..{high}")


def _validate(spec: SessionSpec) -> None:
    if spec.version != SPEC_VERSION:
        raise SpecError(f"session spec version {spec.version!r} is not supported "
                        f"(this is version {SPEC_VERSION})")
    if not isinstance(spec.session_id, str) or not re.fullmatch(r"[0-9a-f]{16}", spec.session_id):
        raise SpecError("session spec field 'session_id' must be 16 lowercase hex digits")
    if not isinstance(spec.key, str) or not re.fullmatch(r"[0-9a-f]{64}", spec.key):
        raise SpecError("session spec field 'key' must be 64 lowercase hex digits "
                        "(make one with 'mcastdeploy session new')")
    if not isinstance(spec.encrypt, bool):
        raise SpecError("session spec field 'encrypt' must be true or false")
    try:
        group = ipaddress.IPv4Address(spec.group)
    except (ValueError, TypeError):
        raise SpecError(f"group {spec.group!r} is not an IPv4 address") from None
    if not group.is_multicast:
        raise SpecError(f"group {spec.group} is not a multicast address (224.0.0.0/4)")
    _check_int("port", spec.port, 1, 65535)
    _check_int("ttl", spec.ttl, 1, 255)
    _check_int("rate_bps", spec.rate_bps, 1000, 400_000_000_000)
    if spec.proactive_mode not in PROACTIVE_MODES:
        raise SpecError("session spec field 'proactive_mode' must be one of "
                        f"{', '.join(PROACTIVE_MODES)}")
    if spec.rate_mode not in RATE_MODES:
        raise SpecError(f"session spec field 'rate_mode' must be one of {', '.join(RATE_MODES)}")
    _check_int("symbol_size", spec.symbol_size, 16,
               wire.MAX_DATAGRAM - wire.HEADER_SIZE - 8 - SEAL_OVERHEAD)
    _check_int("block_symbols", spec.block_symbols, 1, wire.MAX_BLOCK_SYMBOLS)
    _check_int("proactive_repair", spec.proactive_repair, 0,
               wire.MAX_SYMBOL_ID + 1 - spec.block_symbols)
    if spec.interface is not None and (not isinstance(spec.interface, str) or not spec.interface):
        raise SpecError("session spec field 'interface' must be a name, an address or null")
    if spec.image_sha256 is not None and (
            not isinstance(spec.image_sha256, str)
            or not re.fullmatch(r"[0-9a-f]{64}", spec.image_sha256)):
        raise SpecError("session spec field 'image_sha256' must be 64 lowercase hex digits")
    if spec.image_format not in IMAGE_FORMATS:
        raise SpecError("session spec field 'image_format' must be one of "
                        f"{', '.join(IMAGE_FORMATS)}")
    if spec.image_size is not None:
        _check_int("image_size", spec.image_size, 1, 2 ** 63 - 1)
    if spec.sender is not None:
        _check_sender(spec.sender)


def _check_sender(text: Any) -> None:
    problem = "session spec field 'sender' must be IPV4:PORT, the sender's unicast address"
    if not isinstance(text, str):
        raise SpecError(problem)
    host, colon, port = text.rpartition(":")
    try:
        address = ipaddress.IPv4Address(host)
    except ValueError:
        raise SpecError(problem) from None
    if not colon or not port.isdigit() or not 1 <= int(port) <= 65535 \
            or not wire.is_unicast_host(address):
        raise SpecError(problem)
