"""Large-group experiments: the real Sender and Receivers, measured against a loss-free run.

This is the core of ``tools/simulate``, kept importable so tests run it directly.  One
:class:`Scenario` describes the group, the network and the image; :func:`compare` runs it
for several proactive-repair settings and seeds, plus one loss-free reference run, and
reports per setting what the issue's targets are stated in: completion relative to the
loss-free run, NACK packets reaching the sender per block, repair symbols per block and
the worst receiver's completion.

Simulating with symbols smaller than the deployed 1400 bytes keeps memory and copying low
(each receiver holds its incomplete blocks, k symbols each) without changing what the
protocol sees: the image is shrunk to the same number of symbols and the rate by the same
packet-size factor, so the packet counts, blocks and packet times are those of the
deployment.
"""

from __future__ import annotations

import hashlib
import math
import random
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Optional, Union

from mcastdeploy.protocol import Receiver, ReceiverConfig, Sender, SenderConfig
from mcastdeploy.protocol.sender import SenderStats
from mcastdeploy.sim.harness import Simulation
from mcastdeploy.sim.network import BurstLoss, GroupLossModel
from mcastdeploy.spec import parse_proactive_setting
from mcastdeploy.wire.packets import DATA_BODY, HEADER_SIZE

#: Symbol size of a real deployment (the protocol's default), which ``Scenario.size`` and
#: ``Scenario.rate_bps`` refer to.
DEPLOYED_SYMBOL = SenderConfig.symbol_size
SESSION_ID = 0x5EED
SENDER_ORIGIN = 1
#: A proactive-repair setting: a count, or ``"auto"`` / ``"auto:N"`` (see sender_config).
Proactive = Union[int, str]


def packet_bytes(symbol_size: int) -> int:
    """Bytes of one DATA datagram carrying a symbol of ``symbol_size`` (what pacing counts)."""
    return HEADER_SIZE + DATA_BODY.size + symbol_size


