"""A real block device (a loop device) as the receiver's target."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from helpers import finish, mcastdeploy, sha256_file, write_random

from mcastdeploy.spec import new_session

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("losetup") is None,
    reason="loop devices need root and losetup (util-linux)")


@pytest.fixture
def loop_device(tmp_path):
    """Attach loop devices on files we create; always detached afterwards."""
    attached: list[str] = []

    def attach(size: int, fill: bytes) -> str:
        backing = tmp_path / f"backing{len(attached)}.img"
        with open(backing, "wb") as handle:
            handle.write(fill * (size // len(fill)))
        device = subprocess.run(["losetup", "-f", "--show", str(backing)], check=True,
                                capture_output=True, text=True, timeout=30).stdout.strip()
        attached.append(device)
        return device

    yield attach
    for device in attached:
        subprocess.run(["losetup", "-d", device], timeout=30, check=False)


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "o_direct"])
def test_receive_onto_a_loop_device(tmp_path, loopback_spec, loop_device, direct):
    size = 6 * 1024 * 1024 + 777
    image = tmp_path / "image.raw"
    image_sha = write_random(image, size, seed=11)
    device = loop_device(8 * 1024 * 1024, b"\xde\xad\xbe\xef")  # holds garbage
    receiver = mcastdeploy("recv", "--session", loopback_spec[1], "--json", "--timeout",
                           "30", *(["--direct"] if direct else []), device)
    sender = mcastdeploy("send", "--session", loopback_spec[1], "--min-receivers", "1",
                         "--wait", "30", "--linger", "2", "--json", str(image))
    code, out, err = finish(receiver, timeout=90)
    send_code, _, send_err = finish(sender, timeout=90)
    assert code == 0, err
    assert send_code == 0, send_err
    assert json.loads(out)["sha256"] == image_sha
    # Read back past the page cache: what is on the device, not what the kernel remembers.
    subprocess.run(["blockdev", "--flushbufs", device], check=True, timeout=30)
    assert sha256_file(device, size) == image_sha
    with open(device, "rb") as handle:
        handle.seek(size)
        tail = handle.read()
    # Past the image the device keeps what it held (the pattern, shifted by the offset).
    pattern = b"\xde\xad\xbe\xef" * (len(tail) // 4 + 2)
    start = size % 4
    assert tail == pattern[start:start + len(tail)]


def test_loop_device_smaller_than_the_image(tmp_path, loop_device):
    device = loop_device(1024 * 1024, b"\x5a")
    spec = new_session(interface="lo", image_size=2 * 1024 * 1024)
    spec_path = tmp_path / "spec.json"
    spec.save(str(spec_path))
    code, _, err = finish(mcastdeploy("recv", "--session", str(spec_path), device))
    assert code == 2 and "smaller than the image" in err and "Traceback" not in err
    with open(device, "rb") as handle:
        assert handle.read() == b"\x5a" * (1024 * 1024)


def write_sparse(path, size: int, data_every: int, block: int, seed: int) -> str:
    """A sparse file: one block of random data every ``data_every`` blocks, holes between."""
    rng = __import__("random").Random(seed)
    with open(path, "wb") as handle:
        handle.truncate(size)
        for offset in range(0, size, block * data_every):
            handle.seek(offset)
            handle.write(rng.randbytes(min(block, size - offset)))
    return sha256_file(path)


def test_a_sparse_image_onto_a_loop_device_that_held_garbage(tmp_path, loopback_spec,
                                                             loop_device):
    """Zero blocks are not sent; the receiver zeroes them on the device (BLKZEROOUT), so
    the holes read back as zeros although the device held a pattern before."""
    spec, spec_path = loopback_spec
    block = spec.block_symbols * spec.symbol_size
    size = 40 * block + 1234
    image = tmp_path / "sparse.raw"
    image_sha = write_sparse(image, size, data_every=10, block=block, seed=12)
    device = loop_device(size + 4 * block, b"\xde\xad\xbe\xef")
    receiver = mcastdeploy("recv", "--session", spec_path, "--json", "--timeout", "30",
                           device)
    sender = mcastdeploy("send", "--session", spec_path, "--min-receivers", "1",
                         "--wait", "30", "--linger", "2", "--json", str(image))
    code, out, err = finish(receiver, timeout=90)
    send_code, send_out, send_err = finish(sender, timeout=90)
    assert code == 0, err
    assert send_code == 0, send_err
    summary, sent = json.loads(out), json.loads(send_out)
    assert summary["sha256"] == image_sha and sha256_file(device, size) == image_sha
    assert summary["blocks_zero"] == 41 - 5  # blocks 0, 10, 20, 30 and the short 40 hold data
    assert summary["bytes_written"] == 4 * block + 1234
    # Five blocks of data (and their parity, the manifest, control) crossed the wire.
    assert sent["bytes_sent"] < 0.15 * size
