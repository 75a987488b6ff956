"""The contestants of tools/race: how each tool is started in a rack, timed and checked.

Every tool runs the same way: receivers first (each in its own namespace, writing to
tmpfs), a wait until each of them listens, then the sender; the clock starts when the
sender is started, and a receiver is done when its process exits (uftpd never exits, so
for it the log line "File transfer complete").  Nothing waits without a deadline: what
overstays is killed by PID and the run counts as failed.  Every copy's SHA-256 is checked
by this process, never taken from the tool's word.

CPU seconds come from ``os.wait4`` (user + system time of the process and of any child it
reaped).  ``ip netns exec`` execs the command, so the PID we wait for is the tool's own.
Kernel work done in a process's system calls (for a multicast sender: the bridge cloning
each datagram to every port) is charged to that process; work in softirq context outside
any process shows up only in the machine-wide shares that :class:`CpuSampler` records.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from rackbed import Rack, RackError

#: How long receivers may take to start listening (32 Python receivers on 2 cores: ~10 s).
READY_TIMEOUT = 90.0
#: A sender may outlive its last receiver by this much (mcastdeploy lingers, uftp confirms).
SENDER_GRACE = 20.0
#: SIGTERM first, SIGKILL after this (udp-sender ignores SIGTERM).
KILL_GRACE = 2.0
POLL = 0.01
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
UFTP_PORT = 1044
UDPCAST_PORT = 9000
HTTP_PORT = 8000
UFTP_PUBLIC_GROUP = "239.4.4.1"
UFTP_PRIVATE_GROUP = "239.5.5.1"


class RaceError(RuntimeError):
    """A run could not be set up at all (as opposed to a tool failing, which is a result)."""


# -- processes ------------------------------------------------------------------------------


class Proc:
    """One process in a rack host: start time, end time, exit code and CPU seconds.

    A daemon thread blocks in ``os.wait4`` so the end time is exact and the rusage is
    the process's own; ``on_line`` (if given) sees every stderr line with its arrival
    time, for tools that report completion in a log rather than by exiting.
    """

    def __init__(self, rack: Rack, host: str, argv: Sequence[str], label: str, log: str,
                 on_line: Optional[Callable[[str, float], None]] = None,
                 env: Optional[dict[str, str]] = None) -> None:
        self.host = host
        self.label = label
        self.log = log
        self.ended: Optional[float] = None
        self.exit_code: Optional[int] = None
        self.cpu_s: Optional[float] = None
        self.user_s: Optional[float] = None
        self.sys_s: Optional[float] = None
        self.done_at: Optional[float] = None  # set by a log line, for daemons
        self._log_handle = open(log, "w", encoding="utf-8", errors="replace")
        self._readers: list[threading.Thread] = []
        stderr = subprocess.PIPE if on_line else subprocess.STDOUT
        self.started = time.monotonic()
        try:
            self.popen = rack.exec(host, list(argv), stdin=subprocess.DEVNULL,
                                   stdout=self._log_handle, stderr=stderr, env=env)
        except OSError as error:
            self._log_handle.close()
            raise RaceError(f"cannot start {argv[0]}: {error.strerror}") from None
        self.pid = self.popen.pid
        if on_line is not None:
            reader = threading.Thread(target=self._read_lines, args=(on_line,), daemon=True)
            reader.start()
            self._readers.append(reader)
        self._waiter = threading.Thread(target=self._wait, daemon=True)
        self._waiter.start()

    def _read_lines(self, on_line: Callable[[str, float], None]) -> None:
        assert self.popen.stderr is not None
        for raw in self.popen.stderr:
            line = raw.decode("utf-8", "replace")
            on_line(line, time.monotonic())
            try:
                self._log_handle.write(line)
            except ValueError:  # closed by stop() after its grace: the line is not needed
                pass

    def _wait(self) -> None:
        try:
            _, status, usage = os.wait4(self.pid, 0)
        except ChildProcessError:  # reaped elsewhere (rack.down in an emergency)
            self.ended = time.monotonic()
            self.exit_code = -1
            self.cpu_s = self.user_s = self.sys_s = 0.0
            return
        self.user_s, self.sys_s = usage.ru_utime, usage.ru_stime
        self.cpu_s = usage.ru_utime + usage.ru_stime
        self.exit_code = os.waitstatus_to_exitcode(status)
        self.popen.returncode = self.exit_code  # so Popen never waits for it again
        self.ended = time.monotonic()

    @property
    def running(self) -> bool:
        return self.ended is None

    def stop(self, grace: float = KILL_GRACE) -> None:
        """SIGTERM, then SIGKILL after ``grace`` s; returns once the process is reaped."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            if not self.running:
                break
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass
            self._waiter.join(wait)
        for reader in self._readers:
            reader.join(1.0)
        self._log_handle.close()

    def tail(self, chars: int = 300) -> str:
        """The end of the process's output, on one line, for failure messages."""
        if not self._log_handle.closed:
            self._log_handle.flush()
        try:
            with open(self.log, encoding="utf-8", errors="replace") as handle:
                text = handle.read()
        except OSError:
            return ""
        return " ".join(text.replace("\r", "\n").split())[-chars:]


