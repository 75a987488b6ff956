"""``mcastdeploy send`` without the command line: a Sender on a socket, fed from an image."""

from __future__ import annotations

import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

from mcastdeploy.drivers.event_loop import EventLoop, Wakeup
from mcastdeploy.drivers.growing_image import GrowingImage
from mcastdeploy.drivers.image_source import LocalImage, SourceError
from mcastdeploy.drivers.memory import peak_rss_mb
from mcastdeploy.drivers.peer_server import BlockServer
from mcastdeploy.drivers.udp import (Interface, check_group, open_sender_socket,
                                     resolve_interface)
from mcastdeploy.protocol import events
from mcastdeploy.protocol.geometry import ImageGeometry
from mcastdeploy.protocol.intake import rejected
from mcastdeploy.protocol.manifest import SenderManifest, block_hash
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
    #: From the command's start to the first data symbol on the wire.
    first_data_after_s: Optional[float] = None
    #: How long the download from a URL took (None: a local image; ~0: a cache hit).
    fetch_seconds: Optional[float] = None
    #: Bytes this send pulled from the image's source (0: a local image or a cache hit).
    bytes_fetched: int = 0
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


@dataclass
class SendHooks:
    """How a caller steers a send from outside without a loop of its own: the rack-head
    service sets the rate share, counts the agents it promised a session to, and reads
    snapshots for its status page. The command line uses none of them.

    ``configure`` edits the Sender's config before the Sender is made; ``wrap`` gives
    the object the event loop drives (the Sender itself by default); ``before_send``,
    ``on_tick`` and ``on_event`` run on the loop's thread with the Sender; ``stopped``
    ends the loop early (the summary then says "stopped").
    """

    configure: Optional[Callable[[SenderConfig], None]] = None
    wrap: Optional[Callable[[Sender], Any]] = None
    before_send: Optional[Callable[[Sender, float], None]] = None
    on_tick: Optional[Callable[[Sender, float], None]] = None
    on_event: Optional[Callable[[Sender, object, float], None]] = None
    stopped: Optional[Callable[[], bool]] = None


@dataclass
class SendOptions:
    min_receivers: int = 0
    wait: Optional[float] = None
    linger: float = 5.0
    on_progress: Optional[Callable[[SendProgress], None]] = None
    hooks: SendHooks = field(default_factory=SendHooks)


def run_send(spec: SessionSpec, image_path: str, *, min_receivers: int = 0,
             wait: Optional[float] = None, linger: float = 5.0,
             on_progress: Optional[Callable[[SendProgress], None]] = None,
             hooks: Optional[SendHooks] = None,
             started: Optional[float] = None) -> SendSummary:
    """Multicast ``image_path`` per ``spec`` until every receiver is done or ``linger`` ends.

    Raises NetworkError/SourceError for unusable settings before anything is sent.
    """
    options = SendOptions(min_receivers, wait, linger, on_progress, hooks or SendHooks())
    started = time.monotonic() if started is None else started
    interface = _interface(spec)
    image = LocalImage(image_path)
    try:
        geometry = _geometry(spec, image.size, image_path)
        checksum, block_hashes = image.digests(geometry.block_bytes)
        if spec.disk_checksum is not None and checksum != spec.disk_checksum:
            raise SourceError(f"image {image_path} does not match the session's sha256")
        return _send(spec, interface, image, checksum, SenderManifest(block_hashes), options,
                     started)
    finally:
        image.close()


