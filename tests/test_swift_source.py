"""swift:// images against a real OpenStack Swift on 127.0.0.1 (swift_fixture.py): plain
objects and large objects fetched and verified, the command line end to end, a proxy that
dies mid-download, the bytes Swift itself says it sent (its proxy access log), and Keystone
logins (fake_keystone.py) in front of it."""

from __future__ import annotations

import hashlib
import json
import sys
import threading
from typing import Callable, Iterator

import fake_keystone
import pytest
from helpers import finish, mcastdeploy, sha256_file, transfer
from swift_fixture import LocalSwift, local_swift  # noqa: F401 (a fixture)
from test_cli_errors import assert_one_line_error
from test_remote import payload

from mcastdeploy.drivers.image_source import SourceError
from mcastdeploy.drivers.sources import ReadError, RetryPolicy, fetch, readers_for
from mcastdeploy.drivers.sources.swift_reader import (SwiftAuth, SwiftRangeReader,
                                                      parse_swift_url)

MIB = 1024 * 1024
CONTAINER = "images"


def _upload(swift: LocalSwift, name: str, data: bytes) -> None:
    connection = swift.connection()
    connection.put_container(CONTAINER)
    connection.put_object(CONTAINER, name, data)


def _upload_slo(swift: LocalSwift, name: str, data: bytes, segment: int) -> None:
    """``data`` as a Static Large Object: segments in their own container, then the
    manifest, as ``swift upload --use-slo`` does."""
    connection = swift.connection()
    connection.put_container(CONTAINER)
    connection.put_container(CONTAINER + "_segments")
    manifest = []
    for index, offset in enumerate(range(0, len(data), segment)):
        piece = data[offset:offset + segment]
        path = f"{name}/{index:08d}"
        connection.put_object(CONTAINER + "_segments", path, piece)
        manifest.append({"path": f"/{CONTAINER}_segments/{path}",
                         "etag": hashlib.md5(piece).hexdigest(), "size_bytes": len(piece)})
    connection.put_object(CONTAINER, name, json.dumps(manifest),
                          query_string="multipart-manifest=put")


def _upload_dlo(swift: LocalSwift, name: str, data: bytes, segment: int) -> None:
    connection = swift.connection()
    connection.put_container(CONTAINER + "_segments")
    for index, offset in enumerate(range(0, len(data), segment)):
        connection.put_object(CONTAINER + "_segments", f"{name}/{index:08d}",
                              data[offset:offset + segment])
    connection.put_object(CONTAINER, name, b"",
                          headers={"X-Object-Manifest": f"{CONTAINER}_segments/{name}/"})


@pytest.mark.parametrize("kind", ["plain", "slo", "dlo"])
def test_objects_and_large_objects_are_fetched_whole(kind, local_swift,  # noqa: F811
                                                      tmp_path):
    size = 5 * MIB + 12345
    data = payload(size, seed={"plain": 11, "slo": 12, "dlo": 13}[kind])
    name = f"fetch-{kind}.raw"
    if kind == "plain":
        _upload(local_swift, name, data)
    elif kind == "slo":
        _upload_slo(local_swift, name, data, segment=2 * MIB + 7)
    else:
        _upload_dlo(local_swift, name, data, segment=2 * MIB + 7)
    mark = len(local_swift.access_lines())
    # Ranges that straddle segment boundaries, over several connections.
    reader = SwiftRangeReader(f"swift://{CONTAINER}/{name}", environ=local_swift.env())
    result = fetch([reader], str(tmp_path / "image"), connections=3, range_bytes=MIB,
                   expected_sha256=hashlib.sha256(data).hexdigest())
    assert result.sha256 == sha256_file(tmp_path / "image") == hashlib.sha256(data).hexdigest()
    assert result.retries == 0
    if kind == "plain":
        assert result.etag == hashlib.md5(data).hexdigest()
    else:  # a large object's ETag is quoted and is not its bytes' MD5
        assert result.etag.startswith('"') and hashlib.md5(data).hexdigest() not in result.etag
    # Swift's own count: each byte left the proxy once (HEAD for the size sends none).
    assert local_swift.bytes_sent_for(CONTAINER, name, after=mark, at_least=size) == size


