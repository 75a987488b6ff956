"""Sending an image from wherever it lives: a local file or device, or a URL pulled once
into the rack head's cache, multicast while it downloads; qcow2 converted to raw once.

The command line and the rack-head service both send through ``send_image``, so there is
one place that decides between the plain path (the image is whole on disk: hash it, then
send) and the pipelined one (the download's hashed prefix goes out while the rest
arrives).
"""

from __future__ import annotations

import time
from typing import Callable, Mapping, Optional, Sequence

from mcastdeploy.drivers.growing_image import GrowingImage
from mcastdeploy.drivers.image_source import check_local_image
from mcastdeploy.drivers.send_session import (SendHooks, SendProgress, SendSummary,
                                              run_send, run_send_download)
from mcastdeploy.drivers.sources import ImageCache, is_remote, readers_for
from mcastdeploy.drivers.sources.qcow2 import is_qcow2, sendable
from mcastdeploy.spec import SessionSpec

#: Past the cache's own lock wait (another sender fetching the same image), how long the
#: first megabyte of a download may take before the send gives up.
FIRST_BYTES_TIMEOUT = 300.0


def send_image(spec: SessionSpec, image: str, *, copies: Sequence[str] = (),
               cache: ImageCache, min_receivers: int = 0, wait: Optional[float] = None,
               linger: float = 5.0,
               on_progress: Optional[Callable[[SendProgress], None]] = None,
               hooks: Optional[SendHooks] = None,
               environ: Optional[Mapping[str, str]] = None) -> SendSummary:
    """Multicast ``image`` (a path, or a URL with ``copies`` of it) per ``spec``.

    A URL the cache holds is sent from there (no network). Otherwise the download starts
    and, as soon as its first bytes are in, the multicast pass follows it, unless the
    image is qcow2 (it must be whole to be converted). ``environ`` holds Swift
    credentials (the process's environment by default); ``hooks`` let a caller steer
    the send (send_session.SendHooks). Raises SourceError, FetchError, NetworkError
    (one-line messages) for what cannot be sent.
    """
    started = time.monotonic()
    options = dict(min_receivers=min_receivers, wait=wait, linger=linger,
                   on_progress=on_progress, hooks=hooks, started=started)
    if not is_remote(image):
        if copies:
            raise ValueError("copies need the image to be a URL")
        check_local_image(image)  # before is_qcow2 opens it
        with sendable(image, spec, cache) as path:  # raw as is; qcow2 via the cache
            return run_send(spec, path, **options)
    with GrowingImage(cache, image, readers_for([image, *copies], environ=environ),
                      spec.image_sha256) as download:
        download.start()
        download.wait_started(cache.lock_timeout + FIRST_BYTES_TIMEOUT)
        if not download.finished and not _maybe_qcow2(spec, download):
            summary = run_send_download(spec, download, **options)
        else:
            download.wait_finished(cache.lock_timeout + FIRST_BYTES_TIMEOUT)
            cached = download.result()  # raises the download's error
            entry = cache.entry_id(image, spec.image_sha256)
            with sendable(cached.path, spec, cache, key="cache:" + entry,
                          sha256_verified=spec.image_sha256 is not None) as path:
                summary = run_send(spec, path, **options)
        summary.fetch_seconds = download.fetch_seconds
        summary.bytes_fetched = download.bytes_fetched
        return summary


def _maybe_qcow2(spec: SessionSpec, download: GrowingImage) -> bool:
    """The image may be qcow2 (pinned so, or its first bytes say so: the download has
    hashed at least a chunk of them): it cannot be sent before it is converted whole."""
    if spec.image_format == "qcow2":
        return True
    image = download.open()
    try:
        return is_qcow2(image.path)
    finally:
        image.close()
