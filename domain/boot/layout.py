"""x86_64 guest-physical memory map of a pystrato VM (microvm and the direct Linux boot).

Low memory holds the boot structures the VMM writes before the first instruction; RAM runs from 0
up to the 32-bit MMIO gap and continues at 4 GiB for large guests (StratoVirt's and Firecracker's
layout). Addresses are guest-physical.
"""

from __future__ import annotations

from domain.errors import ConfigError, ResourceExhaustedError

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
PAGE_SIZE = 4096

# Boot structures in low memory.
GDT_START = 0x500
IDT_START = 0x520
ZERO_PAGE_START = 0x7000  # boot_params
BOOT_STACK_POINTER = 0x8FF0
PML4_START = 0x9000
PDPTE_START = 0xA000
PDE_START = 0xB000  # four 4 KiB page directories: 0xb000..0xf000 map the first 4 GiB
PDE_COUNT = 4
CMDLINE_START = 0x20000
CMDLINE_MAX_SIZE = 2048  # bytes including the terminating NUL (x86 COMMAND_LINE_SIZE)

# The "extended BIOS data area" through the end of the ISA hole is reserved in the e820 map;
# the MP floating pointer lives at its start, where Linux scans the last KiB of base memory.
EBDA_START = 0x9FC00
MPTABLE_START = EBDA_START
HIMEM_START = 0x100000  # where the kernel's protected-mode part is loaded
KERNEL_START = HIMEM_START

# Initrd placement limit of the boot protocol for kernels that do not say otherwise.
INITRD_ADDR_MAX_DEFAULT = 0x37FFFFFF

# The 32-bit MMIO gap: no RAM from here to 4 GiB.
MMIO_GAP_START = 0xC000_0000
MMIO_GAP_END = 4 * GiB
MMIO_GAP_SIZE = MMIO_GAP_END - MMIO_GAP_START

# virtio-mmio transports: one 4 KiB window per slot, announced on the kernel command line.
VIRTIO_MMIO_BASE = 0xD000_0000
VIRTIO_MMIO_STRIDE = 0x1000
VIRTIO_MMIO_SIZE = 0x1000

# Interrupt controllers (Linux apicdef.h defaults).
IOAPIC_START = 0xFEC0_0000
IOAPIC_SIZE = 0x1000
LAPIC_START = 0xFEE0_0000
LAPIC_SIZE = 0x1000

# KVM_SET_IDENTITY_MAP_ADDR (one page) and KVM_SET_TSS_ADDR (three pages) just below 4 GiB,
# clear of the IOAPIC/LAPIC pages.
IDENTITY_MAP_ADDR = 0xFFFB_C000
TSS_ADDR = 0xFFFB_D000
KVM_PRIVATE_END = TSS_ADDR + 3 * PAGE_SIZE

# Legacy platform devices.
SERIAL_PORT_BASE = 0x3F8  # COM1
SERIAL_PORT_SIZE = 8
SERIAL_IRQ = 4
I8042_PORT_BASE = 0x60  # 0x60 data .. 0x64 status/command
I8042_PORT_SIZE = 5
I8042_KBD_IRQ = 1
RTC_IRQ = 8

# IOAPIC pins 0..23; virtio-mmio devices take pins from 5 upwards, skipping the RTC's.
IRQ_BASE = 5
IRQ_MAX = 23
VIRTIO_MMIO_IRQS = tuple(i for i in range(IRQ_BASE, IRQ_MAX + 1) if i != RTC_IRQ)
VIRTIO_MMIO_MAX_SLOTS = len(VIRTIO_MMIO_IRQS)


def ram_layout(size: int) -> list[tuple[int, int]]:
    """Guest RAM ranges (gpa, size): below the 32-bit gap, then from 4 GiB."""
    if size <= 0 or size % PAGE_SIZE:
        raise ConfigError("-m", f"memory size {size} is not a positive multiple of {PAGE_SIZE}")
    if size <= MMIO_GAP_START:
        return [(0, size)]
    return [(0, MMIO_GAP_START), (MMIO_GAP_END, size - MMIO_GAP_START)]


def virtio_mmio_slot(index: int) -> tuple[int, int]:
    """(MMIO base, IRQ) of virtio-mmio slot ``index``."""
    if not 0 <= index < VIRTIO_MMIO_MAX_SLOTS:
        raise ResourceExhaustedError(f"no virtio-mmio slot {index}: at most {VIRTIO_MMIO_MAX_SLOTS}")
    return VIRTIO_MMIO_BASE + index * VIRTIO_MMIO_STRIDE, VIRTIO_MMIO_IRQS[index]


def virtio_mmio_cmdline(index: int) -> str:
    """Kernel command-line fragment announcing slot ``index`` (CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES)."""
    base, irq = virtio_mmio_slot(index)
    return f"virtio_mmio.device={VIRTIO_MMIO_SIZE // KiB}K@{base:#x}:{irq}"