def _keystone_settings(keystone: fake_keystone.FakeKeystone, how: str, tmp_path,
                       password: str = fake_keystone.PASSWORD) -> dict:
    """The environment a deployer gives: the OS_* variables, or a clouds.yaml cloud."""
    auth = {"auth_url": f"{keystone.url}/v3", "username": fake_keystone.USER,
            "password": password, "project_name": fake_keystone.PROJECT,
            "user_domain_name": fake_keystone.DOMAIN,
            "project_domain_name": fake_keystone.DOMAIN}
    if how == "clouds.yaml":
        path = tmp_path / "clouds.yaml"
        path.write_text(json.dumps({"clouds": {"rack": {  # JSON is YAML
            "auth": auth, "region_name": fake_keystone.REGION, "interface": "public"}}}))
        return {"OS_CLOUD": "rack", "OS_CLIENT_CONFIG_FILE": str(path)}
    return {f"OS_{name.upper()}": value for name, value in auth.items()} | {
        "OS_REGION_NAME": fake_keystone.REGION}


@pytest.mark.parametrize("how", ["OS_* variables", "clouds.yaml"])
def test_keystone_v3_login_then_the_real_swift(local_swift, tmp_path, how):  # noqa: F811
    """Keystone v3, the usual OpenStack way: openstacksdk's loader reads the settings,
    keystoneauth logs in once (the threads share its token) and finds Swift in the
    catalog, swiftclient reads the ranges from the real Swift."""
    size = 3 * MIB + 99
    data = payload(size, seed=31)
    _upload(local_swift, "keystone.raw", data)
    with fake_keystone.FakeKeystone(local_swift) as keystone:
        environ = _keystone_settings(keystone, how, tmp_path)
        reader = SwiftRangeReader(f"swift://{CONTAINER}/keystone.raw", environ=environ)
        result = fetch([reader], str(tmp_path / "image"), connections=3, range_bytes=MIB,
                       expected_sha256=hashlib.sha256(data).hexdigest())
        assert result.sha256 == sha256_file(tmp_path / "image")
        assert keystone.logins == 1

        # Tokens about to expire are renewed through the shared session, not kept by each
        # connection until Swift refuses them mid-fetch.
        keystone.token_life = 60.0  # within keystoneauth's margin: renewed at every call
        reader = SwiftRangeReader(f"swift://{CONTAINER}/keystone.raw", environ=environ)
        reader.describe()
        before = keystone.logins
        for start in range(0, 3 * MIB, MIB):  # one connection, three calls
            assert b"".join(reader.read_range(start, start + 10)) == data[start:start + 10]
        assert keystone.logins - before >= 3  # each call asked the session, which renewed

        wrong = _keystone_settings(keystone, how, tmp_path, password="not-it")
        with pytest.raises(ReadError, match="Keystone refused the credentials") as refused:
            SwiftRangeReader(f"swift://{CONTAINER}/keystone.raw", environ=wrong).describe()
        assert refused.value.permanent and keystone.refused >= 1


def test_send_from_swift_then_from_the_cache(local_swift, tmp_path, loopback_spec,
                                             monkeypatch):  # noqa: F811
    """The command line end to end; the ratio of bytes Swift sent to the image's size is
    1.0 for the first send and 0 for the second (served from the rack head's cache)."""
    _, spec_path = loopback_spec
    size = 6 * MIB + 17
    data = payload(size, seed=21)
    image_sha = hashlib.sha256(data).hexdigest()
    _upload_slo(local_swift, "send.raw", data, segment=4 * MIB)
    for variable, value in local_swift.env().items():
        monkeypatch.setenv(variable, value)
    cache = tmp_path / "cache"
    sent_by_swift = []
    for attempt in range(2):
        mark = len(local_swift.access_lines())
        target = tmp_path / f"target{attempt}.raw"
        received, sent = transfer(spec_path, f"swift://{CONTAINER}/send.raw", [[str(target)]],
                                  ("--linger", "1", "--cache-dir", str(cache),
                                   "--cache-limit", "64M"))
        assert received["sha256"] == sent["sha256"] == image_sha
        assert sha256_file(target) == image_sha
        sent_by_swift.append(local_swift.bytes_sent_for(
            CONTAINER, "send.raw", after=mark, at_least=size if attempt == 0 else 0))
    assert [count / size for count in sent_by_swift] == [1.0, 0.0]


