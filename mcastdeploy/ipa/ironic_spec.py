"""The ``mcastdeploy`` value Ironic keeps on a node, and where the agent finds it.

The operator stores it with ``openstack baremetal node set --instance-info mcastdeploy=...``
(the client stores JSON values as objects, older tooling as strings: both are read).  It
holds the session spec every node of a rack shares and what the agent does with it::

    {"session": {...session spec...}, "early_start": true, "timeout": 60, "deadline": 7200,
     "interface": null}

The session spec's ``interface`` is the rack head's; the nodes' own NIC is ``interface``
here (null: the one the kernel routes the group through).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Optional

from mcastdeploy.spec import SessionSpec, SpecError

#: The key in instance_info, driver_internal_info or image_info.
IRONIC_KEY = "mcastdeploy"
DEFAULT_TIMEOUT = 60.0
DEFAULT_DEADLINE = 7200.0


@dataclass(frozen=True)
class IronicSpec:
    session: SessionSpec
    #: Start receiving as soon as the agent has its node from lookup, before the deploy
    #: step asks: the rack's nodes join while Ironic is still busy with earlier steps.
    early_start: bool = False
    #: Give up (and let IPA download over HTTP) after this long without the sender.
    timeout: float = DEFAULT_TIMEOUT
    #: Give up after this long in all, however the transfer is going.
    deadline: float = DEFAULT_DEADLINE
    #: The node's NIC for the group (name or address); None: the kernel's route.
    interface: Optional[str] = None

    def __post_init__(self) -> None:
        if not isinstance(self.early_start, bool):
            raise SpecError(f"{IRONIC_KEY} field 'early_start' must be true or false")
        for name in ("timeout", "deadline"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise SpecError(f"{IRONIC_KEY} field {name!r} must be a positive number "
                                "of seconds")
        if self.interface is not None and (not isinstance(self.interface, str)
                                           or not self.interface):
            raise SpecError(f"{IRONIC_KEY} field 'interface' must be a name, an address "
                            "or null")

    @property
    def receiver_session(self) -> SessionSpec:
        """The session as this node joins it: on its own interface."""
        return dataclasses.replace(self.session, interface=self.interface)

    def to_ironic(self) -> dict[str, Any]:
        """The value to store under ``mcastdeploy`` (JSON-serialisable)."""
        value = dataclasses.asdict(self)
        value["session"] = {key: item for key, item in dataclasses.asdict(self.session).items()
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
        if "session" not in value:
            raise SpecError(f"{IRONIC_KEY} lacks 'session' (the session spec)")
        options = dict(value)
        session = options.pop("session")
        known = {field.name for field in dataclasses.fields(cls)} - {"session"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise SpecError(f"unknown {IRONIC_KEY} field {unknown[0]!r}")
        return cls(session=SessionSpec.from_dict(session), **options)


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
