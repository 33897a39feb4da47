import struct

import pytest

from domain.boot import layout
from domain.boot.errors import BootError
from domain.boot.loader import load_kernel
from domain.errors import ConfigError
from domain.memory import GuestMemory

MiB = 1 << 20


def ram(size=64 * MiB):
    return GuestMemory([(0, bytearray(size))])


def make_bzimage(pm_size=0x3000, setup_sects=4, version=0x20F, xloadflags=1, loadflags=1,
                 init_size=0x200000, relocatable=1, pref=0x1000000, cmdline_size=2047,
                 initrd_max=0x7FFFFFFF, boot_flag=0xAA55, magic=b"HdrS", header_len=0x6A):
    setup = bytearray((setup_sects or 4) * 512 + 512)
    setup[0x1F1] = setup_sects
    struct.pack_into("<H", setup, 0x1FE, boot_flag)
    setup[0x200] = 0xEB
    setup[0x201] = header_len
    setup[0x202:0x206] = magic
    struct.pack_into("<H", setup, 0x206, version)
    setup[0x211] = loadflags
    struct.pack_into("<I", setup, 0x22C, initrd_max)
    struct.pack_into("<I", setup, 0x230, 0x200000)
    setup[0x234] = relocatable
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, cmdline_size)
    struct.pack_into("<Q", setup, 0x258, pref)
    struct.pack_into("<I", setup, 0x260, init_size)
    pm = bytes((i * 7) & 0xFF for i in range(pm_size))
    return bytes(setup) + pm, pm


def make_elf(segments, entry, machine=62, cls=2, e_type=2, phentsize=56, notes=b"", phoff=64):
    """segments: list of (paddr, data, memsz)."""
    phnum = len(segments) + (1 if notes else 0)
    data_off = phoff + phnum * 56
    phdrs = b""
    blobs = b""
    for paddr, data, memsz in segments:
        phdrs += struct.pack("<IIQQQQQQ", 1, 5, data_off + len(blobs), paddr | 0xFFFFFFFF80000000, paddr,
                             len(data), memsz, 0x200000)
        blobs += data
    if notes:
        phdrs += struct.pack("<IIQQQQQQ", 4, 4, data_off + len(blobs), 0, 0, len(notes), len(notes), 4)
        blobs += notes
    ident = b"\x7fELF" + bytes([cls, 1, 1, 0, 0]) + bytes(7)
    ehdr = ident + struct.pack("<HHIQQQIHHHHHH", e_type, machine, 1, entry, phoff, 0, 0, 64, phentsize,
                               phnum, 64, 0, 0)
    return ehdr + bytes(phoff - 64) + phdrs + blobs


def xen_note(entry):
    return struct.pack("<III", 4, 4, 18) + b"Xen\0" + struct.pack("<I", entry)


def test_bzimage_loads_protected_mode_part_at_1mib_and_enters_at_0x200():
    mem = ram()
    img, pm = make_bzimage()
    info = load_kernel(mem, img)
    assert info.is_bzimage
    assert info.entry == 0x100000 + 0x200
    assert info.load_addr == layout.KERNEL_START
    assert mem.read(0x100000, len(pm)) == pm
    assert info.protocol == 0x20F
    assert info.cmdline_size == 2047
    assert info.initrd_addr_max == 0x7FFFFFFF
    # The decompressor's in-place and relocated footprints are both reserved.
    assert info.kernel_end == 0x1000000 + 0x200000
    assert info.setup_header[:1] == bytes([4])  # starts at 0x1f1 (setup_sects)
    assert info.setup_header[0x202 - 0x1F1:0x206 - 0x1F1] == b"HdrS"
    assert len(info.setup_header) == 0x26C - 0x1F1


def test_bzimage_setup_sects_zero_means_four():
    mem = ram()
    img, pm = make_bzimage(setup_sects=0)
    load_kernel(mem, img)
    assert mem.read(0x100000, 64) == pm[:64]


def test_bzimage_header_length_is_clamped_to_the_setup_header_area():
    img, _ = make_bzimage(header_len=0xFF)
    info = load_kernel(ram(), img)
    assert 0x1F1 + len(info.setup_header) <= 0x290


