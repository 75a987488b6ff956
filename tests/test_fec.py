"""The FEC codec proves itself against reedsolo, the independent reference it must match."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import reedsolo
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mcastdeploy.fec import MAX_SYMBOLS, FecError, ReedSolomonCodec, codec_for
from mcastdeploy.fec import gf256, packed
from mcastdeploy.fec.reed_solomon import clear_caches, generator_poly, parity_matrix

FAST = settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def _block(k: int, length: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (k, length), dtype=np.uint8)


def _slow_mul(a: int, b: int) -> int:
    # Carry-less multiply then reduce by 0x11d: the definition, no tables.
    r = 0
    while b:
        if b & 1:
            r ^= a
        a <<= 1
        if a & 0x100:
            a ^= 0x11D
        b >>= 1
    return r


# --- field ---------------------------------------------------------------------


def test_mul_table_matches_definition() -> None:
    rng = np.random.default_rng(0)
    pairs = rng.integers(0, 256, (2000, 2)).tolist() + [[0, 7], [7, 0], [255, 255], [1, 200]]
    for a, b in pairs:
        assert gf256.mul(a, b) == gf256.MUL[a, b] == _slow_mul(a, b)


def test_inverse_and_tables_consistent() -> None:
    a = np.arange(1, 256)
    assert (gf256.MUL[a, gf256.INV[a]] == 1).all()
    assert sorted(gf256.EXP[:255].tolist()) == list(range(1, 256))  # 2 generates the group
    with pytest.raises(ZeroDivisionError):
        gf256.inverse(0)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 10, 11, 24])  # both the Python and the NumPy path
def test_invert_matrix(n: int) -> None:
    rng = np.random.default_rng(n)
    done = 0
    while done < 5:
        m = rng.integers(0, 256, (n, n), dtype=np.uint8)
        m[rng.random((n, n)) < 0.3] = 0  # zeros force row swaps
        try:
            inv = gf256.invert_matrix(m)
        except FecError:
            continue
        assert (gf256.matmul(m, inv) == np.eye(n, dtype=np.uint8)).all()
        assert (gf256.matmul(inv, m) == np.eye(n, dtype=np.uint8)).all()
        done += 1


def test_invert_singular() -> None:
    with pytest.raises(FecError):
        gf256.invert_matrix([[1, 2], [1, 2]])
    with pytest.raises(FecError):
        gf256.invert_matrix(np.zeros((12, 12), dtype=np.uint8))
    with pytest.raises(FecError):
        gf256.invert_matrix(np.zeros((2, 3), dtype=np.uint8))


# --- byte identity with reedsolo ---------------------------------------------------


def test_generator_poly_matches_reedsolo() -> None:
    reedsolo.init_tables(0x11D)  # module-level tables; RSCodec() would do the same
    for nsym in (1, 2, 4, 30, 223, 254):
        assert generator_poly(nsym).tolist() == list(reedsolo.rs_generator_poly(nsym))


@pytest.mark.parametrize("k", [1, 2, 3, 16, 32, 64, 200, 254])
def test_repair_symbols_identical_to_reedsolo(k: int) -> None:
    length = 6
    src = _block(k, length, seed=k)
    ids = list(range(k, MAX_SYMBOLS))
    repair = codec_for(k).encode(src, ids)
    rs = reedsolo.RSCodec(nsym=MAX_SYMBOLS - k)
    for i in range(length):
        codeword = rs.encode(bytes(src[:, i]))
        assert bytes(codeword[:k]) == bytes(src[:, i])
        assert bytes(codeword[k:]) == repair[:, i].tobytes(), f"column {i}"


def test_reedsolo_decodes_our_symbols() -> None:
    # The other direction: reedsolo's own erasure decoder accepts our repair symbols.
    k, lost, rep = 32, [0, 5, 31], [40, 100, 254]
    src = _block(k, 2, seed=9)
    repair = codec_for(k).encode(src, rep)
    rs = reedsolo.RSCodec(nsym=MAX_SYMBOLS - k)
    for i in range(2):
        word = bytearray(MAX_SYMBOLS)
        word[:k] = src[:, i].tobytes()
        for j, r in enumerate(rep):
            word[r] = repair[j, i]
        erased = lost + [p for p in range(k, MAX_SYMBOLS) if p not in rep]
        for p in erased:
            word[p] = 0
        msg = rs.decode(word, erase_pos=erased)[0]
        assert bytes(msg) == src[:, i].tobytes()


def test_encode_rows_any_order_duplicates_and_groups() -> None:
    k = 20
    codec = ReedSolomonCodec(k)
    src = _block(k, 33, seed=1)
    all_rep = codec.encode(src, range(k, MAX_SYMBOLS))  # many uint64 groups
    ids = [254, k, 100, k, 37, 38, 39, 40, 41, 42, 43, 44, 45]  # > 8 rows, duplicates, unsorted
    got = codec.encode(src, np.array(ids))
    assert (got == all_rep[np.array(ids) - k]).all()
    assert codec.encode(src, []).shape == (0, 33)
    assert (codec.encode(src, (k + 3,))[0] == all_rep[3]).all()


def test_encode_matches_parity_matrix_definition() -> None:
    # parity = P · d, computed the slow way for a handful of bytes.
    k = 5
    p = parity_matrix(k)
    src = _block(k, 4, seed=2)
    rep = codec_for(k).encode(src, range(k, MAX_SYMBOLS))
    assert (rep == gf256.matmul(p, src)).all()


def test_chunked_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    # Long symbols are processed in column chunks; force several, with a short tail.
    monkeypatch.setattr(packed, "_CHUNK_ELEMENTS", 16 * 64)
    k, length = 16, 64 * 3 + 17
    codec = ReedSolomonCodec(k)
    src = _block(k, length, seed=3)
    rep = codec.encode(src, range(k, k + 12))
    for i in range(0, length, 50):
        assert rep[:, i].tolist() == [int(gf256.matmul(parity_matrix(k)[j : j + 1], src[:, i : i + 1])[0, 0]) for j in range(12)]
    lost = [0, 3, 7, 8, 9, 15]
    symbols = {i: src[i] for i in range(k) if i not in lost} | {k + j: rep[j] for j in range(2, 8)}
    assert (codec.decode(symbols, length) == src).all()


# --- recovery --------------------------------------------------------------------


@st.composite
def _loss_case(draw: st.DrawFn) -> tuple[int, int, int, list[int]]:
    k = draw(st.one_of(st.integers(1, 40), st.sampled_from([64, 127, 128, 200, 253, 254])))
    length = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**32 - 1))
    n_extra = draw(st.integers(0, 3))
    # Which ids arrived: a random subset of size >= k, biased toward few sources.
    n_keep = min(MAX_SYMBOLS, k + n_extra)
    ids = draw(st.permutations(range(MAX_SYMBOLS)))[:n_keep]
    return k, length, seed, sorted(ids)


@FAST
@given(_loss_case())
def test_decode_random_losses(case: tuple[int, int, int, list[int]]) -> None:
    k, length, seed, ids = case
    codec = codec_for(k)
    src = _block(k, length, seed)
    rep = codec.encode(src, [i for i in ids if i >= k])
    symbols: dict[int, object] = {}
    r = 0
    kinds = (bytes, bytearray, memoryview, np.asarray)
    for n, i in enumerate(ids):
        row = src[i] if i < k else rep[(r := r + 1) - 1]
        symbols[i] = kinds[n % 4](row.tobytes()) if n % 4 != 3 else row
    out = codec.decode(symbols, length)
    assert out.shape == (k, length) and out.dtype == np.uint8
    assert (out == src).all()


@FAST
@given(_loss_case())
def test_recover_into_matches_decode(case: tuple[int, int, int, list[int]]) -> None:
    k, length, seed, ids = case
    codec = codec_for(k)
    src = _block(k, length, seed)
    rep_ids = [i for i in ids if i >= k]
    rep = codec.encode(src, rep_ids)
    present = np.zeros(k, dtype=bool)
    present[[i for i in ids if i < k]] = True
    block = src.copy()
    block[~present] = 0xA5  # garbage in the holes must not matter
    repair = dict(zip(rep_ids, rep))
    use_list = seed % 2 == 0
    codec.recover_into(block, present.tolist() if use_list else present, repair)
    symbols = {i: src[i] for i in ids if i < k} | repair
    assert (block == codec.decode(symbols, length)).all()
    assert (block == src).all()


@pytest.mark.parametrize("k", [1, 2, 50, 127])
def test_decode_from_repair_only(k: int) -> None:
    codec = codec_for(k)
    src = _block(k, 24, seed=k)
    ids = list(range(MAX_SYMBOLS - k, MAX_SYMBOLS))  # the last k repair ids, no source at all
    rep = codec.encode(src, ids)
    assert (codec.decode(dict(zip(ids, rep)), 24) == src).all()


def test_decode_prefers_source_and_ignores_extra() -> None:
    k = 8
    codec = codec_for(k)
    src = _block(k, 10, seed=4)
    rep = codec.encode(src, range(k, k + 6))
    symbols = {i: src[i] for i in range(k)} | {k + j: rep[j] for j in range(6)}
    assert (codec.decode(symbols, 10) == src).all()
    # A corrupt extra repair symbol is never looked at when all sources are present.
    symbols[k + 5] = bytes(10)
    assert (codec.decode(symbols, 10) == src).all()
    del symbols[2], symbols[6]
    assert (codec.decode(symbols, 10) == src).all()  # uses ids k, k+1
    # numpy integer ids are fine
    assert (codec.decode({np.int64(i): v for i, v in symbols.items()}, 10) == src).all()


def test_decode_result_is_writable_and_independent() -> None:
    k = 4
    src = _block(k, 8, seed=5)
    symbols = {i: src[i] for i in range(k)}
    out = codec_for(k).decode(symbols, 8)
    out[0, 0] ^= 1
    assert src[0, 0] != out[0, 0]


def test_repeated_and_new_patterns_reuse_caches() -> None:
    clear_caches()
    k = 32
    codec = codec_for(k)
    rng = np.random.default_rng(6)
    for trial in range(40):
        src = _block(k, 50, seed=trial)
        lost = sorted(rng.choice(k, 4, replace=False).tolist()) if trial % 2 else [1, 2, 3, 4]
        rep_ids = [k + 1, k + 3, k + 4, k + 6]
        rep = codec.encode(src, rep_ids)
        block = src.copy()
        present = np.ones(k, dtype=bool)
        present[lost] = False
        codec.recover_into(block, present, dict(zip(rep_ids, rep)))
        assert (block == src).all()


def test_threads_share_a_codec() -> None:
    k = 16
    codec = codec_for(k)
    errors: list[BaseException] = []

    def work(length: int) -> None:
        try:
            for s in range(30):
                src = _block(k, length, seed=s)
                rep = codec.encode(src, range(k, k + 5))
                symbols = {i: src[i] for i in range(5, k)} | {k + j: rep[j] for j in range(5)}
                assert (codec.decode(symbols, length) == src).all()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(length,)) for length in (700, 1400, 9000)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


# --- API and errors ------------------------------------------------------------------


def test_codec_for_is_cached_and_attributes() -> None:
    assert codec_for(32) is codec_for(32)
    c = codec_for(200)
    assert (c.k, c.max_repair) == (200, 55)
    assert MAX_SYMBOLS == 255
    assert issubclass(FecError, ValueError)


@pytest.mark.parametrize("k", [0, -1, 255, 256, 1.5, "3", None])
def test_bad_k(k: object) -> None:
    with pytest.raises(FecError):
        ReedSolomonCodec(k)  # type: ignore[arg-type]
    with pytest.raises(FecError):
        codec_for(k)  # type: ignore[arg-type]


def test_encode_errors() -> None:
    k = 4
    codec = codec_for(k)
    src = _block(k, 8, seed=0)
    for bad_ids in ([3], [255], [-1], [k, 300], ["5"], [5.0]):
        with pytest.raises(FecError):
            codec.encode(src, bad_ids)
    for bad_src in (src[:3], src.astype(np.int16), src[0], src.tobytes(), src.reshape(k, 2, 4)):
        with pytest.raises(FecError):
            codec.encode(bad_src, [k])  # type: ignore[arg-type]


def test_decode_errors() -> None:
    k = 4
    codec = codec_for(k)
    src = _block(k, 8, seed=0)
    rep = codec.encode(src, [4, 5])
    good = {0: src[0], 1: src[1], 4: rep[0], 5: rep[1]}
    with pytest.raises(FecError, match="need 4"):
        codec.decode({0: src[0], 1: src[1], 4: rep[0]}, 8)
    with pytest.raises(FecError):
        codec.decode({}, 8)
    for bad_id in (-1, 255, 1000, "2", 2.0):
        with pytest.raises(FecError):
            codec.decode({**good, bad_id: src[2]}, 8)
    with pytest.raises(FecError):
        codec.decode({**good, 2: src[2][:7]}, 8)  # short symbol
    with pytest.raises(FecError):
        codec.decode({**good, 2: "x" * 8}, 8)  # not bytes-like
    with pytest.raises(FecError):
        codec.decode({**good, 2: np.zeros(16, np.uint8)[::2]}, 8)  # not contiguous
    with pytest.raises(FecError):
        codec.decode(good, -1)
    with pytest.raises(FecError):
        codec.decode(good, "8")  # type: ignore[arg-type]
    assert (codec.decode(good, 8) == src).all()


def test_recover_into_errors() -> None:
    k = 4
    codec = codec_for(k)
    src = _block(k, 8, seed=0)
    rep = codec.encode(src, [4, 5])
    present = [True, False, True, False]
    with pytest.raises(FecError, match="only 1"):
        codec.recover_into(src.copy(), present, {4: rep[0]})
    with pytest.raises(FecError):
        codec.recover_into(src.copy(), present, {1: src[1], 4: rep[0]})  # source id as repair
    with pytest.raises(FecError):
        codec.recover_into(src.copy(), present, {4: rep[0], 5: rep[1][:4]})
    with pytest.raises(FecError):
        codec.recover_into(src.copy(), present[:3], {4: rep[0], 5: rep[1]})
    with pytest.raises(FecError):
        codec.recover_into(src.copy(), np.ones(5, bool), {4: rep[0], 5: rep[1]})
    with pytest.raises(FecError):
        codec.recover_into(src[:3].copy(), present, {4: rep[0], 5: rep[1]})
    with pytest.raises(FecError):
        codec.recover_into(src.astype(np.uint16), present, {4: rep[0], 5: rep[1]})
    frozen = src.copy()
    frozen.flags.writeable = False
    with pytest.raises(FecError):
        codec.recover_into(frozen, present, {4: rep[0], 5: rep[1]})
    # Nothing missing: repair symbols are not even looked at.
    block = src.copy()
    codec.recover_into(block, [True] * k, {})
    assert (block == src).all()
