"""vfio-pci on q35 as the composition root wires it, on the test hypervisor, with the guest's
side scripted as Linux does it (pciehp, config space through 0xCF8, the driver's MSI-X setup).

This host has no IOMMU, so the VFIO device is an in-memory one (the unit tests' FakeVfioDevice,
its BAR0 handed out as a mappable buffer); everything from device_add to the machine is the
product's code: placement in the root port, BARs trapped on the buses and the mmappable part
mapped as a memory slot over the device's own memory, one eventfd per MSI-X vector that the
I/O thread turns into the guest's message, and device_del giving the device back."""

from __future__ import annotations

import os

import pytest

from domain.config import DeviceConfig
from domain.devices.pci import regs
from domain.events import DeviceDeleted
from tests.integration.test_q35_pci_wiring import LAPIC, Guest, q35  # noqa: F401 (q35: a fixture)
from tests.integration.waiting import until
from tests.unit.test_dev_pci_vfio import FakeVfioDevice

HOST = "0000:1a:00.3"


class MappableVfioDevice(FakeVfioDevice):
    """BAR0 can be mmapped (its table and PBA pages are left out by the function); IRQ eventfds
    and closing are recorded."""

    def __init__(self):
        super().__init__()
        self.sizes[2] = 0x4000  # a BAR2 that fits the root port's window (the unit fake's is 8 GiB)
        self.irq_fds: dict[int, list[int]] = {}
        self.disabled: list[int] = []

    def region_mmap(self, index):
        return [(0, memoryview(self.bars[0]))] if index == 0 else []

    def set_irq_eventfds(self, index, fds, start=0):
        self.irq_fds[index] = list(fds)

    def disable_irqs(self, index):
        self.disabled.append(index)
        self.irq_fds.pop(index, None)


class Opener:
    def __init__(self):
        self.opened: list[MappableVfioDevice] = []

    def open_device(self, host):
        dev = MappableVfioDevice()
        self.opened.append(dev)
        return dev


class Probe:
    """The host side the device manager checks before it opens anything: here, as on a host
    with an IOMMU, the PCI address exists and has a group."""

    def __init__(self, real):
        self._real = real

    def pci_device_exists(self, host):
        return host == HOST

    def iommu_group(self, host):
        return "7" if host == HOST else None

    def __getattr__(self, name):
        return getattr(self._real, name)


@pytest.fixture
def vfio_vm(q35):  # noqa: F811
    vm = q35(kvm_unplug=True)
    vm.opener = Opener()
    vm.dm.vfio = vm.opener
    vm.dm._probe = Probe(vm.dm._probe)
    return vm


def plug(vm) -> tuple[Guest, MappableVfioDevice]:
    guest = Guest(vm)
    vm.dm.device_add_config(DeviceConfig("vfio-pci", id="vfio-0", host=HOST, bus="pcie.1", addr=0),
                            hotplugged=True)
    guest.clear()
    guest.ctl(regs.SLTCTL_PWR_IND_ON, regs.SLTCTL_PCC | regs.SLTCTL_PIC)  # pciehp powers the slot
    return guest, vm.opener.opened[-1]


def bar_base(c, index) -> int:
    return c.read(1, 0, regs.BAR0 + 4 * index) & ~0xF


def plug_decoding(vm) -> tuple[Guest, MappableVfioDevice, int]:
    """plug(), then the driver turns memory decoding on; returns BAR0's address too."""
    guest, dev = plug(vm)
    guest.c.write(1, 0, regs.COMMAND, 2, regs.COMMAND_MEMORY)
    return guest, dev, bar_base(guest.c, 0)


def test_the_host_function_appears_in_the_root_port_with_its_bars_in_the_window(vfio_vm):
    guest, dev = plug(vfio_vm)
    c = guest.c
    assert c.read(1, 0, regs.VENDOR_ID, 4) == 0x10FB_8086
    bar0 = bar_base(c, 0)
    window = c.read(0, 0x10, regs.MEMORY_BASE, 2) << 16
    assert window <= bar0 < window + (2 << 20)


def test_bars_trap_and_the_mappable_part_is_a_memory_slot_over_the_device(vfio_vm):
    vm = vfio_vm
    guest, dev = plug(vm)
    c = guest.c
    bar0, io4 = bar_base(c, 0), 0x6000
    c.write(1, 0, regs.BAR0 + 16, 4, io4)  # the guest assigns the I/O BAR (hot-plug placed the memory ones)
    c.write(1, 0, regs.COMMAND, 2, regs.COMMAND_MEMORY | regs.COMMAND_IO)
    # Registers below the MSI-X table: a memory slot over the device's own BAR memory.
    dev.bars[0][0x100:0x104] = b"\x11\x22\x33\x44"
    assert vm.hv.read(bar0 + 0x100, 4) == 0x4433_2211
    vm.hv.guest_write(bar0 + 0x200, b"\xab")
    assert dev.bars[0][0x200] == 0xAB
    assert vm.hv.read(bar0 + 0x2000, 4) is None  # the MSI-X table is not mapped: it traps
    # The table traps to the function's shadow: entries start masked.
    assert vm.bus.mmio_read(bar0 + 0x2000 + regs.MSIX_ENTRY_VECTOR_CTRL, 4) == regs.MSIX_ENTRY_CTRL_MASKBIT
    # The I/O BAR traps on the port bus and reaches the device's region.
    assert vm.dm.pio.write(io4 + 4, memoryview(b"\x5a"))
    assert (4, 4, b"\x5a") in dev.writes
    # Decoding off: the slot and the traps go away.
    c.write(1, 0, regs.COMMAND, 2, 0)
    assert vm.hv.read(bar0 + 0x100, 4) is None
    assert vm.dm.mmio.find(bar0) is None and vm.dm.pio.find(io4) is None


