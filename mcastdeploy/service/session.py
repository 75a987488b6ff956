"""One session of the daemon, run in a thread of its own: the image pulled into the cache
(once) and multicast while it arrives, by the same ``send_image`` as ``mcastdeploy send``,
steerable from the daemon's other threads.

``serve_image`` is the whole of a session's work in one function.  The daemon talks to it
only through a
:class:`SessionControl`: the rate it may use and how many agents asked go in, a snapshot
of the sender and its receivers comes out.  The snapshot is made by the session's own
thread (between two steps of its event loop), so the daemon never reads the Sender's
dictionaries while they change.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from mcastdeploy.drivers.send_image import send_image
from mcastdeploy.drivers.send_session import SendHooks, SendSummary
from mcastdeploy.drivers.sources import ImageCache
from mcastdeploy.protocol import events
from mcastdeploy.protocol.ratecontrol import AutoRate
from mcastdeploy.protocol.sender import ReceiverRecord, Sender, SenderConfig, SenderState
from mcastdeploy.spec import SessionSpec

#: While gathering, the pass must not begin because "enough" receivers joined.
_NOT_BEFORE_THE_WINDOW = 1 << 30
#: Once the window has closed (and the image is ready), the pass begins as soon as every
#: agent that asked has joined, or this long after, whoever is there: agents that asked
#: during a long fetch join on the first ANNOUNCE, within a fraction of a second.
JOIN_GRACE = 2.0


@dataclass(frozen=True)
class ImageSource:
    """Where a session's image comes from: URLs holding the same bytes, or a local file."""

    name: str
    urls: tuple[str, ...] = ()
    path: Optional[str] = None


@dataclass
class SessionControl:
    """What the daemon and a session's thread share; every field behind ``lock``."""

    rate_bps: int
    agents: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop_requested: bool = False
    #: The sender finished: an agent asking now needs a new session.
    finishing: bool = False
    snapshot: dict = field(default_factory=lambda: {"state": "fetching"})
    source_bytes: int = 0
    #: Called (from the session's thread) with the address of each receiver that reports
    #: the image verified, so the daemon can record which agent is done.
    on_done: Optional[Callable[[str], None]] = None

    def set_rate(self, rate_bps: int) -> None:
        with self.lock:
            self.rate_bps = rate_bps

    def add_agent(self) -> bool:
        """Count one more agent unless the session is ending; whether it was counted."""
        with self.lock:
            if self.finishing or self.stop_requested:
                return False
            self.agents += 1
            return True

    def stop(self) -> None:
        with self.lock:
            self.stop_requested = True

    def publish(self, **snapshot: Any) -> None:
        with self.lock:
            self.snapshot = snapshot

    def read(self) -> dict:
        with self.lock:
            return dict(self.snapshot, rate_bps=self.snapshot.get("rate_bps", self.rate_bps),
                        source_bytes=self.source_bytes)


def serve_image(spec: SessionSpec, source: ImageSource, cache: ImageCache,
                control: SessionControl, *, gather_until: float, linger: float,
                environ: Optional[Mapping[str, str]] = None) -> SendSummary:
    """The whole of one session: the image pulled into ``cache`` once (or a local file)
    and multicast per ``spec`` while it downloads (drivers/send_image.py; a qcow2 image
    is converted to raw first). The pass begins at ``gather_until`` (time.monotonic) at
    the earliest; the session ends when every agent is done, or nobody asked for
    ``linger`` seconds (or at ``control.stop()``)."""
    started = time.monotonic()
    rates: Optional[ReceiveRates] = None  # once the image's geometry is known

    def configure(config: SenderConfig) -> None:
        with control.lock:
            config.rate_bps = control.rate_bps
        # Not before the window closes; then _Guarded counts the agents that asked.
        config.min_receivers = _NOT_BEFORE_THE_WINDOW
        config.wait = max(0.0, gather_until - time.monotonic()) + JOIN_GRACE

    def steer(sender: Sender, now: float) -> None:
        with control.lock:
            rate = control.rate_bps
        apply_share(sender, rate)

    def publish(sender: Sender, now: float) -> None:
        nonlocal rates
        rates = rates or ReceiveRates(sender.geometry.block_bytes)
        control.publish(**snapshot(sender, now - started, rates, now))

    def on_event(sender: Sender, event: object, now: float) -> None:
        if isinstance(event, events.ReceiverDone) and event.checksum_ok \
                and control.on_done is not None:
            record = sender.receivers.get(event.receiver_id)
            if record is not None:
                control.on_done(str(record.address[0]))

    def stopped() -> bool:
        with control.lock:
            return control.stop_requested

    hooks = SendHooks(configure=configure,
                      wrap=lambda sender: _Guarded(sender, control, gather_until),
                      before_send=steer, on_tick=publish, on_event=on_event, stopped=stopped)
    image = source.path if source.path is not None else source.urls[0]
    summary = send_image(spec, image, copies=source.urls[1:], cache=cache, linger=linger,
                         hooks=hooks, environ=environ)
    with control.lock:
        control.source_bytes += summary.bytes_fetched
    return summary


