"""Kernel loader: bzImage (Linux boot protocol >= 2.12, 64-bit entry) and ELF64 vmlinux.

Every field of the image is untrusted: offsets and sizes are checked against the image and against
guest RAM before a byte is written, and every refusal is a BootError naming what is wrong.
"""

from __future__ import annotations

import struct

from domain.boot import layout
from domain.boot.errors import BootError
from domain.memory import GuestMemory
from domain.record import record

# Setup header (offsets from the start of the bzImage, equal to offsets inside boot_params).
HDR_START = 0x1F1
HDR_MAX_END = 0x290  # boot_params.edd_mbr_sig_buffer starts here
OFF_SETUP_SECTS = 0x1F1
OFF_BOOT_FLAG = 0x1FE
OFF_JUMP = 0x200
OFF_HEADER = 0x202
OFF_VERSION = 0x206
OFF_LOADFLAGS = 0x211
OFF_INITRD_ADDR_MAX = 0x22C
OFF_KERNEL_ALIGNMENT = 0x230
OFF_RELOCATABLE = 0x234
OFF_XLOADFLAGS = 0x236
OFF_CMDLINE_SIZE = 0x238
OFF_PREF_ADDRESS = 0x258
OFF_INIT_SIZE = 0x260

BOOT_FLAG = 0xAA55
HDRS_MAGIC = b"HdrS"
MIN_PROTOCOL = 0x206
XLF_PROTOCOL = 0x20C  # xloadflags appeared in 2.12
LOADED_HIGH = 0x01
XLF_KERNEL_64 = 0x01
ENTRY_64_OFFSET = 0x200  # startup_64 of the protected-mode part

# ELF64
ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
ET_EXEC = 2
EM_X86_64 = 62
PT_LOAD = 1
PT_NOTE = 4
MAX_PHNUM = 128
XEN_ELFNOTE_PHYS32_ENTRY = 18

_EHDR = struct.Struct("<4sBBBBB7sHHIQQQIHHHHHH")  # 64 bytes
_PHDR = struct.Struct("<IIQQQQQQ")  # 56 bytes
_NHDR = struct.Struct("<III")


@record(frozen=True)
class KernelInfo:
    entry: int  # 64-bit entry point (guest-physical)
    is_bzimage: bool
    load_addr: int  # lowest address written
    kernel_end: int  # first address past everything the kernel may use while booting
    protocol: int  # boot protocol version (0 for ELF)
    setup_header: bytes | None  # bzImage bytes 0x1f1..header end, copied into boot_params
    initrd_addr_max: int
    cmdline_size: int  # longest command line (without the NUL) the kernel accepts
    kernel_alignment: int = 0
    relocatable: bool = False
    pvh_entry: int | None = None  # ELF note XEN_ELFNOTE_PHYS32_ENTRY, if present
    entry_32: int | None = None  # bzImage: the 32-bit protocol entry (startup_32 = load address)


def load_kernel(mem: GuestMemory, image) -> KernelInfo:
    """Load a bzImage or an ELF64 vmlinux into guest RAM."""
    img = memoryview(image).cast("B")
    if len(img) >= 4 and bytes(img[:4]) == ELF_MAGIC:
        return _load_elf(mem, img)
    if len(img) >= OFF_HEADER + 4 and bytes(img[OFF_HEADER:OFF_HEADER + 4]) == HDRS_MAGIC:
        return _load_bzimage(mem, img)
    raise BootError("not a bzImage (no 'HdrS' setup header) nor an ELF64 vmlinux")


def _u8(img, off):
    return img[off]


def _u16(img, off):
    return struct.unpack_from("<H", img, off)[0]


def _u32(img, off):
    return struct.unpack_from("<I", img, off)[0]


def _u64(img, off):
    return struct.unpack_from("<Q", img, off)[0]


def _check_ram(mem: GuestMemory, start: int, end: int, what: str) -> None:
    if end < start or not mem.contains(start, end - start):
        raise BootError(f"{what} needs guest RAM {start:#x}..{end:#x}, which the VM does not have")


