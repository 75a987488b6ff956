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


def test_receive_onto_a_loop_device(tmp_path, loopback_spec, loop_device):
    size = 6 * 1024 * 1024 + 777
    image = tmp_path / "image.raw"
    image_sha = write_random(image, size, seed=11)
    device = loop_device(8 * 1024 * 1024, b"\xde\xad\xbe\xef")  # holds garbage
    receiver = mcastdeploy("recv", "--session", loopback_spec[1], "--json", "--timeout",
                           "30", device)
    sender = mcastdeploy("send", "--session", loopback_spec[1], "--min-receivers", "1",
                         "--wait", "30", "--linger", "2", "--json", str(image))
    code, out, err = finish(receiver, timeout=90)
    send_code, _, send_err = finish(sender, timeout=90)
    assert code == 0, err
    assert send_code == 0, send_err
    assert json.loads(out)["sha256"] == image_sha
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
