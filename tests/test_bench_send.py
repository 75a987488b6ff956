"""Smoke test of tools/bench_send: every form and mode measured, numbers that make sense.

The real figures take a while and are recorded by hand (docs/performance-auth.rst); this
only checks that the tool runs both forms in all three modes and prints a sane table.
"""

from __future__ import annotations

import json
from types import ModuleType

import pytest
from helpers import load_tool

@pytest.fixture(scope="module")
def tool() -> ModuleType:
    return load_tool("bench_send")


def test_table_has_every_form_and_mode_with_sane_numbers(tool, capsys) -> None:
    assert tool.main(["--seconds", "0.05", "--repeats", "1", "-k", "16"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# k=16, L=1400")
    rows = {(fields[0], fields[1]): fields[2:] for fields in map(str.split, lines[2:])}
    assert set(rows) == {(form, mode) for form in ("sans-io", "loopback")
                         for mode in ("none", "auth", "encrypt")}
    for (form, mode), (packets, mb, cost) in rows.items():
        # Even a loaded machine sends thousands of packets per CPU-second; MB/s follows
        # from about 1.4 kB per datagram.
        assert float(packets) > 1000, (form, mode, packets)
        assert 1.0 < float(mb) * 1e6 / float(packets) / 1400 < 1.1, (form, mode)
        if mode == "none":
            assert cost == "-"
        else:
            assert cost.endswith("%") and -100 < float(cost[:-1]) < 100


def test_json_reports_the_costs(tool, capsys) -> None:
    assert tool.main(["--seconds", "0.05", "--repeats", "1", "--forms", "sans-io",
                      "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["info"]["k"] == 64
    costs = {row["mode"]: row["cost_percent"] for row in report["results"]}
    assert costs["none"] is None and set(costs) == {"none", "auth", "encrypt"}
