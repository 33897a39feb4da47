"""The root complex seen through 0xCF8/0xCFC and ECAM: Linux's type-1 probe, enumeration,
bus numbers written into bridges, bridge windows."""

import struct

import pytest

from domain.devices.pci import regs
from domain.devices.pci.bridge import PciBridge
from domain.devices.pci.device import PciDevice
from domain.devices.pci.host import PciEcam, devfn
from domain.devices.pci.mock import PciRig
from domain.devices.pci.root_port import PcieRootPort
from domain.errors import DuplicateIdError


def endpoint(name="ep", device=0x1111):
    return PciDevice(vendor=0x1AF4, device=device, class_code=regs.CLASS_STORAGE_OTHER, name=name)


def bridge(name):
    return PciBridge(vendor=regs.VENDOR_REDHAT, device=0x0001, name=name)


def test_linux_type1_probe_sequence():
    """arch/x86/pci/direct.c pci_check_type1 + pci_sanity_check."""
    rig = PciRig()
    c = rig.conf1()
    rig.pio.write(0xCFB, memoryview(b"\x01"))  # outb(0x01, 0xCFB)
    tmp = c.inl(0xCF8)
    c.outl(0xCF8, 0x8000_0000)
    assert c.inl(0xCF8) == 0x8000_0000
    c.outl(0xCF8, tmp)
    # sanity check: a host bridge somewhere on bus 0
    assert c.read(0, 0, 0x0A, 2) == regs.CLASS_BRIDGE_HOST >> 8
    assert c.read(0, 0, regs.VENDOR_ID, 2) == regs.VENDOR_INTEL
    assert c.read(0, 0, regs.DEVICE_ID, 2) == regs.DEVICE_Q35_MCH


def test_config_address_latch_rules():
    rig = PciRig()
    c = rig.conf1()
    c.outl(0xCF8, 0xFFFF_FFFF)
    assert c.inl(0xCF8) == 0x80FF_FFFC  # reserved bits read zero
    rig.pio.write(0xCF8, memoryview(b"\x00\x00"))  # a word write does not touch the latch
    assert c.inl(0xCF8) == 0x80FF_FFFC
    buf = bytearray(2)
    rig.pio.read(0xCF8, memoryview(buf))
    assert buf == b"\xff\xff"
    c.outl(0xCF8, 0x0000_0000)  # enable bit clear: data port answers all ones
    assert c.inl(0xCFC) == 0xFFFF_FFFF


def test_byte_and_word_data_accesses_pick_the_right_lanes():
    rig = PciRig()
    c = rig.conf1()
    assert c.read(0, 0, regs.DEVICE_ID, 2) == regs.DEVICE_Q35_MCH
    assert c.read(0, 0, 0x01, 1) == regs.VENDOR_INTEL >> 8
    assert c.read(0, 0, regs.HEADER_TYPE, 1) == 0
    c.write(0, 0, regs.INTERRUPT_LINE, 1, 0x0B)
    assert c.read(0, 0, regs.INTERRUPT_LINE, 1) == 0x0B
    c.outl(0xCF8, 0x8000_0000 | regs.VENDOR_ID)
    buf = bytearray(2)
    rig.pio.read(0xCFD, memoryview(buf))  # misaligned word: no configuration cycle
    assert buf == b"\xff" * 2


def test_enumeration_of_bus_0_finds_what_is_plugged():
    rig = PciRig()
    rig.root.bus.attach(devfn(3), endpoint())
    c = rig.conf1()
    found = [(d >> 3, c.read(0, d, regs.VENDOR_ID, 2)) for d in range(0, 256, 8)
             if c.read(0, d, regs.VENDOR_ID, 2) != 0xFFFF]
    assert found == [(0, regs.VENDOR_INTEL), (3, 0x1AF4)]
    assert c.read(1, 0, regs.VENDOR_ID, 4) == 0xFFFF_FFFF  # no bus 1 yet
    with pytest.raises(DuplicateIdError):
        rig.root.bus.attach(devfn(3), endpoint())


def test_bus_numbers_written_by_the_guest_route_type1_cycles():
    rig = PciRig()
    a, b = bridge("a"), bridge("b")
    rig.root.bus.attach(devfn(2), a)
    rig.root.bus.attach(devfn(3), b)
    a.secondary_bus.attach(0, endpoint("behind-a", 0xA))
    b.secondary_bus.attach(0, endpoint("behind-b", 0xB))
    c = rig.conf1()
    assert c.read(0, devfn(2), regs.HEADER_TYPE, 1) == regs.HEADER_TYPE_BRIDGE
    assert c.read(0, devfn(2), 0x0A, 2) == regs.CLASS_BRIDGE_PCI >> 8
    assert c.read(1, 0, regs.VENDOR_ID, 2) == 0xFFFF  # unnumbered bridges forward nothing
    # What Linux does for an unconfigured bridge: primary, secondary, subordinate in one dword.
    c.write(0, devfn(2), regs.PRIMARY_BUS, 4, 0x00_05_05_00)
    c.write(0, devfn(3), regs.PRIMARY_BUS, 4, 0x00_07_06_00)
    assert (a.primary_number, a.secondary_number, a.subordinate_number) == (0, 5, 5)
    assert c.read(5, 0, regs.DEVICE_ID, 2) == 0xA
    assert c.read(6, 0, regs.DEVICE_ID, 2) == 0xB
    assert c.read(7, 0, regs.DEVICE_ID, 2) == 0xFFFF  # bus 7 is inside b's range but empty
    assert c.read(5, devfn(1), regs.DEVICE_ID, 2) == 0xFFFF


