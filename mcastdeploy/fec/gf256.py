"""Arithmetic in GF(2^8) as reedsolo defines it: primitive polynomial 0x11d, generator 2.

Everything is table driven.  The NumPy tables (``EXP``, ``LOG``, ``MUL``,
``INV``) feed the vectorised codec; plain-Python copies of the same tables
feed :func:`invert_matrix` for the small systems a decoder solves per loss
pattern, where NumPy's per-call overhead would cost more than the arithmetic.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .errors import FecError

__all__ = [
    "PRIMITIVE_POLY",
    "GENERATOR",
    "EXP",
    "LOG",
    "MUL",
    "INV",
    "mul",
    "inverse",
    "matmul",
    "invert_matrix",
]

PRIMITIVE_POLY = 0x11D
GENERATOR = 2
_ORDER = 255  # size of the multiplicative group

# Above this size NumPy row operations beat the plain-Python elimination.
_PYTHON_INVERT_MAX = 10


def _build_exp() -> np.ndarray:
    # Powers of the generator; inherently sequential, 255 steps at import.
    exp = np.zeros(2 * _ORDER, dtype=np.uint8)
    x = 1
    for i in range(_ORDER):
        exp[i] = x
        x *= GENERATOR
        if x & 0x100:
            x ^= PRIMITIVE_POLY
    # Doubled so that EXP[LOG[a] + LOG[b]] needs no modulo.
    exp[_ORDER:] = exp[:_ORDER]
    return exp


EXP: np.ndarray = _build_exp()
"""EXP[i] = 2**i, for 0 <= i < 510."""

LOG: np.ndarray = np.zeros(256, dtype=np.intp)
"""LOG[a] = log_2(a) for a != 0; LOG[0] is meaningless (0)."""
LOG[EXP[:_ORDER]] = np.arange(_ORDER)

MUL: np.ndarray = np.zeros((256, 256), dtype=np.uint8)
"""MUL[a, b] = a * b.  Row a is the whole 'multiply by a' map, which the packed tables gather."""
MUL[1:, 1:] = EXP[LOG[1:, None] + LOG[None, 1:]]

INV: np.ndarray = np.zeros(256, dtype=np.uint8)
"""INV[a] = 1 / a for a != 0; INV[0] = 0."""
INV[1:] = EXP[_ORDER - LOG[1:]]

for _t in (EXP, LOG, MUL, INV):
    _t.flags.writeable = False

# Python mirrors for scalar work: list indexing is several times cheaper
# than indexing a NumPy array with a Python int.
_MUL_ROWS: list[list[int]] = MUL.tolist()
_INV_LIST: list[int] = INV.tolist()


def mul(a: int, b: int) -> int:
    """Product of two field elements."""
    return _MUL_ROWS[a][b]


def inverse(a: int) -> int:
    """Multiplicative inverse; ``ZeroDivisionError`` for 0, as in any field."""
    if a == 0:
        raise ZeroDivisionError("0 has no inverse in GF(2^8)")
    return _INV_LIST[a]


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Matrix product over GF(2^8) of small uint8 matrices (setup and tests, not data)."""
    a = np.asarray(a, dtype=np.uint8)
    b = np.asarray(b, dtype=np.uint8)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise FecError(f"cannot multiply shapes {a.shape} and {b.shape}")
    # (n, m, p) products, XOR-summed over the shared axis.
    return np.bitwise_xor.reduce(MUL[a[:, :, None], b[None, :, :]], axis=1, initial=0).astype(np.uint8)


def _invert_python(rows: list[list[int]]) -> list[list[int]]:
    # In-place Gauss-Jordan: column `col` of the working matrix is recycled
    # to hold column `col` of the inverse, so each pivot touches n x n
    # entries instead of n x 2n.  One list comprehension per row operation:
    # about 6 µs for 4x4, far below NumPy's per-call overhead.
    n = len(rows)
    a = [list(r) for r in rows]
    mul_rows = _MUL_ROWS
    perm = list(range(n))
    for col in range(n):
        for p in range(col, n):
            if a[p][col]:
                break
        else:
            raise FecError("matrix is singular over GF(2^8)")
        if p != col:
            a[col], a[p] = a[p], a[col]
            perm[col], perm[p] = perm[p], perm[col]
        pivot = a[col]
        scale = mul_rows[_INV_LIST[pivot[col]]]
        pivot[col] = 1
        pivot = a[col] = [scale[v] for v in pivot]
        for r in range(n):
            if r != col:
                row = a[r]
                f = row[col]
                if f:
                    mf = mul_rows[f]
                    row[col] = 0
                    a[r] = [v ^ mf[w] for v, w in zip(row, pivot)]
    if perm == list(range(n)):
        return a
    # We inverted (S A) for the row swaps S; A^-1 = (S A)^-1 S permutes columns.
    out = [[0] * n for _ in range(n)]
    for r in range(n):
        src, dst = a[r], out[r]
        for i in range(n):
            dst[perm[i]] = src[i]
    return out


def _invert_numpy(a: np.ndarray) -> np.ndarray:
    # Same elimination, one pivot at a time but all rows at once.
    n = a.shape[0]
    aug = np.zeros((n, 2 * n), dtype=np.uint8)
    aug[:, :n] = a
    aug[np.arange(n), n + np.arange(n)] = 1
    for col in range(n):
        nz = np.flatnonzero(aug[col:, col])
        if nz.size == 0:
            raise FecError("matrix is singular over GF(2^8)")
        p = col + int(nz[0])
        if p != col:
            aug[[col, p]] = aug[[p, col]]
        aug[col] = MUL[INV[aug[col, col]]][aug[col]]
        f = aug[:, col].copy()
        f[col] = 0
        hit = np.flatnonzero(f)
        if hit.size:
            aug[hit] ^= MUL[f[hit, None], aug[col][None, :]]
    return aug[:, n:].copy()


def invert_matrix(a: np.ndarray | Sequence[Sequence[int]]) -> np.ndarray:
    """Inverse of a square matrix over GF(2^8), as a new uint8 array.

    Small matrices (the decoder's per-loss-pattern systems) are inverted in plain
    Python straight from lists, which beats NumPy's per-call overhead; larger ones
    with NumPy.  Raises :class:`FecError` if the matrix is not square or is
    singular (never the case for a square submatrix of an MDS code's parity matrix).
    """
    if isinstance(a, np.ndarray) and a.ndim != 2:
        raise FecError(f"need a square matrix, got shape {a.shape}")
    rows = a.tolist() if isinstance(a, np.ndarray) else [list(row) for row in a]
    n = len(rows)
    if any(len(row) != n for row in rows):
        raise FecError(f"need a square matrix, got {n} rows of lengths "
                       f"{sorted({len(row) for row in rows})}")
    if n == 0:
        return np.zeros((0, 0), dtype=np.uint8)
    if n <= _PYTHON_INVERT_MAX:
        return np.array(_invert_python(rows), dtype=np.uint8)
    return _invert_numpy(np.array(rows, dtype=np.uint8))
