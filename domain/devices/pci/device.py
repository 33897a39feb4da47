"""A PCI function: its configuration space, its BARs and where they decode.

The guest (or the VMM acting as firmware) places a BAR by writing its register and enables
decoding with the Command register; whenever the effective address of a BAR changes, the device
calls ``on_bar_moved(device, bar, old, new)`` (None = not decoding) so the platform can move the
region on the MMIO bus and its ioeventfds. A BAR counts as placed with QEMU's rules: decoding
enabled, a non-zero address, and the whole BAR below the top of its address space (so the
all-ones pattern left while a driver sizes the BAR never maps).

Config accesses are serialised by ``lock``, which the BAR regions share on the MMIO bus.
Capabilities (MSI, MSI-X, PCI Express) attach themselves and hear about writes that touch them.
"""

from __future__ import annotations

import threading
from typing import Callable, Protocol

from domain.devices.pci import regs
from domain.devices.pci.config import PciConfig, PciConfigError, valid_access
from domain.devices.state import check_state
from domain.errors import SnapshotFormatError
from domain.record import record


@record
class Bar:
    index: int
    size: int
    io: bool = False
    mem64: bool = False
    prefetch: bool = False
    mapped: int | None = None  # where it decodes now

    @property
    def flag_bits(self) -> int:
        if self.io:
            return regs.BAR_SPACE_IO
        return (regs.BAR_MEM_TYPE_64 if self.mem64 else 0) | (regs.BAR_MEM_PREFETCH if self.prefetch else 0)


BarMoved = Callable[["PciDevice", Bar, "int | None", "int | None"], None]


class Capability(Protocol):
    offset: int
    length: int

    def written(self, rel: int, size: int) -> None:
        """The driver wrote ``size`` bytes at ``rel`` inside this capability (masks applied)."""


def overlaps(offset: int, size: int, start: int, length: int) -> bool:
    return offset < start + length and start < offset + size


