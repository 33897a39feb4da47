"""Architectural x86_64 register state as plain data, independent of any hypervisor's structs."""

from __future__ import annotations

from domain.record import field, record

GPR_NAMES = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
)


@record
class Regs:
    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rsp: int = 0
    rbp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0
    rflags: int = 0x2  # bit 1 is reserved and always set


@record
class Segment:
    base: int = 0
    limit: int = 0xFFFF
    selector: int = 0
    type: int = 0
    present: int = 1
    dpl: int = 0
    db: int = 0
    s: int = 1
    l: int = 0
    g: int = 0
    avl: int = 0
    unusable: int = 0


@record
class DescriptorTable:
    base: int = 0
    limit: int = 0xFFFF


@record
class Sregs:
    cs: Segment = field(default_factory=lambda: Segment(type=11))
    ds: Segment = field(default_factory=lambda: Segment(type=3))
    es: Segment = field(default_factory=lambda: Segment(type=3))
    fs: Segment = field(default_factory=lambda: Segment(type=3))
    gs: Segment = field(default_factory=lambda: Segment(type=3))
    ss: Segment = field(default_factory=lambda: Segment(type=3))
    tr: Segment = field(default_factory=lambda: Segment(type=11, s=0))
    ldt: Segment = field(default_factory=lambda: Segment(type=2, s=0))
    gdt: DescriptorTable = field(default_factory=DescriptorTable)
    idt: DescriptorTable = field(default_factory=DescriptorTable)
    cr0: int = 0x60000010
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    cr8: int = 0
    efer: int = 0
    apic_base: int = 0xFEE00900


@record(frozen=True)
class VcpuSetup:
    """What a hypervisor needs to present a CPU to the guest (CPUID, MSRs, LAPIC)."""

    index: int
    apic_id: int
    nr_vcpus: int
    threads_per_core: int = 1
    cores_per_socket: int = 1
    # CPUID feature names to hide from the guest (e.g. "avx2", "xsave"), see design.md §6.
    hidden_features: tuple[str, ...] = ()
