"""The ``mcastdeploy`` command line: session specs, ``send``, ``recv`` and the demo.

Only argument handling and presentation live here; the work is in ``mcastdeploy.drivers``.
Every expected failure ends in one line on stderr and a non-zero exit, never a traceback:
exit 2 for bad input (spec, image, target, interface), 1 for a transfer that failed
(an image that could not be fetched from its URL included).
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
from typing import Any, Callable, Optional

import click

from mcastdeploy.cli.params import Seconds
from mcastdeploy.cli.progress import MODES, ProgressDisplay
from mcastdeploy.drivers.image_source import SourceError, check_local_image
from mcastdeploy.drivers.recv_session import run_recv
from mcastdeploy.drivers.send_image import send_image
from mcastdeploy.drivers.sources import FetchError, ImageCache, is_remote
from mcastdeploy.drivers.sources.qcow2 import is_qcow2
from mcastdeploy.drivers.target import TargetError
from mcastdeploy.drivers.udp import NetworkError, check_group, resolve_interface
from mcastdeploy.ipa.ironic_spec import IronicSpec
from mcastdeploy.spec import (RateSetting, SessionSpec, SpecError, new_session, parse_size,
                              parse_proactive_setting, parse_rate, parse_rate_setting)

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
DEFAULT_CACHE_DIR = "/var/cache/mcastdeploy"


class CommandError(click.ClickException):
    """A one-line error with our exit codes."""

    def __init__(self, message: str, exit_code: int = EXIT_BAD_INPUT) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file: Any = None) -> None:
        click.echo(f"mcastdeploy: error: {self.format_message()}", err=True)


def _one_line_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn our expected exceptions into CommandError (one line, right exit code)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (SpecError, NetworkError, TargetError, SourceError) as error:
            raise CommandError(str(error)) from None
        except FetchError as error:
            raise CommandError(str(error), EXIT_FAILED) from None
        except KeyboardInterrupt:
            raise CommandError("interrupted", EXIT_INTERRUPTED) from None
        except OSError as error:
            where = f" ({error.filename})" if error.filename else ""
            raise CommandError(f"{error.strerror or error}{where}", EXIT_FAILED) from None

    return wrapper


class SpecValueType(click.ParamType):
    """A command-line value parsed by one of the spec's parsers; their SpecError becomes
    click's usage error (exit 2, one line)."""

    def __init__(self, name: str, parse: Callable[[str], Any]) -> None:
        self.name = name
        self._parse = parse

    def convert(self, value: Any, param: Optional[click.Parameter],
                ctx: Optional[click.Context]) -> Any:
        if not isinstance(value, str):
            return value  # a default already converted
        try:
            return self._parse(value)
        except SpecError as error:
            self.fail(str(error), param, ctx)


RATE = SpecValueType("RATE", parse_rate)
#: A fixed rate, or ``auto`` / ``auto:CEILING`` for loss-driven rate control.
RATE_SETTING = SpecValueType("RATE|auto[:RATE]", parse_rate_setting)
#: N repair symbols per block, or ``auto`` / ``auto:N`` (at least N) sized from loss.
PROACTIVE = SpecValueType("N|auto[:N]", parse_proactive_setting)


