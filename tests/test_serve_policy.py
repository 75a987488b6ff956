"""The daemon's policies and plumbing without a network: group allocation, the rate split
(and a Sender following its share), the config file, the session table and the event log."""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import random
import shutil
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mcastdeploy.service import config as configuration
from mcastdeploy.service.events import log_event
from mcastdeploy.service.groups import NoFreeGroup, allocate, mac_of, parse_range
from mcastdeploy.protocol.sender import Sender, SenderConfig, SenderState
from mcastdeploy.service.rateshare import MIN_SHARE_BPS, fair_shares
from mcastdeploy.service.session import apply_share
from mcastdeploy.service.table import AgentRecord, SessionRecord, SessionTable
from mcastdeploy.spec import new_session

TOKEN = "t" * 32


def test_aliasing_groups_share_a_mac():
    assert mac_of("239.192.1.2") == mac_of("239.64.1.2") == mac_of("224.64.1.2")
    assert mac_of("239.192.1.2") != mac_of("239.192.1.3")


def test_allocation_avoids_every_mac_in_use():
    network = ipaddress.IPv4Network("239.192.0.0/14")
    rng = random.Random(1)
    in_use: list[str] = []
    for _ in range(300):
        group = allocate(network, in_use, rng)
        assert ipaddress.IPv4Address(group) in network
        assert mac_of(group) not in {mac_of(g) for g in in_use}
        in_use.append(group)


def test_a_range_whose_macs_are_all_taken_has_no_free_group():
    # 239.0.0.0/23's MACs 00:00:xx are flooded, 00:01:xx all taken by 239.128.1.0/24.
    network = ipaddress.IPv4Network("239.0.0.0/23")
    taken = [str(ipaddress.IPv4Address("239.128.1.0") + i) for i in range(256)]
    with pytest.raises(NoFreeGroup):
        allocate(network, taken, random.Random(2))
    # ... and with one of them free, that one is found although the range is crowded.
    assert allocate(network, taken[1:], random.Random(3)) == "239.0.1.0"


def test_link_local_macs_are_never_chosen():
    network = ipaddress.IPv4Network("239.0.0.0/24")  # all alias 224.0.0.x, always flooded
    with pytest.raises(NoFreeGroup):
        allocate(network, [], random.Random(4))


@pytest.mark.parametrize("text", ["10.0.0.0/8", "224.0.0.0/24", "239.1.2.3/16", "nonsense"])
def test_bad_group_ranges_are_refused(text):
    with pytest.raises(ValueError):
        parse_range(text)


def test_one_session_gets_the_budget_and_two_get_half():
    assert fair_shares(100_000_000, {"a": None}) == {"a": 100_000_000}
    assert fair_shares(100_000_000, {"a": None, "b": None}) == {"a": 50_000_000,
                                                               "b": 50_000_000}
    assert fair_shares(100_000_000, {}) == {}


def test_a_capped_session_leaves_the_rest_to_the_others():
    shares = fair_shares(100_000_000, {"a": 10_000_000, "b": None, "c": None})
    assert shares == {"a": 10_000_000, "b": 45_000_000, "c": 45_000_000}


@given(st.integers(10**6, 10**11),
       st.lists(st.one_of(st.none(), st.integers(10**6, 10**10)), min_size=1, max_size=20))
def test_shares_are_fair_and_within_the_budget(budget, caps):
    ceilings = {str(i): cap for i, cap in enumerate(caps)}
    shares = fair_shares(budget, ceilings)
    assert set(shares) == set(ceilings)
    assert sum(shares.values()) <= max(budget, MIN_SHARE_BPS * len(caps)) + len(caps)
    for name, share in shares.items():
        cap = ceilings[name]
        assert cap is None or share <= max(cap, MIN_SHARE_BPS)
    # Max-min: a session below its cap gets at least as much as any other session.
    uncapped = [shares[n] for n, cap in ceilings.items() if cap is None or shares[n] < cap]
    if uncapped:
        assert min(uncapped) >= max(shares.values()) - 1


