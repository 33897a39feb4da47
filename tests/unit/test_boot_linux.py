import struct

import pytest

from domain.boot import BootError, boot_linux, setup_linux_boot
from domain.boot import layout
from domain.memory import GuestMemory
from tests.unit.test_boot_loader import make_bzimage, make_elf

MiB = 1 << 20


def test_setup_linux_boot_with_bzimage_and_initrd():
    mem = GuestMemory([(0, bytearray(64 * MiB))])
    img, pm = make_bzimage()
    regs, sregs = setup_linux_boot(mem, img, b"\x1f\x8b" + bytes(5000), "console=ttyS0", 2)
    assert regs.rip == 0x100000 and regs.rsi == layout.ZERO_PAGE_START  # the 32-bit entry by default
    assert not sregs.cr0 & 0x80000000
    bp = mem.read(layout.ZERO_PAGE_START, 4096)
    rd_addr, rd_size = struct.unpack_from("<II", bp, 0x218)
    assert rd_size == 5002 and mem.read(rd_addr, 2) == b"\x1f\x8b"
    assert mem.read(layout.MPTABLE_START, 4) == b"_MP_"
    assert mem.read(layout.CMDLINE_START, 14) == b"console=ttyS0\0"
    assert mem.read(0x100000, 32) == pm[:32]


def test_boot_linux_with_elf_and_no_initrd():
    mem = GuestMemory([(0, bytearray(32 * MiB))])
    info = boot_linux(mem, make_elf([(0x1000000, b"\x90" * 32, 0x1000)], entry=0x1000000), None, "", 1)
    assert info.regs.rip == 0x1000000 and info.initrd is None
    assert struct.unpack_from("<II", mem.read(layout.ZERO_PAGE_START + 0x218, 8)) == (0, 0)


def test_tiny_ram_is_refused():
    mem = GuestMemory([(0, bytearray(0x80000))])
    with pytest.raises(BootError, match="first MiB"):
        setup_linux_boot(mem, b"", None, "", 1)


def test_bzimage_64bit_entry_on_request():
    mem = GuestMemory([(0, bytearray(64 * MiB))])
    img, _ = make_bzimage()
    regs, sregs = setup_linux_boot(mem, img, None, "", 1, bzimage_entry="64")
    assert regs.rip == 0x100200 and regs.rsi == layout.ZERO_PAGE_START
    assert sregs.cr3 == layout.PML4_START and sregs.cr0 & 0x80000000


def test_bzimage_32bit_protocol_entry():
    mem = GuestMemory([(0, bytearray(64 * MiB))])
    img, _ = make_bzimage()
    info = boot_linux(mem, img, None, "", 1, bzimage_entry="32")
    assert info.regs.rip == 0x100000 and info.regs.rsi == layout.ZERO_PAGE_START
    assert (info.regs.rbp, info.regs.rbx, info.regs.rdi) == (0, 0, 0)
    s = info.sregs
    assert s.cr0 & 1 and not s.cr0 & 0x80000000 and s.efer == 0 and s.cr4 == 0
    assert (s.cs.db, s.cs.l, s.cs.type, s.cs.limit) == (1, 0, 0xB, 0xFFFFFFFF)
    assert (s.ds.db, s.ds.type) == (1, 3)
    gdt = struct.unpack("<4Q", mem.read(layout.GDT_START, 32))
    assert gdt[1] == 0x00CF9B000000FFFF
    with pytest.raises(ValueError):
        boot_linux(mem, img, None, "", 1, bzimage_entry="16")
