"""PCI-to-PCI bridge (type-1 header): bus numbers and the non-prefetchable memory window.

The I/O and prefetchable windows are hardwired to zero, which is how a bridge says it has none
(Linux probes them by writing and reading back). The memory window is 1 MiB grained.
"""

from __future__ import annotations

from domain.devices.pci import regs
from domain.devices.pci.device import PciDevice
from domain.devices.pci.host import PciBus, PciFunction

WINDOW_GRANULE = 1 << 20


class PciBridge(PciDevice):
    header_type = regs.HEADER_TYPE_BRIDGE

    def __init__(self, *, vendor: int, device: int, class_code: int = regs.CLASS_BRIDGE_PCI,
                 revision: int = 0, config_size: int = regs.CONFIG_SPACE_SIZE, name: str = ""):
        super().__init__(vendor=vendor, device=device, class_code=class_code, revision=revision,
                         config_size=config_size, name=name)
        c = self.config
        for reg in (regs.PRIMARY_BUS, regs.SECONDARY_BUS, regs.SUBORDINATE_BUS, regs.SEC_LATENCY_TIMER):
            c.set_wmask(reg, 1, 0xFF)
        c.set_w1c(regs.SEC_STATUS, 2, regs.STATUS_W1C)
        c.set_wmask(regs.MEMORY_BASE, 2, 0xFFF0)
        c.set_wmask(regs.MEMORY_LIMIT, 2, 0xFFF0)
        c.set(regs.MEMORY_BASE, 2, 0xFFF0)  # closed (base above limit) until someone opens it
        c.set_wmask(regs.BRIDGE_CONTROL, 2, regs.BRIDGE_CTL_WRITABLE)
        self.secondary_bus = PciBus(name or "bridge")

    # --- bus numbers ---------------------------------------------------------------------------

    @property
    def primary_number(self) -> int:
        return self.config.get(regs.PRIMARY_BUS, 1)

    @property
    def secondary_number(self) -> int:
        return self.config.get(regs.SECONDARY_BUS, 1)

    @property
    def subordinate_number(self) -> int:
        return self.config.get(regs.SUBORDINATE_BUS, 1)

    def set_bus_numbers(self, primary: int, secondary: int, subordinate: int) -> None:
        with self.lock:
            self.config.set(regs.PRIMARY_BUS, 1, primary)
            self.config.set(regs.SECONDARY_BUS, 1, secondary)
            self.config.set(regs.SUBORDINATE_BUS, 1, subordinate)

    def forwards(self, bus_no: int) -> bool:
        """Does a configuration cycle for ``bus_no`` go through this bridge?"""
        sec = self.secondary_number
        return sec != 0 and sec <= bus_no <= self.subordinate_number

    def visible_devices(self) -> dict[int, PciFunction]:
        """The functions on the secondary bus that answer configuration cycles."""
        return self.secondary_bus.devices

    # --- memory window -------------------------------------------------------------------------

    def memory_window(self) -> tuple[int, int] | None:
        """(base, limit) inclusive, or None when closed."""
        base = (self.config.get(regs.MEMORY_BASE, 2) & 0xFFF0) << 16
        limit = ((self.config.get(regs.MEMORY_LIMIT, 2) & 0xFFF0) << 16) | 0xFFFFF
        return (base, limit) if base <= limit else None

    def set_memory_window(self, base: int, limit: int) -> None:
        if base % WINDOW_GRANULE or (limit + 1) % WINDOW_GRANULE or not base <= limit < 1 << 32:
            raise ValueError(f"bridge window {base:#x}-{limit:#x} is not 1 MiB grained")
        with self.lock:
            self.config.set(regs.MEMORY_BASE, 2, (base >> 16) & 0xFFF0)
            self.config.set(regs.MEMORY_LIMIT, 2, (limit >> 16) & 0xFFF0)