def write_config(tmp_path, text: str, mode: int = 0o600) -> str:
    path = tmp_path / "serve.ini"
    path.write_text(text)
    os.chmod(path, mode)
    return str(path)


def test_config_file_and_overrides(tmp_path):
    (tmp_path / "token").write_text(TOKEN + "\n")
    path = write_config(tmp_path, """
[serve]
listen = 10.0.0.1:7000
interface = eth1
groups = 239.200.0.0/16
rate = 2G
session_rate = 500M
gather = 1.5
token_file = token
state_dir = state
[cache]
dir = /srv/cache
limit = 20G
[images]
ubuntu = swift://images/ubuntu.raw https://mirror.example/ubuntu.raw
[swift]
ST_AUTH = http://swift.example/auth/v1.0
""")
    loaded = configuration.load(path)
    assert loaded.token == TOKEN
    assert TOKEN not in repr(loaded) and "swift.example" not in repr(loaded)  # secrets too
    assert loaded.listen == ("10.0.0.1", 7000)
    assert loaded.interface == "eth1"
    assert loaded.groups == ipaddress.IPv4Network("239.200.0.0/16")
    assert (loaded.rate_bps, loaded.session_rate_bps) == (2_000_000_000, 500_000_000)
    assert loaded.gather == 1.5
    assert loaded.state_dir == str(tmp_path / "state")  # relative to the file
    assert (loaded.cache_dir, loaded.cache_limit) == ("/srv/cache", 20 << 30)
    assert loaded.images["ubuntu"][1] == "https://mirror.example/ubuntu.raw"
    assert loaded.swift_environ == {"ST_AUTH": "http://swift.example/auth/v1.0"}
    assert loaded.with_overrides(interface="eth2", rate_bps=None).interface == "eth2"


@pytest.mark.parametrize("text, message", [
    ("[serve]\n", "token"),
    ("[serve]\ntoken = short\n", "at least"),
    (f"[serve]\ntoken = {TOKEN}\nrate = fast\n", "bad rate"),
    (f"[serve]\ntoken = {TOKEN}\nlisten = nowhere\n", "listen"),
    (f"[serve]\ntoken = {TOKEN}\ngroups = 10.0.0.0/8\n", "multicast"),
    (f"[serve]\ntoken = {TOKEN}\ncolour = blue\n", "unknown key"),
    (f"[serve]\ntoken = {TOKEN}\nallow_urls = maybe\n", "allow_urls must be true or false"),
    (f"[serve]\ntoken = {TOKEN}\n[extras]\n", "unknown config section"),
    (f"[serve]\ntoken = {TOKEN}\n[images]\nx = not-a-url\n", "URLs"),
    ("no section at all\n", "not a valid INI"),
    (f"[serve]\ntoken = {TOKEN}\ntls_cert = api.crt\n", "tls_cert and tls_key"),
    (f"[serve]\ntoken = {TOKEN}\ntls_cert = nowhere.crt\ntls_key = nowhere.key\n",
     "is not a file"),
])
def test_bad_config_is_one_line(tmp_path, text, message):
    with pytest.raises(configuration.ConfigError) as error:
        configuration.load(write_config(tmp_path, text))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_binary_token_file_is_one_line(tmp_path):
    (tmp_path / "token").write_bytes(b"\xff" * 32)
    with pytest.raises(configuration.ConfigError, match="token is not UTF-8 text"):
        configuration.load(write_config(tmp_path, "[serve]\ntoken_file = token\n"))


def test_config_readable_by_others_is_refused(tmp_path):
    with pytest.raises(configuration.ConfigError, match="chmod 600"):
        configuration.load(write_config(tmp_path, f"[serve]\ntoken = {TOKEN}\n", 0o644))


def test_session_table_round_trip_is_private(tmp_path):
    table = SessionTable(str(tmp_path / "state"))
    table.prepare()
    assert table.load() == []
    record = SessionRecord(new_session(interface="lo"), "ubuntu", 12.5,
                           [AgentRecord("node-1", "10.0.0.11", 13.0)])
    table.save([record])
    assert os.stat(table.path).st_mode & 0o077 == 0
    assert os.stat(table.state_dir).st_mode & 0o077 == 0
    (loaded,) = table.load()
    assert loaded.spec == record.spec and loaded.agents == record.agents
    assert loaded.image == "ubuntu"


