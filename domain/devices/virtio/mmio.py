"""virtio-mmio transport, version 2 (virtio 1.1 §4.2.2), one per device slot.

Registers are 32-bit and 32-bit aligned; the device config space starts at 0x100. Interrupts go
out through an injected ``trigger()`` (an irqfd in production). A slot may be empty (no device):
it then reads DeviceID 0, which tells the guest driver to ignore it.
"""

from __future__ import annotations

import struct
import threading
from typing import Callable

from domain.devices.state import check_range, check_state
from domain.devices.virtio.device import VirtioDevice
from domain.devices.virtio.status import (  # noqa: F401 (the status bits are re-exported)
    ACKNOWLEDGE,
    DEVICE_NEEDS_RESET,
    DRIVER,
    DRIVER_OK,
    FAILED,
    FEATURES_OK,
    VirtioStatusMixin,
)
from domain.errors import SnapshotFormatError

MAGIC_VALUE = 0x000
VERSION = 0x004
DEVICE_ID = 0x008
VENDOR_ID = 0x00C
DEVICE_FEATURES = 0x010
DEVICE_FEATURES_SEL = 0x014
DRIVER_FEATURES = 0x020
DRIVER_FEATURES_SEL = 0x024
QUEUE_SEL = 0x030
QUEUE_NUM_MAX = 0x034
QUEUE_NUM = 0x038
QUEUE_READY = 0x044
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS = 0x060
INTERRUPT_ACK = 0x064
STATUS = 0x070
QUEUE_DESC_LOW = 0x080
QUEUE_DESC_HIGH = 0x084
QUEUE_DRIVER_LOW = 0x090
QUEUE_DRIVER_HIGH = 0x094
QUEUE_DEVICE_LOW = 0x0A0
QUEUE_DEVICE_HIGH = 0x0A4
CONFIG_GENERATION = 0x0FC
CONFIG = 0x100

MMIO_MAGIC = 0x74726976  # "virt"
MMIO_VERSION = 2
VENDOR = 0x50595354  # "PYST"

INT_USED_RING = 0x1
INT_CONFIG = 0x2

_U32 = struct.Struct("<I")


