"""The Linux zero page (struct boot_params): setup header, e820 map, command line and initrd."""

from __future__ import annotations

import struct
from collections.abc import Sequence

from domain.boot import layout
from domain.boot.errors import BootError
from domain.boot.loader import BOOT_FLAG, HDR_START, HDRS_MAGIC, LOADED_HIGH, KernelInfo
from domain.memory import GuestMemory

ZERO_PAGE_SIZE = 4096

# boot_params offsets (arch/x86/include/uapi/asm/bootparam.h)
BP_EXT_RAMDISK_IMAGE = 0x0C0
BP_EXT_RAMDISK_SIZE = 0x0C4
BP_EXT_CMD_LINE_PTR = 0x0C8
BP_E820_ENTRIES = 0x1E8
BP_BOOT_FLAG = 0x1FE
BP_HEADER = 0x202
BP_TYPE_OF_LOADER = 0x210
BP_LOADFLAGS = 0x211
BP_RAMDISK_IMAGE = 0x218
BP_RAMDISK_SIZE = 0x21C
BP_CMD_LINE_PTR = 0x228
BP_KERNEL_ALIGNMENT = 0x230
BP_CMDLINE_SIZE = 0x238
BP_E820_TABLE = 0x2D0
E820_MAX_ENTRIES = 128
_E820 = struct.Struct("<QQI")

E820_RAM = 1
E820_RESERVED = 2

TYPE_OF_LOADER_OTHER = 0xFF
ELF_KERNEL_ALIGNMENT = 0x0100_0000


def e820_map(mem: GuestMemory, reserved: Sequence[tuple[int, int]] = ()) -> list[tuple[int, int, int]]:
    """(addr, size, type) entries: guest RAM, with the EBDA/ISA hole and the KVM TSS pages reserved,
    plus the machine's own ``reserved`` (addr, size) windows (q35's ECAM): Linux keeps what e820
    reserves out of the addresses it hands to PCI BARs and bridge windows."""
    out: list[tuple[int, int, int]] = []
    for r in mem.regions:
        start, end = r.gpa, r.end
        if start < layout.EBDA_START:  # RAM below the hole
            out.append((start, min(end, layout.EBDA_START) - start, E820_RAM))
        if end > layout.HIMEM_START:  # RAM above it
            lo = max(start, layout.HIMEM_START)
            out.append((lo, end - lo, E820_RAM))
    out.append((layout.EBDA_START, layout.HIMEM_START - layout.EBDA_START, E820_RESERVED))
    out.append((layout.IDENTITY_MAP_ADDR, layout.KVM_PRIVATE_END - layout.IDENTITY_MAP_ADDR, E820_RESERVED))
    for addr, size in reserved:
        if any(addr < r.end and r.gpa < addr + size for r in mem.regions):
            raise BootError(f"reserved window {addr:#x}+{size:#x} overlaps guest RAM", "-m")
        out.append((addr, size, E820_RESERVED))
    out.sort()
    if len(out) > E820_MAX_ENTRIES:
        raise BootError(f"guest memory map needs {len(out)} e820 entries, more than {E820_MAX_ENTRIES}", "-m")
    return out


def low_ram_end(mem: GuestMemory) -> int:
    """End of the RAM region that starts at address 0."""
    for r in mem.regions:
        if r.gpa == 0:
            return r.end
    raise BootError("guest RAM does not start at address 0", "-m")


def write_cmdline(mem: GuestMemory, kernel: KernelInfo, cmdline: str | bytes) -> int:
    """Copy the NUL-terminated command line to CMDLINE_START; returns its length without the NUL."""
    raw = cmdline.encode() if isinstance(cmdline, str) else bytes(cmdline)
    if b"\0" in raw:
        raise BootError("kernel command line contains a NUL byte", "-append")
    limit = min(kernel.cmdline_size, layout.CMDLINE_MAX_SIZE - 1)
    if len(raw) > limit:
        raise BootError(f"kernel command line of {len(raw)} bytes is longer than {limit}", "-append")
    mem.write(layout.CMDLINE_START, raw + b"\0")
    return len(raw)


def place_initrd(mem: GuestMemory, kernel: KernelInfo, size: int) -> int:
    """Highest page-aligned address below min(low RAM end, initrd_addr_max, 0x37ffffff) that
    holds ``size`` bytes above the kernel."""
    limit = min(low_ram_end(mem), kernel.initrd_addr_max + 1, layout.INITRD_ADDR_MAX_DEFAULT + 1)
    floor = (kernel.kernel_end + layout.PAGE_SIZE - 1) & ~(layout.PAGE_SIZE - 1)
    addr = (limit - size) & ~(layout.PAGE_SIZE - 1)
    if size <= 0 or addr < floor:
        raise BootError(f"initrd of {size} bytes does not fit in guest RAM between "
                        f"{floor:#x} and {limit:#x}", "-initrd")
    return addr


def load_initrd(mem: GuestMemory, kernel: KernelInfo, initrd) -> tuple[int, int]:
    data = memoryview(initrd).cast("B")
    addr = place_initrd(mem, kernel, len(data))
    mem.write(addr, data)
    return addr, len(data)


def write_boot_params(mem: GuestMemory, kernel: KernelInfo, cmdline_len: int,
                      initrd: tuple[int, int] | None, reserved: Sequence[tuple[int, int]] = ()) -> bytes:
    """Build the zero page and write it at ZERO_PAGE_START; returns its bytes."""
    bp = bytearray(ZERO_PAGE_SIZE)
    if kernel.setup_header is not None:
        bp[HDR_START:HDR_START + len(kernel.setup_header)] = kernel.setup_header
    else:
        struct.pack_into("<H", bp, BP_BOOT_FLAG, BOOT_FLAG)
        bp[BP_HEADER:BP_HEADER + 4] = HDRS_MAGIC
        struct.pack_into("<I", bp, BP_KERNEL_ALIGNMENT, ELF_KERNEL_ALIGNMENT)
        struct.pack_into("<I", bp, BP_CMDLINE_SIZE, kernel.cmdline_size)
        bp[BP_LOADFLAGS] |= LOADED_HIGH
    bp[BP_TYPE_OF_LOADER] = TYPE_OF_LOADER_OTHER
    struct.pack_into("<I", bp, BP_CMD_LINE_PTR, layout.CMDLINE_START)
    struct.pack_into("<I", bp, BP_EXT_CMD_LINE_PTR, 0)
    if initrd is not None:
        addr, size = initrd
        struct.pack_into("<II", bp, BP_RAMDISK_IMAGE, addr & 0xFFFFFFFF, size & 0xFFFFFFFF)
        struct.pack_into("<II", bp, BP_EXT_RAMDISK_IMAGE, addr >> 32, size >> 32)
    entries = e820_map(mem, reserved)
    bp[BP_E820_ENTRIES] = len(entries)
    for i, entry in enumerate(entries):
        _E820.pack_into(bp, BP_E820_TABLE + i * _E820.size, *entry)
    mem.write(layout.ZERO_PAGE_START, bp)
    return bytes(bp)
