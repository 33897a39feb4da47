"""Where q35's PCI lives in guest-physical memory.

BARs and root port windows come from a 256 MiB window at the start of the 32-bit MMIO gap (RAM
stops at 0xC000_0000, domain.boot.layout); ECAM gets 256 MiB (256 buses) further up, clear of the
virtio-mmio windows microvm uses and of the IOAPIC/LAPIC pages.
"""

from __future__ import annotations

PCI_MMIO_BASE = 0xC000_0000
PCI_MMIO_SIZE = 0x1000_0000
ECAM_BASE = 0xE000_0000
ECAM_BUSES = 256
