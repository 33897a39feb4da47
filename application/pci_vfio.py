"""The host side of a passed-through PCI function on q35: where its BARs live, how its MSIs arrive.

The guest-facing model is domain.devices.pci.vfio_pci.VfioPciFunction; this wires it to the
machine, as application.pci.Function does for virtio-pci:
- BARs: when the guest places one, the whole BAR traps on the MMIO bus (the PIO bus for an I/O
  BAR), where BarRegion sends accesses through the function to the VFIO region; the parts the
  host kernel lets us mmap, minus the MSI-X table and PBA pages (VfioPciFunction.mmap_areas),
  also become KVM memory slots over the device's own mapping, so the guest reaches the device's
  registers and memory without exits (a memory slot wins over the trap; what is left traps).
  Moving the BAR or turning decoding off takes both away again.
- MSI and MSI-X: one eventfd per vector the guest enabled, handed to VFIO (set_irq_eventfds) and
  watched by the I/O thread, which calls VfioPciFunction.vector_fired: the message leaves through
  KVM_SIGNAL_MSI, or waits while the guest has the vector masked.
- INTx is not routed: this q35 has no legacy interrupt routing (no ACPI _PRT, no MP-table PCI
  entries), so a guest driver must use MSI or MSI-X, as Linux does where the function has them.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from domain.devices.bus import Bus, BusConflictError
from domain.devices.pci.device import Bar, BarRegion, PciDevice
from domain.devices.pci.vfio_pci import ROM_INDEX, MsiVector, VfioPciFunction
from domain.errors import HypervisorError, VmmError
from domain.ports import HvVm, IoPoller

log = logging.getLogger("pystrato.vfio")

FIRST_BAR_SLOT = 0x100  # memory slots for BAR mappings, clear of guest RAM's


class MemslotPool:
    """Hypervisor memory-slot numbers for BAR mappings (RAM keeps the low ones)."""

    def __init__(self, first: int = FIRST_BAR_SLOT):
        self._next = first
        self._free: list[int] = []

    def take(self) -> int:
        if self._free:
            return self._free.pop()
        self._next += 1
        return self._next - 1

    def give(self, slot: int) -> None:
        self._free.append(slot)


class VfioWiring:
    """One VFIO function's BAR mappings and interrupt eventfds."""

    def __init__(self, device_id: str, fn: VfioPciFunction, *, mmio: Bus, pio: Bus, hv_vm: HvVm,
                 poller: IoPoller, slots: MemslotPool, send_msi: Callable[[int, int], Any]):
        self.device_id = device_id
        self.fn = fn
        self._mmio, self._pio, self._hv, self._poller, self._slots = mmio, pio, hv_vm, poller, slots
        self._maps: dict[int, list[tuple[int, memoryview]]] = {}  # BAR -> the device's mmaps
        self.traps: dict[int, tuple[Bus, int]] = {}  # BAR -> (bus, base) of its trap region
        self.mapped: dict[int, list[tuple[int, int, int]]] = {}  # BAR -> [(slot, gpa, size)]
        self.irq_fds: dict[str, list[int]] = {}  # "msi"/"msix" -> one eventfd per vector
        fn.send = send_msi
        fn.on_bar_moved = self.bar_moved
        fn.on_irq_changed = self.irq_changed

    # --- BARs (called with the function's lock held, from the thread that moved the BAR) -------

    def bar_moved(self, dev: PciDevice, bar: Bar, old: int | None, new: int | None) -> None:
        self._unmap(bar.index)
        if new is None:
            return
        bus = self._pio if bar.io else self._mmio
        try:
            bus.insert(BarRegion(dev, bar.index), new, bar.size)
        except BusConflictError as e:
            log.warning("%s: BAR %d at %#x not mapped: %s", self.device_id, bar.index, new, e)
            return
        self.traps[bar.index] = (bus, new)
        if not bar.io and bar.index != ROM_INDEX:
            self._map_direct(bar.index, new)

    def _map_direct(self, index: int, base: int) -> None:
        """Memory slots over the mmappable parts; a part that cannot be mapped keeps trapping."""
        views = self._maps.get(index)
        if views is None:
            try:
                views = self.fn.dev.region_mmap(self.fn.dev.indices.bars[index])
            except VmmError as e:
                log.warning("%s: BAR %d cannot be mapped, every access traps: %s", self.device_id, index, e)
                views = []
            self._maps[index] = views
        done = self.mapped.setdefault(index, [])
        for offset, size in self.fn.mmap_areas(index):
            view = _slice(views, offset, size)
            if view is None:
                continue
            slot = self._slots.take()
            try:
                self._hv.set_memory_region(slot, base + offset, view)
            except HypervisorError as e:
                self._slots.give(slot)
                log.warning("%s: BAR %d+%#x not mapped, it traps: %s", self.device_id, index, offset, e)
                continue
            done.append((slot, base + offset, size))

    def _unmap(self, index: int) -> None:
        for slot, _, _ in self.mapped.pop(index, []):
            try:
                self._hv.remove_memory_region(slot)
            finally:
                self._slots.give(slot)
        trap = self.traps.pop(index, None)
        if trap is not None:
            trap[0].remove(trap[1])

    # --- MSI / MSI-X ---------------------------------------------------------------------------

    def irq_changed(self, fn: VfioPciFunction, kind: str, vectors: list[MsiVector]) -> None:
        """The guest enabled, disabled or resized MSI/MSI-X: give VFIO one eventfd per vector."""
        index = fn.dev.indices.msix if kind == "msix" else fn.dev.indices.msi
        fds = self.irq_fds.get(kind, [])
        if len(fds) == len(vectors):
            return  # masks and messages live in the function; the eventfds stay as they are
        if fds:
            fn.dev.disable_irqs(index)
            self._close(kind)
        if not vectors:
            return
        fds = []
        for n in range(len(vectors)):
            fd = self._poller.new_eventfd()
            self._poller.watch(fd, lambda n=n: fn.vector_fired(kind, n))
            fds.append(fd)
        self.irq_fds[kind] = fds
        try:
            fn.dev.set_irq_eventfds(index, fds)
        except VmmError as e:
            log.warning("%s: %s vectors not connected: %s", self.device_id, kind, e)
            self._close(kind)

    def _close(self, kind: str) -> None:
        for fd in self.irq_fds.pop(kind, []):
            self._poller.close_fd(fd)

    # --- teardown ------------------------------------------------------------------------------

    def close(self) -> None:
        """The function leaves the guest: BARs unmapped, interrupts off, the device closed."""
        for kind, index in (("msi", self.fn.dev.indices.msi), ("msix", self.fn.dev.indices.msix)):
            if self.irq_fds.get(kind):
                try:
                    self.fn.dev.disable_irqs(index)
                except VmmError as e:
                    log.warning("%s: disabling %s: %s", self.device_id, kind, e)
                self._close(kind)
        self.fn.release()  # unmap_all -> bar_moved(None) for each BAR, then VfioDevice.close
        for index in list(self.traps) + list(self.mapped):
            self._unmap(index)


def _slice(views: list[tuple[int, memoryview]], offset: int, size: int) -> memoryview | None:
    """The part [offset, offset+size) of the device's mmaps, when one mapping holds all of it."""
    for start, view in views:
        if start <= offset and offset + size <= start + len(view):
            return view[offset - start: offset - start + size]
    return None