class PciDevice:
    """A type-0 function (endpoint). Bridges extend it (bridge.PciBridge)."""

    header_type = regs.HEADER_TYPE_NORMAL

    def __init__(self, *, vendor: int, device: int, class_code: int, revision: int = 0,
                 subsystem_vendor: int = 0, subsystem_id: int = 0,
                 config_size: int = regs.CONFIG_SPACE_SIZE, name: str = ""):
        self.name = name
        self.lock = threading.RLock()
        self.config = c = PciConfig(config_size)
        c.set(regs.VENDOR_ID, 2, vendor)
        c.set(regs.DEVICE_ID, 2, device)
        c.set(regs.REVISION_ID, 1, revision)
        c.set(regs.CLASS_PROG, 3, class_code)
        c.set(regs.HEADER_TYPE, 1, self.header_type)
        c.set_wmask(regs.COMMAND, 2, regs.COMMAND_WRITABLE)
        c.set_w1c(regs.STATUS, 2, regs.STATUS_W1C)
        c.set_wmask(regs.CACHE_LINE_SIZE, 1, 0xFF)
        c.set_wmask(regs.LATENCY_TIMER, 1, 0xFF)
        c.set_wmask(regs.INTERRUPT_LINE, 1, 0xFF)
        if self.header_type == regs.HEADER_TYPE_NORMAL:
            c.set(regs.SUBSYSTEM_VENDOR_ID, 2, subsystem_vendor)
            c.set(regs.SUBSYSTEM_ID, 2, subsystem_id)
        self.bars: dict[int, Bar] = {}
        self.caps: list[Capability] = []
        self.on_bar_moved: BarMoved | None = None

    @property
    def vendor_id(self) -> int:
        return self.config.get(regs.VENDOR_ID, 2)

    @property
    def device_id(self) -> int:
        return self.config.get(regs.DEVICE_ID, 2)

    # --- BARs ----------------------------------------------------------------------------------

    def add_bar(self, index: int, size: int, *, io: bool = False, mem64: bool = False,
                prefetch: bool = False) -> Bar:
        limit = 2 if self.header_type == regs.HEADER_TYPE_BRIDGE else 6
        taken = set(self.bars) | {i + 1 for i, b in self.bars.items() if b.mem64}
        needed = {index, index + 1} if mem64 else {index}
        if index < 0 or max(needed) >= limit or needed & taken:
            raise PciConfigError(f"BAR {index} cannot be used")
        if size & (size - 1) or size < (4 if io else 16) or (io and mem64) or (not mem64 and size > 1 << 31):
            raise PciConfigError(f"BAR {index}: invalid size {size:#x}")
        bar = Bar(index, size, io=io, mem64=mem64, prefetch=prefetch)
        off = regs.BAR0 + 4 * index
        low_flags = 0x3 if io else 0xF
        mask = ~(size - 1) & ~low_flags & 0xFFFF_FFFF
        self.config.set(off, 4, bar.flag_bits)
        self.config.set_wmask(off, 4, mask)
        if mem64:
            self.config.set_wmask(off + 4, 4, (~(size - 1) >> 32) & 0xFFFF_FFFF)
        self.bars[index] = bar
        return bar

    def bar_address(self, bar: Bar) -> int:
        off = regs.BAR0 + 4 * bar.index
        addr = self.config.get(off, 4) & ~(0x3 if bar.io else 0xF)
        if bar.mem64:
            addr |= self.config.get(off + 4, 4) << 32
        return addr

    def set_bar_address(self, index: int, address: int) -> None:
        """Place a BAR (what firmware does before the OS runs)."""
        with self.lock:
            bar = self.bars[index]
            if address % bar.size:
                raise PciConfigError(f"BAR {index} address {address:#x} is not aligned to its size")
            off = regs.BAR0 + 4 * index
            self.config.set(off, 4, (address & 0xFFFF_FFFF) | bar.flag_bits)
            if bar.mem64:
                self.config.set(off + 4, 4, address >> 32)
            self.update_mappings()

    def _decode(self, bar: Bar) -> int | None:
        enable = regs.COMMAND_IO if bar.io else regs.COMMAND_MEMORY
        if not self.config.get(regs.COMMAND, 2) & enable:
            return None
        addr = self.bar_address(bar)
        last = addr + bar.size - 1
        top = 0xFFFF if bar.io else (1 << 64) - 1 if bar.mem64 else 0xFFFF_FFFF
        if addr == 0 or last >= top:
            return None
        return addr

    def update_mappings(self) -> None:
        for bar in self.bars.values():
            new = self._decode(bar)
            if new != bar.mapped:
                old, bar.mapped = bar.mapped, new
                if self.on_bar_moved is not None:
                    self.on_bar_moved(self, bar, old, new)

    def unmap_all(self) -> None:
        """Stop decoding every BAR (the device leaves the bus)."""
        with self.lock:
            for bar in self.bars.values():
                if bar.mapped is not None:
                    old, bar.mapped = bar.mapped, None
                    if self.on_bar_moved is not None:
                        self.on_bar_moved(self, bar, old, None)

    def enable_decoding(self) -> None:
        with self.lock:
            self.config.set_bits(regs.COMMAND, 2, regs.COMMAND_MEMORY | regs.COMMAND_IO)
            self.update_mappings()

    # --- configuration space (the bus calls these) ------------------------------------------------

    def read_config(self, offset: int, size: int) -> int:
        with self.lock:
            return self.config.read(offset, size)

    def write_config(self, offset: int, size: int, value: int) -> None:
        with self.lock:
            if not valid_access(offset, size, self.config.size):
                return
            self.config.write(offset, size, value)
            self.config_written(offset, size)

    def config_written(self, offset: int, size: int) -> None:
        if overlaps(offset, size, regs.COMMAND, 2) or overlaps(offset, size, regs.BAR0, 24):
            self.update_mappings()
        for cap in self.caps:
            if overlaps(offset, size, cap.offset, cap.length):
                start = max(offset, cap.offset)
                cap.written(start - cap.offset, min(offset + size, cap.offset + cap.length) - start)

    # --- snapshot ----------------------------------------------------------------------------------

    def save_state(self) -> dict:
        with self.lock:
            return {"config": bytes(self.config.data)}

    def restore_state(self, state: dict) -> None:
        check_state(state, {"config": bytes})
        with self.lock:
            self.restore_config(state["config"])
            self.update_mappings()

    def restore_config(self, data: bytes) -> None:
        """Take from an (untrusted) snapshot only the bits a driver can write or the device sets
        for it to clear; identity and capabilities stay this model's own."""
        c = self.config
        if len(data) != c.size or bytes(data[:4]) != bytes(c.data[:4]):
            raise SnapshotFormatError(f"{self.name or 'PCI function'}: config space does not match the device")
        for i in range(c.size):
            m = c.wmask[i] | c.w1cmask[i]
            if m:
                c.data[i] = (c.data[i] & ~m) | (data[i] & m)

    # --- BAR contents (the BAR regions on the MMIO bus call these) --------------------------------

    def bar_read(self, index: int, offset: int, size: int) -> bytes:
        return bytes(size)

    def bar_write(self, index: int, offset: int, data) -> None:
        pass


class BarRegion:
    """A BAR as an MMIO bus device: forwards accesses to the function with its lock."""

    def __init__(self, device: PciDevice, index: int):
        self.device = device
        self.index = index
        self.lock = device.lock

    def read(self, offset: int, data: memoryview) -> None:
        data[:] = self.device.bar_read(self.index, offset, len(data))

    def write(self, offset: int, data: memoryview) -> None:
        self.device.bar_write(self.index, offset, data)