class VirtioMmioTransport(VirtioStatusMixin):
    def __init__(self, device: VirtioDevice | None, trigger: Callable[[], object], *,
                 on_activate: Callable[["VirtioMmioTransport"], object] | None = None,
                 on_reset: Callable[["VirtioMmioTransport"], object] | None = None):
        self.lock = threading.RLock()
        self._trigger = trigger
        self._on_activate = on_activate
        self._on_reset = on_reset
        self.config_generation = 0
        self.device: VirtioDevice | None = None
        self._clear()
        self.set_device(device)

    def _clear(self) -> None:
        self._clear_common()

    def set_device(self, device: VirtioDevice | None) -> None:
        """Put a device into this slot (or empty it with None); the slot starts from reset."""
        with self.lock:
            if self.device is not None:
                self.device.reset()
                self.device.release()
            self._clear()
            self.device = device
            if device is not None:
                device.bind(self, self.lock)

    # --- VirtioInterrupt -----------------------------------------------------------------------

    def signal_queue(self, index: int) -> None:
        self.isr |= INT_USED_RING
        self._trigger()

    def config_changed(self) -> None:
        self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF
        if self.status & DRIVER_OK:
            self.isr |= INT_CONFIG
            self._trigger()

    def needs_reset(self, reason: str) -> None:
        self.status |= DEVICE_NEEDS_RESET
        self.needs_reset_reason = reason
        if self.status & DRIVER_OK:
            self.isr |= INT_CONFIG
            self._trigger()

    # --- queue notifications (the ioeventfd path calls this too) --------------------------------

    def notify(self, index: int) -> None:
        dev = self.device
        if dev is not None and self.status & DRIVER_OK and not self.status & DEVICE_NEEDS_RESET:
            dev.process_queue(index)

    # --- register access -----------------------------------------------------------------------

    def read(self, offset: int, data: memoryview) -> None:
        dev = self.device
        if offset >= CONFIG:
            if dev is None:
                data[:] = bytes(len(data))
            else:
                dev.read_config(offset - CONFIG, data)
            return
        if len(data) != 4 or offset % 4:
            data[:] = bytes(len(data))  # registers are 32-bit only
            return
        _U32.pack_into(data, 0, self._read_reg(offset, dev) & 0xFFFFFFFF)

    def _read_reg(self, offset: int, dev: VirtioDevice | None) -> int:
        if offset == MAGIC_VALUE:
            return MMIO_MAGIC
        if offset == VERSION:
            return MMIO_VERSION
        if offset == DEVICE_ID:
            return dev.device_id if dev is not None else 0
        if offset == VENDOR_ID:
            return VENDOR
        if dev is None:
            return 0
        if offset == DEVICE_FEATURES:
            return dev.avail_features >> (32 * self.device_features_sel) if self.device_features_sel < 2 else 0
        if offset == QUEUE_NUM_MAX:
            q = self._queue()
            return q.max_size if q is not None else 0
        if offset == QUEUE_READY:
            q = self._queue()
            return int(q.ready) if q is not None else 0
        if offset == INTERRUPT_STATUS:
            return self.isr
        if offset == STATUS:
            return self.status
        if offset == CONFIG_GENERATION:
            return self.config_generation
        return 0

    def _queue(self):
        dev = self.device
        if dev is None or self.queue_sel >= len(dev.queues):
            return None
        return dev.queues[self.queue_sel]

    def write(self, offset: int, data: memoryview) -> None:
        dev = self.device
        if offset >= CONFIG:
            if dev is not None and self.status & DRIVER and not self.status & FAILED:
                dev.write_config(offset - CONFIG, data)
            return
        if dev is None or len(data) != 4 or offset % 4:
            return
        value = _U32.unpack_from(data, 0)[0]
        if offset == QUEUE_NOTIFY:
            self.notify(value & 0xFFFF)
        elif offset == STATUS:
            self._write_status(value & 0xFF)
        elif offset == INTERRUPT_ACK:
            self.isr &= ~value
        elif offset == DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == DRIVER_FEATURES:
            self._write_driver_features(value)
        elif offset == QUEUE_SEL:
            self.queue_sel = value
        elif offset in _QUEUE_REGS:
            self._write_queue(offset, value)

    def _write_queue(self, offset: int, value: int) -> None:
        # Queue setup happens between FEATURES_OK and DRIVER_OK (virtio 1.1 §3.1.1).
        q = self._queue()
        if q is None or not self._status_is(FEATURES_OK, DRIVER_OK | FAILED | DEVICE_NEEDS_RESET):
            return
        if offset == QUEUE_READY:
            q.ready = bool(value & 1)
            return
        if q.ready:
            return  # a live queue's configuration is frozen
        if offset == QUEUE_NUM:
            q.size = value
        elif offset == QUEUE_DESC_LOW:
            q.desc_addr = (q.desc_addr & ~0xFFFFFFFF) | value
        elif offset == QUEUE_DESC_HIGH:
            q.desc_addr = (q.desc_addr & 0xFFFFFFFF) | (value << 32)
        elif offset == QUEUE_DRIVER_LOW:
            q.avail_addr = (q.avail_addr & ~0xFFFFFFFF) | value
        elif offset == QUEUE_DRIVER_HIGH:
            q.avail_addr = (q.avail_addr & 0xFFFFFFFF) | (value << 32)
        elif offset == QUEUE_DEVICE_LOW:
            q.used_addr = (q.used_addr & ~0xFFFFFFFF) | value
        elif offset == QUEUE_DEVICE_HIGH:
            q.used_addr = (q.used_addr & 0xFFFFFFFF) | (value << 32)

    def reset(self) -> None:
        """Device reset (the driver wrote 0 to Status)."""
        with self.lock:
            if self.device is not None:
                self.device.reset()
            self._clear()
            if self._on_reset is not None:
                self._on_reset(self)

    def release(self) -> None:
        with self.lock:
            if self.device is not None:
                self.device.release()

    # --- snapshot ------------------------------------------------------------------------------

    def save_state(self) -> dict:
        with self.lock:
            return {"status": self.status, "isr": self.isr, "device_features_sel": self.device_features_sel,
                    "driver_features_sel": self.driver_features_sel, "driver_features": self.driver_features,
                    "queue_sel": self.queue_sel, "config_generation": self.config_generation,
                    "device": self.device.save_state() if self.device is not None else None}

    def restore_state(self, state: dict) -> None:
        check_state(state, {"status": int, "isr": int, "device_features_sel": int, "driver_features_sel": int,
                            "driver_features": int, "queue_sel": int, "config_generation": int})
        dev_state = state.get("device")
        if (dev_state is None) != (self.device is None):
            raise SnapshotFormatError("virtio-mmio slot occupancy does not match the snapshot")
        with self.lock:
            if self.device is not None:
                self.device.restore_state(dev_state)
            self.status = check_range("status", state["status"], 0, 0xFF)
            self.isr = check_range("isr", state["isr"], 0, 3)
            self.device_features_sel = check_range("device_features_sel", state["device_features_sel"], 0, 0xFFFFFFFF)
            self.driver_features_sel = check_range("driver_features_sel", state["driver_features_sel"], 0, 0xFFFFFFFF)
            self.driver_features = check_range("driver_features", state["driver_features"], 0, (1 << 64) - 1)
            self.queue_sel = check_range("queue_sel", state["queue_sel"], 0, 0xFFFFFFFF)
            self.config_generation = check_range("config_generation", state["config_generation"], 0, 0xFFFFFFFF)
            if self.device is not None and self.device.activated and self._on_activate is not None:
                self._on_activate(self)


_QUEUE_REGS = frozenset((QUEUE_NUM, QUEUE_READY, QUEUE_DESC_LOW, QUEUE_DESC_HIGH, QUEUE_DRIVER_LOW,
                         QUEUE_DRIVER_HIGH, QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH))
