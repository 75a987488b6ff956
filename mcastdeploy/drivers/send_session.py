"""``mcastdeploy send`` without the command line: a Sender on a socket, fed from an image."""

from __future__ import annotations

import secrets
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

from mcastdeploy.drivers.event_loop import EventLoop
from mcastdeploy.drivers.image_source import LocalImage, SourceError
from mcastdeploy.drivers.memory import peak_rss_mb
from mcastdeploy.drivers.peer_server import BlockServer
from mcastdeploy.drivers.udp import check_group, open_sender_socket, resolve_interface
from mcastdeploy.protocol import events
from mcastdeploy.protocol.geometry import ImageGeometry
from mcastdeploy.protocol.intake import rejected
from mcastdeploy.protocol.manifest import SenderManifest
from mcastdeploy.protocol.sender import Sender, SenderConfig, SenderState
from mcastdeploy.spec import SessionSpec


@dataclass
class SendProgress:
    """What a progress display shows; ``bytes_done`` counts the data pass."""

    state: str
    bytes_done: int
    bytes_total: int
    bytes_sent: int
    repairs_sent: int
    receivers: int
    receivers_done: int
    elapsed: float


@dataclass
class SendSummary:
    ok: bool
    reason: str
    bytes: int
    bytes_sent: int
    seconds: float
    mb_per_s: float
    repairs_asked: int
    repairs_sent: int
    receivers: int
    receivers_done: int
    sha256: str
    #: The send rate at the end: the spec's, or where automatic rate control settled.
    rate_bps: int
    #: The data pass alone (repair interleaved in it included): what receivers that
    #: lost nothing waited for.
    pass_seconds: float
    pass_bytes_sent: int
    #: Datagrams refused before parsing, by reason (protocol/intake.py).
    rejected: dict
    #: Peak resident memory of the process, MB (None where /proc does not say).
    peak_rss_mb: Optional[float]
    #: Stragglers (docs/peers.rst): requests for peers answered, receivers sent to peers
    #: instead of repair, and the bytes the sender's own block server (the last resort)
    #: sent them.
    peer_requests: int = 0
    peer_referrals: int = 0
    source_bytes_served: int = 0
    #: Everything the sender sent to stragglers alone: its unicast answers (ANNOUNCE,
    #: manifest, PEERS) and what its block server served.  Multicast repair goes to the
    #: group and is counted in repairs_sent.
    bytes_to_stragglers: int = 0

    def as_dict(self) -> dict:
        return asdict(self) | {"role": "send"}


def run_send(spec: SessionSpec, image_path: str, *, min_receivers: int = 0,
             wait: Optional[float] = None, linger: float = 5.0,
             on_progress: Optional[Callable[[SendProgress], None]] = None) -> SendSummary:
    """Multicast ``image_path`` per ``spec`` until every receiver is done or ``linger`` ends.

    Raises NetworkError/SourceError for unusable settings before anything is sent.
    """
    check_group(spec.group)
    interface = resolve_interface(spec.interface)
    image = LocalImage(image_path)
    try:
        if spec.disk_size is not None and spec.disk_size != image.size:
            raise SourceError(f"image {image_path} is {image.size} bytes, the session spec "
                              f"says {spec.disk_size}")
        geometry = ImageGeometry(image.size, spec.symbol_size, spec.block_symbols)
        checksum, block_hashes = image.digests(geometry.block_bytes)
        if spec.disk_checksum is not None and checksum != spec.disk_checksum:
            raise SourceError(f"image {image_path} does not match the session's sha256")
        sender_port = spec.sender_address[1] if spec.sender_address else 0
        sock = open_sender_socket(interface, spec.ttl, sender_port)
        try:
            # The last resort for stragglers no peer can serve: the image, from here.
            with BlockServer(spec.key_bytes, spec.session_number, encrypt=spec.encrypt,
                             host=interface.address) as source:
                source.serve(image_path, geometry)
                summary = _run(spec, image, checksum, SenderManifest(block_hashes), sock,
                               min_receivers, wait, linger, on_progress, source.port)
                summary.source_bytes_served = source.bytes_served
                summary.bytes_to_stragglers += source.bytes_served
                return summary
        finally:
            sock.close()
    finally:
        image.close()