@pytest.mark.parametrize("kwargs, words", [
    ({"boot_flag": 0x1234}, "boot_flag"),
    ({"version": 0x205}, "too old"),
    ({"version": 0x20B}, "64-bit"),
    ({"xloadflags": 0}, "64-bit"),
    ({"loadflags": 0}, "LOADED_HIGH"),
])
def test_bzimage_refusals(kwargs, words):
    img, _ = make_bzimage(**kwargs)
    with pytest.raises(BootError, match=words) as e:
        load_kernel(ram(), img)
    assert isinstance(e.value, ConfigError)
    assert str(e.value).startswith("-kernel: ")


def test_bzimage_truncated_and_too_big():
    img, _ = make_bzimage()
    with pytest.raises(BootError, match="truncated"):
        load_kernel(ram(), img[:0x250])
    with pytest.raises(BootError, match="shorter than its"):
        load_kernel(ram(), img[:0x300] + bytes(0x100))
    big, _ = make_bzimage(init_size=0x7FFFFFFF)
    with pytest.raises(BootError, match="guest RAM"):
        load_kernel(ram(), big)


def test_garbage_is_refused():
    for junk in (b"", b"MZ" + bytes(100), bytes(4096)):
        with pytest.raises(BootError, match="not a bzImage"):
            load_kernel(ram(), junk)


def test_elf_segments_load_at_paddr_with_bss_zeroed():
    mem = ram()
    mem.write(0x200000 + 0x100, b"\xff" * 0x100)  # stale bytes where the bss goes
    text = bytes(range(256)) * 4
    img = make_elf([(0x200000, text[:0x100], 0x200), (0x400000, b"data", 0x10)], entry=0x200010)
    info = load_kernel(mem, img)
    assert not info.is_bzimage
    assert info.entry == 0x200010
    assert mem.read(0x200000, 0x100) == text[:0x100]
    assert mem.read(0x200100, 0x100) == bytes(0x100)
    assert mem.read(0x400000, 4) == b"data"
    assert info.load_addr == 0x200000
    assert info.kernel_end == 0x400010
    assert info.setup_header is None
    assert info.pvh_entry is None


def test_elf_pvh_note_is_reported():
    img = make_elf([(0x200000, b"x" * 16, 16)], entry=0x200000, notes=xen_note(0x200004))
    assert load_kernel(ram(), img).pvh_entry == 0x200004


@pytest.mark.parametrize("kwargs, words", [
    ({"machine": 3}, "not x86_64"),
    ({"cls": 1}, "ELF64"),
    ({"e_type": 3}, "ET_EXEC"),
    ({"phentsize": 32}, "program header"),
    ({"patch_phoff": 1 << 40}, "outside the image"),
    ({"patch_phoff": 1 << 63}, "outside the image"),
])
def test_elf_header_refusals(kwargs, words):
    phoff = kwargs.pop("patch_phoff", None)
    img = bytearray(make_elf([(0x200000, b"x" * 16, 16)], entry=0x200000, **kwargs))
    if phoff is not None:
        struct.pack_into("<Q", img, 32, phoff)
    with pytest.raises(BootError, match=words):
        load_kernel(ram(), img)


def test_elf_segment_refusals():
    with pytest.raises(BootError, match="below 1 MiB"):
        load_kernel(ram(), make_elf([(0x7000, b"x", 1)], entry=0x7000))
    with pytest.raises(BootError, match="guest RAM"):
        load_kernel(ram(), make_elf([(0x200000, b"x", 1 << 40)], entry=0x200000))
    with pytest.raises(BootError, match="guest RAM"):
        load_kernel(ram(), make_elf([((1 << 64) - 8, b"x", 16)], entry=0x200000))
    with pytest.raises(BootError, match="p_filesz > p_memsz"):
        load_kernel(ram(), make_elf([(0x200000, b"xx", 1)], entry=0x200000))
    with pytest.raises(BootError, match="entry point"):
        load_kernel(ram(), make_elf([(0x200000, b"x", 16)], entry=0x900000))
    img = bytearray(make_elf([(0x200000, b"x" * 64, 64)], entry=0x200000))
    with pytest.raises(BootError, match="outside the image"):
        load_kernel(ram(), bytes(img[:-32]))
    with pytest.raises(BootError, match="truncated"):
        load_kernel(ram(), bytes(img[:40]))


def test_elf_hostile_note_is_ignored_not_crashing():
    bad_note = struct.pack("<III", 0xFFFFFFF0, 4, 18) + b"Xen\0" + b"\0" * 4
    img = make_elf([(0x200000, b"x" * 16, 16)], entry=0x200000, notes=bad_note)
    assert load_kernel(ram(), img).pvh_entry is None
