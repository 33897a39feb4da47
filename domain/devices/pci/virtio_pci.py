"""virtio-pci, modern only (virtio 1.1 §4.1), around the same VirtioDevice models as virtio-mmio.

Identity: vendor 0x1af4, device 0x1040 + virtio id, revision 1 (no legacy interface). Everything
lives in one 32-bit memory BAR (BAR 0), announced by vendor-specific capabilities:

    0x0000  common configuration (struct virtio_pci_common_cfg)
    0x1000  ISR status (read clears it)
    0x2000  device-specific configuration
    0x3000  notifications: queue n at 0x3000 + 4 n (notify_off_multiplier 4); the platform
            attaches an ioeventfd to each address, so a notify normally never exits
    0x4000  MSI-X table (one vector per queue plus one for configuration changes)
    0x5000  MSI-X pending-bit array

plus the VIRTIO_PCI_CAP_PCI_CFG window into the BAR through configuration space. Interrupts are
MSI-X only (Interrupt Pin 0): without ACPI the guest could not route INTx anyway.
"""

from __future__ import annotations

import struct
from typing import Callable

from domain.devices.pci import regs
from domain.devices.pci.device import PciDevice, overlaps
from domain.devices.pci.msi import MsixCapability, SendMsi
from domain.devices.state import check_range, check_state
from domain.devices.virtio.device import VirtioDevice
from domain.devices.virtio.mmio import INT_CONFIG, INT_USED_RING
from domain.devices.virtio.status import (DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, FAILED, FEATURES_OK,
                                          VirtioStatusMixin)
from domain.errors import SnapshotFormatError

# Capability cfg_type values (virtio 1.1 §4.1.4)
CAP_COMMON_CFG = 1
CAP_NOTIFY_CFG = 2
CAP_ISR_CFG = 3
CAP_DEVICE_CFG = 4
CAP_PCI_CFG = 5

BAR = 0
BAR_SIZE = 0x8000
COMMON_OFFSET, COMMON_SIZE = 0x0000, 0x38
ISR_OFFSET, ISR_SIZE = 0x1000, 0x1
DEVICE_OFFSET, DEVICE_SIZE = 0x2000, 0x1000
NOTIFY_OFFSET, NOTIFY_MULTIPLIER = 0x3000, 4
MSIX_TABLE_OFFSET = 0x4000
MSIX_PBA_OFFSET = 0x5000
REGION = 0x1000

NO_VECTOR = 0xFFFF

# struct virtio_pci_common_cfg
DFSELECT = 0x00
DF = 0x04
GFSELECT = 0x08
GF = 0x0C
MSIX_CONFIG = 0x10
NUM_QUEUES = 0x12
DEVICE_STATUS = 0x14
CONFIG_GENERATION = 0x15
Q_SELECT = 0x16
Q_SIZE = 0x18
Q_MSIX = 0x1A
Q_ENABLE = 0x1C
Q_NOFF = 0x1E
Q_DESCLO = 0x20
Q_DESCHI = 0x24
Q_AVAILLO = 0x28
Q_AVAILHI = 0x2C
Q_USEDLO = 0x30
Q_USEDHI = 0x34
_FIELD_SIZES = {DFSELECT: 4, DF: 4, GFSELECT: 4, GF: 4, MSIX_CONFIG: 2, NUM_QUEUES: 2, DEVICE_STATUS: 1,
                CONFIG_GENERATION: 1, Q_SELECT: 2, Q_SIZE: 2, Q_MSIX: 2, Q_ENABLE: 2, Q_NOFF: 2,
                Q_DESCLO: 4, Q_DESCHI: 4, Q_AVAILLO: 4, Q_AVAILHI: 4, Q_USEDLO: 4, Q_USEDHI: 4}
_QUEUE_ADDRS = {Q_DESCLO: ("desc_addr", 0), Q_DESCHI: ("desc_addr", 32), Q_AVAILLO: ("avail_addr", 0),
                Q_AVAILHI: ("avail_addr", 32), Q_USEDLO: ("used_addr", 0), Q_USEDHI: ("used_addr", 32)}

_CLASS = {1: regs.CLASS_NETWORK_ETHERNET, 2: regs.CLASS_STORAGE_SCSI}


