"""The large-group simulator (tools/simulate, mcastdeploy.sim) at a small size.

The big runs (1,000 and 10,000 receivers) are benchmarks, see docs/simulation.rst; here
the same code runs with 50 receivers so that it stays correct: every receiver verified,
the figures computed as documented, and the light verification catching a bad block.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import statistics
from types import ModuleType

import pytest
from helpers import load_tool

from mcastdeploy import wire
from mcastdeploy.protocol import events
from mcastdeploy.protocol.receiver import Receiver, ReceiverConfig
from mcastdeploy.protocol.sender import Sender, SenderConfig
from mcastdeploy.sim import BurstLoss, LossModel, Simulation, experiment
from mcastdeploy.sim.network import GroupLossModel


SMALL = experiment.Scenario(receivers=50, size=300_000, loss=0.01, late_share=0.1,
                            symbol_size=64)


# -- the tool's core --------------------------------------------------------------------------


def test_small_group_with_late_joiners_is_verified_and_measured() -> None:
    joins = SMALL.join_times()
    assert len(joins) == 5
    # A joiner in the very last packets of the pass misses the final ANNOUNCE and with it
    # the session; that is the protocol's business, not what this test is about.
    assert max(joins.values()) < 0.9 * SMALL.pass_seconds()
    comparison = experiment.compare(SMALL, [1, 2], seeds=2)
    reference = comparison.reference
    assert reference.failures == {}
    assert all(math.isfinite(t) for t in reference.completion)
    for setting in comparison.settings:
        assert setting.failures == 0
        for run in setting.runs:
            assert run.failures == {}
            assert len(run.completion) == SMALL.receivers
            assert all(0 < t < 10 for t in run.completion)
            assert run.blocks == math.ceil(SMALL.symbols / SMALL.block_symbols)
        assert setting.worst_ratio == pytest.approx(setting.worst / reference.worst)
        by_hand = statistics.median(
            statistics.median(t / t0 for t, t0 in zip(run.completion, reference.completion))
            for run in setting.runs)
        assert setting.completion_ratio == pytest.approx(by_hand)
    # 1% loss costs something: some NACKs, and not all of it is absorbed by one symbol.
    one = comparison.settings[0]
    assert one.nacks_per_block > 0 and one.repairs_per_block > 0


class CountingSender(Sender):
    """Counts on the wire what the figures claim: NACK packets in, repair DATA out."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.nacks_heard = 0
        self.repairs_sent = 0

    def receive_datagram(self, data: bytes, addr, now: float) -> None:
        if isinstance(wire.parse(data).body, wire.Nack):
            self.nacks_heard += 1
        super().receive_datagram(data, addr, now)

    def datagrams_to_send(self, now: float):
        out = super().datagrams_to_send(now)
        for data, _ in out:
            packet = wire.parse(data)
            if isinstance(packet.body, wire.Data) and packet.header.flags & wire.Flags.REPAIR:
                self.repairs_sent += 1
        return out


def test_figures_are_what_reached_the_sender_and_left_it(monkeypatch) -> None:
    senders: list[CountingSender] = []

    def counting_sender(*args, **kwargs) -> CountingSender:
        senders.append(CountingSender(*args, **kwargs))
        return senders[-1]

    monkeypatch.setattr(experiment, "Sender", counting_sender)
    run = experiment.run(SMALL, 1, seed=3)
    sender = senders[0]
    blocks = sender.geometry.block_count
    assert run.blocks == blocks
    assert sender.nacks_heard > 0
    assert run.nacks_per_block == sender.nacks_heard / blocks
    assert run.nacks_per_block == sender.stats.nacks_received / blocks
    assert run.repairs_per_block == sender.repairs_sent / blocks
    assert run.packets_per_symbol == sender.stats.packets_sent / SMALL.symbols


def test_parallel_runs_give_the_same_figures() -> None:
    scenario = experiment.Scenario(receivers=20, size=100_000, symbol_size=64)
    serial = experiment.compare(scenario, [1], seeds=2, jobs=1)
    parallel = experiment.compare(scenario, [1], seeds=2, jobs=2)
    assert parallel.reference.completion == serial.reference.completion
    for mine, theirs in zip(parallel.settings[0].runs, serial.settings[0].runs):
        assert (mine.completion, mine.sender_stats) == (theirs.completion, theirs.sender_stats)


def test_one_place_builds_the_sender_configuration() -> None:
    fixed = experiment.sender_config(SMALL, 2)
    assert (fixed.proactive_repair, fixed.auto_proactive, fixed.auto_rate) == (2, False, False)
    auto = experiment.sender_config(SMALL, "auto:3")
    assert (auto.proactive_repair, auto.auto_proactive) == (3, True)
    assert experiment.sender_config(SMALL, "auto").auto_proactive
    assert fixed.min_receivers == SMALL.receivers - 5  # late joiners are not waited for
    assert fixed.symbol_size == 64 and fixed.rate_bps == SMALL.sim_rate_bps
    rated = experiment.sender_config(experiment.Scenario(1, 1000, auto_rate=True), 1)
    assert rated.auto_rate