def test_nested_bridges_and_a_bridge_pointing_back_up():
    rig = PciRig()
    top, inner = bridge("top"), bridge("inner")
    rig.root.bus.attach(devfn(1), top)
    top.secondary_bus.attach(0, inner)
    inner.secondary_bus.attach(0, endpoint("deep", 0xD))
    top.set_bus_numbers(0, 1, 2)
    inner.set_bus_numbers(1, 2, 2)
    c = rig.conf1()
    assert c.read(2, 0, regs.DEVICE_ID, 2) == 0xD
    inner.set_bus_numbers(1, 1, 2)  # secondary not below its own bus: no way down
    assert c.read(2, 0, regs.DEVICE_ID, 2) == 0xFFFF


def test_bridge_windows_as_linux_probes_them():
    """drivers/pci/probe.c pci_read_bridge_windows: I/O and prefetchable windows are absent
    (hardwired 0), the memory window is 1 MiB grained and starts closed."""
    rig = PciRig()
    br = bridge("br")
    rig.root.bus.attach(devfn(2), br)
    c = rig.conf1()
    d = devfn(2)
    assert c.read(0, d, regs.IO_BASE, 2) == 0
    c.write(0, d, regs.IO_BASE, 2, 0xE0F0)
    assert c.read(0, d, regs.IO_BASE, 2) == 0
    c.write(0, d, regs.PREF_MEMORY_BASE, 4, 0xFFE0_FFF0)
    assert c.read(0, d, regs.PREF_MEMORY_BASE, 4) == 0
    assert br.memory_window() is None
    c.write(0, d, regs.MEMORY_BASE, 4, 0xC01F_C000 | 0x000F_000F)  # low nibbles are read-only
    assert c.read(0, d, regs.MEMORY_BASE, 4) == 0xC010_C000
    assert br.memory_window() == (0xC000_0000, 0xC01F_FFFF)
    br.set_memory_window(0xC020_0000, 0xC03F_FFFF)
    assert c.read(0, d, regs.MEMORY_BASE, 2) == 0xC020 and c.read(0, d, regs.MEMORY_LIMIT, 2) == 0xC030
    with pytest.raises(ValueError):
        br.set_memory_window(0xC000_1000, 0xC01F_FFFF)
    assert c.read(0, d, regs.BAR0, 4) == 0  # a bridge without BARs


def test_ecam_reaches_the_same_registers_and_the_extended_space():
    rig = PciRig()
    port = PcieRootPort(port_number=1, send_msi=rig.send_msi, name="rp")
    rig.root.bus.attach(devfn(2), port)
    port.set_bus_numbers(0, 1, 1)
    port.plug(endpoint("ep", 0xE), "ep", hot=False)
    ecam = PciEcam(rig.root)
    assert ecam.size == 256 << 20

    def rd(bus, dfn, reg, size):
        buf = bytearray(size)
        ecam.read(bus << 20 | dfn << 12 | reg, memoryview(buf))
        return int.from_bytes(buf, "little")

    assert rd(0, 0, regs.VENDOR_ID, 4) == rig.conf1().read(0, 0, regs.VENDOR_ID, 4)
    assert rd(0, devfn(2), regs.DEVICE_ID, 2) == regs.DEVICE_REDHAT_ROOT_PORT
    assert rd(1, 0, regs.DEVICE_ID, 2) == 0xE
    assert rd(0, devfn(2), 0x100, 4) == 0  # PCIe function: extended space present, no capability
    assert rd(0, 0, 0x100, 4) == 0xFFFF_FFFF  # conventional function: nothing there
    assert rd(9, 0, 0, 4) == 0xFFFF_FFFF
    buf = bytearray(8)
    ecam.read(0, memoryview(buf))
    assert struct.unpack("<II", buf)[0] == regs.DEVICE_Q35_MCH << 16 | regs.VENDOR_INTEL
    ecam.write(devfn(2) << 12 | regs.INTERRUPT_LINE, memoryview(b"\x0a"))
    assert rd(0, devfn(2), regs.INTERRUPT_LINE, 1) == 0x0A
    ecam.read(1, memoryview(buf)[:2])  # misaligned
    assert buf[:2] == b"\xff\xff"
