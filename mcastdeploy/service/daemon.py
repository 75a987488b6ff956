"""The daemon's core: agents' requests become sessions, one per image in flight.

An agent asks for image X.  If a session for X is in flight and not ending, the agent
joins it: it gets the same spec, and the session waits for it too.  Otherwise a new
session gets a group from the range whose Ethernet address no session in flight shares
(groups.py), is written to the session table (so a restarted daemon resumes it: same id,
key and group, which agents follow), and starts in a thread of its own: it gathers agents
for ``gather`` seconds while the image comes into the cache, and multicasts once both are
over and every agent that asked has joined (or a short grace later).  The rate
budget is split again whenever a session starts or ends (rateshare.py).  A session that
fails is logged and dropped; the daemon and the other sessions go on.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Optional

from mcastdeploy.drivers.sources import ImageCache, display_url, is_remote
from mcastdeploy.service import groups
from mcastdeploy.service.config import ServeConfig
from mcastdeploy.service.events import log_event
from mcastdeploy.service.rateshare import fair_shares
from mcastdeploy.service.session import ImageSource, SessionControl, serve_image
from mcastdeploy.service.table import AgentRecord, SessionRecord, SessionTable
from mcastdeploy.spec import IMAGE_FORMATS, SessionSpec, new_session

#: Finished sessions kept for ``status`` (with their agents' last reports).
RECENT = 32
#: Seconds between saves of agents' done marks (sessions opened or ended are saved at once).
TABLE_SAVE_INTERVAL = 1.0
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class RequestError(ValueError):
    """A request the daemon refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class LiveSession:
    record: SessionRecord
    source: ImageSource
    control: SessionControl
    thread: Optional[threading.Thread] = None
    started: float = field(default_factory=time.time)
    resumed: bool = False
    #: The gathering window closes then (monotonic clock), however long the fetch takes:
    #: agents asking meanwhile are waited for, and the fetch does not add to the window.
    gather_until: float = 0.0


@dataclass
class Totals:
    """Counters over the daemon's life, for the metrics: finished sessions' final figures
    (live ones are added when metrics are read)."""

    sessions_done: int = 0
    sessions_failed: int = 0
    bytes_multicast: int = 0
    repairs_asked: int = 0
    repairs_sent: int = 0
    source_bytes: int = 0


