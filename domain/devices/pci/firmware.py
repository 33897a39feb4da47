"""What firmware does to PCI before the OS runs, done by the VMM for a direct kernel boot.

The buses behind the root ports get numbers (1, 2, ... in slot order), every root port a memory
window (``WINDOW_SIZE``, room for a hot-plugged device), every BAR an address inside its bus's
window, and decoding is switched on. Linux keeps such a configuration as it finds it. A device
hot-plugged later is placed inside its root port's window as the guest left it
(``place_in_window``).
"""

from __future__ import annotations

from domain.devices.pci.bridge import WINDOW_GRANULE, PciBridge
from domain.devices.pci.device import PciDevice
from domain.devices.pci.host import PciRoot
from domain.errors import ResourceExhaustedError

WINDOW_SIZE = 2 * WINDOW_GRANULE


class MmioAllocator:
    """Bump allocation of naturally aligned ranges from [base, base + size)."""

    def __init__(self, base: int, size: int):
        self.base = base
        self.end = base + size
        self.next = base

    def allocate(self, size: int, align: int) -> int:
        addr = (self.next + align - 1) // align * align
        if addr + size > self.end:
            raise ResourceExhaustedError(f"PCI memory window {self.base:#x}-{self.end - 1:#x} is full")
        self.next = addr + size
        return addr


def _place_bars(dev: PciDevice, alloc: MmioAllocator) -> None:
    for bar in sorted(dev.bars.values(), key=lambda b: -b.size):  # largest first: no holes
        if not bar.io:
            dev.set_bar_address(bar.index, alloc.allocate(bar.size, bar.size))


def assign_resources(root: PciRoot, alloc: MmioAllocator) -> None:
    """Number buses, open windows, place and enable every BAR under ``root``."""
    bus_no = 1
    bridges = []
    for dfn in sorted(root.bus.devices):
        dev = root.bus.devices[dfn]
        if isinstance(dev, PciBridge):
            dev.set_bus_numbers(0, bus_no, bus_no)
            bus_no += 1
            base = alloc.allocate(WINDOW_SIZE, WINDOW_SIZE)
            dev.set_memory_window(base, base + WINDOW_SIZE - 1)
            bridges.append(dev)
    for bridge in bridges:
        window = bridge.memory_window()
        inner = MmioAllocator(window[0], window[1] - window[0] + 1)
        for child in bridge.secondary_bus.devices.values():
            if isinstance(child, PciDevice):
                _place_bars(child, inner)
                child.enable_decoding()
        bridge.enable_decoding()
    for dfn in sorted(root.bus.devices):
        dev = root.bus.devices[dfn]
        if isinstance(dev, PciDevice) and not isinstance(dev, PciBridge):
            _place_bars(dev, alloc)
            dev.enable_decoding()


def place_in_window(bridge: PciBridge, dev: PciDevice) -> bool:
    """Give a hot-plugged function's BARs addresses inside ``bridge``'s memory window, as the
    guest programmed it. False (BARs left for the guest to assign) when it has no room."""
    window = bridge.memory_window()
    if window is None:
        return False
    inner = MmioAllocator(window[0], window[1] - window[0] + 1)
    try:
        needed = [(b.index, inner.allocate(b.size, b.size))
                  for b in sorted(dev.bars.values(), key=lambda b: -b.size) if not b.io]
    except ResourceExhaustedError:
        return False
    for index, addr in needed:
        dev.set_bar_address(index, addr)
    return True
