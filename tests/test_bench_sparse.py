"""Smoke test of tools/bench_sparse: a small sparse image crosses with its data only.

The figure itself (4 GB, 10 % data) is recorded in docs/images.rst."""

from __future__ import annotations

import json

from helpers import load_tool


def test_only_the_data_goes_on_the_wire(tmp_path, capsys) -> None:
    tool = load_tool("bench_sparse")
    assert tool.main(["--size", "48M", "--data", "0.2", "--json", "--dir", str(tmp_path)]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["blocks_zero"] > 0
    # Data plus headers, one parity symbol per block and the manifest: under 1.15 bytes
    # on the wire per data byte, where sending the holes would cost 1 / 0.2 = 5.
    assert 1.0 < row["wire_per_data_byte"] < 1.15, row
    assert list(tmp_path.iterdir()) == []
