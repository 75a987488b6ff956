"""One receive onto the install device, in its own thread, and what it has done so far.

The deploy step and early start both run a :class:`ReceiveJob`; the agent holds at most
one (``current_job``), which the ``status`` command reports on.  The job knows nothing of
IPA: the manager hands it the device (or how to find it) and how to prepare it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from mcastdeploy.drivers.recv_session import (RecvProgress, RecvSummary, SeedingStopped,
                                              run_recv)
from mcastdeploy.ipa.ironic_spec import IronicSpec
from mcastdeploy.drivers.sources import FetchError
from mcastdeploy.spec import SessionSpec, SpecError

LOG = logging.getLogger(__name__)
#: Seconds between progress lines in the agent's log.
LOG_INTERVAL = 10.0


#: Seconds a cancelled receive may take to let go of the device (it notices the cancel at
#: its next progress report, a fraction of a second).
STOP_TIMEOUT = 30.0


class JobStillRunning(RuntimeError):
    """A receive that was told to stop still runs: nothing else may write its device."""


class JobStopped(Exception):
    """Raised inside the receive (from its progress callback) to end it: cancelled, or
    past its deadline.  run_recv closes its sockets and target on the way out."""


@dataclass
class JobOutcome:
    ok: bool
    reason: str
    summary: Optional[RecvSummary] = None


class ReceiveJob:
    """Receives ``session`` onto the device ``find_device()`` names, once.

    ``prepare_device(device)`` runs before the first byte is written (IPA's metadata wipe).
    The outcome is a JobOutcome, never an exception: every failure means "fall back".
    """

    def __init__(self, ironic: IronicSpec, session: SessionSpec,
                 find_device: Callable[[], str],
                 prepare_device: Callable[[str], None] = lambda device: None,
                 *, early: bool = False, origin: Sequence[str] = (),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ironic = ironic
        self.session = session
        #: The raw image's URLs from Ironic: a straggler's very last resort.
        self.origin = tuple(origin)
        self.early = early
        self._find_device = find_device
        self._prepare_device = prepare_device
        self._clock = clock
        self._cancelled = threading.Event()
        self._done = threading.Event()
        self._lock = threading.Lock()
        self.device: Optional[str] = None
        self.state = "starting"
        self.outcome: Optional[JobOutcome] = None
        self._progress: Optional[RecvProgress] = None
        self._started = clock()
        self._first_byte_at: Optional[float] = None
        #: When the image was done (the rate is over the receive), and when the job ended
        #: (after seeding, if any).
        self._finished_at: Optional[float] = None
        self._ended_at: Optional[float] = None
        self._last_log = 0.0
        self._thread = threading.Thread(target=self._run, name="mcastdeploy-receive",
                                        daemon=True)

    def start(self) -> "ReceiveJob":
        self._thread.start()
        return self

    def cancel(self) -> None:
        self._cancelled.set()

    def wait(self, timeout: float) -> Optional[JobOutcome]:
        """The outcome, or None if the job is still running after ``timeout`` seconds."""
        self._done.wait(timeout)
        return self.outcome

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def stop(self, timeout: float = STOP_TIMEOUT) -> bool:
        """Cancel and wait (bounded) until the receive has let go of the device: nothing
        else may write to it before.  Whether it did."""
        self.cancel()
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        try:
            self._set_state("finding the install device")
            self.device = self._find_device()
            self._check_stop()
            self._set_state("preparing the install device")
            self._prepare_device(self.device)
            self._check_stop()
            self._set_state("waiting for the sender")
            summary = run_recv(self.session, self.device, timeout=self.ironic.timeout,
                               on_progress=self._on_progress, origin=self.origin,
                               seed_time=self.ironic.seed_time)
            outcome = JobOutcome(summary.ok, summary.reason, summary)
        except JobStopped as stop:
            outcome = JobOutcome(False, str(stop))
        except (OSError, SpecError, FetchError) as error:  # one-line reasons of their own
            LOG.warning("mcastdeploy: the multicast receive failed: %s", error)
            outcome = JobOutcome(False, str(error))
        except Exception as error:  # every failure of this path means: IPA downloads
            LOG.exception("mcastdeploy: the multicast receive failed")
            outcome = JobOutcome(False, f"{type(error).__name__}: {error}")
        with self._lock:
            self.outcome = outcome
            self.state = "done" if outcome.ok else "failed"
            self._ended_at = self._clock()
            if self._finished_at is None or not outcome.ok:
                self._finished_at = self._ended_at
        self._done.set()
        LOG.info("mcastdeploy: session %s onto %s: %s", self.session.session_id,
                 self.device, outcome.reason)

    def _set_state(self, state: str) -> None:
        with self._lock:
            self.state = state

    def _check_stop(self) -> None:
        if self._cancelled.is_set():
            raise JobStopped("cancelled")
        if self._clock() - self._started > self.ironic.deadline:
            raise JobStopped(f"not done within the deadline of {self.ironic.deadline:g} s")

    def _on_progress(self, progress: RecvProgress) -> None:
        now = self._clock()
        seeding = progress.seeding
        with self._lock:
            self._progress = progress
            if progress.bytes_total:
                self.state = "seeding" if seeding else "receiving"
            if progress.bytes_done and self._first_byte_at is None:
                self._first_byte_at = now
            if progress.state == "done" and self._finished_at is None:
                self._finished_at = now  # the rate and ETA are the receive's, not seeding's
        if now - self._last_log >= LOG_INTERVAL:
            self._last_log = now
            LOG.info("mcastdeploy: %s", self.status())
        if progress.state not in ("done", "failed"):  # a finished receive stands
            self._check_stop()
        elif seeding:
            try:
                self._check_stop()  # cancelled or past the deadline: stop serving peers
            except JobStopped as stop:
                LOG.info("mcastdeploy: seeding ends early: %s", stop)
                raise SeedingStopped(str(stop)) from None

    def status(self) -> dict:
        """What an operator asks: blocks, rate, ETA, state (JSON-serialisable)."""
        with self._lock:
            progress, state, outcome = self._progress, self.state, self.outcome
            first_byte_at, finished_at = self._first_byte_at, self._finished_at
            ended_at = self._ended_at
        clock = self._clock()
        now = finished_at if finished_at is not None else clock
        block_bytes = self.session.symbol_size * self.session.block_symbols
        done = progress.bytes_done if progress else 0
        total = progress.bytes_total if progress else 0
        receiving_for = now - first_byte_at if first_byte_at is not None else 0.0
        rate = done / receiving_for if receiving_for > 0 else 0.0
        eta = (total - done) / rate if rate > 0 and total and outcome is None else None
        return {
            "state": state,
            "session_id": self.session.session_id,
            "device": self.device,
            "early_start": self.early,
            "blocks_done": -(-done // block_bytes),
            "blocks_total": -(-total // block_bytes),
            "bytes_done": done,
            "bytes_total": total,
            "rate_mb_s": round(rate / 1e6, 3),
            "eta_s": round(eta, 1) if eta is not None else None,
            "elapsed_s": round((ended_at if ended_at is not None else clock) - self._started,
                               1),
            "reason": outcome.reason if outcome else None,
        }


_current: Optional[ReceiveJob] = None
_current_lock = threading.Lock()


def current_job() -> Optional[ReceiveJob]:
    return _current


def replace_current_job(job: Optional[ReceiveJob]) -> None:
    """Make ``job`` the agent's job; a running one it replaces is stopped first, so that
    two receives never write one disk.  Raises JobStillRunning if it does not stop."""
    global _current
    with _current_lock:
        previous, _current = _current, job
    if previous is not None and previous is not job and not previous.stop():
        raise JobStillRunning("the earlier receive did not stop; the install device is "
                              "still being written")
