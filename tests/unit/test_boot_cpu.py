import struct

from domain.boot import layout
from domain.boot.cpu import gdt_entry, segment_from_gdt, setup_boot_cpu
from domain.memory import GuestMemory

GiB = 1 << 30


def walk(mem, va):
    """Translate a virtual address through the 4-level tables the VMM wrote (2 MiB pages)."""
    cr3 = layout.PML4_START
    pml4e = mem.read_u64(cr3 + 8 * ((va >> 39) & 0x1FF))
    assert pml4e & 1
    pdpte = mem.read_u64((pml4e & ~0xFFF) + 8 * ((va >> 30) & 0x1FF))
    assert pdpte & 1 and not pdpte & 0x80
    pde = mem.read_u64((pdpte & ~0xFFF & ((1 << 52) - 1)) + 8 * ((va >> 21) & 0x1FF))
    assert pde & 1 and pde & 0x80 and pde & 2
    return (pde & ~((1 << 21) - 1) & ((1 << 52) - 1)) | (va & ((1 << 21) - 1))


def test_page_tables_identity_map_the_first_4_gib():
    mem = GuestMemory([(0, bytearray(1 << 20))])
    setup_boot_cpu(mem, 0x1000000)
    for va in (0, 0x7000, 0x100000, 0x1234567, GiB - 1, GiB, 3 * GiB + 0x345, 4 * GiB - 1):
        assert walk(mem, va) == va
    # Nothing maps beyond: PML4 entries 1.. and PDPTE entries 4.. are absent.
    assert mem.read_u64(layout.PML4_START + 8) == 0
    assert mem.read_u64(layout.PDPTE_START + 8 * 4) == 0
    # The tables stay below the command line and the MP table.
    assert layout.PDE_START + 4096 * layout.PDE_COUNT <= layout.CMDLINE_START


def test_gdt_idt_and_registers_for_the_64bit_entry():
    mem = GuestMemory([(0, bytearray(1 << 20))])
    regs, sregs = setup_boot_cpu(mem, 0x1000200)
    gdt = struct.unpack("<4Q", mem.read(layout.GDT_START, 32))
    assert gdt == (0, gdt_entry(0xA09B, 0, 0xFFFFF), gdt_entry(0xC093, 0, 0xFFFFF), gdt_entry(0x808B, 0, 0xFFFFF))
    assert gdt[1] == 0x00AF9B000000FFFF
    assert gdt[2] == 0x00CF93000000FFFF
    assert mem.read_u64(layout.IDT_START) == 0
    assert (regs.rip, regs.rsi, regs.rsp, regs.rbp, regs.rflags) == (0x1000200, 0x7000, 0x8FF0, 0x8FF0, 2)
    cs = sregs.cs
    assert (cs.selector, cs.type, cs.l, cs.db, cs.g, cs.s, cs.present, cs.limit) == (8, 0xB, 1, 0, 1, 1, 1, 0xFFFFFFFF)
    for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        assert (seg.selector, seg.type, seg.db, seg.l, seg.present) == (0x10, 3, 1, 0, 1)
    assert sregs.es is not sregs.ss
    assert (sregs.tr.selector, sregs.tr.type, sregs.tr.s) == (0x18, 0xB, 0)
    assert (sregs.gdt.base, sregs.gdt.limit, sregs.idt.base, sregs.idt.limit) == (0x500, 31, 0x520, 7)
    assert sregs.cr3 == 0x9000
    assert sregs.cr4 & 0x20  # PAE
    assert sregs.cr0 & 0x80000001 == 0x80000001  # PG | PE
    assert sregs.efer & 0x500 == 0x500  # LME | LMA


def test_segment_decoding_of_a_based_byte_granular_entry():
    seg = segment_from_gdt(gdt_entry(0x4093, 0x12345678, 0xABCDE), 5)
    assert (seg.base, seg.limit, seg.selector, seg.g, seg.db) == (0x12345678, 0xABCDE, 40, 0, 1)
    absent = segment_from_gdt(0, 0)
    assert absent.present == 0 and absent.unusable == 1
