"""``mcastdeploy send URL``: the image is fetched into the cache, then multicast as a local
file would be; failures to fetch are one line and exit 1."""

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
