"""A scriptable PCI *driver* side for tests, beside the code it tests (like virtio/mock.py).

``PciRig`` wires a root complex the way the machine does (ports 0xCF8-0xCFF on a PIO bus, BARs
moved on an MMIO bus, MSIs recorded); ``Conf1`` makes configuration accesses exactly as Linux's
pci_conf1_read/write do; ``VirtioPciDriver`` brings a virtio-pci function up through its
capabilities and BAR as Linux's virtio_pci_modern does.
"""

from __future__ import annotations

import struct

from domain.devices.bus import Bus
from domain.devices.pci import regs
from domain.devices.pci import virtio_pci as vp
from domain.devices.pci.device import BarRegion
from domain.devices.pci.host import CONFIG_ADDRESS_PORT, CONFIG_IO_SIZE, HostBridge, PciConfigIo, PciRoot
from domain.devices.virtio.mmio import ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK


class BusAccess:
    """A guest's loads and stores on a PIO and an MMIO bus (what a vCPU exit dispatches)."""

    def __init__(self, pio: Bus, mmio: Bus):
        self.pio = pio
        self.mmio = mmio

    def conf1(self) -> "Conf1":
        return Conf1(self.pio)

    def mmio_read(self, addr: int, size: int) -> int:
        buf = bytearray(size)
        if not self.mmio.read(addr, memoryview(buf)):
            return regs.ALL_ONES.get(size, (1 << (8 * size)) - 1)
        return int.from_bytes(buf, "little")

    def mmio_write(self, addr: int, size: int, value: int) -> bool:
        return self.mmio.write(addr, memoryview(value.to_bytes(size, "little")))


class PciRig(BusAccess):
    def __init__(self):
        super().__init__(Bus("pio"), Bus("mmio"))
        self.root = PciRoot()
        self.config_io = PciConfigIo(self.root)
        self.pio.insert(self.config_io, CONFIG_ADDRESS_PORT, CONFIG_IO_SIZE)
        self.host = HostBridge()
        self.root.bus.attach(0, self.host)
        self.msis: list[tuple[int, int]] = []
        self.moves: list[tuple[str, int, int | None, int | None]] = []

    def send_msi(self, address: int, data: int) -> None:
        self.msis.append((address, data))

    def bar_moved(self, dev, bar, old, new) -> None:
        self.moves.append((dev.name, bar.index, old, new))
        if old is not None:
            self.mmio.remove(old)
        if new is not None:
            self.mmio.insert(BarRegion(dev, bar.index), new, bar.size)

    def wire(self, dev):
        dev.on_bar_moved = self.bar_moved
        return dev


