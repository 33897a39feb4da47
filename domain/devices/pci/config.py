"""One function's configuration space: bytes plus, per bit, whether the driver may write it.

Every register is stored in ``data``; ``wmask`` holds the bits a driver write replaces and
``w1cmask`` the bits it clears by writing 1 (status registers). Everything else is read-only to
the driver, so sizing a BAR (write all-ones, read back) works without special code: the low
address bits of a BAR are simply not writable. The device side uses get/set, which ignore the
masks.
"""

from __future__ import annotations

from domain.devices.pci import regs
from domain.errors import VmmError


class PciConfigError(VmmError):
    """A device model built an invalid configuration space (a VMM bug, not a guest error)."""


def valid_access(offset: int, size: int, limit: int) -> bool:
    """A naturally aligned 1, 2 or 4 byte access inside the space."""
    return size in (1, 2, 4) and offset % size == 0 and 0 <= offset and offset + size <= limit


class PciConfig:
    def __init__(self, size: int = regs.CONFIG_SPACE_SIZE):
        if size not in (regs.CONFIG_SPACE_SIZE, regs.CONFIG_SPACE_EXP_SIZE):
            raise PciConfigError(f"config space size {size}")
        self.size = size
        self.data = bytearray(size)
        self.wmask = bytearray(size)
        self.w1cmask = bytearray(size)
        self._next_cap = 0x40
        self._last_link = regs.CAPABILITY_LIST

    # --- device side ---------------------------------------------------------------------------

    def get(self, offset: int, size: int) -> int:
        return int.from_bytes(self.data[offset:offset + size], "little")

    def set(self, offset: int, size: int, value: int) -> None:
        self.data[offset:offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def set_bits(self, offset: int, size: int, bits: int, on: bool = True) -> None:
        v = self.get(offset, size)
        self.set(offset, size, v | bits if on else v & ~bits)

    def set_wmask(self, offset: int, size: int, mask: int) -> None:
        self.wmask[offset:offset + size] = mask.to_bytes(size, "little")

    def set_w1c(self, offset: int, size: int, mask: int) -> None:
        self.w1cmask[offset:offset + size] = mask.to_bytes(size, "little")

    # --- driver side ---------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        if not valid_access(offset, size, self.size):
            return regs.ALL_ONES.get(size, 0)
        return self.get(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        if not valid_access(offset, size, self.size):
            return
        for i in range(size):
            b = (value >> (8 * i)) & 0xFF
            at = offset + i
            wm, w1c = self.wmask[at], self.w1cmask[at]
            old = self.data[at]
            self.data[at] = ((old & ~wm) | (b & wm)) & ~(b & w1c) & 0xFF

    # --- capability list -----------------------------------------------------------------------

    def add_capability(self, cap_id: int, length: int) -> int:
        """Append a capability of ``length`` bytes to the list; returns its offset."""
        offset = self._next_cap
        if length < 2 or offset + length > regs.CONFIG_SPACE_SIZE:
            raise PciConfigError(f"capability {cap_id:#x} of {length} bytes does not fit at {offset:#x}")
        self.data[offset] = cap_id
        self.data[offset + 1] = 0
        self.data[self._last_link] = offset
        self._last_link = offset + 1
        self._next_cap = (offset + length + 3) & ~3
        self.set_bits(regs.STATUS, 2, regs.STATUS_CAP_LIST)
        return offset

    def capabilities(self) -> list[tuple[int, int]]:
        """(offset, id) of each capability, walking the list as a driver does."""
        out, seen = [], set()
        at = self.data[regs.CAPABILITY_LIST] & ~3
        while at and at not in seen and at < regs.CONFIG_SPACE_SIZE - 1:
            seen.add(at)
            out.append((at, self.data[at]))
            at = self.data[at + 1] & ~3
        return out
