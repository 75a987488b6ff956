"""An image in OpenStack Swift, ``swift://CONTAINER/OBJECT``, read in byte ranges through
python-swiftclient with the credentials an operator already exports.

Swift returns a plain object's ETag bare (its MD5) but a Static or Dynamic Large Object's
quoted, and that one is the MD5 of its segments' ETags, not of the bytes. Both are fine as an
identity (they change when the object does), so ``describe`` gives the ETag exactly as Swift
sends it (an http(s) temp URL of the same object then agrees) and comparisons ignore quotes.
"""

from __future__ import annotations

import http.client
import logging
import os
import socket
import threading
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Optional

from mcastdeploy.drivers.sources.errors import ReadError
from mcastdeploy.drivers.sources.reader import CHUNK_BYTES, read_exactly

__all__ = ["SwiftAuth", "SwiftRangeReader", "parse_swift_url"]

#: Bytes per chunk of a range's body (swiftclient's ``resp_chunk_size``), as for HTTP.


def parse_swift_url(url: str) -> tuple[str, str]:
    """``swift://CONTAINER/OBJECT`` -> (container, object); the object may contain ``/``."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() != "swift" or not parts.netloc:
        raise ValueError(f"not a swift://CONTAINER/OBJECT URL: {url}")
    obj = urllib.parse.unquote(parts.path.lstrip("/"))
    if not obj or parts.query or parts.fragment:
        raise ValueError(f"not a swift://CONTAINER/OBJECT URL: {url}")
    return urllib.parse.unquote(parts.netloc), obj


#: OS_* variables handed to openstacksdk's config loader (as its ``openstack`` command
#: line does), by the option name it takes.
_KEYSTONE_VARIABLES = {
    "auth_url": ("OS_AUTH_URL",), "auth_type": ("OS_AUTH_TYPE",),
    "username": ("OS_USERNAME",), "user_id": ("OS_USER_ID",), "password": ("OS_PASSWORD",),
    "project_name": ("OS_PROJECT_NAME", "OS_TENANT_NAME"),
    "project_id": ("OS_PROJECT_ID", "OS_TENANT_ID"),
    "user_domain_name": ("OS_USER_DOMAIN_NAME",), "user_domain_id": ("OS_USER_DOMAIN_ID",),
    "project_domain_name": ("OS_PROJECT_DOMAIN_NAME",),
    "project_domain_id": ("OS_PROJECT_DOMAIN_ID",),
    "region_name": ("OS_REGION_NAME",), "interface": ("OS_INTERFACE", "OS_ENDPOINT_TYPE"),
    "identity_api_version": ("OS_IDENTITY_API_VERSION", "OS_AUTH_VERSION"),
    "cacert": ("OS_CACERT",),
    "application_credential_id": ("OS_APPLICATION_CREDENTIAL_ID",),
    "application_credential_name": ("OS_APPLICATION_CREDENTIAL_NAME",),
    "application_credential_secret": ("OS_APPLICATION_CREDENTIAL_SECRET",),
    "token": ("OS_TOKEN",),
}


@dataclass(frozen=True)
class KeystoneLogin:
    """A keystoneauth session (one login, shared by the threads, renewed before its token
    expires) and how swiftclient finds Swift with it: the catalog's object-store endpoint
    of the cloud's region and interface, and the cloud's TLS settings for Swift too."""

    session: Any
    os_options: dict
    cacert: Optional[str]
    insecure: bool


@dataclass(frozen=True)
class SwiftAuth:
    """How to log in, taken from the environment as the ``swift`` and ``openstack`` command
    lines do: ``ST_AUTH``/``ST_USER``/``ST_KEY`` for v1 (tempauth, swauth); for Keystone,
    ``OS_CLOUD`` (a cloud of clouds.yaml) or the ``OS_*`` variables, read by openstacksdk's
    own config loader; or ``OS_STORAGE_URL`` with ``OS_AUTH_TOKEN``."""

    auth_url: Optional[str]
    user: Optional[str]
    key: Optional[str] = field(repr=False)
    auth_version: str
    os_options: dict = field(default_factory=dict, repr=False)
    cacert: Optional[str] = None
    insecure: bool = False
    #: Keystone: the options for openstacksdk's loader (OS_* without the prefix), the
    #: clouds.yaml cloud by name, and the clouds.yaml to read (None: its usual places).
    keystone: Optional[dict] = field(default=None, repr=False)
    cloud: Optional[str] = None
    clouds_yaml: Optional[str] = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> "SwiftAuth":
        """Raises ValueError, naming the variables, when none of the ways is configured."""
        get = lambda name: environ.get(name) or None  # noqa: E731 (empty means unset)
        cacert = get("OS_CACERT")
        insecure = (get("SWIFTCLIENT_INSECURE") or "").lower() in ("1", "true")
        if get("ST_AUTH"):
            if not (get("ST_USER") and get("ST_KEY")):
                raise ValueError("ST_AUTH is set but ST_USER or ST_KEY is not")
            return cls(get("ST_AUTH"), get("ST_USER"), get("ST_KEY"),
                       get("ST_AUTH_VERSION") or "1.0", {}, cacert, insecure)
        endpoint = {"region_name": get("OS_REGION_NAME"),
                    "endpoint_type": get("OS_INTERFACE") or get("OS_ENDPOINT_TYPE"),
                    "service_type": get("OS_SERVICE_TYPE"),
                    "object_storage_url": get("OS_STORAGE_URL")}
        endpoint = {name: value for name, value in endpoint.items() if value}
        if get("OS_STORAGE_URL") and get("OS_AUTH_TOKEN"):  # logged in already: as `swift`
            return cls(None, None, None, "3", {**endpoint, "auth_token": get("OS_AUTH_TOKEN")},
                       cacert, insecure)
        if get("OS_CLOUD") or get("OS_AUTH_URL"):
            password = (get("OS_AUTH_TYPE") or "password").endswith("password")
            if password and not get("OS_CLOUD") and not (
                    (get("OS_USERNAME") or get("OS_USER_ID")) and get("OS_PASSWORD")):
                raise ValueError("OS_AUTH_URL is set but OS_USERNAME or OS_PASSWORD is not")
            options = {option: value for option, names in _KEYSTONE_VARIABLES.items()
                       if (value := next(filter(None, map(get, names)), None))}
            return cls(get("OS_AUTH_URL"), get("OS_USERNAME") or get("OS_USER_ID"), None,
                       "3", endpoint, cacert, insecure, keystone=options,
                       cloud=get("OS_CLOUD"), clouds_yaml=get("OS_CLIENT_CONFIG_FILE"))
        raise ValueError("no Swift credentials: set ST_AUTH, ST_USER and ST_KEY (v1 auth), "
                         "or OS_CLOUD (clouds.yaml), or OS_AUTH_URL, OS_USERNAME, "
                         "OS_PASSWORD, OS_PROJECT_NAME and the domain variables (Keystone "
                         "v3), or OS_STORAGE_URL and OS_AUTH_TOKEN")

    def keystone_login(self) -> KeystoneLogin:
        """The Keystone login for these settings, by openstacksdk's config loader
        (clouds.yaml, secure.yaml, auth types, the OS_* names). Raises ValueError (one
        line) when the settings cannot make one; logging in itself happens at first use."""
        assert self.keystone is not None
        try:
            from keystoneauth1 import exceptions as keystone
            from openstack import config, exceptions
        except ImportError:
            raise ValueError("Keystone credentials need openstacksdk: pip install "
                             "'mcastdeploy[keystone]'") from None
        # Its discovery warnings would make a failure more than one line; ours says it.
        logging.getLogger("keystoneauth").setLevel(logging.ERROR)
        try:
            loader = config.OpenStackConfig(
                config_files=[self.clouds_yaml] if self.clouds_yaml else None,
                load_envvars=False, load_yaml_config=self.cloud is not None)
            cloud = loader.get_one(cloud=self.cloud, **self.keystone)
            session = cloud.get_session()
        except (exceptions.SDKException, keystone.ClientException, KeyError,
                ValueError) as error:
            raise ValueError(f"Keystone settings: {error}") from None
        options = {"region_name": cloud.get_region_name() or None,
                   "endpoint_type": cloud.get_interface() or "public",
                   "service_type": self.os_options.get("service_type", "object-store"),
                   "object_storage_url": self.os_options.get("object_storage_url")}
        verify = cloud.config.get("verify", True)
        return KeystoneLogin(session, {key: value for key, value in options.items() if value},
                             cloud.config.get("cacert") or self.cacert,
                             self.insecure or verify is False)


class SwiftRangeReader:
    """One copy of an image in Swift.

    swiftclient connections are not thread-safe, so each thread has its own; they share one
    login: with Keystone one keystoneauth session, asked for the token at every call (it
    renews it before it expires); otherwise the token the first connection got. swiftclient's own
    retries are off: the fetch's policy decides, and sees every failure.
    """

    def __init__(self, url: str, timeout: float = 30.0, *,
                 environ: Optional[Mapping[str, str]] = None) -> None:
        self.container, self.object = parse_swift_url(url)
        self.name = f"swift://{self.container}/{self.object}"
        self.timeout = timeout
        self.auth = SwiftAuth.from_env(os.environ if environ is None else environ)
        self._local = threading.local()
        self._token_lock = threading.Lock()
        self._storage: tuple[Optional[str], Optional[str]] = (
            self.auth.os_options.get("object_storage_url"),
            self.auth.os_options.get("auth_token"))
        self._size: Optional[int] = None
        self._etag: Optional[str] = None
        self._login: Optional[KeystoneLogin] = None  # shared by the threads' connections

    def describe(self) -> tuple[int, Optional[str]]:
        """Size and ETag from a HEAD. For a large object the proxy answers with the whole
        object's length; a Static LO's ETag is quoted, a Dynamic LO's is recomputed from the
        segment listing at each request (so a DLO whose segments change looks changed)."""
        headers = self._call("HEAD", lambda conn: conn.head_object(self.container,
                                                                   self.object))
        try:
            size = int(headers["content-length"])
        except (KeyError, ValueError):
            raise ReadError(f"{self.name}: HEAD gave no Content-Length",
                            permanent=True) from None
        self._size, self._etag = size, headers.get("etag")
        return size, self._etag

    def read_range(self, start: int, end: int) -> Iterator[bytes]:
        if end <= start:
            return
        what = f"bytes {start}-{end - 1}"
        headers, body = self._call(what, lambda conn: conn.get_object(
            self.container, self.object, resp_chunk_size=CHUNK_BYTES,
            headers={"Range": f"bytes={start}-{end - 1}"}))
        finished = False
        try:
            self._check(headers, start, end)
            # Any exception from the body: requests, urllib3 and socket errors all mean the
            # stream broke.
            yield from read_exactly(body.read, end - start, name=self.name, what=what,
                                    broke=(Exception,), reason=self._reason)
            finished = True
        finally:
            if not finished:
                body.close()
                self._drop()

    # -- plumbing --------------------------------------------------------------------------

    def _connection(self) -> Any:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            import swiftclient  # only a swift:// image pays for importing requests
            auth, login = self.auth, self._keystone_login()
            if login is not None:  # token and endpoint from the shared session, each call
                connection = swiftclient.Connection(
                    retries=0, session=login.session, os_options=dict(login.os_options),
                    cacert=login.cacert, insecure=login.insecure, timeout=self.timeout,
                    retry_on_ratelimit=False)
            else:
                url, token = self._storage
                connection = swiftclient.Connection(
                    auth.auth_url, auth.user, auth.key, retries=0, preauthurl=url,
                    preauthtoken=token, os_options=dict(auth.os_options),
                    auth_version=auth.auth_version, cacert=auth.cacert,
                    insecure=auth.insecure, timeout=self.timeout, retry_on_ratelimit=False)
            self._local.connection = connection
        return connection

    def _keystone_login(self) -> Optional[KeystoneLogin]:
        if self.auth.keystone is None:
            return None
        with self._token_lock:
            if self._login is None:
                try:
                    self._login = self.auth.keystone_login()
                except ValueError as error:
                    raise ReadError(f"{self.name}: {error}", permanent=True) from None
            return self._login

    def _drop(self) -> None:
        """Forget this thread's connection: after an error it is in an unknown state."""
        connection = getattr(self._local, "connection", None)
        self._local.connection = None
        if connection is not None:
            try:
                connection.close()
            except Exception:  # closing a broken connection may fail too; it is gone
                pass

    def _call(self, what: str, request: Any) -> Any:
        from swiftclient import ClientException
        connection = self._connection()
        if self._login is not None:
            # Ask the session for the token at every call: keystoneauth renews it before it
            # expires, once for all threads (a token kept here would run out mid-fetch).
            connection.token = None
        try:
            result = request(connection)
        except ClientException as error:
            self._drop()
            if error.http_status == 401 and self._login is not None:
                self._login.session.invalidate()  # refused by Swift: log in afresh next time
                raise ReadError(f"{self.name}: Swift refused the Keystone token (HTTP 401; "
                                f"{what})") from None
            raise self._client_error(error, what) from None
        except Exception as error:  # requests/urllib3/socket errors: no answer at all
            self._drop()
            if type(error).__module__.startswith("keystoneauth1"):  # logging in failed
                raise _keystone_error(self.name, error, what) from None
            raise ReadError(f"{self.name}: {self._reason(error)} ({what})",
                            unreachable=_refused(error)) from None
        with self._token_lock:  # share a token obtained (or renewed) by this connection
            if self._login is None and connection.url and connection.token:
                self._storage = (connection.url, connection.token)
        return result

    def _client_error(self, error: Any, what: str) -> ReadError:
        status = error.http_status
        if status is None:  # swiftclient's own complaints: bad auth setup, missing modules
            return ReadError(f"{self.name}: {error.msg or error} ({what})", permanent=True)
        if status == 401:
            return ReadError(f"{self.name}: authentication failed (HTTP 401): check the "
                             "ST_* or OS_* credentials", permanent=True)
        reason = f"{self.name}: HTTP {status} {error.http_reason or ''} ({what})"
        lasting = 400 <= status < 500 and status not in (408, 425, 429, 498, 499)
        return ReadError(reason, permanent=lasting)

    def _check(self, headers: Mapping[str, str], start: int, end: int) -> None:
        """The answer must be exactly the range asked for, of the object described."""
        content_range = headers.get("content-range")
        if not content_range:
            raise ReadError(f"{self.name}: Swift answered a ranged GET without a "
                            "Content-Range", permanent=True)
        try:
            unit, _, rest = content_range.partition(" ")
            span, _, total = rest.partition("/")
            first, _, last = span.partition("-")
            first_n, last_n, size = int(first), int(last), int(total)
        except ValueError:
            raise ReadError(f"{self.name}: unusable Content-Range {content_range!r}",
                            permanent=True) from None
        if unit != "bytes" or (first_n, last_n + 1) != (start, end):
            raise ReadError(f"{self.name}: asked for bytes {start}-{end - 1}, got "
                            f"{content_range}", permanent=True)
        if self._size is not None and size != self._size:
            raise ReadError(f"{self.name} changed size from {self._size} to {size} bytes "
                            "while being fetched", permanent=True)
        etag = headers.get("etag")
        if self._etag and etag and _bare(etag) != _bare(self._etag):
            raise ReadError(f"{self.name} changed (ETag {self._etag} became {etag}) while "
                            "being fetched", permanent=True)

    def _reason(self, error: BaseException) -> str:
        text = str(error)
        if isinstance(error, (socket.timeout, TimeoutError)) or "timed out" in text.lower():
            return f"no answer within {self.timeout:g} s"
        if _refused(error):
            return "cannot connect: connection refused"
        if isinstance(error, (OSError, http.client.HTTPException)) and not text:
            return type(error).__name__
        return text.splitlines()[0][:200] if text else type(error).__name__


