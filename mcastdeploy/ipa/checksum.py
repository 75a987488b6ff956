"""Verifying the image Ironic names against the checksum Ironic gave, once it is on disk.

Ironic sends ``os_hash_algo``/``os_hash_value`` (Glance's multihash) or the older
``checksum`` (its algorithm told by its length, as IPA does).  Receivers write raw bytes:

- a raw image's checksum is of those bytes.  A SHA-256 becomes the session's pin, so the
  receiver refuses any other image before writing a block; other algorithms are checked
  by reading the written image back.
- a qcow2 image's checksum is of the qcow2 file, which the rack head converts to raw
  before sending.  The node cannot check it, so the session spec must pin that same
  SHA-256 of the qcow2 (``session new --image``): the sender refuses to send anything
  else, and every block the node takes is authenticated with the session key.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from mcastdeploy.spec import SessionSpec

#: Legacy ``checksum`` lengths (hex digits) -> algorithm, as IPA reads them.
_ALGORITHM_BY_LENGTH = {32: "md5", 64: "sha256", 128: "sha512"}
_READ_CHUNK = 4 << 20


class ChecksumError(ValueError):
    """Ironic's checksum cannot be verified on the multicast path, or does not match."""


@dataclass(frozen=True)
class ImageChecksum:
    algorithm: str
    value: str


def ironic_checksum(image_info: dict, *, md5_allowed: bool = False) -> ImageChecksum:
    """The checksum Ironic gave for the image (IPA refuses images without one too)."""
    algorithm, value = image_info.get("os_hash_algo"), image_info.get("os_hash_value")
    if not (algorithm and value):
        value = image_info.get("checksum")
        if not value:
            raise ChecksumError("Ironic gave no checksum for the image")
        if "://" in value:
            raise ChecksumError("Ironic's checksum is a URL; only IPA's own download "
                                "fetches those")
        algorithm = _ALGORITHM_BY_LENGTH.get(len(value))
        if algorithm is None:
            raise ChecksumError(f"cannot tell the algorithm of a {len(value)}-digit checksum")
    algorithm, value = str(algorithm).lower(), str(value).lower()
    if algorithm == "md5" and not md5_allowed:
        raise ChecksumError("Ironic's checksum is MD5, which the agent is configured to "
                            "refuse")
    if algorithm not in hashlib.algorithms_available:
        raise ChecksumError(f"unknown checksum algorithm {algorithm!r}")
    return ImageChecksum(algorithm, value)


def is_raw(image_info: dict) -> bool:
    return image_info.get("disk_format") in (None, "raw")


def pin_session(session: SessionSpec, checksum: ImageChecksum, raw: bool) -> SessionSpec:
    """The session with Ironic's checksum as its pin where the receiver can check it.

    Raises ChecksumError where the spec pins another image than Ironic deploys, or where
    a converted image's checksum is not vouched for by the sender's pin.
    """
    if raw:
        if checksum.algorithm != "sha256":
            return session  # checked after the write: check_written
        if session.image_sha256 not in (None, checksum.value) and \
                session.image_format == "raw":
            raise ChecksumError("the session spec pins another image than Ironic deploys")
        return session.replace(image_sha256=checksum.value, image_format="raw")
    if checksum.algorithm != "sha256" or session.image_format != "qcow2" \
            or session.image_sha256 != checksum.value:
        raise ChecksumError("the image is converted by the rack head, and the session spec "
                            "does not pin the same SHA-256 of it as Ironic "
                            "(mcastdeploy session new --image IMAGE)")
    return session


def check_written(device: str, size: int, sha256: str, checksum: ImageChecksum) -> None:
    """Raise ChecksumError unless the raw image just written (``size`` bytes, whose
    SHA-256 the receiver computed over what it wrote) has Ironic's checksum."""
    if checksum.algorithm == "sha256":
        matches = sha256 == checksum.value
    else:
        try:
            matches = _read_back_matches(device, size, checksum)
        except OSError as error:
            raise ChecksumError(f"cannot read the image back from {device}: "
                                f"{error.strerror or error}") from None
    if not matches:
        raise ChecksumError(f"the image received does not have Ironic's {checksum.algorithm}")


def _read_back_matches(device: str, size: int, checksum: ImageChecksum) -> bool:
    digest = hashlib.new(checksum.algorithm)
    remaining = size
    with open(device, "rb") as handle:
        while remaining:
            chunk = handle.read(min(remaining, _READ_CHUNK))
            if not chunk:
                return False
            digest.update(chunk)
            remaining -= len(chunk)
    return digest.hexdigest() == checksum.value