def test_events_are_one_line_with_the_session_and_refuse_secrets(caplog):
    with caplog.at_level(logging.INFO, logger="mcastdeploy.serve"):
        line = log_event("agent_joined", "0123456789abcdef", agent="node 1", agents=2)
    assert line.split()[1:] == ["event=agent_joined", "session=0123456789abcdef",
                                'agent="node', '1"', "agents=2"]
    assert caplog.records[0].getMessage() == line
    with pytest.raises(ValueError, match="secret"):
        log_event("oops", key="00" * 32)


def test_session_settings_are_checked_when_the_config_is_loaded(tmp_path):
    good = configuration.load(write_config(
        tmp_path, f"[serve]\ntoken = {TOKEN}\nsymbol_size = 8000\nblock_symbols = 64\n"
                  "rate_mode = auto\n"))
    assert (good.symbol_size, good.block_symbols, good.rate_mode) == (8000, 64, "auto")
    with pytest.raises(configuration.ConfigError, match="symbol_size"):
        configuration.load(write_config(tmp_path, f"[serve]\ntoken = {TOKEN}\n"
                                                  "symbol_size = 70000\n"))
    with pytest.raises(configuration.ConfigError, match="rate_mode"):
        configuration.load(write_config(tmp_path, f"[serve]\ntoken = {TOKEN}\n"
                                                  "rate_mode = turbo\n"))


def test_a_new_share_changes_what_the_sender_sends():
    """The daemon's rate split reaches the wire: a running Sender given a new share sends
    at it from its next ANNOUNCE on (simulated time, so the count is exact enough)."""
    config = SenderConfig(session_id=1, group=("239.192.0.1", 6790), rate_bps=40e6)
    sender = Sender(config, 64 * 1024 * 1024, origin=7)
    block = random.Random(5).randbytes(sender.geometry.block_bytes)

    def sent_between(start: float, end: float) -> int:
        total, now = 0, start
        while now < end:
            for index in sender.blocks_wanted():
                sender.supply_block(index, block[:sender.geometry.block_length(index)])
            total += sum(len(data) for data, _ in sender.datagrams_to_send(now))
            now += 0.0005
        return total

    sender.start(0.0)
    assert sent_between(0.0, 1.0) * 8 == pytest.approx(40e6, rel=0.05)
    apply_share(sender, 10_000_000)
    sent_between(1.0, 1.6)  # the next ANNOUNCE (every 0.5 s) applies it
    assert sent_between(1.6, 2.6) * 8 == pytest.approx(10e6, rel=0.05)
    auto = Sender(SenderConfig(session_id=2, group=("239.192.0.2", 6790), rate_bps=40e6,
                               auto_rate=True), 1024, origin=8)
    apply_share(auto, 10_000_000)  # under automatic control the share is the ceiling
    assert auto.rate.ceiling_bps == 10_000_000 and auto.rate.rate_bps <= 10_000_000