def _load_bzimage(mem: GuestMemory, img: memoryview) -> KernelInfo:
    if len(img) < OFF_INIT_SIZE + 4:
        raise BootError("bzImage is truncated inside its setup header")
    if _u16(img, OFF_BOOT_FLAG) != BOOT_FLAG:
        raise BootError("bzImage boot_flag is not 0xaa55")
    version = _u16(img, OFF_VERSION)
    if version < MIN_PROTOCOL:
        raise BootError(f"boot protocol {version >> 8}.{version & 0xff:02d} is too old (need 2.06)")
    if version < XLF_PROTOCOL or not _u16(img, OFF_XLOADFLAGS) & XLF_KERNEL_64:
        raise BootError("bzImage has no 64-bit entry point (xloadflags XLF_KERNEL_64)")
    if not _u8(img, OFF_LOADFLAGS) & LOADED_HIGH:
        raise BootError("bzImage is not a high-loading kernel (loadflags LOADED_HIGH)")
    setup_sects = _u8(img, OFF_SETUP_SECTS) or 4
    setup_size = (setup_sects + 1) * 512
    if setup_size >= len(img):
        raise BootError(f"bzImage of {len(img)} bytes is shorter than its {setup_size}-byte setup")
    # The header ends where the 2-byte jump at 0x200 lands; never copy past hdr in boot_params.
    hdr_end = min(OFF_HEADER + _u8(img, OFF_JUMP + 1), HDR_MAX_END, setup_size)
    hdr_end = max(hdr_end, OFF_INIT_SIZE + 4)
    pm = img[setup_size:]
    load = layout.KERNEL_START
    init_size = _u32(img, OFF_INIT_SIZE)
    relocatable = bool(_u8(img, OFF_RELOCATABLE))
    pref = _u64(img, OFF_PREF_ADDRESS) if relocatable else load
    # The decompressor runs in place and extracts at max(load, pref_address): reserve both.
    end = max(load + len(pm), load + init_size, max(load, pref) + init_size)
    _check_ram(mem, load, end, "kernel")
    mem.write(load, pm)
    initrd_max = _u32(img, OFF_INITRD_ADDR_MAX) or layout.INITRD_ADDR_MAX_DEFAULT
    cmdline_size = _u32(img, OFF_CMDLINE_SIZE) or 255
    return KernelInfo(
        entry=load + ENTRY_64_OFFSET,
        is_bzimage=True,
        load_addr=load,
        kernel_end=end,
        protocol=version,
        setup_header=bytes(img[HDR_START:hdr_end]),
        initrd_addr_max=initrd_max,
        cmdline_size=cmdline_size,
        kernel_alignment=_u32(img, OFF_KERNEL_ALIGNMENT),
        relocatable=relocatable,
        entry_32=load,
    )


def _load_elf(mem: GuestMemory, img: memoryview) -> KernelInfo:
    if len(img) < _EHDR.size:
        raise BootError("ELF image is truncated inside its header")
    (_, cls, data, ver, _, _, _, e_type, machine, _, entry, phoff, _, _, _, phentsize, phnum, _, _,
     _) = _EHDR.unpack_from(img, 0)
    if cls != ELFCLASS64 or data != ELFDATA2LSB or ver != 1:
        raise BootError("ELF kernel is not a little-endian ELF64 file")
    if machine != EM_X86_64:
        raise BootError(f"ELF kernel is for machine {machine}, not x86_64 (62)")
    if e_type != ET_EXEC:
        raise BootError("ELF kernel is not an executable (ET_EXEC)")
    if phentsize != _PHDR.size or not 0 < phnum <= MAX_PHNUM:
        raise BootError("ELF kernel has an invalid program header table")
    if phoff > len(img) or phoff + phnum * _PHDR.size > len(img):
        raise BootError("ELF program header table lies outside the image")
    segments, notes = [], []
    for i in range(phnum):
        p_type, _, off, _, paddr, filesz, memsz, _ = _PHDR.unpack_from(img, phoff + i * _PHDR.size)
        if p_type == PT_NOTE:
            if off + filesz <= len(img):
                notes.append(img[off:off + filesz])
            continue
        if p_type != PT_LOAD:
            continue
        if filesz > memsz:
            raise BootError(f"ELF segment {i} has p_filesz > p_memsz")
        if off + filesz > len(img):
            raise BootError(f"ELF segment {i} lies outside the image")
        if paddr < layout.HIMEM_START:
            raise BootError(f"ELF segment {i} at {paddr:#x} is below 1 MiB, where boot data lives")
        _check_ram(mem, paddr, paddr + memsz, f"ELF segment {i}")
        segments.append((paddr, memsz, img[off:off + filesz]))
    if not segments:
        raise BootError("ELF kernel has no loadable segment")
    if not any(p <= entry < p + m for p, m, _ in segments):
        raise BootError(f"ELF entry point {entry:#x} is outside every loaded segment")
    for paddr, memsz, data in segments:
        dst = mem.view(paddr, memsz)
        dst[:len(data)] = data
        dst[len(data):] = bytes(memsz - len(data))
    return KernelInfo(
        entry=entry,
        is_bzimage=False,
        load_addr=min(p for p, _, _ in segments),
        kernel_end=max(p + m for p, m, _ in segments),
        protocol=0,
        setup_header=None,
        initrd_addr_max=layout.INITRD_ADDR_MAX_DEFAULT,
        cmdline_size=layout.CMDLINE_MAX_SIZE - 1,
        pvh_entry=_pvh_entry(notes),
    )


def _pvh_entry(notes: list[memoryview]) -> int | None:
    """The PVH 32-bit entry from a "Xen" ELF note, walking notes with bounds checks."""
    for blob in notes:
        off = 0
        while off + _NHDR.size <= len(blob):
            namesz, descsz, ntype = _NHDR.unpack_from(blob, off)
            name_off = off + _NHDR.size
            desc_off = name_off + ((namesz + 3) & ~3)
            nxt = desc_off + ((descsz + 3) & ~3)
            if nxt > len(blob):
                break
            if ntype == XEN_ELFNOTE_PHYS32_ENTRY and bytes(blob[name_off:name_off + namesz]).rstrip(b"\0") == b"Xen":
                if descsz >= 8:
                    return struct.unpack_from("<Q", blob, desc_off)[0]
                if descsz >= 4:
                    return struct.unpack_from("<I", blob, desc_off)[0]
            off = nxt
    return None
