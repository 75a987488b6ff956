"""``mcastdeploy recv`` without the command line: a Receiver on sockets, writing a target.

The IPA plugin calls :func:`run_recv` too, so everything the agent needs is here and not
in the click layer.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

from mcastdeploy.drivers.event_loop import EventLoop
from mcastdeploy.drivers.image_source import SourceError
from mcastdeploy.drivers.memory import peak_rss_mb
from mcastdeploy.drivers.peer_server import BlockServer
from mcastdeploy.drivers.sources import RangeReader, readers_for
from mcastdeploy.drivers.straggling import Straggling
from mcastdeploy.drivers.target import Target, TargetError, check_target
from mcastdeploy.drivers.udp import (check_group, open_group_socket, open_unicast_socket,
                                     resolve_interface)
from mcastdeploy.protocol import events
from mcastdeploy.protocol.intake import rejected
from mcastdeploy.protocol.receiver import (Receiver, ReceiverConfig, ReceiverPhase,
                                           UnicastServer)
from mcastdeploy.spec import SessionSpec


@dataclass
class RecvProgress:
    state: str
    bytes_done: int
    bytes_total: int  # 0 until the session is joined
    repairs_asked: int
    packets_lost: int
    elapsed: float
    #: Done, and serving stragglers (``seed_time``): only now may ``on_progress`` raise
    #: SeedingStopped.
    seeding: bool = False


@dataclass
class RecvSummary:
    ok: bool
    reason: str
    bytes: int
    bytes_written: int
    seconds: float
    mb_per_s: float
    repairs_asked: int
    repairs_received: int
    packets_lost: int
    blocks_recovered: int
    #: Decoded blocks the manifest refused (fetched again), and blocks kept from the target.
    blocks_rejected: int
    blocks_kept: int
    #: All-zero blocks, made zero on the target rather than received.
    blocks_zero: int
    sha256: str
    #: Datagrams refused before parsing, by reason (protocol/intake.py).
    rejected: dict
    #: Peak resident memory of the process, MB (None where /proc does not say).
    peak_rss_mb: Optional[float]
    #: Where the image's bytes came from: the group, peers, the source (last resort).
    bytes_from_multicast: int = 0
    bytes_from_peers: int = 0
    bytes_from_source: int = 0
    bytes_from_origin: int = 0
    #: Blocks peers served that the manifest refused (each dropped its peer).
    peer_blocks_rejected: int = 0
    #: Why this receiver fetched from peers ("" if it did not).
    straggler: str = ""
    #: Bytes this receiver served to stragglers as a seeder.
    bytes_seeded: int = 0

    def as_dict(self) -> dict:
        return asdict(self) | {"role": "recv"}


def run_recv(spec: SessionSpec, target_path: str, *, timeout: float = 30.0,
             resume: bool = False, direct: bool = False,
             on_progress: Optional[Callable[[RecvProgress], None]] = None,
             seed_time: float = 0.0, origin: Sequence[str] = ()) -> RecvSummary:
    """Receive the session's image into ``target_path``; verified before it says ok.
    ``direct`` writes with O_DIRECT (target.DirectWriter).

    With ``seed_time``, serve the verified blocks to stragglers (docs/peers.rst) while
    receiving and for that many seconds after finishing, or until the sender ends the
    session (or, while its progress says ``seeding``, ``on_progress`` raises
    SeedingStopped).  ``origin``: URLs of the raw image (Ironic's, say), fetched by ranged
    GET as a straggler's very last resort.  Raises NetworkError/TargetError/SourceError for
    unusable settings (before anything is written).
    """
    if origin and spec.image_format != "raw":
        raise SourceError("origin URLs serve the image as stored; a qcow2 image is only "
                          "sent raw by the sender")
    origin_readers = readers_for(list(origin))
    check_group(spec.group)
    interface = resolve_interface(spec.interface)
    check_target(target_path, spec.disk_size)
    group_sock = open_group_socket(spec.group, spec.port, interface)
    try:
        unicast_sock = open_unicast_socket(interface)
        try:
            server = (BlockServer(spec.key_bytes, spec.session_number, encrypt=spec.encrypt,
                                  host=unicast_sock.getsockname()[0])
                      if seed_time > 0 else None)
            try:
                return _run(spec, target_path, timeout, resume, group_sock, unicast_sock,
                            on_progress, direct, server, seed_time, origin_readers)
            finally:
                if server is not None:
                    server.close()
        finally:
            unicast_sock.close()
    finally:
        group_sock.close()


def node_id(target_path: str, local_host: str) -> int:
    """This receiver's node: the same after a restart on the same machine, address and
    target, different for another target or machine (wire.Status.node_id)."""
    try:
        with open("/etc/machine-id", encoding="ascii") as handle:
            machine = handle.read().strip()
    except OSError:
        machine = ""
    identity = "\0".join((machine, socket.gethostname(), local_host,
                          os.path.realpath(target_path)))
    return int.from_bytes(hashlib.sha256(identity.encode()).digest()[:8], "big") or 1


def keep_what_target_holds(receiver: Receiver, target: Target, blocks: range,
                           now: float, held: Optional[bytearray] = None) -> None:
    """Blocks the target already holds, as the manifest says they should be, need not come
    again: after a restart only what is missing or wrong is fetched."""
    geometry, manifest = receiver.geometry, receiver.manifest
    assert geometry is not None and manifest is not None
    for block in blocks:
        if not receiver.needs_block(block):
            continue
        offset = geometry.offset(block)
        data = target.read(offset, geometry.block_length(block))
        if manifest.check(block, data):
            target.keep(offset, data)
            receiver.block_on_target(block, now)
            if held is not None:
                held[block] = 1


def _run(spec: SessionSpec, target_path: str, timeout: float, resume: bool, group_sock,
         unicast_sock, on_progress: Optional[Callable[[RecvProgress], None]],
         direct: bool, server: Optional[BlockServer], seed_time: float,
         origin: Sequence[RangeReader] = ()) -> RecvSummary:
    receiver = Receiver(ReceiverConfig(session_id=spec.session_number,
                                       expected_checksum=spec.disk_checksum,
                                       timeout=timeout, key=spec.key_bytes,
                                       encrypt=spec.encrypt, require_manifest=True,
                                       resume=resume,
                                       node_id=node_id(target_path,
                                                       unicast_sock.getsockname()[0]),
                                       sender_hint=spec.sender_address,
                                       seed_port=server.port if server else 0),
                        origin=secrets.randbits(32))
    straggling = Straggling(spec, receiver, origin=origin)
    #: A byte per block: 1 once it is verified on the target (what the seeder serves).
    held = bytearray()
    started = finished = time.monotonic()
    target: Optional[Target] = None
    outcome: list[events.Event] = []

    def on_event(event: object, now: float) -> None:
        nonlocal target, held
        if isinstance(event, events.BlockDecoded):
            assert target is not None
            target.write(event.offset, event.data)
            held[event.block] = 1
        elif isinstance(event, events.BlockIsZero):
            assert target is not None
            target.zero(event.offset, event.length)
            held[event.block] = 1
        elif isinstance(event, events.SessionJoined):
            size = event.geometry.image_size
            if spec.disk_size is not None and size != spec.disk_size:
                raise TargetError(f"the sender's image is {size} bytes, the session spec "
                                  f"says {spec.disk_size}")
            target = Target(target_path, size, direct=direct)
            held = bytearray(event.geometry.block_count)
            if server is not None:
                server.serve(target_path, event.geometry, held)
        elif isinstance(event, events.HashesLearned):
            if resume:
                assert target is not None
                keep_what_target_holds(receiver, target, event.blocks, now, held)
            straggling.on_event(event, now)
        elif isinstance(event, events.PeersOffered):
            straggling.on_event(event, now)
        elif isinstance(event, events.AllBlocksDecoded):
            assert target is not None
            receiver.image_verified(target.finish(), now)
        elif isinstance(event, (events.TransferComplete, events.TransferFailed)):
            outcome.append(event)

    seeding = False

    def progress(now: float) -> None:
        if on_progress is not None:
            on_progress(_progress(receiver, now - started, seeding))

    loop = EventLoop(receiver, [group_sock, unicast_sock], unicast_sock, on_event=on_event,
                     on_tick=progress, before_send=straggling.drain,
                     wakeup=straggling.wakeup,
                     finished=lambda: receiver.phase in (ReceiverPhase.DONE,
                                                         ReceiverPhase.FAILED)
                     and receiver.get_timer() is None)
    try:
        loop.run()
        finished = time.monotonic()  # the transfer's time: seeding after it is not
        straggling.close()
        if server is not None and receiver.phase is ReceiverPhase.DONE:
            seeding = True
            try:
                _seed(loop, receiver, seed_time)
            finally:
                seeding = False
    finally:
        straggling.close()
        if target is not None:
            target.close()
    seconds = finished - started
    progress(time.monotonic())
    result = outcome[-1] if outcome else events.TransferFailed("stopped")
    stats = receiver.stats
    size = receiver.geometry.image_size if receiver.geometry else 0
    ok = isinstance(result, events.TransferComplete)
    return RecvSummary(
        ok=ok,
        reason="image verified" if ok else result.reason,  # type: ignore[union-attr]
        bytes=size,
        bytes_written=target.bytes_written if target else 0,
        seconds=seconds,
        mb_per_s=size / seconds / 1e6 if ok and seconds > 0 else 0.0,
        repairs_asked=stats.symbols_requested,
        repairs_received=stats.repair_packets,
        packets_lost=receiver.packets_lost,
        blocks_recovered=stats.blocks_recovered,
        blocks_rejected=stats.blocks_rejected,
        blocks_kept=stats.blocks_kept,
        blocks_zero=stats.blocks_zero,
        sha256=result.checksum.hex() if ok else "",  # type: ignore[union-attr]
        rejected=rejected(stats),
        peak_rss_mb=peak_rss_mb(),
        bytes_from_multicast=max(0, (target.bytes_written if target else 0)
                                 - sum(straggling.bytes_from.values())),
        bytes_from_peers=straggling.bytes_from[UnicastServer.PEER],
        bytes_from_source=straggling.bytes_from[UnicastServer.SOURCE],
        bytes_from_origin=straggling.bytes_from[UnicastServer.ORIGIN],
        peer_blocks_rejected=straggling.peer_blocks_rejected,
        straggler=receiver.straggler or "",
        bytes_seeded=server.bytes_served if server else 0,
    )


class SeedingStopped(Exception):
    """Raised by ``on_progress`` while the receive is done and seeding: seeding ends early
    (an IPA deploy step cancelled or past its deadline); the verified image stands."""


def _seed(loop: EventLoop, receiver: Receiver, seed_time: float) -> None:
    """Finished: keep serving stragglers for ``seed_time`` seconds, or until the sender's
    END says nobody is left to serve (the block server runs in its own threads; the
    loop only listens for that END)."""
    until = time.monotonic() + seed_time
    loop.finished = lambda: receiver.session_over or time.monotonic() >= until
    loop.before_send = None
    loop.wakeup = None
    try:
        loop.run()
    except SeedingStopped:
        pass
    now = time.monotonic()
    receiver.stop_seeding(now)  # no more stragglers listed to us
    loop.send_pending(now)


def _progress(receiver: Receiver, elapsed: float, seeding: bool = False) -> RecvProgress:
    geometry = receiver.geometry
    total = geometry.image_size if geometry else 0
    done = min(total, receiver.blocks_done * geometry.block_bytes) if geometry else 0
    return RecvProgress(
        state=receiver.phase.value,
        bytes_done=done,
        bytes_total=total,
        repairs_asked=receiver.stats.symbols_requested,
        packets_lost=receiver.packets_lost,
        elapsed=elapsed,
        seeding=seeding,
    )
