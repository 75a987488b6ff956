"""A rack on one machine: network namespaces, a Linux bridge, veth links, loss and rate caps.

Why namespaces: multicast on ``lo`` never crosses a switch, so it cannot show what a rack
does to the protocol (a bridge that clones each datagram per port, IGMP snooping, per-link
loss and rate limits, a node that joins late or drops off).  Here every machine gets its
own network namespace, joined to one bridge that lives in a namespace of its own, so
nothing touches the host's interfaces and a rack is removed by deleting its namespaces.

Layout of a rack called NAME with N receivers (namespaces are NAME-<host>):

    NAME-sw      bridge ``br0``, one port per host: ``p-sender``, ``p-r1`` .. ``p-rN``
    NAME-sender  ``eth0`` 10.99.0.1/24
    NAME-rK      ``eth0`` 10.99.0.(10+K)/24, K = 1..N

What this kernel offers (see /work/shared/notes/rack.md): no netem, so loss is an
nftables ``netdev`` ingress chain on a receiver's ``eth0`` dropping ``numgen random``
packets; rate caps are ``tbf`` qdiscs on both ends of every veth, so each direction of
every link is capped.  ``net.core.rmem_max``/``wmem_max`` exist per namespace on this
kernel but a child namespace may not raise them (EINVAL); mcastdeploy runs as root here and
asks SO_RCVBUFFORCE/SO_SNDBUFFORCE, which ignore them, so :meth:`Rack.up` only tries.

Everything a rack creates is recorded in a JSON state file, so ``tools/rack down`` works
from another process, and :func:`down_leftovers` removes what a crashed run left behind.
Needs root, ``ip`` (iproute2), ``tc`` and ``nft`` (nftables).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

#: Rack names are short so that NAME-rNN stays a readable namespace name; no dash, so
#: that "NAME-" is an unambiguous prefix for leftovers.
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9]{0,11}$")
MAX_RECEIVERS = 32
SUBNET = ipaddress.IPv4Network("10.99.0.0/24")
SENDER_ADDRESS = "10.99.0.1"
BRIDGE = "br0"
HOST_IF = "eth0"
NFT_TABLE = "mdrack"
#: Every external command gets this long; a hung `ip` must not hang a test run.
COMMAND_TIMEOUT = 20.0
#: Longest burst-loss window a helper may schedule (start delay plus duration).
MAX_BURST_SECONDS = 600.0


def _default_state_dir() -> str:
    """/run is tmpfs and root's: state does not survive a reboot, and neither do racks."""
    return "/run/mcastdeploy-rack" if os.access("/run", os.W_OK) else "/tmp/mcastdeploy-rack"


STATE_DIR = os.environ.get("MCASTDEPLOY_RACK_STATE", _default_state_dir())


class RackError(RuntimeError):
    """A rack could not be built, changed or inspected; the message says which command."""