class Conf1:
    def __init__(self, pio: Bus):
        self.pio = pio

    def outl(self, port: int, value: int) -> None:
        self.pio.write(port, memoryview(struct.pack("<I", value)))

    def inl(self, port: int) -> int:
        buf = bytearray(4)
        self.pio.read(port, memoryview(buf))
        return struct.unpack("<I", buf)[0]

    def _address(self, bus: int, devfn: int, reg: int) -> int:
        return 0x8000_0000 | bus << 16 | devfn << 8 | (reg & 0xFC)

    def read(self, bus: int, devfn: int, reg: int, size: int = 4) -> int:
        self.outl(0xCF8, self._address(bus, devfn, reg))
        buf = bytearray(size)
        self.pio.read(0xCFC + (reg & 3), memoryview(buf))
        return int.from_bytes(buf, "little")

    def write(self, bus: int, devfn: int, reg: int, size: int, value: int) -> None:
        self.outl(0xCF8, self._address(bus, devfn, reg))
        self.pio.write(0xCFC + (reg & 3), memoryview(value.to_bytes(size, "little")))

    def capabilities(self, bus: int, devfn: int) -> list[tuple[int, int]]:
        """(offset, id) pairs, walking the list like pci_find_capability (bounded by 48 hops)."""
        out = []
        if not self.read(bus, devfn, regs.STATUS, 2) & regs.STATUS_CAP_LIST:
            return out
        at = self.read(bus, devfn, regs.CAPABILITY_LIST, 1)
        for _ in range(48):
            if at < 0x40:
                break
            at &= ~3
            out.append((at, self.read(bus, devfn, at, 1)))
            at = self.read(bus, devfn, at + 1, 1)
        return out

    def find(self, bus: int, devfn: int, cap_id: int) -> int | None:
        for at, cid in self.capabilities(bus, devfn):
            if cid == cap_id:
                return at
        return None

    def size_bar(self, bus: int, devfn: int, index: int) -> tuple[int, int]:
        """(size, flag bits) as __pci_read_base finds them: decoding off, write all-ones, read
        back, restore."""
        reg = regs.BAR0 + 4 * index
        cmd = self.read(bus, devfn, regs.COMMAND, 2)
        self.write(bus, devfn, regs.COMMAND, 2, cmd & ~(regs.COMMAND_MEMORY | regs.COMMAND_IO))
        orig = self.read(bus, devfn, reg)
        self.write(bus, devfn, reg, 4, 0xFFFF_FFFF)
        probe = self.read(bus, devfn, reg)
        self.write(bus, devfn, reg, 4, orig)
        flags = orig & (0x3 if orig & 1 else 0xF)
        mask = probe & ~(0x3 if orig & 1 else 0xF)
        size = 0
        if orig & 0x6 == regs.BAR_MEM_TYPE_64:
            orig_hi = self.read(bus, devfn, reg + 4)
            self.write(bus, devfn, reg + 4, 4, 0xFFFF_FFFF)
            mask |= self.read(bus, devfn, reg + 4) << 32
            self.write(bus, devfn, reg + 4, 4, orig_hi)
            size = (~mask & ((1 << 64) - 1)) + 1 if mask else 0
        elif mask:
            size = (~mask & 0xFFFF_FFFF) + 1
        self.write(bus, devfn, regs.COMMAND, 2, cmd)
        return size, flags