class _Guarded:
    """The Sender as the event loop sees it, deciding under the control's lock.

    The sender decides to begin its pass or to finish only in ``start``,
    ``receive_datagram`` and ``handle_timer``; each runs here with the agents the daemon
    has counted so far, and a decision to finish marks the session ``finishing`` before
    the lock is let go.  So an agent the daemon counts (``add_agent``, same lock) is either
    waited for, or refused and given a new session, never left with a sender that ended.
    """

    def __init__(self, sender: Sender, control: SessionControl, gather_until: float) -> None:
        self.sender = sender
        self.control = control
        self.gather_until = gather_until

    def _agents_count(self, now: float) -> None:
        if self.sender.state is not SenderState.WAITING or now >= self.gather_until:
            # After the window: the pass begins once every agent that asked has joined
            # (or JOIN_GRACE later), and the session is not over until every agent that
            # asked (late ones too) is done, or nobody asked for anything for ``linger``.
            self.sender.config.min_receivers = self.control.agents

    def _decided(self) -> None:
        if self.sender.state is SenderState.FINISHED:
            self.control.finishing = True

    def start(self, now: float) -> None:
        with self.control.lock:
            self._agents_count(now)
            self.sender.start(now)
            self._decided()

    def receive_datagram(self, data: bytes, addr: tuple, now: float) -> None:
        with self.control.lock:
            self._agents_count(now)
            self.sender.receive_datagram(data, addr, now)
            self._decided()

    def handle_timer(self, now: float) -> None:
        with self.control.lock:
            self._agents_count(now)
            self.sender.handle_timer(now)
            self._decided()

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, tuple]]:
        return self.sender.datagrams_to_send(now)

    def get_timer(self) -> Optional[float]:
        return self.sender.get_timer()

    def next_event(self) -> object:
        return self.sender.next_event()


def apply_share(sender: Sender, rate_bps: int) -> None:
    """The daemon's share for this session: the ceiling of automatic rate control, or the
    rate itself; the sender's pacing follows at its next ANNOUNCE (at most 0.5 s)."""
    controller = sender.rate
    if isinstance(controller, AutoRate):
        if controller.ceiling_bps != rate_bps:
            controller.ceiling_bps = rate_bps
            controller.floor_bps = min(controller.floor_bps, rate_bps)
            controller.rate_bps = min(controller.rate_bps, rate_bps)
    elif controller.rate_bps != rate_bps:
        controller.rate_bps = rate_bps


class ReceiveRates:
    """Each receiver's rate from its own progress reports: the blocks between its last two
    reports that moved, over the time between them (STATUS comes about once a second, so
    the rate is over about a second), 0 once done or silent for ``STALE`` seconds."""

    STALE = 3.0

    def __init__(self, block_bytes: int) -> None:
        self.block_bytes = block_bytes
        self._last: dict[int, tuple[float, int]] = {}
        self._rate: dict[int, float] = {}

    def update(self, origin: int, blocks_done: int, heard_at: float, now: float,
               done: bool) -> float:
        """Bits per second; ``heard_at``: when the report with ``blocks_done`` came."""
        last = self._last.get(origin)
        if last is None or blocks_done < last[1]:  # new, or a restarted receiver
            self._last[origin] = (heard_at, blocks_done)
            self._rate[origin] = 0.0
        elif blocks_done > last[1] and heard_at > last[0]:
            self._rate[origin] = ((blocks_done - last[1]) * self.block_bytes * 8
                                  / (heard_at - last[0]))
            self._last[origin] = (heard_at, blocks_done)
        if done or now - self._last[origin][0] > self.STALE:
            self._rate[origin] = 0.0
        return self._rate[origin]


def _sources(record: ReceiverRecord) -> dict:
    """Where a receiver's blocks came from, as its reports say: ``blocks_from`` counts
    them per source and ``source`` names those that served any, in the order of resort
    ("multicast+peers"); "-" before any block, unless it asked for peers already."""
    unicast = {"peers": record.blocks_from_peers, "source": record.blocks_from_source,
               "origin": record.blocks_from_origin}
    by_source = {"multicast": max(0, record.blocks_reported - record.blocks_in_place
                                  - sum(unicast.values())), **unicast}
    names = "+".join(name for name, blocks in by_source.items() if blocks)
    if not names:
        names = "peers" if record.asked_peers or record.referred else "-"
    return {"source": names, "blocks_from": by_source}


def snapshot(sender: Sender, elapsed: float, rates: Optional[ReceiveRates] = None,
             now: float = 0.0) -> dict:
    """The sender and every receiver it knows, as plain data for status and metrics;
    ``rates`` (kept between calls) adds each receiver's rate as of ``now``."""
    geometry = sender.geometry
    receivers = []
    for origin, record in sender.receivers.items():
        total = record.packets_lost + record.packets_received
        rate = 0.0 if rates is None else rates.update(
            origin, record.blocks_done, record.last_seen, now, record.done)
        receivers.append({
            "origin": f"{origin:08x}", "address": str(record.address[0]),
            "state": "done" if record.done else record.state.name.lower(),
            "blocks_done": record.blocks_done, "block_count": geometry.block_count,
            "progress": record.blocks_done / geometry.block_count,
            "packets_received": record.packets_received,
            "packets_lost": record.packets_lost,
            "loss": record.packets_lost / total if total else 0.0,
            "repairs_asked": record.symbols_asked, "rate_bps": int(rate),
            "first_seen": record.first_seen,
            "straggler": record.asked_peers or record.referred,
            **_sources(record),
        })
    stats = sender.stats
    return {
        "state": sender.state.value, "elapsed": elapsed,
        "bytes_total": geometry.image_size,
        "bytes_done": min(geometry.image_size,
                          sender.pass_position() * geometry.block_bytes),
        "bytes_sent": stats.bytes_sent,
        # What the agents asked for, summed: the sender merges requests for one block.
        "repairs_asked": sum(row["repairs_asked"] for row in receivers),
        "repairs_sent": stats.repair_packets, "rate_bps": int(sender.rate.rate_bps),
        "receivers": receivers,
    }