def _network_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--group/--port/--interface/--rate: override the spec (send, recv) or set it (new)."""
    for option in reversed([
        click.option("--group", help="Multicast group (IPv4, 224.0.0.0/4)."),
        click.option("--port", type=click.IntRange(1, 65535), help="UDP port of the group."),
        click.option("--interface",
                     help="Interface name or one of its IPv4 addresses (e.g. eth0, lo)."),
        click.option("--rate", type=RATE_SETTING, default=None,
                     help="Send rate in bits per second (500M, 1G, 50M ...), or 'auto' to "
                          "follow the group's loss with the spec's rate as ceiling, or "
                          "'auto:1G' to set the ceiling too."),
    ]):
        command = option(command)
    return command


def _load_spec(path: str, group: Optional[str], port: Optional[int],
               interface: Optional[str],
               rate: Optional[RateSetting]) -> SessionSpec:
    spec = SessionSpec.load(path)
    if group is not None:
        check_group(group)
    mode, bps = rate or (None, None)
    return spec.replace(group=group, port=port, interface=interface, rate_bps=bps,
                        rate_mode=mode)


def _run_and_report(label: str, progress: str, as_json: bool,
                    run: Callable[..., Any]) -> None:
    """Run a transfer with a progress display, print its summary, exit 1 if it failed."""
    display = ProgressDisplay(progress, label)
    try:
        summary = run(on_progress=display)
    finally:
        display.close()
    _report(summary, as_json)
    if not summary.ok:
        raise CommandError(summary.reason, EXIT_FAILED)


def _report(summary: Any, as_json: bool) -> None:
    record = summary.as_dict()
    if as_json:
        click.echo(json.dumps(record, sort_keys=True))
        return
    role = record["role"]
    if role == "send":
        click.echo(f"sent {summary.bytes / 1e6:.1f} MB in {summary.seconds:.2f} s "
                   f"({summary.mb_per_s:.1f} MB/s); {summary.receivers_done}/"
                   f"{summary.receivers} receivers done; repairs asked {summary.repairs_asked},"
                   f" sent {summary.repairs_sent}; sha256 {summary.sha256}")
    else:
        click.echo(f"received {summary.bytes / 1e6:.1f} MB in {summary.seconds:.2f} s "
                   f"({summary.mb_per_s:.1f} MB/s); repairs asked {summary.repairs_asked}, "
                   f"received {summary.repairs_received}; sha256 {summary.sha256}")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mcastdeploy")
def main() -> None:
    """Multicast disk images to many machines at once, repaired with FEC, straight to disk."""


def _ironic_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """What the agent does with a session Ironic gives it (mcastdeploy/ipa)."""
    for option in reversed([
            click.option("--early-start", is_flag=True,
                         help="Agents start receiving at lookup, before the deploy step."),
            click.option("--agent-timeout", type=Seconds(min=1),
                         help="Agents fall back to HTTP after this many seconds without "
                              "the sender (default 60)."),
            click.option("--node-interface",
                         help="The nodes' NIC for the group (default: the kernel's route)."),
            click.option("--agent-seed-time", type=Seconds(min=0),
                         help="Agents serve their image to stragglers for up to this many "
                              "seconds after theirs is verified, or until the sender ends "
                              "the session; the deploy step waits (default 0: no seeding)."),
    ]):
        command = option(command)
    return command


@main.group()
def session() -> None:
    """Create session specs."""


@session.command("new")
@_network_options
@click.option("--ttl", type=click.IntRange(1, 255), help="Multicast TTL (default 1: one LAN).")
@click.option("--symbol-size", type=click.IntRange(16, 65000),
              help="Bytes per packet payload (default 1400, fits a 1500-byte MTU).")
@click.option("--block-symbols", type=click.IntRange(1, 254),
              help="Source symbols per FEC block, k (default 32; 64 for thousands of "
                   "receivers, where parity per block then costs half as much).")
@click.option("--proactive-repair", type=PROACTIVE,
              help="Repair symbols sent with every block before anyone asks: N, or "
                   "'auto' / 'auto:N' (default auto:1) to size them from the group's size "
                   "and loss, at least N.")
@click.option("--image", "image", type=click.Path(dir_okay=False),
              help="Pin this image's size and SHA-256 in the spec; with --rack-head, the "
                   "name of the image to ask for.")
@click.option("--encrypt", is_flag=True, default=None,
              help="Encrypt the image on the wire, not only authenticate every packet.")
@click.option("--sender", metavar="IPV4:PORT",
              help="The sender's unicast address (it binds that port): receivers that hear "
                   "no multicast still join through it and fetch from peers.")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Write the spec here (mode 0600) instead of printing it.")
@_ironic_options
@click.option("--ironic", is_flag=True,
              help="Print the spec as Ironic stores it (node instance_info 'mcastdeploy', "
                   "see docs/ironic.rst); the rack head's spec goes to -o.")
@click.option("--rack-head", metavar="URL",
              help="Ask this rack head's daemon (mcastdeploy serve) for the session of "
                   "the image named by --image instead of making one.")
@click.option("--agent", help="With --rack-head: this agent's name in the rack head's status.")
@click.option("--token-file", type=click.Path(dir_okay=False),
              help="With --rack-head: the API token's file (default: $MCASTDEPLOY_TOKEN).")
@click.option("--sha256", "pin_sha256", metavar="HEX",
              help="With --rack-head: pin the image to this SHA-256 (Ironic's checksum) of "
                   "the image as stored: raw, or qcow2 with --qcow2.")
@click.option("--qcow2", "pin_qcow2", is_flag=True,
              help="With --rack-head and --sha256: the pin is of a qcow2 file (agents get "
                   "its raw conversion).")
@_one_line_errors
def session_new(group: Optional[str], port: Optional[int], interface: Optional[str],
                rate: Optional[RateSetting], ttl: Optional[int],
                symbol_size: Optional[int], block_symbols: Optional[int],
                proactive_repair: Optional[tuple[str, Optional[int]]], image: Optional[str],
                encrypt: Optional[bool], sender: Optional[str], output: Optional[str],
                ironic: bool,
                rack_head: Optional[str], agent: Optional[str], token_file: Optional[str],
                pin_sha256: Optional[str], pin_qcow2: bool, **agent_options: Any) -> None:
    """Write a new session spec (JSON) with a fresh session id and key, or (--rack-head)
    the one a rack head's daemon has for an image."""
    if rack_head is not None:
        if pin_qcow2 and pin_sha256 is None:
            raise CommandError("--qcow2 says what --sha256 pins: give both")
        spec = _from_rack_head(rack_head, image, agent, token_file, pin_sha256,
                               "qcow2" if pin_qcow2 else None, group, port, rate, ttl,
                               symbol_size, block_symbols, proactive_repair, encrypt,
                               sender)
        if interface is not None:  # the agent's interface, where it differs from the head's
            resolve_interface(interface)
            spec = spec.replace(interface=interface)
        _write_spec(spec, output, ironic, agent_options)  # the daemon's session
        return
    if pin_sha256 is not None or pin_qcow2:
        raise CommandError("--sha256 and --qcow2 go with --rack-head; here --image pins")
    if ironic and not output:
        raise CommandError("--ironic needs -o FILE: the rack head's sender needs the spec too")
    if group is not None:
        check_group(group)
    if interface is not None:
        resolve_interface(interface)
    pinned: dict[str, Any] = {}
    if image is not None:
        pinned = dict(zip(("image_size", "image_sha256"), _measure(image)))
        if is_qcow2(image):  # the pins are the qcow2's; receivers get its raw conversion
            pinned["image_format"] = "qcow2"
    mode, bps = rate or (None, None)
    spec = new_session(group=group, port=port, interface=interface, rate_bps=bps,
                       rate_mode=mode, ttl=ttl,
                       symbol_size=symbol_size, block_symbols=block_symbols,
                       proactive_mode=proactive_repair[0] if proactive_repair else None,
                       proactive_repair=proactive_repair[1] if proactive_repair else None,
                       encrypt=encrypt, sender=sender, **pinned)
    _write_spec(spec, output, ironic, agent_options)


