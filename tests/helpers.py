"""Helpers for tests that run the real command line."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys

import pytest


def write_random(path, size: int, seed: int = 0) -> str:
    """Write ``size`` pseudo-random bytes; returns their SHA-256 hex."""
    data = random.Random(seed).randbytes(size)
    with open(path, "wb") as handle:
        handle.write(data)
    return hashlib.sha256(data).hexdigest()


def sha256_file(path, size: int | None = None) -> str:
    """SHA-256 of a file, or of its first ``size`` bytes (failing if it is shorter)."""
    digest = hashlib.sha256()
    remaining = size
    with open(path, "rb") as handle:
        while remaining is None or remaining:
            chunk = handle.read(1 << 20 if remaining is None else min(remaining, 1 << 20))
            if not chunk:
                assert remaining is None, f"{path} is shorter than {size} bytes"
                break
            digest.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)
    return digest.hexdigest()


def mcastdeploy(*args: str, **kwargs) -> subprocess.Popen:
    """Start the real command line as its own process."""
    return subprocess.Popen([sys.executable, "-m", "mcastdeploy", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), **kwargs)


def finish(process: subprocess.Popen, timeout: float = 60) -> tuple[int, str, str]:
    """Wait (bounded) for a process; kill it if it overstays."""
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"{process.args} did not finish in {timeout} s; stderr: {err[-2000:]}")
    return process.returncode, out, err
