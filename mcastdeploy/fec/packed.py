"""Matrix × block products over GF(2^8) with one packed lookup table per input row.

Computing ``out = M · X`` (M is r×c, X is c×L bytes) naively needs r·c·L
table look-ups.  Instead, for each input row i we precompute a 256-entry
table whose entry b holds the r products ``M[0,i]*b … M[r-1,i]*b`` packed
into one integer (uint8/16/32/64 for up to 1/2/4/8 rows).  One gather per
input byte then yields all r products at once, an XOR-reduce over i sums
them, and a byte view unpacks the r output rows.  Matrices with more than 8
rows are split into groups that share the gather index.

The index for input byte b of row i is ``256*i + b`` into the flattened
(c, 256) table.  It fits in uint16 (c <= 254), which NumPy adds fast, and is
then widened to intp once so that ``take`` does not convert it again.  All
scratch arrays are reused per thread: fresh 100 kB+ arrays come from mmap and
page-faulting them costs more than the arithmetic.
"""

from __future__ import annotations

import threading
from typing import Sequence

import numpy as np

from .errors import FecError
from .gf256 import MUL

__all__ = ["PackedRows", "pack_rows", "pack_matrix", "multiply", "MAX_PACKED_ROWS"]

MAX_PACKED_ROWS = 8

# Packed integer type for n rows; 3 rows use a 4-byte word with one idle byte.
# Little-endian explicitly, so that byte j of a word is always row j.
_WIDTH = {1: 1, 2: 2, 3: 4, 4: 4, 5: 8, 6: 8, 7: 8, 8: 8}
_DTYPE = {1: np.dtype("u1"), 2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}

# Work on column chunks of at most this many input bytes (rows × columns).
# Measured: smaller chunks (cache-sized, 64K) lose more to per-call overhead
# than they gain in locality; the cap only bounds per-thread scratch memory
# (about 9 MB: intp index + uint16 index + uint64 gather buffer).
_CHUNK_ELEMENTS = 1 << 19

_shifted_cache: dict[int, np.ndarray] = {}

# Row j of a packed group selects from block j of the shifted tables.
_BLOCK_BASE = (np.arange(4, dtype=np.intp) * 256).reshape(4, 1)


def _shifted(width: int) -> np.ndarray:
    """(width * 256, 256) table: row 256*j + a, column b holds (a*b) << 8j, packed dtype."""
    tab = _shifted_cache.get(width)
    if tab is None:
        dt = _DTYPE[width]
        tab = np.concatenate([MUL.astype(dt) << np.array(8 * j, dtype=dt) for j in range(width)])
        tab.flags.writeable = False
        _shifted_cache[width] = tab
    return tab


class PackedRows:
    """Up to 8 rows of a GF(2^8) matrix, prepared as one packed table per column."""

    __slots__ = ("rows", "cols", "width", "table", "nbytes")

    def __init__(self, rows: int, cols: int, width: int, table: np.ndarray) -> None:
        self.rows = rows
        self.cols = cols
        self.width = width
        self.table = table  # flat (cols * 256,), dtype _DTYPE[width]
        self.nbytes = int(table.nbytes)


def _pack_table(m: np.ndarray) -> np.ndarray:
    # m: (n <= 4, c) uint8 -> (c, 256) packed, row j of m in byte j.  One
    # gather of the n selected 'multiply by m[j, i]' rows, then XOR them.
    n = m.shape[0]
    sh = _shifted(_WIDTH[n])
    if n == 1:
        return sh.take(m[0], axis=0)
    return np.bitwise_xor.reduce(sh.take(m + _BLOCK_BASE[:n], axis=0), axis=0)


def pack_rows(matrix: np.ndarray) -> PackedRows:
    """Packed tables for a (n, c) uint8 matrix with 1 <= n <= 8."""
    m = matrix if isinstance(matrix, np.ndarray) and matrix.dtype == np.uint8 else np.asarray(matrix, dtype=np.uint8)
    n, c = m.shape
    if n <= 4:
        if n == 0:
            raise FecError(f"can pack 1..{MAX_PACKED_ROWS} rows, got 0")
        table = _pack_table(m)
    elif n <= MAX_PACKED_ROWS:
        # Two 4-byte halves joined; saves keeping 8 shifted 512 kB tables around.
        table = _pack_table(m[:4]).astype(_DTYPE[8])
        hi = _pack_table(m[4:]).astype(_DTYPE[8])
        hi <<= np.array(32, dtype=_DTYPE[8])
        table |= hi
    else:
        raise FecError(f"can pack 1..{MAX_PACKED_ROWS} rows, got {n}")
    table = table.reshape(-1)
    table.flags.writeable = False
    return PackedRows(n, c, _WIDTH[n], table)


