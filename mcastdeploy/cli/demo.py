"""``mcastdeploy demo``: one sender and several receivers on loopback multicast, shown live.

It runs the real ``mcastdeploy send`` and ``recv`` commands as separate processes, exactly
as an operator would, and checks every copy with its own SHA-256 at the end.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import IO, Optional

import click

from mcastdeploy.spec import new_session

_REDRAW_EVERY = 0.2
_BAR_WIDTH = 30


@dataclass
class _Process:
    name: str
    popen: subprocess.Popen
    progress: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    _partial: bytes = b""

    def feed(self, chunk: bytes) -> None:
        """Progress arrives as JSON lines on stderr; anything else is an error message."""
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        for raw in lines:
            text = raw.decode(errors="replace").strip()
            if not text:
                continue
            try:
                self.progress = json.loads(text)
            except json.JSONDecodeError:
                self.errors.append(text)


def _write_random_image(path: str, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "wb") as handle:
        remaining = size
        while remaining:
            chunk = os.urandom(min(remaining, 1 << 20))
            handle.write(chunk)
            digest.update(chunk)
            remaining -= len(chunk)
    return digest.hexdigest()


def _sha256(path: str, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        remaining = size
        while remaining and (chunk := handle.read(min(remaining, 1 << 20))):
            digest.update(chunk)
            remaining -= len(chunk)
    return digest.hexdigest()


def _line(process: _Process) -> str:
    progress = process.progress
    total = progress.get("bytes_total") or 0
    done = progress.get("bytes_done", 0)
    fraction = done / total if total else 0.0
    filled = int(fraction * _BAR_WIDTH)
    state = progress.get("state", "starting")
    if process.popen.poll() is not None:
        state = "finished" if process.popen.returncode == 0 else "FAILED"
    extra = (f"receivers {progress.get('receivers_done', 0)}/{progress.get('receivers', 0)}"
             f"  repairs sent {progress.get('repairs_sent', 0)}"
             if process.name == "sender" else
             f"repairs asked {progress.get('repairs_asked', 0)}")
    return (f"  {process.name:<10} {state:<9} [{'#' * filled}{'.' * (_BAR_WIDTH - filled)}] "
            f"{fraction * 100:5.1f}%  {extra}")


def _render(processes: list[_Process], out: IO[str], first: bool) -> None:
    if not first:
        out.write(f"\x1b[{len(processes)}F")
    for process in processes:
        out.write(_line(process) + "\x1b[K\n")
    out.flush()


def run_demo(*, receivers: int, size: int, rate_bps: int, keep: Optional[str]) -> bool:
    """Run the demo; True when every receiver's copy has the image's SHA-256."""
    workdir = keep or tempfile.mkdtemp(prefix="mcastdeploy-demo-")
    os.makedirs(workdir, exist_ok=True)
    try:
        return _run(workdir, receivers, size, rate_bps)
    finally:
        if keep is None:
            for name in os.listdir(workdir):
                os.unlink(os.path.join(workdir, name))
            os.rmdir(workdir)


def _run(workdir: str, receivers: int, size: int, rate_bps: int) -> bool:
    echo = click.echo
    # The image and every copy land in workdir: a typo like --size 1T would otherwise
    # fill the disk (random bytes, written at full speed) before anything fails.
    needed, free = size * (receivers + 1), shutil.disk_usage(workdir).free
    if needed > free:
        raise OSError(errno.ENOSPC, f"the demo needs {needed / 2**20:.0f} MiB in {workdir} "
                                    f"for the image and {receivers} copies; "
                                    f"{free / 2**20:.0f} MiB are free")
    image = os.path.join(workdir, "image.raw")
    echo(f"Writing a random {size / 2**20:.0f} MiB image to {image} ...")
    image_sha = _write_random_image(image, size)
    spec = new_session(interface="lo", rate_bps=rate_bps)
    spec_path = os.path.join(workdir, "session.json")
    spec.save(spec_path)
    echo(f"Session {spec.session_id}: group {spec.group}:{spec.port} on lo, "
         f"{rate_bps / 1e6:g} Mbit/s, {receivers} receivers")
    base = [sys.executable, "-m", "mcastdeploy"]
    common = ["--session", spec_path, "--progress", "json", "--json"]
    processes: list[_Process] = []
    targets = []
    for number in range(1, receivers + 1):
        target = os.path.join(workdir, f"received-{number}.raw")
        targets.append(target)
        processes.append(_Process(f"receiver {number}", subprocess.Popen(
            base + ["recv", *common, "--timeout", "30", target],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)))
    processes.insert(0, _Process("sender", subprocess.Popen(
        base + ["send", *common, "--min-receivers", str(receivers), "--wait", "20",
                "--linger", "5", image],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)))
    deadline = time.monotonic() + 60 + size / 5e6
    try:
        _watch(processes, deadline)
    finally:
        for process in processes:
            if process.popen.poll() is None:
                process.popen.kill()
                process.popen.wait()
    echo("")
    echo(f"image     sha256 {image_sha}")
    all_ok = True
    for process, target in zip(processes[1:], targets):
        copy_sha = _sha256(target, size) if os.path.exists(target) else "(no copy)"
        ok = process.popen.returncode == 0 and copy_sha == image_sha
        all_ok &= ok
        rate = process.summary.get("mb_per_s", 0.0)
        echo(f"{process.name:<10} sha256 {copy_sha}  {'MATCH' if ok else 'MISMATCH'}  "
             f"{rate:6.1f} MB/s  repairs asked {process.summary.get('repairs_asked', '-')}")
        for message in process.errors:
            echo(f"  {message}")
    sender = processes[0]
    for message in sender.errors:
        echo(f"sender: {message}")
    echo(f"sender    sent {sender.summary.get('bytes_sent', 0) / 1e6:.1f} MB on the wire for a "
         f"{size / 1e6:.1f} MB image, {sender.summary.get('repairs_sent', 0)} repair packets")
    echo("every copy matches the image" if all_ok else "SOME COPIES DO NOT MATCH")
    return all_ok


def _watch(processes: list[_Process], deadline: float) -> None:
    out = sys.stdout
    live = out.isatty()
    with selectors.DefaultSelector() as selector:
        for process in processes:
            selector.register(process.popen.stderr, selectors.EVENT_READ, process)
        open_streams = len(processes)
        last_draw = 0.0
        first = True
        while open_streams and time.monotonic() < deadline:
            for key, _ in selector.select(_REDRAW_EVERY):
                chunk = os.read(key.fileobj.fileno(), 65536)  # type: ignore[union-attr]
                if chunk:
                    key.data.feed(chunk)
                else:
                    selector.unregister(key.fileobj)
                    open_streams -= 1
            now = time.monotonic()
            if now - last_draw >= (_REDRAW_EVERY if live else 1.0):
                if live:
                    _render(processes, out, first)
                    first = False
                else:
                    out.write(" | ".join(_line(p).strip() for p in processes) + "\n")
                last_draw = now
    if open_streams:
        raise click.ClickException("the demo did not finish in time")
    for process in processes:
        stdout = process.popen.stdout.read() if process.popen.stdout else b""  # type: ignore
        process.popen.wait(timeout=10)
        for line in stdout.decode(errors="replace").splitlines():
            try:
                process.summary = json.loads(line)
            except json.JSONDecodeError:
                pass
    if live:
        _render(processes, out, first)
