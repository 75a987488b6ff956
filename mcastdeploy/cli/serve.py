"""``mcastdeploy serve`` (the rack-head daemon) and ``mcastdeploy status`` (its live
table), and the ``session new --rack-head`` request; the work is in mcastdeploy.service."""

from __future__ import annotations

import json
import signal
import ssl
import sys
import time
from typing import Any, Optional

import click

from mcastdeploy.cli.params import Seconds
from mcastdeploy.service.client import (ClientError, fetch_status, read_token,
                                        request_session)
from mcastdeploy.spec import SessionSpec

_token_option = click.option("--token-file", type=click.Path(dir_okay=False),
                             help="File holding the rack head's API token (default: "
                                  "$MCASTDEPLOY_TOKEN).")


def ask_rack_head(rack_head: str, image: str, agent: Optional[str],
                  token_file: Optional[str], sha256: Optional[str] = None,
                  image_format: Optional[str] = None) -> SessionSpec:
    """``session new --rack-head``: the daemon's spec for ``image``."""
    spec, _ = request_session(rack_head, read_token(token_file), image, agent, sha256,
                              image_format)
    return spec


@click.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="The daemon's INI file (docs/deployer.rst).")
@click.option("--listen", help="HOST:PORT for the API (overrides [serve] listen).")
@click.option("--interface", help="Interface the sessions multicast on.")
@click.option("--rate", help="Rate budget all sessions share (e.g. 800M).")
@click.option("--state-dir", type=click.Path(file_okay=False),
              help="Where the session table is kept.")
@click.option("--cache-dir", type=click.Path(file_okay=False),
              help="Where fetched images are cached.")
@click.option("--image-dir", type=click.Path(file_okay=False),
              help="Agents may ask for files in this directory by name.")
@click.option("--gather", type=Seconds(0, 3600),
              help="Seconds a new session waits for more agents before it sends.")
@click.option("--linger", type=Seconds(0, 3600),
              help="A session ends when nobody asked for repair this long.")
def serve(config_path: str, listen: Optional[str], interface: Optional[str],
          rate: Optional[str], state_dir: Optional[str], cache_dir: Optional[str],
          image_dir: Optional[str], gather: Optional[float], linger: Optional[float]) -> None:
    """Run the rack-head daemon: sessions on demand over an authenticated HTTP API."""
    from mcastdeploy.cli.main import CommandError
    from mcastdeploy.drivers.udp import NetworkError, resolve_interface
    from mcastdeploy.service import config as configuration
    from mcastdeploy.service import events
    from mcastdeploy.service.api import ApiServer
    from mcastdeploy.service.daemon import Daemon
    from mcastdeploy.service.table import TableError
    from mcastdeploy.spec import SpecError, parse_rate

    try:
        settings = configuration.load(config_path).with_overrides(
            listen=configuration.parse_listen(listen) if listen else None,
            interface=interface, rate_bps=parse_rate(rate) if rate else None,
            state_dir=state_dir, cache_dir=cache_dir, image_dir=image_dir, gather=gather,
            linger=linger)
        resolve_interface(settings.interface)  # else every session fails, not the start
    except (configuration.ConfigError, SpecError, NetworkError) as error:
        raise CommandError(str(error)) from None
    events.configure(sys.stderr)
    service = Daemon(settings)
    try:
        server = ApiServer(settings.listen, service)
    except ssl.SSLError as error:
        raise CommandError(f"cannot use tls_cert/tls_key: {error.reason or error}") from None
    except OSError as error:
        raise CommandError(f"cannot listen on {settings.listen[0]}:{settings.listen[1]}: "
                           f"{error.strerror}") from None
    try:
        service.start()
    except TableError as error:
        server.server_close()
        raise CommandError(str(error)) from None

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    host, port = server.server_address[:2]
    events.log_event("serving", address=f"{host}:{port}", tls=settings.tls_cert is not None,
                     interface=settings.interface,
                     groups=str(settings.groups), budget_bps=settings.rate_bps)
    try:
        server.serve_forever(poll_interval=0.25)
    except KeyboardInterrupt:
        pass
    finally:
        events.log_event("stopping", sessions=len(service.sessions))
        server.server_close()
        service.close()


