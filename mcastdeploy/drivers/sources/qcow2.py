"""qcow2 images, converted once to raw on the rack head: receivers write raw bytes to disk.

A qcow2 file is known by its magic bytes, never its name. ``qemu-img`` (Debian package
qemu-utils) converts it into a sparse raw file: zero regions stay holes, which the sender
then skips (SEEK_DATA, and the manifest's zero blocks).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
from typing import TYPE_CHECKING, Iterator, Optional

from mcastdeploy.drivers.image_source import SourceError

if TYPE_CHECKING:
    from mcastdeploy.drivers.sources.cache import ImageCache
    from mcastdeploy.spec import SessionSpec

__all__ = ["QCOW2_MAGIC", "is_qcow2", "check", "virtual_size", "convert_to_raw", "local_key",
           "sendable"]

QCOW2_MAGIC = b"QFI\xfb"
#: info reads a header: seconds; check reads all the metadata (tables, not data): minutes
#: at worst; a conversion writes the whole image: an hour covers hundreds of GB.
INFO_TIMEOUT = 60.0
CHECK_TIMEOUT = 600.0
CONVERT_TIMEOUT = 3600.0
#: qemu-img check: 0 clean, 3 only leaked clusters (wasted room, harmless to a reader).
_CHECK_OK = (0, 3)
_CHECK_CORRUPT = 2


def is_qcow2(path: str) -> bool:
    """Whether ``path`` starts with the qcow2 magic (a file name proves nothing)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == QCOW2_MAGIC
    except OSError as error:
        raise SourceError(f"cannot read image {path}: {error.strerror}") from None


def local_key(path: str) -> str:
    """The cache key of a local qcow2 file's conversion: its real path, size and mtime.
    Cheap (no hashing of the whole file at every send); a file rewritten in place keeps
    neither its mtime nor, usually, its size, so it is converted again."""
    info = os.stat(path)
    return f"file:{os.path.realpath(path)}:{info.st_size}:{info.st_mtime_ns}"


def _qemu_img() -> str:
    """The qemu-img binary, or a one-line error saying which package brings it."""
    binary = shutil.which("qemu-img")
    if binary is None:
        raise SourceError("qemu-img not found: converting qcow2 images needs it "
                          "(apt-get install qemu-utils)")
    return binary


def _run(args: list[str], timeout: float, what: str,
         ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess:
    """Run qemu-img; an exit status not in ``ok`` raises, its last stderr line as reason."""
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired:
        raise SourceError(f"{what}: qemu-img took more than {timeout:g} s") from None
    except OSError as error:
        raise SourceError(f"{what}: cannot run qemu-img: {error.strerror}") from None
    if done.returncode not in ok:
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit status {done.returncode}"
        raise SourceError(f"{what}: {reason}")
    return done


def virtual_size(path: str) -> int:
    """The size of the disk the qcow2 image describes: what the raw file will be."""
    what = f"cannot read qcow2 image {path}"
    out = _run([_qemu_img(), "info", "-f", "qcow2", "--output=json", path],
               INFO_TIMEOUT, what).stdout
    try:
        size = json.loads(out)["virtual-size"]
    except (ValueError, KeyError, TypeError):
        raise SourceError(f"{what}: qemu-img info gave no virtual size") from None
    if not isinstance(size, int) or size <= 0:
        raise SourceError(f"{what}: its virtual size is {size!r}")
    return size


def check(path: str) -> None:
    """Refuse a damaged qcow2. Without this, qemu-img converts a truncated file (a cut
    download) without a word, reading what is missing as zeros: a blank disk, verified."""
    what = f"cannot convert qcow2 image {path}"
    done = _run([_qemu_img(), "check", "-q", "-f", "qcow2", path], CHECK_TIMEOUT, what,
                ok=_CHECK_OK + (_CHECK_CORRUPT,))
    if done.returncode == _CHECK_CORRUPT:
        raise SourceError(f"{what}: it is damaged or truncated (qemu-img check found "
                          "errors)")


def convert_to_raw(source: str, scratch: str, destination: str,
                   timeout: Optional[float] = None) -> None:
    """Convert ``source`` to a sparse raw ``destination``, written as ``scratch`` then
    renamed: a killed conversion never leaves a complete-looking raw image."""
    what = f"cannot convert qcow2 image {source}"
    try:
        # -f qcow2: never let qemu-img guess a format from content we did not check.
        _run([_qemu_img(), "convert", "-q", "-f", "qcow2", "-O", "raw", source, scratch],
             CONVERT_TIMEOUT if timeout is None else timeout, what)
        os.replace(scratch, destination)
    except BaseException:
        try:
            os.unlink(scratch)
        except FileNotFoundError:
            pass
        raise


@contextlib.contextmanager
def sendable(path: str, spec: "SessionSpec", cache: "ImageCache",
             key: Optional[str] = None, sha256_verified: bool = False) -> Iterator[str]:
    """The file to multicast for the image at ``path``: itself if raw, else its raw
    conversion, made once in ``cache`` and held there while used.

    ``key`` names a qcow2's content for the cache (a fetched entry's id); a local file's
    is ``local_key``. Pins of a qcow2 (``image_format`` qcow2) are checked here, on the
    qcow2, before converting; ``sha256_verified`` says a fetch already checked the SHA-256.
    Pins of raw bytes are left to run_send, which checks them on what it sends.
    """
    if not is_qcow2(path):
        if spec.image_format == "qcow2":
            raise SourceError(f"image {path} is not qcow2, but the session spec pins a "
                              "qcow2 image (image_format)")
        yield path
        return
    if spec.image_format == "qcow2":
        _check_pins(path, spec, sha256_verified)
    with cache.get_or_convert(key or local_key(path), path) as raw:
        yield raw.path


def _check_pins(path: str, spec: "SessionSpec", sha256_verified: bool) -> None:
    """The qcow2 file is the one the spec pins (Ironic's checksum is of the stored qcow2)."""
    size = os.stat(path).st_size
    if spec.image_size is not None and size != spec.image_size:
        raise SourceError(f"image {path} is {size} bytes, the session spec says "
                          f"{spec.image_size}")
    if spec.image_sha256 is None or sha256_verified:
        return
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != spec.image_sha256:
        raise SourceError(f"image {path} does not match the session's sha256")
