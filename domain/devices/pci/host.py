"""The root complex: bus pcie.0, its host bridge, and the two ways in to configuration space.

``PciRoot`` routes a (bus, devfn) configuration access the way type-1 cycles travel: bus 0 is
the root bus; any other number goes down through the bridge whose secondary..subordinate range
holds it, so the bus numbers a guest (or the firmware step) wrote into the bridges decide what it
reaches. Nothing answers with all-ones, as a master abort does.

``PciConfigIo`` is configuration mechanism #1 (CONFIG_ADDRESS at 0xCF8, CONFIG_DATA at
0xCFC-0xCFF: what Linux uses without ACPI); ``PciEcam`` is the memory-mapped enhanced mechanism
(1 MiB per bus, 4 KiB per function), which Linux finds through ACPI's MCFG table.
"""

from __future__ import annotations

import struct
import threading
from typing import Protocol

from domain.devices.pci import regs
from domain.devices.pci.device import PciDevice
from domain.errors import DuplicateIdError

CONFIG_ADDRESS_PORT = 0xCF8
CONFIG_IO_SIZE = 8
ECAM_BUS_SIZE = 1 << 20


class PciFunction(Protocol):
    def read_config(self, offset: int, size: int) -> int: ...

    def write_config(self, offset: int, size: int, value: int) -> None: ...


def devfn(slot: int, function: int = 0) -> int:
    return slot << 3 | function


class PciBus:
    def __init__(self, name: str):
        self.name = name
        self.devices: dict[int, PciFunction] = {}

    def attach(self, devfn_: int, device: PciFunction) -> None:
        if not 0 <= devfn_ < 256:
            raise ValueError(f"devfn {devfn_} out of range")
        if devfn_ in self.devices:
            raise DuplicateIdError(f"{self.name}: {devfn_ >> 3:#x}.{devfn_ & 7} is already used")
        self.devices[devfn_] = device

    def detach(self, devfn_: int) -> PciFunction | None:
        return self.devices.pop(devfn_, None)


class HostBridge(PciDevice):
    """The Q35 MCH's identity at 00.0, as QEMU and StratoVirt present it (a known host bridge
    also passes Linux's type-1 sanity check)."""

    def __init__(self):
        super().__init__(vendor=regs.VENDOR_INTEL, device=regs.DEVICE_Q35_MCH,
                         class_code=regs.CLASS_BRIDGE_HOST, name="host-bridge")


class PciRoot:
    def __init__(self, name: str = "pcie.0"):
        self.bus = PciBus(name)

    def lookup(self, bus_no: int, devfn_: int) -> PciFunction | None:
        devices, number = self.bus.devices, 0
        while bus_no != number:
            for dev in devices.values():
                forwards = getattr(dev, "forwards", None)
                # A bridge only leads downwards (secondary > this bus), so there are no loops.
                if forwards is not None and forwards(bus_no) and dev.secondary_number > number:
                    devices, number = dev.visible_devices(), dev.secondary_number
                    break
            else:
                return None
        return devices.get(devfn_)

    def read(self, bus_no: int, devfn_: int, offset: int, size: int) -> int:
        dev = self.lookup(bus_no, devfn_)
        if dev is None:
            return regs.ALL_ONES.get(size, 0)
        return dev.read_config(offset, size)

    def write(self, bus_no: int, devfn_: int, offset: int, size: int, value: int) -> None:
        dev = self.lookup(bus_no, devfn_)
        if dev is not None:
            dev.write_config(offset, size, value)


def _int(data) -> int:
    return int.from_bytes(data, "little")


class PciConfigIo:
    """Ports 0xCF8-0xCFF. CONFIG_ADDRESS is a dword register (other widths do not touch it, as
    on real chipsets: Linux's probe writes a byte to 0xCFB and expects the latch unchanged)."""

    def __init__(self, root: PciRoot):
        self.root = root
        self.address = 0
        self.lock = threading.Lock()

    def _target(self, offset: int, size: int) -> tuple[int, int, int] | None:
        a = self.address
        if not a & 0x8000_0000 or offset + size > 4 or offset % size:
            return None
        return (a >> 16) & 0xFF, (a >> 8) & 0xFF, (a & 0xFC) + offset

    def read(self, offset: int, data: memoryview) -> None:
        size = len(data)
        value = regs.ALL_ONES.get(size, (1 << (8 * size)) - 1)
        if offset == 0 and size == 4:
            value = self.address
        elif offset >= 4 and size in (1, 2, 4):
            t = self._target(offset - 4, size)
            if t is not None:
                value = self.root.read(t[0], t[1], t[2], size)
        data[:] = value.to_bytes(size, "little")

    def write(self, offset: int, data: memoryview) -> None:
        size = len(data)
        if offset == 0 and size == 4:
            self.address = _int(data) & 0x80FF_FFFC
        elif offset >= 4 and size in (1, 2, 4):
            t = self._target(offset - 4, size)
            if t is not None:
                self.root.write(t[0], t[1], t[2], size, _int(data))


class PciEcam:
    """The ECAM window: offset = bus << 20 | devfn << 12 | register. 8-byte accesses are split
    into two dwords; anything unaligned reads all-ones and writes nothing."""

    def __init__(self, root: PciRoot, buses: int = 256):
        self.root = root
        self.size = buses * ECAM_BUS_SIZE
        self.lock = threading.Lock()

    @staticmethod
    def _decode(offset: int) -> tuple[int, int, int]:
        return offset >> 20, (offset >> 12) & 0xFF, offset & 0xFFF

    def read(self, offset: int, data: memoryview) -> None:
        size = len(data)
        if size == 8 and offset % 8 == 0:
            lo = self._read(offset, 4)
            hi = self._read(offset + 4, 4)
            struct.pack_into("<II", data, 0, lo, hi)
            return
        if size not in (1, 2, 4) or offset % size:
            data[:] = b"\xff" * size
            return
        data[:] = self._read(offset, size).to_bytes(size, "little")

    def _read(self, offset: int, size: int) -> int:
        bus, dfn, reg = self._decode(offset)
        return self.root.read(bus, dfn, reg, size)

    def write(self, offset: int, data: memoryview) -> None:
        size = len(data)
        if size == 8 and offset % 8 == 0:
            lo, hi = struct.unpack_from("<II", data, 0)
            self._write(offset, 4, lo)
            self._write(offset + 4, 4, hi)
            return
        if size not in (1, 2, 4) or offset % size:
            return
        self._write(offset, size, _int(data))

    def _write(self, offset: int, size: int, value: int) -> None:
        bus, dfn, reg = self._decode(offset)
        self.root.write(bus, dfn, reg, size, value)
