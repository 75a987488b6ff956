"""``mcastdeploy send URL``: the image is pulled into the cache and multicast while it
downloads (a cache hit is sent as a local file would be); failures to fetch are one line
and exit 1, and end a session already under way."""

from __future__ import annotations

import hashlib

from helpers import finish, mcastdeploy, sha256_file, transfer
from http_objects import ObjectServer, dead_url
from test_cli_errors import assert_one_line_error
from test_remote import payload

from mcastdeploy.spec import new_session

SIZE = 3 * 1024 * 1024 + 17


def test_send_an_image_from_a_url_over_loopback_multicast(tmp_path, loopback_spec):
    _, spec_path = loopback_spec
    data = payload(SIZE, seed=5)
    image_sha = hashlib.sha256(data).hexdigest()
    target = tmp_path / "target.raw"
    cache = tmp_path / "cache"
    with ObjectServer({"/img": data}) as server:
        # A dead copy next to the good one: whichever is tried first, the image arrives.
        received, sent = transfer(spec_path, server.url(), [[str(target)]],
                                  ("--linger", "2", "--cache-dir", str(cache),
                                   "--cache-limit", "16M", "--copy", dead_url()))
    assert received["sha256"] == sent["sha256"] == image_sha
    assert sha256_file(target) == image_sha
    assert server.bytes_served == SIZE + 1
    assert [path.suffix for path in cache.iterdir() if path.suffix in (".img", ".part")] \
        == [".img"]


def test_multicast_starts_long_before_a_slow_download_ends(tmp_path):
    # Blocks go out once their manifest chunk (40 blocks) is hashed: small blocks here
    # (16 KiB, 640 KiB a chunk), so the image is several chunks long.
    spec_path = str(tmp_path / "spec.json")
    new_session(interface="lo", rate_bps=400_000_000, symbol_size=1024,
                block_symbols=16).save(spec_path)
    data = payload(4 * 1024 * 1024, seed=9)
    target = tmp_path / "target.raw"
    # 64 KiB every 40 ms over one range: about 2.6 s for the whole image.
    with ObjectServer({"/img": data}, piece_delay=0.04) as server:
        received, sent = transfer(spec_path, server.url(), [[str(target)]],
                                  ("--linger", "2", "--cache-dir", str(tmp_path / "cache"),
                                   "--connections", "1"))
    assert sha256_file(target) == received["sha256"] == hashlib.sha256(data).hexdigest()
    assert sent["fetch_seconds"] > 1.5
    # The first block went out after about its chunk's 640 KiB, not after the download.
    assert sent["first_data_after_s"] < sent["fetch_seconds"] / 3
    assert server.bytes_served == len(data) + 1  # the image once (and the size probe's byte)


def test_a_download_that_fails_the_pinned_checksum_ends_the_session(tmp_path):
    data = payload(2 * 1024 * 1024, seed=3)
    spec = new_session(interface="lo", image_sha256="0" * 64, image_size=len(data))
    spec.save(str(tmp_path / "spec.json"))
    target = tmp_path / "target.raw"
    with ObjectServer({"/img": data}, piece_delay=0.02) as server:
        receiver = mcastdeploy("recv", "--session", str(tmp_path / "spec.json"),
                               "--timeout", "20", str(target))
        sender = mcastdeploy("send", "--session", str(tmp_path / "spec.json"),
                             "--min-receivers", "1", "--wait", "20", "--json",
                             "--cache-dir", str(tmp_path / "cache"), server.url())
        send_code, out, send_err = finish(sender)
        recv_code, _, recv_err = finish(receiver)
    # Data went out while downloading; the sender then learnt the image is not the one
    # promised, said END, and nobody reports success.
    assert_one_line_error(send_code, send_err, 1, "expected " + "0" * 64)
    assert recv_code != 0 and "Traceback" not in recv_err
    assert not any(path.suffix == ".img" for path in (tmp_path / "cache").iterdir())


def test_an_image_that_cannot_be_fetched_is_one_line_and_exit_1(tmp_path, loopback_spec):
    with ObjectServer({}) as server:
        code, _, err = finish(mcastdeploy("send", "--session", loopback_spec[1],
                                          "--cache-dir", str(tmp_path / "cache"),
                                          server.url("/missing")))
    assert_one_line_error(code, err, 1, "HTTP 404")


def test_a_fetched_image_that_differs_from_the_pinned_checksum(tmp_path):
    spec = new_session(interface="lo", image_sha256="0" * 64)
    spec.save(str(tmp_path / "spec.json"))
    with ObjectServer({"/img": payload(100_000)}) as server:
        code, _, err = finish(mcastdeploy("send", "--session", str(tmp_path / "spec.json"),
                                          "--cache-dir", str(tmp_path / "cache"),
                                          server.url()))
    assert_one_line_error(code, err, 1, "expected " + "0" * 64)
    assert not any(path.suffix == ".img" for path in (tmp_path / "cache").iterdir())


def test_bad_sources_are_bad_input(tmp_path, loopback_spec):
    image = tmp_path / "image.raw"
    image.write_bytes(b"x" * 1000)
    for args, fragment in ((["--copy", "http://127.0.0.1:9/img", str(image)],
                            "--copy needs IMAGE to be a URL"),
                           (["ftp://127.0.0.1/img"], "only http://, https:// and swift://")):
        code, _, err = finish(mcastdeploy("send", "--session", loopback_spec[1],
                                          "--cache-dir", str(tmp_path / "cache"), *args))
        assert_one_line_error(code, err, 2, fragment)
