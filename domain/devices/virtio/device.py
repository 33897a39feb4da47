"""Base of the virtio device models: features, queues, config space, activation and reset.

A device is transport-agnostic. The transport (virtio-mmio here) binds itself as the device's
``interrupt`` (VirtioInterrupt) and shares its lock with it, so that guest register accesses,
ioeventfd-driven ``process_queue`` calls and host-side calls (tap readable, balloon target) are
serialized per device.

Pause (live migration's final pass, a snapshot write): ``pause()`` makes the device start no
new work and waits for the work in flight; a queue notified meanwhile is remembered and
processed by ``resume()``, so no notification is lost. A restored device remembers every active
queue the same way (the source may have taken a notification it never processed), and the VM
resumes its devices once the state is in.
"""

from __future__ import annotations

import threading
from typing import Protocol, Sequence

from domain.devices.state import check_range, check_state
from domain.devices.virtio.queue import VirtioQueueError, VirtQueue
from domain.errors import GuestMemoryError, SnapshotFormatError
from domain.memory import GuestMemory

# Device ids (virtio 1.1 §5)
VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_CONSOLE = 3
VIRTIO_ID_BALLOON = 5

# Reserved feature bits (virtio 1.1 §6)
VIRTIO_RING_F_INDIRECT_DESC = 1 << 28
VIRTIO_RING_F_EVENT_IDX = 1 << 29
VIRTIO_F_VERSION_1 = 1 << 32

COMMON_FEATURES = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VIRTIO_RING_F_INDIRECT_DESC


class VirtioInterrupt(Protocol):
    def signal_queue(self, index: int) -> None:
        """Used buffers were added to queue ``index`` and the driver wants to hear about it."""

    def config_changed(self) -> None:
        """The device changed its config space."""

    def needs_reset(self, reason: str) -> None:
        """The device hit an error it cannot recover from without a driver reset."""


class _NoInterrupt:
    def signal_queue(self, index: int) -> None:
        pass

    def config_changed(self) -> None:
        pass

    def needs_reset(self, reason: str) -> None:
        pass


