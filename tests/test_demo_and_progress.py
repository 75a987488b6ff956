"""The demo runs end to end; the progress display shows rate, ETA and repairs."""

from __future__ import annotations

import io
import json

from helpers import finish, mcastdeploy

from mcastdeploy.cli.progress import ProgressDisplay
from mcastdeploy.drivers.recv_session import RecvProgress
from mcastdeploy.drivers.send_session import SendProgress


def test_demo_checks_every_copy():
    code, out, err = finish(mcastdeploy("demo", "--receivers", "2", "--size", "4M"),
                            timeout=120)
    assert code == 0, out + err
    assert out.count("MATCH") == 2 and "MISMATCH" not in out
    assert "every copy matches the image" in out


def test_bar_shows_rate_eta_and_repairs():
    stream = io.StringIO()
    display = ProgressDisplay("bar", "recv", stream)
    display(RecvProgress("receiving", 0, 100_000_000, 0, 0, 0.0))
    display(RecvProgress("receiving", 50_000_000, 100_000_000, 12, 3, 1.0))
    display.close()
    last = stream.getvalue().split("\r")[-1]
    assert " 50.0%" in last and "50.0 MB/s" in last and "ETA 0:00:01" in last
    assert "repairs 12" in last and "lost 3" in last
    assert stream.getvalue().endswith("\n")


def test_send_bar_shows_receivers():
    stream = io.StringIO()
    display = ProgressDisplay("bar", "send", stream)
    display(SendProgress("repairing", 10, 10, 12, 4, 3, 2, 1.0))
    assert "receivers 2/3" in stream.getvalue() and "repairs 4" in stream.getvalue()


def test_json_lines_and_auto_mode():
    stream = io.StringIO()
    ProgressDisplay("json", "recv", stream)(RecvProgress("joining", 0, 0, 0, 0, 0.5))
    record = json.loads(stream.getvalue())
    assert record["state"] == "joining" and record["label"] == "recv"
    quiet = io.StringIO()  # not a terminal: auto shows nothing
    ProgressDisplay("auto", "recv", quiet)(RecvProgress("joining", 0, 0, 0, 0, 0.5))
    assert quiet.getvalue() == ""