@dataclass(frozen=True)
class Scenario:
    """A group, its network and the image, as deployed (``size`` and ``rate_bps`` are those
    of ``DEPLOYED_SYMBOL``-byte symbols, whatever ``symbol_size`` the simulation uses)."""

    receivers: int
    size: int  # bytes of the deployed image
    loss: float = 0.01  # independent loss per receiver and datagram
    bursts: tuple[BurstLoss, ...] = ()  # timed from the start of the data pass
    late_share: float = 0.0  # share of receivers joining during the pass
    symbol_size: int = 256  # simulated symbol size
    block_symbols: int = 32
    rate_bps: float = 800e6  # with ``auto_rate``, the ceiling
    auto_rate: bool = False
    delay: float = 0.0005  # one way, seconds
    until: float = 600.0  # simulated seconds before giving up

    @property
    def symbols(self) -> int:
        """Source symbols of the deployed image (the same in the simulation)."""
        return -(-self.size // DEPLOYED_SYMBOL)

    @property
    def sim_size(self) -> int:
        """Bytes of the simulated image: as many symbols, each ``symbol_size`` bytes."""
        return self.symbols * self.symbol_size

    @property
    def sim_rate_bps(self) -> float:
        """The rate at which simulated packets leave as often as deployed ones would."""
        return self.rate_bps * packet_bytes(self.symbol_size) / packet_bytes(DEPLOYED_SYMBOL)

    @property
    def blocks(self) -> int:
        return -(-self.symbols // self.block_symbols)

    def pass_seconds(self) -> float:
        """How long the data pass takes on a loss-free network without proactive repair."""
        return self.symbols * packet_bytes(DEPLOYED_SYMBOL) * 8 / self.rate_bps

    def hosts(self) -> list[str]:
        return [f"r{i}" for i in range(self.receivers)]

    def join_times(self) -> dict[str, float]:
        """Late joiners and when they start, in seconds after the data pass began:
        ``late_share`` of the receivers, each at a uniformly random time within the pass
        (as long as it takes on a loss-free network without proactive repair).

        Drawn from a fixed seed, not the run's, so that every run and the loss-free
        reference have the same joiners at the same times and can be compared receiver by
        receiver.
        """
        rng = random.Random(f"late-joiners/{self.receivers}")
        late = rng.sample(self.hosts(), round(self.late_share * self.receivers))
        window = self.pass_seconds()
        return {host: rng.uniform(0.0, window) for host in late}


def sender_config(scenario: Scenario, proactive: Proactive) -> SenderConfig:
    """The sender's configuration for a run: the one place a new SenderConfig knob needs
    wiring in.  ``proactive`` is a count or, as the CLI takes it, ``auto[:N]`` (parity
    sized from the group's loss, at least N); raises ValueError/TypeError for what the
    sender refuses."""
    mode, count = parse_proactive_setting(str(proactive))
    options: dict[str, object] = {}
    if count is not None:
        options["proactive_repair"] = count
    if mode == "auto":
        options["auto_proactive"] = True
    if scenario.auto_rate:
        options["auto_rate"] = True
    on_time = scenario.receivers - len(scenario.join_times())
    return SenderConfig(SESSION_ID, ("239.0.0.1", 1), rate_bps=scenario.sim_rate_bps,
                        symbol_size=scenario.symbol_size,
                        block_symbols=scenario.block_symbols,
                        min_receivers=on_time, wait=5.0, **options)  # type: ignore[arg-type]


@lru_cache(maxsize=4)
def _image(size: int) -> bytes:
    return random.Random(1).randbytes(size)


@dataclass
class RunResult:
    """One simulated deployment."""

    proactive: Proactive
    seed: int
    loss_free: bool
    blocks: int
    symbols: int
    #: Per receiver (in ``Scenario.hosts`` order): simulated seconds from the start of the
    #: data pass until its image was written and its SHA-256 accepted; infinite if never.
    #: Counted from the pass, not the sender's start, because gathering the group first
    #: takes as long as the slowest receiver's join (a lost STATUS is repeated only after
    #: a second), which has nothing to do with repair; ``pass_started`` tells it apart.
    completion: list[float]
    #: Receivers that failed, never finished, or whose image is not exactly the source.
    failures: dict[str, str]
    sender_stats: SenderStats
    pass_started: float  # when the sender began the pass, having gathered the group
    session_end: float  # when the simulation stopped (the sender's session ended)
    wall_seconds: float
    cpu_seconds: float  # of this process: differs from wall when other work shares the cores

    @property
    def nacks_per_block(self) -> float:
        """NACK packets that reached the sender, per block of the image."""
        return self.sender_stats.nacks_received / self.blocks

    @property
    def repairs_per_block(self) -> float:
        """Repair symbols sent in answer to NACKs (not proactive ones), per block."""
        return self.sender_stats.repair_packets / self.blocks

    @property
    def packets_per_symbol(self) -> float:
        """Every packet the sender sent, per source symbol of the image (1.0 is ideal)."""
        return self.sender_stats.packets_sent / self.symbols

    @property
    def worst(self) -> float:
        """The last receiver's completion among those that completed (failed ones are
        counted in ``failures``, or one lost receiver would hide every other figure)."""
        return max((t for t in self.completion if math.isfinite(t)), default=math.nan)


def run(scenario: Scenario, proactive: Proactive, seed: int, *,
        loss_free: bool = False) -> RunResult:
    """Simulate one deployment; ``loss_free`` drops the scenario's loss and bursts."""
    image = _image(scenario.sim_size)
    sender = Sender(sender_config(scenario, proactive), len(image), origin=SENDER_ORIGIN,
                    checksum=hashlib.sha256(image).digest())
    hosts = scenario.hosts()
    receivers = {host: Receiver(ReceiverConfig(SESSION_ID), origin=1000 + i,
                                rng=random.Random(f"{seed}/{i}"))
                 for i, host in enumerate(hosts)}
    loss = (GroupLossModel(seed=seed) if loss_free else
            GroupLossModel(seed=seed, loss=scenario.loss, bursts=scenario.bursts))
    simulation = Simulation(sender, image, receivers, loss, delay=scenario.delay,
                            join_after_start=scenario.join_times(), bursts_after_start=True,
                            keep_images=False)
    started, cpu = time.perf_counter(), time.process_time()
    result = simulation.run(until=scenario.until)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    failures = dict(result.faults)
    failures.update(result.failures)
    for host in hosts:
        if host not in result.verified_at and host not in failures:
            failures[host] = f"not finished after {scenario.until:g} simulated seconds"
    start = result.pass_started if result.pass_started is not None else math.inf
    return RunResult(
        proactive=proactive, seed=seed, loss_free=loss_free,
        blocks=sender.geometry.block_count, symbols=scenario.symbols,
        completion=[result.verified_at[host] - start if host in result.verified_at
                    else math.inf for host in hosts],
        failures=failures, sender_stats=sender.stats, pass_started=start,
        session_end=result.end_time, wall_seconds=wall, cpu_seconds=cpu)


@dataclass
class Setting:
    """One proactive-repair setting over several seeds, relative to the loss-free run."""

    proactive: Proactive
    runs: list[RunResult]
    reference: RunResult

    def median_ratio(self, run: RunResult) -> float:
        """The median receiver's completion over its own loss-free completion (receivers
        that completed in both runs)."""
        ratios = [t / t0 for t, t0 in zip(run.completion, self.reference.completion)
                  if math.isfinite(t) and math.isfinite(t0)]
        return statistics.median(ratios) if ratios else math.nan

    @property
    def completion_ratio(self) -> float:
        return statistics.median([self.median_ratio(run) for run in self.runs])

    @property
    def worst(self) -> float:
        return statistics.median([run.worst for run in self.runs])

    @property
    def worst_ratio(self) -> float:
        """The last receiver's completion over the loss-free run's last completion."""
        return self.worst / self.reference.worst

    @property
    def nacks_per_block(self) -> float:
        return statistics.median([run.nacks_per_block for run in self.runs])

    @property
    def repairs_per_block(self) -> float:
        return statistics.median([run.repairs_per_block for run in self.runs])

    @property
    def packets_per_symbol(self) -> float:
        return statistics.median([run.packets_per_symbol for run in self.runs])

    @property
    def pass_started(self) -> float:
        return statistics.median([run.pass_started for run in self.runs])

    @property
    def wall_seconds(self) -> float:
        return statistics.median([run.wall_seconds for run in self.runs])

    @property
    def cpu_seconds(self) -> float:
        return statistics.median([run.cpu_seconds for run in self.runs])

    @property
    def failures(self) -> int:
        """Receivers that failed, summed over the seeds."""
        return sum(len(run.failures) for run in self.runs)

    def summary(self) -> dict:
        """The figures of this setting, for JSON."""
        return {
            "proactive": self.proactive,
            "completion_ratio": self.completion_ratio,
            "worst_seconds": self.worst,
            "worst_ratio": self.worst_ratio,
            "nacks_per_block": self.nacks_per_block,
            "repairs_per_block": self.repairs_per_block,
            "packets_per_symbol": self.packets_per_symbol,
            "pass_started": self.pass_started,
            "wall_seconds": self.wall_seconds,
            "cpu_seconds": self.cpu_seconds,
            "failures": self.failures,
            "runs": [run_summary(run) for run in self.runs],
        }


def run_summary(run: RunResult) -> dict:
    """A run without its per-receiver list (10,000 numbers), for JSON."""
    return {
        "seed": run.seed,
        "worst_seconds": run.worst,
        "nacks_per_block": run.nacks_per_block,
        "repairs_per_block": run.repairs_per_block,
        "packets_per_symbol": run.packets_per_symbol,
        "pass_started": run.pass_started,
        "session_end": run.session_end,
        "wall_seconds": run.wall_seconds,
        "cpu_seconds": run.cpu_seconds,
        "failures": dict(list(run.failures.items())[:5]),
        "failure_count": len(run.failures),
        "sender_stats": asdict(run.sender_stats),
    }


@dataclass
class Comparison:
    """The loss-free reference and every setting, as ``tools/simulate`` reports them."""

    scenario: Scenario
    reference: RunResult
    settings: list[Setting] = field(default_factory=list)
    wall_seconds: float = 0.0


#: The loss-free reference: no loss, no bursts and no proactive repair, the fastest any
#: setting can possibly be; same receivers, join times, image and rate as the scenario.
REFERENCE_PROACTIVE = 0
REFERENCE_SEED = 0


def _run_job(job: tuple[Scenario, Proactive, int, bool]) -> RunResult:
    scenario, proactive, seed, loss_free = job
    return run(scenario, proactive, seed, loss_free=loss_free)


def compare(scenario: Scenario, proactive: list[Proactive], seeds: int, *,
            jobs: int = 1) -> Comparison:
    """Run the reference and every (setting, seed 1..``seeds``); ``jobs`` processes."""
    started = time.perf_counter()
    work = [(scenario, REFERENCE_PROACTIVE, REFERENCE_SEED, True)]
    work += [(scenario, setting, seed, False)
             for setting in proactive for seed in range(1, seeds + 1)]
    if jobs > 1:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(_run_job, work))
    else:
        results = [_run_job(job) for job in work]
    reference, runs = results[0], results[1:]
    settings = [Setting(setting, runs[i * seeds:(i + 1) * seeds], reference)
                for i, setting in enumerate(proactive)]
    return Comparison(scenario, reference, settings, time.perf_counter() - started)


def scenario_summary(scenario: Scenario) -> dict:
    """The scenario and its derived sizes, for JSON and headers."""
    summary = asdict(scenario)
    summary["bursts"] = [asdict(burst) for burst in scenario.bursts]
    summary.update(symbols=scenario.symbols, blocks=scenario.blocks,
                   sim_size=scenario.sim_size, sim_rate_bps=scenario.sim_rate_bps,
                   deployed_symbol=DEPLOYED_SYMBOL,
                   late_joiners=len(scenario.join_times()))
    return summary


def reference_summary(reference: RunResult) -> dict:
    return {"proactive": REFERENCE_PROACTIVE, "seed": REFERENCE_SEED,
            **run_summary(reference),
            "median_seconds": statistics.median(reference.completion)}


def describe_failures(comparison: Comparison, limit: int = 3) -> Optional[str]:
    """A few failed receivers and why, for the report's footer; None if none failed."""
    lines = []
    for setting in comparison.settings:
        for run_result in setting.runs:
            for host, reason in list(run_result.failures.items())[:limit]:
                lines.append(f"proactive {setting.proactive} seed {run_result.seed} "
                             f"{host}: {reason}")
    for host, reason in list(comparison.reference.failures.items())[:limit]:
        lines.append(f"loss-free reference {host}: {reason}")
    return "\n".join(lines[:limit * 3]) if lines else None