def _write_spec(spec: SessionSpec, output: Optional[str], ironic: bool,
                agent_options: dict[str, Any]) -> None:
    """The spec to ``output`` and/or stdout; with ``ironic`` the value for the nodes'
    instance_info (docs/ironic.rst) on stdout, made before anything is written so that
    bad agent options leave no spec behind."""
    value = _ironic_value(spec, **agent_options) if ironic else None
    if output:
        spec.save(output)
    if value is not None:
        click.echo(value)
    elif not output:
        click.echo(spec.to_json(), nl=False)


@session.command("ironic")
@click.argument("spec_path", type=click.Path(dir_okay=False))
@_ironic_options
@_one_line_errors
def session_ironic(spec_path: str, **agent_options: Any) -> None:
    """Print SPEC as Ironic stores it, for 'openstack baremetal node set --instance-info
    mcastdeploy=...' on every node of the rack whose sender uses SPEC."""
    click.echo(_ironic_value(SessionSpec.load(spec_path), **agent_options))


def _ironic_value(spec: SessionSpec, early_start: bool, agent_timeout: Optional[float],
                  node_interface: Optional[str], agent_seed_time: Optional[float]) -> str:
    """The one-line value for ``--instance-info mcastdeploy=...``; SpecError if the agent
    options do not go together."""
    value = IronicSpec(spec, early_start=early_start, interface=node_interface,
                       **({"timeout": agent_timeout} if agent_timeout else {}),
                       **({"seed_time": agent_seed_time} if agent_seed_time else {}))
    return json.dumps(value.to_ironic(), separators=(",", ":"), sort_keys=True)


