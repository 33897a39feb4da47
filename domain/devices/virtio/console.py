"""virtio-console (virtio 1.1 §5.3), one port: StratoVirt's virtio-serial-device + virtconsole.

Queues: 0 = receiveq (host -> guest), 1 = transmitq (guest -> host) of port 0. No optional
feature is offered (no SIZE, no MULTIPORT, no EMERG_WRITE), so the driver reads no config.

Transmit completes every buffer at once: Linux's hvc console spins until its buffer comes back,
so guest output is handed to the chardev (which never blocks; it drops without a client) and
never waits. Receive is pulled with back-pressure: the chardev calls ``receive(data)``, which
fills the guest's posted buffers and returns how many bytes fit; when the buffers run out the
chardev keeps the rest and stops reading until the guest posts buffers again, at which point the
device calls the chardev's ``input_ready()``. A guest without a driver thus never makes the
host buffer or spin. A paused device takes no input the same way; ``resume()`` calls
``input_ready()``.
"""

from __future__ import annotations

import struct

from domain.devices.state import check_state
from domain.devices.virtio import iov
from domain.devices.virtio.device import VIRTIO_ID_CONSOLE, VirtioDevice
from domain.errors import VmmError
from domain.memory import GuestMemory
from domain.ports import CharBackend

RX_QUEUE = 0
TX_QUEUE = 1
QUEUE_SIZE = 256
MAX_PORTS = 1


class VirtioConsole(VirtioDevice):
    device_id = VIRTIO_ID_CONSOLE

    def __init__(self, mem: GuestMemory, backend: CharBackend | None = None, *, queue_size: int = QUEUE_SIZE):
        super().__init__(mem, [queue_size, queue_size], 0)
        self.backend: CharBackend | None = None
        self.rx_stalled = False  # the chardev holds input back until input_ready()
        self._rx_deferred = False  # input refused while paused (not device state: resume wakes it)
        self.stats = {"rx_bytes": 0, "tx_bytes": 0, "tx_errors": 0}
        if backend is not None:
            self.connect(backend)

    def connect(self, backend: CharBackend) -> None:
        """Attach the port's chardev (virtconsole,chardev=) and start taking its input."""
        with self.lock:
            self.backend = backend
        backend.start(self.receive)

    def config_bytes(self) -> bytes:
        # cols, rows (F_SIZE), max_nr_ports (F_MULTIPORT), emerg_wr (F_EMERG_WRITE): none offered.
        return struct.pack("<HHII", 0, 0, MAX_PORTS, 0)

    # --- guest -> host -------------------------------------------------------------------------

    def handle_queue(self, index: int) -> None:
        if index == TX_QUEUE:
            self._tx()
        elif index == RX_QUEUE and self.rx_stalled:  # the guest posted receive buffers
            self._wake_input()

    def on_activate(self) -> None:
        # A restored device may have buffers posted already; a fresh one waits for the kick.
        if self.rx_stalled and self.queues[RX_QUEUE].has_available():
            self._wake_input()

    def on_resume(self) -> None:
        with self.lock:
            if not self._rx_deferred or self.paused:
                return
            self._rx_deferred = False
            backend = self.backend
        if backend is not None:
            backend.input_ready()

    def _wake_input(self) -> None:
        self.rx_stalled = False
        if self.backend is not None:
            self.backend.input_ready()

    def _tx(self) -> None:
        q = self.queues[TX_QUEUE]
        while True:
            q.disable_notification()
            while (chain := q.pop()) is not None:
                segs = [(a, n) for a, n, w in chain.descs if not w]
                self._send(iov.views(self.mem, segs, 0, iov.total(segs)))
                q.add_used(chain.head, 0)
            if not q.enable_notification():
                break
        self.signal_used(TX_QUEUE)

    def _send(self, views: list[memoryview]) -> None:
        for v in views:
            self.stats["tx_bytes"] += len(v)
            if self.backend is None:
                continue  # a port without a chardev: output goes nowhere
            try:
                self.backend.write(v)
            except (OSError, VmmError):
                self.stats["tx_errors"] += 1

    # --- host -> guest -------------------------------------------------------------------------

    def receive(self, data: bytes) -> int:
        """Copy chardev input into the guest's receive buffers; returns the bytes taken. Fewer
        than ``len(data)`` means the buffers ran out: ``input_ready()`` follows when there is
        room again."""
        with self.lock:
            if self.paused:
                self._rx_deferred = True
                return 0
            q = self.queues[RX_QUEUE]
            if not self.activated or not q.active:
                self.rx_stalled = True
                return 0
            taken = self.guarded(self._rx, memoryview(data))
            if taken is None:  # broken queue: the device needs a reset, the guest starts over
                self.rx_stalled = True
                return 0
            return taken

    def _rx(self, data: memoryview) -> int:
        q = self.queues[RX_QUEUE]
        done = 0
        while done < len(data):
            if not q.has_available() and not q.enable_notification():
                self.rx_stalled = True
                break
            q.disable_notification()
            chain = q.pop()
            if chain is None:
                continue
            segs = [(a, n) for a, n, w in chain.descs if w]
            n = iov.scatter(self.mem, segs, 0, data[done:])
            q.add_used(chain.head, n)
            done += n
        if done:
            self.stats["rx_bytes"] += done
            self.signal_used(RX_QUEUE)
        return done

    # --- snapshot ------------------------------------------------------------------------------

    def save_device_state(self) -> dict:
        return {"rx_stalled": self.rx_stalled}

    def restore_device_state(self, state: dict) -> None:
        check_state(state, {"rx_stalled": bool})
        # The destination's chardev is fresh and holds nothing back: only the guest's side
        # matters, and a stalled flag just makes the next kick wake the chardev.
        self.rx_stalled = state["rx_stalled"]
