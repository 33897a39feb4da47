"""Intel MultiProcessor Specification 1.4 table, so a Linux guest without ACPI finds its vCPUs,
the IOAPIC and how ISA IRQs reach it (the in-kernel irqchip's default routing is identity)."""

from __future__ import annotations

import struct

from domain.boot import layout
from domain.boot.errors import BootError
from domain.memory import GuestMemory

MAX_CPUS = 254  # APIC ids 0..253; the IOAPIC takes the next id and 255 is broadcast

MP_PROCESSOR, MP_BUS, MP_IOAPIC, MP_INTSRC, MP_LINTSRC = range(5)
MP_INT, MP_NMI, MP_SMI, MP_EXTINT = range(4)
CPU_ENABLED = 0x1
CPU_BOOTPROCESSOR = 0x2
MPC_APIC_USABLE = 0x1
APIC_VERSION = 0x14
CPU_SIGNATURE = 0x600  # family 6
CPU_FEATURES = 0x201  # APIC | FPU
MPC_SPEC = 4
MPC_OEM = b"PYSTRATO"
MPC_PRODUCT_ID = b"PYSTRATO-VM "
BUS_TYPE_ISA = b"ISA   "
BUS_ID_ISA = 0

MPF = struct.Struct("<4sIBBBBBBBB")  # mpf_intel, 16 bytes
MPC_TABLE = struct.Struct("<4sHBB8s12sIHHII")  # mpc_table, 44 bytes
MPC_CPU = struct.Struct("<BBBBII8x")  # 20 bytes
MPC_BUS = struct.Struct("<BB6s")  # 8 bytes
MPC_IOAPIC = struct.Struct("<BBBBI")  # 8 bytes
MPC_INTSRC = struct.Struct("<BBHBBBB")  # 8 bytes
MPC_LINTSRC = struct.Struct("<BBHBBBB")  # 8 bytes


def _checksum_byte(data: bytes | bytearray) -> int:
    """The byte that makes ``data`` sum to 0 mod 256."""
    return (-sum(data)) & 0xFF


def mptable_size(max_cpus: int) -> int:
    return (MPF.size + MPC_TABLE.size + MPC_CPU.size * max_cpus + MPC_BUS.size + MPC_IOAPIC.size
            + MPC_INTSRC.size * (layout.IRQ_MAX + 1) + MPC_LINTSRC.size * 2)


def build_mptable(boot_cpus: int, max_cpus: int | None = None, base: int = layout.MPTABLE_START) -> bytes:
    """The floating pointer followed by the configuration table, to be placed at ``base``.

    vCPUs 0..boot_cpus-1 are enabled; the rest up to max_cpus are listed disabled (hotplug)."""
    max_cpus = boot_cpus if max_cpus is None else max_cpus
    if not 1 <= boot_cpus <= max_cpus:
        raise BootError(f"invalid vCPU count {boot_cpus} (of {max_cpus})", "-smp")
    if max_cpus > MAX_CPUS:
        raise BootError(f"{max_cpus} vCPUs exceed the MP table's {MAX_CPUS}", "-smp")
    ioapic_id = max_cpus
    entries = bytearray()
    for cpu in range(max_cpus):
        flags = (CPU_ENABLED if cpu < boot_cpus else 0) | (CPU_BOOTPROCESSOR if cpu == 0 else 0)
        entries += MPC_CPU.pack(MP_PROCESSOR, cpu, APIC_VERSION, flags, CPU_SIGNATURE, CPU_FEATURES)
    entries += MPC_BUS.pack(MP_BUS, BUS_ID_ISA, BUS_TYPE_ISA)
    entries += MPC_IOAPIC.pack(MP_IOAPIC, ioapic_id, APIC_VERSION, MPC_APIC_USABLE, layout.IOAPIC_START)
    for irq in range(layout.IRQ_MAX + 1):
        entries += MPC_INTSRC.pack(MP_INTSRC, MP_INT, 0, BUS_ID_ISA, irq, ioapic_id, irq)
    entries += MPC_LINTSRC.pack(MP_LINTSRC, MP_EXTINT, 0, BUS_ID_ISA, 0, 0, 0)
    entries += MPC_LINTSRC.pack(MP_LINTSRC, MP_NMI, 0, BUS_ID_ISA, 0, 0xFF, 1)
    count = max_cpus + 1 + 1 + (layout.IRQ_MAX + 1) + 2

    def table(checksum: int) -> bytes:
        return MPC_TABLE.pack(b"PCMP", MPC_TABLE.size + len(entries), MPC_SPEC, checksum, MPC_OEM,
                              MPC_PRODUCT_ID, 0, 0, count, layout.LAPIC_START, 0)

    config = table(0) + entries
    config = table(_checksum_byte(config)) + entries

    def mpf(checksum: int) -> bytes:
        return MPF.pack(b"_MP_", base + MPF.size, 1, MPC_SPEC, checksum, 0, 0, 0, 0, 0)

    return mpf(_checksum_byte(mpf(0))) + config


def setup_mptable(mem: GuestMemory, boot_cpus: int, max_cpus: int | None = None) -> int:
    """Write the MP table at MPTABLE_START; returns its size."""
    data = build_mptable(boot_cpus, max_cpus)
    if not mem.contains(layout.MPTABLE_START, len(data)):
        raise BootError("guest RAM is too small for the MP table", "-m")
    mem.write(layout.MPTABLE_START, data)
    return len(data)
