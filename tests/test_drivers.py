"""Drivers: the target writer, the image source, the digest and interface resolution."""

from __future__ import annotations

import hashlib
import os
import random

import pytest

from mcastdeploy.drivers.digest import OrderedDigest
from mcastdeploy.drivers.image_source import LocalImage, SourceError
from mcastdeploy.drivers.target import Target, TargetError, check_target
from mcastdeploy.drivers.udp import NetworkError, check_group, resolve_interface

BLOCK = 4096


def blocks_of(data: bytes) -> list[tuple[int, bytes]]:
    return [(offset, data[offset:offset + BLOCK]) for offset in range(0, len(data), BLOCK)]


def test_ordered_digest_reads_back_only_what_came_out_of_order():
    data = random.Random(3).randbytes(10 * BLOCK + 17)
    reads = []

    def read_back(offset: int, length: int) -> bytes:
        reads.append(offset)
        return data[offset:offset + length]

    digest = OrderedDigest(len(data), read_back)
    pieces = blocks_of(data)
    order = [0, 1, 5, 3, 2, 4, 6, 10, 9, 8, 7]
    for index in order:
        digest.update_at(*pieces[index])
        digest.update_at(*pieces[index])  # a block supplied twice counts once
    assert digest.digest() == hashlib.sha256(data).digest()
    # 2 closes the gap before 3; 4 arrives in order and then closes the gap before 5;
    # 7 closes the gap before 10, 9 and 8.
    assert sorted(reads) == [3 * BLOCK, 5 * BLOCK, 8 * BLOCK, 9 * BLOCK, 10 * BLOCK]


def test_ordered_digest_refuses_an_incomplete_image():
    digest = OrderedDigest(100, lambda offset, length: b"")
    digest.update_at(0, b"x" * 50)
    with pytest.raises(ValueError):
        digest.digest()


def test_target_new_file_out_of_order(tmp_path):
    data = random.Random(4).randbytes(7 * BLOCK + 5)
    path = tmp_path / "new.raw"
    pieces = blocks_of(data)
    random.Random(5).shuffle(pieces)
    with Target(str(path), len(data)) as target:
        for offset, piece in pieces:
            target.write(offset, piece)
        assert target.finish() == hashlib.sha256(data).digest()
        assert target.bytes_written == len(data)
    assert path.read_bytes() == data


def test_target_keeps_bytes_past_the_image(tmp_path):
    path = tmp_path / "disk.raw"
    path.write_bytes(b"\xee" * (3 * BLOCK))
    data = b"\x11" * (2 * BLOCK)
    with Target(str(path), len(data)) as target:
        for offset, piece in blocks_of(data):
            target.write(offset, piece)
        target.finish()
    assert path.read_bytes() == data + b"\xee" * BLOCK


def test_target_digest_sees_what_is_on_disk(tmp_path):
    """Blocks read back for the digest come from the disk, so a corrupted write shows."""
    data = random.Random(6).randbytes(4 * BLOCK)
    path = tmp_path / "t.raw"
    with Target(str(path), len(data)) as target:
        target.write(2 * BLOCK, data[2 * BLOCK:3 * BLOCK])
        with open(path, "r+b") as handle:  # something else scribbles on that block
            handle.seek(2 * BLOCK)
            handle.write(b"\0" * 10)
        for index in (0, 1, 3):
            target.write(index * BLOCK, data[index * BLOCK:(index + 1) * BLOCK])
        assert target.finish() != hashlib.sha256(data).digest()


def test_target_refuses_writes_outside_the_image(tmp_path):
    with Target(str(tmp_path / "t.raw"), 100) as target:
        with pytest.raises(ValueError):
            target.write(90, b"x" * 20)


def test_check_target(tmp_path):
    check_target(str(tmp_path / "absent.raw"), 10**6)  # will be created
    empty = tmp_path / "empty.raw"
    empty.write_bytes(b"")
    check_target(str(empty), 10**6)  # an empty file is grown
    small = tmp_path / "small.raw"
    small.write_bytes(b"x" * 10)
    with pytest.raises(TargetError, match="smaller than the image"):
        check_target(str(small), 11)
    with pytest.raises(TargetError, match="neither a regular file nor a block device"):
        check_target(str(tmp_path), 1)
    with pytest.raises(TargetError, match="does not exist"):
        check_target(str(tmp_path / "no" / "t.raw"), 1)


