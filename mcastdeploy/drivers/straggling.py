"""A receiver's driver side of straggling: from PEERS to verified blocks on the target.

The receiver (protocol) decides that it is a straggler and asks the tracker; this glue
runs the :class:`~mcastdeploy.drivers.peer_fetch.PeerFetcher` on what the tracker names,
feeds it the blocks whose hashes are known, and hands every block that arrives to
``Receiver.offer_block`` in the event loop's thread: only blocks the manifest vouches
for become BlockDecoded and are written.  The order of resort:

1. the peers the tracker listed (several at once, failover between them);
2. more peers: the tracker is asked again, without the ones that failed;
3. the **last resort**, the source (the sender's own block server), logged as such;
4. past it, the image's origin (ranged GETs of the URLs Ironic or ``recv --origin`` gave,
   raw images only), for a sender whose block server cannot be reached;
5. nothing left: multicast repair from the sender (``Receiver.peers_failed``).

When the tracker has named no peer at all (nobody seeds), multicast repair comes first
instead: it is the sender's ordinary job, and one repair round serves every straggler
that lost the same blocks, where the source would send each its own copy.  Only a
multicast-dead receiver, which repair cannot reach, goes to the source then.
"""

from __future__ import annotations

import logging
import queue
from typing import Optional, Sequence

from mcastdeploy.drivers.event_loop import Wakeup
from mcastdeploy.drivers.peer_fetch import MAX_QUEUED, PeerFetcher
from mcastdeploy.drivers.sources.reader import RangeReader
from mcastdeploy.protocol import events
from mcastdeploy.protocol.receiver import Receiver, UnicastServer
from mcastdeploy.spec import SessionSpec

log = logging.getLogger(__name__)

#: Times a straggler asks the tracker for fresh peers, once the pass is over, before it
#: turns to the source; and the pause before asking again when the tracker named none.
PEER_ROUNDS = 3
RETRY_PEERS = 1.0
#: Times a straggler asks for a replacement when a peer fails while others still serve
#: (keeping its fetch parallel), and below how many peers left it does.
TOP_UPS = 8
TOP_UP_BELOW = 2


