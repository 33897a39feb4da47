import struct

import pytest

from domain.boot import layout
from domain.boot.errors import BootError
from domain.boot.loader import load_kernel
from domain.boot.params import (
    E820_RAM,
    E820_RESERVED,
    e820_map,
    load_initrd,
    place_initrd,
    write_boot_params,
    write_cmdline,
)
from domain.memory import GuestMemory
from tests.unit.test_boot_loader import make_bzimage, make_elf

MiB = 1 << 20
GiB = 1 << 30


def ram(size=64 * MiB):
    return GuestMemory([(0, bytearray(size))])


def test_ram_layout_below_and_above_the_gap():
    assert layout.ram_layout(256 * MiB) == [(0, 256 * MiB)]
    assert layout.ram_layout(3 * GiB) == [(0, 3 * GiB)]
    assert layout.ram_layout(5 * GiB) == [(0, 3 * GiB), (4 * GiB, 2 * GiB)]
    with pytest.raises(Exception, match="multiple"):
        layout.ram_layout(12345)


def test_virtio_mmio_slots_are_inside_the_gap_and_skip_the_rtc_irq():
    base, irq = layout.virtio_mmio_slot(0)
    assert (base, irq) == (0xD000_0000, 5)
    irqs = [layout.virtio_mmio_slot(i)[1] for i in range(layout.VIRTIO_MMIO_MAX_SLOTS)]
    assert layout.RTC_IRQ not in irqs and max(irqs) == 23 and len(set(irqs)) == len(irqs)
    assert layout.MMIO_GAP_START <= base < layout.IOAPIC_START
    assert layout.virtio_mmio_cmdline(1) == "virtio_mmio.device=4K@0xd0001000:6"
    with pytest.raises(Exception):
        layout.virtio_mmio_slot(layout.VIRTIO_MMIO_MAX_SLOTS)


def test_e820_small_guest():
    m = e820_map(ram(64 * MiB))
    assert (0, layout.EBDA_START, E820_RAM) in m
    assert (layout.EBDA_START, layout.HIMEM_START - layout.EBDA_START, E820_RESERVED) in m
    assert (layout.HIMEM_START, 64 * MiB - layout.HIMEM_START, E820_RAM) in m
    # entries are sorted and do not overlap
    for (a, s, _), (b, _, _) in zip(m, m[1:]):
        assert a + s <= b


def test_e820_reserves_the_machine_windows_and_refuses_one_over_ram():
    ecam = (0xE000_0000, 256 * MiB)
    m = e820_map(ram(64 * MiB), [ecam])
    assert (*ecam, E820_RESERVED) in m
    assert m == sorted(m)
    with pytest.raises(BootError, match="overlaps guest RAM"):
        e820_map(ram(64 * MiB), [(32 * MiB, MiB)])


def test_q35_boot_params_carry_the_ecam_reservation():
    from domain.devices.pci import layout as pci_layout

    mem = ram(64 * MiB)
    kernel = load_kernel(mem, make_elf([(0x1000000, b"k" * 64, 64)], entry=0x1000000))
    bp = write_boot_params(mem, kernel, 0, None, [(pci_layout.ECAM_BASE, pci_layout.ECAM_BUSES * MiB)])
    n = bp[0x1E8]
    entries = [struct.unpack_from("<QQI", bp, 0x2D0 + 20 * i) for i in range(n)]
    assert (pci_layout.ECAM_BASE, pci_layout.ECAM_BUSES * MiB, E820_RESERVED) in entries


def test_e820_guest_with_ram_above_4g():
    class FakeMem:  # regions only: no need to allocate 5 GiB
        class R:
            def __init__(self, gpa, size):
                self.gpa, self.size, self.end = gpa, size, gpa + size
        regions = (R(0, 3 * GiB), R(4 * GiB, 2 * GiB))

    m = e820_map(FakeMem())
    ram_entries = [(a, s) for a, s, t in m if t == E820_RAM]
    assert ram_entries == [(0, layout.EBDA_START), (layout.HIMEM_START, 3 * GiB - layout.HIMEM_START),
                           (4 * GiB, 2 * GiB)]
    reserved = [(a, s) for a, s, t in m if t == E820_RESERVED]
    assert (layout.IDENTITY_MAP_ADDR, 4 * 4096) in reserved