def test_msix_vectors_reach_the_guest_through_eventfds(vfio_vm):
    vm = vfio_vm
    guest, dev, bar0 = plug_decoding(vm)
    c = guest.c
    entry = bar0 + 0x2000 + regs.MSIX_ENTRY_SIZE  # vector 1
    vm.bus.mmio_write(entry, 4, LAPIC)
    vm.bus.mmio_write(entry + 8, 4, 0x61)
    vm.bus.mmio_write(entry + regs.MSIX_ENTRY_VECTOR_CTRL, 4, 0)  # unmasked
    msix = c.find(1, 0, regs.CAP_ID_MSIX)
    c.write(1, 0, msix + regs.MSIX_FLAGS, 2, regs.MSIX_FLAGS_ENABLE)
    fds = dev.irq_fds[dev.indices.msix]
    assert len(fds) == 4 and len(set(fds)) == 4
    os.eventfd_write(fds[1], 1)  # what the host kernel does when the device raises vector 1
    until(lambda: (LAPIC, 0x61) in vm.hv.msi_log, "vector 1's message")
    os.eventfd_write(fds[0], 1)  # vector 0 is still masked: kept pending, nothing sent
    fn = vm.dm.platform.pci_models["vfio-0"]
    until(lambda: fn.is_pending("msix", 0), "vector 0 pending")
    c.write(1, 0, msix + regs.MSIX_FLAGS, 2, 0)  # MSI-X off: VFIO told, eventfds closed
    assert dev.disabled == [dev.indices.msix]
    with pytest.raises(OSError):
        os.fstat(fds[0])


def test_device_del_goes_through_pciehp_and_gives_the_device_back(vfio_vm):
    vm = vfio_vm
    guest, dev, bar0 = plug_decoding(vm)
    assert vm.hv.read(bar0, 1) == 0
    assert vm.dm.device_del("vfio-0") is False  # the guest must acknowledge
    guest.clear()
    guest.ctl(regs.SLTCTL_PWR_IND_BLINK, regs.SLTCTL_PIC)
    guest.ctl(regs.SLTCTL_PCC, regs.SLTCTL_PCC)
    guest.ctl(regs.SLTCTL_PWR_IND_OFF, regs.SLTCTL_PIC)
    until(lambda: any(isinstance(e, DeviceDeleted) for e in vm.events), "DEVICE_DELETED")
    assert dev.closed
    assert vm.hv.read(bar0, 1) is None and vm.dm.mmio.find(bar0) is None
    assert "vfio-0" not in vm.dm.platform.pci.passthrough
    # The slot is free again: the same host function can come back.
    vm.dm.device_add_config(DeviceConfig("vfio-pci", id="vfio-1", host=HOST, bus="pcie.1", addr=0),
                            hotplugged=True)
    assert len(vm.opener.opened) == 2


def test_a_device_that_cannot_be_placed_is_closed_again(vfio_vm):
    vm = vfio_vm
    with pytest.raises(Exception, match="pcie.9"):
        vm.dm.device_add_config(DeviceConfig("vfio-pci", id="vfio-0", host=HOST, bus="pcie.9", addr=0),
                                hotplugged=True)
    assert all(d.closed for d in vm.opener.opened)
    assert "vfio-0" not in vm.dm.attached


def test_a_bar_the_guest_puts_over_another_device_or_ram_is_refused_quietly(vfio_vm):
    """A hostile or confused guest: BAR0 moved onto the virtio-blk function's BAR, then onto
    guest RAM. Neither mapping happens, nothing crashes, the other device keeps its BAR, and a
    sane placement afterwards works again."""
    vm = vfio_vm
    guest, dev, bar0 = plug_decoding(vm)
    c = guest.c
    blk_bar = c.read(0, 3 << 3, regs.BAR0) & ~0xF
    c.write(1, 0, regs.BAR0, 4, blk_bar)
    hit = vm.dm.mmio.find(blk_bar)
    assert hit is not None and hit[0].device.device is not vm.dm.platform.pci_models["vfio-0"]
    c.write(1, 0, regs.BAR0, 4, 0x10_0000)  # over guest RAM: no slot may shadow it
    assert vm.hv.read(0x10_0000, 4) is not None  # still RAM
    ram_before = vm.hv.read(0x10_0100, 4)
    dev.bars[0][0x100:0x104] = b"\xde\xad\xbe\xef"
    assert vm.hv.read(0x10_0100, 4) == ram_before
    c.write(1, 0, regs.BAR0, 4, bar0)  # back where it belongs
    dev.bars[0][0x100:0x104] = b"\x01\x02\x03\x04"
    assert vm.hv.read(bar0 + 0x100, 4) == 0x0403_0201