def run_send_download(spec: SessionSpec, download: GrowingImage, *, min_receivers: int = 0,
                      wait: Optional[float] = None, linger: float = 5.0,
                      on_progress: Optional[Callable[[SendProgress], None]] = None,
                      hooks: Optional[SendHooks] = None,
                      started: Optional[float] = None) -> SendSummary:
    """Multicast an image while ``download`` (started, with its first bytes in) is still
    bringing it into the cache: blocks go out as soon as they and their chunk of the
    manifest are hashed. A checksum pinned by the spec is announced from the start (the
    download checks it at the end); otherwise the download's is announced when it has
    it. A failed download ends the session (END): no receiver reports an image done that
    the sender could not vouch for.
    """
    options = SendOptions(min_receivers, wait, linger, on_progress, hooks or SendHooks())
    started = time.monotonic() if started is None else started
    interface = _interface(spec)
    image = download.open()
    try:
        geometry = _geometry(spec, image.size, image.path)
        manifest = SenderManifest(block_count=geometry.block_count)
        feed = _DownloadFeed(download, image, geometry, manifest)
        summary = _send(spec, interface, image, spec.disk_checksum, manifest, options,
                        started, feed=feed, wakeup=download.wakeup)
    finally:
        image.close()
    if feed.failure is not None:
        summary.ok = False
        summary.reason = feed.failure
    return summary


def _interface(spec: SessionSpec) -> Interface:
    """The spec's network settings, checked before the image is read (bad input first)."""
    check_group(spec.group)
    return resolve_interface(spec.interface)


def _send(spec: SessionSpec, interface: Interface, image: LocalImage, checksum: Optional[bytes],
          manifest: SenderManifest, options: SendOptions, started: float, *,
          feed: Optional[Callable[[Sender, float], None]] = None,
          wakeup: Optional[Wakeup] = None) -> SendSummary:
    """One run of the Sender on its socket, beside the block server that is stragglers'
    last resort (docs/peers.rst)."""
    sock = open_sender_socket(interface, spec.ttl, _sender_port(spec))
    try:
        with BlockServer(spec.key_bytes, spec.session_number, encrypt=spec.encrypt,
                         host=sock.getsockname()[0]) as source:
            summary = _run(spec, image, checksum, manifest, sock, options, started, feed,
                           wakeup, source)
            summary.source_bytes_served = source.bytes_served
            summary.bytes_to_stragglers += source.bytes_served
            return summary
    finally:
        sock.close()


def _sender_port(spec: SessionSpec) -> int:
    """The port the spec's ``sender`` names (receivers that hear no group report there),
    or any."""
    return spec.sender_address[1] if spec.sender_address else 0


def _geometry(spec: SessionSpec, size: int, path: str) -> ImageGeometry:
    if spec.disk_size is not None and spec.disk_size != size:
        raise SourceError(f"image {path} is {size} bytes, the session spec says "
                          f"{spec.disk_size}")
    return ImageGeometry(size, spec.symbol_size, spec.block_symbols)


class _DownloadFeed:
    """Hands the Sender what the download has made final: the hashes of the blocks in the
    hashed prefix (read back from the page cache), how far it may read, and at the end
    the checksum, or the download's failure."""

    #: Blocks hashed per loop step, so a large prefix arriving at once does not stall
    #: the loop (a wake-up brings it back at once for the rest).
    BLOCKS_PER_STEP = 64

    def __init__(self, download: GrowingImage, image: LocalImage, geometry: ImageGeometry,
                 manifest: SenderManifest) -> None:
        self.download = download
        self.image = image
        self.geometry = geometry
        self.manifest = manifest
        self.failure: Optional[str] = None
        self._checksum_told = False

    def __call__(self, sender: Sender, now: float) -> None:
        if sender.state is SenderState.FINISHED:
            return
        download, g = self.download, self.geometry
        finished = download.finished
        if finished and download.error is not None:
            self.failure = f"the image's download failed: {download.error}"
            sender.abort(self.failure, now)
            return
        ready = g.block_count if finished else download.hashed // g.block_bytes
        known = self.manifest.known_blocks
        upto = min(ready, known + self.BLOCKS_PER_STEP)
        if upto > known:
            sender.extend_manifest(b"".join(
                block_hash(self.image.read(g.offset(block), g.block_length(block)))
                for block in range(known, upto)), now)
            sender.set_readable(upto, now)
        if upto < ready:
            download.wakeup.wake()  # the rest of the prefix at the next step
        elif finished and not self._checksum_told:
            self._checksum_told = True
            checksum = download.sha256
            if sender.checksum is None:
                sender.set_checksum(checksum, now)
            elif sender.checksum != checksum:  # fetch checks a pinned one; belt and braces
                self.failure = "the downloaded image does not match the session's sha256"
                sender.abort(self.failure, now)


