"""The block manifest: a SHA-256 per block, so that no block is written unchecked.

The whole-image SHA-256 only speaks once every block is on the target; by then a bad block
(a sender bug, a stray or insider packet, a restarted sender with another image) is on
disk, and which block it was is unknown.  With a hash per block a receiver checks each one
as it decodes it, writes only blocks that match, and fetches a failing one again; a
restarted receiver checks what its target already holds and asks only for the rest.

Zero blocks.  A block whose hash is the hash of that many zero bytes is all zeros: the
sender leaves it out of the pass, and a receiver that learns its hash makes it zero on the
target cheaply (a hole, BLKZEROOUT) instead of receiving it, so a sparse image puts only
its data on the wire.  The manifest is what marks them; no other field is needed.

The sender multicasts the manifest in MANIFEST packets of ``CHUNK_BLOCKS`` hashes, each
chunk twice and ahead of its blocks (see ``chunks_before``), so that at 1 % loss about one
receiver in 10,000 lacks a hash when its block decodes; it holds the block and asks for the
chunk in a NACK flagged MANIFEST.  The packets are sealed like every other, so they carry
the session key's authority.  Memory: 32 bytes per block (18 MB for 50 GB at k = 64).
"""

from __future__ import annotations

import hashlib
from typing import Callable, Optional, Sequence

from mcastdeploy.wire import MAX_MANIFEST_HASHES

HASH_BYTES = 32
#: Hashes per MANIFEST packet: 1284 bytes of body, inside one Ethernet frame.
CHUNK_BLOCKS = MAX_MANIFEST_HASHES


def block_hash(data: bytes | memoryview) -> bytes:
    return hashlib.sha256(data).digest()


def chunk_of(block: int) -> int:
    return block // CHUNK_BLOCKS


def chunks_before(block: int, chunk_count: int) -> list[int]:
    """Chunks the sender multicasts just before the pass's first symbol of ``block``.

    At the first block of each chunk c: chunk c + 1 (its first copy, a chunk early) and
    chunk c (its second copy); at block 0 also chunk 0's first copy.  Every hash thus
    arrives twice before its block, the second copy a chunk's time after the first, which
    spreads them beyond a loss burst of that length.
    """
    if block % CHUNK_BLOCKS:
        return []
    chunk = chunk_of(block)
    wanted = [chunk] if chunk else [0, 0]
    if chunk + 1 < chunk_count:
        wanted.insert(0, chunk + 1)
    return wanted


