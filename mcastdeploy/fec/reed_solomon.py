"""Systematic Reed–Solomon erasure code on whole symbols, byte-identical to reedsolo.

A block is k source symbols of L bytes.  Byte column i (byte i of every
source symbol) is one reedsolo message of length k; reedsolo with
``nsym = 255 - k`` (primitive polynomial 0x11d, generator 2, fcr 0) appends
nsym parity bytes, and parity byte j becomes byte i of repair symbol k + j.
The code is linear, ``parity = P · column`` with P an (nsym, k) matrix, and
MDS: any k of the 255 symbols determine the block.  So every repair id from
k to 254 is a fresh, equally useful repair symbol.

Encoding is ``P[rows] · block`` via :mod:`.packed`.  Decoding with source
rows E lost and repair rows R' (|R'| = |E|) received uses the same tables:
``syndrome = P[R'] · block_with_E_zeroed  XOR  received`` equals
``P[R', E] · lost``, so ``lost = P[R', E]^-1 · syndrome``.  Tables for R' and
the small inverses are cached in byte-bounded LRUs, since a receiver sees
the same first repair ids again and again but loss patterns vary.
"""

from __future__ import annotations

import functools
import operator
import threading
from collections import OrderedDict
from typing import Any, Hashable, Mapping, Sequence, Union

import numpy as np

from . import gf256
from .errors import FecError
from .packed import MAX_PACKED_ROWS, PackedRows, multiply, pack_matrix, pack_rows

__all__ = ["MAX_SYMBOLS", "ReedSolomonCodec", "codec_for", "generator_poly", "parity_matrix"]

MAX_SYMBOLS = 255
"""Symbols per block (source + repair): the length of a GF(2^8) RS codeword."""

SymbolData = Union[np.ndarray, bytes, bytearray, memoryview]


# --- code construction -------------------------------------------------------


@functools.lru_cache(maxsize=None)
def generator_poly(nsym: int) -> np.ndarray:
    """g(x) = prod_{i<nsym} (x - 2^i), coefficients highest degree first (reedsolo's order)."""
    g = np.ones(1, dtype=np.uint8)
    for i in range(nsym):
        root = int(gf256.EXP[i])
        nxt = np.zeros(g.size + 1, dtype=np.uint8)
        nxt[:-1] = g  # g * x
        nxt[1:] ^= gf256.MUL[root][g]  # + root * g  (minus is plus here)
        g = nxt
    g.flags.writeable = False
    return g


@functools.lru_cache(maxsize=MAX_SYMBOLS)
def parity_matrix(k: int) -> np.ndarray:
    """The (255-k, k) matrix P with reedsolo parity = P · message, read-only.

    Message byte i is the coefficient of x^(k-1-i); the parity is
    ``message(x) · x^nsym mod g(x)`` and parity byte j is the coefficient of
    x^(nsym-1-j).  So column i of P is x^(nsym+k-1-i) mod g(x), and these
    remainders follow from one another by multiplying by x: k cheap steps.
    """
    _check_k(k)
    nsym = MAX_SYMBOLS - k
    low = generator_poly(nsym)[1:]  # x^nsym ≡ low (mod g), highest degree first
    mul = gf256.MUL
    rem = low.copy()
    cols = [rem]
    for _ in range(k - 1):
        top = rem[0]
        rem = np.concatenate((rem[1:], np.zeros(1, dtype=np.uint8)))
        if top:
            rem ^= mul[top][low]
        cols.append(rem)
    p = np.ascontiguousarray(np.stack(cols[::-1], axis=1))
    p.flags.writeable = False
    return p


def _check_k(k: Any) -> int:
    try:
        k = operator.index(k)
    except TypeError:
        raise FecError(f"k must be an integer, got {k!r}") from None
    if not 1 <= k <= MAX_SYMBOLS - 1:
        raise FecError(f"k must be in 1..{MAX_SYMBOLS - 1}, got {k}")
    return k


# --- caches ------------------------------------------------------------------


