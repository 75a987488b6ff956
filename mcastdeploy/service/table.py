"""The daemon's session table on disk, so that a restarted daemon resumes its sessions with
the same id, key and group: agents then follow the restarted sender and repair.

One JSON file, ``sessions.json`` in the state directory, written atomically (rename) with
mode 0600 in a 0700 directory, since each entry holds its session's key.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

from mcastdeploy.spec import SessionSpec, SpecError

TABLE_FILE = "sessions.json"
TABLE_FORMAT = "mcastdeploy-sessions/1"


@dataclass
class AgentRecord:
    name: str
    #: The agent's address as the daemon saw it: how its STATUS reports are told apart.
    address: str
    asked_at: float
    #: It reported the image verified: a resumed session does not wait for it.
    done: bool = False


@dataclass
class SessionRecord:
    spec: SessionSpec
    #: What the agents asked for: a name from [images], a file in image_dir, or a URL.
    image: str
    created_at: float
    agents: list[AgentRecord] = field(default_factory=list)

    @property
    def session_id(self) -> str:
        return self.spec.session_id

    def to_dict(self) -> dict:
        return {"spec": json.loads(self.spec.to_json()), "image": self.image,
                "created_at": self.created_at, "agents": [asdict(a) for a in self.agents]}

    @classmethod
    def from_dict(cls, data: dict) -> "SessionRecord":
        return cls(SessionSpec.from_dict(data["spec"]), str(data["image"]),
                   float(data["created_at"]),
                   [AgentRecord(**agent) for agent in data.get("agents", [])])


class TableError(RuntimeError):
    """The state directory or its table cannot be used; one line."""


class SessionTable:
    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, TABLE_FILE)

    def prepare(self) -> None:
        try:
            os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
            os.chmod(self.state_dir, 0o700)
        except OSError as error:
            raise TableError(f"cannot use state directory {self.state_dir}: "
                             f"{error.strerror}") from None

    def load(self) -> list[SessionRecord]:
        """The sessions in flight when the table was last written ([] if none)."""
        try:
            with open(self.path, encoding="utf-8") as handle:
                data = json.load(handle)
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as error:
            raise TableError(f"cannot read session table {self.path}: {error}") from None
        if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT:
            raise TableError(f"session table {self.path} is not in format {TABLE_FORMAT}")
        try:
            return [SessionRecord.from_dict(entry) for entry in data["sessions"]]
        except (KeyError, TypeError, ValueError, SpecError) as error:
            raise TableError(f"session table {self.path} has a bad entry: {error}") from None

    def save(self, records: list[SessionRecord]) -> None:
        temporary = f"{self.path}.tmp{os.getpid()}"
        text = json.dumps({"format": TABLE_FORMAT,
                           "sessions": [record.to_dict() for record in records]},
                          indent=1, sort_keys=True)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            if os.path.exists(temporary):
                os.unlink(temporary)
            raise
