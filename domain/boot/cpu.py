"""Boot CPU state for the 64-bit Linux entry: GDT, IDT, identity page tables, registers.

The BSP starts directly in long mode (as Firecracker and StratoVirt do): flat 64-bit code and data
segments from a 4-entry GDT, paging on with 2 MiB identity pages for the first 4 GiB, RSI pointing
at the zero page. APs are started by the guest itself (INIT/SIPI to the in-kernel LAPIC).
"""

from __future__ import annotations

import struct

from domain.boot import layout
from domain.cpu_state import DescriptorTable, Regs, Segment, Sregs
from domain.memory import GuestMemory

# GDT entries (flags, base, limit): null, code, data, TSS. The code segment is 64-bit for the
# 64-bit entry and 32-bit for the 32-bit one; Linux loads its own GDT at once either way.
GDT_FLAGS = (0, 0xA09B, 0xC093, 0x808B)
GDT_FLAGS_32 = (0, 0xC09B, 0xC093, 0x808B)
GDT_LIMIT = 0xFFFFF
CODE_INDEX, DATA_INDEX, TSS_INDEX = 1, 2, 3

X86_CR0_PE = 0x1
X86_CR0_ET = 0x10
X86_CR0_PG = 0x8000_0000
X86_CR4_PAE = 0x20
EFER_LME = 0x100
EFER_LMA = 0x400

PTE_PRESENT_RW = 0x3
PDE_PS = 0x80  # 2 MiB page
PAGE_2M = 2 << 20
IDENTITY_MAPPED = layout.PDE_COUNT * 512 * PAGE_2M  # 4 GiB


def gdt_entry(flags: int, base: int, limit: int) -> int:
    return (((base & 0xFF00_0000) << 32) | ((base & 0x00FF_FFFF) << 16) | (limit & 0xFFFF)
            | ((limit & 0xF_0000) << 32) | ((flags & 0xF0FF) << 40))


def segment_from_gdt(entry: int, index: int) -> Segment:
    """Decode a GDT entry into the hypervisor-neutral segment register form."""
    access = (entry >> 40) & 0xFF
    flags = (entry >> 52) & 0xF
    limit = (entry & 0xFFFF) | ((entry >> 32) & 0xF_0000)
    g = (flags >> 3) & 1
    present = (access >> 7) & 1
    return Segment(
        base=((entry >> 16) & 0xFF_FFFF) | ((entry >> 32) & 0xFF00_0000),
        limit=(limit << 12) | 0xFFF if g else limit,
        selector=index * 8,
        type=access & 0xF,
        present=present,
        dpl=(access >> 5) & 3,
        db=(flags >> 2) & 1,
        s=(access >> 4) & 1,
        l=(flags >> 1) & 1,
        g=g,
        avl=flags & 1,
        unusable=0 if present else 1,
    )


def write_gdt_idt(mem: GuestMemory, flags: tuple[int, ...] = GDT_FLAGS) -> list[int]:
    gdt = [gdt_entry(f, 0, GDT_LIMIT if f else 0) for f in flags]
    mem.write(layout.GDT_START, struct.pack(f"<{len(gdt)}Q", *gdt))
    mem.write_u64(layout.IDT_START, 0)
    return gdt


def write_page_tables(mem: GuestMemory) -> None:
    """PML4[0] -> PDPTE[0..3] -> four page directories of 2 MiB pages: identity for 0..4 GiB."""
    pml4 = bytearray(4096)
    struct.pack_into("<Q", pml4, 0, layout.PDPTE_START | PTE_PRESENT_RW)
    pdpte = bytearray(4096)
    for i in range(layout.PDE_COUNT):
        struct.pack_into("<Q", pdpte, i * 8, (layout.PDE_START + i * 4096) | PTE_PRESENT_RW)
    pde = struct.pack(f"<{512 * layout.PDE_COUNT}Q",
                      *((i * PAGE_2M) | PDE_PS | PTE_PRESENT_RW for i in range(512 * layout.PDE_COUNT)))
    mem.write(layout.PML4_START, pml4)
    mem.write(layout.PDPTE_START, pdpte)
    mem.write(layout.PDE_START, pde)


def setup_boot_cpu(mem: GuestMemory, entry: int, *, protected_32: bool = False) -> tuple[Regs, Sregs]:
    """Write GDT, IDT and page tables; return the BSP's registers for the kernel entry.

    The default is the 64-bit entry (long mode, identity paging). ``protected_32`` gives the
    32-bit boot protocol's state instead (flat protected mode, paging off), which a bzImage's
    startup_32 expects: it then builds its own 4 GiB identity map before entering long mode."""
    gdt = write_gdt_idt(mem, GDT_FLAGS_32 if protected_32 else GDT_FLAGS)
    write_page_tables(mem)

    def seg(index: int) -> Segment:  # a distinct object per register
        return segment_from_gdt(gdt[index], index)

    sregs = Sregs(
        cs=seg(CODE_INDEX),
        ds=seg(DATA_INDEX), es=seg(DATA_INDEX), fs=seg(DATA_INDEX), gs=seg(DATA_INDEX), ss=seg(DATA_INDEX),
        tr=seg(TSS_INDEX),
        gdt=DescriptorTable(layout.GDT_START, len(gdt) * 8 - 1),
        idt=DescriptorTable(layout.IDT_START, 7),
    )
    if protected_32:
        sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = X86_CR0_PE | X86_CR0_ET, 0, 0, 0
    else:
        sregs.cr0, sregs.cr3 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG, layout.PML4_START
        sregs.cr4, sregs.efer = X86_CR4_PAE, EFER_LME | EFER_LMA
    regs = Regs(rip=entry, rsi=layout.ZERO_PAGE_START, rsp=layout.BOOT_STACK_POINTER,
                rbp=layout.BOOT_STACK_POINTER, rflags=0x2)
    if protected_32:
        regs.rsp = regs.rbp = 0  # the protocol wants ebp/edi/ebx zero; startup_32 sets its stack
    return regs, sregs
