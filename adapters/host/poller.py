"""One I/O thread on epoll for device notifications (domain.ports.IoPoller)."""

from __future__ import annotations

import logging
import os
import select
import threading
from typing import Callable

log = logging.getLogger("pystrato.io")

_ONE = (1).to_bytes(8, "little")


class EpollPoller:
    def __init__(self):
        self._ep = select.epoll()
        self._callbacks: dict[int, tuple[Callable[[], None], bool]] = {}
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._ep.register(self._wake_r, select.EPOLLIN)
        self._thread: threading.Thread | None = None
        self._stopping = False

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

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="io", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(2)

    def _loop(self) -> None:
        while not self._stopping:
            try:
                events = self._ep.poll()
            except InterruptedError:
                continue
            for fd, _ in events:
                if fd == self._wake_r:
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