def _bare(etag: str) -> str:
    """A Large Object's ETag is quoted, a plain object's is not; compare them bare."""
    return etag.strip().removeprefix("W/").strip('"')


def _refused(error: BaseException) -> bool:
    """Whether nobody listens there (not a broken transfer): the fetch then moves on."""
    seen: set[int] = set()
    current: Optional[BaseException] = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ConnectionRefusedError) or "refused" in str(current).lower():
            return True
        current = current.__cause__ or current.__context__
    return False


def _keystone_error(name: str, error: Exception, what: str) -> ReadError:
    """Logging in to Keystone failed: wrong credentials or no object-store in the catalog
    are lasting; Keystone unreachable is for the retry policy."""
    from keystoneauth1 import exceptions as keystone

    if isinstance(error, keystone.Unauthorized):
        return ReadError(f"{name}: Keystone refused the credentials (HTTP 401): check the "
                         "OS_* settings or the clouds.yaml cloud", permanent=True)
    if isinstance(error, keystone.EndpointNotFound):
        return ReadError(f"{name}: Keystone's catalog has no object-store endpoint for "
                         f"these settings ({error})", permanent=True)
    if isinstance(error, (keystone.ConnectFailure, keystone.ConnectTimeout)):
        return ReadError(f"{name}: Keystone unreachable: {error} ({what})", unreachable=True)
    lasting = isinstance(error, keystone.HttpError) and 400 <= (error.http_status or 0) < 500
    return ReadError(f"{name}: Keystone: {error} ({what})", permanent=lasting)