def chunks_due(previous: int, block: int, chunk_count: int) -> list[int]:
    """Chunks to multicast when the pass moves from block ``previous`` (-1 before it
    starts) to ``block``: ``chunks_before`` of every chunk boundary passed on the way, so
    that a pass that skips zero blocks still sends every chunk, twice, ahead."""
    first = (previous // CHUNK_BLOCKS + 1) * CHUNK_BLOCKS
    due: list[int] = []
    for boundary in range(first, block + 1, CHUNK_BLOCKS):
        due.extend(chunks_before(boundary, chunk_count))
    return due


class ZeroHashes:
    """The hashes of all-zero blocks of an image: full-size ones and the short last one."""

    def __init__(self, block_bytes: int, last_length: int) -> None:
        self.full = block_hash(bytes(block_bytes))
        self.last = self.full if last_length == block_bytes else block_hash(bytes(last_length))

    def matches(self, digest: Optional[bytes], last: bool) -> bool:
        return digest is not None and digest == (self.last if last else self.full)


class SenderManifest:
    """The sender's manifest: every block's hash, kept as one string of digests (32 bytes a
    block: 36 MB for 50 GB at k = 32).

    It may start short and grow (``extend``), in block order, while the image is still
    being downloaded: the sender then multicasts a chunk, and sends its blocks, only once
    the whole chunk is known (``known_chunks``), so that no pass has to wait for the
    whole download before it starts.
    """

    def __init__(self, digests: bytes | Sequence[bytes] = b"", *,
                 block_count: Optional[int] = None) -> None:
        digests = self._joined(digests)
        self._digests = bytearray(digests)
        self.block_count = len(digests) // HASH_BYTES if block_count is None else block_count
        if self.known_blocks > self.block_count:
            raise ValueError("more block hashes than blocks")
        self.chunk_count = -(-self.block_count // CHUNK_BLOCKS)

    @staticmethod
    def _joined(digests: bytes | Sequence[bytes]) -> bytes:
        if not isinstance(digests, (bytes, bytearray)):
            if any(len(digest) != HASH_BYTES for digest in digests):
                raise ValueError("block hashes are SHA-256 digests")
            digests = b"".join(digests)
        if len(digests) % HASH_BYTES:
            raise ValueError("block hashes are SHA-256 digests")
        return bytes(digests)

    @property
    def known_blocks(self) -> int:
        """Blocks whose hash is known: always a prefix of the image."""
        return len(self._digests) // HASH_BYTES

    @property
    def complete(self) -> bool:
        return self.known_blocks == self.block_count

    @property
    def known_chunks(self) -> int:
        """Chunks whose every hash is known: a prefix, the short last one once complete."""
        return self.chunk_count if self.complete else self.known_blocks // CHUNK_BLOCKS

    def extend(self, digests: bytes | Sequence[bytes]) -> None:
        """Append the hashes of the next blocks, in order."""
        digests = self._joined(digests)
        if self.known_blocks + len(digests) // HASH_BYTES > self.block_count:
            raise ValueError("more block hashes than blocks")
        self._digests += digests

    def hash_of(self, block: int) -> bytes:
        return bytes(self._digests[block * HASH_BYTES:(block + 1) * HASH_BYTES])

    def zero_blocks(self, block_bytes: int, last_length: int,
                    start: int = 0) -> bytearray:
        """1 for every known block from ``start`` on that is all zeros, by its hash."""
        zeros = ZeroHashes(block_bytes, last_length)
        last = self.block_count - 1
        return bytearray(zeros.matches(self.hash_of(block), block == last)
                         for block in range(start, self.known_blocks))

    def chunk(self, index: int) -> tuple[int, tuple[bytes, ...]]:
        """(first block, its hashes) of chunk ``index`` (which must be known)."""
        if index >= self.known_chunks:
            raise ValueError(f"chunk {index} is not known yet")
        first = index * CHUNK_BLOCKS
        stop = min(first + CHUNK_BLOCKS, self.block_count)
        return first, tuple(self.hash_of(block) for block in range(first, stop))

    @classmethod
    def of_image(cls, read: Callable[[int, int], bytes], block_count: int,
                 block_span: Callable[[int], tuple[int, int]]) -> "SenderManifest":
        """Hash an image block by block; ``block_span(b)`` is (offset, length)."""
        return cls(b"".join(block_hash(read(*block_span(block)))
                            for block in range(block_count)))


class ReceiverManifest:
    """The hashes a receiver has learned, and the chunks it must still ask for.

    Memory stays flat whatever the image size: a chunk's hashes are kept only until every
    block it covers is done (``done``), then released; what remains per chunk is a byte of
    state and a count.
    """

    def __init__(self, block_count: int, zeros: Optional[ZeroHashes] = None) -> None:
        self.block_count = block_count
        self._zeros = zeros
        self.chunk_count = -(-block_count // CHUNK_BLOCKS)
        self._reset(bytearray(block_count))
        #: Chunks to ask for: index -> when we may ask next.
        self._wanted: dict[int, float] = {}
        self._asks: dict[int, int] = {}
        #: min(_wanted.values()), kept because the receiver's get_timer asks after every
        #: datagram; None when it must be recomputed.
        self._earliest: Optional[float] = None

    def _reset(self, done: bytearray) -> None:
        """Nothing learned; ``done`` marks the blocks already done (their chunks are
        released as soon as they are learned)."""
        #: Learned chunks still needed: index -> their hashes, concatenated.
        self._chunks: dict[int, bytes] = {}
        self._learned = bytearray(self.chunk_count)
        self._learned_count = 0
        #: Blocks of each chunk not yet done.
        self._pending = bytearray(
            sum(1 for flag in done[first:first + CHUNK_BLOCKS] if not flag)
            for first in range(0, self.block_count, CHUNK_BLOCKS))

    @property
    def complete(self) -> bool:
        return self._learned_count == self.chunk_count

    def hash_of(self, block: int) -> Optional[bytes]:
        """The block's hash; None if its chunk is not learned yet (or already released,
        once every block it covers is done)."""
        hashes = self._chunks.get(block // CHUNK_BLOCKS)
        if hashes is None:
            return None
        start = (block % CHUNK_BLOCKS) * HASH_BYTES
        return hashes[start:start + HASH_BYTES]

    def is_zero(self, block: int) -> bool:
        """The manifest says ``block`` is all zeros (False while its hash is unknown)."""
        return self._zeros is not None and self._zeros.matches(
            self.hash_of(block), block == self.block_count - 1)

    def check(self, block: int, data: bytes | memoryview) -> Optional[bool]:
        """True if ``data`` is block ``block``, False if not, None if its hash is unknown."""
        expected = self.hash_of(block)
        if expected is None:
            return None
        return block_hash(data) == expected

    def learn(self, first: int, hashes: Sequence[bytes]) -> Optional[range]:
        """Store a chunk; the blocks it newly covers, or None if it is malformed (a chunk
        starts at a chunk boundary and holds the whole chunk).  Call ``settle`` once the
        blocks have been dealt with."""
        index, offset = divmod(first, CHUNK_BLOCKS)
        expected = min(CHUNK_BLOCKS, self.block_count - first) if first < self.block_count else 0
        if offset or len(hashes) != expected or expected == 0:
            return None
        if self._learned[index]:
            return range(0)
        self._chunks[index] = b"".join(hashes)
        self._learned[index] = 1
        self._learned_count += 1
        if self._wanted.pop(index, None) is not None:
            self._earliest = None
        self._asks.pop(index, None)
        return range(first, first + expected)

    def done(self, block: int) -> None:
        """``block`` is handed over, zeroed or kept: once its whole chunk is, the chunk's
        hashes are not needed any more."""
        index = block // CHUNK_BLOCKS
        self._pending[index] -= 1
        self.settle(index)

    def settle(self, index: int) -> None:
        if not self._pending[index]:
            self._chunks.pop(index, None)

    def want(self, block: int, now: float) -> None:
        """Block ``block`` decoded (or is on the target) without a hash: ask for its chunk."""
        index = chunk_of(block)
        if not self._learned[index] and index not in self._wanted:
            self._wanted[index] = now
            if self._earliest is not None:
                self._earliest = min(self._earliest, now)

    def want_all(self, now: float) -> None:
        for index in range(self.chunk_count):
            self.want(index * CHUNK_BLOCKS, now)

    def next_ask(self) -> Optional[float]:
        if self._earliest is None and self._wanted:
            self._earliest = min(self._wanted.values())
        return self._earliest if self._wanted else None

    def take_due(self, now: float, limit: int, retry: float) -> list[int]:
        """First blocks of up to ``limit`` chunks to ask for now; each is due again after
        ``retry`` (doubling per attempt, at most 8 times) unless it arrives."""
        due = sorted(index for index, when in self._wanted.items() if when <= now)[:limit]
        for index in due:
            attempt = self._asks.get(index, 0)
            self._asks[index] = attempt + 1
            self._wanted[index] = now + retry * 2 ** min(attempt, 3)
        if due:
            self._earliest = None
        return [index * CHUNK_BLOCKS for index in due]

    def forget(self, done: bytearray) -> None:
        """A new sender instance: learn its manifest afresh (it may hash another image);
        ``done`` marks the blocks already done."""
        self._reset(done)
        self._wanted.clear()
        self._asks.clear()
        self._earliest = None