def test_a_proxy_killed_mid_download_and_restarted(local_swift, tmp_path):  # noqa: F811
    size = 24 * MIB + 99
    data = payload(size, seed=31)
    _upload(local_swift, "restart.raw", data)
    reader = SwiftRangeReader(f"swift://{CONTAINER}/restart.raw", environ=local_swift.env())
    reached, killed = threading.Event(), threading.Event()
    chunks = [0]

    def hold_after_some_chunks() -> None:
        """In the fetch thread, a few chunks in: wait until the proxy is dead, so the kill
        lands mid-range whatever the speeds."""
        chunks[0] += 1
        if chunks[0] == 3:
            reached.set()
            assert killed.wait(30)

    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = fetch(
                [_Hooked(reader, hold_after_some_chunks)], str(tmp_path / "image"),
                connections=1, range_bytes=8 * MIB,
                retry=RetryPolicy(attempts_per_copy=6, first_delay=0.5, max_delay=2.0,
                                  give_up_after=30.0))
        except Exception as error:  # reported by the assertion below
            outcome["error"] = error

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    try:
        assert reached.wait(30), "the fetch never started"
        local_swift.stop_proxy()
    finally:
        killed.set()
    local_swift.start_proxy()
    worker.join(60)
    assert not worker.is_alive(), "the fetch did not end within 60 s"
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert result.retries >= 1
    assert result.sha256 == hashlib.sha256(data).hexdigest() == sha256_file(tmp_path / "image")


class _Hooked:
    """A reader that calls ``hook`` after each chunk it passes on."""

    def __init__(self, inner: SwiftRangeReader, hook: Callable[[], None]) -> None:
        self.inner, self.hook, self.name = inner, hook, inner.name

    def describe(self):
        return self.inner.describe()

    def read_range(self, start: int, end: int) -> Iterator[bytes]:
        stream = self.inner.read_range(start, end)
        try:
            for chunk in stream:
                yield chunk
                self.hook()
        finally:
            stream.close()


def test_what_cannot_help_is_permanent(local_swift):  # noqa: F811
    _upload(local_swift, "small.raw", b"x" * 1000)
    missing = SwiftRangeReader(f"swift://{CONTAINER}/absent.raw", environ=local_swift.env())
    with pytest.raises(ReadError, match="HTTP 404") as caught:
        missing.describe()
    assert caught.value.permanent
    wrong_key = dict(local_swift.env(), ST_KEY="wrong")
    with pytest.raises(ReadError, match="authentication failed") as caught:
        SwiftRangeReader(f"swift://{CONTAINER}/small.raw", environ=wrong_key).describe()
    assert caught.value.permanent
    reader = SwiftRangeReader(f"swift://{CONTAINER}/small.raw", environ=local_swift.env())
    assert reader.describe()[0] == 1000
    assert b"".join(reader.read_range(10, 20)) == b"x" * 10


def test_send_without_credentials_is_bad_input(tmp_path, loopback_spec, monkeypatch):
    for variable in ("ST_AUTH", "ST_USER", "ST_KEY", "OS_AUTH_URL", "OS_STORAGE_URL",
                     "OS_AUTH_TOKEN"):
        monkeypatch.delenv(variable, raising=False)
    code, _, err = finish(mcastdeploy("send", "--session", loopback_spec[1],
                                      "--cache-dir", str(tmp_path / "cache"),
                                      "swift://images/ubuntu.raw"))
    assert_one_line_error(code, err, 2, "no Swift credentials")


