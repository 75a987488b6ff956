"""A seeder that misbehaves, for tests/test_rack_peers.py only: ``mcastdeploy recv`` whose
block server lies or dies.

It receives the image like any receiver (so the tracker lists it: it reports a seed port
and done), then serves stragglers through the real block server with one fault:

* ``hostile_seeder.py corrupt recv ...``: every block it serves has one byte flipped (it is
  still framed and sealed with the session key: an insider, not an outsider);
* ``hostile_seeder.py die:N recv ...``: after serving N blocks the process dies at once, with
  no goodbye on any socket but what the kernel sends for a dead process.

Each fault is announced on stderr when it first happens.
"""

from __future__ import annotations

import os
import sys

from mcastdeploy.cli.main import main
from mcastdeploy.drivers import peer_server

_read = peer_server.BlockServer._read
_served = 0
MODE = sys.argv.pop(1) if __name__ == "__main__" else ""


def _lying_read(self, image, block: int) -> bytes:
    global _served
    data = bytearray(_read(self, image, block))
    mode = MODE
    _served += 1
    if mode == "corrupt":
        data[len(data) // 2] ^= 0xFF
        if _served == 1:
            print("hostile seeder: serving corrupted blocks", file=sys.stderr, flush=True)
    elif mode.startswith("die:") and _served > int(mode[4:]):
        print(f"hostile seeder: dying after {_served - 1} blocks", file=sys.stderr, flush=True)
        os._exit(9)
    return bytes(data)


peer_server.BlockServer._read = _lying_read  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main())