def stop_all(procs: Sequence[Proc]) -> None:
    """Stop every process still running: all get SIGTERM at once, then SIGKILL together."""
    alive = [p for p in procs if p.running]
    for proc in alive:
        try:
            os.kill(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + KILL_GRACE
    while any(p.running for p in alive) and time.monotonic() < deadline:
        time.sleep(POLL)
    for proc in procs:
        proc.stop(grace=0.0)


# -- readiness from /proc/PID/net (the PID's own namespace) ----------------------------------


def udp_ports(pid: int) -> set[int]:
    """Local UDP ports bound in ``pid``'s network namespace."""
    return _ports(f"/proc/{pid}/net/udp", state=None)


def tcp_listening(pid: int) -> set[int]:
    """TCP ports listening in ``pid``'s network namespace."""
    return _ports(f"/proc/{pid}/net/tcp", state="0A")


def _ports(path: str, state: Optional[str]) -> set[int]:
    try:
        with open(path, encoding="ascii") as handle:
            lines = handle.read().splitlines()[1:]
    except OSError:
        return set()
    ports = set()
    for line in lines:
        words = line.split()
        if len(words) > 3 and (state is None or words[3] == state):
            ports.add(int(words[1].rsplit(":", 1)[1], 16))
    return ports


def igmp_groups(pid: int) -> set[str]:
    """IPv4 groups joined on eth0 in ``pid``'s network namespace (like Rack.joined_groups)."""
    try:
        with open(f"/proc/{pid}/net/igmp", encoding="ascii") as handle:
            lines = handle.read().splitlines()[1:]
    except OSError:
        return set()
    groups: set[str] = set()
    device = None
    for line in lines:
        words = line.split()
        if not line.startswith(("\t", " ")) and len(words) > 1:
            device = words[1].rstrip(":")
        elif device == "eth0" and words:
            groups.add(str(ipaddress.IPv4Address(bytes.fromhex(words[0])[::-1])))
    return groups


def wait_ready(procs: Sequence[Proc], ready: Callable[[Proc], bool], what: str,
               timeout: float = READY_TIMEOUT) -> None:
    """Wait (bounded) until ``ready(p)`` for every process; raise ToolFailed if not."""
    deadline = time.monotonic() + timeout
    pending = list(procs)
    while pending:
        dead = [p for p in pending if not p.running]
        if dead:
            raise ToolFailed(f"{dead[0].host}: {dead[0].label} exited {dead[0].exit_code} "
                             f"before it {what}: {dead[0].tail()}")
        pending = [p for p in pending if not ready(p)]
        if not pending:
            return
        if time.monotonic() > deadline:
            raise ToolFailed(f"{', '.join(p.host for p in pending)} never {what} "
                             f"in {timeout:g} s")
        time.sleep(0.02)


class ToolFailed(Exception):
    """The tool under test failed in a way that ends its run early (counted as FAIL)."""


# -- CPU sampling ---------------------------------------------------------------------------


@dataclass
class _Series:
    samples: list[tuple[float, int]] = field(default_factory=list)


class CpuSampler:
    """Samples the machine's CPU shares and watched processes' CPU ticks every 0.25 s.

    Why: rusage gives each process's total, but "what bounds the run" needs rates -- is a
    process at 100 % of one core, are both cores busy, how much goes to softirq (bridge
    cloning and delivery that no process is charged for).
    """

    INTERVAL = 0.25
    WINDOW = 1.0  # peak rates are averaged over this much time

    def __init__(self) -> None:
        self._series: dict[int, _Series] = {}
        self._machine: list[tuple[float, list[int]]] = []
        #: Cumulative CPU ticks of processes that are not ours (other people's test runs
        #: on a shared machine), so a run can wait for quiet and report what it shared.
        self._foreign: list[tuple[float, int]] = []
        self._foreign_seen: dict[int, int] = {}
        self._foreign_total = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "CpuSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2.0)

    def watch(self, pid: int) -> None:
        with self._lock:
            self._series.setdefault(pid, _Series())

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            machine = _machine_ticks()
            with self._lock:
                if machine:
                    self._machine.append((now, machine))
                for pid, series in self._series.items():
                    ticks = _process_ticks(pid)
                    if ticks is not None:
                        series.samples.append((now, ticks))
                watched = set(self._series)
            foreign = self._scan_foreign(watched)
            with self._lock:
                self._foreign.append((now, foreign))
            self._stop.wait(self.INTERVAL)

    def _scan_foreign(self, watched: set[int]) -> int:
        """Add up CPU ticks of every user-space process that is neither us nor ours."""
        me = os.getpid()
        seen: dict[int, int] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            if pid == me or pid in watched:
                continue
            stat = _process_stat(pid)
            if stat is None:
                continue
            ppid, ticks = stat
            if pid == 2 or ppid in (2, me):  # kernel threads; our own short commands
                continue
            seen[pid] = ticks
            # A process first seen after the start counts from zero: it is new.
            self._foreign_total += ticks - self._foreign_seen.get(
                pid, ticks if not self._foreign else 0)
        self._foreign_seen = seen
        return self._foreign_total

    def foreign_share(self, start: float, end: float) -> float:
        """Share of all cores that other people's processes used between two times."""
        with self._lock:
            inside = [(t, v) for t, v in self._foreign
                      if start - self.INTERVAL <= t <= end + self.INTERVAL]
        if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
            return 0.0
        seconds = inside[-1][0] - inside[0][0]
        return (inside[-1][1] - inside[0][1]) / CLOCK_TICKS / seconds / (os.cpu_count() or 1)

    def wait_quiet(self, limit: float, share: float = 0.1, window: float = 2.0) -> float:
        """Wait (at most ``limit`` s) until others used < ``share`` of the cores for
        ``window`` s; returns the seconds waited.  Others' test runs would skew the race."""
        started = time.monotonic()
        if limit <= 0:
            return 0.0
        time.sleep(window)
        while time.monotonic() - started < limit:
            now = time.monotonic()
            if self.foreign_share(now - window, now) < share:
                break
            time.sleep(0.5)
        return time.monotonic() - started

    def peak_core(self, pid: int) -> float:
        """Highest share of one core ``pid`` used over any WINDOW-long stretch (0 if unknown)."""
        with self._lock:
            samples = list(self._series.get(pid, _Series()).samples)
        best = 0.0
        j = 0
        for i, (t, ticks) in enumerate(samples):
            while j < i and t - samples[j][0] > self.WINDOW + self.INTERVAL / 2:
                j += 1
            if j < i and t - samples[j][0] >= self.WINDOW - self.INTERVAL / 2:
                best = max(best, (ticks - samples[j][1]) / CLOCK_TICKS / (t - samples[j][0]))
        return best

    def machine_shares(self, start: float, end: float) -> dict[str, float]:
        """Shares of all cores between two times: busy (not idle/iowait), softirq, system."""
        with self._lock:
            inside = [(t, v) for t, v in self._machine if start - self.INTERVAL <= t <= end
                      + self.INTERVAL]
        if len(inside) < 2:
            return {"busy": 0.0, "softirq": 0.0, "system": 0.0}
        first, last = inside[0][1], inside[-1][1]
        delta = [b - a for a, b in zip(first, last)]
        total = sum(delta[:8]) or 1
        idle = delta[3] + delta[4]
        return {"busy": 1 - idle / total, "softirq": delta[6] / total,
                "system": (delta[2] + delta[5]) / total}


def _machine_ticks() -> list[int]:
    try:
        with open("/proc/stat", encoding="ascii") as handle:
            words = handle.readline().split()
    except OSError:
        return []
    return [int(w) for w in words[1:9]]


def _process_ticks(pid: int) -> Optional[int]:
    stat = _process_stat(pid)
    return None if stat is None else stat[1]


def _process_stat(pid: int) -> Optional[tuple[int, int]]:
    """(parent PID, utime + stime in clock ticks) of a process, from /proc/PID/stat."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return int(fields[1]), int(fields[11]) + int(fields[12])  # ppid, utime, stime
    except (OSError, IndexError, ValueError):
        return None


# -- one run of one tool --------------------------------------------------------------------


@dataclass
class Stage:
    """What every tool is given: the rack, the image, where to write, how long it may take."""

    rack: Rack
    hosts: list[str]
    image: str
    sha256: str
    size: int
    workdir: str
    deadline: float  # seconds from the sender's start
    sampler: CpuSampler
    cell: str = "run"  # names the logs' folder, so a later run never overwrites them

    def target_dir(self, tool: str, host: str) -> str:
        path = os.path.join(self.workdir, tool, host)
        os.makedirs(path, exist_ok=True)
        return path

    def log(self, tool: str, name: str) -> str:
        directory = os.path.join(self.workdir, "logs", self.cell, tool)
        os.makedirs(directory, exist_ok=True)
        return os.path.join(directory, f"{name}.log")


@dataclass
class ToolRun:
    """The measured outcome of one tool in one cell and run."""

    tool: str
    ok: bool
    failure: str
    wall_s: Optional[float]
    receiver_s: dict[str, Optional[float]]
    verified: dict[str, bool]
    sender_cpu_s: Optional[float]
    sender_sys_s: Optional[float]  # kernel time in its system calls (bridge cloning)
    receiver_cpu_s: dict[str, Optional[float]]
    receiver_sys_s: dict[str, Optional[float]]
    receiver_startup_cpu_s: dict[str, float]
    sender_peak_core: float
    receiver_peak_core: float
    machine: dict[str, float]
    details: dict[str, object] = field(default_factory=dict)


class Tool:
    """A contestant: subclasses start receivers and a sender; this class does the rest."""

    name = "tool"

    def __init__(self, label: Optional[str] = None) -> None:
        self.label = label or self.name
        #: CPU seconds each receiver had used when the sender started (interpreter start,
        #: imports, joining): part of its total, but not of the transfer.
        self.startup_cpu: dict[str, float] = {}

    # What subclasses provide --------------------------------------------------------------

    def start_receivers(self, stage: Stage) -> dict[str, Proc]:
        raise NotImplementedError

    def start_sender(self, stage: Stage, receivers: dict[str, Proc]) -> Proc:
        raise NotImplementedError

    def target(self, stage: Stage, host: str) -> str:
        """Where ``host``'s copy ends up."""
        return os.path.join(stage.target_dir(self.label, host), "image.raw")

    def receiver_done(self, proc: Proc) -> Optional[float]:
        """When this receiver finished (exit 0 by default), or None."""
        return proc.ended if proc.ended is not None and proc.exit_code == 0 else None

    def receiver_failed(self, proc: Proc) -> Optional[str]:
        """Why a receiver has failed already, or None while it may still succeed."""
        if proc.ended is not None and proc.exit_code != 0:
            return f"{proc.host} exited {proc.exit_code}: {proc.tail(200)}"
        return None

    def sender_is_daemon(self) -> bool:
        """True when the sender serves until stopped (HTTP), rather than exiting when done."""
        return False

    def details(self, stage: Stage, sender: Proc, receivers: dict[str, Proc]) -> dict:
        return {}

    # The run ----------------------------------------------------------------------------

    def run(self, stage: Stage) -> ToolRun:
        procs: list[Proc] = []
        receivers: dict[str, Proc] = {}
        sender: Optional[Proc] = None
        failure = ""
        self.startup_cpu = {}
        try:
            receivers = self.start_receivers(stage)
            procs += receivers.values()
            for proc in receivers.values():
                stage.sampler.watch(proc.pid)
            sender = self.start_sender(stage, receivers)
            self.startup_cpu = {h: (_process_ticks(p.pid) or 0) / CLOCK_TICKS
                                for h, p in receivers.items()}
            procs.append(sender)
            stage.sampler.watch(sender.pid)
            failure = self._wait(stage, sender, receivers)
        except ToolFailed as error:
            failure = str(error)
        finally:
            end = time.monotonic()
            stop_all(procs)
        return self._result(stage, sender, receivers, failure, end)

    def _wait(self, stage: Stage, sender: Proc, receivers: dict[str, Proc]) -> str:
        """Wait (bounded) for every receiver, then the sender; '' or why the run failed."""
        deadline = sender.started + stage.deadline
        while True:
            failed = [why for p in receivers.values() if (why := self.receiver_failed(p))]
            if failed:
                return failed[0]
            pending = [h for h, p in receivers.items() if self.receiver_done(p) is None]
            if not pending:
                break
            if not self.sender_is_daemon() and not sender.running and sender.exit_code != 0:
                return f"sender exited {sender.exit_code}: {sender.tail(200)}"
            if time.monotonic() > deadline:
                return (f"stall: {len(pending)} of {len(receivers)} receivers unfinished "
                        f"after {stage.deadline:g} s")
            time.sleep(POLL)
        if self.sender_is_daemon():
            return ""
        grace = time.monotonic() + SENDER_GRACE
        while sender.running and time.monotonic() < grace:
            time.sleep(POLL)
        if sender.running:
            return f"sender still running {SENDER_GRACE:g} s after the last receiver"
        if sender.exit_code != 0:
            return f"sender exited {sender.exit_code}: {sender.tail(200)}"
        return ""

    def _result(self, stage: Stage, sender: Optional[Proc], receivers: dict[str, Proc],
                failure: str, end: float) -> ToolRun:
        start = sender.started if sender else end
        times: dict[str, Optional[float]] = {}
        verified: dict[str, bool] = {}
        for host in stage.hosts:
            proc = receivers.get(host)
            done = self.receiver_done(proc) if proc else None
            times[host] = None if done is None else done - start
            verified[host] = _sha256(self.target(stage, host)) == stage.sha256
        if not failure and not all(verified.values()):
            bad = [h for h, good in verified.items() if not good]
            failure = f"wrong or missing copy on {', '.join(bad)}"
        ok = not failure
        finished = [t for t in times.values() if t is not None]
        last = max(finished) if ok and finished else None
        details = self.details(stage, sender, receivers) if sender else {}
        return ToolRun(
            tool=self.label, ok=ok, failure=failure, wall_s=last, receiver_s=times,
            verified=verified, sender_cpu_s=sender.cpu_s if sender else None,
            sender_sys_s=sender.sys_s if sender else None,
            receiver_cpu_s={h: p.cpu_s for h, p in receivers.items()},
            receiver_sys_s={h: p.sys_s for h, p in receivers.items()},
            receiver_startup_cpu_s=dict(self.startup_cpu),
            sender_peak_core=stage.sampler.peak_core(sender.pid) if sender else 0.0,
            receiver_peak_core=max((stage.sampler.peak_core(p.pid)
                                    for p in receivers.values()), default=0.0),
            machine=dict(stage.sampler.machine_shares(start, start + last if last else end),
                         foreign=stage.sampler.foreign_share(start,
                                                             start + last if last else end)),
            details=details)


def _sha256(path: str) -> Optional[str]:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(4 << 20):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


# -- the contestants ------------------------------------------------------------------------


class McastDeploy(Tool):
    """mcastdeploy's own CLI, started as tests/test_rack.py's Transfer does."""

    name = "mcastdeploy"

    def __init__(self, rate: str, label: Optional[str] = None,
                 proactive: Optional[str] = None) -> None:
        super().__init__(label)
        self.rate = rate
        self.proactive = proactive
        self.group = ""
        self.spec = ""

    def _cli(self) -> list[str]:
        return [sys.executable, "-m", "mcastdeploy"]

    def start_receivers(self, stage: Stage) -> dict[str, Proc]:
        self.spec = os.path.join(stage.workdir, f"{self.label}.session.json")
        extra = ["--proactive-repair", self.proactive] if self.proactive else []
        result = subprocess.run([*self._cli(), "session", "new", "--interface", "eth0",
                                 "--rate", self.rate, *extra, "-o", self.spec],
                                capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise RaceError(f"mcastdeploy session new: {result.stderr.strip()[-300:]}")
        with open(self.spec, encoding="utf-8") as handle:
            self.group = json.load(handle)["group"]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        procs = {host: Proc(stage.rack, host,
                            [*self._cli(), "recv", "--session", self.spec, "--json",
                             "--progress", "none", "--timeout", "60",
                             self.target(stage, host)],
                            "mcastdeploy recv", stage.log(self.label, host), env=env)
                 for host in stage.hosts}
        wait_ready(list(procs.values()), lambda p: self.group in igmp_groups(p.pid),
                   f"joined {self.group}")
        return procs

    def start_sender(self, stage: Stage, receivers: dict[str, Proc]) -> Proc:
        return Proc(stage.rack, "sender",
                    [*self._cli(), "send", "--session", self.spec, "--min-receivers",
                     str(len(receivers)), "--wait", "60", "--json", "--progress", "none",
                     stage.image],
                    "mcastdeploy send", stage.log(self.label, "sender"),
                    env=dict(os.environ, PYTHONUNBUFFERED="1"))

    def receiver_failed(self, proc: Proc) -> Optional[str]:
        why = super().receiver_failed(proc)
        if why is None and proc.ended is not None:
            summary = _last_json(proc.log)
            if not summary.get("ok"):
                return f"{proc.host}: summary says {summary.get('reason', 'nothing')}"
        return why

    def details(self, stage: Stage, sender: Proc, receivers: dict[str, Proc]) -> dict:
        sent = _last_json(sender.log)
        got = [_last_json(p.log) for p in receivers.values()]
        return {
            "rate": self.rate,
            "proactive": self.proactive or "default",
            "wire_bytes_per_image_byte": round(sent.get("bytes_sent", 0) / stage.size, 4),
            "repairs_sent": sent.get("repairs_sent"),
            "packets_lost": sum(int(s.get("packets_lost", 0)) for s in got),
            "repairs_asked": sum(int(s.get("repairs_asked", 0)) for s in got),
        }


def _last_json(path: str) -> dict:
    """The last line of a log that parses as a JSON object (mcastdeploy's --json summary)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return {}
    for line in reversed(lines):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return {}


class Udpcast(Tool):
    """udp-sender / udp-receiver (Debian's udpcast), as in /work/shared/notes/rack.md."""

    name = "udpcast"

    def __init__(self, max_bitrate: Optional[str], label: Optional[str] = None) -> None:
        super().__init__(label)
        self.max_bitrate = max_bitrate

    def start_receivers(self, stage: Stage) -> dict[str, Proc]:
        procs = {host: Proc(stage.rack, host,
                            ["udp-receiver", "--file", self.target(stage, host),
                             "--interface", "eth0", "--nokbd"],
                            "udp-receiver", stage.log(self.label, host))
                 for host in stage.hosts}
        wait_ready(list(procs.values()), lambda p: UDPCAST_PORT in udp_ports(p.pid),
                   f"bound UDP port {UDPCAST_PORT}")
        return procs

    def start_sender(self, stage: Stage, receivers: dict[str, Proc]) -> Proc:
        argv = ["udp-sender", "--file", stage.image, "--interface", "eth0", "--nokbd",
                "--min-receivers", str(len(receivers)), "--rexmit-hello-interval", "200"]
        if self.max_bitrate:
            argv += ["--max-bitrate", self.max_bitrate]
        return Proc(stage.rack, "sender", argv, "udp-sender", stage.log(self.label, "sender"))

    def details(self, stage: Stage, sender: Proc, receivers: dict[str, Proc]) -> dict:
        return {"max_bitrate": self.max_bitrate or "default"}


class Uftp(Tool):
    """uftp / uftpd, unencrypted, fixed rate; uftpd reports completion in its log."""

    name = "uftp"
    DONE_LINE = "File transfer complete"

    def __init__(self, rate_kbps: int, label: Optional[str] = None) -> None:
        super().__init__(label)
        self.rate_kbps = rate_kbps
        self._done: dict[str, float] = {}
        self._lock = threading.Lock()

    @staticmethod
    def client_id(address: str) -> str:
        """uftpd's default id is its IPv4 address as 8 hex digits; we set it explicitly."""
        return f"0x{int(ipaddress.IPv4Address(address)):08x}"

    def start_receivers(self, stage: Stage) -> dict[str, Proc]:
        self._done = {}
        procs = {}
        for host in stage.hosts:
            procs[host] = Proc(
                stage.rack, host,
                ["uftpd", "-d", "-q", "-I", "eth0", "-M", UFTP_PUBLIC_GROUP,
                 "-D", stage.target_dir(self.label, host),
                 "-U", self.client_id(stage.rack.address(host))],
                "uftpd", stage.log(self.label, host), on_line=self._watcher(host))
        wait_ready(list(procs.values()), lambda p: UFTP_PORT in udp_ports(p.pid),
                   f"bound UDP port {UFTP_PORT}")
        return procs

    def _watcher(self, host: str) -> Callable[[str, float], None]:
        def on_line(line: str, when: float) -> None:
            if self.DONE_LINE in line:
                with self._lock:
                    self._done.setdefault(host, when)
        return on_line

    def start_sender(self, stage: Stage, receivers: dict[str, Proc]) -> Proc:
        ids = ",".join(self.client_id(stage.rack.address(h)) for h in receivers)
        return Proc(stage.rack, "sender",
                    ["uftp", "-I", "eth0", "-M", UFTP_PUBLIC_GROUP, "-P", UFTP_PRIVATE_GROUP,
                     "-R", str(self.rate_kbps), "-H", ids, "-Y", "none", stage.image],
                    "uftp", stage.log(self.label, "sender"))

    def target(self, stage: Stage, host: str) -> str:
        # uftp sends the file's base name; uftpd writes it into its -D directory.
        return os.path.join(stage.target_dir(self.label, host), os.path.basename(stage.image))

    def receiver_done(self, proc: Proc) -> Optional[float]:
        with self._lock:
            return self._done.get(proc.host)

    def receiver_failed(self, proc: Proc) -> Optional[str]:
        if proc.ended is not None:
            return f"{proc.host}: uftpd exited {proc.exit_code}: {proc.tail(200)}"
        return None

    def details(self, stage: Stage, sender: Proc, receivers: dict[str, Proc]) -> dict:
        return {"rate_kbps": self.rate_kbps}


class Http(Tool):
    """Plain HTTP: python3 -m http.server in the sender namespace, one curl per receiver.

    The server is started and listening before the clock starts (it plays the part of a
    web server that is always there); the clock starts with the first curl.
    """

    name = "http"

    def start_receivers(self, stage: Stage) -> dict[str, Proc]:
        return {}  # curl connects and starts at once; see start_sender

    def sender_is_daemon(self) -> bool:
        return True

    def start_sender(self, stage: Stage, receivers: dict[str, Proc]) -> Proc:
        server = Proc(stage.rack, "sender",
                      [sys.executable, "-m", "http.server", str(HTTP_PORT), "--bind",
                       stage.rack.address("sender"), "--directory",
                       os.path.dirname(stage.image)],
                      "http.server", stage.log(self.label, "sender"))
        wait_ready([server], lambda p: HTTP_PORT in tcp_listening(p.pid),
                   f"listened on TCP port {HTTP_PORT}")
        server.started = time.monotonic()  # the clock starts with the downloads
        url = (f"http://{stage.rack.address('sender')}:{HTTP_PORT}/"
               f"{os.path.basename(stage.image)}")
        for host in stage.hosts:
            receivers[host] = Proc(stage.rack, host,
                                   ["curl", "-sS", "-f", "--max-time",
                                    str(int(stage.deadline) + 5), "-o",
                                    self.target(stage, host), url],
                                   "curl", stage.log(self.label, host))
            stage.sampler.watch(receivers[host].pid)
        return server

    def run(self, stage: Stage) -> ToolRun:
        # Receivers are created in start_sender; keep them in the same dict for the result.
        self.startup_cpu = {}
        receivers: dict[str, Proc] = {}
        server: Optional[Proc] = None
        failure = ""
        try:
            server = self.start_sender(stage, receivers)
            stage.sampler.watch(server.pid)
            failure = self._wait(stage, server, receivers)
        except ToolFailed as error:
            failure = str(error)
        finally:
            end = time.monotonic()
            stop_all(list(receivers.values()) + ([server] if server else []))
        return self._result(stage, server, receivers, failure, end)


def remove_copies(stage: Stage, tool: str) -> None:
    """Free the tmpfs space one tool's copies took (16 x 256 MiB adds up)."""
    directory = os.path.join(stage.workdir, tool)
    for root, dirs, files in os.walk(directory, topdown=False):
        for name in files:
            os.unlink(os.path.join(root, name))
        for name in dirs:
            os.rmdir(os.path.join(root, name))


__all__ = ["CpuSampler", "Http", "McastDeploy", "Proc", "RaceError", "RackError", "Stage",
           "Tool", "ToolFailed", "ToolRun", "Udpcast", "Uftp", "remove_copies"]