def _run(spec: SessionSpec, image: LocalImage, checksum: Optional[bytes],
         manifest: SenderManifest, sock, options: SendOptions, started: float,
         feed: Optional[Callable[[Sender, float], None]], wakeup: Optional[Wakeup],
         source: BlockServer) -> SendSummary:
    hooks = options.hooks
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
        min_receivers=options.min_receivers,
        wait=options.wait,
        linger=options.linger,
        reply_host=reply_host,
        reply_port=reply_port,
        key=spec.key_bytes,
        encrypt=spec.encrypt,
        source_port=source.port,
    )
    if hooks.configure is not None:
        hooks.configure(config)
    sender = Sender(config, image.size, origin=secrets.randbits(32), checksum=checksum,
                    manifest=manifest)
    geometry = sender.geometry
    if feed is not None:
        sender.set_readable(0, time.monotonic())  # nothing until the download says so
    #: While downloading, the source serves only the blocks hashed so far.
    held = None if feed is None else bytearray(geometry.block_count)
    source.serve(image.fileno(), geometry, held)
    served_upto = 0
    ended: list[events.SessionEnded] = []

    def supply(now: float) -> None:
        nonlocal served_upto
        if hooks.before_send is not None:
            hooks.before_send(sender, now)
        if feed is not None:
            feed(sender, now)
            assert held is not None and sender.manifest is not None
            known = sender.manifest.known_blocks
            if known > served_upto:
                held[served_upto:known] = b"\x01" * (known - served_upto)
                served_upto = known
        for block in sender.blocks_wanted():
            sender.supply_block(block, image.read(geometry.offset(block),
                                                  geometry.block_length(block)))

    def on_event(event: object, now: float) -> None:
        if isinstance(event, events.SessionEnded):
            ended.append(event)
        if hooks.on_event is not None:
            hooks.on_event(sender, event, now)

    def tick(now: float) -> None:
        if options.on_progress is not None:
            options.on_progress(_progress(sender, now - started))
        if hooks.on_tick is not None:
            hooks.on_tick(sender, now)

    def finished() -> bool:
        if hooks.stopped is not None and hooks.stopped():
            return True
        return sender.state is SenderState.FINISHED and sender.get_timer() is None

    protocol = sender if hooks.wrap is None else hooks.wrap(sender)
    loop = EventLoop(protocol, [sock], sock, on_event=on_event, before_send=supply,
                     on_tick=tick, wakeup=wakeup, finished=finished)
    loop.run()
    seconds = time.monotonic() - started
    tick(time.monotonic())
    stats = sender.stats
    known = len(sender.receivers)
    done = sum(1 for record in sender.receivers.values() if record.done)
    wanted = max(sender.config.min_receivers, 1)  # the live count: a service may raise it
    ok = bool(ended) and known > 0 and done == known and done >= wanted
    if not ended:
        reason = "stopped"
    elif ok:
        reason = ended[-1].reason
    elif not known:
        reason = "no receiver joined"
    else:
        expected = max(known, wanted)
        reason = (f"{expected - done} of {expected} receivers did not report done "
                  f"({ended[-1].reason})")
    return SendSummary(
        ok=ok, reason=reason, bytes=image.size, bytes_sent=stats.bytes_sent, seconds=seconds,
        mb_per_s=image.size / seconds / 1e6 if seconds > 0 else 0.0,
        repairs_asked=stats.repairs_requested, repairs_sent=stats.repair_packets,
        receivers=known, receivers_done=done,
        sha256=(sender.checksum or b"").hex(),
        rate_bps=int(sender.rate.rate_bps), pass_seconds=stats.pass_seconds,
        pass_bytes_sent=stats.pass_bytes_sent, rejected=rejected(stats),
        peak_rss_mb=peak_rss_mb(),
        first_data_after_s=(None if stats.first_data_at is None
                            else stats.first_data_at - started),
        peer_requests=stats.peer_requests, peer_referrals=stats.peer_referrals,
        bytes_to_stragglers=stats.unicast_bytes)


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