def test_the_systemd_unit_is_valid(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    tools = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
    with open(os.path.join(tools, "mcastdeploy-serve.service"), encoding="utf-8") as handle:
        unit = handle.read()
    assert "ExecStart=/usr/local/bin/mcastdeploy serve --config" in unit
    # verify insists that the command exists: point it at this interpreter's mcastdeploy.
    path = tmp_path / "mcastdeploy-serve.service"
    path.write_text(unit.replace("/usr/local/bin/mcastdeploy", f"{sys.executable} -m mcastdeploy"))
    result = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_the_documented_example_config_loads(tmp_path):
    """docs/deployer.rst's example, comments and all, is a config the daemon accepts."""
    docs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
    with open(os.path.join(docs, "deployer.rst"), encoding="utf-8") as handle:
        text = handle.read()
    start = text.index("    [serve]\n")
    example = text[start:text.index("\nComments start with", start)]
    example = "\n".join(line[4:] for line in example.splitlines())
    for name, content in (("token", TOKEN), ("api.crt", "certificate"), ("api.key", "key")):
        (tmp_path / name).write_text(content)
        example = example.replace(f"/etc/mcastdeploy/{name}", str(tmp_path / name))
    loaded = configuration.load(write_config(tmp_path, example))
    assert loaded.listen == ("10.20.0.1", 6780) and loaded.interface == "eth1"
    assert (loaded.rate_bps, loaded.session_rate_bps) == (800_000_000, 500_000_000)
    assert loaded.token == TOKEN and loaded.allow_urls is False
    assert loaded.tls_cert == str(tmp_path / "api.crt")
    assert loaded.cache_limit == 400 << 30 and loaded.symbol_size == 1400
    assert loaded.images["ubuntu-22.04"] == ["swift://images/ubuntu-22.04.raw",
                                             "https://mirror.example/ubuntu-22.04.raw"]
    assert loaded.swift_environ["OS_USERNAME"] == "mcastdeploy"


def test_an_agent_counted_is_waited_for_and_one_after_the_end_is_refused():
    """The guard around a session's Sender: an agent the daemon counts after the others
    are done keeps the session open until it is done too; once the sender has decided to
    finish, add_agent refuses (the daemon then opens a new session)."""
    from mcastdeploy import wire
    from mcastdeploy.service.session import SessionControl, _Guarded

    image = random.Random(6).randbytes(3 * 32 * 1400 + 5)
    checksum = hashlib.sha256(image).digest()
    sender = Sender(SenderConfig(session_id=9, group=("239.192.0.3", 6790), rate_bps=1e9,
                                 linger=100.0, min_receivers=1 << 30, wait=1.0),
                    len(image), origin=3, checksum=checksum)
    control = SessionControl(rate_bps=10**9, agents=1)
    guarded = _Guarded(sender, control, gather_until=0.0)
    geometry = sender.geometry

    def drive(start: float, until, horizon: float = 60.0) -> float:
        now = start
        while now < start + horizon and not until():
            for block in sender.blocks_wanted():
                offset = geometry.offset(block)
                sender.supply_block(block, image[offset:offset + geometry.block_length(block)])
            guarded.datagrams_to_send(now)
            timer = guarded.get_timer()
            if timer is not None and timer <= now:
                guarded.handle_timer(now)
            now += 0.001
        return now

    def report(origin: int, body, now: float) -> None:
        guarded.receive_datagram(wire.encode(9, origin, body), (f"10.0.0.{origin}", 1), now)

    guarded.start(0.0)
    report(1, wire.Status(wire.ReceiverState.RECEIVING, 0, geometry.block_count, 0, 0, 0), 0.0)
    now = drive(0.0, lambda: sender.state is SenderState.REPAIRING)
    assert now < 1.0  # the one agent that asked had joined: no need to wait the grace
    assert control.add_agent()  # a second agent asks as the first is done
    report(1, wire.Done(checksum), now)
    # Without the second agent counted it would end a flush (0.2 s) after this DONE.
    now = drive(now, lambda: sender.state is SenderState.FINISHED, horizon=5.0)
    assert sender.state is SenderState.REPAIRING and not control.finishing
    report(2, wire.Done(checksum), now)
    drive(now, lambda: sender.state is SenderState.FINISHED)
    assert sender.state is SenderState.FINISHED and control.finishing
    assert not control.add_agent() and control.agents == 2


def test_a_restarted_daemon_waits_only_for_agents_not_done(tmp_path):
    """Agents recorded done before a restart are not waited for; a session whose agents
    were all done is not resumed at all."""
    from mcastdeploy.service.daemon import Daemon

    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.raw").write_bytes(b"x" * 5000)
    config = configuration.ServeConfig(
        token=TOKEN, interface="lo", state_dir=str(tmp_path / "state"),
        cache_dir=str(tmp_path / "cache"), image_dir=str(tmp_path / "images"), gather=60.0)
    first = Daemon(config)
    first.start()
    try:
        spec, joined = first.request("a.raw", "n1", "10.0.0.1")
        assert not joined
        for name, address in (("n2", "10.0.0.2"), ("n3", "10.0.0.3")):
            assert first.request("a.raw", name, address) == (spec, True)
        record = first.sessions[spec.session_id].record
        first._agent_done(record, "10.0.0.2")
        first._agent_done(record, "10.0.0.9")  # nobody asked from there: nothing changes
    finally:
        first.close()
    second = Daemon(config)
    second.start()
    try:
        live = second.sessions[spec.session_id]
        assert live.resumed and live.control.agents == 2
        assert [a.name for a in live.record.agents if a.done] == ["n2"]
        for address in ("10.0.0.1", "10.0.0.3"):
            second._agent_done(live.record, address)
    finally:
        second.close()
    third = Daemon(config)
    third.start()
    try:
        assert third.sessions == {}
    finally:
        third.close()


def test_an_agents_rate_is_from_its_own_reports():
    from mcastdeploy.service.session import ReceiveRates

    rates = ReceiveRates(block_bytes=1000)
    assert rates.update(1, 0, heard_at=0.0, now=0.1, done=False) == 0.0
    assert rates.update(1, 100, heard_at=1.0, now=1.1, done=False) == 800_000.0
    assert rates.update(1, 100, heard_at=1.0, now=1.9, done=False) == 800_000.0  # no news
    assert rates.update(1, 350, heard_at=2.0, now=2.2, done=False) == 2_000_000.0
    assert rates.update(1, 350, heard_at=2.0, now=5.5, done=False) == 0.0  # silent 3.5 s
    assert rates.update(2, 10, heard_at=2.0, now=2.0, done=False) == 0.0  # first report
    assert rates.update(2, 20, heard_at=3.0, now=3.0, done=True) == 0.0  # done
    assert rates.update(1, 5, heard_at=6.0, now=6.0, done=False) == 0.0  # restarted


def test_source_names_where_each_agents_blocks_came_from():
    """status's SOURCE column: the sources that served each agent any block, from its
    reports; a straggler with no block yet shows the peers it asked for."""
    from mcastdeploy.protocol.sender import ReceiverRecord, Sender, SenderConfig
    from mcastdeploy.service.session import snapshot

    sender = Sender(SenderConfig(session_id=1, group=("239.1.1.1", 9), rate_bps=10**8), 10_000,
                    origin=7)
    record = ReceiverRecord  # blocks_reported counts every way a block got done
    sender.receivers[1] = record(("10.0.0.1", 1), 0.0, 0.0, blocks_reported=1)
    sender.receivers[2] = record(("10.0.0.2", 1), 0.0, 0.0, asked_peers=True)
    sender.receivers[3] = record(("10.0.0.3", 1), 0.0, 0.0, blocks_reported=3, referred=True,
                                 blocks_from_peers=2, blocks_in_place=0)
    sender.receivers[4] = record(("10.0.0.4", 1), 0.0, 0.0, blocks_reported=3,
                                 blocks_in_place=1, blocks_from_source=1, blocks_from_origin=1)
    sender.receivers[5] = record(("10.0.0.5", 1), 0.0, 0.0)
    # Its DONE came, its last STATUS did not: the split is of what it reported.
    sender.receivers[6] = record(("10.0.0.6", 1), 0.0, 0.0, blocks_done=10, done=True,
                                 blocks_reported=4, blocks_from_peers=4)
    rows = {row["address"]: row for row in snapshot(sender, 0.0)["receivers"]}
    assert {address: row["source"] for address, row in rows.items()} == {
        "10.0.0.1": "multicast", "10.0.0.2": "peers", "10.0.0.3": "multicast+peers",
        "10.0.0.4": "source+origin", "10.0.0.5": "-", "10.0.0.6": "peers"}
    assert rows["10.0.0.4"]["blocks_from"] == {"multicast": 0, "peers": 0, "source": 1,
                                               "origin": 1}
    assert [rows[a]["straggler"] for a in sorted(rows)] == [False, True, True, False, False,
                                                            False]
