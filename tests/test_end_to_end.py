"""The real CLI over real loopback multicast: one sender, three receivers, 64 MB."""

from __future__ import annotations

import json

from helpers import finish, mcastdeploy, sha256_file, transfer, write_random

IMAGE_SIZE = 64 * 1024 * 1024 + 4321  # not a whole number of blocks


def test_send_to_three_receivers(tmp_path, loopback_spec):
    _, spec_path = loopback_spec
    image = tmp_path / "image.raw"
    image_sha = write_random(image, IMAGE_SIZE, seed=7)
    targets = [tmp_path / f"target{n}.raw" for n in range(3)]
    # One target exists already, larger and full of garbage: only the image's bytes change.
    targets[2].write_bytes(b"\xa5" * (IMAGE_SIZE + 1000))

    summaries = transfer(spec_path, image, [[str(target)] for target in targets],
                         ("--linger", "5"))
    for summary, target in zip(summaries[:3], targets):
        assert summary["ok"] is True
        assert summary["role"] == "recv"
        assert summary["sha256"] == image_sha
        assert summary["bytes"] == IMAGE_SIZE
        assert sha256_file(target, IMAGE_SIZE) == image_sha
    assert targets[0].stat().st_size == IMAGE_SIZE
    assert targets[2].read_bytes()[IMAGE_SIZE:] == b"\xa5" * 1000
    send_summary = summaries[3]
    assert send_summary["ok"] is True
    assert send_summary["receivers"] == 3 and send_summary["receivers_done"] == 3
    assert send_summary["sha256"] == image_sha
    assert sha256_file(image) == image_sha



def test_automatic_rate_on_loopback(tmp_path, loopback_spec):
    """``--rate auto:CEILING``: the spec's ceiling is respected and every copy is intact."""
    _, spec_path = loopback_spec
    image = tmp_path / "image.raw"
    size = 24 * 1024 * 1024 + 99
    image_sha = write_random(image, size, seed=8)
    targets = [tmp_path / f"target{n}.raw" for n in range(2)]
    summary = transfer(spec_path, image, [[str(target)] for target in targets],
                       ("--rate", "auto:200M"))[-1]
    for target in targets:
        assert sha256_file(target, size) == image_sha
    # Loopback loses nothing: the rate only probed upward from an eighth of the ceiling.
    assert 25_000_000 < summary["rate_bps"] <= 200_000_000


def test_a_restarted_receiver_fetches_only_what_its_target_lacks(tmp_path, loopback_spec):
    """``recv --resume`` on a target holding the image's first half and garbage after it:
    the half that matches the manifest is kept (not written again), the rest is fetched."""
    spec, spec_path = loopback_spec
    image = tmp_path / "image.raw"
    size = 16 * 1024 * 1024 + 77
    image_sha = write_random(image, size, seed=9)
    data = image.read_bytes()
    half = size // 2
    resumed, fresh = tmp_path / "resumed.raw", tmp_path / "fresh.raw"
    resumed.write_bytes(data[:half] + bytes(b ^ 0xFF for b in data[half:half + 4096])
                        + data[half + 4096:][::-1])
    kept, written, _ = transfer(spec_path, image, [["--resume", str(resumed)], [str(fresh)]])
    assert sha256_file(resumed) == sha256_file(fresh) == image_sha
    assert kept["sha256"] == written["sha256"] == image_sha
    block_bytes = spec.block_symbols * spec.symbol_size
    # Blocks of the good half are kept unless the pass delivered them before their hashes
    # (how many depends on timing); no block of the bad half ever is. Kept blocks are not
    # written again: written and kept make up the image exactly.
    assert 0 < kept["blocks_kept"] <= half // block_bytes
    assert kept["bytes_written"] + kept["blocks_kept"] * block_bytes == size
    assert written["blocks_kept"] == 0 and written["bytes_written"] == size
    assert kept["blocks_rejected"] == written["blocks_rejected"] == 0


def test_an_encrypted_session(tmp_path):
    """``session new --encrypt``: the image crosses the wire encrypted and arrives intact."""
    spec_path = tmp_path / "session.json"
    code, _, err = finish(mcastdeploy("session", "new", "--interface", "lo", "--encrypt",
                                      "-o", str(spec_path)))
    assert code == 0, err
    assert json.loads(spec_path.read_text())["encrypt"] is True
    image = tmp_path / "image.raw"
    size = 4 * 1024 * 1024 + 5
    image_sha = write_random(image, size, seed=10)
    target = tmp_path / "target.raw"
    received, _ = transfer(spec_path, image, [[str(target)]])
    assert sha256_file(target) == image_sha
    assert received["rejected"]["unauthentic"] == 0
