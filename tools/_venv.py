"""Lets a tools/ script run from a fresh checkout: bootstrap, then re-run under .venv."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(ROOT, ".venv")


def ensure() -> None:
    """Return at once inside the project's virtualenv; otherwise create it and re-exec."""
    if os.path.realpath(sys.prefix) == os.path.realpath(VENV):
        return
    subprocess.run([os.path.join(ROOT, "tools", "bootstrap")], check=True)
    python = os.path.join(VENV, "bin", "python")
    os.execv(python, [python, *sys.argv])