class _ByteLRU:
    """Thread-safe LRU bounded by the total ``nbytes`` of its values."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._data: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Any:
        with self._lock:
            hit = self._data.get(key)
            if hit is None:
                return None
            self._data.move_to_end(key)
            return hit[0]

    def put(self, key: Hashable, value: Any, nbytes: int) -> None:
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self.nbytes -= old[1]
            self._data[key] = (value, nbytes)
            self.nbytes += nbytes
            while self.nbytes > self.max_bytes and len(self._data) > 1:
                _, (_, nb) = self._data.popitem(last=False)
                self.nbytes -= nb

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self.nbytes = 0

    def __len__(self) -> int:
        return len(self._data)


# Packed tables for groups of <= 8 parity rows, keyed (k, rows).  k=32 with
# 4 rows is 32 kB, so 32 MB holds about a thousand such groups.
_encode_tables = _ByteLRU(32 << 20)
# Packed inverses of P[R', E], keyed (k, R', E); 4x4 is 4 kB.
_inverse_tables = _ByteLRU(16 << 20)


def clear_caches() -> None:
    """Forget cached tables (benchmarks use it to measure cold paths)."""
    _encode_tables.clear()
    _inverse_tables.clear()


# --- the codec ---------------------------------------------------------------


def _nbytes(value: Any) -> int:
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    try:
        return memoryview(value).nbytes
    except TypeError:
        raise FecError(f"symbol data must be bytes-like, got {type(value).__name__}") from None


def _join(parts: list[Any], rows: int, length: int) -> np.ndarray:
    """Concatenate byte-like parts into a new writable (rows, length) uint8 array."""
    try:
        buf = bytearray().join(parts)
    except (TypeError, BufferError, ValueError) as exc:
        raise FecError(f"symbol data must be contiguous bytes-like objects: {exc}") from None
    return np.frombuffer(buf, dtype=np.uint8).reshape(rows, length)


class ReedSolomonCodec:
    """Encoder/decoder for blocks of k source symbols; see the module docstring.

    Instances hold no per-call state and may be shared between threads
    (:func:`codec_for` shares them).
    """

    def __init__(self, k: int) -> None:
        self.k: int = _check_k(k)
        self.max_repair: int = MAX_SYMBOLS - self.k
        self._parity = parity_matrix(self.k)
        # Nested lists for building small submatrices without NumPy overhead.
        self._parity_rows: list[list[int]] = self._parity.tolist()
        self._zero_cache: dict[int, bytes] = {}

    def __repr__(self) -> str:
        return f"ReedSolomonCodec(k={self.k})"

    # -- tables --

    def _groups(self, rows: Sequence[int]) -> list[PackedRows]:
        """Packed tables for parity rows ``rows`` (0-based), in groups of <= 8."""
        out = []
        for s in range(0, len(rows), MAX_PACKED_ROWS):
            key = (self.k, tuple(rows[s : s + MAX_PACKED_ROWS]))
            g = _encode_tables.get(key)
            if g is None:
                g = pack_rows(self._parity[list(key[1])])
                _encode_tables.put(key, g, g.nbytes)
            out.append(g)
        return out

    def _inverse_groups(self, rows: tuple[int, ...], lost: tuple[int, ...]) -> list[PackedRows]:
        """Packed tables of P[rows, lost]^-1."""
        key = (self.k, rows, lost)
        g = _inverse_tables.get(key)
        if g is None:
            p = self._parity_rows
            inv = gf256.invert_matrix([[p[r][c] for c in lost] for r in rows])
            g = [pack_rows(inv)] if len(rows) <= MAX_PACKED_ROWS else pack_matrix(inv)
            _inverse_tables.put(key, g, sum(x.nbytes for x in g))
        return g

    def _repair_row(self, symbol_id: Any) -> int:
        try:
            sid = operator.index(symbol_id)
        except TypeError:
            raise FecError(f"symbol id must be an integer, got {symbol_id!r}") from None
        if not self.k <= sid < MAX_SYMBOLS:
            raise FecError(f"repair id must be in {self.k}..{MAX_SYMBOLS - 1} for k={self.k}, got {sid}")
        return sid - self.k

    # -- public API --

    def encode(self, source: np.ndarray, repair_ids: Sequence[int]) -> np.ndarray:
        """Repair symbols ``repair_ids`` (each in k..254) of ``source``, shape (k, L) uint8.

        Returns a new (len(repair_ids), L) uint8 array.  Any ids may be asked
        for at any time, so a sender can answer NACKs with fresh ones.
        """
        if not isinstance(source, np.ndarray) or source.dtype != np.uint8 or source.ndim != 2:
            raise FecError("source must be a 2-D uint8 numpy array")
        if source.shape[0] != self.k:
            raise FecError(f"source has {source.shape[0]} rows, codec has k={self.k}")
        rows = [self._repair_row(r) for r in repair_ids]
        out = np.empty((len(rows), source.shape[1]), dtype=np.uint8)
        if rows:
            multiply(self._groups(rows), source, out)
        return out

    def decode(self, symbols: Mapping[int, SymbolData], symbol_size: int) -> np.ndarray:
        """The (k, L) source block from any k distinct symbols (L = ``symbol_size``).

        Received source symbols are copied; the others are solved from the
        lowest-numbered repair symbols given (their tables are the likeliest
        to be cached).  Extra symbols are ignored.  Returns a new writable array.
        """
        k = self.k
        try:
            length = operator.index(symbol_size)
        except TypeError:
            raise FecError(f"symbol_size must be an integer, got {symbol_size!r}") from None
        if length < 0:
            raise FecError(f"symbol_size must be >= 0, got {length}")
        parts: list[Any] = [None] * k
        repair: dict[int, Any] = {}
        for sid, value in symbols.items():
            try:
                sid = operator.index(sid)
            except TypeError:
                raise FecError(f"symbol id must be an integer, got {sid!r}") from None
            if not 0 <= sid < MAX_SYMBOLS:
                raise FecError(f"symbol id must be in 0..{MAX_SYMBOLS - 1}, got {sid}")
            if (len(value) if type(value) is bytes else _nbytes(value)) != length:
                raise FecError(f"symbol {sid} has {_nbytes(value)} bytes, expected {length}")
            if sid < k:
                parts[sid] = value
            else:
                repair[sid] = value
        lost = [i for i, v in enumerate(parts) if v is None]
        if len(lost) > len(repair):
            raise FecError(f"need {k} distinct symbols, got {k - len(lost) + len(repair)}")
        if lost:
            zero = self._zero_cache.get(length)
            if zero is None:
                if len(self._zero_cache) >= 8:
                    self._zero_cache.clear()
                zero = self._zero_cache[length] = bytes(length)
            for i in lost:
                parts[i] = zero  # lost rows must be zero for the syndrome
        block = _join(parts, k, length)
        if lost:
            ids = sorted(repair)[: len(lost)]
            received = _join([repair[i] for i in ids], len(ids), length)
            self._solve(block, lost, [i - k for i in ids], received)
        return block

    def recover_into(
        self,
        block: np.ndarray,
        present: Sequence[bool] | np.ndarray,
        repair: Mapping[int, SymbolData],
    ) -> None:
        """Fill the rows of ``block`` (k, L) that ``present`` marks missing, in place.

        Uses the lowest-numbered of the ``repair`` symbols (ids k..254); needs
        at least as many as rows are missing.  The missing rows' old contents
        are ignored.  Allocates only the small syndrome.
        """
        k = self.k
        if not isinstance(block, np.ndarray) or block.dtype != np.uint8 or block.shape[:1] != (k,) or block.ndim != 2:
            raise FecError(f"block must be a ({k}, L) uint8 numpy array")
        if not block.flags.writeable:
            raise FecError("block must be writable")
        if isinstance(present, np.ndarray):
            if present.shape != (k,):
                raise FecError(f"present must have {k} entries, got shape {present.shape}")
            lost = np.flatnonzero(np.logical_not(present)).tolist()
        else:
            if len(present) != k:
                raise FecError(f"present must have {k} entries, got {len(present)}")
            lost = [i for i, p in enumerate(present) if not p]
        if not lost:
            return
        length = block.shape[1]
        by_id: dict[int, Any] = {}
        for sid, value in repair.items():
            rid = self._repair_row(sid) + k
            if _nbytes(value) != length:
                raise FecError(f"symbol {rid} has {_nbytes(value)} bytes, expected {length}")
            by_id[rid] = value
        if len(by_id) < len(lost):
            raise FecError(f"{len(lost)} source symbols missing but only {len(by_id)} repair symbols given")
        ids = sorted(by_id)[: len(lost)]
        received = _join([by_id[i] for i in ids], len(ids), length)
        block[lost] = 0
        self._solve(block, lost, [i - k for i in ids], received)

    def _solve(self, block: np.ndarray, lost: list[int], rows: list[int], received: np.ndarray) -> None:
        # block has zeros in the lost rows; rows are 0-based parity rows.
        # received ^= P[rows] · block is the syndrome P[rows, lost] · block[lost].
        part = np.empty_like(received)
        multiply(self._groups(rows), block, part)
        np.bitwise_xor(received, part, out=received)
        multiply(self._inverse_groups(tuple(rows), tuple(lost)), received, block, lost)


@functools.lru_cache(maxsize=MAX_SYMBOLS)
def codec_for(k: int) -> ReedSolomonCodec:
    """The shared codec for blocks of k source symbols."""
    return ReedSolomonCodec(k)
