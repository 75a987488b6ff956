"""The ``mcastdeploy`` value Ironic keeps on a node, and where the agent finds it.

The operator stores it with ``openstack baremetal node set --instance-info mcastdeploy=...``
(the client stores JSON values as objects, older tooling as strings: both are read).  It
holds the session spec every node of a rack shares and what the agent does with it::

    {"session": {...session spec...}, "early_start": true, "timeout": 60, "deadline": 7200,
     "interface": null}

The session spec's ``interface`` is the rack head's; the nodes' own NIC is ``interface``
here (null: the one the kernel routes the group through).

Or, with a rack-head service (``mcastdeploy serve``), no session but where to ask for one::

    {"rack_head": "https://rack12-head:7470", "token": "...", "image": "ubuntu-22.04"}

The agent then asks the rack head for the image when it needs it (``image``: a name the
rack head serves; by default the Glance image's id), and every node of the rack that asks
for the same image joins the one session the rack head opens for it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, Optional

from mcastdeploy.ipa.checksum import ChecksumError, ironic_checksum
from mcastdeploy.service.client import ClientError, request_session
from mcastdeploy.spec import SessionSpec, SpecError

#: The key in instance_info, driver_internal_info or image_info.
IRONIC_KEY = "mcastdeploy"
DEFAULT_TIMEOUT = 60.0
DEFAULT_DEADLINE = 7200.0


@dataclass(frozen=True)
class IronicSpec:
    #: The session every node of the rack shares; None with ``rack_head``.
    session: Optional[SessionSpec] = None
    #: Start receiving as soon as the agent has its node from lookup, before the deploy
    #: step asks: the rack's nodes join while Ironic is still busy with earlier steps.
    early_start: bool = False
    #: Give up (and let IPA download over HTTP) after this long without the sender.
    timeout: float = DEFAULT_TIMEOUT
    #: Give up after this long in all, however the transfer is going.
    deadline: float = DEFAULT_DEADLINE
    #: Once its image is verified, serve it to the rack's stragglers (docs/peers.rst) for
    #: up to this long, or until the sender ends the session; the deploy step returns
    #: after, so IPA changes the disk (config drive) only once nobody reads it. 0: never.
    seed_time: float = 0.0
    #: The node's NIC for the group (name or address); None: the kernel's route.
    interface: Optional[str] = None
    #: A rack-head service to ask for the session (instead of ``session``), its API token,
    #: and the image's name there (None: the Glance image's id).
    rack_head: Optional[str] = None
    token: Optional[str] = dataclasses.field(default=None, repr=False)
    image: Optional[str] = None

    def __post_init__(self) -> None:
        if (self.session is None) == (self.rack_head is None):
            raise SpecError(f"{IRONIC_KEY} needs either 'session' (the session spec) or "
                            "'rack_head' (where to ask for one)")
        if self.rack_head is not None:
            if not isinstance(self.rack_head, str) or \
                    not self.rack_head.startswith(("http://", "https://")):
                raise SpecError(f"{IRONIC_KEY} field 'rack_head' must be an http(s):// URL")
            if not isinstance(self.token, str) or not self.token:
                raise SpecError(f"{IRONIC_KEY} field 'token' (the rack head's API token) "
                                "is missing")
        for name in ("token", "image"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise SpecError(f"{IRONIC_KEY} field {name!r} must be a non-empty string")
        if not isinstance(self.early_start, bool):
            raise SpecError(f"{IRONIC_KEY} field 'early_start' must be true or false")
        for name in ("timeout", "deadline", "seed_time"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    not 0 <= value < math.inf or (value == 0 and name != "seed_time"):
                least = "0 or more" if name == "seed_time" else "more than 0"
                raise SpecError(f"{IRONIC_KEY} field {name!r} must be a number of seconds, "
                                f"{least}")
        if self.seed_time >= self.deadline:
            raise SpecError(f"{IRONIC_KEY} field 'seed_time' must be shorter than "
                            "'deadline', which it counts against")
        if self.interface is not None and (not isinstance(self.interface, str)
                                           or not self.interface):
            raise SpecError(f"{IRONIC_KEY} field 'interface' must be a name, an address "
                            "or null")

    @property
    def receiver_session(self) -> SessionSpec:
        """The session as this node joins it: on its own interface (a fixed session)."""
        if self.session is None:
            raise ValueError("a rack head's session is asked for: session_for()")
        return dataclasses.replace(self.session, interface=self.interface)

    def session_for(self, image_info: Optional[dict], node: Optional[dict]) -> SessionSpec:
        """The session this node joins for the image, on its own interface: the one Ironic
        gave, or the one the rack head has in flight (or opens) for it. Raises SpecError
        when the rack head cannot be asked or refuses (the caller falls back)."""
        if self.session is not None:
            return self.receiver_session
        assert self.rack_head is not None and self.token is not None
        image_info = image_info or {}
        instance = (node or {}).get("instance_info") or {}
        image = self.image or image_info.get("id") or instance.get("image_source")
        if not image:
            raise SpecError(f"{IRONIC_KEY} names a rack head but no image to ask it for")
        sha256, qcow2 = _pin(image_info or instance)
        try:
            session, _ = request_session(self.rack_head, self.token, str(image),
                                         agent=(node or {}).get("uuid"), sha256=sha256,
                                         image_format="qcow2" if qcow2 else None)
        except ClientError as error:
            raise SpecError(str(error)) from None
        return dataclasses.replace(session, interface=self.interface)

    def to_ironic(self) -> dict[str, Any]:
        """The value to store under ``mcastdeploy`` (JSON-serialisable)."""
        value = {key: item for key, item in dataclasses.asdict(self).items()
                 if item is not None or key == "interface"}
        if self.session is not None:
            value["session"] = {key: item for key, item
                                in dataclasses.asdict(self.session).items()
                                if key != "interface"}
        return value

    @classmethod
    def from_value(cls, value: Any) -> "IronicSpec":
        """Read the value as Ironic returns it: an object, or that object as JSON text."""
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as error:
                raise SpecError(f"{IRONIC_KEY} is not valid JSON: {error.msg}") from None
        if not isinstance(value, dict):
            raise SpecError(f"{IRONIC_KEY} must be a JSON object")
        if "session" not in value and "rack_head" not in value:
            raise SpecError(f"{IRONIC_KEY} lacks 'session' (the session spec) or "
                            "'rack_head'")
        options = dict(value)
        session = options.pop("session", None)
        known = {field.name for field in dataclasses.fields(cls)} - {"session"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise SpecError(f"unknown {IRONIC_KEY} field {unknown[0]!r}")
        return cls(session=None if session is None else SessionSpec.from_dict(session),
                   **options)


def _pin(info: dict) -> tuple[Optional[str], bool]:
    """The SHA-256 Ironic gave for the image as stored (image_info's, or instance_info's
    ``image_os_hash_*`` at lookup), and whether it is of a qcow2 file: the rack head then
    refuses to send another image, before any node writes a block."""
    # instance_info names image_info's fields with an "image_" prefix.
    fields = {name: info.get(name) or info.get(f"image_{name}")
              for name in ("os_hash_algo", "os_hash_value", "checksum", "disk_format")}
    try:
        checksum = ironic_checksum(fields, md5_allowed=True)
    except ChecksumError:
        checksum = None  # none given, or not one we can pin: the agent checks after writing
    sha256 = checksum.value if checksum and checksum.algorithm == "sha256" else None
    return sha256, fields["disk_format"] == "qcow2"


def find_ironic_spec(node: Optional[dict], image_info: Optional[dict] = None
                     ) -> Optional[IronicSpec]:
    """The spec for this deployment, or None when Ironic gave none (IPA's path then).

    image_info wins (it is the deploy step's own), then the node's instance_info (the
    operator's), then driver_internal_info (a deploy interface's).  A spec that is there
    but malformed raises SpecError: the caller falls back, and says why.
    """
    places = [image_info or {}]
    if node:
        places += [node.get("instance_info") or {}, node.get("driver_internal_info") or {}]
    for place in places:
        value = place.get(IRONIC_KEY)
        if value not in (None, "", {}):
            return IronicSpec.from_value(value)
    return None
