"""Helpers for tests that run the real command line."""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import random
import subprocess
import sys
from types import ModuleType

import pytest

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")


def load_tool(name: str) -> ModuleType:
    """tools/NAME as a module, run in this interpreter (it has no .py suffix, and tools/
    is not a package).  Its re-exec into the project's .venv is for the command line: the
    tests already run where mcastdeploy imports, so it is switched off while loading."""
    if TOOLS not in sys.path:
        sys.path.insert(0, TOOLS)
    import _venv
    ensure = _venv.ensure
    _venv.ensure = lambda: None
    try:
        loader = importlib.machinery.SourceFileLoader(f"{name}_tool",
                                                      os.path.join(TOOLS, name))
        spec = importlib.util.spec_from_loader(loader.name, loader)
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
    finally:
        _venv.ensure = ensure
    return module


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


def transfer(spec_path, image, receivers: list[list[str]],
             send_args: tuple[str, ...] = ()) -> list[dict]:
    """One ``recv`` per argument list (its options, then its target) and a ``send`` of
    ``image`` that waits for all of them; every process must exit 0.  Their JSON
    summaries, the receivers' first."""
    processes = [mcastdeploy("recv", "--session", str(spec_path), "--json", "--timeout", "30",
                             *args) for args in receivers]
    processes.append(mcastdeploy("send", "--session", str(spec_path), "--min-receivers",
                                 str(len(receivers)), "--wait", "30", "--json", *send_args,
                                 str(image)))
    results = [finish(process, timeout=120) for process in processes]
    for code, _, err in results:
        assert code == 0, err
        assert "Traceback" not in err
    return [json.loads(out) for _, out, _ in results]