def run(argv: Sequence[str], *, input: Optional[str] = None, check: bool = True,
        timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess:
    """Run a short command with a time limit; raise RackError with its stderr on failure."""
    try:
        result = subprocess.run(list(argv), input=input, capture_output=True, text=True,
                                timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RackError(f"{' '.join(argv)}: no answer in {timeout:g} s") from None
    except FileNotFoundError:
        raise RackError(f"{argv[0]} not found (see tools/apt-packages.txt)") from None
    if check and result.returncode != 0:
        raise RackError(f"{' '.join(argv)} failed ({result.returncode}): "
                        f"{result.stderr.strip()[-500:]}")
    return result


def available() -> Optional[str]:
    """None when racks can be built here, else why not (for pytest's skip reason)."""
    if os.geteuid() != 0:
        return "the rack test bed needs root (network namespaces)"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed"
    probe = f"mdprobe{os.getpid()}"
    try:
        run(["ip", "netns", "add", probe])
    except RackError as error:
        return f"`ip netns` is unavailable: {error}"
    try:
        run(["ip", "netns", "del", probe], check=False)
    except RackError:
        pass
    return None


def parse_rate(text: str) -> int:
    """'50mbit' / '50M' / '1gbit' -> bits per second (powers of 1000, like tc)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]?)(bit|bps)?\s*", text.lower())
    if not match:
        raise RackError(f"bad rate {text!r}: use e.g. 50mbit, 100M, 1gbit")
    value = float(match.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[match.group(2)]
    if value < 8000:
        raise RackError(f"rate {text!r} is too low")
    return int(value)


def netns_list() -> list[str]:
    """Names of every network namespace `ip netns` knows."""
    out = run(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def netns_pids(namespace: str) -> list[int]:
    """PIDs of the processes living in ``namespace`` (ours: we started them there)."""
    result = run(["ip", "netns", "pids", namespace], check=False)
    return [int(word) for word in result.stdout.split() if word.isdigit()]


def kill_pids(pids: Sequence[int], grace: float = 2.0) -> None:
    """SIGTERM the given PIDs, then SIGKILL whatever is still there after ``grace`` s."""
    alive = []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
            alive.append(pid)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [pid for pid in alive if _exists(pid)]
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _exists(pid: int) -> bool:
    """False once ``pid`` has ended (a zombie counts as ended; ours get reaped here)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return False
    except ChildProcessError:  # not our child: ask /proc
        pass
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _delete_namespace(namespace: str) -> None:
    """Kill what runs inside, then delete: its veths, qdiscs and nft tables go with it."""
    kill_pids(netns_pids(namespace))
    run(["ip", "netns", "del", namespace], check=False)


def _state_path(name: str, state_dir: Optional[str] = None) -> str:
    return os.path.join(state_dir or STATE_DIR, f"{name}.json")


def down_leftovers(prefix: str, state_dir: Optional[str] = None) -> list[str]:
    """Remove every rack namespace whose rack name starts with ``prefix``, and its state.

    Only names of our layout match (``<name>-sw``, ``<name>-sender``, ``<name>-rK``), so
    other namespaces that happen to share the prefix are left alone.  Returns what it deleted.
    """
    layout = re.compile(rf"^{re.escape(prefix)}[a-z0-9]*-(sw|sender|r\d+)$")
    doomed = [ns for ns in netns_list() if layout.match(ns)]
    # Hosts first, the bridge last: its ports vanish with their peers anyway.
    for namespace in sorted(doomed, key=lambda ns: ns.endswith("-sw")):
        _delete_namespace(namespace)
    directory = state_dir or STATE_DIR
    if os.path.isdir(directory):
        for entry in os.listdir(directory):
            if entry.startswith(prefix) and entry.endswith(".json"):
                os.unlink(os.path.join(directory, entry))
    return doomed


def sweep_stale(state_dir: Optional[str] = None) -> list[str]:
    """Tear down racks whose owning process died without doing it (a killed pytest run).

    Racks without an owner (made by `tools/rack up`) are left alone.  Returns their names.
    """
    directory = state_dir or STATE_DIR
    swept = []
    if not os.path.isdir(directory):
        return swept
    for entry in sorted(os.listdir(directory)):
        if not entry.endswith(".json"):
            continue
        try:
            rack = Rack.load(entry[:-len(".json")], directory)
        except (RackError, ValueError, KeyError, TypeError):
            continue
        owner = rack.state.owner_pid
        if owner is not None and not os.path.exists(f"/proc/{owner}"):
            rack.down()
            swept.append(rack.name)
    return swept


@dataclass
class Host:
    """One machine of the rack: its namespace, address and the bridge port facing it."""

    name: str  # "sender" or "rK"
    namespace: str
    address: str
    port: str  # the veth end in the bridge namespace
    loss_percent: float = 0.0
    partitioned: bool = False
    #: Multicast dropped as it reaches the host (a firewall, or snooping gone wrong):
    #: unicast still flows.
    group_dropped: bool = False
    #: TCP from the host to this address dropped as it leaves (a firewall in between):
    #: a block server that cannot be reached.
    tcp_dropped_to: Optional[str] = None


@dataclass
class RackState:
    """What a rack is and how it is set; saved as JSON so other processes can manage it."""

    name: str
    receivers: int
    rate: Optional[str] = None
    snooping: bool = False
    querier: bool = False
    igmp_version: int = 2
    hosts: dict[str, Host] = field(default_factory=dict)
    #: The process that owns the rack and tears it down (pytest); None for racks made by
    #: `tools/rack up`, which live until `tools/rack down`.  See sweep_stale().
    owner_pid: Optional[int] = None
    buffers: str = ""  # how 16 MiB socket buffers are obtained (see Rack.up)


class Rack:
    """A built (or to be built) rack; use as a context manager so it is always torn down."""

    def __init__(self, name: str, receivers: int, *, rate: Optional[str] = "50mbit",
                 loss: float = 0.0, snooping: bool = False, querier: bool = False,
                 igmp_version: int = 2, owner_pid: Optional[int] = None,
                 state_dir: Optional[str] = None) -> None:
        if not NAME_PATTERN.match(name):
            raise RackError(f"bad rack name {name!r}: 1-12 of a-z0-9, starting with a letter")
        if not 1 <= receivers <= MAX_RECEIVERS:
            raise RackError(f"receivers must be 1..{MAX_RECEIVERS}")
        if rate is not None:
            parse_rate(rate)
        self.state_dir = state_dir or STATE_DIR
        self.state = RackState(name=name, receivers=receivers, rate=rate,
                               snooping=snooping, querier=querier,
                               igmp_version=igmp_version, owner_pid=owner_pid)
        self._initial_loss = loss
        self._lock = threading.Lock()
        self._processes: list[subprocess.Popen] = []
        self._timers: list[threading.Timer] = []
        hosts = [("sender", SENDER_ADDRESS)] + [
            (f"r{k}", str(SUBNET.network_address + 10 + k)) for k in range(1, receivers + 1)]
        for host, address in hosts:
            self.state.hosts[host] = Host(host, f"{name}-{host}", address, f"p-{host}")

    # -- names ----------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.state.name

    @property
    def switch(self) -> str:
        """The namespace holding the bridge."""
        return f"{self.name}-sw"

    @property
    def receivers(self) -> list[str]:
        return [host for host in self.state.hosts if host != "sender"]

    def host(self, host: str) -> Host:
        try:
            return self.state.hosts[host]
        except KeyError:
            raise RackError(f"rack {self.name} has no host {host!r} "
                            f"(sender, r1..r{self.state.receivers})") from None

    def address(self, host: str) -> str:
        return self.host(host).address

    def namespace(self, host: str) -> str:
        return self.host(host).namespace

    def namespaces(self) -> list[str]:
        return [self.switch] + [h.namespace for h in self.state.hosts.values()]

    # -- building and tearing down ---------------------------------------------------------

    def __enter__(self) -> "Rack":
        self.up()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.down()

    def up(self) -> "Rack":
        """Build the rack; if any step fails, remove what was built and raise."""
        existing = set(netns_list())
        clash = [ns for ns in self.namespaces() if ns in existing]
        if clash:
            raise RackError(f"namespace {clash[0]} exists: `tools/rack down --name "
                            f"{self.name}` removes a leftover rack")
        self._save()  # first, so a crash half-way still leaves a record for `down`
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        self._save()
        return self

    def _build(self) -> None:
        for namespace in self.namespaces():
            run(["ip", "netns", "add", namespace])
            # IPv6 off before any link exists: no DAD/MLD/router-solicitation noise.
            self._sh(namespace, "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6; "
                                "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6")
        commands = [f"link add {BRIDGE} type bridge mcast_snooping 0 mcast_querier 0"]
        for host in self.state.hosts.values():
            commands.append(f"link add {host.port} type veth peer name {HOST_IF} "
                            f"netns {host.namespace}")
            commands.append(f"link set {host.port} master {BRIDGE} up")
        commands.append(f"link set {BRIDGE} up")
        commands.append("link set lo up")
        self._ip_batch(self.switch, commands)
        for host in self.state.hosts.values():
            self._ip_batch(host.namespace, [
                "link set lo up",
                f"addr add {host.address}/{SUBNET.prefixlen} brd + dev {HOST_IF}",
                f"link set {HOST_IF} up",
                f"route add 239.0.0.0/8 dev {HOST_IF}",
            ])
        self.state.buffers = self._raise_buffer_limits()
        self.set_snooping(self.state.snooping, None, igmp_version=self.state.igmp_version)
        if self.state.rate is not None:
            self.set_rate(self.state.rate)
        if self._initial_loss:
            for host in self.receivers:
                self.set_loss(host, self._initial_loss)
        if self.state.querier:  # last, so the other steps count towards the settling time
            self.set_snooping(querier=True)

    def _raise_buffer_limits(self) -> str:
        """Try to let plain SO_RCVBUF/SO_SNDBUF reach 16 MiB inside the host namespaces.

        On this kernel the sysctls are per namespace but read-only below the initial one, so
        this usually reports that; root's SO_*BUFFORCE (what mcastdeploy uses) works anyway.
        """
        wanted = 16 * 1024 * 1024
        refused = 0
        for host in self.state.hosts.values():
            # Read the values back rather than trusting the writes' status.
            result = run(["ip", "netns", "exec", host.namespace, "sh", "-c",
                          f"for v in rmem_max wmem_max; do echo {wanted} "
                          "> /proc/sys/net/core/$v; done 2>/dev/null; "
                          "cat /proc/sys/net/core/rmem_max /proc/sys/net/core/wmem_max"],
                         check=False)
            values = [int(v) for v in result.stdout.split() if v.isdigit()]
            refused += len(values) != 2 or min(values) < wanted
        if refused:
            return "sysctl refused in namespaces; SO_RCVBUFFORCE/SO_SNDBUFFORCE (root) needed"
        return "net.core.rmem_max/wmem_max raised to 16 MiB in every host namespace"

    def down(self) -> None:
        """Kill every process we started, remove every namespace and the state file.

        Safe to call twice and on a half-built rack; namespaces named NAME-* are removed
        even if this object never recorded them (a crashed earlier run of the same name).
        """
        with self._lock:
            timers, self._timers = self._timers, []
        for timer in timers:
            timer.cancel()
        processes, self._processes = self._processes, []
        running = [p for p in processes if p.poll() is None]
        for process in running:  # through Popen, so their exit statuses stay readable
            process.terminate()
        deadline = time.monotonic() + 2.0
        for process in running:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                try:
                    process.wait(timeout=2.0)
                except subprocess.TimeoutExpired:
                    pass  # unkillable; its namespace is deleted below regardless
        layout = re.compile(rf"^{re.escape(self.name)}-(sw|sender|r\d+)$")
        known = set(self.namespaces())
        for namespace in sorted((ns for ns in netns_list() if ns in known or layout.match(ns)),
                                key=lambda ns: ns.endswith("-sw")):
            _delete_namespace(namespace)
        try:
            os.unlink(_state_path(self.name, self.state_dir))
        except FileNotFoundError:
            pass

    # -- state file ------------------------------------------------------------------------

    def _save(self) -> None:
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        path = _state_path(self.name, self.state_dir)
        temporary = f"{path}.{os.getpid()}"
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(asdict(self.state), handle, indent=2)  # hosts in rack order
        os.replace(temporary, path)

    @classmethod
    def load(cls, name: str, state_dir: Optional[str] = None) -> "Rack":
        """The rack another process built, from its state file."""
        path = _state_path(name, state_dir)
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except FileNotFoundError:
            raise RackError(f"no rack {name!r} (no {path})") from None
        rack = cls(data["name"], data["receivers"], rate=data["rate"],
                   snooping=data["snooping"], querier=data["querier"],
                   igmp_version=data.get("igmp_version", 2),
                   owner_pid=data.get("owner_pid"), state_dir=state_dir)
        rack.state.hosts = {key: Host(**value) for key, value in data["hosts"].items()}
        rack.state.buffers = data.get("buffers", "")
        return rack

    # -- running things inside -------------------------------------------------------------

    def exec(self, host: str, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen:
        """Start ``argv`` inside ``host``'s namespace; the rack kills it (by PID) on down().

        `ip netns exec` execs the command, so the Popen's PID is the command's own PID.
        ``host`` may also be "switch" for the bridge's namespace.
        """
        namespace = self.switch if host == "switch" else self.namespace(host)
        process = subprocess.Popen(["ip", "netns", "exec", namespace, *argv], **popen_kwargs)
        self._processes.append(process)
        return process

    def run(self, host: str, argv: Sequence[str], timeout: float = COMMAND_TIMEOUT,
            check: bool = True) -> subprocess.CompletedProcess:
        """Run a short command inside ``host``'s namespace (or "switch") and wait for it."""
        namespace = self.switch if host == "switch" else self.namespace(host)
        return run(["ip", "netns", "exec", namespace, *argv], timeout=timeout, check=check)

    def _sh(self, namespace: str, script: str) -> None:
        run(["ip", "netns", "exec", namespace, "sh", "-c", script])

    def _ip_batch(self, namespace: str, commands: Sequence[str]) -> None:
        """One `ip` process per namespace instead of one per command: builds stay fast."""
        run(["ip", "-n", namespace, "-batch", "-"], input="\n".join(commands) + "\n")

    # -- rate caps -------------------------------------------------------------------------

    def set_rate(self, rate: Optional[str], latency_ms: int = 50) -> None:
        """Cap every link, both directions, with tbf; None removes the caps.

        Both veth ends get a qdisc: the host's eth0 caps what the host sends, the bridge
        port caps what the bridge delivers to that host (multicast clones included).
        """
        devices = [(self.switch, h.port) for h in self.state.hosts.values()] + [
            (h.namespace, HOST_IF) for h in self.state.hosts.values()]
        if rate is None:
            for namespace, device in devices:
                run(["tc", "-n", namespace, "qdisc", "del", "dev", device, "root"], check=False)
        else:
            bps = parse_rate(rate)
            # tbf needs a bucket of at least rate/HZ; 10 ms of traffic (>= 64 KiB) is ample.
            burst = max(64 * 1024, bps // 8 // 100)
            for namespace, device in devices:
                run(["tc", "-n", namespace, "qdisc", "replace", "dev", device, "root", "tbf",
                     "rate", str(bps), "burst", str(burst), "latency", f"{latency_ms}ms"])
        self.state.rate = rate
        self._save()

    # -- loss and partitions ---------------------------------------------------------------

    def set_loss(self, host: str, percent: float) -> None:
        """Drop ``percent`` % of what arrives at ``host``'s eth0, at random (resolution 0.01 %).

        Takes effect at once (one atomic nft transaction); the table's counters restart.
        """
        if not 0 <= percent <= 100:
            raise RackError(f"loss {percent} % is not in 0..100")
        with self._lock:
            self.host(host).loss_percent = float(percent)
            self._apply_filters(host)
            self._save()

    def loss(self, host: str) -> float:
        return self.host(host).loss_percent

    def partition(self, host: str, on: bool = True) -> None:
        """Cut ``host`` off (drop everything in and out of its eth0), or reconnect it.

        Reconnecting also flushes every host's ARP cache: an address first resolved while
        the host was cut off stays FAILED for seconds, and unicast (NACKs) would not flow.
        """
        with self._lock:
            self.host(host).partitioned = on
            self._apply_filters(host)
            self._save()
        if not on:
            for entry in self.state.hosts.values():
                run(["ip", "-n", entry.namespace, "neigh", "flush", "dev", HOST_IF],
                    check=False)

    def drop_group(self, host: str, on: bool = True) -> None:
        """Drop every multicast datagram arriving at ``host`` (224.0.0.0/4), or stop."""
        with self._lock:
            self.host(host).group_dropped = on
            self._apply_filters(host)
            self._save()

    def drop_tcp_to(self, host: str, address: Optional[str]) -> None:
        """Drop every TCP segment ``host`` sends to ``address`` (None: stop)."""
        with self._lock:
            self.host(host).tcp_dropped_to = address
            self._apply_filters(host)
            self._save()

    def _apply_filters(self, host: str) -> None:
        entry = self.host(host)
        hundredths = round(entry.loss_percent * 100)
        lines = [f"table netdev {NFT_TABLE} {{",
                 f'  chain ingress {{ type filter hook ingress device "{HOST_IF}" priority -500;'
                 " policy accept; }",
                 f'  chain egress {{ type filter hook egress device "{HOST_IF}" priority -500;'
                 " policy accept; }",
                 "}",
                 f"flush chain netdev {NFT_TABLE} ingress",
                 f"flush chain netdev {NFT_TABLE} egress",
                 # Counts everything that reaches eth0, so loss can be checked afterwards.
                 f'add rule netdev {NFT_TABLE} ingress counter comment "seen"']
        if entry.partitioned:
            lines += [f'add rule netdev {NFT_TABLE} ingress counter drop comment "partition"',
                      f'add rule netdev {NFT_TABLE} egress counter drop comment "partition"']
        if entry.group_dropped:
            lines.append(f"add rule netdev {NFT_TABLE} ingress ip daddr 224.0.0.0/4 counter "
                         'drop comment "group"')
        if entry.tcp_dropped_to:
            lines.append(f"add rule netdev {NFT_TABLE} egress ip daddr {entry.tcp_dropped_to} "
                         'ip protocol tcp counter drop comment "tcp"')
        if hundredths >= 10000:
            lines.append(f'add rule netdev {NFT_TABLE} ingress counter drop comment "loss"')
        elif hundredths > 0:
            lines.append(f"add rule netdev {NFT_TABLE} ingress numgen random mod 10000 < "
                         f'{hundredths} counter drop comment "loss"')
        run(["ip", "netns", "exec", entry.namespace, "nft", "-f", "-"],
            input="\n".join(lines) + "\n")

    def counters(self, host: str) -> dict[str, int]:
        """Packets counted by the host's filter rules: seen, loss, partition, group (0 if
        none)."""
        result = self.run(host, ["nft", "-j", "list", "table", "netdev", NFT_TABLE],
                          check=False)
        found = {"seen": 0, "loss": 0, "partition": 0, "group": 0}
        if result.returncode != 0:
            return found
        for item in json.loads(result.stdout).get("nftables", []):
            rule = item.get("rule")
            if not rule or rule.get("chain") != "ingress":
                continue
            for expr in rule.get("expr", []):
                if "counter" in expr and rule.get("comment") in found:
                    found[rule["comment"]] += expr["counter"]["packets"]
        return found

    def loss_burst(self, host: str, percent: float, seconds: float,
                   after: float = 0.0) -> "LossBurst":
        """Raise ``host``'s loss to ``percent`` after ``after`` s, for ``seconds``, then back.

        Runs on threading.Timer threads (daemon); bounded by MAX_BURST_SECONDS; down()
        cancels what has not fired.  Returns a handle to cancel early or wait for the end.
        """
        if seconds <= 0 or after < 0 or after + seconds > MAX_BURST_SECONDS:
            raise RackError(f"a burst must end within {MAX_BURST_SECONDS:g} s")
        burst = LossBurst(self, host, percent)
        start = threading.Timer(after, burst.begin)
        stop = threading.Timer(after + seconds, burst.end)
        burst.timers = [start, stop]
        with self._lock:
            self._timers += burst.timers
        for timer in burst.timers:
            timer.daemon = True
            timer.start()
        return burst

    # -- snooping --------------------------------------------------------------------------

    def set_snooping(self, snooping: Optional[bool] = None, querier: Optional[bool] = None,
                     *, query_response_ms: Optional[int] = 1000,
                     igmp_version: Optional[int] = None, settle: bool = True) -> None:
        """Switch the bridge's IGMP snooping and querier (sysfs, in the bridge namespace).

        Turning the querier on starts a settling period of one query response interval
        (10 s by kernel default; ``query_response_ms`` makes it 1 s here): until it ends
        the bridge still floods unregistered groups, and -- seen on this kernel with the
        default IGMPv2 querier -- receivers that join during it may be missing from the
        bridge's multicast database afterwards (2 to 4 of 8 ports recorded), so they never
        get the group.  ``settle`` therefore waits it out before returning; with
        ``igmp_version=3`` the loss of joins was not seen.
        """
        base = f"/sys/class/net/{BRIDGE}/bridge"
        writes = []
        if query_response_ms is not None:  # sysfs takes centiseconds
            writes.append(("multicast_query_response_interval",
                           str(max(1, query_response_ms // 10))))
        if igmp_version is not None:
            if igmp_version not in (2, 3):
                raise RackError("igmp_version is 2 or 3")
            writes.append(("multicast_igmp_version", str(igmp_version)))
            self.state.igmp_version = igmp_version
        if snooping is not None:
            writes.append(("multicast_snooping", str(int(snooping))))
            self.state.snooping = snooping
        if querier is not None:
            writes.append(("multicast_querier", str(int(querier))))
            self.state.querier = querier
        if writes:
            self._sh(self.switch, "set -e; " + "; ".join(
                f"echo {value} > {base}/{knob}" for knob, value in writes))
        self._save()
        if querier and settle:
            interval = self.bridge_settings()["multicast_query_response_interval"] / 100
            time.sleep(min(interval * 1.2 + 0.1, 15.0))

    def bridge_settings(self) -> dict[str, int]:
        """The bridge's snooping knobs as the kernel reports them (from sysfs)."""
        names = ("multicast_snooping", "multicast_querier", "multicast_query_response_interval",
                 "multicast_igmp_version")
        out = self.run("switch", ["cat"] + [f"/sys/class/net/{BRIDGE}/bridge/{n}"
                                            for n in names]).stdout.split()
        return dict(zip(names, (int(v) for v in out)))

    def mdb(self) -> list[dict]:
        """The bridge's multicast database: which port joined which group."""
        out = run(["bridge", "-n", self.switch, "-j", "mdb", "show"]).stdout
        entries: list[dict] = []
        for item in json.loads(out or "[]"):
            entries += item.get("mdb", [])
        return entries

    def joined_groups(self, host: str) -> set[str]:
        """IPv4 groups some socket in ``host`` has joined on eth0 (from /proc/net/igmp)."""
        groups: set[str] = set()
        device = None
        for line in self.run(host, ["cat", "/proc/net/igmp"]).stdout.splitlines()[1:]:
            words = line.split()
            if not line.startswith(("\t", " ")) and len(words) > 1:
                device = words[1].rstrip(":")
            elif device == HOST_IF and words:
                # the group is little-endian hex, as the kernel prints a __be32 in host order
                groups.add(str(ipaddress.IPv4Address(bytes.fromhex(words[0])[::-1])))
        return groups

    def wait_joined(self, hosts: Sequence[str], group: str, timeout: float = 10.0) -> None:
        """Wait (bounded) until each host has joined ``group``: receivers are ready."""
        deadline = time.monotonic() + timeout
        pending = list(hosts)
        while pending:
            pending = [h for h in pending if group not in self.joined_groups(h)]
            if not pending:
                return
            if time.monotonic() >= deadline:
                raise RackError(f"{', '.join(pending)} did not join {group} in {timeout:g} s")
            time.sleep(0.05)

    def link_stats(self, host: str) -> dict[str, int]:
        """rx/tx packet counts of ``host``'s eth0 (before the nft ingress filter drops)."""
        out = run(["ip", "-n", self.namespace(host), "-s", "-j", "link", "show", HOST_IF]).stdout
        stats = json.loads(out)[0]["stats64"]
        return {"rx_packets": stats["rx"]["packets"], "tx_packets": stats["tx"]["packets"]}

    def status(self) -> dict[str, Any]:
        """Everything `tools/rack status` prints: settings, hosts, counters, joins."""
        present = set(netns_list())
        hosts = {}
        for name, host in self.state.hosts.items():
            record: dict[str, Any] = {"namespace": host.namespace, "address": host.address,
                                      "present": host.namespace in present}
            if host.namespace in present:
                record.update(loss_percent=host.loss_percent, partitioned=host.partitioned,
                              **self.link_stats(name))
                if name != "sender":
                    record["filter"] = self.counters(name)
            hosts[name] = record
        report: dict[str, Any] = {"name": self.name, "rate": self.state.rate,
                                  "buffers": self.state.buffers, "hosts": hosts,
                                  "switch_present": self.switch in present}
        if self.switch in present:
            report["bridge"] = self.bridge_settings()
            report["mdb"] = self.mdb()
        return report


class LossBurst:
    """A scheduled window of heavy loss on one host; see :meth:`Rack.loss_burst`."""

    def __init__(self, rack: Rack, host: str, percent: float) -> None:
        self.rack = rack
        self.host = host
        self.percent = percent
        self.previous: Optional[float] = None
        self.timers: list[threading.Timer] = []
        self.began: Optional[float] = None
        self.ended: Optional[float] = None
        self.error: Optional[RackError] = None
        self._done = threading.Event()

    def begin(self) -> None:
        try:
            self.previous = self.rack.loss(self.host)
            self.rack.set_loss(self.host, self.percent)
            self.began = time.monotonic()
        except RackError as error:  # the rack went down under us; nothing left to change
            self.error = error

    def end(self) -> None:
        try:
            if self.previous is not None:
                self.rack.set_loss(self.host, self.previous)
        except RackError as error:
            self.error = error
        finally:
            self.ended = time.monotonic()
            self._done.set()

    def cancel(self) -> None:
        """Stop the burst now; loss goes back to what it was if the burst had begun."""
        for timer in self.timers:
            timer.cancel()
        if not self._done.is_set():
            self.end()

    def wait(self, timeout: float) -> bool:
        """Wait (bounded) until the burst is over; True if it is."""
        return self._done.wait(timeout)
