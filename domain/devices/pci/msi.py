"""Message-signalled interrupts: the MSI and MSI-X capabilities (PCI Local Bus 3.0 §6.8).

Both turn "vector n fired" into a memory write the platform injects with ``send(address, data)``
(KVM_SIGNAL_MSI). A masked vector is remembered as pending and sent when it is unmasked, as the
spec requires; with the capability disabled nothing is sent (the caller may fall back to INTx).
"""

from __future__ import annotations

import struct
from typing import Callable

from domain.devices.pci import regs
from domain.devices.pci.config import PciConfig

SendMsi = Callable[[int, int], object]
_U32 = struct.Struct("<I")


class MsiCapability:
    """One vector, 64-bit address, per-vector masking."""

    length = 0x18

    def __init__(self, config: PciConfig, send: SendMsi):
        self.config = config
        self._send = send
        self.offset = off = config.add_capability(regs.CAP_ID_MSI, self.length)
        config.set(off + regs.MSI_FLAGS, 2, regs.MSI_FLAGS_64BIT | regs.MSI_FLAGS_MASKBIT)
        config.set_wmask(off + regs.MSI_FLAGS, 2, regs.MSI_FLAGS_ENABLE)
        config.set_wmask(off + regs.MSI_ADDRESS_LO, 4, 0xFFFF_FFFC)
        config.set_wmask(off + regs.MSI_ADDRESS_HI, 4, 0xFFFF_FFFF)
        config.set_wmask(off + regs.MSI_DATA_64, 2, 0xFFFF)
        config.set_wmask(off + regs.MSI_MASK_64, 4, 0x1)

    def _get(self, reg: int, size: int) -> int:
        return self.config.get(self.offset + reg, size)

    @property
    def enabled(self) -> bool:
        return bool(self._get(regs.MSI_FLAGS, 2) & regs.MSI_FLAGS_ENABLE)

    @property
    def masked(self) -> bool:
        return bool(self._get(regs.MSI_MASK_64, 4) & 1)

    @property
    def pending(self) -> bool:
        return bool(self._get(regs.MSI_PENDING_64, 4) & 1)

    def message(self) -> tuple[int, int]:
        address = self._get(regs.MSI_ADDRESS_LO, 4) | self._get(regs.MSI_ADDRESS_HI, 4) << 32
        return address, self._get(regs.MSI_DATA_64, 2)

    def notify(self) -> bool:
        """Signal the vector. False when MSI is disabled (nothing was sent or recorded)."""
        if not self.enabled:
            return False
        if self.masked:
            self.config.set(self.offset + regs.MSI_PENDING_64, 4, 1)
        else:
            self._send(*self.message())
        return True

    def written(self, rel: int, size: int) -> None:
        if self.enabled and self.pending and not self.masked:
            self.config.set(self.offset + regs.MSI_PENDING_64, 4, 0)
            self._send(*self.message())