class Daemon:
    """The sessions in flight and what ended recently; every method may be called from any
    thread (the API's, the sessions')."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.table = SessionTable(config.state_dir)
        self.cache = ImageCache(config.cache_dir, config.cache_limit,
                                connections=config.connections)
        self.lock = threading.RLock()
        self.sessions: dict[str, LiveSession] = {}
        self.recent: deque[dict] = deque(maxlen=RECENT)
        self.totals = Totals()
        self._closing = False
        #: Agents' done marks not saved yet: a thousand agents finishing must not mean a
        #: thousand fsyncs under the lock, on the senders' loop threads.
        self._table_dirty = False
        self._closed = threading.Event()
        self._table_writer = threading.Thread(target=self._save_marks, daemon=True,
                                              name="session-table")

    # -- life ----------------------------------------------------------------------------

    def start(self) -> None:
        """Prepare the state directory and resume the sessions the table holds."""
        self.table.prepare()
        self._table_writer.start()
        records = self.table.load()
        with self.lock:
            for record in records:
                waiting = sum(1 for agent in record.agents if not agent.done)
                if not waiting:  # every agent had its image before the restart
                    log_event("session_dropped", record.session_id,
                              image=display_url(record.image), reason="every agent was done")
                    continue
                try:
                    source = self.resolve(record.image)
                except RequestError as error:
                    log_event("session_dropped", record.session_id,
                              image=display_url(record.image), reason=str(error))
                    continue
                # The agents still waiting are the ones the new sender waits for.
                live = LiveSession(record, source,
                                   self._control(record, waiting), resumed=True)
                self.sessions[record.session_id] = live
            self._persist()
            self._reshare()
            for live in self.sessions.values():
                log_event("session_resumed", live.record.session_id,
                          image=display_url(live.record.image), group=live.record.spec.group,
                          agents=len(live.record.agents), waiting=live.control.agents)
                self._launch(live)

    def close(self, timeout: float = 10.0) -> None:
        """Stop every session (the table keeps them: a restarted daemon resumes them)."""
        with self.lock:
            self._closing = True
            sessions = list(self.sessions.values())
        for live in sessions:
            live.control.stop()
        deadline = time.monotonic() + timeout
        for live in sessions:
            if live.thread is not None:
                live.thread.join(max(0.0, deadline - time.monotonic()))
        self._closed.set()
        with self.lock:
            if self._table_dirty:
                self._persist()

    def _save_marks(self) -> None:
        """Save agents' done marks at most every TABLE_SAVE_INTERVAL seconds."""
        while not self._closed.wait(TABLE_SAVE_INTERVAL):
            with self.lock:
                if self._table_dirty:
                    self._persist()

    # -- requests ------------------------------------------------------------------------

    def resolve(self, image: str) -> ImageSource:
        """Where ``image`` (as an agent names it) comes from; RequestError if nowhere."""
        config = self.config
        if image in config.images:
            return ImageSource(image, urls=tuple(config.images[image]))
        if is_remote(image):
            if not config.allow_urls:
                raise RequestError(f"image {image!r} is not one this rack head serves "
                                   "(URLs are not allowed: allow_urls)", 403)
            if image.split("://", 1)[0].lower() not in ("http", "https", "swift"):
                raise RequestError(f"image {image!r}: only http, https and swift URLs")
            return ImageSource(image, urls=(image,))
        if config.image_dir is not None and _NAME.match(image):
            path = os.path.join(config.image_dir, image)
            if os.path.isfile(path):
                return ImageSource(image, path=path)
        raise RequestError(f"no image {image!r} on this rack head", 404)

    def request(self, image: str, agent: Optional[str], address: str,
                sha256: Optional[str] = None,
                image_format: Optional[str] = None) -> tuple[SessionSpec, bool]:
        """The spec for ``agent`` to receive ``image``, and whether it joined a session
        already in flight.  ``sha256`` pins the image as stored, which ``image_format``
        says is raw (the default) or qcow2 (Ironic's checksum of a qcow2 image)."""
        if not isinstance(image, str) or not image:
            raise RequestError("the request needs an image")
        if agent is not None and (not isinstance(agent, str) or not _NAME.match(agent)):
            raise RequestError("agent must be a name of letters, digits, '.', '_' or '-'")
        if sha256 is not None and (not isinstance(sha256, str) or not _SHA256.match(sha256)):
            raise RequestError("sha256 must be 64 lowercase hex digits")
        if image_format is not None and image_format not in IMAGE_FORMATS:
            raise RequestError(f"image_format must be one of {', '.join(IMAGE_FORMATS)}")
        if image_format is not None and sha256 is None:
            raise RequestError("image_format says what sha256 pins: give both")
        pins = {"image_sha256": sha256, "image_format": image_format or "raw"}
        source = self.resolve(image)
        name = agent or address
        with self.lock:
            if self._closing:
                raise RequestError("the rack head is shutting down", 503)
            live = self._joinable(image, pins)
            if live is not None and self._join(live, name, address):
                return live.record.spec, True
            live = self._open(image, source, name, address, pins)
            return live.record.spec, False

    def _joinable(self, image: str, pins: dict[str, Any]) -> Optional[LiveSession]:
        """A session of ``image`` in flight and not ending, pinned as asked (a request
        without a pin takes any)."""
        for live in self.sessions.values():
            spec = live.record.spec
            pinned = pins["image_sha256"] is None or (
                spec.image_sha256 == pins["image_sha256"]
                and spec.image_format == pins["image_format"])
            if live.record.image == image and pinned:
                if not live.control.finishing and not live.control.stop_requested:
                    return live
        return None

    def _join(self, live: LiveSession, name: str, address: str) -> bool:
        record = live.record
        for agent in record.agents:
            if agent.name == name:  # asked again (an agent that restarted): same spec
                agent.address, agent.done = address, False
                self._persist()
                return True
        if not live.control.add_agent():
            return False
        record.agents.append(AgentRecord(name, address, time.time()))
        self._persist()
        log_event("agent_joined", record.session_id, agent=name, address=address,
                  image=display_url(record.image), agents=len(record.agents))
        return True

    def _open(self, image: str, source: ImageSource, name: str, address: str,
              pins: dict[str, Any]) -> LiveSession:
        config = self.config
        in_use = [live.record.spec.group for live in self.sessions.values()]
        try:
            group = groups.allocate(config.groups, in_use)
        except groups.NoFreeGroup as error:
            raise RequestError(str(error), 503) from None
        spec = new_session(group=group, port=config.port, interface=config.interface,
                           rate_bps=config.session_rate_bps or config.rate_bps,
                           rate_mode=config.rate_mode, symbol_size=config.symbol_size,
                           block_symbols=config.block_symbols, **pins)
        record = SessionRecord(spec, image, time.time(),
                               [AgentRecord(name, address, time.time())])
        live = LiveSession(record, source, self._control(record, 1))
        self.sessions[spec.session_id] = live
        self._persist()
        self._reshare()
        log_event("session_opened", spec.session_id, image=display_url(image), group=group,
                  port=spec.port, agent=name, address=address,
                  rate_bps=live.control.rate_bps)
        self._launch(live)
        return live

    # -- sessions' threads ---------------------------------------------------------------

    def _control(self, record: SessionRecord, agents: int) -> SessionControl:
        return SessionControl(self.config.rate_bps, agents,
                              on_done=lambda address: self._agent_done(record, address))

    def _agent_done(self, record: SessionRecord, address: str) -> None:
        """A receiver at ``address`` verified its image: one agent there is done (kept in
        the table, so that a restarted daemon waits only for the others)."""
        with self.lock:
            agent = next((a for a in record.agents if a.address == address and not a.done),
                         None)
            if agent is None:
                return  # a receiver nobody asked for here, or all there are done
            agent.done = True
            if record.session_id in self.sessions:
                self._table_dirty = True  # saved within TABLE_SAVE_INTERVAL

    def _launch(self, live: LiveSession) -> None:
        live.gather_until = time.monotonic() + self.config.gather
        live.thread = threading.Thread(target=self._run, args=(live,), daemon=True,
                                       name=f"session-{live.record.session_id}")
        live.thread.start()

    def _run(self, live: LiveSession) -> None:
        record = live.record
        session_id = record.session_id
        summary = None
        error: Optional[str] = None
        try:
            summary = serve_image(record.spec, live.source, self.cache, live.control,
                                  gather_until=live.gather_until, linger=self.config.linger,
                                  environ=self.config.swift_environ or None)
        except Exception as failure:  # noqa: BLE001 - one session's failure is logged, not fatal
            error = f"{type(failure).__name__}: {failure}"
        # Logged before status shows it ended: whoever sees the end there finds the line.
        if summary is not None:
            log_event("session_ended", session_id, image=display_url(record.image), ok=summary.ok,
                      reason=summary.reason, agents_done=summary.receivers_done,
                      agents=summary.receivers, bytes_sent=summary.bytes_sent,
                      repairs_sent=summary.repairs_sent, seconds=round(summary.seconds, 3))
        else:
            log_event("session_failed", session_id, image=display_url(record.image), reason=error)
        self._ended(live, summary, error)

    def _ended(self, live: LiveSession, summary: Any, error: Optional[str]) -> None:
        with self.lock:
            stopped = self._closing
            if not stopped:
                self.sessions.pop(live.record.session_id, None)
            view = self._view(live)
            view["state"] = ("failed" if error else "done" if summary.ok else
                             "stopped" if stopped else "incomplete")
            view["reason"] = error or summary.reason
            self.recent.appendleft(view)
            if stopped:
                return  # kept in the table: the next start resumes it
            totals = self.totals
            if error or not summary.ok:
                totals.sessions_failed += 1
            else:
                totals.sessions_done += 1
            totals.bytes_multicast += view["bytes_sent"]
            totals.repairs_asked += view["repairs_asked"]
            totals.repairs_sent += view["repairs_sent"]
            totals.source_bytes += view["source_bytes"]
            self._persist()
            self._reshare()

    def _persist(self) -> None:
        """Save the session table, best effort: it only lets a restart resume, and a full
        or read-only disk must not break sessions in flight (this may run on a session's
        own loop thread) or leave a session opened but never launched."""
        self._table_dirty = False
        try:
            self.table.save([live.record for live in self.sessions.values()])
        except OSError as error:
            log_event("table_write_failed", path=self.table.path,
                      error=error.strerror or str(error))

    def _reshare(self) -> None:
        ceilings = {session_id: self.config.session_rate_bps for session_id in self.sessions}
        shares = fair_shares(self.config.rate_bps, ceilings)
        for session_id, rate in shares.items():
            control = self.sessions[session_id].control
            if control.rate_bps != rate:
                control.set_rate(rate)
                log_event("rate_shared", session_id, rate_bps=rate,
                          sessions=len(self.sessions))

    # -- what operators see --------------------------------------------------------------

    def _view(self, live: LiveSession) -> dict:
        """One session as ``status`` shows it: the sender's figures and one row per agent
        (agents that asked, matched by address with the receivers the sender hears)."""
        record, snap = live.record, live.control.read()
        receivers = list(snap.get("receivers", []))
        by_address: dict[str, list[dict]] = {}
        for receiver in sorted(receivers, key=lambda r: r["first_seen"]):
            by_address.setdefault(receiver["address"], []).append(receiver)
        agents = []
        for agent in sorted(record.agents, key=lambda a: a.asked_at):
            heard = by_address.get(agent.address)
            # Unheard: it has asked and not joined yet, or (resumed session) it was done
            # before the daemon restarted.
            row = heard.pop(0) if heard else {"state": "done" if agent.done else "asked",
                                              "progress": 1.0 if agent.done else 0.0,
                                              "blocks_done": 0, "packets_lost": 0,
                                              "packets_received": 0, "loss": 0.0,
                                              "repairs_asked": 0, "rate_bps": 0,
                                              "source": "-", "blocks_from": {},
                                              "straggler": False}
            agents.append(dict(row, name=agent.name, address=agent.address))
        for rest in by_address.values():  # receivers nobody asked for here (a copied spec)
            agents += [dict(row, name=row["address"]) for row in rest]
        for row in agents:
            row.pop("first_seen", None)
        spec = record.spec
        return {
            "session_id": record.session_id, "image": display_url(record.image),
            "group": spec.group, "port": spec.port, "state": snap.get("state", "fetching"),
            "resumed": live.resumed, "age": time.time() - record.created_at,
            "rate_bps": snap["rate_bps"], "bytes_total": snap.get("bytes_total", 0),
            "bytes_done": snap.get("bytes_done", 0), "bytes_sent": snap.get("bytes_sent", 0),
            "repairs_asked": snap.get("repairs_asked", 0),
            "repairs_sent": snap.get("repairs_sent", 0),
            "source_bytes": snap["source_bytes"], "agents": agents,
        }

    def status(self) -> dict:
        with self.lock:
            return {"budget_bps": self.config.rate_bps,
                    "sessions": [self._view(live) for live in self.sessions.values()],
                    "recent": list(self.recent)}

    def counters(self) -> tuple[Totals, list[dict]]:
        """The totals so far with the live sessions' views (for the metrics)."""
        with self.lock:
            views = [self._view(live) for live in self.sessions.values()]
            return Totals(**vars(self.totals)), views
