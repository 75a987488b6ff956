"""qcow2 images: converted once to raw on the rack head, sent raw, verified raw."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import sys

import pytest

from helpers import sha256_file, transfer
from http_objects import ObjectServer
from mcastdeploy.drivers.image_source import SourceError
from mcastdeploy.drivers.sources import qcow2
from mcastdeploy.spec import SessionSpec, SpecError

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None,
                                reason="qemu-img (qemu-utils) is not installed")

RAW_SIZE = 12 * 1024 * 1024 + 3 * 512  # whole sectors (qcow2 rounds up), not whole blocks


def sparse_raw(path) -> str:
    """A sparse raw image: random data in a few places, holes elsewhere; its SHA-256."""
    rng = random.Random(5)
    with open(path, "wb") as handle:
        handle.truncate(RAW_SIZE)
        for offset in (0, 3 * 1024 * 1024 + 777, RAW_SIZE - 70_000):
            handle.seek(offset)
            handle.write(rng.randbytes(60_000))
    return sha256_file(path)


def make_qcow2(raw, path) -> None:
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw),
                    str(path)], check=True, timeout=60)


def send_alone(spec_path, image, cache, env=None) -> subprocess.CompletedProcess:
    """A send with no receivers that must fail before the network matters."""
    return subprocess.run([sys.executable, "-m", "mcastdeploy", "send", "--session",
                           str(spec_path), "--wait", "1", "--linger", "0", "--cache-dir",
                           str(cache), str(image)], capture_output=True, text=True,
                          timeout=60, env=env)


def cached_raw_images(cache) -> list:
    return [entry for entry in os.scandir(cache) if entry.name.endswith(".img")]


def test_qcow2_is_converted_once_and_lands_raw(tmp_path, loopback_spec):
    """The spec pins the qcow2 (as Ironic's checksum does); receivers get and verify the
    raw image, byte for byte; a second send reuses the conversion."""
    spec, spec_path = loopback_spec
    raw = tmp_path / "disk.raw"
    raw_sha = sparse_raw(raw)
    image = tmp_path / "disk.img"  # the name says nothing: the magic bytes do
    make_qcow2(raw, image)
    SessionSpec.load(spec_path).replace(
        image_format="qcow2", image_size=image.stat().st_size,
        image_sha256=sha256_file(image)).save(spec_path)
    cache = tmp_path / "cache"
    send_args = ("--linger", "1", "--cache-dir", str(cache))

    first = transfer(spec_path, image, [[str(tmp_path / "target1")]], send_args)
    (entry,) = cached_raw_images(cache)
    assert entry.stat().st_size == RAW_SIZE
    assert entry.stat().st_blocks * 512 < RAW_SIZE // 2  # zero regions stayed holes
    inode = entry.inode()

    second = transfer(spec_path, image, [[str(tmp_path / "target2")]], send_args)
    (again,) = cached_raw_images(cache)
    assert again.inode() == inode  # not converted again
    for summaries, target in ((first, "target1"), (second, "target2")):
        assert [s["sha256"] for s in summaries] == [raw_sha, raw_sha]
        assert (tmp_path / target).read_bytes() == raw.read_bytes()


def test_a_qcow2_url_is_fetched_and_converted_once(tmp_path, loopback_spec):
    """A URL's qcow2 is fetched (its pinned SHA-256 verified), converted beside it in the
    cache, and the second send neither fetches nor converts."""
    spec, spec_path = loopback_spec
    raw = tmp_path / "disk.raw"
    raw_sha = sparse_raw(raw)
    image = tmp_path / "disk.qcow2"
    make_qcow2(raw, image)
    SessionSpec.load(spec_path).replace(image_format="qcow2",
                                        image_sha256=sha256_file(image)).save(spec_path)
    cache = tmp_path / "cache"
    send_args = ("--linger", "1", "--cache-dir", str(cache))
    with ObjectServer({"/img": image.read_bytes()}) as server:
        first = transfer(spec_path, server.url(), [[str(tmp_path / "target1")]], send_args)
        images = {entry.name: entry.inode() for entry in cached_raw_images(cache)}
        assert len(images) == 2  # the qcow2 as fetched, and its raw conversion
        served = server.bytes_served
        second = transfer(spec_path, server.url(), [[str(tmp_path / "target2")]], send_args)
        assert server.bytes_served == served  # no network the second time
    assert {entry.name: entry.inode() for entry in cached_raw_images(cache)} == images
    for summaries, target in ((first, "target1"), (second, "target2")):
        assert [s["sha256"] for s in summaries] == [raw_sha, raw_sha]
        assert (tmp_path / target).read_bytes() == raw.read_bytes()


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_corrupt_qcow2_is_one_clear_line(tmp_path, loopback_spec, damage):
    _, spec_path = loopback_spec
    raw = tmp_path / "disk.raw"
    sparse_raw(raw)
    image = tmp_path / "disk.qcow2"
    make_qcow2(raw, image)
    data = image.read_bytes()
    image.write_bytes(data[:300] if damage == "truncated"
                      else data[:4] + random.Random(1).randbytes(len(data) - 4))
    done = send_alone(spec_path, image, tmp_path / "cache")
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"qcow2 image {image}: " in lines[0]
    assert not cached_raw_images(tmp_path / "cache")  # nothing half-converted kept


def test_missing_qemu_img_is_one_clear_line(tmp_path, loopback_spec):
    _, spec_path = loopback_spec
    raw, image = tmp_path / "disk.raw", tmp_path / "disk.img"
    sparse_raw(raw)
    make_qcow2(raw, image)
    env = dict(os.environ, PATH=str(tmp_path / "nowhere"))
    done = send_alone(spec_path, image, tmp_path / "cache", env=env)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "qemu-img not found" in lines[0], done.stderr
    assert "qemu-utils" in lines[0]


def test_magic_bytes_not_names_decide(tmp_path, monkeypatch):
    named = tmp_path / "raw.qcow2"
    named.write_bytes(b"\0" * 4096)
    real = tmp_path / "disk.raw"
    real.write_bytes(qcow2.QCOW2_MAGIC + b"\0" * 4092)
    assert not qcow2.is_qcow2(str(named))
    assert qcow2.is_qcow2(str(real))
    monkeypatch.setattr(qcow2.shutil, "which", lambda name: None)
    with pytest.raises(SourceError, match="qemu-img not found"):
        qcow2.virtual_size(str(real))


def test_spec_image_format(loopback_spec):
    spec, _ = loopback_spec
    pinned = spec.replace(image_sha256=hashlib.sha256(b"x").hexdigest(), image_size=5)
    assert pinned.disk_checksum is not None and pinned.disk_size == 5
    qcow = pinned.replace(image_format="qcow2")
    assert qcow.disk_checksum is None and qcow.disk_size is None  # receivers cannot check
    with pytest.raises(SpecError, match="image_format"):
        spec.replace(image_format="vmdk")
