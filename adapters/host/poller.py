"""One I/O thread on epoll for device notifications and timers (domain.ports.IoPoller).

Timers are a heap of deadlines (time.monotonic()); the epoll timeout is the time left to the
earliest, and a timer added from another thread ahead of it writes the wake pipe so the loop
recomputes its timeout. Cancelled timers stay in the heap, marked, until popped (or until they
are most of it: then the heap is rebuilt), so cancel() is O(1).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import select
import threading
import time
from typing import Callable

log = logging.getLogger("pystrato.io")

_ONE = (1).to_bytes(8, "little")
_COMPACT_MIN = 64  # rebuild the heap only when at least this many cancelled timers sit in it


class _Timer:
    __slots__ = ("deadline", "callback", "cancelled")

    def __init__(self, deadline: float, callback: Callable[[], None]):
        self.deadline = deadline
        self.callback = callback
        self.cancelled = False


class EpollPoller:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._ep = select.epoll()
        self._callbacks: dict[int, tuple[Callable[[], None], bool]] = {}
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._ep.register(self._wake_r, select.EPOLLIN)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._clock = clock
        self._timers: list[tuple[float, int, _Timer]] = []  # (deadline, insertion order, timer)
        self._seq = itertools.count()
        self._cancelled = 0

    def new_eventfd(self) -> int:
        return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def signal(self, fd: int) -> None:
        os.write(fd, _ONE)

    def close_fd(self, fd: int) -> None:
        self.unwatch(fd)
        os.close(fd)

    def watch(self, fd: int, callback: Callable[[], None], *, drain_eventfd: bool = True) -> None:
        with self._lock:
            self._callbacks[fd] = (callback, drain_eventfd)
            self._ep.register(fd, select.EPOLLIN)

    def unwatch(self, fd: int) -> None:
        with self._lock:
            if self._callbacks.pop(fd, None) is not None:
                try:
                    self._ep.unregister(fd)
                except OSError:
                    pass

    # --- timers ------------------------------------------------------------------------------------

    def call_at(self, deadline: float, callback: Callable[[], None]) -> _Timer:
        timer = _Timer(deadline, callback)
        with self._lock:
            heapq.heappush(self._timers, (deadline, next(self._seq), timer))
            first = self._timers[0][2] is timer
        # The loop sleeps until the old earliest deadline: wake it to sleep less. From the I/O
        # thread itself (a callback re-arming) the loop recomputes its timeout anyway.
        if first and threading.current_thread() is not self._thread:
            self._wake()
        return timer

    def cancel(self, handle: _Timer) -> None:
        with self._lock:
            if handle.cancelled:
                return
            handle.cancelled = True
            self._cancelled += 1
            if self._cancelled >= _COMPACT_MIN and self._cancelled * 2 > len(self._timers):
                self._timers = [e for e in self._timers if not e[2].cancelled]
                heapq.heapify(self._timers)
                self._cancelled = 0

    def _timeout(self) -> float | None:
        """Seconds until the earliest live deadline (0 if due), None with no timer."""
        with self._lock:
            while self._timers and self._timers[0][2].cancelled:
                heapq.heappop(self._timers)
                self._cancelled -= 1
            if not self._timers:
                return None
            return max(self._timers[0][0] - self._clock(), 0.0)

    def _due(self) -> list[_Timer]:
        now = self._clock()
        due = []
        with self._lock:
            while self._timers and self._timers[0][0] <= now:
                _, _, timer = heapq.heappop(self._timers)
                if timer.cancelled:
                    self._cancelled -= 1
                else:
                    timer.cancelled = True  # fired: a later cancel() is a no-op
                    due.append(timer)
        return due

    # --- the loop -----------------------------------------------------------------------------------

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass  # the pipe is full: the loop is going to wake anyway

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="io", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        try:
            self._wake()
        except OSError:
            pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(2)

    def _loop(self) -> None:
        while not self._stopping:
            try:
                events = self._ep.poll(self._timeout())  # None: no timer, sleep until an fd
            except InterruptedError:
                continue
            for fd, _ in events:
                if fd == self._wake_r:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                    continue
                entry = self._callbacks.get(fd)
                if entry is None:
                    continue
                cb, drain = entry
                if drain:
                    try:
                        os.read(fd, 8)
                    except BlockingIOError:
                        continue
                    except OSError:
                        self.unwatch(fd)
                        continue
                try:
                    cb()
                except Exception:  # a device bug must not kill every other device's I/O
                    log.exception("I/O callback for fd %d failed", fd)
            for timer in self._due():
                try:
                    timer.callback()
                except Exception:
                    log.exception("timer callback %r failed", timer.callback)
