"""The daemon's configuration: a small INI file (configparser: Python 3.9 has no tomllib),
with command-line overrides.  Example (docs/deployer.rst explains every key)::

    [serve]
    listen = 10.0.0.1:6780
    interface = eth0
    groups = 239.192.0.0/14
    rate = 800M
    token_file = /etc/mcastdeploy/token
    state_dir = /var/lib/mcastdeploy

    [cache]
    dir = /var/cache/mcastdeploy
    limit = 100G

    [images]
    ubuntu-22.04 = swift://images/ubuntu-22.04.raw https://mirror.example/ubuntu-22.04.raw

    [swift]
    OS_AUTH_URL = https://keystone.example:5000/v3
    OS_USERNAME = mcastdeploy
    ...

The file holds the API token (or names a file holding it) and Swift credentials, so it
must be readable by root only; ``load`` refuses one that others can read.
"""

from __future__ import annotations

import configparser
import ipaddress
import os
import stat
from dataclasses import dataclass, field, replace
from typing import Any, Optional

from mcastdeploy.service.groups import parse_range
from mcastdeploy.spec import (DEFAULT_BLOCK_SYMBOLS, DEFAULT_PORT, DEFAULT_SYMBOL_SIZE,
                              RATE_MODES, SpecError, new_session, parse_rate)
from mcastdeploy.spec import parse_size as spec_parse_size

DEFAULT_LISTEN = ("0.0.0.0", 6780)
DEFAULT_STATE_DIR = "/var/lib/mcastdeploy"
DEFAULT_CACHE_DIR = "/var/cache/mcastdeploy"
#: Fewer bytes than this make a token guessable.
MIN_TOKEN_CHARS = 16
_SECTIONS = {"serve", "cache", "images", "swift"}
_SERVE_KEYS = {"listen", "interface", "groups", "port", "rate", "session_rate", "gather",
               "linger", "state_dir", "token", "token_file", "image_dir", "allow_urls",
               "rate_mode", "symbol_size", "block_symbols", "tls_cert", "tls_key"}
_CACHE_KEYS = {"dir", "limit", "connections"}


class ConfigError(ValueError):
    """The configuration is unreadable or wrong; the message is one line."""