def test_local_image(tmp_path):
    data = random.Random(7).randbytes(3 * 1024 * 1024 + 9)
    path = tmp_path / "img.raw"
    path.write_bytes(data)
    image = LocalImage(str(path))
    try:
        assert image.size == len(data)
        assert image.read(1000, 50) == data[1000:1050]
        whole, blocks = image.digests(1024 * 1024)
        assert whole == hashlib.sha256(data).digest()
        assert blocks == b"".join(hashlib.sha256(data[i:i + 1024 * 1024]).digest()
                                  for i in range(0, len(data), 1024 * 1024))
        assert len(blocks) == 4 * 32  # the last block 9 bytes
    finally:
        image.close()
    with pytest.raises(SourceError, match="cannot read image"):
        LocalImage(str(tmp_path / "missing"))
    with pytest.raises(SourceError, match="neither a regular file"):
        LocalImage(str(tmp_path))


def test_resolve_interface():
    assert resolve_interface("lo").address == "127.0.0.1"
    by_address = resolve_interface("127.0.0.1")
    assert by_address.name == "lo"
    assert resolve_interface(None).address == "0.0.0.0"
    with pytest.raises(NetworkError, match="no such interface"):
        resolve_interface("nosuch0")
    with pytest.raises(NetworkError, match="no interface has the address"):
        resolve_interface("192.0.2.77")


def test_check_group():
    assert check_group("239.1.2.3") == "239.1.2.3"
    for bad in ("10.1.1.1", "300.1.1.1", "lo"):
        with pytest.raises(NetworkError):
            check_group(bad)


def test_target_zero_costs_nothing_on_a_new_file_and_punches_an_old_one(tmp_path):
    fresh = tmp_path / "fresh.raw"
    with Target(str(fresh), 3 * 4096) as target:
        target.write(0, b"\x01" * 4096)
        target.zero(4096, 4096)
        target.write(8192, b"\x02" * 4096)
        digest = target.finish()
        assert target.bytes_zeroed == 0  # a hole already
    expected = b"\x01" * 4096 + bytes(4096) + b"\x02" * 4096
    assert fresh.read_bytes() == expected and digest == hashlib.sha256(expected).digest()

    old = tmp_path / "old.raw"
    old.write_bytes(b"\xff" * (3 * 4096 + 100))
    with Target(str(old), 3 * 4096) as target:
        target.zero(0, 8192 + 10)  # not page-aligned at its end
        target.write(8192 + 10, b"\x03" * (4096 - 10))
        digest = target.finish()
        assert target.bytes_zeroed == 8192 + 10
    data = old.read_bytes()
    assert data[:8192 + 10] == bytes(8192 + 10)
    assert data[3 * 4096:] == b"\xff" * 100  # past the image: untouched
    assert digest == hashlib.sha256(data[:3 * 4096]).digest()


def test_local_image_hashes_holes_without_reading_them(tmp_path):
    path = tmp_path / "sparse.raw"
    with open(path, "wb") as handle:
        handle.truncate(8 * 1024 * 1024)
        handle.seek(5 * 1024 * 1024)
        handle.write(b"data")
    image = LocalImage(str(path))
    try:
        whole, blocks = image.digests(1024 * 1024)
    finally:
        image.close()
    data = path.read_bytes()
    assert whole == hashlib.sha256(data).digest()
    digests = [hashlib.sha256(data[i:i + 1024 * 1024]).digest()
               for i in range(0, len(data), 1024 * 1024)]
    assert blocks == b"".join(digests)
    assert len(set(digests)) == 2  # seven zero blocks share one hash


def test_direct_writes_land_whole_whatever_their_alignment(tmp_path):
    """Blocks of a size and at offsets that are no multiple of the page, in random order:
    the aligned middles go O_DIRECT, the edges buffered, and the file ends up exact."""
    rng = random.Random(4)
    block = 4096 * 3 + 1000
    size = 37 * block + 555
    image = rng.randbytes(size)
    path = tmp_path / "direct.img"
    with Target(str(path), size, direct=True) as target:
        order = list(range(0, size, block))
        rng.shuffle(order)
        for offset in order:
            target.write(offset, image[offset:offset + block])
        checksum = target.finish()
        assert target.bytes_direct > size // 2
    assert path.read_bytes() == image
    assert checksum == hashlib.sha256(image).digest()
