"""domain.cpu_state <-> struct kvm_regs / kvm_sregs (field names match one to one)."""

from __future__ import annotations

from dataclasses import fields

from domain.cpu_state import GPR_NAMES, DescriptorTable, Regs, Segment, Sregs

REG_FIELDS = GPR_NAMES + ("rip", "rflags")
SEGMENT_FIELDS = tuple(f.name for f in fields(Segment))
DTABLE_FIELDS = ("base", "limit")
SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
CONTROL = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")


def regs_from_kvm(c) -> Regs:
    return Regs(**{n: getattr(c, n) for n in REG_FIELDS})


def regs_to_kvm(regs: Regs, c) -> None:
    for n in REG_FIELDS:
        setattr(c, n, getattr(regs, n))


def sregs_from_kvm(c) -> Sregs:
    kw = {}
    for name in SEGMENTS:
        seg = getattr(c, name)
        kw[name] = Segment(**{f: getattr(seg, f) for f in SEGMENT_FIELDS})
    for name in ("gdt", "idt"):
        t = getattr(c, name)
        kw[name] = DescriptorTable(base=t.base, limit=t.limit)
    for name in CONTROL:
        kw[name] = getattr(c, name)
    return Sregs(**kw)


def sregs_to_kvm(sregs: Sregs, c) -> None:
    """Fills ``c`` in place; fields KVM has and the domain does not (interrupt bitmap) are kept."""
    for name in SEGMENTS:
        src, dst = getattr(sregs, name), getattr(c, name)
        for f in SEGMENT_FIELDS:
            setattr(dst, f, getattr(src, f))
    for name in ("gdt", "idt"):
        src, dst = getattr(sregs, name), getattr(c, name)
        dst.base, dst.limit = src.base, src.limit
    for name in CONTROL:
        setattr(c, name, getattr(sregs, name))