@dataclass(frozen=True)
class ServeConfig:
    token: str = field(repr=False)  # secrets stay out of logs and tracebacks
    listen: tuple[str, int] = DEFAULT_LISTEN
    interface: Optional[str] = None
    groups: ipaddress.IPv4Network = ipaddress.IPv4Network("239.192.0.0/14")
    port: int = DEFAULT_PORT
    #: The budget all sessions share (bits per second).
    rate_bps: int = 800_000_000
    #: The most one session may use, whatever its share (None: its share).
    session_rate_bps: Optional[int] = None
    #: "fixed": each session sends at its share; "auto": its share is the ceiling and the
    #: sender follows its agents' loss below it (protocol/ratecontrol.py).
    rate_mode: str = "fixed"
    #: Bytes per packet payload and source symbols per block of every session's spec.
    symbol_size: int = DEFAULT_SYMBOL_SIZE
    block_symbols: int = DEFAULT_BLOCK_SYMBOLS
    #: Seconds a new session waits for more agents before its pass begins.
    gather: float = 3.0
    #: After the pass, a session ends when nobody asked for repair this long.
    linger: float = 10.0
    state_dir: str = DEFAULT_STATE_DIR
    cache_dir: str = DEFAULT_CACHE_DIR
    cache_limit: int = 100 << 30
    connections: int = 4
    #: Images by name: each a list of URLs holding the same bytes (copies).
    images: dict[str, list[str]] = field(default_factory=dict)
    #: Agents may also ask for a file in this directory by its name.
    image_dir: Optional[str] = None
    #: Agents may ask for any http(s):// or swift:// URL (else only named images).
    allow_urls: bool = False
    #: ST_* / OS_* settings for swift:// sources, as the swift command line reads them.
    swift_environ: dict[str, str] = field(default_factory=dict, repr=False)
    #: PEM certificate (chain) and key: the API speaks HTTPS (None: plain HTTP).
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None

    def with_overrides(self, **changes: Any) -> "ServeConfig":
        """A copy with the command line's settings (None: not given) applied."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def parse_listen(text: str) -> tuple[str, int]:
    """'10.0.0.1:6780' or ':6780' -> (host, port)."""
    host, colon, port = text.strip().rpartition(":")
    if not colon or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"bad listen address {text!r}: use HOST:PORT, e.g. 0.0.0.0:6780")
    return host.strip("[]") or "0.0.0.0", int(port)


def parse_size(text: str) -> int:
    """'100G' -> bytes (spec.parse_size), as a config error."""
    try:
        return spec_parse_size(text)
    except SpecError as error:
        raise ConfigError(str(error)) from None


def load(path: str) -> ServeConfig:
    """Read and check the file; ConfigError (one line) for anything wrong with it."""
    try:
        info = os.stat(path)
    except OSError as error:
        raise ConfigError(f"cannot read config {path}: {error.strerror}") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"config {path} holds secrets but others may read it: "
                          f"chmod 600 {path}")
    # "key = value   # comment" as in the documented example; a value itself cannot hold
    # a " #" then (tokens and Swift passwords with one go in a token_file or quotes-free).
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=("#",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keep ST_AUTH's case
    try:
        with open(path, encoding="utf-8") as handle:
            parser.read_file(handle)
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read config {path}: {error}") from None
    except configparser.Error as error:
        first = str(error).splitlines()[0]
        raise ConfigError(f"config {path} is not a valid INI file: {first}") from None
    return from_parser(parser, os.path.dirname(os.path.abspath(path)))


def from_parser(parser: configparser.ConfigParser, base: str = ".") -> ServeConfig:
    unknown = set(parser.sections()) - _SECTIONS
    if unknown:
        raise ConfigError(f"unknown config section [{sorted(unknown)[0]}]")
    serve = dict(parser["serve"]) if parser.has_section("serve") else {}
    cache = dict(parser["cache"]) if parser.has_section("cache") else {}
    for section, keys, known in (("serve", serve, _SERVE_KEYS), ("cache", cache, _CACHE_KEYS)):
        extra = set(keys) - known
        if extra:
            raise ConfigError(f"unknown key {sorted(extra)[0]!r} in [{section}]")
    settings: dict[str, Any] = {"token": _token(serve, base)}
    try:
        if "listen" in serve:
            settings["listen"] = parse_listen(serve["listen"])
        if serve.get("interface"):
            settings["interface"] = serve["interface"]
        if "groups" in serve:
            settings["groups"] = parse_range(serve["groups"])
        if "port" in serve:
            settings["port"] = _integer("port", serve["port"], 1, 65535)
        if "rate" in serve:
            settings["rate_bps"] = parse_rate(serve["rate"])
        if serve.get("session_rate"):
            settings["session_rate_bps"] = parse_rate(serve["session_rate"])
        if "rate_mode" in serve:
            if serve["rate_mode"] not in RATE_MODES:
                raise ConfigError(f"rate_mode must be one of {', '.join(RATE_MODES)}")
            settings["rate_mode"] = serve["rate_mode"]
        if "symbol_size" in serve:  # checked against the wire's limits by the first spec
            settings["symbol_size"] = _integer("symbol_size", serve["symbol_size"], 16, 65000)
        if "block_symbols" in serve:
            settings["block_symbols"] = _integer("block_symbols", serve["block_symbols"],
                                                 1, 254)
        for name in ("gather", "linger"):
            if name in serve:
                settings[name] = _seconds(name, serve[name])
        if "state_dir" in serve:
            settings["state_dir"] = os.path.join(base, serve["state_dir"])
        if serve.get("image_dir"):
            settings["image_dir"] = os.path.join(base, serve["image_dir"])
        if ("tls_cert" in serve) != ("tls_key" in serve):
            raise ConfigError("set both tls_cert and tls_key in [serve], or neither")
        for name in ("tls_cert", "tls_key"):
            if name in serve:
                settings[name] = path = os.path.join(base, serve[name])
                if not os.path.isfile(path):
                    raise ConfigError(f"{name} {path} is not a file")
        if "allow_urls" in serve:
            if serve["allow_urls"].lower() not in parser.BOOLEAN_STATES:
                raise ConfigError(f"allow_urls must be true or false, not "
                                  f"{serve['allow_urls']!r}")
            settings["allow_urls"] = parser.getboolean("serve", "allow_urls")
        if "dir" in cache:
            settings["cache_dir"] = os.path.join(base, cache["dir"])
        if "limit" in cache:
            settings["cache_limit"] = parse_size(cache["limit"])
        if "connections" in cache:
            settings["connections"] = _integer("connections", cache["connections"], 1, 64)
    except (SpecError, ValueError) as error:
        raise ConfigError(str(error)) from None
    if parser.has_section("images"):
        settings["images"] = {name: urls.split() for name, urls in parser["images"].items()}
        for name, urls in settings["images"].items():
            if not urls or any("://" not in url for url in urls):
                raise ConfigError(f"image {name!r} in [images] needs one or more URLs")
    if parser.has_section("swift"):
        settings["swift_environ"] = dict(parser["swift"])
    loaded = ServeConfig(**settings)
    try:  # the session settings as every spec will carry them, checked once here
        new_session(symbol_size=loaded.symbol_size, block_symbols=loaded.block_symbols,
                    rate_bps=loaded.session_rate_bps or loaded.rate_bps,
                    rate_mode=loaded.rate_mode, port=loaded.port)
    except SpecError as error:
        raise ConfigError(str(error).replace("session spec field", "setting")) from None
    return loaded


def _token(serve: dict[str, str], base: str) -> str:
    if "token" in serve and "token_file" in serve:
        raise ConfigError("set token or token_file in [serve], not both")
    if "token_file" in serve:
        path = os.path.join(base, serve["token_file"])
        try:
            with open(path, encoding="utf-8") as handle:
                token = handle.read().strip()
        except OSError as error:
            raise ConfigError(f"cannot read token file {path}: {error.strerror}") from None
        except UnicodeDecodeError:  # e.g. token_file naming a key or a binary by mistake
            raise ConfigError(f"token file {path} is not UTF-8 text") from None
    else:
        token = serve.get("token", "").strip()
    if len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(f"the API token (token or token_file in [serve]) must have at "
                          f"least {MIN_TOKEN_CHARS} characters; make one with: "
                          "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'")
    return token


def _integer(name: str, text: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, not {text!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be in {low}..{high}")
    return value


def _seconds(name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, not {text!r}") from None
    if not 0 <= value <= 3600:
        raise ConfigError(f"{name} must be between 0 and 3600 seconds")
    return value
