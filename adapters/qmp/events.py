"""Fan-out of domain events to every connected QMP client (domain.ports.EventSink).

``emit`` may be called from any thread (vCPU threads, device threads, the loop itself). Every
event gets its timestamp and its place in one queue under a lock, so all clients see all events
in emission order. From the loop thread the queue is flushed at once: an event emitted inside a
command handler (STOP in ``stop``) is written before that command's reply, as the manual shows.
From other threads the flush is scheduled with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from typing import Any, Callable, Protocol

from .models import event_message
from .protocol import encode

log = logging.getLogger(__name__)

# Events waiting for the loop. Only reached if the loop stops running while clients are
# attached; past it the oldest events are dropped rather than memory growing.
MAX_PENDING_EVENTS = 10_000


class EventClient(Protocol):
    def send(self, line: bytes) -> None:
        """Queue one encoded line; a client whose backlog is too large drops itself."""


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class QmpEventBroadcaster:
    def __init__(self, loop: asyncio.AbstractEventLoop | None = None, *,
                 clock_ns: Callable[[], int] = time.time_ns):
        self._loop = loop
        self._clock_ns = clock_ns
        self._clients: list[EventClient] = []  # changed and read only in the loop thread
        self._pending: collections.deque[bytes] = collections.deque()
        self._lock = threading.Lock()

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        return self._loop

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Use ``loop`` (the QMP server's) for delivery; called by QmpServer.start()."""
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("QmpEventBroadcaster is bound to another event loop")

    def attach(self, client: EventClient) -> None:
        self._clients.append(client)

    def detach(self, client: EventClient) -> None:
        if client in self._clients:
            self._clients.remove(client)

    @property
    def clients(self) -> tuple[EventClient, ...]:
        return tuple(self._clients)

    def emit(self, event: Any) -> None:
        loop = self._loop
        if loop is None or not self._clients:
            return  # nobody is listening: QMP events are not replayed to later clients
        data = event.data()
        with self._lock:
            try:
                line = encode(event_message(event.name, data, self._clock_ns()))
            except (TypeError, ValueError):
                log.exception("QMP event %r has data that is not JSON", event.name)
                return
            if len(self._pending) >= MAX_PENDING_EVENTS:
                self._pending.popleft()
                log.warning("QMP event queue full: oldest event dropped")
            self._pending.append(line)
        if _running_loop() is loop:
            self._flush()
            return
        try:
            loop.call_soon_threadsafe(self._flush)
        except RuntimeError:  # the loop is closed: the server is gone
            with self._lock:
                self._pending.clear()

    def _flush(self) -> None:
        while True:
            with self._lock:
                if not self._pending:
                    return
                line = self._pending.popleft()
            for client in tuple(self._clients):
                client.send(line)