@click.command()
@click.option("--rack-head", required=True, help="The daemon's URL, e.g. http://10.0.0.1:6780.")
@_token_option
@click.option("--watch", is_flag=True, help="Redraw the table until interrupted.")
@click.option("--interval", type=Seconds(0.2, 3600), default=2.0, show_default=True,
              help="Seconds between redraws with --watch.")
@click.option("--json", "as_json", is_flag=True, help="Print the status as one JSON object.")
def status(rack_head: str, token_file: Optional[str], watch: bool, interval: float,
           as_json: bool) -> None:
    """Show a rack head's sessions and every agent's progress, like top for deployments."""
    from mcastdeploy.cli.main import CommandError

    try:
        token = read_token(token_file)
        while True:
            data = fetch_status(rack_head, token)
            text = json.dumps(data, sort_keys=True) if as_json else _table(rack_head, data)
            if watch and not as_json and sys.stdout.isatty():
                click.clear()
            click.echo(text)
            if not watch:
                return
            time.sleep(interval)
    except ClientError as error:
        raise CommandError(str(error), 1) from None
    except KeyboardInterrupt:
        return


def _table(rack_head: str, data: dict) -> str:
    """render_table, where a status of the wrong shape (another program on that port, a
    different version) is the rack head's fault, told in one line."""
    try:
        return render_table(data)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ClientError(f"rack head {rack_head} answered a status this version cannot "
                          f"show ({type(error).__name__}: {error}); try --json") from None


def _rate(bps: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if bps >= size:
            return f"{bps / size:.1f}{unit}"
    return f"{bps:.0f}"


def _mb(count: float) -> str:
    return f"{count / 1e6:.1f}MB"


def render_table(data: dict) -> str:
    """The status as a table: a line per session, and under it a line per agent."""
    lines = [f"budget {_rate(data.get('budget_bps', 0))}bit/s, "
             f"{len(data['sessions'])} sessions in flight"]
    for title, views in (("in flight", data["sessions"]), ("ended", data.get("recent", [])[:5])):
        if not views:
            continue
        lines.append(f"-- {title}")
        lines.append(f"{'SESSION':<16} {'IMAGE':<20} {'GROUP':<15} {'STATE':<10} "
                     f"{'RATE':>7} {'PASS':>5} {'SENT':>9} {'REPAIRS':>13} {'AGENTS':>9}")
        for view in views:
            total = view.get("bytes_total") or 0
            done_agents = sum(1 for a in view["agents"] if a["state"] == "done")
            lines.append(
                f"{view['session_id']:<16} {view['image'][:20]:<20} {view['group']:<15} "
                f"{view['state']:<10} {_rate(view['rate_bps']):>7} "
                f"{(100 * view['bytes_done'] / total if total else 0):>4.0f}% "
                f"{_mb(view['bytes_sent']):>9} "
                f"{view['repairs_asked']:>6}/{view['repairs_sent']:<6} "
                f"{done_agents:>3}/{len(view['agents']):<3} done")
            if view.get("resumed"):
                lines.append("  resumed after the daemon restarted")
            if view.get("reason"):
                lines.append(f"  ended: {view['reason']}")
            lines.append(f"  {'AGENT':<20} {'ADDRESS':<15} {'STATE':<10} {'PROGRESS':>8} "
                         f"{'RATE':>7} {'LOSS':>6} {'REPAIRS':>7} SOURCE")
            for agent in view["agents"]:
                lines.append(
                    f"  {agent['name'][:20]:<20} {agent['address']:<15} {agent['state']:<10} "
                    f"{100 * agent['progress']:>7.0f}% {_rate(agent.get('rate_bps', 0)):>7} "
                    f"{100 * agent['loss']:>5.1f}% "
                    f"{agent['repairs_asked']:>7} {agent.get('source') or '-'}")
    return "\n".join(lines)