class VirtioPciTransport(VirtioStatusMixin, PciDevice):
    def __init__(self, device: VirtioDevice, send_msi: SendMsi, *, name: str = "",
                 on_activate: Callable[["VirtioPciTransport"], object] | None = None):
        vid = device.device_id
        super().__init__(vendor=regs.VENDOR_VIRTIO, device=regs.DEVICE_VIRTIO_MODERN_BASE + vid,
                         class_code=_CLASS.get(vid, regs.CLASS_OTHERS), revision=1,
                         subsystem_vendor=regs.VENDOR_VIRTIO, subsystem_id=0x40 + vid, name=name)
        self.device = device
        self._on_activate = on_activate
        nq = len(device.queues)
        if NOTIFY_MULTIPLIER * nq > REGION:
            raise ValueError(f"{nq} queues do not fit the notify region")
        self.add_bar(BAR, BAR_SIZE)
        c = self.config
        self.msix = MsixCapability(c, nq + 1, send_msi, table_bar=BAR, table_offset=MSIX_TABLE_OFFSET,
                                   pba_bar=BAR, pba_offset=MSIX_PBA_OFFSET)
        self.caps.append(self.msix)
        self._vendor_cap(CAP_COMMON_CFG, COMMON_OFFSET, COMMON_SIZE)
        self._vendor_cap(CAP_ISR_CFG, ISR_OFFSET, ISR_SIZE)
        self._vendor_cap(CAP_DEVICE_CFG, DEVICE_OFFSET, DEVICE_SIZE)
        notify = self._vendor_cap(CAP_NOTIFY_CFG, NOTIFY_OFFSET, NOTIFY_MULTIPLIER * nq, extra=4)
        c.set(notify + 16, 4, NOTIFY_MULTIPLIER)
        self.pci_cfg = self._vendor_cap(CAP_PCI_CFG, 0, 0, extra=4)
        c.set_wmask(self.pci_cfg + 4, 1, 0xFF)  # bar
        c.set_wmask(self.pci_cfg + 8, 4, 0xFFFF_FFFF)  # offset
        c.set_wmask(self.pci_cfg + 12, 4, 0xFFFF_FFFF)  # length
        c.set_wmask(self.pci_cfg + 16, 4, 0xFFFF_FFFF)  # pci_cfg_data
        self.config_generation = 0
        self._clear()
        device.bind(self, self.lock)

    def _vendor_cap(self, cfg_type: int, offset: int, length: int, extra: int = 0) -> int:
        c = self.config
        cap = c.add_capability(regs.CAP_ID_VNDR, 16 + extra)
        c.set(cap + 2, 1, 16 + extra)
        c.set(cap + 3, 1, cfg_type)
        c.set(cap + 4, 1, BAR)
        c.set(cap + 8, 4, offset)
        c.set(cap + 12, 4, length)
        return cap

    def _clear(self) -> None:
        self._clear_common()
        self.msix_config = NO_VECTOR
        self.queue_vectors = [NO_VECTOR] * len(self.device.queues)

    # --- VirtioInterrupt (the device calls these, holding the shared lock) -----------------------

    def _interrupt(self, vector: int) -> None:
        if vector != NO_VECTOR:
            self.msix.notify(vector)

    def signal_queue(self, index: int) -> None:
        self.isr |= INT_USED_RING
        if 0 <= index < len(self.queue_vectors):
            self._interrupt(self.queue_vectors[index])

    def config_changed(self) -> None:
        self.config_generation = (self.config_generation + 1) & 0xFF
        if self.status & DRIVER_OK:
            self.isr |= INT_CONFIG
            self._interrupt(self.msix_config)

    def needs_reset(self, reason: str) -> None:
        self.status |= DEVICE_NEEDS_RESET
        self.needs_reset_reason = reason
        if self.status & DRIVER_OK:
            self.isr |= INT_CONFIG
            self._interrupt(self.msix_config)

    # --- queue notifications (the ioeventfd path calls this too) --------------------------------

    def notify(self, index: int) -> None:
        if self.status & DRIVER_OK and not self.status & DEVICE_NEEDS_RESET:
            self.device.process_queue(index)

    def notify_addresses(self) -> list[int]:
        """BAR-relative address of each queue's notify register."""
        return [NOTIFY_OFFSET + NOTIFY_MULTIPLIER * q for q in range(len(self.device.queues))]

    # --- BAR 0 -----------------------------------------------------------------------------------

    def bar_read(self, index: int, offset: int, size: int) -> bytes:
        with self.lock:
            region, rel = offset & ~(REGION - 1), offset & (REGION - 1)
            if index != BAR:
                return bytes(size)
            if region == COMMON_OFFSET:
                if size == 8 and rel in (Q_DESCLO, Q_AVAILLO, Q_USEDLO):
                    return struct.pack("<II", self._common_read(rel, 4), self._common_read(rel + 4, 4))
                if _FIELD_SIZES.get(rel) == size:
                    return self._common_read(rel, size).to_bytes(size, "little")
            elif region == ISR_OFFSET and rel == 0:
                isr, self.isr = self.isr, 0  # reading ISR acknowledges it
                return (isr & 0xFF).to_bytes(1, "little") + bytes(size - 1)
            elif region == DEVICE_OFFSET:
                buf = bytearray(size)
                self.device.read_config(rel, memoryview(buf))
                return bytes(buf)
            elif region == MSIX_TABLE_OFFSET:
                return self.msix.table_read(rel, size)
            elif region == MSIX_PBA_OFFSET:
                return self.msix.pba_read(rel, size)
            return bytes(size)

    def bar_write(self, index: int, offset: int, data) -> None:
        with self.lock:
            region, rel = offset & ~(REGION - 1), offset & (REGION - 1)
            size = len(data)
            if index != BAR:
                return
            if region == COMMON_OFFSET:
                if size == 8 and rel in (Q_DESCLO, Q_AVAILLO, Q_USEDLO):
                    lo, hi = struct.unpack("<II", bytes(data))
                    self._common_write(rel, lo)
                    self._common_write(rel + 4, hi)
                elif _FIELD_SIZES.get(rel) == size:
                    self._common_write(rel, int.from_bytes(data, "little"))
            elif region == DEVICE_OFFSET:
                if self.status & DRIVER and not self.status & FAILED:
                    self.device.write_config(rel, memoryview(bytes(data)))
            elif region == NOTIFY_OFFSET:
                if rel % NOTIFY_MULTIPLIER == 0 and size in (2, 4):
                    self.notify(rel // NOTIFY_MULTIPLIER)
            elif region == MSIX_TABLE_OFFSET:
                self.msix.table_write(rel, data)

    # --- common configuration ----------------------------------------------------------------------

    def _queue(self):
        qs = self.device.queues
        return qs[self.queue_sel] if self.queue_sel < len(qs) else None

    def _common_read(self, rel: int, size: int) -> int:
        dev = self.device
        if rel == DFSELECT:
            return self.device_features_sel
        if rel == DF:
            sel = self.device_features_sel
            return (dev.avail_features >> (32 * sel)) & 0xFFFF_FFFF if sel < 2 else 0
        if rel == GFSELECT:
            return self.driver_features_sel
        if rel == GF:
            sel = self.driver_features_sel
            return (self.driver_features >> (32 * sel)) & 0xFFFF_FFFF if sel < 2 else 0
        if rel == MSIX_CONFIG:
            return self.msix_config
        if rel == NUM_QUEUES:
            return len(dev.queues)
        if rel == DEVICE_STATUS:
            return self.status
        if rel == CONFIG_GENERATION:
            return self.config_generation
        if rel == Q_SELECT:
            return self.queue_sel
        q = self._queue()
        if q is None:
            return NO_VECTOR if rel == Q_MSIX else 0
        if rel == Q_SIZE:
            return q.size
        if rel == Q_MSIX:
            return self.queue_vectors[self.queue_sel]
        if rel == Q_ENABLE:
            return int(q.ready)
        if rel == Q_NOFF:
            return self.queue_sel
        name, shift = _QUEUE_ADDRS[rel]
        return (getattr(q, name) >> shift) & 0xFFFF_FFFF

    def _vector(self, value: int) -> int:
        return value if value < self.msix.vectors else NO_VECTOR

    def _common_write(self, rel: int, value: int) -> None:
        if rel == DFSELECT:
            self.device_features_sel = value
        elif rel == GFSELECT:
            self.driver_features_sel = value
        elif rel == GF:
            self._write_driver_features(value)
        elif rel == MSIX_CONFIG:
            self.msix_config = self._vector(value)
        elif rel == DEVICE_STATUS:
            self._write_status(value & 0xFF)
        elif rel == Q_SELECT:
            self.queue_sel = value
        elif rel == Q_MSIX:
            if self._queue() is not None:
                self.queue_vectors[self.queue_sel] = self._vector(value)
        elif rel in (Q_SIZE, Q_ENABLE) or rel in _QUEUE_ADDRS:
            self._write_queue(rel, value)

    def _write_queue(self, rel: int, value: int) -> None:
        # Queues are set up between FEATURES_OK and DRIVER_OK (virtio 1.1 §3.1.1); an enabled
        # queue's configuration is frozen, and a driver may not disable one (§4.1.4.3.2).
        q = self._queue()
        if q is None or q.ready or not self._status_is(FEATURES_OK, DRIVER_OK | FAILED | DEVICE_NEEDS_RESET):
            return
        if rel == Q_ENABLE:
            if value == 1:
                q.ready = True
        elif rel == Q_SIZE:
            q.size = value
        else:
            name, shift = _QUEUE_ADDRS[rel]
            keep = getattr(q, name) & ~(0xFFFF_FFFF << shift)
            setattr(q, name, keep | (value << shift))

    def reset(self) -> None:
        """Device reset: the driver wrote 0 to device_status."""
        with self.lock:
            self.device.reset()
            self._clear()

    def release(self) -> None:
        """The function leaves the VM: stop decoding, reset, drop every view of guest memory."""
        with self.lock:
            self.unmap_all()
            self.device.reset()
            self.device.release()
            self._clear()

    # --- VIRTIO_PCI_CAP_PCI_CFG: BAR access through configuration space ------------------------------

    def _cfg_window(self) -> tuple[int, int, int]:
        c, cap = self.config, self.pci_cfg
        return c.get(cap + 4, 1), c.get(cap + 8, 4), c.get(cap + 12, 4)

    def read_config(self, offset: int, size: int) -> int:
        with self.lock:
            data = self.pci_cfg + 16
            if overlaps(offset, size, data, 4) and offset == data:
                bar, off, length = self._cfg_window()
                if length in (1, 2, 4) and off % length == 0 and bar == BAR and off + length <= BAR_SIZE:
                    value = int.from_bytes(self.bar_read(bar, off, length), "little")
                    self.config.set(data, 4, value)
            return self.config.read(offset, size)

    def config_written(self, offset: int, size: int) -> None:
        super().config_written(offset, size)
        data = self.pci_cfg + 16
        if offset == data:
            bar, off, length = self._cfg_window()
            if length in (1, 2, 4) and length <= size and off % length == 0 and bar == BAR and off + length <= BAR_SIZE:
                self.bar_write(bar, off, self.config.data[data:data + length])

    # --- snapshot ------------------------------------------------------------------------------------

    def save_state(self) -> dict:
        with self.lock:
            return {"config": bytes(self.config.data), "status": self.status, "isr": self.isr,
                    "device_features_sel": self.device_features_sel,
                    "driver_features_sel": self.driver_features_sel,
                    "driver_features": self.driver_features, "queue_sel": self.queue_sel,
                    "config_generation": self.config_generation, "msix_config": self.msix_config,
                    "queue_vectors": list(self.queue_vectors), "msix_table": bytes(self.msix.table),
                    "msix_pba": bytes(self.msix.pba), "device": self.device.save_state()}

    def restore_state(self, state: dict) -> None:
        check_state(state, {"config": bytes, "status": int, "isr": int, "device_features_sel": int,
                            "driver_features_sel": int, "driver_features": int, "queue_sel": int,
                            "config_generation": int, "msix_config": int, "queue_vectors": list,
                            "msix_table": bytes, "msix_pba": bytes, "device": dict})
        if (len(state["msix_table"]) != len(self.msix.table) or len(state["msix_pba"]) != len(self.msix.pba)
                or len(state["queue_vectors"]) != len(self.queue_vectors)):
            raise SnapshotFormatError("virtio-pci MSI-X layout does not match the device")
        vectors = [check_range("queue vector", v, 0, NO_VECTOR) for v in state["queue_vectors"]]
        with self.lock:
            self.restore_config(state["config"])
            self.device.restore_state(state["device"])
            self.status = check_range("status", state["status"], 0, 0xFF)
            self.isr = check_range("isr", state["isr"], 0, 3)
            self.device_features_sel = check_range("device_features_sel", state["device_features_sel"], 0, 0xFFFF_FFFF)
            self.driver_features_sel = check_range("driver_features_sel", state["driver_features_sel"], 0, 0xFFFF_FFFF)
            self.driver_features = check_range("driver_features", state["driver_features"], 0, (1 << 64) - 1)
            self.queue_sel = check_range("queue_sel", state["queue_sel"], 0, 0xFFFF)
            self.config_generation = check_range("config_generation", state["config_generation"], 0, 0xFF)
            self.msix_config = check_range("msix_config", state["msix_config"], 0, NO_VECTOR)
            self.queue_vectors = vectors
            self.msix.table[:] = state["msix_table"]
            self.msix.pba[:] = state["msix_pba"]
            self.update_mappings()
            if self.device.activated and self._on_activate is not None:
                self._on_activate(self)
