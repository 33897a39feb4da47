"""The x86_64 machine: platform devices, virtio-mmio slots, interrupts and the Linux boot.

microvm: COM1 16550 (0x3f8, IRQ 4), i8042 (0x60/0x64, reset), CMOS RTC (0x70/0x71), then the
replaceable virtio-mmio slots (6 virtio-blk, 2 virtio-net) and any other virtio device (balloon),
each a 4 KiB window from VIRTIO_MMIO_BASE with its own IRQ from 5, announced to the guest on its
command line. Queue notifies reach devices through ioeventfds and interrupts leave through
irqfds, so the vCPU threads never carry virtio work.

q35: PCI Express (application/pci.py over domain/devices/pci): the root complex on 0xCF8/0xCFC
and ECAM, the command line's root ports with native hot-plug, and virtio-pci functions whose
notifies reach ioeventfds and whose MSI-X messages leave through KVM_SIGNAL_MSI.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from domain.boot import layout
from domain.boot.linux import setup_linux_boot
from domain.config import MICROVM, MICROVM_MAX_BLK, MICROVM_MAX_NET
from domain.devices import rtc
from domain.devices.i8042 import I8042
from domain.devices.serial import Serial
from domain.devices.virtio.balloon import VirtioBalloon
from domain.devices.virtio.block import VirtioBlock
from domain.devices.virtio.console import VirtioConsole
from domain.devices.virtio.mmio import QUEUE_NOTIFY, VirtioMmioTransport
from domain.devices.virtio.net import VirtioNet
from domain.errors import InvalidArgumentError, SnapshotFormatError
from domain.record import record
from domain.topology import BLK, NET

log = logging.getLogger("pystrato.machine")

STATE_VERSION = 1
SLOT_QUEUES = {BLK: 1, NET: 2}
BALLOON_QUEUES = 3
CONSOLE_QUEUES = 2


@record
class Slot:
    name: str  # "blk.0", "net.1", "balloon"
    base: int
    irq: int
    transport: VirtioMmioTransport
    irqfd: int
    notify_fds: list[int]


class Platform:
    def __init__(self, dm, memory, hv_vm, vm, poller, console_write: Callable[[bytes], Any] | None):
        self.dm = dm
        self.config = dm.config
        self.memory = memory
        self.hv_vm = hv_vm
        self.vm = vm
        self.poller = poller
        self._console_write = console_write
        self.serial: Serial | None = None
        self.i8042: I8042 | None = None
        self.rtc: rtc.CmosRtc | None = None
        self.slots: dict[str, Slot] = {}
        self._next_window = 0
        self._rx_watched: dict[int, bool] = {}
        self.pci_models: dict[str, Any] = {}
        self.console: VirtioConsole | None = None
        self.pci = None  # application.pci.PciPlatform on q35

    # --- interrupts ----------------------------------------------------------------------------

    def _irq_trigger(self, gsi: int) -> tuple[int, Callable[[], None]]:
        fd = self.poller.new_eventfd()
        self.hv_vm.register_irqfd(fd, gsi)
        signal = self.poller.signal
        return fd, lambda: signal(fd)

    # --- platform devices ------------------------------------------------------------------------

    def create_platform_devices(self) -> None:
        out = self._console_write or (lambda data: None)
        _, serial_irq = self._irq_trigger(layout.SERIAL_IRQ)
        self.serial = Serial(out, serial_irq)
        self.dm.pio.insert(self.serial, layout.SERIAL_PORT_BASE, layout.SERIAL_PORT_SIZE)
        self.i8042 = I8042(reset=self.vm._guest_reset)
        self.dm.pio.insert(self.i8042, layout.I8042_PORT_BASE, layout.I8042_PORT_SIZE)
        # CMOS clock: without it Linux polls the empty ports ~20000 times before giving up. Its
        # periodic, alarm and update interrupts are ISA IRQ 8 (identity-routed to IOAPIC pin 8
        # by the MP table), timed by the I/O thread.
        _, rtc_irq = self._irq_trigger(layout.RTC_IRQ)
        self.rtc = rtc.CmosRtc(time.time, timer=self.poller, trigger=rtc_irq, monotonic=time.monotonic)
        self.dm.pio.insert(self.rtc, rtc.PORT_BASE, rtc.PORT_SIZE)
        if self.config.machine.type == MICROVM:
            for i in range(MICROVM_MAX_BLK):
                self._new_slot(f"{BLK}.{i}", SLOT_QUEUES[BLK])
            for i in range(MICROVM_MAX_NET):
                self._new_slot(f"{NET}.{i}", SLOT_QUEUES[NET])
        else:
            self._create_pci()

    def _new_slot(self, name: str, nqueues: int) -> Slot:
        i = self._next_window
        if i >= layout.VIRTIO_MMIO_MAX_SLOTS:
            raise InvalidArgumentError("no virtio-mmio window left")
        self._next_window += 1
        base = layout.VIRTIO_MMIO_BASE + i * layout.VIRTIO_MMIO_STRIDE
        irq = layout.VIRTIO_MMIO_IRQS[i]
        irqfd, trigger = self._irq_trigger(irq)
        transport = VirtioMmioTransport(None, trigger, on_activate=self._on_activate)
        self.dm.mmio.insert(transport, base, layout.VIRTIO_MMIO_SIZE)
        notify_fds = []
        for q in range(nqueues):
            fd = self.poller.new_eventfd()
            self.hv_vm.register_ioevent(fd, base + QUEUE_NOTIFY, 4, q, False)
            self.poller.watch(fd, lambda t=transport, q=q: t.notify(q))
            notify_fds.append(fd)
        slot = Slot(name, base, irq, transport, irqfd, notify_fds)
        self.slots[name] = slot
        return slot

    def finish_cold_plug(self) -> None:
        """q35: every command-line device is in, so do what firmware would (numbers, BARs)."""
        if self.pci is not None:
            self._pci_root_ports()
            self.pci.finish_cold_plug()

    def kernel_cmdline(self) -> str:
        parts = [self.config.append.strip()] if self.config.append.strip() else []
        for slot in self.slots.values():
            parts.append(f"virtio_mmio.device={layout.VIRTIO_MMIO_SIZE // 1024}K@{slot.base:#x}:{slot.irq}")
        return " ".join(parts)

    def load_guest(self, vcpus: list, nr_vcpus: int) -> None:
        cfg = self.config
        if not cfg.kernel:
            self._load_idle_guest(vcpus)
            return
        kernel = self.dm.read_file(cfg.kernel)
        initrd = self.dm.read_file(cfg.initrd) if cfg.initrd else None
        regs, sregs = setup_linux_boot(self.memory, kernel, initrd, self.kernel_cmdline(), nr_vcpus,
                                       cfg.smp.maxcpus, reserved=self._e820_reserved())
        bsp = vcpus[0]
        bsp.set_sregs(sregs)
        bsp.set_regs(regs)

    def _e820_reserved(self) -> list[tuple[int, int]]:
        """q35's ECAM window, so the guest never puts a BAR or bridge window over it."""
        if self.config.machine.type == MICROVM:
            return []
        from domain.devices.pci import layout as pci_layout

        return [(pci_layout.ECAM_BASE, pci_layout.ECAM_BUSES << 20)]

    IDLE_LOOP_GPA = 0x1000
    IDLE_LOOP = bytes((0xF4, 0xEB, 0xFD))  # 1: hlt; jmp 1b

    def _load_idle_guest(self, vcpus: list) -> None:
        """No kernel (only allowed with -accel test): every vCPU idles in `hlt; jmp` in real mode,
        so the guest is quiet and still a real running guest to pause, snapshot or migrate."""
        self.memory.write(self.IDLE_LOOP_GPA, self.IDLE_LOOP)
        for vcpu in vcpus:
            sregs = vcpu.get_sregs()
            sregs.cs.base, sregs.cs.selector = 0, 0
            vcpu.set_sregs(sregs)
            regs = vcpu.get_regs()
            regs.rip, regs.rflags = self.IDLE_LOOP_GPA, 0x2
            vcpu.set_regs(regs)

    # --- virtio devices ---------------------------------------------------------------------------

    def fill_slot(self, att, node, devcfg) -> Any:
        p = att.placement
        slot = self.slots[f"{p.kind}.{p.slot}"]
        if p.kind == BLK:
            model = VirtioBlock(self.memory, node.backend, readonly=node.readonly, serial=devcfg.serial or "")
        else:
            model = VirtioNet(self.memory, node.backend, devcfg.mac,
                              rx_wakeup=lambda s=slot: self._rx_wakeup(s))
        slot.transport.set_device(model)
        return model

    def empty_slot(self, att) -> None:
        p = att.placement
        slot = self.slots[f"{p.kind}.{p.slot}"]
        model = slot.transport.device
        if isinstance(model, VirtioNet):
            self._unwatch_rx(model)
        slot.transport.set_device(None)

    def add_balloon(self, att, devcfg, on_actual_changed) -> VirtioBalloon:
        model = VirtioBalloon(self.memory, discard=self.dm.discard_memory, on_actual_changed=on_actual_changed,
                              ram_size=self.config.memory.size, deflate_on_oom=devcfg.deflate_on_oom,
                              stats=True)
        if self.config.machine.type == MICROVM:
            slot = self._new_slot("balloon", BALLOON_QUEUES)
            slot.transport.set_device(model)
        else:
            self._pci_add(att, model, devcfg)
        return model

    def add_console_device(self, att, devcfg) -> Any:
        """virtio-serial-device is the virtio-console device (microvm: a slot of its own); the
        virtconsole after it (domain.cmdline_checks keeps that order) is its port 0 and brings
        the chardev. One device, one transport."""
        if devcfg.driver == "virtconsole":
            if self.console is None:
                raise InvalidArgumentError("virtconsole needs a virtio-serial-device before it")
            if self.dm.chardevs is None:
                raise InvalidArgumentError("chardevs are not available in this VMM")
            chardev = next((c for c in self.config.chardevs if c.id == devcfg.chardev), None)
            if chardev is None:
                raise InvalidArgumentError(f"chardev '{devcfg.chardev}' is not defined")
            self.console.connect(self.dm.chardevs.open(chardev))
            return self.console
        if devcfg.driver not in ("virtio-serial-device", "virtio-serial-pci"):
            raise InvalidArgumentError(f"'{devcfg.driver}' is not supported by pystrato yet")
        model = VirtioConsole(self.memory)
        if self.config.machine.type == MICROVM:
            self._new_slot("console", CONSOLE_QUEUES).transport.set_device(model)
        else:
            self._pci_add(att, model, devcfg)
        self.console = model
        return model

    def add_pci_device(self, att, node, devcfg) -> Any:
        drv = devcfg.driver
        if drv == "virtio-blk-pci":
            model = VirtioBlock(self.memory, node.backend, readonly=node.readonly, serial=devcfg.serial or "")
        elif drv == "virtio-net-pci":
            box: list[VirtioNet] = []
            model = VirtioNet(self.memory, node.backend, devcfg.mac, rx_wakeup=lambda: self._watch_rx(box[0]))
            box.append(model)
        else:
            if self.pci is None:
                raise InvalidArgumentError("vfio-pci needs the q35 machine")
            if self.dm.vfio is None:
                raise InvalidArgumentError("VFIO passthrough is not available on this host")
            device = self.dm.vfio.open_device(devcfg.host)
            bus, addr = self._pci_where(att, devcfg)
            p = att.placement
            model = self.pci.add_vfio(p.device_id, device, bus, addr, hotplugged=p.hotplugged)
            self.pci_models[p.device_id] = model
            return model
        self._pci_add(att, model, devcfg)
        return model

    def remove_pci_device(self, att) -> None:
        dev_id = att.placement.device_id
        if self.pci is not None and self.pci.has(dev_id):
            self.pci_models.pop(dev_id, None)
            model = self.pci.remove(dev_id)
            if isinstance(model, VirtioNet):
                self._unwatch_rx(model)
            return
        model = self.pci_models.pop(att.placement.device_id, None)
        if model is not None and hasattr(model, "release"):
            model.release()

    # --- q35: PCI Express -------------------------------------------------------------------------

    def _create_pci(self) -> None:
        from application.pci import PciPlatform

        self.pci = PciPlatform(pio=self.dm.pio, mmio=self.dm.mmio, hv_vm=self.hv_vm, poller=self.poller,
                               on_activate=self._on_activate)

    def _pci_root_ports(self) -> None:
        """The command line's root ports (in the topology before any device, DeviceManager.realize)."""
        topo = self.dm.topology
        for port_id, number in topo.root_ports.items():
            if port_id not in self.pci.ports:
                addr = topo.get(port_id).addr
                if addr is None:
                    raise InvalidArgumentError(f"pcie-root-port '{port_id}' needs an addr on pcie.0")
                self.pci.add_root_port(port_id, number, addr)

    def _pci_where(self, att, devcfg) -> tuple[str, int | None]:
        """(bus, addr) of a PCI function, its root ports created first."""
        self._pci_root_ports()
        p = att.placement
        return (p.bus, p.addr) if p.bus else (devcfg.bus or "pcie.0", devcfg.addr)

    def _pci_add(self, att, model, devcfg) -> None:
        bus, addr = self._pci_where(att, devcfg)
        p = att.placement
        self.pci.add_virtio(p.device_id, model, bus, addr, hotplugged=p.hotplugged)
        self.pci_models[p.device_id] = model

    @property
    def unplug_agent(self):
        """q35: the GuestAgent that asks the guest's pciehp (None on microvm)."""
        return self.pci

    # --- net rx -----------------------------------------------------------------------------------

    def _on_activate(self, transport: VirtioMmioTransport) -> None:
        model = transport.device
        if isinstance(model, VirtioNet):
            self._watch_rx(model)

    def _watch_rx(self, model: VirtioNet) -> None:
        fd = model.backend.fd
        if fd >= 0 and not self._rx_watched.get(fd):
            self._rx_watched[fd] = True
            self.poller.watch(fd, lambda m=model: self._rx_ready(m), drain_eventfd=False)

    def _unwatch_rx(self, model: VirtioNet) -> None:
        fd = model.backend.fd
        if self._rx_watched.pop(fd, False):
            self.poller.unwatch(fd)

    def _rx_ready(self, model: VirtioNet) -> None:
        if not model.process_rx():
            # No guest buffers: stop polling the tap (level-triggered) until the guest adds some.
            self._unwatch_rx(model)

    def _rx_wakeup(self, slot: Slot) -> None:
        model = slot.transport.device
        if isinstance(model, VirtioNet):
            self._watch_rx(model)

    # --- snapshot ---------------------------------------------------------------------------------

    def save_states(self) -> dict[str, tuple[int, Any]]:
        out: dict[str, tuple[int, Any]] = {
            "serial": (STATE_VERSION, self.serial.save_state()),
            "i8042": (STATE_VERSION, self.i8042.save_state()),
            "rtc": (rtc.STATE_VERSION, self.rtc.save_state()),
        }
        for name, slot in self.slots.items():
            out[f"mmio.{name}"] = (STATE_VERSION, slot.transport.save_state())
        if self.pci is not None:
            out.update((k, (STATE_VERSION, v)) for k, v in self.pci.save_states().items())
        return out

    def restore_states(self, states: dict[str, tuple[int, Any]]) -> None:
        want = {"serial", "i8042", "rtc"} | {f"mmio.{n}" for n in self.slots}
        if self.pci is not None:
            want |= self.pci.state_names()
        missing = sorted(want - states.keys())
        if missing:
            raise SnapshotFormatError(f"device state missing for {missing}")
        extra = sorted(states.keys() - want)
        if extra:
            raise SnapshotFormatError(f"device state for devices this VM lacks: {extra}")
        for name, (version, _) in states.items():
            if version != STATE_VERSION and not (name == "rtc" and version in rtc.STATE_VERSIONS):
                raise SnapshotFormatError(f"device state '{name}' has version {version}, expected {STATE_VERSION}")
        self.serial.restore_state(states["serial"][1])
        self.i8042.restore_state(states["i8042"][1])
        self.rtc.restore_state(states["rtc"][1], states["rtc"][0])
        for name, slot in self.slots.items():
            slot.transport.restore_state(states[f"mmio.{name}"][1])
        if self.pci is not None:
            self.pci.restore_states({k: v for k, (_, v) in states.items() if k.startswith("pci.")})
