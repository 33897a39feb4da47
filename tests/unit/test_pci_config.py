"""Configuration space: write masks, write-1-to-clear, the capability list, BAR sizing and the
placement rules that decide when a BAR decodes."""

import pytest

from domain.devices.pci import regs
from domain.devices.pci.config import PciConfig, PciConfigError
from domain.devices.pci.device import PciDevice


def dev(**kw):
    d = PciDevice(vendor=0x1234, device=0x5678, class_code=0x018000, revision=3,
                  subsystem_vendor=0xAAAA, subsystem_id=0xBBBB, name="d", **kw)
    d.moves = []
    d.on_bar_moved = lambda dv, bar, old, new: d.moves.append((bar.index, old, new))
    return d


def test_identity_registers_are_read_only():
    d = dev()
    assert d.read_config(regs.VENDOR_ID, 4) == 0x5678_1234
    assert d.read_config(regs.REVISION_ID, 4) == 0x0180_0003
    assert d.read_config(regs.HEADER_TYPE, 1) == 0
    assert d.read_config(regs.SUBSYSTEM_VENDOR_ID, 4) == 0xBBBB_AAAA
    d.write_config(regs.VENDOR_ID, 4, 0)
    d.write_config(regs.CLASS_PROG, 1, 0x55)
    assert d.read_config(regs.VENDOR_ID, 4) == 0x5678_1234
    assert d.read_config(regs.CLASS_PROG, 1) == 0


def test_command_keeps_only_defined_bits_and_status_is_write_one_to_clear():
    d = dev()
    d.write_config(regs.COMMAND, 2, 0xFFFF)
    assert d.read_config(regs.COMMAND, 2) == regs.COMMAND_WRITABLE
    d.config.set(regs.STATUS, 2, 0x8000 | 0x2000 | regs.STATUS_CAP_LIST)
    d.write_config(regs.STATUS, 2, 0x8000 | regs.STATUS_CAP_LIST)
    assert d.read_config(regs.STATUS, 2) == 0x2000 | regs.STATUS_CAP_LIST  # CAP_LIST is read-only


def test_partial_and_misaligned_accesses():
    d = dev()
    d.write_config(regs.INTERRUPT_LINE, 1, 11)
    assert d.read_config(regs.INTERRUPT_LINE, 1) == 11
    assert d.read_config(regs.VENDOR_ID + 1, 2) == 0xFFFF  # misaligned: all ones
    assert d.read_config(0x100, 4) == 0xFFFF_FFFF  # beyond a 256-byte space
    assert d.read_config(0, 3) == 0
    d.write_config(regs.INTERRUPT_LINE - 1, 2, 0xFFFF)  # misaligned write: ignored
    assert d.read_config(regs.INTERRUPT_LINE, 1) == 11


def test_capability_list_links_in_order_and_sets_the_status_bit():
    c = PciConfig()
    assert not c.get(regs.STATUS, 2) & regs.STATUS_CAP_LIST
    a = c.add_capability(regs.CAP_ID_MSI, 0x18)
    b = c.add_capability(regs.CAP_ID_VNDR, 0x11)
    e = c.add_capability(regs.CAP_ID_EXP, 0x3C)
    assert (a, b) == (0x40, 0x58) and e == 0x6C  # dword aligned
    assert c.capabilities() == [(a, regs.CAP_ID_MSI), (b, regs.CAP_ID_VNDR), (e, regs.CAP_ID_EXP)]
    assert c.get(regs.STATUS, 2) & regs.STATUS_CAP_LIST
    with pytest.raises(PciConfigError):
        c.add_capability(regs.CAP_ID_VNDR, 0x100)


def test_capability_walk_stops_on_a_loop():
    c = PciConfig()
    a = c.add_capability(regs.CAP_ID_MSI, 0x10)
    c.data[a + 1] = a  # points to itself
    assert c.capabilities() == [(a, regs.CAP_ID_MSI)]


