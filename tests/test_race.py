"""Smoke test of tools/race: a tiny race in a real rack, every copy verified, JSON complete.

The full benchmark takes many minutes and is run by hand (docs/race.rst); this only
checks that the tool builds its rack, runs mcastdeploy and the HTTP baseline, checks the
copies, tears everything down and reports what docs/race.rst relies on.  Needs root.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from rack_fixtures import rack_bed, rackbed  # noqa: F401  (fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORD_FIELDS = {"receivers", "loss", "run", "tool", "ok", "failure", "wall_s", "receiver_s",
                 "verified", "sender_cpu_s", "sender_sys_s", "receiver_cpu_s",
                 "receiver_sys_s", "sender_peak_core", "receiver_peak_core", "machine",
                 "details"}
CELL_FIELDS = {"receivers", "loss", "tool", "runs", "failures", "wall_s", "goodput_mb_s",
               "slowest_goodput_mb_s", "sender_cpu_s", "receiver_cpu_s"}


def test_tiny_race_verifies_every_copy(rack_bed):  # noqa: F811
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "race"), "--regime", "efficiency",
         "--receivers", "2", "--loss", "0", "--size-mb", "4", "--tools", "mcastdeploy,http",
         "--link", "1gbit", "--quiet-wait", "0", "--deadline", "60", "--json"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)

    assert report["command"].startswith("tools/race --regime efficiency")
    assert report["settings"]["size"] == 4 * 1024 * 1024
    records = report["records"]
    assert sorted(r["tool"] for r in records) == ["http", "mcastdeploy"]
    for record in records:
        assert RECORD_FIELDS <= set(record), RECORD_FIELDS - set(record)
        assert record["ok"], record["failure"]
        assert record["verified"] == {"r1": True, "r2": True}
        assert all(t is not None and 0 < t <= record["wall_s"]
                   for t in record["receiver_s"].values())
        assert record["sender_cpu_s"] > 0
    for cell in report["cells"]:
        assert CELL_FIELDS <= set(cell), CELL_FIELDS - set(cell)
        assert cell["failures"] == 0 and cell["goodput_mb_s"] > 0
    # The progress line names each tool, and nothing of the rack is left behind.
    assert "mcastdeploy" in result.stderr and "http" in result.stderr
    assert not [ns for ns in rackbed.netns_list() if ns.startswith("race")]
