"""The firmware step: bus numbers, root port windows, BAR placement; then a Linux-style scan
through 0xCF8 finds every function behind the ports where the firmware left it."""

import pytest

from domain.devices.pci import regs
from domain.devices.pci.device import PciDevice
from domain.devices.pci.firmware import WINDOW_SIZE, MmioAllocator, assign_resources, place_in_window
from domain.devices.pci.host import devfn
from domain.devices.pci.mock import PciRig
from domain.devices.pci.root_port import PcieRootPort
from domain.errors import ResourceExhaustedError

BASE = 0xC000_0000


def ep(name, size=0x8000):
    d = PciDevice(vendor=0x1AF4, device=0x1041, class_code=regs.CLASS_NETWORK_ETHERNET, name=name)
    d.add_bar(0, size)
    return d


def scan(c, bus=0, out=None):
    """pci_scan_child_bus, depth first, following the bus numbers already in the bridges."""
    out = {} if out is None else out
    for slot in range(32):
        d = devfn(slot)
        vid = c.read(bus, d, regs.VENDOR_ID, 2)
        if vid == 0xFFFF:
            continue
        out[(bus, slot)] = c.read(bus, d, regs.DEVICE_ID, 2)
        if c.read(bus, d, regs.HEADER_TYPE, 1) & 0x7F == 1:
            busses = c.read(bus, d, regs.PRIMARY_BUS, 4)
            primary, secondary, subordinate = busses & 0xFF, busses >> 8 & 0xFF, busses >> 16 & 0xFF
            assert primary == bus and bus < secondary <= subordinate  # not "broken" to Linux
            scan(c, secondary, out)
    return out


def build():
    rig = PciRig()
    ports = []
    for i, slot in enumerate((3, 2)):  # added out of slot order
        p = rig.wire(PcieRootPort(port_number=i + 1, send_msi=rig.send_msi, name=f"pcie.{i + 1}"))
        rig.root.bus.attach(devfn(slot), p)
        ports.append(p)
    rig.root.bus.attach(devfn(5), rig.wire(ep("root-dev", 0x4000)))
    ports[1].plug(rig.wire(ep("in-port")), "in-port", hot=False)
    return rig, ports


def test_buses_windows_and_bars_are_assigned_in_slot_order():
    rig, (p3, p2) = build()
    assign_resources(rig.root, MmioAllocator(BASE, 0x1000_0000))
    assert (p2.primary_number, p2.secondary_number, p2.subordinate_number) == (0, 1, 1)
    assert (p3.primary_number, p3.secondary_number, p3.subordinate_number) == (0, 2, 2)
    assert p2.memory_window() == (BASE, BASE + WINDOW_SIZE - 1)
    assert p3.memory_window() == (BASE + WINDOW_SIZE, BASE + 2 * WINDOW_SIZE - 1)
    inner = p2.slot_device
    assert inner.bars[0].mapped == BASE  # inside its port's window, decoding
    root_dev = rig.root.bus.devices[devfn(5)]
    assert root_dev.bars[0].mapped == BASE + 2 * WINDOW_SIZE
    assert rig.mmio.find(BASE) is not None and rig.mmio.find(BASE + 2 * WINDOW_SIZE) is not None
    c = rig.conf1()
    assert scan(c) == {(0, 0): regs.DEVICE_Q35_MCH, (0, 2): regs.DEVICE_REDHAT_ROOT_PORT,
                       (0, 3): regs.DEVICE_REDHAT_ROOT_PORT, (0, 5): 0x1041, (1, 0): 0x1041}
    assert c.read(0, devfn(2), regs.COMMAND, 2) & regs.COMMAND_MEMORY


def test_hot_plugged_device_lands_in_the_window_the_guest_left():
    rig, (p3, p2) = build()
    assign_resources(rig.root, MmioAllocator(BASE, 0x1000_0000))
    rig.conf1().write(0, devfn(3), regs.MEMORY_BASE, 4, 0xC0F0_C0E0)  # the guest moved it
    dev = rig.wire(ep("hot"))
    assert place_in_window(p3, dev)
    assert dev.bar_address(dev.bars[0]) == 0xC0E0_0000
    assert dev.bars[0].mapped is None  # placed, but the driver enables decoding
    big = ep("big", 1 << 30)
    assert not place_in_window(p3, big)
    assert big.bar_address(big.bars[0]) == 0
    rig.conf1().write(0, devfn(3), regs.MEMORY_BASE, 4, 0x0000_FFF0)  # closed window
    assert not place_in_window(p3, ep("none"))


def test_allocator_alignment_and_exhaustion():
    a = MmioAllocator(0x1000, 0x10000)
    assert a.allocate(0x100, 0x100) == 0x1000
    assert a.allocate(0x4000, 0x4000) == 0x4000
    with pytest.raises(ResourceExhaustedError):
        a.allocate(0x10000, 0x10000)