def _run(spec: SessionSpec, image: LocalImage, checksum: bytes, manifest: SenderManifest, sock,
         min_receivers: int, wait: Optional[float], linger: float,
         on_progress: Optional[Callable[[SendProgress], None]],
         source_port: int = 0) -> SendSummary:
    reply_host, reply_port = sock.getsockname()[:2]
    config = SenderConfig(
        session_id=spec.session_number,
        group=(spec.group, spec.port),
        rate_bps=spec.rate_bps,
        auto_rate=spec.rate_mode == "auto",
        symbol_size=spec.symbol_size,
        block_symbols=spec.block_symbols,
        proactive_repair=spec.proactive_repair,
        auto_proactive=spec.proactive_mode == "auto",
        min_receivers=min_receivers,
        wait=wait,
        linger=linger,
        reply_host=reply_host,
        reply_port=reply_port,
        key=spec.key_bytes,
        encrypt=spec.encrypt,
        source_port=source_port,
    )
    sender = Sender(config, image.size, origin=secrets.randbits(32), checksum=checksum,
                    manifest=manifest)
    geometry = sender.geometry
    started = time.monotonic()
    ended: list[events.SessionEnded] = []

    def supply() -> None:
        for block in sender.blocks_wanted():
            sender.supply_block(block, image.read(geometry.offset(block),
                                                  geometry.block_length(block)))

    def on_event(event: object, now: float) -> None:
        if isinstance(event, events.SessionEnded):
            ended.append(event)

    def progress(now: float) -> None:
        if on_progress is not None:
            on_progress(_progress(sender, now - started))

    loop = EventLoop(sender, [sock], sock, on_event=on_event, before_send=supply,
                     on_tick=progress,
                     finished=lambda: sender.state is SenderState.FINISHED
                     and sender.get_timer() is None)
    loop.run()
    seconds = time.monotonic() - started
    progress(time.monotonic())
    end = ended[-1]
    stats = sender.stats
    known = len(sender.receivers)
    done = sum(1 for record in sender.receivers.values() if record.done)
    ok = known > 0 and done == known and done >= min_receivers
    reason = end.reason if ok else (
        "no receiver joined" if not known else f"{known - done} of {known} receivers did not "
        f"report done ({end.reason})")
    return SendSummary(
        ok=ok, reason=reason, bytes=image.size, bytes_sent=stats.bytes_sent, seconds=seconds,
        mb_per_s=image.size / seconds / 1e6 if seconds > 0 else 0.0,
        repairs_asked=stats.repairs_requested, repairs_sent=stats.repair_packets,
        receivers=known, receivers_done=done, sha256=checksum.hex(),
        rate_bps=int(sender.rate.rate_bps), pass_seconds=stats.pass_seconds,
        pass_bytes_sent=stats.pass_bytes_sent, rejected=rejected(stats),
        peak_rss_mb=peak_rss_mb(), peer_requests=stats.peer_requests,
        peer_referrals=stats.peer_referrals, bytes_to_stragglers=stats.unicast_bytes)


def _progress(sender: Sender, elapsed: float) -> SendProgress:
    geometry = sender.geometry
    position = sender.pass_position()
    return SendProgress(
        state=sender.state.value,
        bytes_done=min(geometry.image_size, position * geometry.block_bytes),
        bytes_total=geometry.image_size,
        bytes_sent=sender.stats.bytes_sent,
        repairs_sent=sender.stats.repair_packets,
        receivers=len(sender.receivers),
        receivers_done=sum(1 for record in sender.receivers.values() if record.done),
        elapsed=elapsed,
    )