class VirtioDevice:
    device_id = 0

    def __init__(self, mem: GuestMemory, queue_sizes: Sequence[int], features: int):
        self.mem = mem
        self.lock = threading.RLock()  # replaced by the transport's lock when bound
        self.queues = [VirtQueue(mem, n) for n in queue_sizes]
        self.avail_features = features | COMMON_FEATURES
        self.acked_features = 0
        self.activated = False
        self.broken: str | None = None
        self.interrupt: VirtioInterrupt = _NoInterrupt()
        self.paused = False
        self._kicked: set[int] = set()  # queues notified while paused, processed on resume

    def bind(self, interrupt: VirtioInterrupt, lock) -> None:
        self.interrupt = interrupt
        self.lock = lock

    def has_feature(self, bit_mask: int) -> bool:
        return bool(self.acked_features & bit_mask)

    # --- config space --------------------------------------------------------------------------

    def config_bytes(self) -> bytes:
        """The device-specific config space as the driver currently sees it."""
        return b""

    def read_config(self, offset: int, data: memoryview) -> None:
        cfg = self.config_bytes()
        chunk = cfg[offset:offset + len(data)] if 0 <= offset < len(cfg) else b""
        data[:len(chunk)] = chunk
        data[len(chunk):] = bytes(len(data) - len(chunk))

    def write_config(self, offset: int, data: memoryview) -> None:
        """Driver writes to config space; read-only by default."""

    # --- lifecycle -----------------------------------------------------------------------------

    def activate(self) -> None:
        """The driver set DRIVER_OK: map the ready queues. Raises VirtioQueueError."""
        event_idx = self.has_feature(VIRTIO_RING_F_EVENT_IDX)
        for q in self.queues:
            if q.ready:
                q.activate(event_idx)
        self.activated = True
        self.broken = None
        self.on_activate()

    def on_activate(self) -> None:
        """Hook for subclasses, called after the queues are active."""

    def quiesce(self) -> None:
        """Wait for requests in flight outside the lock (none by default)."""

    def reset(self) -> None:
        self.quiesce()
        for q in self.queues:
            q.reset()
        self._kicked.clear()
        self.acked_features = 0
        self.activated = False
        self.broken = None
        self.on_reset()

    def pause(self) -> None:
        """Start no new work (queue notifications and host-side input are remembered, not
        handled) and wait for the work in flight. Guest RAM and the device state do not change
        until ``resume()``."""
        with self.lock:
            self.paused = True
            self.quiesce()

    def resume(self) -> None:
        """Take work again: process every queue notified while paused (and, after a restore,
        every active queue), then the device's own deferred input (``on_resume``)."""
        with self.lock:
            self.paused = False
            kicked = sorted(self._kicked)
            self._kicked.clear()
        for index in kicked:  # outside the lock: virtio-blk runs data I/O without it
            self.process_queue(index)
        self.on_resume()

    def on_resume(self) -> None:
        """Hook for subclasses: host-side input refused while paused (tap, chardev)."""

    def on_reset(self) -> None:
        """Hook for subclasses: forget in-flight state (the guest is starting over)."""

    def release(self) -> None:
        """Drop every view of guest memory (before the memory is unmapped)."""
        self.quiesce()
        for q in self.queues:
            q.release()
        self.activated = False

    # --- queue processing ----------------------------------------------------------------------

    def process_queue(self, index: int) -> None:
        """The driver notified queue ``index`` (MMIO QueueNotify or its ioeventfd)."""
        with self.lock:
            if not self.activated or not 0 <= index < len(self.queues) or not self.queues[index].active:
                return
            if self.paused:
                self._kicked.add(index)
                return
            self.guarded(self.handle_queue, index)

    def guarded(self, fn, *args):
        """Run queue work; a hostile or corrupt queue marks the device NEEDS_RESET, never crashes."""
        try:
            return fn(*args)
        except (VirtioQueueError, GuestMemoryError) as e:
            self.fail(str(e))
            return None

    def handle_queue(self, index: int) -> None:
        raise NotImplementedError

    def fail(self, reason: str) -> None:
        self.broken = reason
        self.activated = False
        self.interrupt.needs_reset(reason)

    def signal_used(self, index: int) -> None:
        if self.queues[index].needs_notification():
            self.interrupt.signal_queue(index)

    # --- snapshot ------------------------------------------------------------------------------

    def save_state(self) -> dict:
        with self.lock:
            self.quiesce()  # queue indices must not move under the snapshot
            return {"device_id": self.device_id, "acked_features": self.acked_features,
                    "activated": self.activated, "queues": [q.save_state() for q in self.queues],
                    "device": self.save_device_state()}

    def save_device_state(self) -> dict:
        return {}

    def restore_state(self, state: dict) -> None:
        check_state(state, {"device_id": int, "acked_features": int, "activated": bool, "queues": list,
                            "device": dict})
        if state["device_id"] != self.device_id:
            raise SnapshotFormatError(f"virtio device id {state['device_id']} does not match {self.device_id}")
        if len(state["queues"]) != len(self.queues):
            raise SnapshotFormatError("virtio queue count does not match the device")
        acked = check_range("acked_features", state["acked_features"], 0, (1 << 64) - 1)
        if acked & ~self.avail_features:
            raise SnapshotFormatError("virtio state acknowledges features the device does not offer")
        with self.lock:
            self.quiesce()
            for q, qs in zip(self.queues, state["queues"]):
                q.restore_state(qs)
            self.acked_features = acked
            self.restore_device_state(state["device"])
            self.activated = False
            if state["activated"]:
                try:
                    self.activate()
                except VirtioQueueError as e:
                    raise SnapshotFormatError(f"restored virtqueue is invalid: {e}") from None
                # The source may have taken a notification it did not process (it paused its
                # devices): the next resume() looks at every active queue.
                self._kicked.update(i for i, q in enumerate(self.queues) if q.active)

    def restore_device_state(self, state: dict) -> None:
        pass