def _from_rack_head(rack_head: str, image: Optional[str], agent: Optional[str],
                    token_file: Optional[str], sha256: Optional[str],
                    image_format: Optional[str], *settings: Any) -> SessionSpec:
    from mcastdeploy.cli.serve import ask_rack_head
    from mcastdeploy.service.client import ClientError

    if image is None:
        raise CommandError("--rack-head needs --image NAME (the image to ask for)")
    if any(setting is not None for setting in settings):
        raise CommandError("with --rack-head the rack head chooses the session's settings; "
                           "only --image, --agent, --token-file, --sha256, --qcow2, "
                           "--interface, -o and the Ironic options apply")
    try:
        return ask_rack_head(rack_head, image, agent, token_file, sha256, image_format)
    except ClientError as error:
        raise CommandError(str(error), EXIT_FAILED) from None


def _measure(path: str) -> tuple[int, str]:
    check_local_image(path)
    digest = hashlib.sha256()
    size = 0
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
    except OSError as error:
        raise SourceError(f"cannot read image {path}: {error.strerror}") from None
    if size == 0:
        raise SourceError(f"image {path} is empty")
    return size, digest.hexdigest()


_session_option = click.option("--session", "session_path", required=True,
                               type=click.Path(dir_okay=False),
                               help="The session spec (JSON) from 'mcastdeploy session new'.")
_json_option = click.option("--json", "as_json", is_flag=True,
                            help="Print the final summary as one JSON object.")
_progress_option = click.option("--progress", type=click.Choice(MODES), default="auto",
                                show_default=True,
                                help="Progress on stderr: a bar, JSON lines, or nothing.")


@main.command()
@_session_option
@click.option("--min-receivers", type=click.IntRange(0), default=0, show_default=True,
              help="Start once this many receivers have joined.")
@click.option("--wait", type=Seconds(0), default=None,
              help="Start after this many seconds even if fewer receivers joined.")
@click.option("--linger", type=Seconds(0), default=5.0, show_default=True,
              help="After the pass, stop when nobody asked for repair this long.")
@click.option("--copy", "copies", multiple=True, metavar="URL",
              help="Another URL (http, https, swift) holding the same image as the IMAGE "
                   "URL; repeat for more. One copy is chosen at random, the others serve "
                   "if it fails.")
@click.option("--cache-dir", default=DEFAULT_CACHE_DIR, show_default=True,
              type=click.Path(file_okay=False),
              help="Where images fetched from URLs, and raw conversions of qcow2 images, "
                   "are kept for the next session.")
@click.option("--cache-limit", default="100G", show_default=True, metavar="SIZE",
              help="Most bytes the cache may hold (K/M/G, binary units); least recently "
                   "used images go first.")