def test_zero_page_for_a_bzimage_keeps_the_kernel_header_and_fills_loader_fields():
    mem = ram()
    img, _ = make_bzimage()
    k = load_kernel(mem, img)
    n = write_cmdline(mem, k, "console=ttyS0 reboot=k")
    initrd = load_initrd(mem, k, b"INITRD" * 1000)
    bp = write_boot_params(mem, k, n, initrd)
    assert mem.read(layout.ZERO_PAGE_START, 4096) == bp
    assert struct.unpack_from("<H", bp, 0x1FE)[0] == 0xAA55
    assert bp[0x202:0x206] == b"HdrS"
    assert struct.unpack_from("<H", bp, 0x206)[0] == 0x20F  # copied from the image
    assert bp[0x210] == 0xFF  # type_of_loader
    assert struct.unpack_from("<I", bp, 0x228)[0] == layout.CMDLINE_START
    assert struct.unpack_from("<I", bp, 0x238)[0] == 2047
    assert struct.unpack_from("<II", bp, 0x218) == (initrd[0], 6000)
    assert mem.read(layout.CMDLINE_START, n + 1) == b"console=ttyS0 reboot=k\0"
    nr = bp[0x1E8]
    entries = [struct.unpack_from("<QQI", bp, 0x2D0 + 20 * i) for i in range(nr)]
    assert entries == e820_map(mem)
    assert bp[0x1EF] == 0  # sentinel: we cleared the page ourselves


def test_zero_page_for_an_elf_is_built_from_scratch():
    mem = ram()
    k = load_kernel(mem, make_elf([(0x1000000, b"k" * 64, 64)], entry=0x1000000))
    bp = write_boot_params(mem, k, write_cmdline(mem, k, b"x"), None)
    assert struct.unpack_from("<H", bp, 0x1FE)[0] == 0xAA55
    assert bp[0x202:0x206] == b"HdrS"
    assert bp[0x210] == 0xFF
    assert bp[0x211] & 0x01
    assert struct.unpack_from("<I", bp, 0x230)[0] == 0x1000000
    assert struct.unpack_from("<I", bp, 0x228)[0] == 0x20000
    assert struct.unpack_from("<II", bp, 0x218) == (0, 0)


def test_cmdline_limits():
    mem = ram()
    img, _ = make_bzimage(cmdline_size=16)
    k = load_kernel(mem, img)
    assert write_cmdline(mem, k, "a" * 16) == 16
    with pytest.raises(BootError, match="longer than 16") as e:
        write_cmdline(mem, k, "a" * 17)
    assert e.value.option == "-append"
    with pytest.raises(BootError, match="NUL"):
        write_cmdline(mem, k, "a\0b")
    img, _ = make_bzimage(cmdline_size=100000)
    k = load_kernel(mem, img)
    with pytest.raises(BootError, match="longer than 2047"):
        write_cmdline(mem, k, "a" * 2048)


def test_initrd_goes_high_page_aligned_below_every_limit():
    mem = ram(64 * MiB)
    img, _ = make_bzimage()
    k = load_kernel(mem, img)
    addr = place_initrd(mem, k, 10000)
    assert addr % 4096 == 0
    assert addr + 10000 <= 64 * MiB
    assert addr > 64 * MiB - 4 * 4096
    assert addr >= k.kernel_end
    # A kernel with a low initrd_addr_max is obeyed.
    img, _ = make_bzimage(initrd_max=0x1FFFFFF)
    k = load_kernel(mem, img)
    assert place_initrd(mem, k, 4096) + 4096 <= 0x2000000


def test_initrd_capped_at_0x37ffffff_in_a_big_guest():
    class Big:
        class R:
            gpa, end, size = 0, 3 << 30, 3 << 30
        regions = (R(),)

    img, _ = make_bzimage()
    k = load_kernel(ram(), img)
    addr = place_initrd(Big(), k, 1 << 20)
    assert addr + (1 << 20) <= 0x38000000


def test_initrd_that_does_not_fit_is_refused():
    mem = ram(32 * MiB)
    img, _ = make_bzimage()
    k = load_kernel(mem, img)
    with pytest.raises(BootError, match="does not fit") as e:
        place_initrd(mem, k, 20 * MiB)
    assert e.value.option == "-initrd"
