"""vfio-pci: a host PCI function passed through to the guest, over the VfioDevice port.

Config space reads and writes go to the VFIO config region (vfio-pci already virtualises what the
host kernel must keep: the MSI/MSI-X enables, the INTx disable bit...), except what the VMM owns:
  - the BARs and the ROM BAR: the guest places them in guest-physical space, so their registers
    live in this function's own PciConfig (sizing with all-ones works through the write masks,
    the host's addresses never show) and placement reaches the platform through on_bar_moved;
  - the MSI-X table: the host kernel programs the real one, so guest accesses to it hit a shadow
    table here, and its pages stay out of the BAR mmaps (mmap_areas) so that they trap.
Interrupts: the platform hears MSI/MSI-X changes through on_irq_changed(fn, kind, vectors) and
hands one eventfd per vector to VfioDevice.set_irq_eventfds; when the host signals one, it calls
vector_fired(kind, n), which sends the guest's message through ``send`` (KVM_SIGNAL_MSI), or keeps
it pending while the guest has it masked and sends it on unmask (PCI 3.0 §6.8), as msi.py does for
emulated devices.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from domain.devices.pci import regs
from domain.devices.pci.config import PciConfigError, valid_access
from domain.devices.pci.device import Bar, PciDevice, overlaps
from domain.errors import HostResourceError
from domain.ports import VfioDevice

ROM_INDEX = 6  # the ROM BAR's index in on_bar_moved and bar_read, after BAR0..BAR5
ROM_ADDRESS_MASK = 0xFFFFF800
ROM_ENABLE = 0x1
BARS_LEN = 6 * 4
MSI_DATA_32 = 0x08  # regs names the 64-bit layout's offsets
MSI_MASK_32 = 0x0C
MSI_CAP_MAX = 0x18
MSIX_VIRTUAL = regs.MSIX_FLAGS_ENABLE | regs.MSIX_FLAGS_MASKALL
PAGE = 4096
_HEADER = regs.CONFIG_SPACE_SIZE  # identity, BARs and the capability list


@dataclass(frozen=True)
class MsixLayout:
    cap: int
    entries: int
    table_bar: int
    table_offset: int
    pba_bar: int
    pba_offset: int


@dataclass(frozen=True)
class MsiVector:
    address: int
    data: int
    masked: bool


IrqChanged = Callable[["VfioPciFunction", str, "list[MsiVector]"], None]
SendMsi = Callable[[int, int], object]
_U32 = struct.Struct("<I")


class VfioPciFunction(PciDevice):
    def __init__(self, device: VfioDevice, *, name: str = ""):
        self.dev = device
        self._cfg = device.indices.config
        cfg_size = device.region_info(self._cfg).size
        header = device.region_read(self._cfg, 0, _HEADER)

        def u(fmt: str, off: int) -> int:
            return struct.unpack_from(fmt, header, off)[0]

        super().__init__(vendor=u("<H", regs.VENDOR_ID), device=u("<H", regs.DEVICE_ID),
                         class_code=u("<I", regs.REVISION_ID) >> 8, revision=header[regs.REVISION_ID],
                         subsystem_vendor=u("<H", regs.SUBSYSTEM_VENDOR_ID), subsystem_id=u("<H", regs.SUBSYSTEM_ID),
                         config_size=regs.CONFIG_SPACE_EXP_SIZE if cfg_size >= regs.CONFIG_SPACE_EXP_SIZE
                         else regs.CONFIG_SPACE_SIZE, name=name or device.host)
        self._add_bars(header)
        self.rom = self._add_rom()
        self.msi_cap, self.msix = _find_caps(header)
        n = self.msix.entries if self.msix else 0
        self._msix_table = bytearray(n * regs.MSIX_ENTRY_SIZE)
        for i in range(n):  # entries start masked (PCI 3.0 §6.8.2.9)
            struct.pack_into("<I", self._msix_table, i * regs.MSIX_ENTRY_SIZE + regs.MSIX_ENTRY_VECTOR_CTRL,
                             regs.MSIX_ENTRY_CTRL_MASKBIT)
        if self.msix:
            self.config.set_wmask(self.msix.cap + regs.MSIX_FLAGS, 2, MSIX_VIRTUAL)
        self.on_irq_changed: IrqChanged | None = None
        self.send: SendMsi | None = None
        self._reported: dict[str, list[MsiVector]] = {}  # what on_irq_changed last heard, per kind
        self._pending: set[tuple[str, int]] = set()  # fired while masked

    def _add_bars(self, header: bytes) -> None:
        i = 0
        while i < 6:
            reg = struct.unpack_from("<I", header, regs.BAR0 + 4 * i)[0]
            size = self.dev.region_info(self.dev.indices.bars[i]).size
            io = bool(reg & regs.BAR_SPACE_IO)
            mem64 = not io and bool(reg & regs.BAR_MEM_TYPE_64)
            if size:
                try:
                    self.add_bar(i, size, io=io, mem64=mem64, prefetch=not io and bool(reg & regs.BAR_MEM_PREFETCH))
                except PciConfigError as e:
                    raise HostResourceError(f"VFIO {self.dev.host}: BAR {i} of {size:#x} bytes cannot be "
                                            f"passed through ({e})") from None
            i += 2 if mem64 else 1

    def _add_rom(self) -> Bar | None:
        size = self.dev.region_info(self.dev.indices.rom).size
        if not size:
            return None
        self.config.set_wmask(regs.ROM_ADDRESS, 4, (~(size - 1) & ROM_ADDRESS_MASK) | ROM_ENABLE)
        return Bar(ROM_INDEX, size)

    # --- placement --------------------------------------------------------------------------------

    def update_mappings(self) -> None:
        super().update_mappings()
        rom = self.rom
        if rom is None:
            return
        reg = self.config.get(regs.ROM_ADDRESS, 4)
        addr = reg & ROM_ADDRESS_MASK
        on = reg & ROM_ENABLE and self.config.get(regs.COMMAND, 2) & regs.COMMAND_MEMORY
        new = addr if on and addr and addr + rom.size - 1 < 0xFFFF_FFFF else None
        if new != rom.mapped:
            old, rom.mapped = rom.mapped, new
            if self.on_bar_moved is not None:
                self.on_bar_moved(self, rom, old, new)

    def unmap_all(self) -> None:
        super().unmap_all()
        with self.lock:
            if self.rom is not None and self.rom.mapped is not None:
                old, self.rom.mapped = self.rom.mapped, None
                if self.on_bar_moved is not None:
                    self.on_bar_moved(self, self.rom, old, None)

    def msix_windows(self, bar: int) -> list[tuple[int, int]]:
        """(offset, size) of this BAR that must trap: the MSI-X table and PBA, widened to pages."""
        out = []
        if self.msix is not None:
            m = self.msix
            for b, off, size in ((m.table_bar, m.table_offset, m.entries * regs.MSIX_ENTRY_SIZE),
                                 (m.pba_bar, m.pba_offset, (m.entries + 63) // 64 * 8)):
                if b == bar:
                    lo, hi = off // PAGE * PAGE, -(-(off + size) // PAGE) * PAGE
                    out.append((lo, hi - lo))
        return sorted(out)

    def mmap_areas(self, bar: int) -> list[tuple[int, int]]:
        """The parts of a BAR the platform may map straight into the guest (VfioDevice.region_mmap
        views): the kernel's mmap areas minus the MSI-X windows. The rest traps to bar_read/write."""
        info = self.dev.region_info(self.dev.indices.bars[bar])
        return subtract(list(info.mmap_areas), self.msix_windows(bar))

    # --- configuration space ------------------------------------------------------------------------

    def _virtual(self, offset: int, size: int) -> bool:
        return overlaps(offset, size, regs.BAR0, BARS_LEN) or overlaps(offset, size, regs.ROM_ADDRESS, 4)

    def read_config(self, offset: int, size: int) -> int:
        with self.lock:
            if not valid_access(offset, size, self.config.size):
                return regs.ALL_ONES.get(size, 0)
            if self._virtual(offset, size):
                return self.config.read(offset, size)
            value = int.from_bytes(self.dev.region_read(self._cfg, offset, size), "little")
            if self.msix is not None and overlaps(offset, size, self.msix.cap + regs.MSIX_FLAGS, 2):
                shift = 8 * (self.msix.cap + regs.MSIX_FLAGS - offset)
                virtual = _shifted(MSIX_VIRTUAL, shift, size)
                value = (value & ~virtual) | (_shifted(self.config.get(self.msix.cap + regs.MSIX_FLAGS, 2), shift, size)
                                              & virtual)
            return value

    def write_config(self, offset: int, size: int, value: int) -> None:
        with self.lock:
            if not valid_access(offset, size, self.config.size):
                return
            self.config.write(offset, size, value)  # keeps COMMAND, BARs, ROM, MSI-X enables here
            if not self._virtual(offset, size):
                self.dev.region_write(self._cfg, offset, (value & regs.ALL_ONES[size]).to_bytes(size, "little"))
            if overlaps(offset, size, regs.COMMAND, 2) or self._virtual(offset, size):
                self.update_mappings()
            if self.msix is not None and overlaps(offset, size, self.msix.cap + regs.MSIX_FLAGS, 2):
                self._msix_changed()
            if self.msi_cap is not None and overlaps(offset, size, self.msi_cap, MSI_CAP_MAX):
                self._report("msi", self.msi_vectors())

    # --- MSI / MSI-X ----------------------------------------------------------------------------------

    def msix_vectors(self) -> list[MsiVector]:
        if self.msix is None:
            return []
        all_masked = bool(self.config.get(self.msix.cap + regs.MSIX_FLAGS, 2) & regs.MSIX_FLAGS_MASKALL)
        out = []
        for i in range(self.msix.entries):
            lo, hi, data, ctrl = struct.unpack_from("<IIII", self._msix_table, i * regs.MSIX_ENTRY_SIZE)
            out.append(MsiVector(hi << 32 | lo, data, all_masked or bool(ctrl & regs.MSIX_ENTRY_CTRL_MASKBIT)))
        return out

    def _msix_changed(self) -> None:
        enabled = self.config.get(self.msix.cap + regs.MSIX_FLAGS, 2) & regs.MSIX_FLAGS_ENABLE
        self._report("msix", self.msix_vectors() if enabled else [])

    def msi_vectors(self) -> list[MsiVector]:
        """MSI as the guest programmed it: vfio-pci keeps the capability virtual and reads it back."""
        if self.msi_cap is None:
            return []
        cap = self.dev.region_read(self._cfg, self.msi_cap, min(MSI_CAP_MAX, self.config.size - self.msi_cap))
        ctrl = struct.unpack_from("<H", cap, regs.MSI_FLAGS)[0]
        if not ctrl & regs.MSI_FLAGS_ENABLE:
            return []
        address = struct.unpack_from("<I", cap, regs.MSI_ADDRESS_LO)[0]
        wide = bool(ctrl & regs.MSI_FLAGS_64BIT)
        if wide:
            address |= struct.unpack_from("<I", cap, regs.MSI_ADDRESS_HI)[0] << 32
        data = struct.unpack_from("<H", cap, regs.MSI_DATA_64 if wide else MSI_DATA_32)[0]
        mask = 0
        if ctrl & regs.MSI_FLAGS_MASKBIT:
            mask = struct.unpack_from("<I", cap, regs.MSI_MASK_64 if wide else MSI_MASK_32)[0]
        # Multiple message enable: 2^n vectors, the device puts the vector number in data's low bits.
        count = 1 << ((ctrl & regs.MSI_FLAGS_QSIZE) >> 4)
        return [MsiVector(address, (data & ~(count - 1)) | v, bool(mask >> v & 1)) for v in range(count)]

    def _report(self, kind: str, vectors: list[MsiVector]) -> None:
        if self._reported.get(kind, []) == vectors:
            return
        self._reported[kind] = vectors
        if self.on_irq_changed is not None:
            self.on_irq_changed(self, kind, vectors)
        for k, n in sorted(self._pending):
            if k != kind:
                continue
            if n >= len(vectors):  # disabled: nothing stays pending
                self._pending.discard((k, n))
            elif not vectors[n].masked:
                self._pending.discard((k, n))
                self._send(vectors[n])

    def _send(self, v: MsiVector) -> None:
        if self.send is not None:
            self.send(v.address, v.data)

    def vector_fired(self, kind: str, n: int) -> bool:
        """The host signalled vector ``n`` of "msi" or "msix" (its eventfd fired). False when the
        guest has not enabled that vector (nothing is sent or kept)."""
        with self.lock:
            vectors = self._reported.get(kind, [])
            if not 0 <= n < len(vectors):
                return False
            if vectors[n].masked:
                self._pending.add((kind, n))
            else:
                self._send(vectors[n])
            return True

    def is_pending(self, kind: str, n: int) -> bool:
        return (kind, n) in self._pending

    # --- trapped BAR accesses (BarRegion calls these with the lock held) ------------------------------

    def _window(self, bar: int, offset: int, size: int) -> str | None:
        """"table" or "pba" when the access falls in that MSI-X structure, else None."""
        m = self.msix
        if m is None:
            return None
        for name, b, start, length in (("table", m.table_bar, m.table_offset, m.entries * regs.MSIX_ENTRY_SIZE),
                                       ("pba", m.pba_bar, m.pba_offset, (m.entries + 63) // 64 * 8)):
            if b == bar and overlaps(offset, size, start, length):
                return name
        return None

    def bar_read(self, index: int, offset: int, size: int) -> bytes:
        window = self._window(index, offset, size)
        if window == "table":
            rel = offset - self.msix.table_offset
            if size not in (4, 8) or rel % size or rel < 0 or rel + size > len(self._msix_table):
                return bytes(size)
            return bytes(self._msix_table[rel:rel + size])
        if window == "pba":
            rel = offset - self.msix.pba_offset
            bits = sum(1 << n for k, n in self._pending if k == "msix")
            pba = bits.to_bytes((self.msix.entries + 63) // 64 * 8, "little")
            return pba[rel:rel + size] if rel >= 0 and rel + size <= len(pba) else bytes(size)
        region = self.dev.indices.rom if index == ROM_INDEX else self.dev.indices.bars[index]
        return self.dev.region_read(region, offset, size)

    def bar_write(self, index: int, offset: int, data) -> None:
        window = self._window(index, offset, len(data))
        if window == "table":
            self._table_write(offset - self.msix.table_offset, bytes(data))
            return
        if window == "pba" or index == ROM_INDEX:
            return  # read-only
        self.dev.region_write(self.dev.indices.bars[index], offset, bytes(data))

    def _table_write(self, rel: int, raw: bytes) -> None:
        size = len(raw)
        if size not in (4, 8) or rel % size or rel < 0 or rel + size > len(self._msix_table):
            return
        for i in range(0, size, 4):
            value = _U32.unpack_from(raw, i)[0]
            field = (rel + i) % regs.MSIX_ENTRY_SIZE
            if field == 0:
                value &= 0xFFFF_FFFC  # message address is dword aligned
            elif field == regs.MSIX_ENTRY_VECTOR_CTRL:
                value &= regs.MSIX_ENTRY_CTRL_MASKBIT
            _U32.pack_into(self._msix_table, rel + i, value)
        self._msix_changed()

    # --- life cycle -------------------------------------------------------------------------------------

    def release(self) -> None:
        """The device leaves the guest: stop decoding its BARs and give it back to the host."""
        self.unmap_all()
        self.dev.close()


def _shifted(value: int, shift: int, size: int) -> int:
    """A register value placed where it sits inside an access starting ``shift`` bits before it."""
    v = value << shift if shift >= 0 else value >> -shift
    return v & regs.ALL_ONES[size]


def _find_caps(header: bytes) -> tuple[int | None, MsixLayout | None]:
    msi = msix = None
    if not struct.unpack_from("<H", header, regs.STATUS)[0] & regs.STATUS_CAP_LIST:
        return None, None
    ptr, seen = header[regs.CAPABILITY_LIST] & 0xFC, set()
    while 0x40 <= ptr < _HEADER - 1 and ptr not in seen:
        seen.add(ptr)
        cap_id, nxt = header[ptr], header[ptr + 1] & 0xFC
        if cap_id == regs.CAP_ID_MSI and msi is None:
            msi = ptr
        elif cap_id == regs.CAP_ID_MSIX and msix is None and ptr + 12 <= _HEADER:
            ctrl, table, pba = struct.unpack_from("<HII", header, ptr + regs.MSIX_FLAGS)
            msix = MsixLayout(ptr, (ctrl & regs.MSIX_FLAGS_QSIZE) + 1, table & 7, table & ~7, pba & 7, pba & ~7)
        ptr = nxt
    return msi, msix


def subtract(areas: list[tuple[int, int]], holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(offset, size) areas minus (offset, size) holes, in order, empty pieces dropped."""
    out = []
    for off, size in sorted(areas):
        pieces = [(off, off + size)]
        for h_off, h_size in holes:
            nxt = []
            for lo, hi in pieces:
                if h_off + h_size <= lo or hi <= h_off:
                    nxt.append((lo, hi))
                    continue
                if lo < h_off:
                    nxt.append((lo, h_off))
                if h_off + h_size < hi:
                    nxt.append((h_off + h_size, hi))
            pieces = nxt
        out.extend((lo, hi - lo) for lo, hi in pieces if hi > lo)
    return out
