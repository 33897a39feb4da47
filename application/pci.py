"""q35's PCI Express side of the machine, wired to the hypervisor and the I/O thread.

The root complex answers on 0xCF8-0xCFF and in the ECAM window; root ports come from the command
line; virtio-blk/net/balloon/console functions sit on pcie.0 or alone in a root port. A function's
BAR is put on the MMIO bus wherever the guest (or the firmware step, ``finish_cold_plug``) places
it, and each queue's notify address gets an ioeventfd there; MSI-X messages leave through
KVM_SIGNAL_MSI from whichever thread completes the work.

As a GuestAgent (``request_unplug``) it asks the guest's pciehp through the root port's attention
button; the guest powering the slot off is the acknowledgement.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

from application.pci_vfio import MemslotPool, VfioWiring
from domain.devices.bus import Bus, BusConflictError
from domain.devices.pci import layout
from domain.devices.pci import virtio_pci as vp
from domain.devices.pci.device import Bar, BarRegion, PciDevice
from domain.devices.pci.firmware import MmioAllocator, assign_resources, place_in_window
from domain.devices.pci.host import (
    CONFIG_ADDRESS_PORT,
    CONFIG_IO_SIZE,
    HostBridge,
    PciConfigIo,
    PciEcam,
    PciRoot,
)
from domain.devices.pci.root_port import PcieRootPort
from domain.devices.pci.vfio_pci import VfioPciFunction
from domain.devices.virtio.device import VirtioDevice
from domain.errors import (
    DeviceNotActiveError,
    DeviceNotFoundError,
    HypervisorError,
    InvalidArgumentError,
)
from domain.ports import HvVm, IoPoller, VfioDevice
from domain.record import field, record

log = logging.getLogger("pystrato.pci")

ROOT_BUS = "pcie.0"


def _in_thread(fn: Callable[[], None]) -> None:
    """Run a hot-unplug completion off the vCPU thread that saw the guest's acknowledgement
    (it takes the device manager's locks and emits DEVICE_DELETED)."""

    def run():
        try:
            fn()
        except Exception:
            log.exception("hot-unplug completion failed")

    threading.Thread(target=run, name="pci-unplug", daemon=True).start()


@record
class Function:
    """One virtio-pci function and the host resources behind its BAR."""

    device_id: str
    transport: vp.VirtioPciTransport
    port: PcieRootPort | None
    devfn: int
    platform: "PciPlatform"
    notify_fds: list[int] = field(default_factory=list)
    regions: dict[int, int] = field(default_factory=dict)  # BAR index -> base on the MMIO bus
    ioevents_at: int | None = None

    def bar_moved(self, dev: PciDevice, bar: Bar, old: int | None, new: int | None) -> None:
        """Called with the function's lock held, from whichever thread moved the BAR."""
        p = self.platform
        base = self.regions.pop(bar.index, None)
        if base is not None:
            p.mmio.remove(base)
        if bar.index == vp.BAR and self.ioevents_at is not None:
            self._ioevents(self.ioevents_at, register=False)
            self.ioevents_at = None
        if new is None:
            return
        try:
            p.mmio.insert(BarRegion(dev, bar.index), new, bar.size)
        except BusConflictError as e:
            log.warning("%s: BAR %d at %#x not mapped: %s", self.device_id, bar.index, new, e)
            return
        self.regions[bar.index] = new
        if bar.index == vp.BAR:
            self._ioevents(new, register=True)
            self.ioevents_at = new

    def _ioevents(self, base: int, *, register: bool) -> None:
        hv = self.platform.hv_vm
        for fd, rel in zip(self.notify_fds, self.transport.notify_addresses()):
            try:
                if register:
                    hv.register_ioevent(fd, base + rel, 2, None, False)
                else:
                    hv.unregister_ioevent(fd, base + rel, 2, None, False)
            except HypervisorError as e:  # the notify still works through the exit path
                log.warning("%s: ioeventfd at %#x: %s", self.device_id, base + rel, e)


@record
class Passthrough:
    """A vfio-pci function: its wiring and where it sits. Not in snapshots: the migration and
    snapshot rules refuse a VM with a VFIO device before any state is taken."""

    wiring: VfioWiring
    port: PcieRootPort | None
    devfn: int


class PciPlatform:
    def __init__(self, *, pio: Bus, mmio: Bus, hv_vm: HvVm, poller: IoPoller,
                 on_activate: Callable[[Any], object] | None = None,
                 defer: Callable[[Callable[[], None]], None] = _in_thread):
        self.mmio = mmio
        self.pio = pio
        self.hv_vm = hv_vm
        self.poller = poller
        self._on_activate = on_activate
        self._defer = defer
        self._lock = threading.RLock()
        self.root = PciRoot(ROOT_BUS)
        self.root.bus.attach(0, HostBridge())
        pio.insert(PciConfigIo(self.root), CONFIG_ADDRESS_PORT, CONFIG_IO_SIZE)
        self.ecam = PciEcam(self.root, layout.ECAM_BUSES)
        mmio.insert(self.ecam, layout.ECAM_BASE, self.ecam.size)
        self.alloc = MmioAllocator(layout.PCI_MMIO_BASE, layout.PCI_MMIO_SIZE)
        self.ports: dict[str, PcieRootPort] = {}
        self.functions: dict[str, Function] = {}
        self.passthrough: dict[str, Passthrough] = {}  # vfio-pci functions
        self.memslots = MemslotPool()
        self.firmware_done = False

    def send_msi(self, address: int, data: int) -> None:
        try:
            self.hv_vm.signal_msi(address, data)
        except HypervisorError as e:
            log.warning("MSI %#x/%#x not delivered: %s", address, data, e)

    # --- topology ----------------------------------------------------------------------------------

    def add_root_port(self, port_id: str, port_number: int, devfn: int) -> PcieRootPort:
        with self._lock:
            port = PcieRootPort(port_number=port_number, send_msi=self.send_msi, defer=self._defer,
                                name=port_id)
            self.root.bus.attach(devfn, port)
            self.ports[port_id] = port
            return port

    def _where(self, device_id: str, bus: str, devfn: int | None) -> tuple[PcieRootPort | None, int]:
        """(root port or None for pcie.0, devfn) for a function the command line or QMP names."""
        if bus != ROOT_BUS:
            port = self.ports.get(bus)
            if port is None:
                raise DeviceNotFoundError(f"Bus '{bus}' not found")
            return port, 0
        return None, self._free_root_slot(device_id) if devfn is None else devfn

    def _attach(self, device_id: str, dev: PciDevice, port: PcieRootPort | None, devfn: int,
                hotplugged: bool) -> None:
        if port is None:
            self.root.bus.attach(devfn, dev)
        else:
            if self.firmware_done:
                place_in_window(port, dev)
            port.plug(dev, device_id, hot=self.firmware_done or hotplugged)

    def add_virtio(self, device_id: str, model: VirtioDevice, bus: str, devfn: int | None, *,
                   hotplugged: bool) -> vp.VirtioPciTransport:
        """Put a virtio device on ``bus`` (pcie.0 at ``devfn``, or alone in a root port)."""
        with self._lock:
            port, devfn = self._where(device_id, bus, devfn)
            transport = vp.VirtioPciTransport(model, self.send_msi, name=device_id,
                                              on_activate=self._on_activate)
            fn = Function(device_id, transport, port, devfn, self)
            for q in range(len(model.queues)):
                fd = self.poller.new_eventfd()
                self.poller.watch(fd, lambda t=transport, q=q: t.notify(q))
                fn.notify_fds.append(fd)
            transport.on_bar_moved = fn.bar_moved
            try:
                self._attach(device_id, transport, port, devfn, hotplugged)
            except Exception:
                self._close_fds(fn)
                raise
            if port is None and self.firmware_done:
                self._place_on_root_bus(transport)
            self.functions[device_id] = fn
            return transport

    def add_vfio(self, device_id: str, device: VfioDevice, bus: str, devfn: int | None, *,
                 hotplugged: bool) -> VfioPciFunction:
        """Put a host function opened through VFIO on ``bus``, as add_virtio does a virtio one.
        On failure the device is closed (given back to the host)."""
        with self._lock:
            try:
                port, devfn = self._where(device_id, bus, devfn)
                fn = VfioPciFunction(device, name=device_id)
                wiring = VfioWiring(device_id, fn, mmio=self.mmio, pio=self.pio, hv_vm=self.hv_vm,
                                    poller=self.poller, slots=self.memslots, send_msi=self.send_msi)
                self._attach(device_id, fn, port, devfn, hotplugged)
            except Exception:
                device.close()
                raise
            if port is None and self.firmware_done:
                self._place_on_root_bus(fn)
            self.passthrough[device_id] = Passthrough(wiring, port, devfn)
            return fn

    def _free_root_slot(self, device_id: str) -> int:
        """A device given without addr (QEMU picks one too): the highest free slot, out of the
        way of the low slots command lines name."""
        for slot in range(31, 0, -1):
            if slot << 3 not in self.root.bus.devices:
                return slot << 3
        raise InvalidArgumentError(f"no free slot on {ROOT_BUS} for device '{device_id}'")

    def _place_on_root_bus(self, dev: PciDevice) -> None:
        for bar in sorted(dev.bars.values(), key=lambda b: -b.size):
            dev.set_bar_address(bar.index, self.alloc.allocate(bar.size, bar.size))
        dev.enable_decoding()

    def finish_cold_plug(self) -> None:
        """The firmware step: bus numbers, windows, BARs, decoding (once, before the guest runs)."""
        with self._lock:
            if not self.firmware_done:
                assign_resources(self.root, self.alloc)
                self.firmware_done = True

    def has(self, device_id: str) -> bool:
        return device_id in self.functions or device_id in self.passthrough

    def model(self, device_id: str) -> VirtioDevice:
        return self.functions[device_id].transport.device

    def remove(self, device_id: str) -> VirtioDevice | None:
        """Take the function off the bus (ejecting it from its root port if the guest has not),
        drop its BAR mappings, ioeventfds and guest memory views."""
        with self._lock:
            fn = self.functions.pop(device_id, None)
            passthrough = self.passthrough.pop(device_id, None)
        if passthrough is not None:
            self._detach(passthrough.port, passthrough.devfn)
            passthrough.wiring.close()
            return None
        if fn is None:
            return None
        self._detach(fn.port, fn.devfn)
        fn.transport.release()
        self._close_fds(fn)
        return fn.transport.device

    def _close_fds(self, fn: Function) -> None:
        for fd in fn.notify_fds:
            self.poller.unwatch(fd)
            self.poller.close_fd(fd)
        fn.notify_fds.clear()

    # --- GuestAgent: hot-unplug through the guest's pciehp ---------------------------------------------

    def _detach(self, port: PcieRootPort | None, devfn: int) -> None:
        if port is not None:
            port.eject()
        else:
            self.root.bus.detach(devfn)

    def request_unplug(self, device_id: str, done: Callable[[], None]) -> None:
        fn = self.functions.get(device_id) or self.passthrough.get(device_id)
        if fn is None or fn.port is None:
            raise DeviceNotActiveError(f"device '{device_id}' is not in a root port")
        fn.port.request_unplug(device_id, done)

    def balloon_target(self, target_bytes: int, set_actual: Callable[[int], None]) -> None:
        """The guest's own balloon driver answers through the device; nothing to do here."""

    # --- snapshot ----------------------------------------------------------------------------------------

    def save_states(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for port_id, port in self.ports.items():
            out[f"pci.port.{port_id}"] = port.save_state()
        for dev_id, fn in self.functions.items():
            out[f"pci.fn.{dev_id}"] = fn.transport.save_state()
        return out

    def state_names(self) -> set[str]:
        return {f"pci.port.{p}" for p in self.ports} | {f"pci.fn.{d}" for d in self.functions}

    def restore_states(self, states: dict[str, Any]) -> None:
        for port_id, port in self.ports.items():
            port.restore_state(states[f"pci.port.{port_id}"])
        for dev_id, fn in self.functions.items():
            fn.transport.restore_state(states[f"pci.fn.{dev_id}"])