def test_tool_takes_automatic_rate_and_parity(tool) -> None:
    args = tool.parse_args(["--rate", "auto:1G", "--proactive", "1,auto:2"])
    assert args.scenario.auto_rate and args.scenario.rate_bps == 1e9
    assert args.proactive == [1, "auto:2"]
    assert not tool.parse_args(["--rate", "500M"]).scenario.auto_rate


def test_smaller_symbols_keep_the_packets_and_their_times() -> None:
    deployed = experiment.Scenario(receivers=1, size=1_000_000, symbol_size=1400)
    small = experiment.Scenario(receivers=1, size=1_000_000, symbol_size=256)
    assert small.symbols == deployed.symbols == 715
    assert small.blocks == deployed.blocks
    assert small.sim_size == 715 * 256
    packet_time = (experiment.packet_bytes(small.symbol_size) * 8 / small.sim_rate_bps)
    assert packet_time == pytest.approx(experiment.packet_bytes(1400) * 8 / 800e6)


# -- the harness: verification without images ---------------------------------------------------

SID = 0x51
IMAGE = random.Random(5).randbytes(40_000)


class CorruptingReceiver(Receiver):
    """Hands one block over wrong (a flipped byte) or twice, as a buggy receiver might."""

    def __init__(self, *args, fault: str, block: int = 3, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fault, self.bad_block = fault, block
        self.again: list[events.Event] = []

    def next_event(self):
        if self.again:
            return self.again.pop()
        event = super().next_event()
        if isinstance(event, events.BlockDecoded) and event.block == self.bad_block:
            data = bytearray(event.data)
            if self.fault == "flip":
                data[7] ^= 0x01
                return events.BlockDecoded(event.block, event.offset, memoryview(data))
            self.again.append(events.BlockDecoded(event.block, event.offset, memoryview(data)))
        return event


def small_group(receivers: dict, keep_images: bool, loss: float = 0.02) -> tuple:
    sender = Sender(SenderConfig(SID, ("239.0.0.1", 1), rate_bps=20e6, symbol_size=100,
                                 block_symbols=8, min_receivers=len(receivers), wait=2.0),
                    len(IMAGE), origin=1, checksum=hashlib.sha256(IMAGE).digest())
    result = Simulation(sender, IMAGE, receivers, LossModel(seed=4, loss=loss),
                        keep_images=keep_images).run(until=60)
    return sender, result


def plain(count: int) -> dict[str, Receiver]:
    return {f"r{i}": Receiver(ReceiverConfig(SID), origin=10 + i, rng=random.Random(i))
            for i in range(count)}


@pytest.mark.parametrize("fault, expected", [("flip", "block 3 differs"),
                                             ("twice", "more than once")])
def test_light_verification_catches_a_bad_block(fault: str, expected: str) -> None:
    receivers = plain(4)
    receivers["bad"] = CorruptingReceiver(ReceiverConfig(SID), origin=99,
                                          rng=random.Random(9), fault=fault)
    _, result = small_group(receivers, keep_images=False)
    assert result.images == {}
    assert result.intact == {**{f"r{i}": True for i in range(4)}, "bad": False}
    assert expected in result.faults["bad"]
    # The receiver's own SHA-256 check saw a wrong digest, as on a real target.
    assert "does not match" in result.failures["bad"]
    assert set(result.verified_at) == {f"r{i}" for i in range(4)}


def test_images_mode_catches_a_flipped_byte_too() -> None:
    receivers = plain(2)
    receivers["bad"] = CorruptingReceiver(ReceiverConfig(SID), origin=99,
                                          rng=random.Random(9), fault="flip")
    _, result = small_group(receivers, keep_images=True)
    assert result.intact == {"r0": True, "r1": True, "bad": False}
    assert "does not match" in result.failures["bad"]


def test_light_and_image_verification_run_the_same_protocol() -> None:
    light_sender, light = small_group(plain(6), keep_images=False)
    full_sender, full = small_group(plain(6), keep_images=True)
    assert all(copy == IMAGE for copy in full.images.values())
    assert light.intact == full.intact == {f"r{i}": True for i in range(6)}
    assert light.faults == full.faults == {}
    assert (light.finished_at, light.verified_at) == (full.finished_at, full.verified_at)
    assert light_sender.stats == full_sender.stats
    assert all(light.verified_at[h] < light.finished_at[h] for h in light.finished_at)


class StartRecorder(Receiver):
    def start(self, now: float) -> None:
        self.started_at = now
        super().start(now)


def test_late_joiners_and_bursts_are_timed_from_the_pass() -> None:
    receivers = {f"r{i}": StartRecorder(ReceiverConfig(SID), origin=10 + i,
                                        rng=random.Random(i)) for i in range(4)}
    sender = Sender(SenderConfig(SID, ("239.0.0.1", 1), rate_bps=20e6, symbol_size=100,
                                 block_symbols=8, min_receivers=3, wait=2.0),
                    len(IMAGE), origin=1, checksum=hashlib.sha256(IMAGE).digest())
    loss = LossModel(seed=4, bursts=(BurstLoss(0.001, 0.002, 1.0),))
    result = Simulation(sender, IMAGE, receivers, loss, join_after_start={"r3": 0.005},
                        bursts_after_start=True, keep_images=False).run(until=60)
    assert result.pass_started is not None and result.pass_started > 0
    assert loss.epoch == result.pass_started
    assert loss.dropped("r0", result.pass_started + 0.0015)
    assert not loss.dropped("r0", 0.0015)  # before the pass began + 1 ms
    assert receivers["r3"].started_at == pytest.approx(result.pass_started + 0.005)
    assert all(receivers[f"r{i}"].started_at == 0.0 for i in range(3))
    assert all(result.intact.values()) and len(result.verified_at) == 4


# -- the loss model -------------------------------------------------------------------------


def test_group_loss_model_draws_the_documented_law() -> None:
    hosts = tuple(f"r{i}" for i in range(1000))
    model = GroupLossModel(seed=1, loss=0.02, bursts=(BurstLoss(1.0, 2.0, 0.5),),
                           host_loss={"r7": 1.0})
    quiet = [model.multicast_losses(hosts, 0.5) for _ in range(50)]
    assert all(hosts.index("r7") in lost for lost in quiet)
    share = sum(len(lost) - 1 for lost in quiet) / (50 * 999)
    assert share == pytest.approx(0.02, rel=0.15)
    burst = [len(model.multicast_losses(hosts, 1.5)) for _ in range(20)]
    assert statistics.mean(burst) == pytest.approx(500, rel=0.1)
    again = GroupLossModel(seed=1, loss=0.02, bursts=(BurstLoss(1.0, 2.0, 0.5),),
                           host_loss={"r7": 1.0})
    assert [again.multicast_losses(hosts, 0.5) for _ in range(50)] == quiet
    assert GroupLossModel(seed=1).multicast_losses(hosts, 0.5) == set()


# -- the command line ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tool() -> ModuleType:
    """tools/simulate as a module."""
    return load_tool("simulate")


SMALL_ARGS = ["--receivers", "30", "--size", "0.2", "--symbol-size", "64", "--loss", "0.01",
              "--late-share", "0.1", "--proactive", "0,auto", "--jobs", "1"]


def test_tool_reports_every_setting_as_json(tool, capsys) -> None:
    assert tool.main(SMALL_ARGS + ["--json", "--burst", "0.0005:0.001:0.5"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["command"].startswith("tools/simulate --receivers 30")
    assert report["scenario"]["late_joiners"] == 3
    assert report["scenario"]["bursts"] == [{"start": 0.0005, "end": 0.001, "loss": 0.5}]
    assert [row["proactive"] for row in report["settings"]] == [0, "auto"]
    for row in report["settings"]:
        assert row["failures"] == 0
        assert row["worst_ratio"] >= 1 and row["completion_ratio"] > 0
        stats = row["runs"][0]["sender_stats"]
        blocks = report["scenario"]["blocks"]
        assert row["nacks_per_block"] == stats["nacks_received"] / blocks


def test_tool_prints_a_table_and_saves_a_plot(tool, capsys, tmp_path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "sim.png"
    assert tool.main(SMALL_ARGS + ["--plot", str(path)]) == 0
    out = capsys.readouterr().out
    assert "T/T0" in out and "NACK/blk" in out and "loss-free reference" in out
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, message", [
    (["--burst", "1:2"], "START:END:LOSS"),
    (["--burst", "2:1:0.5"], "START < END"),
    (["--loss", "1.5"], "between 0 and 1"),
    (["--late-share", "-0.1"], "between 0 and 1"),
    (["--rate", "fast"], "bad rate"),
    (["--receivers", "0"], "at least 1"),
    (["--proactive", "bogus"], "bad proactive repair 'bogus'"),
    (["--proactive", "auto:x"], "bad proactive repair"),
    (["--proactive", "1,,2"], "empty item"),
])
def test_tool_refuses_bad_input_without_a_traceback(tool, capsys, args, message) -> None:
    with pytest.raises(SystemExit) as exit_info:
        tool.main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