def size_bar(d, index):
    reg = regs.BAR0 + 4 * index
    orig = d.read_config(reg, 4)
    d.write_config(reg, 4, 0xFFFF_FFFF)
    probe = d.read_config(reg, 4)
    d.write_config(reg, 4, orig)
    return probe


def test_bar_sizing_32_64_io_and_absent():
    d = dev()
    d.add_bar(0, 0x4000)
    d.add_bar(1, 0x20, io=True)
    d.add_bar(2, 1 << 33, mem64=True, prefetch=True)
    assert size_bar(d, 0) == 0xFFFF_C000
    assert size_bar(d, 1) == 0xFFFF_FFE1
    assert size_bar(d, 2) == 0x0000_000C  # low dword of an 8 GiB BAR: no address bits
    assert size_bar(d, 3) == 0xFFFF_FFFE  # high dword
    assert size_bar(d, 4) == 0 and size_bar(d, 5) == 0
    assert d.read_config(regs.ROM_ADDRESS, 4) == 0
    d.write_config(regs.ROM_ADDRESS, 4, 0xFFFF_FFFF)
    assert d.read_config(regs.ROM_ADDRESS, 4) == 0  # no ROM


def test_bad_bars_are_refused():
    d = dev()
    d.add_bar(4, 0x1000, mem64=True)
    for args, kw in [((5, 0x1000), {}), ((4, 0x1000), {}), ((5, 0x1000), {"mem64": True}),
                     ((0, 0x1800), {}), ((0, 8), {}), ((0, 0x100), {"io": True, "mem64": True}),
                     ((6, 0x1000), {}), ((0, 1 << 32), {})]:
        with pytest.raises(PciConfigError):
            d.add_bar(*args, **kw)


def test_bar_decodes_only_with_memory_enable_and_a_real_address():
    d = dev()
    d.add_bar(0, 0x4000)
    d.write_config(regs.BAR0, 4, 0xC000_4000)
    assert d.moves == []  # decoding still off
    d.write_config(regs.COMMAND, 2, regs.COMMAND_MEMORY)
    assert d.moves == [(0, None, 0xC000_4000)]
    d.write_config(regs.BAR0, 4, 0xFFFF_FFFF)  # sizing with decode on: never maps at the top
    assert d.moves[-1] == (0, 0xC000_4000, None)
    d.write_config(regs.BAR0, 4, 0xC000_8000)
    assert d.moves[-1] == (0, None, 0xC000_8000)
    d.write_config(regs.COMMAND, 2, 0)
    assert d.moves[-1] == (0, 0xC000_8000, None)
    d.write_config(regs.BAR0, 4, 0)
    d.write_config(regs.COMMAND, 2, regs.COMMAND_MEMORY)
    assert d.moves[-1] == (0, 0xC000_8000, None)  # address 0: not placed, nothing new


def test_64bit_bar_moves_with_each_half_and_firmware_placement():
    d = dev()
    d.add_bar(2, 0x10000, mem64=True)
    d.write_config(regs.COMMAND, 2, regs.COMMAND_MEMORY)
    d.set_bar_address(2, 0x1_0000_0000)
    assert d.moves == [(2, None, 0x1_0000_0000)]
    d.write_config(regs.BAR0 + 12, 4, 0x2)
    assert d.moves[-1] == (2, 0x1_0000_0000, 0x2_0000_0000)
    with pytest.raises(PciConfigError):
        d.set_bar_address(2, 0x1000)  # not aligned to the size
    d.unmap_all()
    assert d.moves[-1] == (2, 0x2_0000_0000, None)


def test_io_bar_follows_the_io_enable():
    d = dev()
    d.add_bar(1, 0x20, io=True)
    d.write_config(regs.BAR0 + 4, 4, 0xC040)
    d.write_config(regs.COMMAND, 2, regs.COMMAND_MEMORY)
    assert d.moves == []
    d.write_config(regs.COMMAND, 2, regs.COMMAND_IO)
    assert d.moves == [(1, None, 0xC040)]