class VirtioPciDriver:
    """Linux's virtio_pci_modern, scripted: finds the capabilities, places BAR 0, enables
    decoding and MSI-X, and runs the status / feature / queue protocol through the BAR."""

    def __init__(self, rig: BusAccess, bus: int, devfn: int, bar_address: int | None = None):
        self.rig, self.bus, self.devfn = rig, bus, devfn
        self.c = rig.conf1()
        self.caps: dict[int, tuple[int, int, int]] = {}  # cfg_type -> (cap offset, bar offset, length)
        for at, cid in self.c.capabilities(bus, devfn):
            if cid == regs.CAP_ID_VNDR:
                cfg_type = self.c.read(bus, devfn, at + 3, 1)
                self.caps.setdefault(cfg_type, (at, self.c.read(bus, devfn, at + 8), self.c.read(bus, devfn, at + 12)))
        self.msix = self.c.find(bus, devfn, regs.CAP_ID_MSIX)
        if bar_address is not None:
            self.c.write(bus, devfn, regs.BAR0, 4, bar_address)
        self.c.write(bus, devfn, regs.COMMAND, 2, regs.COMMAND_MEMORY | regs.COMMAND_MASTER)
        self.base = self.c.read(bus, devfn, regs.BAR0) & ~0xF
        at = self.caps[vp.CAP_NOTIFY_CFG][0]
        self.notify_multiplier = self.c.read(bus, devfn, at + 16)

    # --- BAR accessors ---------------------------------------------------------------------------

    def _addr(self, cfg_type: int, offset: int) -> int:
        return self.base + self.caps[cfg_type][1] + offset

    def common_read(self, offset: int, size: int) -> int:
        return self.rig.mmio_read(self._addr(vp.CAP_COMMON_CFG, offset), size)

    def common_write(self, offset: int, size: int, value: int) -> None:
        self.rig.mmio_write(self._addr(vp.CAP_COMMON_CFG, offset), size, value)

    def isr(self) -> int:
        return self.rig.mmio_read(self._addr(vp.CAP_ISR_CFG, 0), 1)

    def read_device_config(self, offset: int, size: int) -> int:
        return self.rig.mmio_read(self._addr(vp.CAP_DEVICE_CFG, offset), size)

    # --- MSI-X -----------------------------------------------------------------------------------

    def msix_table_address(self) -> int:
        table = self.c.read(self.bus, self.devfn, self.msix + regs.MSIX_TABLE)
        return self.base + (table & ~7)

    def enable_msix(self, vectors: list[tuple[int, int]]) -> None:
        """Program entries (address, data) unmasked, then enable MSI-X (msix_capability_init)."""
        ctl = self.c.read(self.bus, self.devfn, self.msix + regs.MSIX_FLAGS, 2)
        self.c.write(self.bus, self.devfn, self.msix + regs.MSIX_FLAGS, 2,
                     ctl | regs.MSIX_FLAGS_ENABLE | regs.MSIX_FLAGS_MASKALL)
        table = self.msix_table_address()
        for i, (address, data) in enumerate(vectors):
            e = table + 16 * i
            self.rig.mmio_write(e, 4, address & 0xFFFF_FFFF)
            self.rig.mmio_write(e + 4, 4, address >> 32)
            self.rig.mmio_write(e + 8, 4, data)
            self.rig.mmio_write(e + 12, 4, 0)
        self.c.write(self.bus, self.devfn, self.msix + regs.MSIX_FLAGS, 2, ctl | regs.MSIX_FLAGS_ENABLE)

    # --- virtio protocol -------------------------------------------------------------------------

    def device_features(self) -> int:
        self.common_write(vp.DFSELECT, 4, 0)
        lo = self.common_read(vp.DF, 4)
        self.common_write(vp.DFSELECT, 4, 1)
        return lo | self.common_read(vp.DF, 4) << 32

    def status(self) -> int:
        return self.common_read(vp.DEVICE_STATUS, 1)

    def add_status(self, bits: int) -> int:
        self.common_write(vp.DEVICE_STATUS, 1, self.status() | bits)
        return self.status()

    def negotiate(self, features: int | None = None) -> bool:
        self.common_write(vp.DEVICE_STATUS, 1, 0)
        assert self.status() == 0
        self.add_status(ACKNOWLEDGE)
        self.add_status(DRIVER)
        feats = self.device_features() if features is None else features
        for sel in (0, 1):
            self.common_write(vp.GFSELECT, 4, sel)
            self.common_write(vp.GF, 4, (feats >> (32 * sel)) & 0xFFFF_FFFF)
        return bool(self.add_status(FEATURES_OK) & FEATURES_OK)

    def setup_queue(self, index: int, mq, vector: int) -> int:
        """Returns the vector the device accepted (NO_VECTOR when refused)."""
        self.common_write(vp.Q_SELECT, 2, index)
        self.common_write(vp.Q_SIZE, 2, mq.size)
        for lo, addr in ((vp.Q_DESCLO, mq.desc_addr), (vp.Q_AVAILLO, mq.avail_addr), (vp.Q_USEDLO, mq.used_addr)):
            self.common_write(lo, 4, addr & 0xFFFF_FFFF)
            self.common_write(lo + 4, 4, addr >> 32)
        self.common_write(vp.Q_MSIX, 2, vector)
        return self.common_read(vp.Q_MSIX, 2)

    def start(self, queues: list, config_vector: int = 0) -> int:
        if not self.negotiate():
            return self.status()
        self.common_write(vp.MSIX_CONFIG, 2, config_vector)
        for i, mq in enumerate(queues):
            self.setup_queue(i, mq, i + 1)
        for i in range(len(queues)):
            self.common_write(vp.Q_SELECT, 2, i)
            self.common_write(vp.Q_ENABLE, 2, 1)
        return self.add_status(DRIVER_OK)

    def notify_address(self, index: int) -> int:
        self.common_write(vp.Q_SELECT, 2, index)
        off = self.common_read(vp.Q_NOFF, 2)
        return self._addr(vp.CAP_NOTIFY_CFG, off * self.notify_multiplier)

    def notify(self, index: int) -> None:
        self.rig.mmio_write(self.notify_address(index), 2, index)