@click.option("--connections", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Parallel connections fetching an image from a URL.")
@_network_options
@_json_option
@_progress_option
@click.argument("image", type=click.Path(dir_okay=False))
@_one_line_errors
def send(session_path: str, min_receivers: int, wait: Optional[float], linger: float,
         copies: tuple[str, ...], cache_dir: str, cache_limit: str, connections: int,
         group: Optional[str], port: Optional[int], interface: Optional[str],
         rate: Optional[RateSetting], as_json: bool, progress: str,
         image: str) -> None:
    """Multicast IMAGE to every receiver of the session.

    IMAGE is a file, a block device, an http(s):// URL, or swift://CONTAINER/OBJECT (with
    ST_AUTH/ST_USER/ST_KEY or OS_* credentials in the environment). A URL is pulled once
    into the cache and multicast as its first blocks arrive (or sent from the cache: no
    network then); a session spec that pins the image's SHA-256 makes the fetch verify
    it. A qcow2 image is converted to raw in the cache once (qemu-img) and sent raw.
    """
    spec = _load_spec(session_path, group, port, interface, rate)
    if copies and not is_remote(image):
        raise CommandError("--copy needs IMAGE to be a URL")
    cache = ImageCache(cache_dir, _parse_size(cache_limit), connections=connections)
    _run_and_report("send", progress, as_json, functools.partial(
        send_image, spec, image, copies=copies, cache=cache, min_receivers=min_receivers,
        wait=wait, linger=linger))


@main.command()
@_session_option
@click.option("--timeout", type=Seconds(0.1), default=30.0, show_default=True,
              help="Give up when nothing comes from the sender for this many seconds.")
@click.option("--resume", is_flag=True,
              help="The target may already hold part of the image (a restarted receiver): "
                   "check it block by block against the manifest and fetch only the rest.")
@click.option("--seed-time", type=Seconds(0), default=0.0, show_default=True,
              help="Serve the image to stragglers (peers that joined late or hear no "
                   "multicast) while receiving and this many seconds after finishing, or "
                   "until the sender ends the session; 0: do not seed.")
@click.option("--direct", is_flag=True,
              help="Write with O_DIRECT, past the page cache (large images on agents with "
                   "little memory); the target's file system must support it.")
@click.option("--origin", "origin", multiple=True, metavar="URL",
              help="Where the raw image is stored (http, https, swift; repeat for copies): "
                   "the very last resort of a straggler that neither peers nor the "
                   "sender's block server can serve.")
@_network_options
@_json_option
@_progress_option
@click.argument("target", type=click.Path(dir_okay=False))
@_one_line_errors
def recv(session_path: str, timeout: float, resume: bool, seed_time: float, direct: bool,
         origin: tuple[str, ...], group: Optional[str],
         port: Optional[int], interface: Optional[str], rate: Optional[RateSetting],
         as_json: bool, progress: str, target: str) -> None:
    """Receive the session's image into TARGET (a file or block device), verified."""
    spec = _load_spec(session_path, group, port, interface, rate)
    _run_and_report("recv", progress, as_json,
                    functools.partial(run_recv, spec, target, timeout=timeout, resume=resume,
                                      seed_time=seed_time, direct=direct, origin=origin))


@main.command()
@click.option("--receivers", type=click.IntRange(1, 16), default=3, show_default=True)
@click.option("--size", default="64M", show_default=True,
              help="Image size: bytes, or with K/M/G (binary units).")
@click.option("--rate", type=RATE, default="800M", show_default=True)
@click.option("--keep", type=click.Path(file_okay=False),
              help="Keep the image, spec and received copies in this directory.")
@_one_line_errors
def demo(receivers: int, size: str, rate: int, keep: Optional[str]) -> None:
    """Multicast a random image to several receivers on this machine (loopback)."""
    from mcastdeploy.cli.demo import run_demo

    if not run_demo(receivers=receivers, size=_parse_size(size), rate_bps=rate, keep=keep):
        raise CommandError("a receiver's copy does not match the image", EXIT_FAILED)


def _parse_size(text: str) -> int:
    try:
        return parse_size(text)
    except SpecError as error:
        raise CommandError(str(error)) from None


def _add_service_commands() -> None:
    from mcastdeploy.cli.serve import serve, status

    main.add_command(serve)
    main.add_command(status)


_add_service_commands()

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
