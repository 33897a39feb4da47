"""Put a vCPU into real mode, 32-bit protected mode or 64-bit long mode to run test programs.

Writes a GDT and identity page tables (the first 4 GiB with 2 MiB pages, so MMIO windows below
4 GiB are reachable) into guest memory at the addresses a direct 64-bit boot uses (design.md §5), and loads matching sregs/regs through the port, so
the same helper drives KVM and the fake.
"""

from __future__ import annotations

from domain.cpu_state import DescriptorTable, Regs, Segment

GDT_ADDR = 0x500
PML4_ADDR = 0x9000
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000  # four page directories: 0xB000-0xEFFF
STACK = 0x8FF0
CODE_ADDR = 0x4000  # below 64 KiB, so real mode reaches it too

CODE64_SEL, DATA_SEL, CODE32_SEL = 0x08, 0x10, 0x18
_GDT = (
    0,
    0x00AF9B000000FFFF,  # 64-bit code: L=1, present, ring 0, execute/read
    0x00CF93000000FFFF,  # flat data: 4 GiB, read/write
    0x00CF9B000000FFFF,  # 32-bit code: D=1, 4 GiB
)

CR0_PE, CR0_ET, CR0_PG = 1 << 0, 1 << 4, 1 << 31
CR4_PAE = 1 << 5
EFER_LME, EFER_LMA = 1 << 8, 1 << 10
_PDE_PRESENT_RW_HUGE = 0x83
_TABLE_PRESENT_RW = 0x3

MODES = ("real", "protected", "long")


def _segment(selector: int, *, code: bool, long: bool = False) -> Segment:
    # Flat: base 0, 4 GiB (limit in bytes as KVM wants it, with G=1).
    return Segment(base=0, limit=0xFFFF_FFFF, selector=selector, type=11 if code else 3, present=1,
                   dpl=0, db=0 if long else 1, s=1, l=1 if long else 0, g=1)


def write_gdt(memory) -> None:
    for i, entry in enumerate(_GDT):
        memory.write_u64(GDT_ADDR + 8 * i, entry)


def write_identity_page_tables(memory) -> None:
    memory.write_u64(PML4_ADDR, PDPT_ADDR | _TABLE_PRESENT_RW)
    for gib in range(4):
        pd = PD_ADDR + gib * 0x1000
        memory.write_u64(PDPT_ADDR + 8 * gib, pd | _TABLE_PRESENT_RW)
        for i in range(512):
            memory.write_u64(pd + 8 * i, (gib << 30 | i << 21) | _PDE_PRESENT_RW_HUGE)


def enter(vcpu, memory, mode: str, entry: int = CODE_ADDR) -> None:
    """Set ``vcpu`` to start executing at ``entry`` in ``mode`` (one of MODES)."""
    sregs = vcpu.get_sregs()
    if mode == "real":
        for name in ("cs", "ds", "es", "fs", "gs", "ss"):
            seg = getattr(sregs, name)
            seg.base, seg.selector, seg.limit = 0, 0, 0xFFFF
        sregs.cr0 &= ~(CR0_PE | CR0_PG)
        sregs.efer = 0
    else:
        write_gdt(memory)
        sregs.gdt = DescriptorTable(base=GDT_ADDR, limit=8 * len(_GDT) - 1)
        data = _segment(DATA_SEL, code=False)
        sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss = (Segment(**vars(data)) for _ in range(5))
        sregs.cr0 = CR0_PE | CR0_ET
        if mode == "protected":
            sregs.cs = _segment(CODE32_SEL, code=True)
            sregs.efer = 0
            sregs.cr4 = 0
        elif mode == "long":
            write_identity_page_tables(memory)
            sregs.cs = _segment(CODE64_SEL, code=True, long=True)
            sregs.cr3 = PML4_ADDR
            sregs.cr4 = CR4_PAE
            sregs.cr0 |= CR0_PG
            sregs.efer = EFER_LME | EFER_LMA
        else:
            raise ValueError(f"unknown mode {mode!r}")
    vcpu.set_sregs(sregs)
    vcpu.set_regs(Regs(rip=entry, rsp=STACK, rflags=0x2))