def test_urls_and_credentials_from_the_environment():
    assert parse_swift_url("swift://images/ubuntu/22.04.raw") == ("images", "ubuntu/22.04.raw")
    for bad in ("swift://images", "swift://images/", "swift:///x", "http://a/b"):
        with pytest.raises(ValueError):
            parse_swift_url(bad)
    keystone = SwiftAuth.from_env({
        "OS_AUTH_URL": "https://keystone.example:5000/v3", "OS_USERNAME": "deploy",
        "OS_PASSWORD": "secret", "OS_PROJECT_NAME": "ironic",
        "OS_USER_DOMAIN_NAME": "Default", "OS_PROJECT_DOMAIN_NAME": "Default",
        "OS_REGION_NAME": "RegionOne", "OS_INTERFACE": "internal"})
    # For openstacksdk's loader, as the openstack command line hands them to it; the
    # endpoint's choice for swiftclient.
    assert keystone.keystone == {
        "auth_url": "https://keystone.example:5000/v3", "username": "deploy",
        "password": "secret", "project_name": "ironic", "user_domain_name": "Default",
        "project_domain_name": "Default", "region_name": "RegionOne",
        "interface": "internal"}
    assert keystone.os_options == {"region_name": "RegionOne", "endpoint_type": "internal"}
    assert "secret" not in repr(keystone)
    cloud = SwiftAuth.from_env({"OS_CLOUD": "rack", "OS_CLIENT_CONFIG_FILE": "/etc/c.yaml"})
    assert (cloud.cloud, cloud.clouds_yaml, cloud.keystone) == ("rack", "/etc/c.yaml", {})
    with pytest.raises(ValueError, match="OS_USERNAME or OS_PASSWORD"):
        SwiftAuth.from_env({"OS_AUTH_URL": "https://keystone.example:5000/v3"})
    # Logged in already (as the swift command line takes it), even beside an openrc's.
    ready = SwiftAuth.from_env({"OS_AUTH_URL": "https://keystone.example:5000/v3",
                                "OS_STORAGE_URL": "https://swift.example/v1/AUTH_p",
                                "OS_AUTH_TOKEN": "tok"})
    assert ready.keystone is None and ready.os_options["auth_token"] == "tok"
    # Application credentials need no user name nor password.
    application = SwiftAuth.from_env({
        "OS_AUTH_URL": "https://keystone.example:5000/v3",
        "OS_AUTH_TYPE": "v3applicationcredential", "OS_APPLICATION_CREDENTIAL_ID": "id",
        "OS_APPLICATION_CREDENTIAL_SECRET": "secret"})
    assert application.keystone["application_credential_secret"] == "secret"
    tempauth = SwiftAuth.from_env({"ST_AUTH": "http://127.0.0.1:8080/auth/v1.0",
                                   "ST_USER": "test:tester", "ST_KEY": "testing",
                                   "OS_AUTH_URL": "ignored"})
    assert (tempauth.auth_version, tempauth.user) == ("1.0", "test:tester")
    with pytest.raises(SourceError, match="ST_AUTH is set but"):
        readers_for(["swift://images/x"], environ={"ST_AUTH": "http://127.0.0.1:9/auth"})


@pytest.mark.parametrize("cloud, message", [
    ({"auth": {"username": "u", "password": "p"}}, "Keystone settings"),  # no auth_url
    ({"auth_type": "v3bogus", "auth": {"auth_url": "http://127.0.0.1:9/v3"}},
     "Keystone settings")])
def test_unusable_keystone_settings_are_one_lasting_error(tmp_path, cloud, message):
    path = tmp_path / "clouds.yaml"
    path.write_text(json.dumps({"clouds": {"rack": cloud}}))
    reader = SwiftRangeReader("swift://images/x.raw", environ={
        "OS_CLOUD": "rack", "OS_CLIENT_CONFIG_FILE": str(path)})
    with pytest.raises(ReadError, match=message) as refused:
        reader.describe()
    assert refused.value.permanent and "\n" not in str(refused.value)


def test_keystone_without_openstacksdk_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "openstack", None)  # as if not installed
    reader = SwiftRangeReader("swift://images/x.raw", environ={"OS_CLOUD": "rack"})
    with pytest.raises(ReadError, match=r"pip install 'mcastdeploy\[keystone\]'") as missing:
        reader.describe()
    assert missing.value.permanent