class Straggling:
    def __init__(self, spec: SessionSpec, receiver: Receiver, *, parallel: int = 4,
                 timeout: float = 5.0, origin: Sequence[RangeReader] = ()) -> None:
        self._spec = spec
        self._receiver = receiver
        self._parallel = parallel
        self._timeout = timeout
        #: The fetcher's threads cut the event loop's sleep short with it.
        self.wakeup = Wakeup()
        self.fetcher: Optional[PeerFetcher] = None
        self._source: Optional[tuple[str, int]] = None
        self._source_used = False
        self._origin = list(origin)
        self._origin_used = False
        self._rounds = 0
        self._top_ups = 0
        self._listed = 0  # peers the tracker has named so far
        self._on_multicast = False  # given back to multicast repair
        self.reason = ""
        #: Bytes written from each unicast server (they passed the manifest).
        self.bytes_from = dict.fromkeys(UnicastServer, 0)
        self.peer_blocks_rejected = 0

    def close(self) -> None:
        if self.fetcher is not None:
            self.fetcher.close()
        self.wakeup.close()

    # -- the receiver's events ---------------------------------------------------------

    def on_event(self, event: object, now: float) -> None:
        if isinstance(event, events.PeersOffered):
            self._on_peers(event, now)
        elif isinstance(event, events.HashesLearned) and self.fetcher is not None \
                and not self._on_multicast:
            self.fetcher.want(self._fetchable(event.blocks))

    def _fetchable(self, blocks: range) -> list[int]:
        """Blocks still needed whose hash we know (a peer's block is checked against it)
        and that are not zero (those are made zero, not fetched)."""
        receiver, manifest = self._receiver, self._receiver.manifest
        if manifest is None:
            return []
        return [block for block in blocks if receiver.needs_block(block)
                and manifest.hash_of(block) is not None and not manifest.is_zero(block)]

    def _on_peers(self, offer: events.PeersOffered, now: float) -> None:
        receiver = self._receiver
        geometry = receiver.geometry
        if geometry is None:
            return
        if self.fetcher is None:
            self.reason = offer.reason
            log.warning("straggler (%s): fetching from peers", offer.reason)
            self.fetcher = PeerFetcher(self._spec.key_bytes, self._spec.session_number,
                                       encrypt=self._spec.encrypt, geometry=geometry,
                                       wake=self.wakeup.wake, parallel=self._parallel,
                                       timeout=self._timeout)
            first = True
        else:
            first = False
        if offer.source is not None:
            self._source = offer.source
        new = self.fetcher.add_peers((peer.host, peer.port, peer.origin)
                                     for peer in offer.peers)
        if first:  # the peers first: blocks wanted with none would read as exhausted
            self.fetcher.want(self._fetchable(range(geometry.block_count)))
        self._listed += new
        if new:
            self._on_multicast = False
        if not new and self.fetcher.idle and self.fetcher.outstanding:
            self._exhausted(now, asked=True)

    def _exhausted(self, now: float, asked: bool = False) -> None:
        """No peer left to fetch from: more peers, else the source, else multicast."""
        fetcher = self.fetcher
        assert fetcher is not None
        if not (fetcher.idle and fetcher.outstanding):
            return  # a stale signal: peers came since, or nothing is wanted any more
        if self._on_multicast and not self._receiver.multicast_dead:
            return
        self._on_multicast = False
        if not self._listed and not self._receiver.multicast_dead:
            log.warning("no peer seeds: multicast repair from the sender")
            self._give_up(now)
            return
        if not self._receiver.pass_complete:
            # Receivers still in the pass become seeders when they finish: wait for them
            # (a multicast-dead receiver asks early) rather than load the source.
            self._receiver.want_peers(now, fetcher.failed_origins, RETRY_PEERS)
            return
        if self._rounds < PEER_ROUNDS:
            self._rounds += 1
            self._receiver.want_peers(now, fetcher.failed_origins,
                                      0.0 if not asked else RETRY_PEERS)
            return
        if self._source is not None and not self._source_used:
            self._source_used = True
            host, port = self._source
            log.warning("last resort: no peer can serve, fetching from the source "
                        "%s:%d", host, port)
            fetcher.add_peers([(host, port, 0)], source=True)
            return
        if self._origin and not self._origin_used:
            self._origin_used = True
            log.warning("last resort: neither peers nor the sender's block server can "
                        "serve, fetching from the image's origin %s",
                        ", ".join(reader.name for reader in self._origin))
            fetcher.add_origin(self._origin)
            return
        log.warning("no peer and not the source can serve: multicast repair")
        self._give_up(now)

    def _give_up(self, now: float) -> None:
        self._on_multicast = True
        self._receiver.peers_failed(now)

    # -- blocks from the fetcher's threads ---------------------------------------------------

    def drain(self, now: float) -> None:
        """(EventLoop before_send) Hand what the fetcher brought to the receiver: at most
        MAX_QUEUED items a step, since the blocks are written only after it returns (the
        fetcher's threads refill the queue meanwhile), and the loop must read its sockets."""
        fetcher = self.fetcher
        if fetcher is None:
            return
        for _ in range(MAX_QUEUED):
            try:
                item = fetcher.results.get_nowait()
            except queue.Empty:
                return
            if item[0] == "exhausted":
                self._exhausted(now)
                continue
            if item[0] == "failed":
                if 0 < fetcher.peers_left < TOP_UP_BELOW and self._top_ups < TOP_UPS:
                    self._top_ups += 1  # one failed, others serve: a replacement
                    self._receiver.want_peers(now, fetcher.failed_origins)
                continue
            peer, block, data = item  # type: ignore[misc]
            server = peer.server  # type: ignore[union-attr]
            verdict = self._receiver.offer_block(block, data, now, server)
            if verdict is False:
                self.peer_blocks_rejected += 1
                fetcher.rejected(peer, block)  # type: ignore[arg-type]
                continue
            fetcher.accepted(block)
            if verdict:
                self.bytes_from[server] += len(data)
        self.wakeup.wake()  # more may be waiting: come back at the next step