class MsixCapability:
    """The capability in config space plus its vector table and pending-bit array, which live in
    a BAR: the owner routes BAR accesses in those ranges to ``table_read`` and friends."""

    length = 12

    def __init__(self, config: PciConfig, vectors: int, send: SendMsi, *, table_bar: int,
                 table_offset: int, pba_bar: int, pba_offset: int):
        if not 1 <= vectors <= 2048 or table_offset % 8 or pba_offset % 8:
            raise ValueError("invalid MSI-X layout")
        self.config = config
        self.vectors = vectors
        self._send = send
        self.table_bar, self.table_offset = table_bar, table_offset
        self.pba_bar, self.pba_offset = pba_bar, pba_offset
        self.offset = off = config.add_capability(regs.CAP_ID_MSIX, self.length)
        config.set(off + regs.MSIX_FLAGS, 2, vectors - 1)
        config.set_wmask(off + regs.MSIX_FLAGS, 2, regs.MSIX_FLAGS_ENABLE | regs.MSIX_FLAGS_MASKALL)
        config.set(off + regs.MSIX_TABLE, 4, table_offset | table_bar)
        config.set(off + regs.MSIX_PBA, 4, pba_offset | pba_bar)
        self.table = bytearray(vectors * regs.MSIX_ENTRY_SIZE)
        self.pba = bytearray((vectors + 63) // 64 * 8)
        self.reset()

    @property
    def table_size(self) -> int:
        return len(self.table)

    @property
    def pba_size(self) -> int:
        return len(self.pba)

    def reset(self) -> None:
        """Every vector masked, nothing pending, the capability disabled."""
        self.table[:] = bytes(len(self.table))
        for v in range(self.vectors):
            self.table[v * regs.MSIX_ENTRY_SIZE + regs.MSIX_ENTRY_VECTOR_CTRL] = regs.MSIX_ENTRY_CTRL_MASKBIT
        self.pba[:] = bytes(len(self.pba))
        self.config.set(self.offset + regs.MSIX_FLAGS, 2, self.vectors - 1)

    def _flags(self) -> int:
        return self.config.get(self.offset + regs.MSIX_FLAGS, 2)

    @property
    def enabled(self) -> bool:
        return bool(self._flags() & regs.MSIX_FLAGS_ENABLE)

    @property
    def function_masked(self) -> bool:
        return bool(self._flags() & regs.MSIX_FLAGS_MASKALL)

    def entry(self, vector: int) -> tuple[int, int, bool]:
        """(address, data, masked) of a table entry."""
        lo, hi, data, ctrl = struct.unpack_from("<IIII", self.table, vector * regs.MSIX_ENTRY_SIZE)
        return lo | hi << 32, data, bool(ctrl & regs.MSIX_ENTRY_CTRL_MASKBIT)

    def is_pending(self, vector: int) -> bool:
        return bool(self.pba[vector >> 3] >> (vector & 7) & 1)

    def _set_pending(self, vector: int, on: bool) -> None:
        if on:
            self.pba[vector >> 3] |= 1 << (vector & 7)
        else:
            self.pba[vector >> 3] &= ~(1 << (vector & 7)) & 0xFF

    def notify(self, vector: int) -> bool:
        """Signal ``vector``. False when MSI-X is disabled or the vector does not exist."""
        if not self.enabled or not 0 <= vector < self.vectors:
            return False
        address, data, masked = self.entry(vector)
        if masked or self.function_masked:
            self._set_pending(vector, True)
        else:
            self._send(address, data)
        return True

    def _deliver_pending(self) -> None:
        if not self.enabled or self.function_masked:
            return
        for v in range(self.vectors):
            if self.is_pending(v):
                address, data, masked = self.entry(v)
                if not masked:
                    self._set_pending(v, False)
                    self._send(address, data)

    def written(self, rel: int, size: int) -> None:
        """The Message Control register changed (enable / function mask)."""
        self._deliver_pending()

    # --- table and PBA (BAR accesses, offsets relative to each structure) ---------------------

    def table_read(self, offset: int, size: int) -> bytes:
        if size not in (4, 8) or offset % size or offset + size > len(self.table):
            return bytes(size)
        return bytes(self.table[offset:offset + size])

    def table_write(self, offset: int, data) -> None:
        size = len(data)
        if size not in (4, 8) or offset % size or offset + size > len(self.table):
            return
        raw = bytes(data)
        for i in range(0, size, 4):
            at = offset + i
            value = _U32.unpack_from(raw, i)[0]
            field = at % regs.MSIX_ENTRY_SIZE
            if field == 0:
                value &= 0xFFFF_FFFC  # message address is dword aligned
            elif field == regs.MSIX_ENTRY_VECTOR_CTRL:
                value &= regs.MSIX_ENTRY_CTRL_MASKBIT
            _U32.pack_into(self.table, at, value)
        self._deliver_pending()

    def pba_read(self, offset: int, size: int) -> bytes:
        if size not in (4, 8) or offset % size or offset + size > len(self.pba):
            return bytes(size)
        return bytes(self.pba[offset:offset + size])
