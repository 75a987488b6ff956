"""What can go wrong getting an image from elsewhere: one read of one copy, or the fetch."""

from __future__ import annotations

__all__ = ["ReadError", "FetchError", "ChecksumMismatch", "CacheError"]


class ReadError(Exception):
    """One request to one copy failed. Readers raise only this, so the fetch can tell a copy's
    trouble (retry, fail over) from its own (a full disk ends the fetch at once).

    ``permanent``: asking this copy again cannot help (404, no Range support, another object);
    the fetch stops using it. ``unreachable``: the copy could not even be connected to; the
    fetch tries the next copy first instead of waiting, and comes back to this one later.
    Otherwise (a dropped connection, a 5xx, a timeout) the same copy is retried after a pause.
    The message starts with the copy's name, so it can be shown as it is.
    """

    def __init__(self, message: str, *, permanent: bool = False,
                 unreachable: bool = False) -> None:
        super().__init__(" ".join(message.split()))  # one line, whatever the server said
        self.permanent = permanent
        self.unreachable = unreachable


class FetchError(Exception):
    """The fetch cannot complete; the message is one line fit for an operator."""


class ChecksumMismatch(FetchError):
    """Every byte arrived but the SHA-256 is not the expected one; nothing was kept."""


class CacheError(FetchError):
    """The image cache cannot hold the image: too small, full of images in use, unusable
    directory, or another sender held the image's lock for too long."""