def pack_matrix(matrix: np.ndarray) -> list[PackedRows]:
    """Packed tables for any (r, c) matrix, in groups of up to 8 rows."""
    m = np.asarray(matrix, dtype=np.uint8)
    return [pack_rows(m[s : s + MAX_PACKED_ROWS]) for s in range(0, m.shape[0], MAX_PACKED_ROWS)]


_offset_cache: dict[int, np.ndarray] = {}


def _offsets(c: int) -> np.ndarray:
    # (c, 1) uint16 row offsets 256*i into the flattened tables.
    off = _offset_cache.get(c)
    if off is None:
        off = (np.arange(c, dtype=np.uint16) << np.uint16(8)).reshape(c, 1)
        off.flags.writeable = False
        _offset_cache[c] = off
    return off


class _Work:
    """Reusable arrays for one (rows c, columns n) shape of input."""

    __slots__ = ("idx16", "idx", "by_width")

    def __init__(self, c: int, n: int) -> None:
        self.idx16 = np.empty((c, n), dtype=np.uint16)
        self.idx = np.empty((c, n), dtype=np.intp)
        # width -> (gathered (c, n), accumulator (n,), accumulator as (n, width) bytes)
        self.by_width: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def for_width(self, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        bufs = self.by_width.get(width)
        if bufs is None:
            c, n = self.idx.shape
            acc = np.empty(n, dtype=_DTYPE[width])
            bufs = (np.empty((c, n), dtype=_DTYPE[width]), acc, acc.view(np.uint8).reshape(n, width))
            self.by_width[width] = bufs
        return bufs


class _Scratch(threading.local):
    """Per-thread :class:`_Work` objects by shape (NumPy may release the GIL mid-call)."""

    def __init__(self) -> None:
        self.work: dict[tuple[int, int], _Work] = {}
        self.elements = 0


_scratch = _Scratch()
_SCRATCH_MAX_ELEMENTS = 4 * _CHUNK_ELEMENTS  # ~19 bytes each: about 40 MB per thread at most


def _work(c: int, n: int) -> _Work:
    scratch = _scratch
    w = scratch.work.get((c, n))
    if w is None:
        # A process sees few shapes; start over rather than grow without bound.
        if scratch.elements + c * n > _SCRATCH_MAX_ELEMENTS:
            scratch.work.clear()
            scratch.elements = 0
        w = scratch.work[(c, n)] = _Work(c, n)
        scratch.elements += c * n
    return w


def multiply(
    groups: Sequence[PackedRows],
    data: np.ndarray,
    out: np.ndarray,
    out_rows: Sequence[int] | None = None,
) -> None:
    """``out = M · data`` where M is the row-wise concatenation of ``groups``.

    ``data`` is (c, L) uint8 (any strides); ``out`` is a writable uint8
    array with L columns.  Row r of the product goes to ``out[r]``, or to
    ``out[out_rows[r]]`` if given (a decoder scatters straight into the
    block).  Shapes are the caller's to check.
    """
    c, length = data.shape
    if length == 0 or not groups:
        return
    chunk = max(64, _CHUNK_ELEMENTS // c)
    off = _offsets(c)
    for a in range(0, length, chunk):
        n = min(chunk, length - a)
        whole = n == length
        w = _work(c, n)
        idx = w.idx
        np.add(data if whole else data[:, a : a + n], off, out=w.idx16)
        np.copyto(idx, w.idx16, casting="unsafe")
        row = 0
        for g in groups:
            gathered, acc, acc_bytes = w.for_width(g.width)
            # mode="wrap" takes NumPy's faster path; indices are in range anyway.
            g.table.take(idx, out=gathered, mode="wrap")
            np.bitwise_xor.reduce(gathered, axis=0, out=acc)
            rows = g.rows
            res = (acc_bytes if rows == g.width else acc_bytes[:, :rows]).T
            if out_rows is None:
                np.copyto(out[row : row + rows] if whole else out[row : row + rows, a : a + n], res)
            elif whole:
                out[out_rows[row : row + rows]] = res
            else:
                out[out_rows[row : row + rows], a : a + n] = res
            row += rows
