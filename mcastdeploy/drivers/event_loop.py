"""Runs a sans-IO protocol object over real UDP sockets and the monotonic clock."""

from __future__ import annotations

import errno
import selectors
import socket
import time
from typing import Callable, Optional, Protocol, Sequence

#: Datagrams read from one socket before the loop looks at timers and sends again.
READ_BATCH = 512
#: Longest sleep in one select, so progress callbacks run even when nothing happens.
MAX_SLEEP = 0.25
RECV_BUFFER = 65536


class SansIO(Protocol):
    def start(self, now: float) -> None: ...
    def receive_datagram(self, data: bytes, addr: tuple, now: float) -> None: ...
    def datagrams_to_send(self, now: float) -> list[tuple[bytes, tuple]]: ...
    def get_timer(self) -> Optional[float]: ...
    def handle_timer(self, now: float) -> None: ...
    def next_event(self) -> object: ...


class Wakeup:
    """Lets another thread cut the loop's sleep short (a self-pipe over a socket pair).

    Without it, news from a thread (a download's next megabyte) would wait for the next
    timer or ``MAX_SLEEP``; with it the loop sleeps until something happens and no longer.
    """

    def __init__(self) -> None:
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)

    def wake(self) -> None:
        """Safe from any thread; a wake-up already pending is enough."""
        try:
            self._writer.send(b"\0")
        except (BlockingIOError, OSError):
            pass

    def fileno(self) -> int:
        return self._reader.fileno()

    def drain(self) -> None:
        try:
            while self._reader.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def close(self) -> None:
        self._reader.close()
        self._writer.close()


class EventLoop:
    """Moves datagrams between ``protocol`` and ``sockets`` until ``finished()`` says so.

    Sockets stay blocking so a full send buffer slows the sender down instead of dropping
    (reads use MSG_DONTWAIT).  ``before_send(now)`` lets the sender's driver supply image
    blocks just before the protocol decides what to send; ``on_event`` gets every event
    with the time; ``on_tick`` runs at least every ``MAX_SLEEP`` seconds (progress
    display); ``wakeup`` ends a sleep when another thread has news for ``before_send``.
    """

    def __init__(self, protocol: SansIO, sockets: Sequence[socket.socket],
                 send_socket: socket.socket, *,
                 on_event: Callable[[object, float], None],
                 finished: Callable[[], bool],
                 before_send: Optional[Callable[[float], None]] = None,
                 on_tick: Optional[Callable[[float], None]] = None,
                 wakeup: Optional[Wakeup] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.protocol = protocol
        self.sockets = list(sockets)
        self.send_socket = send_socket
        self.on_event = on_event
        self.finished = finished
        self.before_send = before_send
        self.on_tick = on_tick
        self.wakeup = wakeup
        self.clock = clock
        self.send_errors = 0

    def run(self, deadline: Optional[float] = None) -> None:
        with selectors.DefaultSelector() as selector:
            for sock in self.sockets:
                selector.register(sock, selectors.EVENT_READ)
            if self.wakeup is not None:
                selector.register(self.wakeup, selectors.EVENT_READ)
            now = self.clock()
            self.protocol.start(now)
            self._step(now)
            last_tick = now
            while not self.finished():
                now = self.clock()
                if deadline is not None and now >= deadline:
                    raise TimeoutError("the event loop ran past its deadline")
                timer = self.protocol.get_timer()
                sleep = MAX_SLEEP if timer is None else min(max(timer - now, 0.0), MAX_SLEEP)
                ready = selector.select(sleep)
                now = self.clock()
                for key, _ in ready:
                    if key.fileobj is self.wakeup:
                        self.wakeup.drain()  # type: ignore[union-attr]
                    else:
                        self._read(key.fileobj, now)  # type: ignore[arg-type]
                timer = self.protocol.get_timer()
                if timer is not None and now >= timer:
                    self.protocol.handle_timer(now)
                self._step(now)
                if self.on_tick is not None and now - last_tick >= MAX_SLEEP:
                    self.on_tick(now)
                    last_tick = now

    def _read(self, sock: socket.socket, now: float) -> None:
        for _ in range(READ_BATCH):
            try:
                data, addr = sock.recvfrom(RECV_BUFFER, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionRefusedError:
                continue  # an ICMP error from an earlier unicast send; nothing to read
            self.protocol.receive_datagram(data, addr, now)

    def _events(self, now: float) -> None:
        while (event := self.protocol.next_event()) is not None:
            self.on_event(event, now)

    def _step(self, now: float) -> None:
        self._events(now)
        if self.before_send is not None:
            self.before_send(now)
        self.send_pending(now)
        self._events(now)

    def send_pending(self, now: float) -> None:
        """Send what the protocol has to send now (also after ``run`` ended: last words)."""
        for data, addr in self.protocol.datagrams_to_send(now):
            try:
                self.send_socket.sendto(data, addr)
            except OSError as error:
                # A full queue or an unreachable peer loses this datagram: the protocol
                # treats it like any other loss.  So does a (subnet) broadcast address
                # the receiver cannot tell from a host's, named in a sealed ANNOUNCE.
                if error.errno not in (errno.ENOBUFS, errno.EAGAIN, errno.ECONNREFUSED,
                                       errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EACCES):
                    raise
                self.send_errors += 1
